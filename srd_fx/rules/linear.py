"""Linear layers (``nn.Linear``, ``F.linear``): act on the last (channel) axis only.

transpose: ``g @ W``; shadow: identity (a linear layer keeps positions; flattening space is
the job of the flatten/reshape rule, which connects every position).
"""
import torch
import torch.nn as nn
import torch.nn.functional as F

from .base import Rule, arg, register_rule
from .attention import layout_axes


def linear_T(g, weight):
    return g.matmul(weight)


def linear_ones(m, weight):
    """unit="neuron": every output neuron is connected to every input neuron."""
    return m.matmul(torch.ones_like(weight).t())


def mix_positions(m, weight):
    """All-to-all shadow along the last axis (a position axis): every output position sums the
    map over every input position."""
    return m.sum(-1, keepdim=True).expand(*m.shape[:-1], weight.shape[0])


def mix_positions_T(m, weight):
    return m.sum(-1, keepdim=True).expand(*m.shape[:-1], weight.shape[1])


def row_bias(bias, rank):
    return bias.reshape((1,) * (rank - 1) + (-1,))


class Linear(Rule):
    def spec(self, b, node):
        if node.op == "call_module":
            return node.args[0], b.param(node, "weight"), b.module(node).bias is not None
        return node.args[0], b.val(arg(node, 1, "weight")), arg(node, 2, "bias") is not None

    def token_mixing(self, b, node):
        """Applied along a position axis (MLP-Mixer's token mixing, gMLP's spatial projection):
        the output axis is a new position axis connected to every input position (SPEC §8)."""
        x = node.args[0]
        return b.is_tensor(x) and (len(b.shape(x)) - 1) not in layout_axes(b, x)

    def layout(self, b, node):
        if self.token_mixing(b, node):
            return layout_axes(b, node.args[0])
        return (len(b.shape(node)) - 1,)

    def transpose(self, b, node, g):
        return [b.call(linear_T, g, self.spec(b, node)[1])]

    def shadow(self, b, node, ms):
        if b.unit == "neuron":
            return b.call(linear_ones, ms[0], self.spec(b, node)[1])
        if self.token_mixing(b, node):
            return b.call(mix_positions, ms[0], self.spec(b, node)[1])
        return ms[0]

    def shadow_T(self, b, node, m):
        if b.unit == "neuron":
            return [b.call(linear_T, m, b.call(torch.ones_like, self.spec(b, node)[1]))]
        if self.token_mixing(b, node):
            return [b.call(mix_positions_T, m, self.spec(b, node)[1])]
        return [m]

    def channel_map(self, b, node):
        return b.unit != "neuron" and not self.token_mixing(b, node)

    def bias(self, b, node, zs):
        if zs[0] is None:
            if not self.spec(b, node)[2]:
                return None
            bias = b.param(node, "bias") if node.op == "call_module" else b.val(arg(node, 2, "bias"))
            return b.call(row_bias, bias, len(b.shape(node)))
        return b.apply_with_inputs(node, zs)


register_rule(nn.Linear, Linear())
register_rule(F.linear, Linear())
