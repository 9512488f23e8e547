"""Linear layers (``nn.Linear``, ``F.linear``): act on the last (channel) axis only.

transpose: ``g @ W``; shadow: identity (a linear layer keeps positions; flattening space is
the job of the flatten/reshape rule, which connects every position).
"""
import torch
import torch.nn as nn
import torch.nn.functional as F

from .base import Rule, arg, register_rule


def linear_T(g, weight):
    return g.matmul(weight)


def linear_ones(m, weight):
    """unit="neuron": every output neuron is connected to every input neuron."""
    return m.matmul(torch.ones_like(weight).t())


def row_bias(bias, rank):
    return bias.reshape((1,) * (rank - 1) + (-1,))


class Linear(Rule):
    def spec(self, b, node):
        if node.op == "call_module":
            return node.args[0], b.param(node, "weight"), b.module(node).bias is not None
        return node.args[0], b.val(arg(node, 1, "weight")), arg(node, 2, "bias") is not None

    def layout(self, b, node):
        return (len(b.shape(node)) - 1,)

    def transpose(self, b, node, g):
        return [b.call(linear_T, g, self.spec(b, node)[1])]

    def shadow(self, b, node, ms):
        if b.unit == "neuron":
            return b.call(linear_ones, ms[0], self.spec(b, node)[1])
        return ms[0]

    def shadow_T(self, b, node, m):
        if b.unit == "neuron":
            return [b.call(linear_T, m, b.call(torch.ones_like, self.spec(b, node)[1]))]
        return [m]

    def bias(self, b, node, zs):
        if zs[0] is None:
            if not self.spec(b, node)[2]:
                return None
            bias = b.param(node, "bias") if node.op == "call_module" else b.val(arg(node, 2, "bias"))
            return b.call(row_bias, bias, len(b.shape(node)))
        return b.apply_with_inputs(node, zs)


register_rule(nn.Linear, Linear())
register_rule(F.linear, Linear())
