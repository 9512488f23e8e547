"""The whole compiler pipeline, in one place:

    model --trace--> GraphModule --shape_prop--> shapes --analyse--> layers, L, blocks
          --build_twin--> twin GraphModule: forward (recording constants) + SRD backward

``compile(model)`` returns an :class:`Explainer`, an ``nn.Module`` whose ``forward(x, target)``
returns an :class:`SRDOutput`.  The twin is built on the first call (or at once when an
``example_input`` is given or the model is a timm model with a default input size), because
layout and gate decisions use the shapes of one forward pass.
"""
from __future__ import annotations

import contextlib
import re
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence, Union

import torch
import torch.nn as nn

from .analysis import GraphInfo, single_input
from ..errors import (InputError, LayerError, NonFiniteError, SRDError, TrainingModeError, UnsupportedOpError,
                      UnsupportedPrecisionError)
from .options import Options
from .trace import NodeFailure, TraceError, check_eval, check_trace_matches, shape_prop, specialised_for, trace
from .twin import WRAP_RECIPE, build_twin, check_input, explain_failure, not_a_tensor, refresh_constants


@dataclass
class SRDOutput:
    """What an explainer returns.

    Relevance is conserved: ``saliency.sum() + lost == R_L.sum()`` per sample.

    Attributes
    ----------
    logits
        (B, K), equal to ``model(x)``.
    saliency
        (B, H, W) relevance at the input ("SRD-input").
    relevance
        Requested layer name -> (B, h, w) relevance map.
    R_L
        (B, h_L, w_L) the initial relevance at the encoder output L.
    lost
        (B,) relevance that could not be propagated (on zero-norm PFVs or receptive fields).
    """
    logits: torch.Tensor
    saliency: torch.Tensor
    relevance: Dict[str, torch.Tensor] = field(default_factory=dict)
    R_L: Optional[torch.Tensor] = None
    lost: Optional[torch.Tensor] = None

    @staticmethod
    def cat(parts: Sequence["SRDOutput"]) -> "SRDOutput":
        """Concatenate the outputs of several chunks along the batch.

        Parameters
        ----------
        parts
            Outputs with the same layers, in batch order.

        Returns
        -------
        SRDOutput
            One output for the whole batch.
        """
        keys = parts[0].relevance.keys()
        c = lambda ts: None if ts[0] is None else torch.cat(ts)
        return SRDOutput(c([p.logits for p in parts]), c([p.saliency for p in parts]),
                         {k: torch.cat([p.relevance[k] for p in parts]) for k in keys},
                         c([p.R_L for p in parts]), c([p.lost for p in parts]))


class Explainer(nn.Module):
    """A compiled SRD explainer, an ``nn.Module``: ``explainer(x, target)`` returns an :class:`SRDOutput`.

    Made by :func:`srd_fx.compile`, which takes the same arguments and documents them.  The twin
    (the generated forward and SRD backward) is built on the first call, or at once when
    ``example_input`` is given or the model is a timm model with a default input size.

    Parameters
    ----------
    model, options, example_input, **overrides
        As in :func:`srd_fx.compile`.

    Raises
    ------
    srd_fx.SRDError
        As :func:`srd_fx.compile` does.
    """

    def __init__(self, model: nn.Module, options: Optional[Options] = None, *,
                 example_input: Optional[torch.Tensor] = None, **overrides: Any) -> None:
        super().__init__()
        self.options = o = Options.make(options, **overrides)
        self.output_selector, self.chunk_size = o.output_selector, o.chunk_size
        check_eval(model)
        self.model = model
        self.graph_module = None
        self.info: Optional[GraphInfo] = None
        try:
            self.traced = trace(model)
        except TraceError:
            ex = example_input if example_input is not None else _default_example(model)
            if ex is None:  # may trace once the input size is known (shape-dependent branches)
                self.traced = None
            else:
                self.traced = trace(model, ex)
        if o.check:
            bad = _non_finite(list(model.named_parameters()) + list(model.named_buffers()))
            if bad:
                raise NonFiniteError(f"the model has non-finite weights in {bad[:5]}: explanations would be NaN")
        if example_input is None:
            example_input = _default_example(model)
        if example_input is not None:
            self.build(example_input)

    # ------------------------------------------------------------------ building ----------
    def build(self, example: torch.Tensor) -> "Explainer":
        """Analyse the traced graph with the shapes of ``example`` and generate the twin.

        Parameters
        ----------
        example
            An input batch; its first sample decides shapes, layouts and gates.

        Returns
        -------
        Explainer
            ``self``, built.

        Raises
        ------
        srd_fx.InputError
            If the model fails on ``example``.
        srd_fx.TraceError
            If the traced graph does not compute what the model computes (with ``check``).
        srd_fx.UnsupportedOpError
            For an op without a rule, or a model returning a tuple/dict without ``output_selector``.
        """
        if not isinstance(example, torch.Tensor):
            raise InputError(not_a_tensor(example, "the example input"))
        ex = example[:1].detach()
        if not specialised_for(self.traced, example.shape):
            self.traced = trace(self.model, example.detach())  # shape-specialised trace for this input
        if self.traced.meta.get("srd_specialised") is not None:
            ex = example.detach()
        _check_one_input(self.traced)
        try:
            with _half_kernels(ex):
                traced_out = shape_prop(self.traced, ex)
        except NodeFailure as f:
            err = half_precision_failure(f.error, ex)
            if err is not None:
                raise err from f.error
            raise InputError(_failure_message(f, self.traced, example)) from None
        o = self.options
        if o.check:
            check_trace_matches(self.model, ex, traced_out)
        if o.output_selector is None:
            _check_single_output(self.traced)
        with _named_errors(f"building the explainer of {type(self.model).__name__}"):
            self.info = GraphInfo(self.traced, o.encoder_output, o.output_selector)
            self.__dict__.pop("_seeded_cache", None)
            self.graph_module, self.layer_nodes = build_twin(
                self.info, _root_of(self.model), head=o.head, layers=o.layers, eps=o.eps, value=o.value,
                unit=o.unit, check=o.check, output_selector=o.output_selector,
                input_channels=ex.shape[1] if ex.dim() > 1 else None)
        return self

    def _seeded(self, layer: str):
        """A twin that propagates a given relevance map from ``layer`` down (cached)."""
        from .twin import resolve_layers
        node = resolve_layers(self.info, [layer])[layer]
        if node is self.info.input:
            raise ValueError("the input has no layer below it to propagate to")
        if self.info.shape(node)[0] != self.info.shape(self.info.input)[0]:
            raise LayerError(
                f"layer {layer!r} has its windows folded into the batch axis (shape "
                f"{tuple(self.info.shape(node))} for a batch of {self.info.shape(self.info.input)[0]}): "
                "erf and propagate cannot seed it; its relevance is read out per sample by a normal call "
                "(layers=...), and a layer outside the windows can be seeded")
        cache = self.__dict__.setdefault("_seeded_cache", {})
        if node not in cache:
            o = self.options
            gm, _ = build_twin(self.info, _root_of(self.model), layers="all", eps=o.eps,
                               value=o.value, unit=o.unit, check=False, seed=node)
            cache[node] = gm
        return node, cache[node]

    def propagate(self, x: torch.Tensor, layer: str, R: torch.Tensor,
                  read: Optional[Sequence[str]] = None) -> Union[torch.Tensor, Dict[str, torch.Tensor]]:
        """Propagate any relevance map ``R`` given at ``layer`` down to the input.

        Parameters
        ----------
        x
            The inputs (B, C, H, W).
        layer
            An activation layer (module or node name, ``"low"``, ``"high"``).
        R
            The relevance at ``layer``: (B, h, w) (one value per PFV, in the input's orientation), or
            one value per neuron with ``unit="neuron"``.
        read
            Layer names to read the relevance at instead of the input (e.g. the previous activation
            layer: the sharing ratios of the seeded PFVs, Fig. 5 bottom).

        Returns
        -------
        torch.Tensor or dict of str to torch.Tensor
            The input map (B, H, W); with ``read``, layer name -> the relevance reaching it.

        Raises
        ------
        srd_fx.InputError
            If ``R`` does not have one value per PFV (or neuron) of ``layer``.
        KeyError
            If ``layer`` or a ``read`` name is not a layer of the model.
        ValueError
            If ``layer`` is the input.
        """
        if self.graph_module is None:
            self.build(x)
        node, gm = self._seeded(layer)
        shape = list(self.info.shape(node))
        per_neuron = self.options.unit == "neuron"   # unit="neuron": one relevance per neuron
        if not per_neuron:
            for a in self.info.caxes(node):
                shape[a] = 1
        shape[0] = x.shape[0]
        want = (tuple(s for i, s in enumerate(shape) if i != 0) if per_neuron
                else self.info.position_shape(node))
        if R.numel() != _prod(shape):
            raise InputError(f"relevance for layer {layer!r} must have {want} "
                             f"{'neuron values' if per_neuron else 'values'} per sample, got {tuple(R.shape)}")
        if not per_neuron:
            R = self._to_layout(node, R.reshape((x.shape[0],) + want))
        refresh_constants(gm)
        with _half_kernels(x):
            out = gm(x, R.reshape(shape))
        return out["saliency"] if read is None else self._read(out, read)

    def _to_layout(self, node, m):
        """A position map given in the input's orientation (B, rows, columns, ...) in the axis
        order of ``node``'s tensor (the inverse of the read-out permutation)."""
        perm = self.info.readout_perm(node)
        return m if perm is None else m.permute([perm.index(i) for i in range(len(perm))])

    def _read(self, out, read):
        from .twin import resolve_layers
        res = {}
        for key in read:
            node = resolve_layers(self.info, [key])[key]
            name = "input" if node is self.info.input else node.name
            res[key] = out["relevance"][name]
        return res

    def erf(self, x: torch.Tensor, layer: str, positions: Optional[Sequence[Sequence[int]]] = None,
            read: Optional[Sequence[str]] = None) -> Union[torch.Tensor, Dict[str, torch.Tensor]]:
        """Effective receptive fields of PFVs of ``layer``: backward passes seeded one-hot.

        The passes are batched over the positions.  Each ERF sums to 1 where norms are not
        degenerate.

        Parameters
        ----------
        x
            The inputs (B, C, H, W).
        layer
            An activation layer (module or node name, ``"low"``, ``"high"``).
        positions
            Index tuples over the layer's spatial dimensions (default: all positions).
        read
            Layer names to read the ERFs at instead of the input.

        Returns
        -------
        torch.Tensor or dict of str to torch.Tensor
            (B, P, H, W) ERFs at the input; with ``read``, layer name -> (B, P, h, w).

        Raises
        ------
        srd_fx.InputError
            For a position outside the layer, or with ``unit="neuron"`` (seed neurons with
            :meth:`propagate`).
        KeyError
            If ``layer`` is not a layer of the model.
        """
        if self.options.unit == "neuron":
            raise InputError("erf() seeds one PFV (SPEC §3) and is defined for unit='pfv'; with "
                             "unit='neuron' seed the neurons you want with propagate(x, layer, R)")
        if self.graph_module is None:
            self.build(x)
        node, gm = self._seeded(layer)
        cax = self.info.caxes(node)
        sp = list(self.info.position_shape(node))    # positions are (row, column, ...) of the input
        if positions is None:
            positions = [tuple(int(v) for v in idx) for idx in torch.cartesian_prod(*[torch.arange(s) for s in sp]).reshape(-1, len(sp)).tolist()]
        positions = [tuple(p) if isinstance(p, (tuple, list)) else (p,) for p in positions]
        for p in positions:
            if len(p) != len(sp) or any(not (0 <= v < s) for v, s in zip(p, sp)):
                raise InputError(f"position {p} is outside layer {layer!r} of spatial size {tuple(sp)}")
        B, P = x.shape[0], len(positions)
        seed = torch.zeros([B * P] + sp, dtype=x.dtype, device=x.device)
        for k, p in enumerate(positions):
            seed[(slice(k, None, P),) + p] = 1
        xr = x.repeat_interleave(P, dim=0)
        shape = list(self.info.shape(node))
        for a in cax:
            shape[a] = 1
        shape[0] = B * P
        refresh_constants(gm)
        with _half_kernels(xr):
            out = gm(xr, self._to_layout(node, seed).reshape(shape))
        if read is not None:
            return {k: v.reshape(B, P, *v.shape[1:]) for k, v in self._read(out, read).items()}
        sal = out["saliency"]
        return sal.reshape(B, P, *sal.shape[1:])

    def token_grid(self, relevance: torch.Tensor, **kw):
        """A token layer's relevance ``(B, N)`` as the patch grid ``(B, h, w)`` and the prefix
        tokens ``(B, n_prefix)`` (see :func:`srd_fx.token_grid`)."""
        from .tokens import token_grid
        return token_grid(relevance, self, **kw)

    @property
    def code(self) -> str:
        """The generated forward + SRD backward, as Python source."""
        if self.graph_module is None:
            raise RuntimeError("the explainer is built on its first call: call it once, or pass "
                               "example_input= to srd_fx.compile, before reading .code")
        return self.graph_module.code

    @property
    def activation_layers(self) -> List[str]:
        """The fx node names of the activation layers (empty until the explainer is built)."""
        return [l.name for l in self.info.layers] if self.info else []

    @property
    def encoder_output(self) -> Optional[str]:
        """The fx node name of the encoder output L (None until the explainer is built)."""
        return self.info.L.name if self.info else None

    # ------------------------------------------------------------------ calling -----------
    def forward(self, x: torch.Tensor, target: Union[None, int, torch.Tensor] = None) -> SRDOutput:
        """Explain a batch: the logits and the SRD maps in one call.

        Parameters
        ----------
        x
            The inputs (B, C, H, W), of the model's dtype and device.  Differentiable: with
            ``x.requires_grad`` the maps carry gradients.
        target
            The class explained: None (each sample's predicted class), an int, or a LongTensor (B,).

        Returns
        -------
        SRDOutput
            Logits, saliency, the requested relevance maps, ``R_L`` and ``lost``.

        Raises
        ------
        srd_fx.InputError
            For an input of the wrong rank, dtype or device, a non-finite input, or a bad target.
        srd_fx.TrainingModeError
            If the model was put back in training mode.
        srd_fx.NonFiniteError
            If a map would hold NaN/Inf.
        srd_fx.PrecisionLossError
            If float16/bfloat16 lost the map (it no longer conserves the relevance).
        srd_fx.UnsupportedPrecisionError
            If this machine has no kernel for a float16/bfloat16 computation.
        """
        if not isinstance(x, torch.Tensor):
            raise InputError(not_a_tensor(x, "the input"))
        if self.options.check and any(m.training for m in self.model.modules()):
            raise TrainingModeError("the model was put back in training mode after compile; call "
                                    "model.eval() before explaining")
        if self.options.check or self.graph_module is None:
            # before the twin is (re)built for it; the twin itself checks the values (finiteness)
            rank = len(self.info.shape(self.info.input)) if self.graph_module is not None else None
            check_input(x, rank, None, next((p for p in self.model.parameters() if p.is_floating_point()), None),
                        finite=False)
        if self.graph_module is not None and not specialised_for(self.traced, x.shape):
            self.graph_module = None  # the trace depends on the input size: rebuild for this one
        if self.graph_module is None:
            self.build(x)
        n = self.chunk_size
        if n is not None and x.shape[0] > n:
            # memory bound: only n samples' activations are alive at a time
            ts = target if isinstance(target, torch.Tensor) and target.dim() > 0 else None
            return SRDOutput.cat([self.forward(x[i:i + n], ts[i:i + n] if ts is not None else target)
                                  for i in range(0, x.shape[0], n)])
        refresh_constants(self.graph_module)
        with _half_kernels(x), _named_errors("explaining", self.graph_module):
            if torch.is_grad_enabled() and not x.requires_grad:
                # nothing to differentiate: do not keep the autograd graph through the parameters
                with torch.no_grad():
                    out = self.graph_module(x, target)
            else:
                out = self.graph_module(x, target)
        if out["ok"] is not None and not bool(out["ok"]):  # the one device->host sync of a call
            explain_failure(x, target, out)
        return SRDOutput(out["logits"], out["saliency"], out["relevance"], out["R_L"], out["lost"])


# What PyTorch says when a machine has no kernel for a half-precision op: oneDNN without float16
# support (a CPU without avx512_fp16/AMX), an op with no CPU Half/BFloat16 implementation.
_NO_HALF_KERNEL = re.compile(r"could not create a primitive descriptor|not implemented for '(Half|BFloat16)'"
                             r"|Low precision dtypes not supported|Unsupported dtype (Half|BFloat16)")


def half_precision_failure(e: BaseException, x: torch.Tensor) -> Optional[UnsupportedPrecisionError]:
    """The named error for ``e`` if it is a missing half-precision kernel while explaining ``x``
    (in float16/bfloat16, or under autocast to one of them); None for anything else."""
    if isinstance(e, SRDError) or not isinstance(x, torch.Tensor):
        return None
    dev = x.device.type
    dtype = x.dtype if x.dtype in (torch.float16, torch.bfloat16) else (
        torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else None)
    if dtype not in (torch.float16, torch.bfloat16):
        return None
    cause, seen = e, set()
    while cause is not None and id(cause) not in seen:   # shape propagation wraps the op's error
        seen.add(id(cause))
        msg = str(cause)
        if isinstance(cause, (RuntimeError, NotImplementedError)) and _NO_HALF_KERNEL.search(msg):
            break
        cause = cause.__cause__ or cause.__context__
    else:
        return None
    name = "float16" if dtype == torch.float16 else "bfloat16"
    other = "float32 (model.float() and x.float(), outside autocast), bfloat16" if dtype == torch.float16 \
        else "float32 (model.float() and x.float(), outside autocast)"
    line = next((l for l in msg.splitlines() if l.strip()), msg)[:200]
    why = (f" (oneDNN: this CPU lacks the {name} instructions, avx512_fp16 or AMX)"
           if "primitive descriptor" in msg else "")
    return UnsupportedPrecisionError(
        f"this {dev.upper() if dev == 'cpu' else dev} has no {name} kernel for an op of the model or its "
        f"SRD twin{why}: {type(cause).__name__}: {line}. Explain in {other}, or on a GPU.")


@contextlib.contextmanager
def _half_kernels(x):
    """Turn a missing half-precision kernel into UnsupportedPrecisionError; other errors pass."""
    try:
        yield
    except (RuntimeError, NotImplementedError) as e:
        err = half_precision_failure(e, x)
        if err is None:
            raise
        raise err from e


def _check_one_input(gm) -> None:
    """Refuse a forward with several required inputs before running it."""
    required = [n.name for n in gm.graph.nodes if n.op == "placeholder" and not n.args]
    if len(required) > 1:
        raise InputError(f"the model's forward takes {len(required)} inputs ({', '.join(required)}); srd_fx "
                         "explains models with one tensor input: " + WRAP_RECIPE)


def _failure_message(f: "NodeFailure", gm, example: torch.Tensor) -> str:
    """The root cause of a failed example run: the op, the node and the exception's own first
    line, and what to change."""
    n, e = f.node, f.error
    first = next((l for l in str(e).splitlines() if l.strip()), "")[:300]
    if n.op == "call_module":
        where = f"module {n.target!r} ({type(gm.get_submodule(n.target)).__name__})"
    else:
        target = n.target if isinstance(n.target, str) else getattr(n.target, "__name__", n.target)
        where = f"node {n.name!r} ({target})"
    shape = tuple(example.shape)
    low = first.lower()
    if "channels" in low or "channel" in low:
        fix = (f"give the input the number of channels the model expects (the input has {shape[1]}"
               + ("; for a grey image use x.expand(-1, 3, -1, -1)" if len(shape) > 1 and shape[1] == 1 else "")
               + ")")
    elif any(k in low for k in ("cannot be multiplied", "size", "shape", "expected input")):
        fix = ("give the input the size the model was built for (a Linear after flatten fixes the "
               "spatial size; an AdaptiveAvgPool2d before the flatten would lift that), or resize the images")
    else:
        fix = "check the input's size, channels, dtype and device against what the model expects"
    return (f"the model fails on an input of shape {shape} at {where}: {type(e).__name__}: {first}. "
            f"To fix: {fix}.")


_LIBRARY_ERRORS = (RuntimeError, ValueError, AttributeError, TypeError, IndexError, AssertionError,
                   NotImplementedError, ZeroDivisionError)


@contextlib.contextmanager
def _named_errors(what: str, gm=None):
    """No raw library exception escapes compile or a call: an op srd_fx handles wrongly or not at
    all becomes an UnsupportedOpError naming the line of the generated code (``explainer.code``)
    where it failed.  srd_fx's own errors pass through."""
    try:
        yield
    except SRDError:
        raise
    except _LIBRARY_ERRORS as e:
        where = ""
        tb = e.__traceback__
        code = getattr(gm, "code", None)
        while tb is not None:
            if tb.tb_frame.f_code.co_filename.startswith("<eval_with_key>") and code:
                lines = code.splitlines()
                if 0 < tb.tb_lineno <= len(lines):
                    where = f" at `{lines[tb.tb_lineno - 1].strip()[:200]}`"
            tb = tb.tb_next
        msg = str(e).strip().splitlines()[0][:300] if str(e).strip() else ""
        raise UnsupportedOpError(
            f"srd_fx failed while {what}{where} ({type(e).__name__}: {msg}). An op of this model is "
            "not handled correctly yet: register a rule for it (srd_fx.register_rule), or pass "
            "encoder_output= to explain a part of the model that srd_fx supports.") from e


def _check_single_output(gm) -> None:
    """A model returning a tuple/dict needs ``output_selector`` (said before the analysis looks
    for the encoder output, which the other outputs could confuse)."""
    from torch.fx.passes.shape_prop import TensorMetadata
    out = next(n for n in gm.graph.nodes if n.op == "output").args[0]
    if not (isinstance(out, torch.fx.Node) and isinstance(out.meta.get("tensor_meta"), TensorMetadata)):
        raise UnsupportedOpError(
            "the model returns a tuple/dict, not a logits tensor (B, classes): pass "
            "output_selector= (e.g. output_selector='logits', 0, or a callable) to srd_fx.compile.")


def _non_finite(named):
    """Names of tensors holding NaN/Inf: one fused norm over all of them, per-tensor only if needed."""
    named = [(n, t) for n, t in named if t.is_floating_point() and t.numel()]
    if not named:
        return []
    with torch.no_grad():
        groups = {}
        for n, t in named:
            groups.setdefault((t.device, t.dtype), []).append(t)
        ok = all(bool(torch.isfinite(torch.stack(torch._foreach_norm(ts))).all()) for ts in groups.values())
        if ok:
            return []
        return [n for n, t in named if not torch.isfinite(t).all()]


def _root_of(model: nn.Module) -> nn.Module:
    """A fresh container sharing the model's submodules, parameters and buffers (the twin adds
    its own attributes to it without touching the user's model)."""
    root = nn.Module()
    for name, child in model.named_children():
        root.add_module(name, child)
    for name, p in model.named_parameters(recurse=False):
        root.register_parameter(name, p)
    for name, buf in model.named_buffers(recurse=False):
        root.register_buffer(name, buf)
    for name, value in vars(model).items():  # plain tensor attributes (``self.t = tensor``): fx reads them
        if isinstance(value, torch.Tensor) and not hasattr(root, name):
            setattr(root, name, value)
    return root


def _prod(xs):
    out = 1
    for v in xs:
        out *= v
    return out


def _default_example(model):
    cfg = getattr(model, "pretrained_cfg", None) or getattr(model, "default_cfg", None)
    if isinstance(cfg, dict) and cfg.get("input_size"):
        p = next(model.parameters(), None)
        kw = dict(dtype=p.dtype, device=p.device) if p is not None else {}
        return torch.zeros((1,) + tuple(cfg["input_size"]), **kw)
    return None


def compile(model: nn.Module, options: Optional[Options] = None, *,
            example_input: Optional[torch.Tensor] = None, **overrides: Any) -> Explainer:
    """Compile ``model`` (in eval mode) into its SRD explainer.

    ``srd_fx.compile(model)(x)`` returns the logits (equal to ``model(x)``) and the SRD maps in one
    call; ``print(explainer.code)`` shows the generated forward and SRD backward.

    Parameters
    ----------
    model
        The model, in eval mode: one tensor input, (B, K) logits (or ``output_selector``).
    options
        An :class:`srd_fx.Options` (default: SRD as published).
    example_input
        An input batch to build the twin with now instead of on the first call.
    **overrides
        Any field of :class:`srd_fx.Options` by keyword (``head``, ``layers``, ``encoder_output``,
        ``eps``, ``value``, ``unit``, ``check``, ``chunk_size``, ``output_selector``), e.g.
        ``compile(model, layers=("input", "low"))``.

    Returns
    -------
    Explainer
        The compiled explainer (an ``nn.Module``).

    Raises
    ------
    srd_fx.OptionError
        For an unknown option or a value that is not accepted.
    srd_fx.TrainingModeError
        If the model or one of its modules is in training mode.
    srd_fx.TraceError
        If torch.fx cannot trace the model.
    srd_fx.UnsupportedOpError
        For an op without a rule (the node is named), or a use of an op SRD does not define.
    srd_fx.NonFiniteError
        If the model's weights hold NaN/Inf (with ``check``).
    srd_fx.InputError
        If the model fails on ``example_input``.
    """
    return Explainer(model, options, example_input=example_input, **overrides)
