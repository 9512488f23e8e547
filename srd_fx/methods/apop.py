"""APOP — Activation-Pattern-Only Prediction (paper Appendix D, Algorithm 1; SPEC.md §4).

An fx rewrite of the model in which every activation layer and every max-pool is a *site* that
can

* ``record``   its pattern on one input: ``pre-activation > 0`` per activation layer (for ReLU
  that is ``output > 0``), the arg-max indices per max-pool;
* ``apop``     replay it on another input: activation -> ``v * mask``, max-pool -> gather at the
  recorded indices (the network is then an affine function of the new input);
* ``apop_relu`` the same followed by ReLU: ``relu(v * mask)`` ("APOP & relu", Table 3);
* ``binarize`` one chosen activation layer: its output becomes ``(v > 0)`` in an otherwise
  normal forward pass ("particular layer binarisation", Fig. 6).

    from srd_fx.methods.apop import apop, binarize
    a = apop(model.eval())
    logits = a.record(x)                           # == model(x); stores the pattern
    z = a.run(torch.zeros_like(x))                 # APOP on an empty image
    zr = a.run(torch.ones_like(x), mode="apop_relu")
    b = a.binarize(x, a.layers[0])                 # first activation layer binarised
    f = binarize(model, "layer1.0.relu")           # the same as a stand-alone nn.Module

Layers are addressed like in :func:`srd_fx.compile`: by fx node name (``a.layers``, e.g.
``"layer1_0_relu_1"``) or by module name (a module called several times means its last call).

What is frozen: activation layers (SPEC §1: ReLU, GELU, ELU, ... and sigmoid/hardsigmoid when
not used as a gate) and max-pools (module or functional, adaptive included).  Gates (a sigmoid
that scales another tensor), softmax and data-dependent normalisation statistics are *not*
frozen: they are recomputed on the new input, as in the paper's Algorithm 1.
"""
from __future__ import annotations

import operator
from typing import Callable, Dict, List, Optional, Tuple

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

from srd_fx import rules as R
from srd_fx.rules.elementwise import Div, Mul
from srd_fx.rules.pool import AdaptivePool, MaxPool

from ..errors import InputError, LayerError, NonFiniteError, UnsupportedOpError
from ..compiler.trace import trace

MODES = ("apop", "apop_relu")

# ops that only re-view a tensor (a gate stays a gate through them)
_VIEWS = {"view", "reshape", "expand", "expand_as", "contiguous", "flatten", "unsqueeze", "squeeze",
          "to", "type_as", "float"}

# functional max-pools -> (function that accepts return_indices=True)
_POOL_FUNCTIONS = {F.max_pool1d: F.max_pool1d, F.max_pool2d: F.max_pool2d, F.max_pool3d: F.max_pool3d,
                   F.adaptive_max_pool1d: F.adaptive_max_pool1d,
                   F.adaptive_max_pool2d: F.adaptive_max_pool2d}
_POOL_MODULE_FN = {nn.MaxPool1d: F.max_pool1d, nn.MaxPool2d: F.max_pool2d, nn.MaxPool3d: F.max_pool3d}
_ADAPTIVE_MODULE_FN = {nn.AdaptiveMaxPool1d: F.adaptive_max_pool1d,
                       nn.AdaptiveMaxPool2d: F.adaptive_max_pool2d,
                       nn.AdaptiveMaxPool3d: F.adaptive_max_pool3d}


class _Control:
    """State shared by every site of one rewritten graph."""

    def __init__(self):
        self.mode = "normal"            # normal | record | apop | apop_relu | binarize
        self.binarize: Optional[str] = None


def _original_op(node: fx.Node, modules: Dict[str, nn.Module]) -> Callable:
    """A callable that runs ``node``'s own op on the node's arguments."""
    if node.op == "call_module":
        return modules[node.target]
    if node.op == "call_function":
        return node.target
    name = node.target
    return lambda self_, *a, **k: getattr(self_, name)(*a, **k)


class _ActivationSite(nn.Module):
    """An activation layer: normal / record (pre-activation > 0) / v*mask / relu(v*mask) / (v>0)."""

    def __init__(self, name: str, op: Callable, control: _Control):
        super().__init__()
        object.__setattr__(self, "op", op)          # not registered: it stays where the model has it
        object.__setattr__(self, "control", control)
        self.layer = name
        self.mask: Optional[torch.Tensor] = None

    def forward(self, v, *args, **kwargs):
        c = self.control
        if c.mode == "normal" or (c.mode == "binarize" and c.binarize != self.layer):
            return self.op(v, *args, **kwargs)
        if c.mode == "record":
            self.mask = (v > 0).detach()            # before the op: it may work in place
            return self.op(v, *args, **kwargs)
        if c.mode == "binarize":
            return (v > 0).to(v.dtype)
        mask = self.mask
        if mask is None:
            raise RuntimeError("no activation pattern recorded: call .record(x) before .run(...)")
        if mask.shape != v.shape:
            raise InputError(f"activation layer {self.layer!r}: the recorded pattern has shape "
                             f"{tuple(mask.shape)} but the replayed input gives {tuple(v.shape)}; "
                             "run APOP on an input of the same shape as the recorded one")
        out = v * mask.to(v.dtype)
        return F.relu(out) if c.mode == "apop_relu" else out


class _MaxPoolSite(nn.Module):
    """A max-pool: normal / record (arg-max indices) / gather at the recorded indices."""

    def __init__(self, name: str, op: Callable, pool_with_indices: Callable, control: _Control):
        super().__init__()
        object.__setattr__(self, "op", op)
        object.__setattr__(self, "pool", pool_with_indices)
        object.__setattr__(self, "control", control)
        self.layer = name
        self.indices: Optional[torch.Tensor] = None
        self.input_shape: Optional[Tuple[int, ...]] = None

    def forward(self, x, *args, **kwargs):
        c = self.control
        if c.mode in ("normal", "binarize"):
            return self.op(x, *args, **kwargs)
        if c.mode == "record":
            out, idx = self.pool(x, *args, **kwargs)
            self.indices, self.input_shape = idx, tuple(x.shape)
            return out
        if self.indices is None:
            raise RuntimeError("no max-pool indices recorded: call .record(x) before .run(...)")
        if tuple(x.shape) != self.input_shape:
            raise InputError(f"max-pool {self.layer!r}: indices were recorded on an input of shape "
                             f"{self.input_shape}, the replayed input gives {tuple(x.shape)}; run APOP "
                             "on an input of the same shape as the recorded one")
        idx = self.indices
        return x.flatten(2).gather(2, idx.flatten(2)).view(idx.shape)


def _pool_with_indices(node: fx.Node, modules: Dict[str, nn.Module]) -> Callable:
    """``f(x, *node_args, **node_kwargs) -> (out, indices)`` for a max-pool node."""
    if node.op == "call_module":
        m = modules[node.target]
        if getattr(m, "return_indices", False):
            raise UnsupportedOpError(f"max-pool {node.target!r} already returns indices; APOP needs "
                                     "a max-pool whose output is a tensor")
        for cls in type(m).__mro__:
            if cls in _POOL_MODULE_FN:
                fn = _POOL_MODULE_FN[cls]
                return lambda x, fn=fn, m=m: fn(x, m.kernel_size, m.stride, m.padding, m.dilation,
                                                 ceil_mode=m.ceil_mode, return_indices=True)
            if cls in _ADAPTIVE_MODULE_FN:
                fn = _ADAPTIVE_MODULE_FN[cls]
                return lambda x, fn=fn, m=m: fn(x, m.output_size, return_indices=True)
    elif node.op == "call_function" and node.target in _POOL_FUNCTIONS:
        fn = _POOL_FUNCTIONS[node.target]
        if node.kwargs.get("return_indices") or (node.target in (F.max_pool1d, F.max_pool2d, F.max_pool3d)
                                                 and len(node.args) > 6 and node.args[6]):
            raise UnsupportedOpError(f"max-pool node {node.name!r} already returns indices; APOP "
                                     "needs a max-pool whose output is a tensor")

        def pool(x, *args, **kwargs):
            kwargs = dict(kwargs, return_indices=True)
            return fn(x, *args, **kwargs)
        return pool
    raise UnsupportedOpError(
        f"node {node.name!r} is a max-pool ({node.op} {getattr(node.target, '__name__', node.target)}) "
        "that APOP cannot record indices for; use nn.MaxPoolNd / F.max_poolNd / adaptive max pooling")


def _is_gate(node: fx.Node, modules) -> bool:
    """A sigmoid-like output that scales (mul/div) another tensor: a gate, not an activation."""
    stack, seen = list(node.users), set()
    while stack:
        u = stack.pop()
        if u in seen:
            continue
        seen.add(u)
        tgt = u.target if isinstance(u.target, str) else getattr(u.target, "__name__", "")
        if u.op in ("call_method", "call_function") and tgt in _VIEWS:
            stack.extend(u.users)
            continue
        if isinstance(R.lookup(u, modules), (Mul, Div)):
            return True
    return False


def _is_max_pool(rule) -> bool:
    return isinstance(rule, MaxPool) or (isinstance(rule, AdaptivePool) and rule.variant == "max")


class APOP:
    """The APOP rewrite of one model (see the module docstring).

    Attributes: ``layers`` (fx names of the activation layers, in execution order), ``pools``
    (fx names of the max-pools), ``module_of`` (layer -> module name, or None for functional
    activations), ``graph_module`` (the rewritten fx GraphModule).

    Parameters
    ----------
    model
        The model, in eval mode; it must return one logits tensor.

    Raises
    ------
    srd_fx.TraceError
        When torch.fx cannot trace the model.
    """

    def __init__(self, model: nn.Module) -> None:
        gm = trace(model)
        modules = dict(gm.named_modules())
        self.control = _Control()
        self.model = model
        self.layers: List[str] = []
        self.pools: List[str] = []
        self.module_of: Dict[str, Optional[str]] = {}
        self._acts: Dict[str, _ActivationSite] = {}
        self._pools: Dict[str, _MaxPoolSite] = {}
        graph = gm.graph
        for node in list(graph.nodes):
            if node.op not in ("call_module", "call_function", "call_method"):
                continue
            rule = R.lookup(node, modules)
            if rule is None:
                continue
            if rule.kind == "activation":
                if rule.name and "softmax" in rule.name.lower():
                    continue                      # not element-wise: never an activation layer
                if rule.gate_capable and _is_gate(node, modules):
                    continue                      # a gate: recomputed, not frozen (module docstring)
                site = _ActivationSite(node.name, _original_op(node, modules), self.control)
                self._acts[node.name] = site
                self.layers.append(node.name)
                self.module_of[node.name] = node.target if node.op == "call_module" else None
            elif _is_max_pool(rule):
                site = _MaxPoolSite(node.name, _original_op(node, modules),
                                    _pool_with_indices(node, modules), self.control)
                self._pools[node.name] = site
                self.pools.append(node.name)
            else:
                continue
            sub = f"site_{node.name}"
            gm.add_submodule(sub, site)
            with graph.inserting_before(node):
                new = graph.call_module(sub, node.args, node.kwargs)
            node.replace_all_uses_with(new)
            graph.erase_node(node)
        graph.lint()
        gm.recompile()
        self.graph_module = gm
        self._recorded_shape: Optional[Tuple[int, ...]] = None

    # ------------------------------------------------------------------ helpers -----------
    def _call(self, mode: str, x: torch.Tensor, binarize: Optional[str] = None) -> torch.Tensor:
        if not isinstance(x, torch.Tensor):
            raise InputError(f"expected a tensor input, got {type(x).__name__}")
        if not torch.isfinite(x).all():
            raise NonFiniteError("the input contains NaN or Inf; APOP needs a finite input")
        self.control.mode, self.control.binarize = mode, binarize
        try:
            out = self.graph_module(x)
        finally:
            self.control.mode, self.control.binarize = "normal", None
        if not isinstance(out, torch.Tensor):
            raise UnsupportedOpError(f"APOP expects a model that returns a logits tensor, got "
                                     f"{type(out).__name__}; wrap the model so that it returns one tensor")
        if not torch.isfinite(out).all():
            raise NonFiniteError(f"APOP ({mode}) produced non-finite logits")
        return out

    def resolve(self, layer: str) -> str:
        """The fx name of an activation layer.

        Parameters
        ----------
        layer
            An fx node name (one of ``layers``) or a module name (a module called several times
            means its last call).

        Returns
        -------
        str
            The fx node name.

        Raises
        ------
        KeyError
            If no activation layer has that name (the message lists them).
        """
        if layer in self._acts:
            return layer
        calls = [n for n in self.layers if self.module_of[n] == layer]
        if calls:
            return calls[-1]
        raise LayerError(f"no activation layer named {layer!r}; activation layers are "
                       f"{self.layers} (fx names) or the modules {sorted({m for m in self.module_of.values() if m})}")

    # ------------------------------------------------------------------ API ---------------
    @property
    def code(self) -> str:
        """The rewritten forward, as Python source (every ``site_*`` call is a recorded site)."""
        return self.graph_module.code

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The unmodified model (through the rewritten graph).

        Parameters
        ----------
        x
            The model's input.

        Returns
        -------
        torch.Tensor
            The logits, equal to ``model(x)``.
        """
        return self._call("normal", x)

    __call__ = forward

    def record(self, x: torch.Tensor) -> torch.Tensor:
        """Run the model on ``x`` and store every activation pattern and max-pool index.

        Parameters
        ----------
        x
            The model's (normalised) input.

        Returns
        -------
        torch.Tensor
            The original logits, equal to ``model(x)``.

        Raises
        ------
        srd_fx.InputError
            If ``x`` is not a tensor.
        srd_fx.NonFiniteError
            If ``x`` or the logits hold NaN/Inf.
        """
        out = self._call("record", x)
        self._recorded_shape = tuple(x.shape)
        return out

    def run(self, x: torch.Tensor, mode: str = "apop") -> torch.Tensor:
        """Re-run the network on ``x`` with the recorded pattern.

        Parameters
        ----------
        x
            The replacement input, of the recorded input's shape (e.g. ``torch.zeros_like(x)``).
        mode
            ``"apop"`` (activations -> ``v * mask``, max-pools -> gather at the recorded indices) or
            ``"apop_relu"`` (ReLU after the mask).

        Returns
        -------
        torch.Tensor
            The logits of the pattern-replaying network.

        Raises
        ------
        ValueError
            For an unknown ``mode``.
        RuntimeError
            If no pattern was recorded yet (call :meth:`record` first).
        srd_fx.InputError
            If ``x``'s shape is not the recorded input's.
        srd_fx.NonFiniteError
            If ``x`` or the logits hold NaN/Inf.
        """
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        if self._recorded_shape is None:
            raise RuntimeError("no activation pattern recorded: call .record(x) before .run(...)")
        if tuple(x.shape) != self._recorded_shape:
            raise InputError(f"the pattern was recorded on an input of shape {self._recorded_shape}, "
                             f"got {tuple(x.shape)}: use an input of the same shape (e.g. torch.zeros_like(x))")
        return self._call(mode, x)

    def binarize(self, x: torch.Tensor, layer: str) -> torch.Tensor:
        """A normal forward pass in which one activation layer outputs ``(pre-activation > 0)``.

        Parameters
        ----------
        x
            The model's input.
        layer
            The activation layer to binarise (fx node or module name), Fig. 6.

        Returns
        -------
        torch.Tensor
            The logits.

        Raises
        ------
        KeyError
            If ``layer`` is not an activation layer.
        """
        return self._call("binarize", x, binarize=self.resolve(layer))

    @property
    def patterns(self) -> Dict[str, torch.Tensor]:
        """Recorded boolean masks, per activation layer (fx name)."""
        return {k: s.mask for k, s in self._acts.items() if s.mask is not None}

    @property
    def indices(self) -> Dict[str, torch.Tensor]:
        """Recorded max-pool arg-max indices, per max-pool (fx name)."""
        return {k: s.indices for k, s in self._pools.items() if s.indices is not None}


class Binarized(nn.Module):
    """``model`` with one activation layer binarised (a module ``x -> logits``).

    Parameters
    ----------
    model
        The model, in eval mode.
    layer
        The activation layer whose output becomes ``(pre-activation > 0)`` (fx node or module name).

    Raises
    ------
    KeyError
        If ``layer`` is not an activation layer.
    """

    def __init__(self, model: nn.Module, layer: str) -> None:
        super().__init__()
        self.apop = APOP(model)
        self.layer = self.apop.resolve(layer)
        self.graph_module = self.apop.graph_module   # registered: .to()/.double() reach the weights

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The logits with the layer binarised."""
        return self.apop.binarize(x, self.layer)


# ------------------------------------------------------------------ evaluation (Tables 1, 3, Fig. 6) --
INPUTS = ("zeros", "ones", "normal")


def replacement_input(kind: str, like: torch.Tensor, generator: Optional[torch.Generator] = None):
    """The input APOP replays on: ``"zeros"``, ``"ones"`` or ``"normal"`` (N(0, 1)), shaped like
    ``like`` (in the model's input space, i.e. after normalisation, as in the paper)."""
    if kind == "zeros":
        return torch.zeros_like(like)
    if kind == "ones":
        return torch.ones_like(like)
    if kind == "normal":
        return torch.randn(like.shape, generator=generator, dtype=like.dtype).to(like.device)
    raise ValueError(f"unknown APOP input {kind!r}; choose from {INPUTS}")


def topk_correct(logits: torch.Tensor, labels: torch.Tensor, k: int) -> int:
    """How many rows have their label among the ``k`` largest logits (k capped at the class count)."""
    k = min(k, logits.shape[1])
    return int((logits.topk(k, dim=1).indices == labels[:, None]).any(1).sum())


@torch.no_grad()
def evaluate(model: nn.Module, batches, inputs=INPUTS, modes=MODES, binarize_layers=False,
             seed: int = 0, progress: bool = False) -> dict:
    """Top-1/top-5 accuracy of the original model, of APOP and "APOP & relu" for each replacement
    input (Table 3), and optionally of every single-layer binarisation (Fig. 6).

    Parameters
    ----------
    model
        The model, in eval mode.
    batches
        An iterable of ``(x, labels)``, ``x`` the model's (normalised) input.
    inputs
        Replacement inputs to replay on, from ``"zeros"``, ``"ones"``, ``"normal"``.
    modes
        ``"apop"`` and/or ``"apop_relu"``.
    binarize_layers
        False, True (every activation layer) or a list of layer names.
    seed
        Seed of the ``"normal"`` replacement input.
    progress
        Show a progress bar (tqdm).

    Returns
    -------
    dict
        ``n``, ``num_classes``, ``layers``, ``pools``, ``module_of``, ``binarized``, ``accuracy``
        (key -> ``{"top1", "top5"}``, keys ``original``, ``MODE/INPUT``, ``binarize/LAYER``) and
        ``chance``.

    Raises
    ------
    srd_fx.InputError
        If ``batches`` is empty.
    """
    a = APOP(model)
    layers = (a.layers if binarize_layers is True else
              [a.resolve(l) for l in binarize_layers] if binarize_layers else [])
    g = torch.Generator().manual_seed(seed)
    keys = ["original"] + [f"{m}/{i}" for i in inputs for m in modes] + [f"binarize/{l}" for l in layers]
    counts = {k: [0, 0] for k in keys}
    n = 0
    if progress:
        from tqdm.auto import tqdm
        batches = tqdm(batches, desc=f"APOP {type(model).__name__}", leave=False)
    for x, y in batches:
        res = {"original": a.record(x)}
        for i in inputs:
            z = replacement_input(i, x, g)
            for m in modes:
                res[f"{m}/{i}"] = a.run(z, mode=m)
        for l in layers:
            res[f"binarize/{l}"] = a.binarize(x, l)
        for k, logits in res.items():
            counts[k][0] += topk_correct(logits, y, 1)
            counts[k][1] += topk_correct(logits, y, 5)
        n += len(y)
        num_classes = res["original"].shape[1]
    if n == 0:
        raise InputError("no images to evaluate APOP on (the data set is empty)")
    acc = {k: {"top1": c[0] / n, "top5": c[1] / n} for k, c in counts.items()}
    return {"n": n, "num_classes": num_classes, "layers": a.layers, "pools": a.pools,
            "module_of": a.module_of, "binarized": layers, "accuracy": acc,
            "chance": {"top1": 1 / num_classes, "top5": min(5, num_classes) / num_classes}}


def apop(model: nn.Module) -> APOP:
    """The APOP rewrite of ``model``: ``.record(x)``, ``.run(x_other, mode)``, ``.binarize(x, layer)``.

    Parameters
    ----------
    model
        The model, in eval mode; it must return one logits tensor.

    Returns
    -------
    APOP
        The rewrite (see :class:`srd_fx.methods.apop.APOP`).

    Raises
    ------
    srd_fx.TraceError
        When torch.fx cannot trace the model.
    """
    return APOP(model)


def binarize(model: nn.Module, layer: str) -> Binarized:
    """``model`` with one activation layer replaced by ``(pre-activation > 0)``.

    The paper's "particular layer binarisation" (Fig. 6).

    Parameters
    ----------
    model
        The model, in eval mode.
    layer
        The activation layer (fx node or module name).

    Returns
    -------
    Binarized
        A module ``x -> logits``.

    Raises
    ------
    KeyError
        If ``layer`` is not an activation layer.
    """
    return Binarized(model, layer)


__all__ = ["apop", "binarize", "evaluate", "APOP", "Binarized", "MODES", "INPUTS"]
