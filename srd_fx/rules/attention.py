"""Attention (SPEC §8): ``softmax(q k^T * scale + mask) @ v`` is linear in ``v`` once the
attention weights are recorded as a gate.  Relevance flows to ``v`` only; the query/key branch
(with relative-position biases and masks) is the gate branch and receives none.

``F.scaled_dot_product_attention(q, k, v, ...)`` has its own rule here: its weights are
computed once in the forward pass (the same formula the fused kernel evaluates) and recorded.
A manual ``attn @ v`` with ``attn`` a softmax output is handled by the matmul rule
(srd_fx/rules/products.py) with the same shadow.

Shadow of an attention product: output token i is connected to input token j once, whatever
the number of heads, when any head's weight ``attn[i, j]`` is non-zero.
"""
import math

import torch
import torch.nn.functional as F

from ..compiler.runtime import shape_of
from .base import Rule, arg, register_rule


# ------------------------------------------------------------------------ runtime -------
def sdpa_weights(q, k, attn_mask=None, is_causal=False, scale=None, enable_gqa=False):
    """The attention weights ``softmax(q k^T * scale + mask)`` of F.scaled_dot_product_attention."""
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    if k.dim() >= 3 and q.dim() >= 3 and k.shape[-3] != q.shape[-3]:   # grouped-query attention
        k = k.repeat_interleave(q.shape[-3] // k.shape[-3], dim=-3)
    s = torch.matmul(q, k.transpose(-2, -1)) * scale
    Lq, Lk = q.shape[-2], k.shape[-2]
    if is_causal:
        keep = torch.ones(Lq, Lk, dtype=torch.bool, device=q.device).tril()
        s = s.masked_fill(~keep, float("-inf"))
    if attn_mask is not None:
        if attn_mask.dtype == torch.bool:
            s = s.masked_fill(~attn_mask, float("-inf"))
        else:
            s = s + attn_mask
    return torch.softmax(s, dim=-1)


def _gqa(w, v):
    """Weights (…, Hq, L, S) against values with fewer heads (…, Hkv, S, d)."""
    if v.dim() >= 3 and w.dim() >= 3 and w.shape[-3] != v.shape[-3]:
        return v.repeat_interleave(w.shape[-3] // v.shape[-3], dim=-3)
    return v


def attend(w, v):
    return torch.matmul(w, _gqa(w, v))


def attend_T(g, w, v):
    """Lin^T g of ``v -> w @ v``: ``w^T @ g`` (summed back over shared key/value heads); ``v``: the
    values or their shape."""
    out = torch.matmul(w.transpose(-2, -1), g)
    sv = shape_of(v)
    if out.shape != sv:
        out = out.sum_to_size(sv) if out.dim() == len(sv) and out.shape[-3] == sv[-3] else \
            out.unflatten(-3, (sv[-3], -1)).sum(-3)
    return out


def connectivity(w, map_rank, channel_axes):
    """0/1 token connectivity (…, Lq, Lk): 1 where any head (any channel axis of the values
    among the leading axes) has a non-zero weight.  Broadcast over the map's leading axes."""
    c = (w != 0)
    lead = tuple(a for a in channel_axes if a < map_rank - 2)
    if lead:
        c = c.any(dim=lead, keepdim=True)
    return c.to(torch.get_default_dtype() if not w.is_floating_point() else w.dtype)


def attend_map(m, w, channel_axes):
    """Shadow of ``w @ v`` on the map ``m`` of ``v`` (…, S, 1): each output token sums the norms of
    the tokens it attends to (a value map whose token axis is a channel axis is passed on)."""
    if m.shape[-2] == 1 and w.shape[-1] != 1:          # the contracted axis is a channel axis
        return m                                      # (XCiT's channel attention): positions kept
    C = connectivity(w, m.dim(), channel_axes).to(m.dtype)
    return torch.matmul(C, m)


def attend_map_T(m, w, like_map, channel_axes):
    if like_map[-2] == 1 and w.shape[-1] != 1:
        return m
    C = connectivity(w, m.dim(), channel_axes).to(m.dtype)
    out = torch.matmul(C.transpose(-2, -1), m)
    return out.sum_to_size(like_map) if tuple(out.shape) != tuple(like_map) else out


def layout_axes(b, n):
    """The channel axes of ``n``'s layout, whoever asks (the analysis, or the builder, whose
    ``caxes`` is empty for unit="neuron")."""
    return getattr(b, "info", b).caxes(n)


def map_shape(x, caxes):
    """The map shape of ``x`` (a tensor or its shape): channel axes of size 1."""
    s = list(shape_of(x))
    for a in caxes:
        s[a] = 1
    return s


# -------------------------------------------------------------------------- rules -------
_SDPA_ARGS = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale", "enable_gqa")


def sdpa_arg(node, name, default=None):
    return arg(node, _SDPA_ARGS.index(name), name, default)


class ScaledDotProductAttention(Rule):
    """``F.scaled_dot_product_attention``: linear in the values with the recorded weights."""
    pointwise = False
    main_args = (2,)          # only the values carry relevance (q, k, mask: the gate branch)

    def _value(self, node):
        return sdpa_arg(node, "value")

    def record(self, b, node):
        out = b.copy(node)
        w = b.call(sdpa_weights, b.val(sdpa_arg(node, "query")), b.val(sdpa_arg(node, "key")),
                   b.val(sdpa_arg(node, "attn_mask")), sdpa_arg(node, "is_causal", False),
                   sdpa_arg(node, "scale"), sdpa_arg(node, "enable_gqa", False), name="attn_" + node.name)
        b.set_recorded(node, "weights", w)
        return out

    def layout(self, b, node):
        # leading axes the values broadcast over (multi-query attention: one value head for all
        # query heads) are head axes of the output: channels
        v = self._value(node)
        sv, so = b.shape(v), b.shape(node)
        heads = tuple(d for d in range(1, len(so) - 2) if len(sv) == len(so) and sv[d] == 1 and so[d] > 1)
        return tuple(sorted(set(b.caxes(v)) | set(heads)))

    def transpose(self, b, node, g):
        v = self._value(node)
        return [b.call(attend_T, g, b.recorded(node, "weights"), b.size_of(v))]

    def bias(self, b, node, zs):
        if zs[0] is None:
            return None
        return b.call(attend, b.recorded(node, "weights"), zs[0])

    def shadow(self, b, node, ms):
        v = self._value(node)
        return b.call(attend_map, ms[0], b.recorded(node, "weights"), b.caxes(node))

    def shadow_T(self, b, node, m):
        v = self._value(node)
        return [b.call(attend_map_T, m, b.recorded(node, "weights"),
                       b.call(map_shape, b.size_of(v), b.caxes(v)), b.caxes(node))]


register_rule(F.scaled_dot_product_attention, ScaledDotProductAttention())
