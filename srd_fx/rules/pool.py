"""Pooling: max (indices recorded), average, adaptive average/max, global means.

Max-pool: the forward records arg-max indices; the transpose scatters back to them (windows
may overlap), the bias is a gather at them.  Shadow of every pooling: sum over the *whole*
window (SPEC §2), including max-pool.
"""
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..compiler import runtime as ops

from .base import Rule, arg, register_rule
from .windows import (indices_T, indices_bias, record_indices, same_window_shadow, same_window_shadow_T,
                      window_shadow, window_shadow_T)


def _pool_params(b, node, variant):
    """(kernel, stride, padding, dilation, ceil_mode) of a max/avg pool node."""
    if node.op == "call_module":
        m = b.module(node)
        return (m.kernel_size, m.stride if m.stride is not None else m.kernel_size, m.padding,
                getattr(m, "dilation", 1), m.ceil_mode)
    k = arg(node, 1, "kernel_size")
    s = arg(node, 2, "stride") or k
    p = arg(node, 3, "padding", 0)
    if variant == "max":
        return k, s, p, arg(node, 4, "dilation", 1), arg(node, 5, "ceil_mode", False)
    return k, s, p, 1, arg(node, 4, "ceil_mode", False)


class _Pool(Rule):
    """Pooling over windows of positions: a window's PFVs flow into one PFV (channels on axis 1)."""
    pointwise = False

    def __init__(self, variant=None):
        if variant is not None:
            self.variant = variant

    def layout(self, b, node):
        return (1,)


class _WindowShadow(_Pool):

    def shadow(self, b, node, ms):
        k, s, p, d, _ = _pool_params(b, node, self.variant)
        return window_shadow(b, node, ms[0], k, s, p, d)

    def shadow_T(self, b, node, m):
        k, s, p, d, _ = _pool_params(b, node, self.variant)
        return window_shadow_T(b, node, m, k, s, p, d)


class MaxPool(_WindowShadow):
    variant = "max"

    def record(self, b, node):
        k, s, p, d, c = _pool_params(b, node, "max")
        if node.op == "call_function" and arg(node, 6, "return_indices", False):
            b.unsupported(node, "max_pool with return_indices=True in the model")
        return record_indices(b, node, ops.max_pool_record, k, s, p, d, c)

    def transpose(self, b, node, g):
        return indices_T(b, node, g, ops.max_pool_T, *_pool_params(b, node, "max"))

    def bias(self, b, node, zs):
        return indices_bias(b, node, zs[0])


class AvgPool(_WindowShadow):
    variant = "avg"


class AdaptivePool(_Pool):
    """Adaptive average / max pooling: windows follow PyTorch's start/end rule."""

    def is_global_reduction(self, b, node):
        return all(s == 1 for s in b.shape(node)[2:])

    def record(self, b, node):
        if self.variant != "max":
            return b.copy(node)
        size = b.module(node).output_size if node.op == "call_module" else arg(node, 1, "output_size")
        return record_indices(b, node, ops.adaptive_max_pool_record, size)

    @staticmethod
    def _identity(b, node):
        """Output as large as the input: every window is one position (torchvision's VGG at 224)."""
        return tuple(b.shape(node)) == tuple(b.shape(node.args[0]))

    def transpose(self, b, node, g):
        if self.variant == "max":
            return indices_T(b, node, g)
        return [g] if self._identity(b, node) else b.vjp(node, g)

    def bias(self, b, node, zs):
        if zs[0] is None:
            return None
        if self.variant == "max":
            return indices_bias(b, node, zs[0])
        return b.apply_with_inputs(node, zs)

    def _mats(self, b, node):
        x = node.args[0]
        return b.call(window_mats, b.val(x), b.val(node))

    def shadow(self, b, node, ms):
        return ms[0] if self._identity(b, node) else b.call(ops.separable_apply, ms[0], self._mats(b, node))

    def shadow_T(self, b, node, m):
        return [m] if self._identity(b, node) else [b.call(separable_apply_T, m, self._mats(b, node))]


def window_mats(x, out):
    nd = x.dim() - 2
    return [ops.adaptive_windows(x.shape[2 + i], out.shape[2 + i], x) for i in range(nd)]


def separable_apply_T(m, mats):
    return ops.separable_apply(m, [A.t() for A in mats])


for cls in (nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d):
    register_rule(cls, MaxPool())
for fn in (F.max_pool1d, F.max_pool2d, F.max_pool3d):
    register_rule(fn, MaxPool())
for cls in (nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d):
    register_rule(cls, AvgPool())
for fn in (F.avg_pool1d, F.avg_pool2d, F.avg_pool3d):
    register_rule(fn, AvgPool())
for cls in (nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d):
    register_rule(cls, AdaptivePool("avg"))
for fn in (F.adaptive_avg_pool1d, F.adaptive_avg_pool2d, F.adaptive_avg_pool3d):
    register_rule(fn, AdaptivePool("avg"))
for cls in (nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d):
    register_rule(cls, AdaptivePool("max"))
for fn in (F.adaptive_max_pool1d, F.adaptive_max_pool2d):
    register_rule(fn, AdaptivePool("max"))


# -------------------------------------------------------------- reductions over axes -----
def _dims(node, rank):
    d = arg(node, 1, "dim")
    if d is None:
        return tuple(range(rank))
    d = (d,) if isinstance(d, int) else tuple(d)
    return tuple(x % rank for x in d)


def reduce_map(m, dims, keepdim):
    return m.sum(dim=dims, keepdim=keepdim) if dims else m


@ops.shape_args(3)
def reduce_map_T(m, dims, keepdim, like, caxes):
    if not keepdim:
        for d in sorted(dims):
            m = m.unsqueeze(d)
    return ops.expand_map(m, like, caxes)


class Mean(Rule):
    """``mean``/``sum``/``amax`` over axes: spatial axes merge positions, channel axes are summed
    out of the PFV.  Mean over all spatial axes is a global spatial reduction (SPEC §1)."""
    pointwise = False

    def _spatial(self, b, node):
        x = node.args[0]
        rank = len(b.shape(x))
        dims = _dims(node, rank)
        return x, dims, tuple(d for d in dims if d not in b.caxes(x) and d != 0)

    def is_global_reduction(self, b, node):
        x, dims, sp = self._spatial(b, node)
        rank = len(b.shape(x))
        spatial_all = tuple(d for d in range(1, rank) if d not in b.caxes(x))
        return len(spatial_all) > 0 and set(spatial_all) <= set(dims)

    def layout(self, b, node):
        x, dims, _ = self._spatial(b, node)
        keep = bool(arg(node, 2, "keepdim", False))
        cax = b.caxes(x)
        if keep:
            return cax
        kept = [d for d in range(len(b.shape(x))) if d not in dims]
        new = tuple(kept.index(c) for c in cax if c in kept)
        return new or (len(kept) - 1,)

    def shadow(self, b, node, ms):
        x, dims, sp = self._spatial(b, node)
        keep = bool(arg(node, 2, "keepdim", False))
        return b.call(reduce_map, ms[0], dims, keep)

    def shadow_T(self, b, node, m):
        x, dims, sp = self._spatial(b, node)
        keep = bool(arg(node, 2, "keepdim", False))
        return [b.call(reduce_map_T, m, dims, keep, b.val(x), b.caxes(x))]


_mean = Mean()
register_rule("method:mean", _mean)
register_rule(torch.mean, _mean)
register_rule("method:sum", _mean)
register_rule(torch.sum, _mean)


# ----------------------------------------------------------- max over axes (recorded) -----
def _to_last(x, dims):
    """``x`` with the axes ``dims`` moved to the end and flattened into one."""
    rest = [d for d in range(x.dim()) if d not in dims]
    return x.permute(rest + list(dims)).flatten(len(rest))


def amax_indices(x, dims):
    """Arg-max of ``x`` over the axes ``dims`` (flattened, in their order): the recorded
    constant of a max over axes, shaped like the kept axes plus one trailing axis."""
    return _to_last(x.detach(), dims).argmax(-1, keepdim=True)


def amax_gather(z, idx, x, dims, keepdim):
    """The max over ``dims`` with the recorded indices, applied to ``z`` (broadcastable to x)."""
    z = z.expand((idx.shape[0],) + tuple(x.shape[1:])) if tuple(z.shape) != tuple(x.shape) else z
    out = _to_last(z, dims).gather(-1, idx).squeeze(-1)
    if keepdim:
        for d in sorted(dims):
            out = out.unsqueeze(d)
    return out


def amax_gather_T(g, idx, x, dims, keepdim):
    """Transpose of :func:`amax_gather`: ``g`` put back at the recorded indices, zeros elsewhere."""
    if keepdim:
        g = g.squeeze(tuple(sorted(dims)))
    rest = [d for d in range(x.dim()) if d not in dims]
    flat = x.new_zeros([x.shape[d] for d in rest] + [math.prod(x.shape[d] for d in dims)], dtype=g.dtype)
    flat = flat.scatter(-1, idx, g.unsqueeze(-1))
    full = flat.unflatten(-1, [x.shape[d] for d in dims])
    inv = [0] * x.dim()
    for k, d in enumerate(rest + list(dims)):
        inv[d] = k
    return full.permute(inv)


class AMax(Mean):
    """``amax`` over axes: a max over positions (Hiera's max-pool over the query stride of a mask
    unit, a global max) or over channels.  Like max pooling, the forward records the arg-max of
    every output element; the op is then a gather (linear), its transpose scatters back to the
    recorded indices and its bias is gathered at them.  The shadow is that of a sum over the same
    axes (the *whole* window, as for max pooling)."""

    def _spec(self, b, node):
        x = node.args[0]
        return x, _dims(node, len(b.shape(x))), bool(arg(node, 2, "keepdim", False))

    def record(self, b, node):
        out = b.copy(node)
        x, dims, _ = self._spec(b, node)
        b.set_recorded(node, "indices", b.call(amax_indices, b.val(x), dims, name=node.name + "_idx"))
        return out

    def transpose(self, b, node, g):
        x, dims, keep = self._spec(b, node)
        return [b.call(amax_gather_T, g, b.recorded(node, "indices"), b.val(x), dims, keep)]

    def bias(self, b, node, zs):
        if zs[0] is None:
            return None
        x, dims, keep = self._spec(b, node)
        return b.call(amax_gather, zs[0], b.recorded(node, "indices"), b.val(x), dims, keep)


_amax = AMax()
register_rule("method:amax", _amax)
register_rule(torch.amax, _amax)


class SamePool(_Pool):
    """timm's MaxPool2dSame / AvgPool2dSame (leaves): dynamic TF 'SAME' padding."""

    def _geo(self, b, node):
        m = b.module(node)
        return m.kernel_size, m.stride, getattr(m, "dilation", 1), m.ceil_mode

    def record(self, b, node):
        if self.variant != "max":
            return b.copy(node)
        k, s, d, c = self._geo(b, node)
        return record_indices(b, node, ops.max_pool_same_record, k, s, d, c)

    def transpose(self, b, node, g):
        if self.variant != "max":
            return b.vjp(node, g)
        k, s, d, _ = self._geo(b, node)
        return indices_T(b, node, g, ops.gather_same_T, k, s, d)

    def bias(self, b, node, zs):
        if zs[0] is None:
            return None
        if self.variant != "max":
            return b.apply_with_inputs(node, zs)
        k, s, d, _ = self._geo(b, node)
        return indices_bias(b, node, zs[0], ops.gather_same, k, s, d)

    def shadow(self, b, node, ms):
        k, s, d, _ = self._geo(b, node)
        return same_window_shadow(b, node, ms[0], k, s, d)

    def shadow_T(self, b, node, m):
        k, s, d, _ = self._geo(b, node)
        return same_window_shadow_T(b, node, m, k, s, d)


def _register_timm():
    import importlib
    try:
        pool2d_same = importlib.import_module("timm.layers.pool2d_same")
    except Exception:
        return
    register_rule(pool2d_same.MaxPool2dSame, SamePool("max"))
    register_rule(pool2d_same.AvgPool2dSame, SamePool("avg"))


_register_timm()
