"""The twin-graph builder: forward with recorded constants, then the SRD backward, as one fx graph.

For every affine block (SPEC §7), in reverse order of the activation layers:

    s      = R * v / ||v||^2                          ops.sharing
    g      = Lin^T s                                  rule.transpose, node by node
    R_lin  = <x, g>                                   ops.pfv_dot
    b      = F(0, ..., 0)                             rule.bias, only where it is not zero
    D      = S(||x||)                                 rule.shadow
    R_bias = ||x|| * S^T(<b, s> / D)                  rule.shadow_T

The backward is one reverse sweep over the graph (class Backward): blocks that share ops push
the sum of their g (and of their <b, s> / D) through each shared op once, and b and D are
emitted once per op.
"""
from __future__ import annotations

import contextlib
import copy
import inspect
import math
import operator
from typing import Dict, List, Optional

import torch
import torch.fx as fx
import torch.nn as nn

from srd_fx import rules as R

from . import heads
from . import runtime as ops
from .analysis import GraphInfo, Layer
from .codegen import SRDCodeGen
from ..errors import LayerError, UnsupportedOpError

_INPLACE_FN = {operator.iadd: operator.add, operator.isub: operator.sub, operator.imul: operator.mul,
               operator.itruediv: operator.truediv}


# ----------------------------------------------------------------------- runtime helpers ----
from .runtime import _call, fn_name, resolve  # noqa: E402,F401  (rules resolve functions without importing the twin)


def linear_vjp(g, fn, args, kwargs, mains):
    """Lin^T g for an op linear in ``mains`` (a VJP, differentiable in g).  Without a graph to
    record, ``torch.func.vjp`` (which torch.compile traces whole); else autograd with create_graph."""
    swap_in = lambda ms: (lambda t: ms.get(id(t), t) if isinstance(t, torch.Tensor) else t)  # noqa: E731
    if not (torch.is_grad_enabled() and g.requires_grad):
        def f(*leaves):
            sub = swap_in({id(m): l for m, l in zip(mains, leaves)})
            return _call(fn, torch.utils._pytree.tree_map(sub, args), torch.utils._pytree.tree_map(sub, kwargs))
        _, vjp = torch.func.vjp(f, *[m.detach() for m in mains])
        return list(vjp(g))
    with torch.enable_grad():
        leaves = [m.detach().requires_grad_() for m in mains]
        sub = swap_in({id(m): l for m, l in zip(mains, leaves)})
        out = _call(fn, torch.utils._pytree.tree_map(sub, args), torch.utils._pytree.tree_map(sub, kwargs))
        grads = torch.autograd.grad(out, leaves, g, create_graph=True, allow_unused=True)
    return [torch.zeros_like(m) if gr is None else gr for m, gr in zip(mains, grads)]


def linear_vjp_at_zero(g, fn, args, kwargs, slots, specs):
    """:func:`linear_vjp` for an op linear in its main inputs, which the generated code passes as
    ``(shape, dtype, device)`` specs, not as values: ``slots[k]`` lists where main input ``k`` sits in
    ``args`` (an index) or ``kwargs`` (a name).  The op is replayed on zeros of those specs
    (broadcast, no memory; dense zeros where the op must write or view them)."""
    def at(primals):
        a, kw = list(args), dict(kwargs)
        for where, p in zip(slots, primals):
            for w in where:
                if isinstance(w, int):
                    a[w] = p
                else:
                    kw[w] = p
        return a, kw
    # the VJP of a linear op does not depend on the point: zeros, one element broadcast
    zeros = [g.new_zeros((), dtype=dtype).expand(shape) for shape, dtype, _ in specs]
    try:
        a, kw = at(zeros)
        return linear_vjp(g, fn, a, kw, zeros)
    except RuntimeError:   # an op that writes into, or views, its input: dense zeros
        zeros = [z.contiguous() for z in zeros]
        a, kw = at(zeros)
        return linear_vjp(g, fn, a, kw, zeros)


def _nodes_in(a) -> List[fx.Node]:
    """The fx nodes inside an argument (a node, or lists/tuples/dicts of them)."""
    found: List[fx.Node] = []
    fx.node.map_arg(a, lambda n: found.append(n) or n)
    return found


def tensor_spec(x):
    """``(shape, dtype, device)`` of a forward value: all that some helpers read of it
    (:func:`linear_vjp_at_zero`, :func:`zeros1`)."""
    return x.shape, x.dtype, x.device


def shadow_vjp(m, fn, fn_args, like, caxes):
    """Transpose of a shadow ``fn(map, *fn_args)`` (linear in the map) by autograd; ``like``: the
    input (or its shape) whose map the result is."""
    fn = resolve(fn) if isinstance(fn, str) else fn
    shape = list(ops.shape_of(like))
    for a in caxes:
        shape[a] = 1
    with torch.enable_grad():
        z = torch.zeros(shape, dtype=m.dtype, device=m.device, requires_grad=True)
        (gr,) = torch.autograd.grad(fn(z, *fn_args), z, m, create_graph=m.requires_grad)
    return gr


@ops.shape_args(0)
def zeros1(like):
    """A structurally-zero input materialised with batch size 1 (biases are broadcast); ``like``:
    the input or its :func:`tensor_spec`."""
    if isinstance(like, torch.Tensor):
        return like.new_zeros((1,) + tuple(like.shape[1:]))
    shape, dtype, device = like
    return torch.zeros((1,) + tuple(shape[1:]), dtype=dtype, device=device)


@ops.shape_args(1, sizes=True)
def materialize(z, like):
    """A bias flowing into an op, broadcast to the op input's shape (batch kept as it is);
    ``like``: the input or its shape."""
    shape = ops.shape_of(like)
    if tuple(z.shape[1:]) == tuple(shape[1:]):
        return z
    return z.expand((z.shape[0],) + tuple(shape[1:]))


WRAP_RECIPE = ("wrap it so that forward takes one tensor, e.g.\n"
               "    class OneInput(torch.nn.Module):\n"
               "        def __init__(self, model, other):\n"
               "            super().__init__(); self.model, self.other = model, other\n"
               "        def forward(self, x):\n"
               "            return self.model(x, self.other)\n"
               "and compile OneInput(model, other).")


def not_a_tensor(x, what: str) -> str:
    """The message for a non-tensor input: a tuple/list (several inputs) or a NumPy array."""
    if isinstance(x, (tuple, list)):
        return (f"{what} is a {type(x).__name__} of {len(x)}: srd_fx explains models with one tensor "
                "input (B, C, ...). Pass one tensor; for a model with several inputs, " + WRAP_RECIPE)
    hint = " (convert it with torch.from_numpy(x))" if type(x).__module__ == "numpy" else ""
    return f"{what} must be a torch.Tensor (B, C, ...), got {type(x).__name__}{hint}"


def check_input(x, rank, channels, ref=None, finite=True):
    """The one input validator (the explainer before building, the twin on every call): a tensor
    on ``ref``'s device and dtype, of rank ``rank`` (None: batched, at least 2), with ``channels``
    input channels (None: any) and, with ``finite``, no NaN/Inf.  Returns ``x``.  The twin passes
    ``finite=False``: it checks the values with the map's, in one flag (:func:`checks_pass`), so that
    a call waits for the device once."""
    from ..errors import InputError, NonFiniteError
    if not isinstance(x, torch.Tensor):
        raise InputError(not_a_tensor(x, "the input"))
    if ref is not None and x.device != ref.device:
        raise InputError(f"the input is on {x.device} but the model is on {ref.device}; move one of them "
                         f"(x.to('{ref.device}'))")
    if ref is not None and x.dtype != ref.dtype:
        raise InputError(f"the input is {x.dtype} but the model is {ref.dtype}; cast it (x.to({ref.dtype}))")
    if (x.dim() < 2) if rank is None else (x.dim() != rank):
        raise InputError(f"expected an input of rank {rank or '2 or more'} (batch, channels, ...), got shape "
                         f"{tuple(x.shape)}; add a batch dimension with x.unsqueeze(0)")
    if channels is not None and x.shape[1] != channels:
        raise InputError(f"expected {channels} input channels, got shape {tuple(x.shape)}")
    if finite and not torch.isfinite(x).all():
        raise NonFiniteError("the input contains NaN or Inf values; SRD maps would be meaningless. "
                             "Clean the input (torch.nan_to_num) before explaining it.")
    return x


def check_finite(t, what):
    from ..errors import NonFiniteError
    if not torch.isfinite(t).all():
        raise NonFiniteError(f"{what} contains NaN/Inf (non-finite weights, or values outside the "
                             "dtype's range): no map is returned rather than a wrong one.")
    return t


LOWP_CONSERVATION_TOL = 0.1


def _lowp_gap(sal, R_L, lost):
    """Per sample: the conservation gap |sum map + lost - sum R_L| and the scale sum |R_L|."""
    r = R_L.detach().float().flatten(1)
    scale = r.abs().sum(1)
    have = sal.detach().float().flatten(1).sum(1)
    if lost is not None:
        have = have + lost.detach().float().reshape(-1)
    return (have - r.sum(1)).abs(), scale


def checks_pass(x, sal, R_L, lost, logits, target):
    """Every value check of one call as a single boolean tensor, so that the call waits for the
    device once (``Explainer.forward`` reads it) or never (``check=False``): the input and the map
    are finite, a target tensor names classes of the model, and in float16/bfloat16 the map still
    conserves the relevance (see :func:`check_map`).  False may be a false alarm (a finite input
    whose sum overflows): :func:`explain_failure` then finds nothing and the call goes on."""
    acc = sal.dtype
    total = x.sum(dtype=acc) + sal.sum()
    ok = (total - total) == 0  # finite: inf - inf and NaN are NaN (two ops, torch.isfinite takes four)
    if isinstance(target, torch.Tensor):
        ok = ok & ((target >= 0) & (target < logits.shape[-1])).all()
    if logits.dtype in ops.LOW_PRECISION:
        gap, scale = _lowp_gap(sal, R_L, lost)
        ok = ok & ~((gap > LOWP_CONSERVATION_TOL * scale) & (scale > 0)).any()
    return ok


def explain_failure(x, target, out, what="the SRD saliency map"):
    """After :func:`checks_pass` said no: raise the error that says what was wrong."""
    from ..errors import NonFiniteError
    if not torch.isfinite(x).all():
        raise NonFiniteError("the input contains NaN or Inf values; SRD maps would be meaningless. "
                             "Clean the input (torch.nan_to_num) before explaining it.")
    heads.resolve_target(out["logits"], target)
    check_map(out["saliency"], out["R_L"], out["lost"], out["logits"], what)


def check_map(sal, R_L, lost, logits, what):
    """``check_finite``, and in float16/bfloat16 (autocast or a half model: the logits tell) also
    conservation: the map plus the reported loss must still hold the seed's relevance to within
    LOWP_CONSERVATION_TOL of sum |R_L| per sample.  Half precision underflows (float16 below 6e-8;
    relevance is a share of the logit, so a model with tiny logits loses all of it) or rounds a map
    away without a NaN; in float32/float64 SRD conserves to rounding and nothing is computed here."""
    from ..errors import PrecisionLossError
    check_finite(sal, what)
    if logits.dtype not in ops.LOW_PRECISION:
        return sal
    gap, scale = _lowp_gap(sal, R_L, lost)
    bad = (gap > LOWP_CONSERVATION_TOL * scale) & (scale > 0)
    if bool(bad.any()):
        i = int(bad.nonzero()[0])
        raise PrecisionLossError(
            f"{what} lost {float(gap[i] / scale[i]):.0%} of the relevance of sample {i} to "
            f"{logits.dtype} rounding/underflow (sum |R_L| = {float(scale[i]):.3g}): the map would "
            "be wrong. Explain in float32 (outside autocast), or use bfloat16, whose range does not underflow.")
    return sal


class _Key:
    """An output_selector given as a dict key or tuple index."""

    def __init__(self, key):
        self.key = key

    def __call__(self, out):
        try:
            return out[self.key]
        except (KeyError, IndexError, TypeError):
            from ..errors import InputError
            keys = list(out.keys()) if isinstance(out, dict) else (
                f"indices 0..{len(out) - 1}" if isinstance(out, (tuple, list)) else type(out).__name__)
            raise InputError(f"output_selector {self.key!r} does not select anything in the model's output; "
                             f"available: {keys}") from None


def add_all(*ts):
    out = ts[0]
    for t in ts[1:]:
        out = out + t
    return out


# ----------------------------------------------------------------------- builder ------------
class Builder:
    """Emits the twin graph; rules talk to it (see srd_fx/rules/__init__.py)."""

    def __init__(self, info: GraphInfo, root: nn.Module, eps: float, value: str = "pre",
                 unit: str = "pfv"):
        self.info, self.root, self.eps, self.value, self.unit = info, root, eps, value, unit
        self.g = fx.Graph()
        self.env: Dict[fx.Node, fx.Node] = {}
        self._recorded: Dict[tuple, fx.Node] = {}
        self._attrs: Dict[str, fx.Node] = {}
        self.context: Optional[fx.Node] = None      # the op whose rule is emitting (names temporaries)
        self.comments: Dict[str, List[str]] = {}    # node name -> comment lines of the generated code
        self.forward_nodes: Optional[set] = None     # the forward pass's twin nodes (set after it is emitted)

    # -- facts (delegated to the analysis) ---------------------------------------------------
    def shape(self, n):
        return self.info.shape(n)

    def is_tensor(self, n):
        return self.info.is_tensor(n)

    def caxes(self, n):
        """Channel axes of a tensor: reduced by PFV norms.  unit="neuron": none (every scalar
        neuron is its own unit, SPEC §5)."""
        return () if self.unit == "neuron" else self.info.caxes(n)

    def main_inputs(self, n):
        return self.info.main_inputs(n)

    def module(self, n):
        return self.info.module(n)

    def unsupported(self, node, reason):
        self.info.unsupported(node, reason)

    def _map_shape(self, n):
        s = list(self.shape(n))
        for a in self.caxes(n):
            s[a] = 1
        return s

    # -- emitting ----------------------------------------------------------------------------
    def call(self, fn, *args, name: Optional[str] = None, **kwargs):
        """Emit ``fn(*args, **kwargs)``.  Unnamed temporaries are named after the function and
        the op being handled (``conv_T_layer4_1_conv2``), items of a tuple after the tuple."""
        if name is None:
            if fn is operator.getitem and isinstance(args[0], fx.Node):
                name = f"{args[0].name}_{args[1]}"
            else:
                short = getattr(fn, "__name__", "op")
                name = f"{short}_{self.context.name}" if self.context is not None else short
        return self.g.create_node("call_function", fn, tuple(args), kwargs, name=name)

    def comment(self, node: fx.Node, text: str) -> None:
        """A comment line before the line that computes ``node`` in the generated code."""
        self.comments.setdefault(node.name, []).append(text)

    def attr(self, target: str):
        if target not in self._attrs:
            self._attrs[target] = self.g.get_attr(target)
        return self._attrs[target]

    def val(self, a):
        return fx.node.map_arg(a, lambda n: self.env[n])

    def param(self, node, name):
        mod = self.module(node)
        if getattr(mod, name, None) is None:
            return None
        return self.attr(f"{node.target}.{name}")

    def copy(self, node):
        return self.out_of_place(self.g.node_copy(node, lambda a: self.env[a]))

    @staticmethod
    def out_of_place(n):
        """The twin never writes in place: recorded values must stay intact."""
        if n.op == "call_function" and n.target in _INPLACE_FN:
            n.target = _INPLACE_FN[n.target]
        elif n.op == "call_method" and isinstance(n.target, str) and n.target.endswith("_") \
                and not n.target.startswith("_") and hasattr(torch.Tensor, n.target[:-1]):
            n.target = n.target[:-1]
        return n

    def copy_out_of_place(self, node):
        rule = self.info.rule[node]
        if node.op == "call_module":
            mod = self.module(node)
            if getattr(mod, "inplace", False):
                clone = copy.copy(mod)
                clone.inplace = False
                name = "srd_oop_" + node.target.replace(".", "_")
                self.root.add_module(name, clone)
                return self.g.create_node("call_module", name, self.val(node.args), self.val(node.kwargs),
                                          name=node.name)
            return self.copy(node)
        if node.op == "call_function":
            fn = node.target
            if isinstance(rule, R.Activation) and rule.fn is not None and getattr(fn, "__name__", "").endswith("_"):
                fn = rule.fn
            args, kwargs = self.val(node.args), dict(self.val(node.kwargs))
            try:
                sig = inspect.signature(fn)
                if "inplace" in sig.parameters:
                    bound = sig.bind_partial(*args, **kwargs)
                    bound.arguments["inplace"] = False
                    args, kwargs = bound.args, bound.kwargs
            except (TypeError, ValueError):
                pass
            return self.g.create_node("call_function", fn, tuple(args), kwargs, name=node.name)
        return self.copy(node)

    def size_of(self, node):
        """The shape of a forward value, taken right after it is computed: code that needs only
        the shape (shadow windows) then does not keep the tensor alive until the backward."""
        key = (node, "shape")
        if key not in self._recorded:
            val = self.val(node)
            if not isinstance(val, fx.Node):
                return val
            with self.g.inserting_after(val):
                self._recorded[key] = self.g.call_function(getattr, (val, "shape"), name="shape_" + node.name)
        return self._recorded[key]

    def norm_of(self, node):
        """||x|| per position of a forward value, emitted once however many blocks consume it.
        Computed right after the value in the forward pass: the backward then holds the map (one
        channel), not the tensor, wherever it needs only the norm."""
        key = (node, "norm")
        if key not in self._recorded:
            val = self.val(node)
            where = self.g.inserting_after(val) if self.in_forward(val) else contextlib.nullcontext()
            with where:
                self._recorded[key] = self.call(ops.pfv_norm, val, self.caxes(node), name=f"n_{node.name}")
        return self._recorded[key]

    def in_forward(self, n) -> bool:
        """True for a twin node of the forward pass (emitted before the head), once it is recorded."""
        return self.forward_nodes is not None and isinstance(n, fx.Node) and n in self.forward_nodes

    def map_of(self, node):
        """A twin tensor of the map shape of forward value ``node`` already emitted (its norm or its
        shadow), else the value itself: what a transpose needs when it reads only the input's size."""
        for key in ((node, "norm"), (node, "shadow")):
            if key in self._recorded:
                return self._recorded[key]
        return self.val(node)

    def set_recorded(self, node, key, twin):
        self._recorded[(node, key)] = twin

    def recorded(self, node, key):
        return self._recorded[(node, key)]

    # -- helpers the rules use ---------------------------------------------------------------
    def _callable(self, node):
        if node.op == "call_module":
            return self.attr(node.target)
        if node.op == "call_method":
            return "method:" + node.target
        return fn_name(node.target)

    def first_occurrence(self, node, got: dict):
        out, seen = [], set()
        for i in self.main_inputs(node):
            out.append(got.get(i) if i not in seen else None)
            seen.add(i)
        return out

    def vjp(self, node, g, at_point=False):
        """``Lin^T g`` of ``node`` by autograd.  An op linear in its main inputs (the contract of
        :meth:`Rule.transpose`) is replayed on zeros of their shapes, so the backward does not keep
        their forward values; ``at_point``: replayed at the recorded values (an op whose VJP
        depends on them, the uniform product rule)."""
        uniq = list(dict.fromkeys(self.main_inputs(node)))
        slots = None if at_point else self._main_slots(node, uniq)
        if slots is None:
            res = self.call(linear_vjp, g, self._callable(node), self.val(node.args), self.val(node.kwargs),
                            [self.val(i) for i in uniq], name="g_vjp_" + node.name)
        else:
            drop = lambda a: None if a in uniq else self.env[a]  # noqa: E731
            res = self.call(linear_vjp_at_zero, g, self._callable(node), fx.node.map_arg(node.args, drop),
                            fx.node.map_arg(node.kwargs, drop), slots, [self.spec_of(i) for i in uniq],
                            name="g_vjp_" + node.name)
        got = {i: self.call(operator.getitem, res, k) for k, i in enumerate(uniq)}
        return self.first_occurrence(node, got)

    @staticmethod
    def _main_slots(node, uniq):
        """Where each main input sits among the call's arguments (an index or a keyword), or None
        when one also sits inside a list or tuple (then the values are passed as they are)."""
        slots = [[] for _ in uniq]
        for where, a in list(enumerate(node.args)) + list(node.kwargs.items()):
            if a in uniq:
                slots[uniq.index(a)].append(where)
            elif any(i in uniq for i in _nodes_in(a)):
                return None
        return slots if all(slots) else None

    def spec_of(self, node):
        """``(shape, dtype, device)`` of a forward value, taken right after it is computed (see size_of)."""
        key = (node, "spec")
        if key not in self._recorded:
            val = self.val(node)
            with self.g.inserting_after(val):
                self._recorded[key] = self.g.call_function(tensor_spec, (val,), name="spec_" + node.name)
        return self._recorded[key]

    def vjp_shadow(self, fn, fn_args, m, x):
        return [self.call(shadow_vjp, m, fn_name(fn), fn_args, self.size_of(x), self.caxes(x))]

    def apply_with_inputs(self, node, zs):
        """The op applied to the biases flowing in (zeros where None).  Ops that keep positions
        take them as they are (broadcast); others get them expanded to the input's shape."""
        mains = self.main_inputs(node)
        rule = self.info.rule.get(node)
        pointwise = rule.pointwise if rule is not None else False
        if self._is_plain_add(node, mains) and sum(z is None for z in zs) == 1:
            return next(z for z in zs if z is not None)  # b + 0: no zeros to materialise and add
        sub = {}
        for i, z in zip(mains, zs):
            if i in sub:
                continue
            if z is None:
                sub[i] = self.call(zeros1, self.spec_of(i))
            else:
                sub[i] = z if pointwise else self.call(materialize, z, self.size_of(i))
        args, kwargs = fx.node.map_arg((node.args, node.kwargs), lambda a: sub.get(a, self.env.get(a)))
        return self.out_of_place(self.g.create_node(node.op, node.target, args, kwargs, name="bias_" + node.name))

    @staticmethod
    def _is_plain_add(node, mains):
        """``a + b`` of two distinct block tensors (no alpha, no constant operand)."""
        if node.op == "call_function":
            ok = node.target in (operator.add, operator.iadd, torch.add)
        else:
            ok = node.op == "call_method" and node.target in ("add", "add_")
        return ok and not node.kwargs and len(node.args) == 2 and len(mains) == 2 \
            and mains[0] is not mains[1] and all(isinstance(a, fx.Node) for a in node.args) \
            and set(node.args) == set(mains)

    def unbroadcast(self, g, i, node):
        if self.shape(i) == self.shape(node):
            return g
        return self.call(ops.unbroadcast, g, self.val(i))

    def map_to_output(self, m, node):
        return m  # maps of broadcast inputs broadcast in sum_maps; fixed below if alone

    def map_to_input(self, m, i, node):
        if self._map_shape(i) == self._map_shape(node):
            return m
        return self.call(ops.expand_map, m, self.val(i), self.caxes(i))

    def sum_maps(self, ms):
        ms = [m for m in ms if m is not None]
        return ms[0] if len(ms) == 1 else self.call(add_all, *ms)


# ----------------------------------------------------------------------- the SRD backward ---
def _sum(b: Builder, parts: List[fx.Node], name: str) -> fx.Node:
    return parts[0] if len(parts) == 1 else b.call(add_all, *parts, name=name)


def _label(n: fx.Node) -> str:
    """A node as the user knows it: the module's dotted name, else the node's name."""
    return n.target if n.op == "call_module" else n.name


class Backward:
    """The SRD backward (SPEC §2, §7) as one reverse sweep over the graph.

    Every block's quantities are linear in its sharing ratio ``s`` (linear share) and in its
    ``q = beta / D`` (bias share), and the transposes of an op do not depend on the block, so
    blocks that share ops (a residual stream with no activation on it, as in ConvNeXt) push the
    *sum* of their ``g`` and ``q`` through each shared op once: the cost is that of one backward
    pass, not one per block.  At a block input ``x``, all consumers done:

        R_x = <x, sum g> + ||x|| * sum q         (R_lin + R_bias summed over the blocks using x)

    The block bias ``b = F(0)`` and the shadow ``D = S(||x||)`` of an op's output depend only on
    the op (its block inputs are the same activation outputs in every block that contains it):
    each is emitted once and reused."""

    def __init__(self, b: Builder):
        info = b.info
        self.b, self.info = b, info
        self.lost: Dict[object, fx.Node] = {}  # running lost-relevance maps, one per map shape
        self.boundary = {a for lay in info.layers for a in lay.inputs}  # activation outputs, input
        self.interior = {n for lay in info.layers for n in lay.block}
        self.g: Dict[fx.Node, List[fx.Node]] = {}   # pending Lin^T s, summed over blocks
        self.q: Dict[fx.Node, List[fx.Node]] = {}   # pending S^T(beta / D), summed over blocks
        self._z: Dict[fx.Node, Optional[fx.Node]] = {}
        self._m: Dict[fx.Node, fx.Node] = {}

    # -- per-op facts, emitted once ------------------------------------------------------------
    def _upstream(self, n):
        """Interior ops that ``n`` depends on inside blocks (n included), in forward order."""
        out, seen, stack = [], set(), [n]
        while stack:
            k = stack.pop()
            if k in seen or k in self.boundary:
                continue
            seen.add(k)
            out.append(k)
            stack.extend(self.b.main_inputs(k))
        return sorted(out, key=self.info.order.get)

    def bias(self, n):
        """F(0) at op ``n``: every activation output upstream set to zero (None: structurally 0)."""
        if n in self.boundary:
            return None
        for k in self._upstream(n):
            if k not in self._z:
                self.b.context = k
                zs = [None if i in self.boundary else self._z[i] for i in self.b.main_inputs(k)]
                self._z[k] = self.info.rule[k].bias(self.b, k, zs)
        return self._z[n]

    def shadow(self, n):
        """D at op ``n``: the norms of the block inputs summed over its structural receptive field."""
        b = self.b
        if n in self.boundary:
            return b.norm_of(n)
        for k in self._upstream(n):
            if k not in self._m:
                b.context = k
                rule, mains = self.info.rule[k], b.main_inputs(k)
                m = rule.shadow(b, k, [self._m[i] if i not in self.boundary else b.norm_of(i) for i in mains])
                if rule.pointwise and any(b._map_shape(i) != b._map_shape(k) for i in mains):
                    m = b.call(ops.map_like, m, b.val(k), b.caxes(k))
                self._m[k] = m
                b.set_recorded(k, "shadow", m)
        return self._m[n]

    # -- the sweep -------------------------------------------------------------------------------
    def relevance_at(self, a) -> Optional[fx.Node]:
        """R at a block input: linear share plus bias share from every block that consumes it."""
        b, parts = self.b, []
        gs = self.g.pop(a, None)
        if gs:
            g_a = _sum(b, gs, "gsum_" + a.name)
            # a new tensor; build_twin drops the flag where another op also reads it
            fresh = g_a.op == "call_function" and (
                g_a.target in (ops.conv_T, ops.gather_T, ops.max_pool_T) or (g_a.target is add_all and len(g_a.args) > 1))
            parts.append(b.call(ops.pfv_dot, b.val(a), g_a, b.caxes(a), name="Rlin_" + a.name,
                                **({"overwrite_g": True} if fresh else {})))
        qs = self.q.pop(a, None)
        if qs:
            q_a = _sum(b, qs, "qsum_" + a.name)
            if parts:  # R_lin + ||x|| * q in one pass
                return b.call(torch.addcmul, parts[0], b.norm_of(a), q_a, name="R_" + a.name)
            parts.append(b.call(operator.mul, b.norm_of(a), q_a, name="Rbias_" + a.name))
        return parts[0] if parts else None

    def seed(self, lay: Layer, R_k):
        """Start the backward of layer ``lay``'s block from its relevance ``R_k``."""
        b, tag = self.b, lay.name
        pre, cax = lay.pre, b.caxes(lay.pre)
        v = b.val(pre)
        b.context = pre
        # blocks whose maps have the same shape add their lost relevance into one map
        same = b._map_shape(lay.node) == b._map_shape(pre)
        key = tuple(b._map_shape(pre)) if same else tag
        if b.value == "post" and not lay.virtual:
            sl = b.call(ops.sharing_post, R_k, v, b.val(lay.node), cax, b.eps, self.lost.get(key),
                        name="share_" + tag)
        else:
            sl = b.call(ops.sharing, R_k, v, cax, b.eps, self.lost.get(key), name="share_" + tag)
        b.comment(sl, f"block: {_label(lay.node)} <- {', '.join(_label(i) for i in lay.inputs)}")
        s = b.call(operator.getitem, sl, 0, name="s_" + tag)
        lost = b.call(operator.getitem, sl, 1, name="lost_" + tag)
        beta = self._beta_by_transpose(pre, s, cax, tag) if pre in self.interior else None
        if beta is None:
            self.g.setdefault(pre, []).append(s)
            bias = self.bias(pre) if pre in self.interior else None
            if bias is not None:
                beta = b.call(ops.pfv_dot, bias, s, cax, name="beta_" + tag)
        if beta is not None:
            D = self.shadow(pre)
            b.context = pre
            ql = b.call(ops.bias_share, beta, D, lost, name="bias_share_" + tag)
            self.q.setdefault(pre, []).append(b.call(operator.getitem, ql, 0, name="q_" + tag))
            lost = b.call(operator.getitem, ql, 1, name="lostb_" + tag)
        self.lost[key] = lost

    def _beta_by_transpose(self, pre, s, cax, tag) -> Optional[fx.Node]:
        """``beta = <F(0), s>`` per position without applying ``pre``'s op to the bias flowing in,
        when that op maps each position's channels on its own (``rule.channel_map``: a linear layer)
        and only this block reads it: ``<A z + c, s> = <z, A^T s> + <c, s>``, with ``A^T s`` the
        transpose the sweep needs anyway (emitted here and handed to the op's input).  In
        ConvNeXt and transformer MLPs this saves one expanding linear layer per block.  None where
        it does not apply (the caller then forms ``F(0)`` as usual)."""
        b, rule = self.b, self.info.rule.get(pre)
        mains = b.main_inputs(pre)
        if rule is None or len(mains) != 1 or len(pre.users) != 1 or pre in self.g or not rule.channel_map(b, pre):
            return None
        (i,) = mains
        z = self.bias(i)
        if z is None:
            return None  # F(0) is the op's own bias: a broadcast row, nothing to save
        b.context = pre
        (gi,) = rule.transpose(b, pre, s)
        self.g.setdefault(i, []).append(gi)
        beta = b.call(ops.pfv_dot, z, gi, b.caxes(i), name="beta_in_" + tag)
        c = rule.bias(b, pre, [None])
        if c is not None:
            beta = b.call(operator.add, beta, b.call(ops.pfv_dot, c, s, cax, name="beta_own_" + tag),
                          name="beta_" + tag)
        return beta

    def transpose(self, n):
        """Push the pending g and q of interior op ``n`` to its inputs."""
        b, rule = self.b, self.info.rule[n]
        b.context = n
        gs = self.g.pop(n, None)
        if gs:
            for i, gi in zip(b.main_inputs(n), rule.transpose(b, n, _sum(b, gs, "g_" + n.name))):
                if gi is not None:
                    self.g.setdefault(i, []).append(gi)
        qs = self.q.pop(n, None)
        if qs:
            for i, qi in zip(b.main_inputs(n), rule.shadow_T(b, n, _sum(b, qs, "q_" + n.name))):
                if qi is not None:
                    self.q.setdefault(i, []).append(qi)


def build_twin(info: GraphInfo, root: nn.Module, *, head="gradcam", layers=("input",), eps=1e-12,
               value="pre", unit="pfv", check=True, input_channels=None, seed=None,
               output_selector=None):
    """Build the twin GraphModule.  Returns (GraphModule, {layer key: node name}).

    ``seed``: a layer node; the twin then takes ``forward(x, R_seed)`` and propagates the given
    relevance map from that layer down (ERFs, SPEC §3) instead of starting from the head."""
    _carry_constants(info, root)
    b = Builder(info, root, eps, value, unit)
    x = b.g.placeholder(info.input.name)
    target = b.g.placeholder("R_seed" if seed is not None else "target",
                             default_value=None if seed is None else inspect.Signature.empty)
    ref = next((n for n, p in root.named_parameters() if p.is_floating_point()), None)
    x_checked = b.call(check_input, x, len(b.shape(info.input)), input_channels,
                       b.attr(ref) if ref else None, False, name="x_checked") if check else x
    b.env[info.input] = x_checked
    logits = _record_forward(b, output_selector)                   # 1. forward, recording constants
    b.forward_nodes = set(b.g.nodes)
    L, R_L, logits = _initial_relevance(b, head, seed, target, logits)  # 2. R at L (Eq. 4)
    if seed is None:
        b.comment(R_L, f"initial relevance R_L at the encoder output {_label(L)} (Eq. 4)")
    R_of, lost = _srd_backward(b, L, R_L, x_checked)                # 3. the SRD backward, one sweep
    names = resolve_layers(info, layers)                            # 4. outputs
    _emit_outputs(b, names, R_of, L, R_L, lost, logits, check, x_checked, target)
    _release_forward_values(b)
    _reuse_buffers(b)
    return _graph_module(b), names


def _record_forward(b: Builder, output_selector) -> fx.Node:
    """The model's forward in the twin, each rule recording the constants it needs; returns the
    logits node."""
    info, root = b.info, b.root
    first = True
    for n in info.nodes:
        if n.op in ("placeholder", "output"):
            continue
        b.context = n
        rule = info.rule.get(n)
        b.env[n] = rule.record(b, n) if rule is not None and info.is_tensor(n) else b.copy(n)
        if first and isinstance(b.env[n], fx.Node):
            b.comment(b.env[n], "forward pass (the model's own ops), keeping what the SRD backward reads")
            first = False
    b.context = None
    out_arg = info.output.args[0]
    if output_selector is not None:
        root.srd_output_selector = output_selector if callable(output_selector) else _Key(output_selector)
        return b.call(heads.select_output, b.val(out_arg), b.attr("srd_output_selector"), name="logits")
    if isinstance(out_arg, fx.Node) and info.is_tensor(out_arg):
        return b.val(out_arg)
    raise UnsupportedOpError(
        "the model returns a tuple/dict, not a logits tensor (B, classes): pass "
        "output_selector= (e.g. output_selector='logits', 0, or a callable) to srd_fx.compile.")


def _initial_relevance(b: Builder, head, seed, target, logits):
    """(L, R_L, logits): the layer the backward starts from, its relevance (the head's, Eq. 4, or
    the given seed map) and the logits (Grad-CAM's head computes them on its way)."""
    info, root = b.info, b.root
    L = info.L
    cax_L = info.caxes(L)
    neuron = b.unit == "neuron"
    if seed is not None:
        return seed, target, logits
    if callable(head) and not isinstance(head, str):
        root.srd_user_head = head
        R_L = b.call(heads.user_head, b.attr("srd_user_head"), b.val(L), logits, target, cax_L, neuron,
                     name="R_L")
    elif head == "gradcam":
        root.srd_head = heads.extract_head(info, root.__dict__.get("srd_output_selector"))
        both = b.call(heads.gradcam, b.attr("srd_head"), b.val(L), target, cax_L, neuron,
                      *([info.L_segments] if info.L_segments else []), name="head")
        R_L = b.call(operator.getitem, both, 0, name="R_L")
        logits = b.call(operator.getitem, both, 1, name="logits_head")  # the forward's head is then dead code
    elif head == "ones":
        R_L = b.call(heads.ones, b.val(L), cax_L, neuron, logits, target, name="R_L")
    else:
        raise ValueError(f"head must be 'gradcam', 'ones' or a callable (A, logits, target) -> R, got {head!r}")
    return L, R_L, logits


def _srd_backward(b: Builder, L, R_L, x_checked):
    """The SRD backward: one reverse sweep, last op first (see Backward).  Returns the relevance
    node of every activation layer reached and of the input, and the lost-relevance total."""
    info = b.info
    R_of: Dict[fx.Node, fx.Node] = {}
    bw = Backward(b)
    layers_at: Dict[fx.Node, List[Layer]] = {}
    for lay in info.layers:
        layers_at.setdefault(lay.node, []).append(lay)
    R_in = None
    for n in sorted(set(layers_at) | bw.boundary | bw.interior, key=info.order.get, reverse=True):
        R_n = bw.relevance_at(n) if n in bw.boundary else None
        if n is L:
            R_n = R_L if R_n is None else b.call(add_all, R_n, R_L, name="R_" + n.name)
        if n is info.input:
            R_in = R_n
        elif R_n is not None and n in layers_at:
            R_of[n] = R_n
            for lay in layers_at[n]:
                bw.seed(lay, R_n)
        if n in bw.interior:
            bw.transpose(n)
    if R_in is None:
        R_in = b.call(torch.zeros_like, b.call(ops.pfv_norm, x_checked, b.caxes(info.input)))
    R_of[info.input] = R_in
    lost = b.call(ops.total_lost, b.val(info.input), *bw.lost.values(), name="lost") if bw.lost else None
    return R_of, lost


def _emit_outputs(b: Builder, names, R_of, L, R_L, lost_total, logits, check, x_checked, target) -> None:
    """The twin's output: logits, the input map, the requested layers' maps, R_L, lost, and with
    ``check`` the flag of every value check (:func:`checks_pass`)."""
    info = b.info
    b.context = None
    sal = b.call(ops.position_map, R_of[info.input], (1,), name="saliency")
    b.comment(sal, "outputs")
    rel = {}
    for key, node in names.items():
        r = R_of.get(node)
        if r is None:
            r = b.call(torch.zeros_like, b.call(ops.pfv_norm, b.val(node), b.caxes(node)))
        out = _read_out(b, r, node, "out_" + key.replace(".", "_"))
        if out.target is sal.target and out.args == sal.args and out.kwargs == sal.kwargs:
            b.g.erase_node(out)  # the input's map is the saliency
            out = sal
        rel[key] = out
    ok = b.call(checks_pass, x_checked, sal, R_L, lost_total, logits, target, name="ok") if check else None
    b.g.output({"logits": logits, "saliency": sal, "relevance": rel, "lost": lost_total,
                "R_L": _read_out(b, R_L, L, "out_R_L"), "ok": ok})


# ----------------------------------------------------------------------- memory -------------
def _shape_positions(u: fx.Node, t: fx.Node):
    """The positions of ``u``'s arguments that hold ``t``, if ``u`` reads it only for its shape,
    dtype and device (``ops.shape_args``); None if ``u`` reads its values."""
    shape_only = getattr(u.target, "srd_shape_args", ()) if u.op == "call_function" else ()
    pos = [k for k, a in enumerate(u.args) if a is t]
    if not pos or any(k not in shape_only for k in pos):
        return None
    seen: List[fx.Node] = []
    fx.node.map_arg((u.args, u.kwargs), seen.append)
    return pos if seen.count(t) == len(pos) else None  # also in a list or a keyword: values read


def _release_forward_values(b: Builder) -> None:
    """Free forward values that the backward would otherwise hold from the forward pass on:

    * an activation output ``a = act(v)`` that the backward reads, if it is one of the largest
      (at least half the size of the largest activation output): the backward keeps ``v`` (its
      block's sharing ratio reads it), so ``a`` is computed again from ``v`` just before its first
      use in the backward, and where it is read for its shape alone, ``v`` stands in for it.
      Smaller ones are kept: each recomputation is one more op (a kernel launch on a GPU), and
      where the resolution falls stage by stage the backward reads, and frees, the small ones
      early, before it reaches the largest tensors (the trade-off is measured in docs/benchmarks.md);
    * any other forward value that the backward reads only for its shape (a transpose's output
      size): a stand-in of no memory (:func:`ops.like`) taken right after it is computed.

    Norms of forward values are already taken in the forward pass (``Builder.norm_of``)."""
    g, info = b.g, b.info
    order = {n: k for k, n in enumerate(g.nodes)}
    end = max(order[n] for n in b.forward_nodes if n in order)

    def late_users(t):
        return sorted((u for u in t.users if order.get(u, len(order)) > end), key=lambda u: order.get(u, len(order)))

    def swap(u, t, new, positions):
        args = list(u.args)
        for k in positions:
            args[k] = new
        u.args = tuple(args)

    sizes = {lay.node: math.prod(info.shape(lay.node)) for lay in info.layers if not lay.virtual}
    largest = max(sizes.values(), default=0)
    for lay in info.layers:
        x, v = b.env.get(lay.node), b.env.get(lay.pre)
        if 2 * sizes.get(lay.node, 0) < largest:
            continue  # small: freed by the backward before it reaches the largest tensors (its peak)
        if lay.virtual or lay.node is info.L or not isinstance(x, fx.Node) or not isinstance(v, fx.Node) \
                or order.get(x, len(order)) > end or x.op not in ("call_module", "call_function", "call_method") \
                or v not in x.all_input_nodes or any(a is not v and a.op != "get_attr" for a in x.all_input_nodes) \
                or info.shape(lay.node) != info.shape(lay.pre) or "softmax" in str(getattr(info.rule.get(lay.node), "name", "")):
            continue
        reads = []
        for u in late_users(x):
            pos = _shape_positions(u, x)
            if pos is None:
                reads.append(u)
            else:
                swap(u, x, v, pos)
        if reads:
            with g.inserting_before(reads[0]):
                again = g.create_node(x.op, x.target, x.args, x.kwargs, name=x.name + "_again")
            for u in reads:
                u.replace_input_with(x, again)
    order = {n: k for k, n in enumerate(g.nodes)}
    for t in [n for n in g.nodes if order[n] <= end]:
        if t.op not in ("call_module", "call_function", "call_method") \
                or (t.op == "call_function" and t.target in (getattr, ops.like, tensor_spec)):  # not tensors
            continue
        late = late_users(t)
        found = [(u, _shape_positions(u, t)) for u in late]
        if not late or any(p is None for _, p in found):
            continue
        with g.inserting_after(t):  # its shape where that is all they read (no op), else a tensor stand-in
            if all(getattr(u.target, "srd_sizes_ok", False) for u in late):
                stand_in = g.call_function(getattr, (t, "shape"), name="size_" + t.name)
            else:
                stand_in = g.call_function(ops.like, (t,), name="like_" + t.name)
        for u, pos in found:
            swap(u, t, stand_in, pos)


# ops whose output is a new tensor (never a view or the input itself), for the in-place reuse below
_FRESH_MODULES = (nn.modules.conv._ConvNd, nn.Linear, nn.modules.batchnorm._BatchNorm, nn.LayerNorm, nn.GroupNorm,
                  nn.modules.pooling._MaxPoolNd, nn.modules.pooling._AvgPoolNd, nn.modules.pooling._AdaptiveAvgPoolNd,
                  nn.ReLU, nn.ReLU6, nn.GELU, nn.SiLU, nn.LeakyReLU, nn.ELU, nn.Hardswish, nn.Hardtanh, nn.Mish,
                  nn.Sigmoid, nn.Tanh)
_FRESH_FUNCTIONS = {operator.add, operator.sub, operator.mul, operator.truediv, operator.matmul, torch.add,
                    torch.sub, torch.mul, torch.div, torch.matmul, torch.relu, torch.sigmoid, torch.tanh,
                    torch.nn.functional.relu, torch.nn.functional.gelu, torch.nn.functional.silu,
                    torch.nn.functional.conv1d, torch.nn.functional.conv2d, torch.nn.functional.conv3d,
                    torch.nn.functional.linear, torch.nn.functional.layer_norm, torch.nn.functional.batch_norm,
                    ops.pfv_norm, ops.like, getattr}
_FRESH_METHODS = {"add", "sub", "mul", "div", "matmul", "relu", "sigmoid", "tanh", "mean", "sum"}


def _fresh(b: Builder, n: fx.Node) -> bool:
    """True when ``n``'s output is a new tensor (or not a tensor): it shares no memory with its inputs."""
    if n.op == "call_module":
        mod = b.root.get_submodule(n.target)
        return isinstance(mod, _FRESH_MODULES) and not getattr(mod, "inplace", False) \
            and not (mod._forward_hooks or mod._forward_pre_hooks)
    if n.op == "call_function":
        if n.target is operator.getitem:  # an output of a recording op that returns (value, indices)
            return isinstance(n.args[0], fx.Node) and n.args[0].op == "call_function" \
                and n.args[0].target in (ops.max_pool_record, ops.adaptive_max_pool_record)
        return n.target in _FRESH_FUNCTIONS and not n.kwargs.get("inplace", False)
    return n.op == "call_method" and n.target in _FRESH_METHODS


def _last_reader(b: Builder, t: fx.Node, order, skip: fx.Node) -> Optional[fx.Node]:
    """The last node other than ``skip`` that reads ``t``'s memory (``t``'s users, and those of
    every node that may share it: views, identities, unknown ops); ``t`` itself when there is none.
    None if ``t`` is not a new tensor that the generated code owns (an input, a view, a graph
    output, the output of a module with hooks)."""
    if not _fresh(b, t):
        return None
    last, seen, todo = t, {t}, [t]
    while todo:
        k = todo.pop()
        for u in k.users:
            if u.op == "output":
                return None
            if u is skip:
                continue
            last = max(last, u, key=order.get)
            if u not in seen and not _fresh(b, u):
                seen.add(u)
                todo.append(u)
    return last


def _reuse_buffers(b: Builder) -> None:
    """Write results into memory the generated code owns where nothing reads it afterwards (the
    values are the same; fewer new tensors means a lower peak and fewer page faults on the CPU):

    * the norm of a forward value is taken after the value's last read in the forward pass, in
      the value's own memory (``pfv_norm(..., overwrite=True)``), when the backward no longer
      reads the value (see :func:`_release_forward_values`);
    * a block's sharing ratio ``s = v R / ||v||^2`` is formed in ``v`` when the sharing is the
      last read of ``v`` (``sharing(..., overwrite_v=True)``)."""
    g = b.g
    order = {n: k for k, n in enumerate(g.nodes)}
    end = max(order[n] for n in b.forward_nodes if n in order)
    for n in list(g.nodes):
        if n.op != "call_function" or n.target not in (ops.pfv_norm, ops.sharing):
            continue
        t = n.args[0] if n.target is ops.pfv_norm else n.args[1]
        if not isinstance(t, fx.Node):
            continue
        last = _last_reader(b, t, order, skip=n)
        if last is None:
            continue
        if n.target is ops.sharing:
            if order[last] < order[n]:
                n.kwargs = {**n.kwargs, "overwrite_v": True}
            continue
        if order[last] > end or any(order[u] <= order[last] for u in n.users):
            continue  # read in the backward, or the norm is needed before the value's last read
        if order[last] > order[n]:
            last.append(n)  # the norm moves after the value's last read
            order = {m: k for k, m in enumerate(g.nodes)}
        n.kwargs = {**n.kwargs, "overwrite": True}


def _graph_module(b: Builder) -> fx.GraphModule:
    """The finished twin: temporaries overwritten in place only where nothing else reads them, dead
    code removed, Python code generated."""
    for n in b.g.nodes:
        if n.target is ops.pfv_dot and n.kwargs.get("overwrite_g") and len(n.args[1].users) != 1:
            n.kwargs = {k: v for k, v in n.kwargs.items() if k != "overwrite_g"}
    b.g.set_codegen(SRDCodeGen(b.comments))
    gm = fx.GraphModule(b.root, b.g, "SRDExplainer")
    fold_constants(gm)
    gm.graph.eliminate_dead_code()
    gm.recompile()
    return gm


def _read_out(b: Builder, r, node, name):
    """The relevance ``r`` of ``node`` as a position map (B, rows, columns, ...): channel axes
    summed, positions in the input's orientation whatever permute the model applied."""
    m = b.call(ops.position_map, r, b.info.caxes(node), name=name)
    perm = b.info.readout_perm(node)
    m = b.call(torch.permute, m, perm, name=name + "_oriented") if perm else m
    if node is not b.info.input and b.shape(node)[0] != b.shape(b.info.input)[0]:
        # windows folded into the batch axis: one row of (windows x window positions) per sample
        m = b.call(ops.per_sample, m, b.val(b.info.input), name=name + "_per_sample")
    return m


# ----------------------------------------------------------------------- constant folding ---
def _fetch(root: nn.Module, target: str):
    obj = root
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


def fold_constants(gm: fx.GraphModule) -> None:
    """Evaluate, once, every node of the twin that depends only on parameters and buffers (batch
    norm scales and shifts, a convolution weight with the next batch norm's scale in it, reshaped
    biases): the values become buffers of ``gm.srd_const`` and the call reads them.

    The recipe (the folded sub-graph) is kept: :func:`refresh_constants` runs it again when a
    parameter or buffer it reads has changed since (an optimiser step, ``load_state_dict``, a move)."""
    g = gm.graph
    value: Dict[fx.Node, object] = {}
    for n in g.nodes:
        if n.op == "get_attr":
            v = _fetch(gm, n.target)
            if isinstance(v, torch.Tensor):
                value[n] = v
        elif n.op in ("call_function", "call_method") and n.all_input_nodes \
                and all(a in value for a in n.all_input_nodes) and n.target is not check_input:
            args, kwargs = fx.node.map_arg((n.args, n.kwargs), value.__getitem__)
            try:
                with torch.no_grad():
                    value[n] = (getattr(args[0], n.target)(*args[1:], **kwargs) if n.op == "call_method"
                                else n.target(*args, **kwargs))
            except Exception:  # noqa: BLE001  (not evaluable without the input: left to run time)
                continue
    folded = [n for n in value if n.op != "get_attr" and isinstance(value[n], torch.Tensor)
              and any(u not in value for u in n.users)]
    if not folded:
        return
    recipe = fx.Graph()
    env: Dict[fx.Node, fx.Node] = {}
    need = set()
    stack = list(folded)
    while stack:
        k = stack.pop()
        if k not in need:
            need.add(k)
            stack.extend(k.all_input_nodes)
    for n in g.nodes:
        if n in need:
            env[n] = recipe.node_copy(n, env.__getitem__)
    recipe.output(tuple(env[n] for n in folded))
    holder = nn.Module()
    gm.add_module("srd_const", holder)
    reads, buf = {}, {}
    for n in folded:
        # a node named like a Module attribute (``to``, ``float``) gets a buffer name of its own
        buf[n] = n.name if not hasattr(holder, n.name) else f"{n.name}_const"
        holder.register_buffer(buf[n], value[n].detach(), persistent=False)
        with g.inserting_before(n):
            reads[n.name] = g.get_attr(f"srd_const.{buf[n]}")
        n.replace_all_uses_with(reads[n.name])
    for n in reversed(list(g.nodes)):  # the folded sub-graph, now unused
        if n in value and not n.users:
            g.erase_node(n)
    for name, n in reads.items():  # the read takes the folded node's name (that node is gone)
        n.name = name
        g._graph_namespace._rename_object(n, name)
    sources = sorted({n.target for n in need if n.op == "get_attr"})
    gm._srd_const = dict(recipe=recipe, names=[buf[n] for n in folded], sources=sources,
                         sig=_signature(gm, sources))


def _signature(gm, sources):
    ts = [_fetch(gm, t) for t in sources]
    return tuple((t.data_ptr(), t._version, t.dtype, t.device) for t in ts)


def refresh_constants(gm: fx.GraphModule) -> None:
    """Recompute the folded constants if a parameter or buffer they come from has changed."""
    c = getattr(gm, "_srd_const", None)
    if c is None:
        return
    sig = _signature(gm, c["sources"])
    if sig == c["sig"]:
        return
    with torch.no_grad():
        values = fx.Interpreter(gm, graph=c["recipe"]).run()
    for name, v in zip(c["names"], values):
        gm.srd_const._buffers[name] = v.detach()
    c["sig"] = sig


def _carry_constants(info: GraphInfo, root: nn.Module) -> None:
    """Tensors fx stored on the traced GraphModule itself (``_tensor_constant0``: a tensor the
    forward built while tracing, e.g. Swin's shift mask) are attributes of the twin's root too."""
    for n in info.nodes:
        if n.op == "get_attr" and "." not in n.target and not hasattr(root, n.target) \
                and hasattr(info.gm, n.target):
            setattr(root, n.target, getattr(info.gm, n.target))


def resolve_layers(info: GraphInfo, layers) -> Dict[str, fx.Node]:
    """Map the user's layer keys ('input', 'low', 'high', module or node names) to nodes."""
    if layers == "all":
        layers = ["input", "low"] + [l.name for l in info.layers]
    out = {}
    acts = {l.node for l in info.layers}
    for key in layers:
        if key == "input":
            out[key] = info.input
        elif key == "low":
            out[key] = info.L
        elif key == "high":
            out[key] = high_layer(info)
        else:
            try:
                node = info.node_for(key)
            except KeyError:
                raise LayerError(f"unknown layer {key!r}: use 'input', 'low', 'high', an activation "
                               f"module name or one of the activation nodes "
                               f"{[l.name for l in info.layers][:8]}...") from None
            if node not in acts and node is not info.input:
                raise LayerError(f"{key!r} resolves to node {node.name!r}, which is not an activation "
                               "layer: relevance is defined after activation layers, at L and at the input")
            out[key] = node
    return out


def high_layer(info: GraphInfo) -> fx.Node:
    """SRD-high: the last activation layer with 4x the spatial size of L (ResNet50 layer2 at 224)."""
    sL = info.position_shape(info.L)
    best = None
    for lay in sorted(info.layers, key=lambda l: info.order[l.node]):
        s = info.position_shape(lay.node)
        if len(s) == len(sL) and all(a >= 4 * c for a, c in zip(s, sL)):
            best = lay.node
    if best is None:
        raise LayerError(f"'high' (SRD-high) needs an activation layer with 4x the encoder output's resolution "
                         f"{tuple(sL)} per axis, and this model has none (a plain ViT or Mixer keeps one "
                         "token resolution throughout): use 'low' or 'input', or name an activation layer")
    return best
