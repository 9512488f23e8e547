"""The rule registry: how each op of a traced model takes part in SRD.

A rule answers four questions about one fx node (SPEC.md §2, §7):

* ``record``    — which constants the forward pass must keep (max-pool indices, ...);
* ``transpose`` — the transposed linear part, ``g_in = Lin^T g_out`` (explicit ops, or a VJP);
* ``shadow`` / ``shadow_T`` — the structural 0/1 receptive field acting on one-channel maps,
  used for the bias share (Eq. 11), and its transpose;
* ``bias``      — the op evaluated with its recorded constants on (structurally) zero inputs,
  so that a block's bias ``b = F(0, ..., 0)`` is computed only where it is not zero.

Rules do not compute anything themselves: they *emit* nodes into the twin graph through the
builder ``b`` (see ``srd_fx.compiler.twin.Builder``), so that ``print(explainer.code)`` shows the SRD
backward as ordinary code.  Each op family lives in one module of this package.

Register a rule for a new op with :func:`register_rule` (re-exported as
``srd_fx.register_rule``)::

    import srd_fx
    from srd_fx.rules import Affine, Activation
    srd_fx.register_rule(MyScale, Affine())               # linear op that keeps positions
    srd_fx.register_rule(my_act_fn, Activation(my_act_fn))  # element-wise nonlinearity
"""
from .base import Activation, Affine, Meta, Rule, arg, lookup, register_rule, registered  # noqa: F401
from .base import _FUNCTION_RULES, _METHOD_RULES, _MODULE_RULES  # noqa: F401  (the tables, for the tracer)

# Populate the registry: one module per op family.
from . import activations, conv, linear, norm, pool, elementwise, shape  # noqa: E402,F401
from . import attention, products  # noqa: E402,F401

__all__ = ["Rule", "Affine", "Activation", "Meta", "arg", "register_rule", "lookup", "registered"]
