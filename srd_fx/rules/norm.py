"""Normalisations with statistics taken as constants (SPEC §2, "Gates and data-dependent constants").

BatchNorm (eval): a per-channel scale and shift.  LayerNorm, RMSNorm, GroupNorm, ``F.normalize``:
the statistics of the forward pass are recorded constants, so each is affine per position.
All keep positions (shadow = identity).  Batch norm in training mode is refused.
"""
import operator

import torch
import torch.nn as nn
import torch.nn.functional as F

from .base import Rule, arg, register_rule


def _per_channel(t, rank, axis=1):
    shape = [1] * rank
    shape[axis] = -1
    return t.reshape(shape)


def bn_scale(var, weight, eps, rank):
    s = torch.rsqrt(var + eps)
    if weight is not None:
        s = s * weight
    return _per_channel(s, rank)


def bn_shift(mean, var, weight, bias, eps, rank):
    shift = -mean * torch.rsqrt(var + eps)
    if weight is not None:
        shift = shift * weight
    if bias is not None:
        shift = shift + bias
    return _per_channel(shift, rank)


class BatchNorm(Rule):
    def spec(self, b, node):
        if node.op == "call_module":
            m = b.module(node)
            if m.training or not m.track_running_stats or m.running_var is None:
                b.unsupported(node, "batch norm with batch statistics (call model.eval(); "
                              "track_running_stats=False is not supported)")
            return (node.args[0], b.param(node, "running_mean"), b.param(node, "running_var"),
                    b.param(node, "weight"), b.param(node, "bias"), m.eps)
        if arg(node, 5, "training", False):
            b.unsupported(node, "F.batch_norm(training=True): put the model in eval mode")
        return (node.args[0], b.val(arg(node, 1, "running_mean")), b.val(arg(node, 2, "running_var")),
                b.val(arg(node, 3, "weight")), b.val(arg(node, 4, "bias")), arg(node, 7, "eps", 1e-5))

    def layout(self, b, node):
        return (1,)

    def transpose(self, b, node, g):
        _, mean, var, w, _, eps = self.spec(b, node)
        scale = b.call(bn_scale, var, w, eps, len(b.shape(node)), name=node.name + "_scale")
        return [b.call(torch.mul, g, scale)]

    def bias(self, b, node, zs):
        _, mean, var, w, bias, eps = self.spec(b, node)
        if zs[0] is None:
            return b.call(bn_shift, mean, var, w, bias, eps, len(b.shape(node)), name=node.name + "_shift")
        return b.apply_with_inputs(node, zs)


register_rule(nn.modules.batchnorm._BatchNorm, BatchNorm())
register_rule(F.batch_norm, BatchNorm())


# ------------------------------------------------------- LayerNorm, GroupNorm ----------
def gn_stats(x, groups, eps):
    """Mean and 1/std per (sample, group), broadcast to (B, C, 1, ...)."""
    B, C = x.shape[:2]
    xg = x.reshape(B, groups, -1)
    mu = xg.mean(dim=2, keepdim=True)
    inv = torch.rsqrt(xg.var(dim=2, keepdim=True, unbiased=False) + eps)
    ones = (1,) * (x.dim() - 2)
    per_c = lambda t: t.reshape(B, groups, 1, *ones).expand(B, groups, C // groups, *ones).reshape(B, C, *ones)
    return per_c(mu), per_c(inv)


def _param(t, x, kind):
    return _per_channel(t, x.dim()) if kind == "gn" else t


def norm_stats(x, kind, size, eps):
    """The statistics (mean, 1/std) of the forward pass, computed once and recorded: the
    transpose and the bias reuse them, and the normalisation's input need not be kept.
    RMSNorm ("rms") has no mean (None) and 1/rms; its ``eps=None`` is the dtype's epsilon."""
    if kind == "rms":
        eps = torch.finfo(x.dtype).eps if eps is None else eps
        dims = tuple(range(x.dim() - size, x.dim()))
        return None, torch.rsqrt(x.square().mean(dim=dims, keepdim=True) + eps)
    if kind == "ln":
        if x.dtype in (torch.float32, torch.float64) and not (torch.is_grad_enabled() and x.requires_grad):
            # the layer norm kernel's own statistics (one pass; var_mean is ~2.5x slower on the
            # channels-last views ConvNeXt and transformers normalise), shaped (..., 1, ...); they
            # carry no gradient, so a differentiated call (the attack) takes var_mean
            _, mu, inv = torch.native_layer_norm(x, x.shape[x.dim() - size:], None, None, eps)
            return mu, inv
        dims = tuple(range(x.dim() - size, x.dim()))
        var, mu = torch.var_mean(x, dim=dims, keepdim=True, unbiased=False)
        return mu, torch.rsqrt(var + eps)
    return gn_stats(x, size, eps)


def norm_T_rec(g, inv, kind, weight):
    """Transpose of a normalisation with recorded 1/std: a scale (and the per-channel weight)."""
    g = g * inv
    return g if weight is None else g * _param(weight, g, kind)


def norm_affine_rec(z, mu, inv, kind, weight, bias):
    """The normalisation with recorded statistics applied to ``z`` (None: zero)."""
    if mu is None:  # RMSNorm: no centring, and so no constant of its own
        y = z * inv
    else:
        y = (z - mu) * inv if z is not None else -mu * inv
    if weight is not None:
        y = y * _param(weight, y, kind)
    if bias is not None:
        y = y + _param(bias, y, kind)
    return y


class StatNorm(Rule):
    """LayerNorm (variant "ln", over the last axes), RMSNorm ("rms", over the last axes, no
    mean, no bias) and GroupNorm ("gn", over channel groups): affine per position once the
    forward pass's statistics are constants."""
    linear = False

    def __init__(self, variant):
        self.variant = variant

    def spec(self, b, node):
        """(input, ndim or groups, weight, bias, eps)."""
        if node.op == "call_module":
            m = b.module(node)
            n = m.num_groups if self.variant == "gn" else len(m.normalized_shape)
            bias = None if self.variant == "rms" else b.param(node, "bias")
            return node.args[0], n, b.param(node, "weight"), bias, m.eps
        if self.variant == "rms":  # F.rms_norm(input, normalized_shape, weight=None, eps=None)
            shape = arg(node, 1, "normalized_shape")
            n = 1 if isinstance(shape, int) else len(shape)
            return node.args[0], n, b.val(arg(node, 2, "weight")), None, arg(node, 3, "eps", None)
        if self.variant == "ln":
            shape = arg(node, 1, "normalized_shape")
            n = 1 if isinstance(shape, int) else len(shape)
        else:
            n = arg(node, 1, "num_groups")
        return node.args[0], n, b.val(arg(node, 2, "weight")), b.val(arg(node, 3, "bias")), arg(node, 4, "eps", 1e-5)

    def layout(self, b, node):
        return (1,) if self.variant == "gn" else b.caxes(node.args[0])

    def record(self, b, node):
        out = b.copy(node)
        x, n, _, _, eps = self.spec(b, node)
        stats = b.call(norm_stats, b.val(x), self.variant, n, eps, name="stats_" + node.name)
        if self.variant != "rms":
            b.set_recorded(node, "mu", b.call(operator.getitem, stats, 0, name="mu_" + node.name))
        b.set_recorded(node, "inv", b.call(operator.getitem, stats, 1, name="inv_" + node.name))
        return out

    def transpose(self, b, node, g):
        _, _, w, _, _ = self.spec(b, node)
        return [b.call(norm_T_rec, g, b.recorded(node, "inv"), self.variant, w)]

    def bias(self, b, node, zs):
        _, _, w, bias, _ = self.spec(b, node)
        if self.variant == "rms" and zs[0] is None:
            return None
        mu = None if self.variant == "rms" else b.recorded(node, "mu")
        return b.call(norm_affine_rec, zs[0], mu, b.recorded(node, "inv"), self.variant,
                      w, bias)


register_rule(nn.LayerNorm, StatNorm("ln"))
register_rule(F.layer_norm, StatNorm("ln"))
register_rule(nn.RMSNorm, StatNorm("rms"))
register_rule(F.rms_norm, StatNorm("rms"))
register_rule(nn.GroupNorm, StatNorm("gn"))
register_rule(F.group_norm, StatNorm("gn"))


# ----------------------------------------------------------------------- F.normalize -----
def normalize_scale(x, p, dim, eps):
    return 1.0 / x.norm(p=p, dim=dim, keepdim=True).clamp_min(eps)


class Normalize(Rule):
    """``F.normalize(x, p, dim)``: x times the recorded 1/max(||x||, eps)."""

    def _spec(self, node):
        return node.args[0], arg(node, 1, "p", 2.0), arg(node, 2, "dim", 1), arg(node, 3, "eps", 1e-12)

    def transpose(self, b, node, g):
        x, p, dim, eps = self._spec(node)
        return [b.call(torch.mul, g, b.call(normalize_scale, b.val(x), p, dim, eps))]

    def bias(self, b, node, zs):
        return None if zs[0] is None else b.call(
            torch.mul, zs[0], b.call(normalize_scale, b.val(self._spec(node)[0]), *self._spec(node)[1:]))


register_rule(F.normalize, Normalize())
