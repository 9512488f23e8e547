"""Convolutions: Conv1d/2d/3d, module and functional (stride, padding, dilation, groups).

transpose: ``conv_transpose`` with the same stride/padding/dilation/groups (``srd_fx.compiler.runtime.conv_T``);
shadow:    a ones kernel of the same size, stride, padding and dilation on one-channel maps.
"""
import torch
import torch.nn as nn
import torch.nn.functional as F

from ..compiler import runtime as ops

from .base import Rule, arg, register_rule
from .windows import same_window_shadow, same_window_shadow_T, window_shadow, window_shadow_T


def channel_bias(bias, rank):
    """A per-channel bias as a broadcastable (1, C, 1, ...) tensor."""
    return bias.reshape((1, -1) + (1,) * (rank - 2))


def _zero_padded(b, node):
    """The (transposed) convolution module of ``node``; padding modes other than zeros are refused."""
    m = b.module(node)
    if m.padding_mode != "zeros":
        b.unsupported(node, f"padding_mode={m.padding_mode!r} (only zero padding)")
    return m


def _conv_bias(b, node, zs, has_bias):
    """A (transposed) convolution's output for the bias flowing in: with none, conv(0) + bias is the
    bias at every position (zero padding adds nothing); otherwise the op applied to it."""
    if zs[0] is None:
        if not has_bias:
            return None
        bias = b.param(node, "bias") if node.op == "call_module" else b.val(arg(node, 2, "bias"))
        return b.call(channel_bias, bias, len(b.shape(node)))
    return b.apply_with_inputs(node, zs)


class Conv(Rule):
    pointwise = False

    def spec(self, b, node):
        """(input node, weight twin node, has_bias, stride, padding, dilation, groups, kernel)."""
        if node.op == "call_module":
            m = _zero_padded(b, node)
            return (node.args[0], b.param(node, "weight"), m.bias is not None, m.stride,
                    m.padding, m.dilation, m.groups, m.kernel_size)
        x = node.args[0]
        w = arg(node, 1, "weight")
        bias = arg(node, 2, "bias")
        kernel = tuple(b.shape(w)[2:])
        return (x, b.val(w), bias is not None, arg(node, 3, "stride", 1), arg(node, 4, "padding", 0),
                arg(node, 5, "dilation", 1), arg(node, 6, "groups", 1), kernel)

    def layout(self, b, node):
        # spatial axes that carry channels (a 1x1 convolution over a state axis that a contraction
        # over positions made a channel axis, EfficientViM's hidden state) stay channels
        ins = b.main_inputs(node)
        return (1,) + (tuple(d for d in b.caxes(ins[0]) if d >= 2) if ins else ())

    def _no_positions(self, b, node):
        """True when the input has no position axis (one PFV): the shadow is the identity."""
        x = self.spec(b, node)[0]
        spatial = set(range(2, len(b.shape(x))))
        cax = set(b.caxes(x))
        if spatial <= cax:
            return True
        if spatial & cax:
            b.unsupported(node, "a convolution over a mix of position and channel axes")
        return False

    def _padding(self, b, node):
        """Integer padding, or explicit F.pad amounts for an asymmetric padding='same'."""
        x, _, _, stride, padding, dilation, _, kernel = self.spec(b, node)
        if padding == "valid":
            return 0, None
        if padding == "same":
            nd = len(b.shape(node)) - 2
            k = kernel if isinstance(kernel, (tuple, list)) else (kernel,) * nd
            d = dilation if isinstance(dilation, (tuple, list)) else (dilation,) * nd
            totals = [di * (ki - 1) for ki, di in zip(k, d)]
            if all(t % 2 == 0 for t in totals):
                return tuple(t // 2 for t in totals), None
            return None, True
        return padding, None

    def transpose(self, b, node, g):
        x, w, _, stride, _, dilation, groups, _ = self.spec(b, node)
        p, asym = self._padding(b, node)
        if asym:  # asymmetric 'same': let autograd transpose it
            return b.vjp(node, g)
        scale = _bn_scale_of(g)
        if scale is not None:  # conv -> batch norm: the scale goes into the weight (a constant,
            # folded at build time); g * scale is left to dead-code elimination (another path may read it)
            w = b.call(ops.scale_out_channels, w, scale, name=f"{node.name}_weight_T")
            return [b.call(ops.conv_T, g.args[0], b.val(x), w, stride, p, dilation, groups)]
        return [b.call(ops.conv_T, g, b.val(x), w, stride, p, dilation, groups)]

    @staticmethod
    def _identity_window(kernel, stride, p, dilation):
        """A 1x1 window with stride 1 and no padding: the shadow is the identity."""
        flat = lambda v: list(v) if isinstance(v, (tuple, list)) else [v]  # noqa: E731
        return isinstance(p, (int, tuple, list)) and all(v == 1 for v in flat(kernel) + flat(stride) + flat(dilation)) \
            and not any(flat(p))

    def shadow(self, b, node, ms):
        if self._no_positions(b, node):
            return ms[0]
        x, w, _, stride, _, dilation, groups, kernel = self.spec(b, node)
        p, asym = self._padding(b, node)
        if asym:
            pads = b.call(ops.torch_same_pads, b.val(x), kernel, dilation)
            if b.unit == "neuron":
                b.unsupported(node, "asymmetric padding='same' with unit='neuron'")
            return b.call(ops.padded_window_sum, ms[0], pads, kernel, stride, dilation, b.size_of(node))
        if b.unit == "neuron":
            return b.call(ops.conv_ones, ms[0], b.val(x), w, stride, p, dilation, groups)
        if self._identity_window(kernel, stride, p, dilation):
            return ms[0]
        return window_shadow(b, node, ms[0], kernel, stride, p, dilation, b.size_of(node))

    def shadow_T(self, b, node, m):
        if self._no_positions(b, node):
            return [m]
        x, w, _, stride, _, dilation, groups, kernel = self.spec(b, node)
        padding, asym = self._padding(b, node)
        if asym:
            pads = b.call(ops.torch_same_pads, b.val(x), kernel, dilation)
            return b.vjp_shadow(ops.padded_window_sum, (pads, kernel, stride, dilation, b.size_of(node)), m, x)
        if b.unit == "neuron":
            return [b.call(ops.conv_ones_T, m, b.val(x), w, stride, padding, dilation, groups)]
        if self._identity_window(kernel, stride, padding, dilation):
            return [m]
        return window_shadow_T(b, node, m, kernel, stride, padding, dilation)

    def bias(self, b, node, zs):
        return _conv_bias(b, node, zs, self.spec(b, node)[2])


class ConvTranspose(Rule):
    """Transposed convolutions (ConvTranspose1d/2d/3d, module and functional): every input
    position is spread over an output window.

    transpose: autograd's (a convolution with the same weight); shadow: the transpose of the
    window sum of the convolution that has this op as its transpose (same kernel, stride,
    padding, dilation: output position j is reached from input position i exactly when the
    convolution's window at i covers j); output padding only adds positions at the end."""
    pointwise = False

    def spec(self, b, node):
        """(input node, has_bias, stride, padding, dilation, kernel)."""
        if node.op == "call_module":
            m = _zero_padded(b, node)
            return node.args[0], m.bias is not None, m.stride, m.padding, m.dilation, m.kernel_size
        w = arg(node, 1, "weight")
        return (node.args[0], arg(node, 2, "bias") is not None, arg(node, 3, "stride", 1),
                arg(node, 4, "padding", 0), arg(node, 7, "dilation", 1), tuple(b.shape(w)[2:]))

    def layout(self, b, node):
        return (1,)

    def shadow(self, b, node, ms):
        x, _, stride, padding, dilation, kernel = self.spec(b, node)
        if b.unit == "neuron":
            b.unsupported(node, "a transposed convolution with unit='neuron'")
        return b.call(ops.window_sum_T, ms[0], kernel, stride, padding, dilation, b.size_of(node))

    def shadow_T(self, b, node, m):
        x, _, stride, padding, dilation, kernel = self.spec(b, node)
        return [b.call(ops.window_sum, m, kernel, stride, padding, dilation, b.size_of(x))]

    def bias(self, b, node, zs):
        return _conv_bias(b, node, zs, self.spec(b, node)[1])


_conv_t = ConvTranspose()
for cls in (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d):
    register_rule(cls, _conv_t)
for fn in (F.conv_transpose1d, F.conv_transpose2d, F.conv_transpose3d):
    register_rule(fn, _conv_t)


def _bn_scale_of(g):
    """The batch-norm scale when ``g`` is the ``g * bn_scale`` of a batch norm's transpose
    (srd_fx/rules/norm.py), else None."""
    from .norm import bn_scale
    if getattr(g, "op", None) != "call_function" or g.target is not torch.mul or len(g.args) != 2 \
            or g.kwargs:
        return None
    sc = g.args[1]
    return sc if getattr(sc, "op", None) == "call_function" and sc.target is bn_scale else None


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
        return same_window_shadow(b, node, ms[0], k, s, d)

    def shadow_T(self, b, node, m):
        k, s, d = self._geo(b, node)
        return same_window_shadow_T(b, node, m, k, s, d)

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


class CondConv(Rule):
    """timm's CondConv2d (leaf): per-sample kernels mixed by routing weights, which are recorded
    constants (a gate on the kernel), so the op is linear in its input."""
    pointwise = False
    main_args = (0,)

    def layout(self, b, node):
        return (1,)

    def _geo(self, b, node):
        m = b.module(node)
        return m.kernel_size, m.stride, m.padding, m.dilation, m.dynamic_padding

    def shadow(self, b, node, ms):
        k, s, p, d, dyn = self._geo(b, node)
        if dyn:
            return same_window_shadow(b, node, ms[0], k, s, d)
        return window_shadow(b, node, ms[0], k, s, p, d)

    def shadow_T(self, b, node, m):
        k, s, p, d, dyn = self._geo(b, node)
        if dyn:
            return same_window_shadow_T(b, node, m, k, s, d)
        return window_shadow_T(b, node, m, k, s, p, d)

    def bias(self, b, node, zs):
        mod = b.module(node)
        if zs[0] is None:
            if mod.bias is None:
                return None
            return b.call(cond_bias, b.val(node.args[1]), b.param(node, "bias"))
        sub = b.call(materialize_batch, zs[0], b.val(node.args[0]))
        return b.g.create_node("call_module", node.target, (sub, b.val(node.args[1])), {})


def cond_bias(routing, bias):
    return (routing @ bias)[:, :, None, None]


@ops.shape_args(1)
def materialize_batch(z, like):
    return z.expand(like.shape)


def _register_condconv():
    import importlib
    try:
        mod = importlib.import_module("timm.layers.cond_conv2d")
    except Exception:
        return
    register_rule(mod.CondConv2d, CondConv())


_register_condconv()
