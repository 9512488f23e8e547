"""Element-wise ops inside blocks: add/sub (residuals, ``+=``), multiplication by a constant or
a gate, division by a constant, negation, and the identities (dropout in eval, Identity,
contiguous, clone, dtype casts).  All keep positions."""
import operator

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..compiler import runtime as ops

from .base import Affine, Rule, arg, register_rule


def _operands(node):
    return [arg(node, 0, "input"), arg(node, 1, "other")]


class Identity(Rule):
    def transpose(self, b, node, g):
        return [g]

    def bias(self, b, node, zs):
        return zs[0]


class AddSub(Rule):
    """``a + b`` / ``a - b`` with tensors or constants; broadcast operands are summed back."""

    def __init__(self, sign):
        self.sign = sign

    def transpose(self, b, node, g):
        a, c = _operands(node)
        out = []
        for i in b.main_inputs(node):
            gi = g if (i is a or self.sign > 0) else b.call(torch.neg, g)
            out.append(b.unbroadcast(gi, i, node))
        return out

    def bias(self, b, node, zs):
        a, c = _operands(node)
        consts = [x for x in (a, c) if x not in b.main_inputs(node)]
        has_const = any(not (isinstance(x, (int, float)) and x == 0) for x in consts)
        if all(z is None for z in zs) and not has_const:
            return None
        return b.apply_with_inputs(node, zs)

    def shadow(self, b, node, ms):
        return b.sum_maps([b.map_to_output(m, node) for m in ms])


class Mul(Rule):
    """``a * c`` where ``c`` is a constant or a gate (a recorded constant of the forward pass)."""
    gate_args = (0, 1)

    def _factor(self, b, node):
        a, c = _operands(node)
        mains = b.main_inputs(node)
        return (a, c) if a in mains else (c, a)

    def transpose(self, b, node, g):
        x, f = self._factor(b, node)
        return [b.unbroadcast(b.call(torch.mul, g, b.val(f)), x, node)]

    def bias(self, b, node, zs):
        x, f = self._factor(b, node)
        return None if zs[0] is None else b.call(torch.mul, zs[0], b.val(f))


class Div(Rule):
    """``a / c`` with a constant (or gate / statistic) divisor."""
    gate_args = (0, 1)
    divisor_only = True

    def transpose(self, b, node, g):
        a, c = _operands(node)
        return [b.unbroadcast(b.call(torch.div, g, b.val(c)), a, node)]

    def bias(self, b, node, zs):
        a, c = _operands(node)
        return None if zs[0] is None else b.call(torch.div, zs[0], b.val(c))


class Neg(Rule):
    def transpose(self, b, node, g):
        return [b.call(torch.neg, g)]

    def bias(self, b, node, zs):
        return None if zs[0] is None else b.call(torch.neg, zs[0])


for t in (operator.add, operator.iadd, torch.add, "method:add", "method:add_"):
    register_rule(t, AddSub(+1))
for t in (operator.sub, operator.isub, torch.sub, "method:sub", "method:sub_"):
    register_rule(t, AddSub(-1))
for t in (operator.mul, operator.imul, torch.mul, "method:mul", "method:mul_"):
    register_rule(t, Mul())
for t in (operator.truediv, operator.itruediv, torch.div, "method:div", "method:div_"):
    register_rule(t, Div())
for t in (operator.neg, torch.neg, "method:neg"):
    register_rule(t, Neg())


class AddCMul(Rule):
    """``addcmul(input, t1, t2, value)`` = input + value * t1 * t2, one factor a constant or gate
    (ConvNeXt-V2's global response normalisation)."""
    gate_args = (1, 2)

    def bias(self, b, node, zs):
        return b.apply_with_inputs(node, zs)


for t in (torch.addcmul, "method:addcmul"):
    register_rule(t, AddCMul())

_identity = Identity()
for cls in (nn.Identity, nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout):
    register_rule(cls, _identity)
for t in (F.dropout, F.dropout2d, "method:contiguous", "method:clone", torch.clone):
    register_rule(t, _identity)
try:  # torchvision's stochastic depth (fx-wrapped): the identity outside training mode
    from torchvision.ops import stochastic_depth as _stochastic_depth
    register_rule(_stochastic_depth, _identity)
except ImportError:  # pragma: no cover - torchvision is optional for the compiler
    pass
for t in ("method:float", "method:double", "method:half", "method:to", "method:type_as",
          "method:bfloat16"):
    register_rule(t, Affine())
