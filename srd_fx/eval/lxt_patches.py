"""LXT's efficient AttnLRP and CP-LRP on timm token models (used by the evaluation's baselines,
``model_zoo_checks.peers_tokens`` and ``benchmarks/token_methods.py``).

LXT 2.1 (``lxt.efficient``) ships patch maps for Hugging Face models and torchvision's ViT; for
other models it asks for a patch map applied with ``monkey_patch(module, patch_map)``: each value is
called with its class and replaces that class's ``forward``.  The map used here for timm:

* LXT's ``layer_norm_forward`` (identity rule through the normalisation) on ``nn.LayerNorm`` and
  timm's ``LayerNorm``;
* LXT's ``non_linear_forward`` (identity rule) on GELU / SiLU modules (torch's and timm's);
* LXT's attention wrappers around ``F.scaled_dot_product_attention``, the function every timm
  attention block with fused attention calls: ``wrap_attention_forward`` (AttnLRP: the uniform
  rule, relevance through q, k and v) or ``cp_wrap_attention_forward`` (CP-LRP: no relevance
  through q and k);
* LXT's zennit patch (``monkey_patch_zennit``) and zennit rules on linear layers as in LXT's ViT
  example: ``Gamma(0.25)`` on ``Conv2d``, ``Gamma(0.05)`` on ``Linear`` outside the attention
  (see :func:`composite`).

The map is the gradient x input of the patched model.  LXT patches classes and functions for the
whole process; :func:`patched` undoes every patch on exit, so the other methods of a run see the
library code unchanged.  Attention blocks that do not call ``F.scaled_dot_product_attention`` and
norms or activations of other classes are left as they are (plain gradient there).
"""
from __future__ import annotations

import contextlib
import functools
import sys
import types
from pathlib import Path
from typing import Iterator, Tuple

import torch
import torch.nn as nn

VARIANTS = ("attnlrp", "cplrp")
CONV_GAMMA, LINEAR_GAMMA = 0.25, 0.05
_MISSING = object()


def lxt_efficient() -> Tuple[types.ModuleType, types.ModuleType]:
    """``lxt.efficient``'s ``patches`` and ``zennit_patches`` modules.

    LXT 2.1's ``lxt/efficient/__init__.py`` imports its Hugging Face model maps (llama, gemma3, ...),
    which fail on transformers releases that dropped ``transformers.modeling_attn_mask_utils``;
    nothing used here needs them, so when that import fails the packages ``lxt.efficient`` and
    ``lxt.efficient.models`` are registered without running their ``__init__`` and the modules used
    are imported directly."""
    from ..extras import require
    require("lxt", "LXT (AttnLRP, CP-LRP)")
    try:
        import lxt.efficient  # noqa: F401
    except ImportError:
        import lxt
        root = Path(lxt.__file__).parent / "efficient"
        for name, path in (("lxt.efficient", root), ("lxt.efficient.models", root / "models")):
            if name not in sys.modules or not hasattr(sys.modules[name], "__path__"):
                pkg = types.ModuleType(name)
                pkg.__path__ = [str(path)]
                sys.modules[name] = pkg
    from lxt.efficient import patches, zennit_patches
    return patches, zennit_patches


def _patch_map(patches) -> dict:
    import timm.layers
    patch_method = patches.patch_method
    identity = functools.partial(patch_method, patches.non_linear_forward, keep_original=True)
    norm = functools.partial(patch_method, patches.layer_norm_forward)
    pmap = {nn.LayerNorm: norm, timm.layers.LayerNorm: norm, nn.GELU: identity, nn.SiLU: identity}
    for name in ("GELU", "GELUTanh", "QuickGELU"):
        cls = getattr(timm.layers.activations, name, None)
        if cls is not None:
            pmap[cls] = identity
    return pmap


@contextlib.contextmanager
def restored(*classes) -> Iterator[None]:
    """On exit, the ``forward``, ``original_forward`` and ``backward`` attributes of ``classes`` are
    what they were on entry (what LXT's ``patch_method`` replaces or adds)."""
    saved = [(cls, attr, cls.__dict__.get(attr, _MISSING))
             for cls in classes for attr in ("forward", "original_forward", "backward")]
    try:
        yield
    finally:
        for cls, attr, value in saved:
            if value is _MISSING:
                if attr in cls.__dict__:
                    delattr(cls, attr)
            else:
                setattr(cls, attr, value)


@contextlib.contextmanager
def patched(variant: str) -> Iterator[None]:
    """Within the block, torch/timm classes carry LXT's AttnLRP (``"attnlrp"``) or CP-LRP
    (``"cplrp"``) patches and zennit's ``BasicHook`` carries LXT's zennit patch; all undone on exit."""
    if variant not in VARIANTS:
        raise ValueError(f"unknown LXT variant {variant!r}; choose one of {VARIANTS}")
    import torch.nn.functional as F
    patches, zennit_patches = lxt_efficient()
    from zennit.core import BasicHook
    pmap = _patch_map(patches)
    sdpa = F.scaled_dot_product_attention
    with restored(*pmap, BasicHook), _restoring(F, "scaled_dot_product_attention", sdpa):
        for target, patch in pmap.items():
            if not patch(target):
                raise RuntimeError(f"LXT could not patch {target.__name__} (already patched?)")
        wrap = patches.wrap_attention_forward if variant == "attnlrp" else patches.cp_wrap_attention_forward
        wrapped = wrap(lambda module, q, k, v, *a, **kw: sdpa(q, k, v, *a, **kw))
        F.scaled_dot_product_attention = lambda q, k, v, *a, **kw: wrapped(None, q, k, v, *a, **kw)
        zennit_patches.monkey_patch_zennit()
        yield


@contextlib.contextmanager
def _restoring(obj, name: str, value) -> Iterator[None]:
    try:
        yield
    finally:
        setattr(obj, name, value)


def composite():
    """The zennit composite of LXT's ViT example: ``Gamma(0.25)`` on ``Conv2d``, ``Gamma(0.05)`` on
    ``Linear`` -- except the projections of timm's attention blocks (``*.attn.qkv``, ``*.attn.proj``),
    which get no rule, as in LXT's example: its torchvision ViT computes both inside
    ``nn.MultiheadAttention`` (``F.multi_head_attention_forward`` reads the weights; no ``Linear``
    module is called for a rule to act on).  With this, a timm
    ViT and a torchvision ViT with the same weights get the same CP-LRP map (tested).  Registered on
    a model with ``composite().context(model)``."""
    import zennit.rules as zr
    from zennit.core import Composite
    conv, linear = zr.Gamma(CONV_GAMMA), zr.Gamma(LINEAR_GAMMA)

    def module_map(ctx, name, module):
        if isinstance(module, nn.Conv2d):
            return conv
        if isinstance(module, nn.Linear) and name.rpartition(".")[0].rpartition(".")[2] != "attn":
            return linear
        return None
    return Composite(module_map=module_map)


def relevance(model: nn.Module, x: torch.Tensor, target: torch.Tensor, variant: str) -> torch.Tensor:
    """LXT's map of ``model`` for class ``target`` (one per sample): the input times the gradient of
    the target logits under the patches and the composite, (B, C, H, W)."""
    target = torch.as_tensor(target, dtype=torch.long).reshape(-1)
    with patched(variant), composite().context(model), torch.enable_grad():
        xr = x.detach().clone().requires_grad_(True)
        y = model(xr)
        (grad,) = torch.autograd.grad(y.gather(1, target[:, None].to(y.device)).sum(), xr)
    return (xr * grad).detach()
