"""Tracing: torch.fx with timm's no-trace lists, activation modules kept as leaves, and the
timm ``forward_features`` boundary tagged as the encoder output (SPEC §1)."""
from __future__ import annotations

import contextlib
from typing import Optional

import torch
import torch.fx as fx
import torch.nn as nn

from .errors import TraceError, TrainingModeError

ENCODER_TAG = "srd_encoder_output"


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
        import rules
        self._timm_modules, fns = _timm_lists()
        # plain-Python functions with a rule of their own (timm's swish, hard_sigmoid, ...) stay
        # single nodes instead of being traced into (x * sigmoid(x) would look like a gate)
        ruled = [f for f in rules._FUNCTION_RULES if inspect.isfunction(f)
                 and not (getattr(f, "__module__", "") or "").startswith("torch")]
        super().__init__(autowrap_functions=tuple(f for f in list(fns) + ruled if callable(f)))

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        own = type(m) in rules_exact()
        if own:
            return True
        if isinstance(m, self._timm_modules):
            return False
        return super().is_leaf_module(m, qualname)


def rules_exact():
    import rules
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


def _meta_tracer():
    from torch.fx.experimental.meta_tracer import MetaTracer

    class ShapeAwareTracer(MetaTracer, SRDTracer):
        """SRDTracer whose proxies carry meta tensors, so Python control flow on *shapes*
        (``if x.shape[-1] < 7``, as in timm's ConvMlp) resolves for the example's input size."""

    return ShapeAwareTracer()


def trace(model: nn.Module, example: Optional[torch.Tensor] = None) -> fx.GraphModule:
    """Trace ``model`` into a GraphModule, or raise TraceError saying how to fix it.

    Plain symbolic tracing first; if it fails and an example input is known, a shape-aware
    retrace specialised to the example's size (``gm.meta["srd_specialised"]`` holds it)."""
    check_eval(model)
    tracer = SRDTracer()
    try:
        with _tag_forward_features(model):
            graph = tracer.trace(model)
    except Exception as e:  # fx raises TraceError, TypeError, RuntimeError, ...
        if example is not None:
            import warnings
            try:
                import copy
                mt = _meta_tracer()
                name = next(iter(__import__("inspect").signature(model.forward).parameters))
                # trace a copy on the meta device (leaf modules then run on shapes only); the
                # graph's targets are qualified names, so it is bound to the real model after
                meta_model = copy.deepcopy(model).to("meta")
                with _tag_forward_features(meta_model), warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    graph = mt.trace(meta_model, meta_args={name: torch.empty(example.shape, dtype=example.dtype,
                                                                               device="meta")})
                gm = fx.GraphModule(model, graph, type(model).__name__)
                for n in gm.graph.nodes:  # meta values are not wanted downstream
                    n.meta.pop("tensor_meta", None)
                gm.meta["srd_specialised"] = tuple(example.shape)
                return gm
            except Exception:
                pass
        raise TraceError(
            f"torch.fx could not trace {type(model).__name__}: {type(e).__name__}: {e}\n"
            "srd_fx needs a model whose forward has no data-dependent Python control flow "
            "(if/for on tensor values, .item(), len() of a tensor, ...). Fix: move the "
            "data-dependent part out of forward, make the offending submodule a leaf with a rule "
            "(srd_fx.register_rule(ThatModule, rules.Affine(...))) or wrap the function with "
            "torch.fx.wrap.") from e
    return fx.GraphModule(tracer.root, graph, type(model).__name__)


def shape_prop(gm: fx.GraphModule, example: torch.Tensor) -> None:
    """Record every node's tensor metadata (shapes drive layout and gate analysis)."""
    from torch.fx.passes.shape_prop import ShapeProp
    with torch.no_grad():
        ShapeProp(gm).propagate(example)


def encoder_node(gm: fx.GraphModule) -> Optional[fx.Node]:
    for n in gm.graph.nodes:
        if n.meta.get(ENCODER_TAG):
            return n
    return None
