"""Attribution methods behind one interface: ``method(model, x, target) -> (B, H, W)`` map.

``x`` is the (normalised) model input (B, C, H, W), ``target`` an int or a LongTensor (B,) of class
indices (None: the predicted class).  Every method returns a float tensor of shape (B, H, W) at the
input resolution; methods that work at a lower resolution are upsampled bilinearly (their native
resolution is ``method.resolution``: "input", "low" = encoder output, "high" = the layer with 4x its
resolution, the paper's † and ‡).

The methods come from their libraries:

* captum: Saliency (|gradient|), GuidedBackprop, InputXGradient, IntegratedGradients (zero baseline,
  50 steps), SmoothGrad (``NoiseTunnel(Saliency)``, 20 samples, sigma = 0.15 x the input range);
  pixel maps are summed over channels;
* zennit: LRP-z+ (the z+ rule on every convolution and linear layer, batch-norm merged into the
  preceding convolution, residual additions through zennit's ``Sum`` layer, activations passed);
* pytorch-grad-cam: GradCAM, GradCAM++, ScoreCAM, AblationCAM, XGradCAM and LayerCAM at the encoder
  output ("low"), LayerCAM at the "high" layer, and FullGrad (the library's maps: ReLU, min-max
  scaled, bilinearly resized to the input);
* srd_fx: SRD-low, SRD-high, SRD-input, from ``srd_fx.compile(model, layers=("input", "low",
  "high"))``; the explainer is compiled once per model and input shape and cached.

Each is a :class:`srd_fx.methods.registry.Method` in the one method registry; ``register(Method(name,
fn, resolution, source))`` adds another baseline (listed in ``METHODS``, offered by the CLI).

The CAM target layers are found by :func:`srd_fx.eval.models.cam_layers` (the same layers SRD-low and
SRD-high read out); :func:`set_cam_layers` overrides them for a model.

**Token models** (timm ViT / MLP-Mixer, :func:`srd_fx.eval.models.is_token_model`): the same
registry, with

* lxt: AttnLRP and CP-LRP, LXT's efficient implementation with the timm patch map of
  :mod:`srd_fx.eval.lxt_patches` (patches undone after each call);
* pytorch-grad-cam: the CAMs take the library's documented ``reshape_transform`` for tokens (drop
  the prefix tokens, reshape to the patch grid, channels first) at the layer of its ViT example,
  :func:`srd_fx.eval.models.token_layers`;
* srd_fx: SRD-low is the encoder output L, SRD-high the first block's channel-MLP activation
  (:func:`srd_fx.eval.models.token_layers`); their (B, N) token maps are put on the patch grid
  with ``explainer.token_grid`` (prefix tokens dropped) and upsampled bilinearly like the CNN maps;
* captum and zennit as for the CNNs (zennit's LRP-z+ sees the attention and the norms as plain
  gradient: it has no rule for them).

:func:`default_methods` gives each kind of model its list (:data:`TOKEN_METHODS` for token models).
"""
from __future__ import annotations

import contextlib
import weakref
from typing import Callable, Dict, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..methods.registry import REGISTRY, RESOLUTIONS, Method, UnknownMethodError  # noqa: F401
from .models import cam_layers, get_module, is_token_model, token_grid_size, token_layers


@contextlib.contextmanager
def no_inplace(model):
    """Temporarily turn off ``inplace`` on activation modules (captum's and zennit's backward hooks
    cannot wrap in-place ops)."""
    changed = [m for m in model.modules() if getattr(m, "inplace", False) is True]
    for m in changed:
        m.inplace = False
    try:
        yield
    finally:
        for m in changed:
            m.inplace = True


# ----------------------------------------------------------------------------- captum ------------
def _saliency(model, x, t):
    from captum.attr import Saliency
    with no_inplace(model):
        return Saliency(model).attribute(x.requires_grad_(), target=t, abs=True)


def _guided_backprop(model, x, t):
    from captum.attr import GuidedBackprop
    with no_inplace(model):
        return GuidedBackprop(model).attribute(x.requires_grad_(), target=t)


def _input_x_gradient(model, x, t):
    from captum.attr import InputXGradient
    with no_inplace(model):
        return InputXGradient(model).attribute(x.requires_grad_(), target=t)


def _integrated_gradients(model, x, t, n_steps: int = 50):
    from captum.attr import IntegratedGradients
    with no_inplace(model):
        return IntegratedGradients(model).attribute(x, baselines=torch.zeros_like(x), target=t, n_steps=n_steps,
                                                    internal_batch_size=max(n_steps, 64))


def _smoothgrad(model, x, t, nt_samples: int = 20, noise_level: float = 0.15):
    from captum.attr import NoiseTunnel, Saliency
    sigma = noise_level * float(x.max() - x.min())
    with no_inplace(model):
        return NoiseTunnel(Saliency(model)).attribute(x.requires_grad_(), nt_type="smoothgrad", nt_samples=nt_samples,
                                                      stdevs=sigma, target=t, nt_samples_batch_size=nt_samples)


# ----------------------------------------------------------------------------- zennit ------------
def _lrp_zplus(model, x, t):
    # the attack's LRP z+ (zennit's z+ rule on every convolution and linear layer, batch norm folded
    # into the convolutions, residual additions split by zennit's Sum): one implementation
    from ..methods.robustness import lrp_zplus
    with torch.enable_grad():
        return lrp_zplus(model, x, t)


# ----------------------------------------------------------------------------- pytorch-grad-cam ---
_CAM_LAYERS: "weakref.WeakKeyDictionary[nn.Module, Tuple[str, str]]" = weakref.WeakKeyDictionary()


def set_cam_layers(model: nn.Module, low: str, high: str) -> None:
    """Use the modules named ``low`` and ``high`` as the CAM target layers for ``model``."""
    get_module(model, low), get_module(model, high)
    _CAM_LAYERS[model] = (low, high)


def get_cam_layers(model: nn.Module, x: torch.Tensor) -> Tuple[str, str]:
    """The (low, high) CAM target layer names for ``model`` (found once, then cached)."""
    if model not in _CAM_LAYERS:
        _CAM_LAYERS[model] = token_layers(model) if is_token_model(model) else cam_layers(model, x)
    return _CAM_LAYERS[model]


def token_reshape_transform(model: nn.Module, x: torch.Tensor) -> Callable:
    """pytorch-grad-cam's ``reshape_transform`` for a timm token model, as its ViT example writes it:
    (B, N, C) tokens -> the prefix tokens dropped -> (B, C, rows, columns)."""
    rows, cols = token_grid_size(model, x)
    prefix = getattr(model, "num_prefix_tokens", 0)

    def reshape_transform(tensor):
        result = tensor[:, prefix:, :].reshape(tensor.size(0), rows, cols, tensor.size(2))
        return result.transpose(2, 3).transpose(1, 2)
    return reshape_transform


def _cam(cls_name: str, which: str = "low", **attrs):
    def fn(model, x, t):
        import pytorch_grad_cam
        from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget
        cls = getattr(pytorch_grad_cam, cls_name)
        kw = {}
        if cls_name == "FullGrad":
            layers = []
        else:
            low, high = get_cam_layers(model, x)
            layers = [get_module(model, low if which == "low" else high)]
        if is_token_model(model):
            kw["reshape_transform"] = token_reshape_transform(model, x)
        with cls(model=model, target_layers=layers, **kw) as cam:
            for k, v in attrs.items():
                setattr(cam, k, v)
            maps = cam(input_tensor=x, targets=[ClassifierOutputTarget(int(c)) for c in t])
        return torch.from_numpy(maps)
    return fn


def _fullgrad(model, x, t):
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "FullGrad does not need target layers"
        return _cam("FullGrad")(model, x, t)


# ----------------------------------------------------------------------------- SRD ---------------
_EXPLAINERS: "weakref.WeakKeyDictionary[nn.Module, Dict]" = weakref.WeakKeyDictionary()


def get_explainer(model: nn.Module, x: torch.Tensor):
    """The SRD explainer of ``model`` for inputs shaped like ``x`` (compiled once, cached)."""
    import srd_fx
    per_model = _EXPLAINERS.setdefault(model, {})
    key = (tuple(x.shape[1:]), x.dtype)
    if key not in per_model:
        per_model[key] = srd_fx.compile(model, layers=("input", "low", srd_layer(model, "high")),
                                        example_input=x[:1])
    return per_model[key]


def srd_layer(model: nn.Module, which: str) -> str:
    """The ``layers=`` key SRD-``which`` reads: "input", "low", and "high" for a CNN; for a token
    model "high" is the module :func:`srd_fx.eval.models.token_layers` names."""
    if which == "high" and is_token_model(model):
        return token_layers(model)[1]
    return which


def _srd(which: str):
    def fn(model, x, t):
        explainer = get_explainer(model, x)
        out = explainer(x, target=t)
        if which == "input":
            return out.saliency
        rel = out.relevance[srd_layer(model, which)]
        if rel.dim() == 2:  # (B, N) tokens: the patch grid, prefix tokens dropped
            rel = explainer.token_grid(rel, n_prefix=getattr(model, "num_prefix_tokens", 0),
                                       grid=token_grid_size(model, x))[0]
        return rel
    return fn


# ----------------------------------------------------------------------------- LXT ---------------
def _lxt(variant: str):
    def fn(model, x, t):
        from . import lxt_patches
        with no_inplace(model):
            return lxt_patches.relevance(model, x, t, variant)
    return fn


# ----------------------------------------------------------------------------- registry ----------
#: the baselines: the registered methods that explain (srd_fx.methods.registry; a live table, so a
#: method registered later with ``register`` is listed, scored and offered by the CLI too)
METHODS = REGISTRY.view("explain")
register, unregister = METHODS.register, METHODS.unregister
for _m in [
    Method("Saliency", _saliency, "input", "captum"),
    Method("GuidedBackprop", _guided_backprop, "input", "captum"),
    Method("InputXGradient", _input_x_gradient, "input", "captum", aliases=("gradinput", "inputxgradient")),
    Method("IntegratedGradients", _integrated_gradients, "input", "captum", aliases=("integrad", "ig")),
    Method("LRP-z+", _lrp_zplus, "input", "zennit", aliases=("lrp", "lrpz+")),
    Method("SmoothGrad", _smoothgrad, "input", "captum"),
    Method("FullGrad", _fullgrad, "input", "pytorch-grad-cam"),
    Method("GradCAM", _cam("GradCAM"), "low", "pytorch-grad-cam"),
    Method("GradCAM++", _cam("GradCAMPlusPlus"), "low", "pytorch-grad-cam", aliases=("gradcampp",)),
    Method("ScoreCAM", _cam("ScoreCAM", batch_size=64), "low", "pytorch-grad-cam"),
    Method("AblationCAM", _cam("AblationCAM", batch_size=64), "low", "pytorch-grad-cam"),
    Method("XGradCAM", _cam("XGradCAM"), "low", "pytorch-grad-cam"),
    Method("LayerCAM-low", _cam("LayerCAM", "low"), "low", "pytorch-grad-cam", aliases=("layercam",)),
    Method("LayerCAM-high", _cam("LayerCAM", "high"), "high", "pytorch-grad-cam"),
    Method("SRD-low", _srd("low"), "low", "srd_fx"),
    Method("SRD-high", _srd("high"), "high", "srd_fx"),
    Method("SRD-input", _srd("input"), "input", "srd_fx", aliases=("srd",)),
    Method("AttnLRP", _lxt("attnlrp"), "input", "lxt"),
    Method("CP-LRP", _lxt("cplrp"), "input", "lxt", aliases=("cplrp",)),
]:
    register(_m, replace=True)  # replace: a reload of this module re-registers the same methods
#: methods made for transformers (LXT): not in the CNNs' default list
TOKEN_ONLY = ("AttnLRP", "CP-LRP")
#: the default methods for token models (each from its library; see the module docstring)
TOKEN_METHODS = ("InputXGradient", "IntegratedGradients", "LRP-z+", "GradCAM", "AttnLRP", "CP-LRP",
                 "SRD-low", "SRD-high", "SRD-input")


def default_methods(model: nn.Module) -> Tuple[str, ...]:
    """The methods a run compares on ``model`` when none are named: :data:`TOKEN_METHODS` for a
    token model, every registered method but the LXT ones for a CNN."""
    if is_token_model(model):
        return TOKEN_METHODS
    return tuple(n for n in METHODS if n not in TOKEN_ONLY)


def get_method(name: str) -> Method:
    """The baseline called ``name`` (case-insensitive; a few aliases such as "IG", "LRP", "SRD");
    ``UnknownMethodError`` (a ``KeyError``) lists the available ones otherwise."""
    return METHODS.lookup(name)
