"""The rule contract (:class:`Rule` and its ready-made kinds), the argument reader the rules use
and the registry that maps a traced node to its rule.  See the package docstring and docs/rules.md."""
from __future__ import annotations

import inspect
from typing import Any, Callable, Dict, Optional, Tuple, Union

import torch.nn as nn

# ---------------------------------------------------------------------------------------------
# base classes
# ---------------------------------------------------------------------------------------------


class Rule:
    """Base rule: the whole contract between the compiler and a rule.

    The analysis (``srd_fx.compiler.analysis.GraphInfo``) reads the class attributes and calls
    ``layout`` and ``is_global_reduction`` with itself as ``b``; the twin builder
    (``srd_fx.compiler.twin.Builder``) calls the other methods with itself as ``b``.  Nothing
    else is read from a rule.
    """

    #: "affine" (inside affine blocks), "activation" (an element-wise nonlinearity: a block
    #: boundary, SPEC §1) or "meta" (a node that produces no tensor: ``x.size()``, shape arithmetic).
    kind = "affine"
    #: The flavour within an op family, for rules that handle several ("max"/"avg" pooling,
    #: "ln"/"gn" normalisation); None for the others.
    variant: Optional[str] = None
    #: True when the op maps zero inputs to zero (no bias term of its own).
    linear = True
    #: True when the op's positions are its input's positions (shadow and its transpose are
    #: the identity on one-channel maps).
    pointwise = True
    #: Positions of the arguments that may carry relevance (the others are constants of the
    #: op, even when they depend on the input); None: every tensor argument.
    main_args: Optional[Tuple[int, ...]] = None
    #: Positions of the two factors of a product (``a * c``, ``a @ c``): when both depend on the
    #: input, the analysis picks the one that is a gate (a recorded constant); () for other ops.
    gate_args: Tuple[int, ...] = ()
    #: With ``gate_args``: only the second factor (a divisor) may be the gate.
    divisor_only = False

    # -- analysis ----------------------------------------------------------------------------
    def layout(self, b, node):
        """Channel axes of the output (a tuple).  Default: those of the first main input."""
        ins = b.main_inputs(node)
        return b.caxes(ins[0]) if ins else (1,)

    def is_global_reduction(self, b, node) -> bool:
        """True when the op reduces every spatial position into one (a candidate for the start
        of the head, SPEC §1: the encoder output L is its input)."""
        return False

    # -- forward -----------------------------------------------------------------------------
    def record(self, b, node):
        """Emit the forward op; return the twin node holding the op's output value."""
        return b.copy(node)

    # -- transposed linear part ------------------------------------------------------------
    def transpose(self, b, node, g):
        """Return a list, aligned with ``b.main_inputs(node)``, of ``Lin^T g`` per input.

        The default is autograd's vector-Jacobian product of the op itself (correct for any
        op that is linear in its main inputs given the recorded constants)."""
        return b.vjp(node, g)

    # -- structural receptive field (bias share) -------------------------------------------
    def shadow(self, b, node, ms):
        """Forward shadow: one-channel maps of the main inputs -> one-channel map of the output."""
        if self.pointwise:
            return b.sum_maps([b.map_to_output(m, node) for m in ms])
        raise NotImplementedError(f"{type(self).__name__}.shadow")

    def shadow_T(self, b, node, m):
        """Transposed shadow: a one-channel map of the output -> a list of maps, one per main input."""
        if self.pointwise:
            return [b.map_to_input(m, i, node) for i in b.main_inputs(node)]
        raise NotImplementedError(f"{type(self).__name__}.shadow_T")

    # -- bias (the op on zero inputs, with the recorded constants) -------------------------
    def channel_map(self, b, node) -> bool:
        """True when the op maps each position's channel vector on its own (a linear layer on the
        channel axis): then ``<A z + c, s>_j = <z, A^T s>_j + <c, s>_j`` at every position ``j``, and
        the compiler forms a block's bias relevance from the transpose it computes anyway instead
        of applying the op to the bias flowing in.  Default: False."""
        return False

    def bias(self, b, node, zs):
        """``zs`` aligned with the main inputs: a twin node (the bias flowing in) or None
        (structurally zero).  Return a twin node or None."""
        if self.linear and all(z is None for z in zs):
            return None
        return b.apply_with_inputs(node, zs)


class Affine(Rule):
    """A generic op that is linear (or affine, ``linear=False``) in its main inputs.

    Its transpose is autograd's VJP.

    Parameters
    ----------
    linear
        True when the op maps zero inputs to zero; False when it has a bias of its own.
    pointwise
        True when the op keeps positions (element-wise, per-channel ops); otherwise give ``shadow``
        and ``shadow_T``.
    shadow
        ``f(b, node, ms) -> node``: the op's forward shadow on one-channel maps (see :meth:`Rule.shadow`).
    shadow_T
        ``f(b, node, m) -> list``: its transpose (see :meth:`Rule.shadow_T`).
    """

    def __init__(self, linear: bool = True, pointwise: bool = True, shadow: Optional[Callable] = None,
                 shadow_T: Optional[Callable] = None) -> None:
        self.linear = linear
        self.pointwise = pointwise
        self._shadow, self._shadow_T = shadow, shadow_T

    def shadow(self, b, node, ms):
        """The ``shadow`` callable given to the constructor, else the base rule's."""
        if self._shadow is not None:
            return self._shadow(b, node, ms)
        return super().shadow(b, node, ms)

    def shadow_T(self, b, node, m):
        """The ``shadow_T`` callable given to the constructor, else the base rule's."""
        if self._shadow_T is not None:
            return self._shadow_T(b, node, m)
        return super().shadow_T(b, node, m)


class Meta(Rule):
    """A node whose value is not a tensor (sizes, shapes, integer arithmetic)."""

    kind = "meta"


class Activation(Rule):
    """An element-wise nonlinearity (an activation layer of SPEC §1).

    Parameters
    ----------
    fn
        The out-of-place functional form used in the twin's forward (so that the pre-activation
        tensor is kept intact even when the model uses an in-place form); None: the op as traced.
    gate_capable
        True for sigmoid-like functions, which become gates when they scale another tensor.
    name
        A readable name for messages (default: ``fn``'s name).
    """

    kind = "activation"
    #: The out-of-place functional form the twin's forward calls in place of an in-place function
    #: (None: the op as traced).
    fn: Optional[Callable] = None
    #: Sigmoid-like: a gate (a constant of the block, SPEC §2) when its output scales another tensor.
    gate_capable = False
    #: A readable name for messages (a name containing "softmax" marks a softmax).
    name: Optional[str] = None

    def __init__(self, fn: Optional[Callable] = None, gate_capable: bool = False,
                 name: Optional[str] = None) -> None:
        self.fn = fn
        self.gate_capable = gate_capable
        self.name = name or (getattr(fn, "__name__", None) if fn is not None else None)

    def record(self, b, node):
        """Emit the op out of place (an in-place activation would overwrite its pre-activation)."""
        return b.copy_out_of_place(node)


def arg(node, index: int, name: str, default: Any = None) -> Any:
    """The argument ``name`` of a call node as the op receives it: positional argument ``index``
    when the call passes that many, else the keyword ``name``, else ``default``.  The one way
    rules read a node's arguments (the values are fx nodes or constants, as in ``node.args``)."""
    if len(node.args) > index:
        return node.args[index]
    return node.kwargs.get(name, default)


# ---------------------------------------------------------------------------------------------
# registry
# ---------------------------------------------------------------------------------------------

_MODULE_RULES: Dict[type, Rule] = {}
_FUNCTION_RULES: Dict[Any, Rule] = {}
_METHOD_RULES: Dict[str, Rule] = {}


def register_rule(target: Union[type, Callable, str], rule: Rule, *, override: bool = True) -> Rule:
    """Teach the compiler an op.

    A registered module type becomes a leaf of the trace.

    Parameters
    ----------
    target
        An ``nn.Module`` subclass (matches ``call_module`` nodes of that type and its subclasses), a
        function (``call_function`` nodes, e.g. ``torch.relu``), or a string ``"method:name"`` / plain
        method name (``call_method`` nodes, e.g. ``"view"``).
    rule
        The rule: an :class:`Affine`, an :class:`Activation` or a :class:`Rule` subclass instance.
    override
        Replace a rule already registered for ``target`` (False: refuse).

    Returns
    -------
    Rule
        ``rule``.

    Raises
    ------
    TypeError
        If ``rule`` is not a ``Rule``, or ``target`` is neither a module class, a function nor a
        method name.
    KeyError
        If ``target`` has a rule already and ``override`` is False.
    """
    if not isinstance(rule, Rule):
        raise TypeError(f"register_rule expects a rules.Rule instance, got {type(rule).__name__}")
    if inspect.isclass(target) and issubclass(target, nn.Module):
        table, key = _MODULE_RULES, target
    elif isinstance(target, str):
        table, key = _METHOD_RULES, target.split(":", 1)[-1]
    elif callable(target):
        table, key = _FUNCTION_RULES, target
    else:
        raise TypeError(f"cannot register a rule for {target!r}: give a module class, a function "
                        "or 'method:<name>'")
    if key in table and not override:
        raise KeyError(f"a rule for {target!r} is already registered")
    table[key] = rule
    return rule


def lookup(node, modules: Dict[str, nn.Module]) -> Optional[Rule]:
    """The rule for an fx node, or None."""
    if node.op == "call_module":
        mod = modules[node.target]
        for cls in type(mod).__mro__:
            if cls in _MODULE_RULES:
                return _MODULE_RULES[cls]
        return None
    if node.op == "call_function":
        try:
            return _FUNCTION_RULES.get(node.target)
        except TypeError:  # unhashable target
            return None
    if node.op == "call_method":
        return _METHOD_RULES.get(node.target)
    return None


def registered():
    """All registered targets (for documentation and error messages)."""
    return {"modules": sorted(c.__name__ for c in _MODULE_RULES),
            "functions": sorted(getattr(f, "__name__", str(f)) for f in _FUNCTION_RULES),
            "methods": sorted(_METHOD_RULES)}
