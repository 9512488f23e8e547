"""Convolutions: Conv1d/2d/3d, module and functional (stride, padding, dilation, groups).

transpose: ``conv_transpose`` with the same stride/padding/dilation/groups (``srd_fx.ops.conv_T``);
shadow:    a ones kernel of the same size, stride, padding and dilation on one-channel maps.
"""
import torch.nn as nn
import torch.nn.functional as F

from srd_fx import ops

from . import Rule, register_rule


def _arg(node, i, name, default):
    if len(node.args) > i:
        return node.args[i]
    return node.kwargs.get(name, default)


def channel_bias(bias, rank):
    """A per-channel bias as a broadcastable (1, C, 1, ...) tensor."""
    return bias.reshape((1, -1) + (1,) * (rank - 2))


class Conv(Rule):
    pointwise = False

    def spec(self, b, node):
        """(input node, weight twin node, has_bias, stride, padding, dilation, groups, kernel)."""
        if node.op == "call_module":
            m = b.module(node)
            if m.padding_mode != "zeros":
                b.unsupported(node, f"padding_mode={m.padding_mode!r} (only zero padding)")
            return (node.args[0], b.param(node, "weight"), m.bias is not None, m.stride,
                    m.padding, m.dilation, m.groups, m.kernel_size)
        x = node.args[0]
        w = _arg(node, 1, "weight", None)
        bias = _arg(node, 2, "bias", None)
        kernel = tuple(b.shape(w)[2:])
        return (x, b.val(w), bias is not None, _arg(node, 3, "stride", 1), _arg(node, 4, "padding", 0),
                _arg(node, 5, "dilation", 1), _arg(node, 6, "groups", 1), kernel)

    def layout(self, b, node):
        return (1,)

    def transpose(self, b, node, g):
        x, w, _, stride, padding, dilation, groups, _ = self.spec(b, node)
        if isinstance(padding, str):  # 'same' / 'valid': let autograd transpose it
            return b.vjp(node, g)
        return [b.call(ops.conv_T, g, b.val(x), w, stride, padding, dilation, groups)]

    def _padded(self, b, node, m):
        x, _, _, stride, padding, dilation, _, kernel = self.spec(b, node)
        if padding == "same":
            return b.call(F.pad, m, b.call(ops.same_padding, b.val(x), kernel, 1, dilation)), 0
        return m, (0 if padding == "valid" else padding)

    def shadow(self, b, node, ms):
        x, w, _, stride, padding, dilation, groups, kernel = self.spec(b, node)
        if b.unit == "neuron" and not isinstance(padding, str):
            return b.call(ops.conv_ones, ms[0], b.val(x), w, stride, padding, dilation, groups)
        m, p = self._padded(b, node, ms[0])
        return b.call(ops.window_sum, m, kernel, stride, p, dilation, b.val(node))

    def shadow_T(self, b, node, m):
        x, w, _, stride, padding, dilation, groups, kernel = self.spec(b, node)
        if isinstance(padding, str):
            b.unsupported(node, "string padding ('same'/'valid') in the bias share; use integer padding")
        if b.unit == "neuron":
            return [b.call(ops.conv_ones_T, m, b.val(x), w, stride, padding, dilation, groups)]
        return [b.call(ops.window_sum_T, m, kernel, stride, padding, dilation, b.val(x))]

    def bias(self, b, node, zs):
        has_bias = self.spec(b, node)[2]
        if zs[0] is None:
            # conv(0) + bias is the bias at every position (zero padding adds nothing)
            if not has_bias:
                return None
            bias = b.param(node, "bias") if node.op == "call_module" else b.val(_arg(node, 2, "bias", None))
            return b.call(channel_bias, bias, len(b.shape(node)))
        return b.apply_with_inputs(node, zs)


_conv = Conv()
for cls in (nn.Conv1d, nn.Conv2d, nn.Conv3d):
    register_rule(cls, _conv)
for fn in (F.conv1d, F.conv2d, F.conv3d):
    register_rule(fn, _conv)


class SameConv(Rule):
    """timm's Conv2dSame / StdConv2dSame / ScaledStdConv2dSame (leaves): dynamic TF 'SAME'
    padding; transposed by autograd (the module is linear in its input)."""
    pointwise = False

    def layout(self, b, node):
        return (1,)

    def _geo(self, b, node):
        m = b.module(node)
        return m.kernel_size, m.stride, m.dilation

    def shadow(self, b, node, ms):
        k, s, d = self._geo(b, node)
        return b.call(ops.same_window_sum, ms[0], b.val(node.args[0]), k, s, d, b.val(node))

    def shadow_T(self, b, node, m):
        k, s, d = self._geo(b, node)
        x = node.args[0]
        return b.vjp_shadow(ops.same_window_sum, (b.val(x), k, s, d, b.val(node)), m, x)

    def bias(self, b, node, zs):
        if zs[0] is None and b.module(node).bias is None:
            return None
        return b.apply_with_inputs(node, zs)


def _register_timm():
    import importlib
    try:
        conv2d_same = importlib.import_module("timm.layers.conv2d_same")
        std_conv = importlib.import_module("timm.layers.std_conv")
    except Exception:
        return
    for cls in (getattr(conv2d_same, "Conv2dSame", None), getattr(std_conv, "StdConv2dSame", None),
                getattr(std_conv, "ScaledStdConv2dSame", None)):
        if cls is not None:
            register_rule(cls, SameConv())


_register_timm()
