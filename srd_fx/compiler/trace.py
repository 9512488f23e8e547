"""Tracing: torch.fx with timm's no-trace lists, activation modules kept as leaves, and the
timm ``forward_features`` boundary tagged as the encoder output (SPEC §1)."""
from __future__ import annotations

import contextlib
import operator
from typing import Optional

import torch
import torch.fx as fx
import torch.nn as nn

from ..errors import TraceError, TrainingModeError, UnsupportedOpError

ENCODER_TAG = "srd_encoder_output"
ENCODER_LIST_TAG = "srd_encoder_output_item"


def _timm_lists():
    try:
        from timm.layers import get_notrace_functions, get_notrace_modules
        return tuple(get_notrace_modules()), tuple(get_notrace_functions())
    except Exception:  # timm absent or too old
        return (), ()


class SRDTracer(fx.Tracer):
    """fx tracer.  Leaves: torch.nn modules and modules with a rule of their own (activations,
    timm's '...Same' convs and pools, user-registered modules).  timm's no-trace *functions* are
    wrapped.  timm's no-trace *modules* that have no rule (BatchNormAct2d and kin, NormFreeBlock,
    ConvMlp, ...) are traced through: that is the canonicalisation that splits a fused
    norm+activation into its affine part and its activation layer."""

    def __init__(self):
        import inspect
        from srd_fx import rules
        self._timm_modules, fns = _timm_lists()
        # plain-Python functions with a rule of their own (timm's swish, hard_sigmoid, ...) stay
        # single nodes instead of being traced into (x * sigmoid(x) would look like a gate)
        ruled = [f for f in rules._FUNCTION_RULES if inspect.isfunction(f)
                 and not (getattr(f, "__module__", "") or "").startswith("torch")]
        self._ruled = {id(f): f for f in ruled}
        fns = [f for f in fns if f not in _UNWRAPPED]
        super().__init__(autowrap_functions=tuple(f for f in list(fns) + ruled if callable(f)))

    def trace(self, root, concrete_args=None):
        # fx autowraps a function only where a forward names it as a global; a ruled function
        # reached through an attribute (``self.act = swish``, ``activations.swish(x)``) would be
        # traced into, so those places are wrapped too for the duration of the trace
        with _wrap_ruled_attributes(root, self._ruled):
            return super().trace(root, concrete_args)

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        own = type(m) in rules_exact()
        if own:
            return True
        if isinstance(m, self._timm_modules):
            return False
        return super().is_leaf_module(m, qualname)


@contextlib.contextmanager
def _wrap_ruled_attributes(root, ruled):
    """Temporarily replace every ruled plain-Python function stored as an attribute of a
    submodule of ``root``, or of the Python module defining it, by fx's leaf wrapper (a call on a
    Proxy becomes one ``call_function`` node whose target is the original function)."""
    import sys
    from torch.fx._symbolic_trace import _create_wrapped_func
    dicts = []
    if isinstance(root, nn.Module):
        dicts += [m.__dict__ for m in root.modules()]
    for mod in {getattr(f, "__module__", None) for f in ruled.values()}:
        if mod in sys.modules:
            dicts.append(vars(sys.modules[mod]))
    saved = []
    try:
        for d in dicts:
            for name, value in list(d.items()):
                f = ruled.get(id(value))
                if f is not None and value is f:
                    saved.append((d, name, value))
                    d[name] = _create_wrapped_func(f)
        yield
    finally:
        for d, name, value in reversed(saved):
            d[name] = value


def _failing_module(tracer) -> str:
    """`` in module 'blocks.0.attn' (GPSA)``: the innermost module fx was tracing when it failed."""
    stack = list(getattr(tracer, "module_stack", {}).values())
    stack = [v for v in stack if isinstance(v, tuple) and v[0]]
    if not stack:
        return ""
    path, typ = stack[-1]
    name = getattr(typ, "__name__", None) or str(typ).rsplit(".", 1)[-1].strip("'>")
    return f" in module {path!r} ({name})"


def optional_args(model: nn.Module) -> dict:
    """``forward``'s parameters after the first that have a default (``attn_mask=None``,
    ``is_causal=False``): traced at their defaults, so only the required tensor argument is an
    input of the explained function."""
    import inspect
    try:
        params = list(inspect.signature(model.forward).parameters.values())
    except (TypeError, ValueError):
        return {}
    return {p.name: p.default for p in params[1:]
            if p.default is not inspect.Parameter.empty
            and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}


def drop_specialised_inputs(graph: fx.Graph) -> fx.Graph:
    """Remove the placeholders fx makes for concrete (defaulted) arguments, with the assertions
    that check their value: what is left takes the required inputs only."""
    asserts = (torch._assert, getattr(fx._symbolic_trace, "_assert_is_none", None))
    order = {n: i for i, n in enumerate(graph.nodes)}
    for p in [n for n in graph.nodes if n.op == "placeholder"][1:]:
        if not p.args:            # no default value: a required input, kept (refused later)
            continue
        dead, todo = set(), [p]
        while todo:
            n = todo.pop()
            if n not in dead:
                dead.add(n)
                todo.extend(n.users)
        if all(n.target in asserts for n in dead if not n.users):   # only checks of the value
            for n in sorted(dead, key=order.get, reverse=True):
                graph.erase_node(n)
    return graph


def rules_exact():
    from srd_fx import rules
    return rules._MODULE_RULES


@contextlib.contextmanager
def _tag_forward_features(model: nn.Module):
    """Make ``model.forward_features`` tag its output node while tracing (timm convention)."""
    ff = getattr(model, "forward_features", None)
    has_head = callable(getattr(model, "forward_head", None))
    if not (callable(ff) and has_head):
        yield
        return

    def tagged(*args, **kwargs):
        out = ff(*args, **kwargs)
        if isinstance(out, fx.Proxy):
            out.node.meta[ENCODER_TAG] = True
        elif isinstance(out, (list, tuple)) and out and all(isinstance(o, fx.Proxy) for o in out):
            for i, o in enumerate(out):          # several encoder outputs (packed by the analysis)
                o.node.meta.setdefault(ENCODER_LIST_TAG, []).append(i)
        return out

    model.forward_features = tagged
    try:
        yield
    finally:
        del model.forward_features


def check_eval(model: nn.Module) -> None:
    bad = [n or type(model).__name__ for n, m in model.named_modules() if m.training]
    if bad:
        raise TrainingModeError(
            f"the model is in training mode ({len(bad)} module(s), e.g. {bad[:3]}): batch-norm "
            "statistics and dropout would change the explained function. Call model.eval() "
            "before srd_fx.compile(model).")


def _meta_tracer(device=None):
    import operator
    from torch.fx.experimental.meta_tracer import MetaProxy, MetaTracer

    class _Proxy(MetaProxy):
        def size(self, dim=None):
            # MetaProxy.size treats dim=0 as "no dim" and returns the whole size (x.size(0))
            meta = self.__dict__.get("_tensor_meta")
            if meta is not None:
                return meta.size() if dim is None else meta.size(dim)
            return super().size(dim)

    compare = {operator.eq, operator.ne, operator.not_, operator.truth}

    class ShapeAwareTracer(MetaTracer, SRDTracer):
        """SRDTracer whose proxies carry meta tensors, so Python control flow on *shapes*
        (``if x.shape[-1] < 7``, as in timm's ConvMlp) resolves for the example's input size.
        A test of a tensor's device (``if x.device.type != 'meta'``, timm's LiteMLA choosing its
        autocast context) resolves to the example's device: it picks a Python branch and puts
        nothing in the graph."""

        def proxy(self, node):
            return _Proxy(node, self)

        def to_bool(self, obj):
            value = _device_value(obj.node)
            if isinstance(value, bool):
                return value
            return super().to_bool(obj)

    def _device_value(n):
        """The value of a comparison built from ``x.device`` / ``x.device.type`` and constants,
        with every device the example's; None when ``n`` is anything else."""
        if not isinstance(n, fx.Node):
            return n
        if n.op == "call_function" and n.target is getattr and n.args[1] == "device":
            return device
        if n.op == "call_function" and n.target is getattr and n.args[1] == "type":
            d = _device_value(n.args[0])
            return d.type if isinstance(d, torch.device) else None
        if n.op == "call_function" and n.target in compare:
            vals = [_device_value(a) for a in n.args]
            if any(v is None or isinstance(v, fx.Node) for v in vals):
                return None
            return n.target(*vals)
        return None

    return ShapeAwareTracer()


def _meta_trace(model: nn.Module, shape, dtype, device=None, proxy_buffers=False) -> fx.GraphModule:
    import copy
    import inspect
    import warnings
    mt = _meta_tracer(torch.device("meta"))
    # buffers read as graph nodes, not baked into constants (ConViT's cached relative indices,
    # expanded and projected in the forward: a constant computed from a buffer of the meta copy
    # would exist on the copy only)
    mt.proxy_buffer_attributes = proxy_buffers
    name = next(iter(inspect.signature(model.forward).parameters))
    # trace a copy on the meta device (leaf modules then run on shapes only); the graph's
    # targets are qualified names, so it is bound to the real model after
    meta_model = copy.deepcopy(model).to("meta")
    with _tag_forward_features(meta_model), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        graph = mt.trace(meta_model, meta_args={name: torch.empty(shape, dtype=dtype, device="meta")},
                         concrete_args=optional_args(model) or None)
        drop_specialised_inputs(graph)
    missing = [n.target for n in graph.nodes if n.op == "get_attr" and not _has_attr(model, n.target)]
    if missing:
        raise _MissingConstant(missing)
    gm = fx.GraphModule(model, graph, type(model).__name__)
    gm.meta["srd_proxy_buffers"] = proxy_buffers
    for n in gm.graph.nodes:  # meta values are not wanted downstream
        n.meta.pop("tensor_meta", None)
    return gm


class _MissingConstant(Exception):
    """The trace reads tensors that the forward created while it was traced (a cache filled on
    the first call, as ConViT's ``rel_indices``): they exist on the traced copy only."""


def _has_attr(model, target):
    obj = model
    for atom in target.split("."):
        if not hasattr(obj, atom):
            return False
        obj = getattr(obj, atom)
    return True


def _meta_trace_warm(model: nn.Module, example: torch.Tensor, shape):
    """:func:`_meta_trace`; a forward that fills a tensor cache on its first call for this input
    size (ConViT's relative indices) is run once on the example first, so the trace reads the
    cache as an attribute of the model; if the trace still computes constants from buffers of its
    meta copy, it is repeated with buffers as graph nodes."""
    try:
        return _meta_trace(model, shape, example.dtype, example.device)
    except _MissingConstant:
        with torch.no_grad():
            model(torch.zeros(shape, dtype=example.dtype, device=example.device))
    try:
        return _meta_trace(model, shape, example.dtype, example.device)
    except _MissingConstant:
        return _meta_trace(model, shape, example.dtype, example.device, proxy_buffers=True)


def _specialised_trace(model: nn.Module, example: torch.Tensor) -> Optional[fx.GraphModule]:
    """The shape-aware trace for the example's size, or None if that fails too.  The trace is
    repeated with another batch size: a forward whose Python control flow depends on the batch
    size (a loop over the samples) would otherwise be unrolled for one batch size and silently
    give wrong results for another, so it is refused."""
    shape = tuple(example.shape)
    try:
        gm = _meta_trace_warm(model, example, shape)
    except Exception:
        return None
    other = (shape[0] + 1,) + shape[1:] if len(shape) > 1 else None
    gm.meta["srd_specialised"] = shape
    if other is not None:
        try:
            gm2 = _meta_trace(model, other, example.dtype, example.device, gm.meta["srd_proxy_buffers"])
        except Exception:
            gm2 = None
        if gm2 is not None and gm2.code == gm.code:
            # the graph does not depend on the batch size: only the other dimensions specialise it
            gm.meta["srd_specialised"] = shape[1:]
        elif gm2 is None or len(gm2.graph.nodes) != len(gm.graph.nodes):
            raise TraceError(
                f"the forward of {type(model).__name__} depends on the batch size (traced with batches "
                f"of {shape[0]} and {other[0]}, the graphs differ: e.g. a Python loop over the samples "
                "of the batch). srd_fx explains one graph for every batch size: vectorise the forward "
                "over the batch dimension, or compile the per-sample part that the loop calls and "
                "explain with it.")
    return gm


def specialised_for(gm: Optional[fx.GraphModule], shape) -> bool:
    """Whether the trace ``gm`` is valid for inputs of ``shape`` (a shape-specialised trace holds
    the full shape it was made for, or the shape without the batch size when the batch size does
    not change the graph)."""
    spec = None if gm is None else gm.meta.get("srd_specialised")
    if spec is None:
        return gm is not None
    shape = tuple(shape)
    return spec == (shape if len(spec) == len(shape) else shape[1:])


# timm no-trace functions traced into for the current trace (see _unruled_wrapped)
_UNWRAPPED: set = set()


def _unruled_wrapped(graph: fx.Graph) -> set:
    """timm's no-trace functions that the trace kept as single calls although they have no rule
    and their arguments depend on the input (MViTv2's ``reshape_pre_pool`` returns a tuple the
    analysis could not see through): they are traced into instead, where that works."""
    from srd_fx import rules
    fns = set(_timm_lists()[1])
    dep, out = set(), set()
    for n in graph.nodes:
        if n.op == "placeholder" or any(a in dep for a in n.all_input_nodes):
            dep.add(n)
            if n.op == "call_function" and n.target in fns and n.target not in rules._FUNCTION_RULES \
                    and any(u.op == "call_function" and u.target is operator.getitem for u in n.users):
                out.add(n.target)     # returns a tuple of input-dependent tensors
    return out


@contextlib.contextmanager
def _unwrapping(fns):
    global _UNWRAPPED
    saved, _UNWRAPPED = _UNWRAPPED, set(fns)
    try:
        yield
    finally:
        _UNWRAPPED = saved


def trace(model: nn.Module, example: Optional[torch.Tensor] = None) -> fx.GraphModule:
    """Trace ``model`` into a GraphModule, or raise TraceError saying how to fix it.

    timm's no-trace functions that carry input-dependent values and have no rule are traced into
    when the model can be traced that way (:func:`_unruled_wrapped`); else they stay calls.

    Plain symbolic tracing first; if it fails and an example input is known, a shape-aware
    retrace specialised to the example's size (``gm.meta["srd_specialised"]`` holds it; a
    forward whose graph depends on the batch size is refused).  In-place ops are then made
    explicit (:func:`functionalise_inplace`)."""
    check_eval(model)
    gm = _trace(model, example)
    fns = _unruled_wrapped(gm.graph)
    if fns:
        with _unwrapping(fns):
            try:
                gm = _trace(model, example)
            except TraceError:
                pass
    return gm


def _trace(model: nn.Module, example: Optional[torch.Tensor] = None) -> fx.GraphModule:
    tracer = SRDTracer()
    try:
        with _tag_forward_features(model):
            graph = drop_specialised_inputs(tracer.trace(model, concrete_args=optional_args(model) or None))
    except Exception as e:  # fx raises TraceError, TypeError, RuntimeError, ...
        if example is not None:
            gm = _specialised_trace(model, example)
            if gm is not None:
                return functionalise_inplace(gm)
        where = _failing_module(tracer)
        raise TraceError(
            f"torch.fx could not trace {type(model).__name__}{where}: {type(e).__name__}: {e}\n"
            "srd_fx needs a model whose forward has no data-dependent Python control flow "
            "(if/for on tensor values, .item(), len() of a tensor, ...)"
            + ("" if example is not None else "; control flow on shapes only resolves with an example "
               "input: pass example_input= to srd_fx.compile") +
            ". Fix: move the data-dependent part out of forward, make the offending submodule a leaf "
            "with a rule (srd_fx.register_rule(ThatModule, rules.Affine(...))) or wrap the function "
            "with torch.fx.wrap.") from e
    return functionalise_inplace(fx.GraphModule(tracer.root, graph, type(model).__name__))


# ---------------------------------------------------------------------------------------------
# in-place ops: fx records ``y.relu_()`` as a node whose result may be unused, while the later
# readers of ``y`` keep pointing at the node *before* the mutation.  Eager PyTorch gives those
# readers the mutated tensor; the graph must say so explicitly.
# ---------------------------------------------------------------------------------------------
# ops whose result may share storage with their first argument (a mutation of one is seen by
# the other)
_ALIAS_METHODS = {
    "view", "view_as", "reshape", "reshape_as", "flatten", "unflatten", "squeeze", "unsqueeze",
    "transpose", "permute", "t", "expand", "expand_as", "narrow", "select", "unfold", "chunk",
    "split", "split_with_sizes", "tensor_split", "unbind", "as_strided", "diagonal", "movedim",
    "moveaxis", "swapaxes", "swapdims", "contiguous", "detach", "__getitem__", "to", "type_as",
    "float", "double", "half", "bfloat16", "type", "real", "imag", "view_as_real"}
_ALIAS_FUNCTION_NAMES = _ALIAS_METHODS | {"getitem", "dropout", "dropout1d", "dropout2d", "dropout3d",
                                          "alpha_dropout", "feature_alpha_dropout"}
_ALIAS_MODULES = (nn.Identity, nn.Flatten, nn.Unflatten, nn.Dropout, nn.Dropout1d, nn.Dropout2d,
                  nn.Dropout3d, nn.AlphaDropout)
# ops that return their input tensor itself in eval mode (the same tensor under another name)
_SAME_MODULES = (nn.Identity, nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout)
_SAME_NAMES = {"detach", "dropout", "dropout1d", "dropout2d", "dropout3d", "alpha_dropout",
               "feature_alpha_dropout"}
_OPERATOR_INPLACE = {"iadd", "iand", "iconcat", "ifloordiv", "ilshift", "imod", "imul", "imatmul", "ior",
                     "ipow", "irshift", "isub", "itruediv", "ixor"}


def _first_node(node):
    a = node.args[0] if node.args else next(iter(node.kwargs.values()), None)
    return a if isinstance(a, fx.Node) else None


def _fn_name(node):
    return getattr(node.target, "__name__", "") if node.op == "call_function" else ""


def _inplace_flag(node):
    """Bound arguments of a call_function whose signature has ``inplace`` set to True, else None."""
    if node.op != "call_function":
        return None
    if node.kwargs.get("inplace") is True:
        return dict(node.kwargs)
    if not node.args[1:]:
        return None
    import inspect
    try:
        bound = inspect.signature(node.target).bind_partial(*node.args, **node.kwargs)
    except (TypeError, ValueError):
        return None
    if bound.arguments.get("inplace") is True:
        return bound
    return None


def _mutated(node, modules):
    """The tensor node that ``node`` mutates in place (its first argument), or None."""
    if node.op == "call_method":
        name = node.target
    elif node.op == "call_function":
        name = _fn_name(node)
        if _inplace_flag(node) is not None:
            return _first_node(node)
        if getattr(node.target, "__module__", None) == "_operator" and name in _OPERATOR_INPLACE:
            return _first_node(node)                          # operator.iadd & co.
        if name in ("setitem", "__setitem__"):
            return _first_node(node)
    elif node.op == "call_module":
        mod = modules.get(node.target)
        # torch.nn's modules with inplace=True overwrite their input (ReLU, Hardtanh, ELU, ...)
        if mod is not None and getattr(mod, "inplace", False) is True and \
                type(mod).__module__.startswith("torch.nn") and not isinstance(mod, _ALIAS_MODULES):
            return _first_node(node)
        return None
    else:
        return None
    if name.endswith("_") and not name.endswith("__"):
        return _first_node(node)
    return None


def _aliases(node, modules):
    if node.op == "call_method":
        return node.target in _ALIAS_METHODS
    if node.op == "call_function":
        return _fn_name(node) in _ALIAS_FUNCTION_NAMES
    if node.op == "call_module":
        return isinstance(modules.get(node.target), _ALIAS_MODULES)
    return False


def _same(node, modules):
    if node.op == "call_module":
        return isinstance(modules.get(node.target), _SAME_MODULES)
    name = node.target if node.op == "call_method" else _fn_name(node)
    return node.op in ("call_method", "call_function") and name in _SAME_NAMES


def _out_of_place(node):
    """Rewrite an in-place node to its out-of-place form, where that form has a rule."""
    from srd_fx import rules
    if node.op == "call_module":
        return                                   # the twin copies in-place modules out of place
    bound = _inplace_flag(node)
    if isinstance(bound, dict):
        node.kwargs = {**node.kwargs, "inplace": False}
        return
    if bound is not None:
        bound.arguments["inplace"] = False
        node.args, node.kwargs = tuple(bound.args), dict(bound.kwargs)
        return
    if node.op == "call_method":
        oop = node.target[:-1]
        if oop in rules._METHOD_RULES:
            node.target = oop
        return
    name = _fn_name(node)
    if node.op == "call_function" and name.endswith("_"):
        for home in (torch, torch.nn.functional, torch.Tensor):
            if getattr(home, name, None) is node.target:
                oop = getattr(home, name[:-1], None)
                if oop is not None and oop in rules._FUNCTION_RULES:
                    node.target = oop
                return
    elif node.op == "call_function" and getattr(node.target, "__module__", None) == "_operator":
        import operator
        oop = getattr(operator, name[1:], None)
        if name in _OPERATOR_INPLACE and oop is not None and oop in rules._FUNCTION_RULES:
            node.target = oop


def functionalise_inplace(gm: fx.GraphModule) -> fx.GraphModule:
    """Make the data flow of in-place ops explicit: the readers of a mutated tensor that come
    after the mutation read the in-place node instead (so do the readers of the same tensor under
    another name: the input of an eval-mode dropout or identity), and the node becomes its
    out-of-place form.  A mutation that eager PyTorch would make visible through another alias (a
    view or slice of the tensor, or the tensor a view was taken from) cannot be expressed this
    way: it is refused with UnsupportedOpError."""
    modules = dict(gm.named_modules())
    nodes = list(gm.graph.nodes)
    pos = {n: i for i, n in enumerate(nodes)}
    base, ident = {}, {}
    muts = {}
    for n in nodes:
        t = _mutated(n, modules)
        src = _first_node(n)
        if t is not None:
            muts[n] = t
        base[n] = base.get(src, src) if (t is not None or _aliases(n, modules)) and src is not None else n
        ident[n] = ident.get(src, src) if (t is not None or _same(n, modules)) and src is not None else n
    if not muts:
        return gm
    for n, t in muts.items():
        t = _first_node(n)                       # may have been rewritten by an earlier mutation
        what = f"{n.target if n.op != 'call_function' else _fn_name(n)}"
        if _fn_name(n) in ("setitem", "__setitem__"):
            raise UnsupportedOpError(
                f"node {n.name!r} assigns into a tensor in place ({t.name}[...] = ...), which srd_fx "
                "cannot follow: write it out of place (e.g. torch.cat of the parts, or torch.where).")
        if t.op == "get_attr":
            raise UnsupportedOpError(
                f"node {n.name!r} ({what}) modifies the parameter/buffer {t.target!r} in place during "
                "forward; srd_fx explains a fixed function: make the op out-of-place.")
        i = pos[n]
        same = [m for m in nodes[:i] if m is not t and ident.get(m) is ident[t]]
        aliases = [m for m in nodes[:i] if m is not t and base.get(m) is base[t] and m not in same]
        late = [m for m in aliases if any(pos[u] > i for u in m.users)]
        if late:
            raise UnsupportedOpError(
                f"node {n.name!r} ({what}) modifies {t.name!r} in place, and the change is visible "
                f"through another view of the same storage ({late[0].name!r}) that is read later; "
                "srd_fx cannot follow in-place writes through views. Make the op out-of-place "
                f"(e.g. {what.rstrip('_')}(...) instead of {what}(...), or inplace=False).")
        for m in [t] + same:
            for u in list(m.users):
                if u is not n and pos[u] > i:
                    u.replace_input_with(m, n)
        _out_of_place(n)
    gm.graph.lint()
    gm.recompile()
    return gm


class NodeFailure(Exception):
    """A node of the traced graph raised while running the example (``node``, the exception as
    ``__cause__``)."""

    def __init__(self, node: fx.Node, error: BaseException):
        super().__init__(f"{type(error).__name__}: {error}")
        self.node, self.error = node, error


def shape_prop(gm: fx.GraphModule, example: torch.Tensor):
    """Record every node's tensor metadata (shapes drive layout and gate analysis); returns the
    graph's output on ``example``.  A node that fails raises :class:`NodeFailure` carrying the node
    and the original exception (torch's ShapeProp would print a traceback and keep only its own
    wrapper message)."""
    from torch.fx.passes.shape_prop import ShapeProp, _extract_tensor_metadata
    from torch.fx.node import map_aggregate

    class _ShapeProp(ShapeProp):
        def run_node(self, n):
            try:
                result = fx.Interpreter.run_node(self, n)
            except Exception as e:
                raise NodeFailure(n, e) from e
            found = []

            def extract(o):
                if isinstance(o, torch.Tensor):
                    found.append(o)
                    return _extract_tensor_metadata(o)
                return o

            meta = map_aggregate(result, extract)
            if found:
                n.meta["tensor_meta"] = meta
            n.meta["type"] = type(result)
            return result

    sp = _ShapeProp(gm)
    sp.extra_traceback = False
    with torch.no_grad():
        return sp.propagate(example)


def check_trace_matches(model: nn.Module, example: torch.Tensor, traced_out) -> None:
    """Raise TraceError if the traced graph's output on ``example`` differs from ``model``'s.

    What torch.fx cannot see makes the graph compute another function: an in-place op on a
    tensor that a second Python name still refers to (``out = a; out += f(a)``, then ``a``),
    Python-side state, or randomness.  Every explanation of such a graph would be wrong."""
    from torch.utils._pytree import tree_leaves
    with torch.no_grad():
        ref = model(example.clone())
    got_l = [t for t in tree_leaves(traced_out) if isinstance(t, torch.Tensor)]
    ref_l = [t for t in tree_leaves(ref) if isinstance(t, torch.Tensor)]
    if len(got_l) != len(ref_l):
        bad = f"{len(got_l)} output tensor(s) instead of {len(ref_l)}"
    else:
        bad = None
        for g, r in zip(got_l, ref_l):
            if g.shape != r.shape:
                bad = f"an output of shape {tuple(g.shape)} instead of {tuple(r.shape)}"
                break
            if not r.is_floating_point() or not bool(torch.isfinite(r).all()):
                continue
            rtol = {torch.float64: 1e-6, torch.float32: 1e-3}.get(r.dtype, 5e-2)
            err = (g.double() - r.double()).abs().max().item() if r.numel() else 0.0
            scale = r.double().abs().max().item() if r.numel() else 0.0
            if not err <= rtol * scale + 1e-30:
                bad = f"outputs differing by up to {err:.3g} (the model's largest is {scale:.3g})"
                break
    if bad is not None:
        raise TraceError(
            f"the graph traced from {type(model).__name__} does not compute what the model computes "
            f"on this input ({bad}). torch.fx missed something the forward does: most often an "
            "in-place op on a tensor that another Python name still refers to (`out = a; out += f(a)` "
            "and `a` read afterwards), Python-side state, or randomness. Write that op out of place "
            "(`out = a + f(a)`); pass check=False to skip this test.")


def encoder_node(gm: fx.GraphModule) -> Optional[fx.Node]:
    for n in gm.graph.nodes:
        if n.meta.get(ENCODER_TAG):
            return n
    return None


def encoder_items(gm: fx.GraphModule) -> list:
    """The tensors of a ``forward_features`` that returns a list, in the list's order ([] else)."""
    items = {}
    for n in gm.graph.nodes:
        for i in n.meta.get(ENCODER_LIST_TAG, ()):
            items[i] = n
    return [items[i] for i in sorted(items)] if sorted(items) == list(range(len(items))) else []
