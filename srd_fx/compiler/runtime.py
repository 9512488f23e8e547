"""Tensor helpers called by the generated SRD backward (SPEC.md §7).

Conventions: a *map* of a tensor is the tensor's shape with every channel axis set to size 1
(``(B, 1, H, W)`` for NCHW).  Relevances, PFV norms and the bias-share quantities are maps.
Everything here is batched, loop-free over positions and channels, and differentiable (the
attack of Sec. 4.3 differentiates the saliency map with respect to the input).
"""
from __future__ import annotations

import math
from typing import Sequence, Tuple

import torch
import torch.nn.functional as F

Axes = Tuple[int, ...]
LOW_PRECISION = (torch.float16, torch.bfloat16)


def _acc(t: torch.Tensor) -> torch.Tensor:
    """Maps (relevances, norms, dot products) are kept in float32 for half-precision models."""
    return t.float() if t.dtype in LOW_PRECISION else t


def shape_args(*positions: int, sizes: bool = False):
    """Mark the positional arguments that a function reads only for their shape, dtype and
    device.  The compiler may pass a stand-in there (:func:`like`, or a tensor of the same shape,
    dtype and device): the forward value itself is then freed after the forward pass.
    ``sizes``: the function reads only the shape there, and also takes a ``torch.Size``."""
    def mark(fn):
        fn.srd_shape_args = positions
        fn.srd_sizes_ok = sizes
        return fn
    return mark


def like(x: torch.Tensor) -> torch.Tensor:
    """A stand-in for ``x`` where only its shape, dtype and device are read: every stride 0, so
    it holds one element, not ``x``'s memory."""
    return torch.empty_strided(x.shape, (0,) * x.dim(), dtype=x.dtype, device=x.device)


def _stand_in(x: torch.Tensor) -> bool:
    """True for a tensor with no memory of its own per element (:func:`like`, an expanded scalar)."""
    return x.dim() > 0 and x.numel() > 1 and all(s == 0 for s in x.stride())


# ------------------------------------------------------------------ PFV algebra ------------
def sq_norm(v: torch.Tensor, caxes: Axes) -> torch.Tensor:
    """||v_j||^2 per position j (a map).  No channel axes: per neuron (unit="neuron")."""
    if not caxes:
        return _acc(v) * _acc(v)
    if v.dtype in LOW_PRECISION:
        return torch.linalg.vector_norm(v, 2, dim=caxes, keepdim=True, dtype=torch.float32).square()
    # sum of squares: one pass, 2-4x faster on CPU than linalg.vector_norm over the channel axis
    return (v * v).sum(dim=caxes, keepdim=True)


def pfv_norm(x: torch.Tensor, caxes: Axes, overwrite: bool = False) -> torch.Tensor:
    """||x_i|| per position i, with a zero (not NaN) gradient where the norm is zero.

    ``overwrite``: this is the last read of ``x`` and nothing else holds its memory (the
    generated code says so): the squares are formed in ``x`` itself, not in a new tensor, unless
    a graph is being recorded."""
    if not caxes:
        return _acc(x).abs()
    if x.dtype in LOW_PRECISION:
        return torch.linalg.vector_norm(x, 2, dim=caxes, keepdim=True, dtype=torch.float32)
    if x.requires_grad and torch.is_grad_enabled():
        return torch.linalg.vector_norm(x, 2, dim=caxes, keepdim=True)  # its gradient at 0 is 0
    sq = x.mul_(x) if overwrite else x * x
    return sq.sum(dim=caxes, keepdim=True).sqrt_()  # no graph: the faster sum of squares


def pfv_dot(x: torch.Tensor, g: torch.Tensor, caxes: Axes, overwrite_g: bool = False) -> torch.Tensor:
    """<x_i, g_i> per position (the linear share R_lin = sum_c x * Lin^T s).

    ``overwrite_g``: ``g`` is a temporary nothing else reads (the generated code says so): the
    product is formed in its memory instead of a new tensor, unless a graph is being recorded."""
    if overwrite_g and g.shape == x.shape and g.dtype == x.dtype and x.dtype not in LOW_PRECISION \
            and not (torch.is_grad_enabled() and (x.requires_grad or g.requires_grad)):
        prod = g.mul_(x)
        return prod.sum(dim=caxes, keepdim=True) if caxes else prod
    if not caxes:
        return _acc(x * g)
    if caxes == (1,) and x.dim() >= 3 and x.shape[0] == 1 and all(n == 1 for n in x.shape[2:]) \
            and g.dim() == x.dim() and x.dtype not in LOW_PRECISION and g.dtype == x.dtype:
        # a per-channel constant (a bias): one convolution with one output channel, no temporary
        if x.dim() - 2 in _CONV and not torch.is_autocast_enabled(g.device.type):
            return _CONV[x.dim() - 2](g, x)
        B, C = g.shape[:2]
        return torch.matmul(x.reshape(1, C), g.reshape(B, C, math.prod(g.shape[2:]))).view((B, 1) + tuple(g.shape[2:]))
    if x.dtype in LOW_PRECISION or g.dtype in LOW_PRECISION:
        return (x * g).sum(dim=caxes, keepdim=True, dtype=torch.float32)
    return (x * g).sum(dim=caxes, keepdim=True)


def _ratio(num: torch.Tensor, den: torch.Tensor, bad: torch.Tensor) -> torch.Tensor:
    """``num / den``, and 0 where ``bad``.  When a graph is being recorded the denominator is made
    safe first, so that the gradient is 0 (not NaN) where ``bad``; else the quotient is zeroed in
    place (two kernels)."""
    if torch.is_grad_enabled() and (num.requires_grad or den.requires_grad):
        return torch.where(bad, torch.zeros_like(num), num / torch.where(bad, torch.ones_like(den), den))
    return (num / den).masked_fill_(bad, 0)


def safe_div(a: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
    """a / d, and 0 where d == 0 (zero gradient there too)."""
    return _ratio(a, d, d == 0)


def _add_masked(lost, R: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``lost + R * mask`` in one pass (``R * mask`` when there is no ``lost`` map yet)."""
    return R * mask if lost is None else torch.addcmul(lost, R, mask)


def sharing(R: torch.Tensor, v: torch.Tensor, caxes: Axes, eps: float, lost=None, overwrite_v: bool = False):
    """The sharing ratio of a block and the relevance it cannot pass on: ``(s, lost)``.

    ``s_j = R_j v_j / ||v_j||^2`` (Eq. 6 folded with Eq. 7) where ``||v_j||^2 > eps``, else 0;
    ``lost``: the map of R on the PFVs with ``||v_j||^2 <= eps`` (SPEC §2), 0 elsewhere, added to
    the running lost map ``lost`` of the same shape when one is given.  ``overwrite_v``: this is
    the last read of ``v`` and nothing else holds its memory: ``s`` is formed in ``v`` itself
    (unless a graph is being recorded)."""
    nv2 = sq_norm(v, caxes)
    bad = nv2 <= eps
    ratio = _ratio(R, nv2, bad).to(v.dtype)
    inplace = overwrite_v and ratio.dtype == v.dtype and torch.broadcast_shapes(ratio.shape, v.shape) == v.shape \
        and not (torch.is_grad_enabled() and (v.requires_grad or ratio.requires_grad))
    return v.mul_(ratio) if inplace else v * ratio, _add_masked(lost, R, bad)


def sharing_post(R: torch.Tensor, v: torch.Tensor, a: torch.Tensor, caxes: Axes, eps: float, lost=None):
    """Ablation value="post" (SPEC §5): ``s_j = R_j a_j / <v_j, a_j>``, a = act(v), and the map
    of R on the units with ``|<v_j, a_j>| <= eps`` (they pass nothing on): ``(s, lost)``."""
    va = pfv_dot(v, a, caxes)
    bad = va.abs() <= eps
    return a * _ratio(R, va, bad).to(a.dtype), _add_masked(lost, R, bad)


def bias_share(beta: torch.Tensor, D: torch.Tensor, lost: torch.Tensor):
    """``q = beta / D`` (0 where the receptive field has zero norm, D = 0) and the lost map with
    the bias relevance of those positions added: ``(q, lost)``."""
    zero = D == 0
    return _ratio(beta, D, zero), _add_masked(lost, beta, zero)


def total_lost(x: torch.Tensor, *maps: torch.Tensor) -> torch.Tensor:
    """The per-sample total of lost relevance, ``(B,)`` (B: the batch of the model input ``x``),
    from the running lost maps (one per map shape: blocks whose maps have the same shape add into
    one map, summed once here).  A layer whose positions are folded into the batch axis (windows
    partitioned into ``(B * windows, ...)``, sample-major as a row-major reshape folds them) has
    its lost map summed over each sample's windows."""
    B = x.shape[0]
    sums = []
    for m in maps:
        s = m.sum(dim=tuple(range(1, m.dim()))) if m.dim() > 1 else m
        if s.shape[0] != B and s.shape[0] % B == 0:
            s = s.reshape(B, -1).sum(1)
        sums.append(s)
    if len(sums) <= 2:
        return sums[0] if len(sums) == 1 else sums[0] + sums[1]
    return torch.stack(sums).sum(0)


@shape_args(1)
def per_sample(m: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """The map of a layer whose windows are folded into the batch axis, ``(B * windows, ...)``,
    as ``(B, windows x window positions)``: a sample's windows are consecutive (sample-major)."""
    return m.reshape(x.shape[0], -1)


def squeeze_map(m: torch.Tensor, caxes: Axes) -> torch.Tensor:
    """A map without its channel axes: ``(B, 1, H, W) -> (B, H, W)``."""
    return m.squeeze(tuple(caxes)) if caxes else m


def position_map(r: torch.Tensor, caxes: Axes) -> torch.Tensor:
    """Relevance per position: sums neuron relevances (unit="neuron") over the channel axes.  A
    tensor with no position axis (one PFV) gives ``(B, 1)``."""
    out = r.squeeze(tuple(caxes)) if all(r.shape[a] == 1 for a in caxes) else r.sum(dim=tuple(caxes))
    return out.unsqueeze(1) if out.dim() == 1 else out


@shape_args(1)
def unbroadcast(g: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Sum a gradient back to the shape of an input that was broadcast."""
    if g.shape == like.shape:
        return g
    return g.sum_to_size(like.shape)


def shape_of(like) -> torch.Size:
    """The shape of ``like``: a tensor, or its shape already (the generated code passes a forward
    value's shape, not the value, to a backward helper that reads only the shape, so that the
    value is freed when the forward no longer needs it)."""
    return like.shape if isinstance(like, torch.Tensor) else torch.Size(like)


def _map_target(like, caxes: Axes):
    """The map shape of ``like`` (a tensor or a shape): its shape with every channel axis 1."""
    target = list(like.shape if isinstance(like, torch.Tensor) else like)
    for a in caxes:
        target[a] = 1
    return target


@shape_args(1)
def map_like(m: torch.Tensor, like: torch.Tensor, caxes: Axes) -> torch.Tensor:
    """Bring a map to the map shape of ``like`` (sum over broadcast positions)."""
    target = _map_target(like, caxes)
    if list(m.shape) == target:
        return m
    if m.dim() != len(target):
        m = m.reshape([1] * (len(target) - m.dim()) + list(m.shape))
    try:
        return m.sum_to_size(target)
    except RuntimeError:
        return m.expand(target)


@shape_args(1)
def expand_map(m: torch.Tensor, like: torch.Tensor, caxes: Axes) -> torch.Tensor:
    """Broadcast an output map back onto the positions of an input of shape ``like``."""
    target = _map_target(like, caxes)
    if list(m.shape) == target:
        return m
    # positions of the input that were broadcast (size 1 in the input) received the sum
    out = m
    for d, (ms, ts) in enumerate(zip(m.shape, target)):
        if ts == 1 and ms != 1:
            out = out.sum(dim=d, keepdim=True)
    return out.expand(target) if list(out.shape) != target else out


# ------------------------------------------------------------ structural windows ------------
def _ones(nd: int, kernel: Sequence[int], ref: torch.Tensor) -> torch.Tensor:
    """Ones kernel, depthwise over the map's channels (1 for PFV maps, C for neuron maps)."""
    return torch.ones((ref.shape[1], 1, *kernel), dtype=ref.dtype, device=ref.device)


_CONV = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}
_CONV_T = {1: F.conv_transpose1d, 2: F.conv_transpose2d, 3: F.conv_transpose3d}


def _tuple(v, nd):
    return tuple(v) if isinstance(v, (tuple, list)) else (v,) * nd


def _spatial(like, nd: int) -> Tuple[int, ...]:
    """The last ``nd`` sizes of a tensor or of a shape (the generated code passes the forward
    output's shape, not the tensor, so that the tensor can be freed after the forward pass)."""
    return tuple((like.shape if isinstance(like, torch.Tensor) else like)[-nd:])


@shape_args(5, sizes=True)
def window_sum(m: torch.Tensor, kernel, stride, padding, dilation, out_like) -> torch.Tensor:
    """Shadow of a sliding-window op: sum of the input map over each output window.

    Zero padding (padded positions are not PFVs); extra right padding reproduces ceil_mode;
    the result is cropped to the spatial size of ``out_like`` (the forward output or its shape)."""
    nd = m.dim() - 2
    k, s, p, d = (_tuple(v, nd) for v in (kernel, stride, padding, dilation))
    out_size = _spatial(out_like, nd)
    if all(v == 1 for v in k + s + d) and not any(p):
        return m  # a 1x1 window: the identity
    if nd == 2 and all(v == 1 for v in d) and all(2 * p[i] <= k[i] for i in range(2)) \
            and all((m.shape[2 + i] + 2 * p[i] - k[i]) // s[i] + 1 == out_size[i] for i in range(2)):
        return F.avg_pool2d(m, k, s, p, False, True, divisor_override=1)  # one kernel, no pad/crop
    pads = []
    for i in reversed(range(nd)):
        need = (out_size[i] - 1) * s[i] + d[i] * (k[i] - 1) + 1
        have = m.shape[2 + i] + 2 * p[i]
        pads += [p[i], p[i] + max(0, need - have)]
    mp = F.pad(m, pads)
    if nd == 2 and all(v == 1 for v in d):  # the pooling kernel sums windows fastest
        out = F.avg_pool2d(mp, k, s, 0, False, True, divisor_override=1)
    else:
        out = _CONV[nd](mp, _ones(nd, k, m), stride=s, dilation=d, groups=m.shape[1])
    sl = (slice(None), slice(None)) + tuple(slice(0, o) for o in out_size)
    return out[sl]


@shape_args(5)
def window_sum_T(m: torch.Tensor, kernel, stride, padding, dilation, in_like) -> torch.Tensor:
    """Transpose of :func:`window_sum`: scatter each output value back over its window."""
    nd = m.dim() - 2
    k, s, p, d = (_tuple(v, nd) for v in (kernel, stride, padding, dilation))
    in_size = _spatial(in_like, nd)
    if all(v == 1 for v in k + s + d) and not any(p):
        return m
    if nd == 2 and all(v == 1 for v in d) and all(2 * p[i] <= k[i] for i in range(2)) \
            and all((in_size[i] + 2 * p[i] - k[i]) // s[i] + 1 == m.shape[2 + i] for i in range(2)):
        ref = in_like  # the kernel reads only its shape: a map of the input's shape, when given one
        if not isinstance(ref, torch.Tensor) or ref.shape != (m.shape[0], m.shape[1], *in_size) \
                or ref.dtype != m.dtype:
            ref = m.new_empty((m.shape[0], m.shape[1], *in_size))
        return torch.ops.aten.avg_pool2d_backward(m, ref, list(k), list(s), list(p), False, True, 1)
    if nd == 2 and all(v == 1 for v in d):
        # transpose of the window sum = avg-pool backward (divisor 1) over the padded input
        padded = [in_size[i] + 2 * p[i] for i in range(nd)]
        padded = [max(padded[i], (m.shape[2 + i] - 1) * s[i] + k[i]) for i in range(nd)]
        ref = m.new_empty((m.shape[0], m.shape[1], *padded))
        full = torch.ops.aten.avg_pool2d_backward(m, ref, list(k), list(s), [0, 0], False, True, 1)
        return full[(slice(None), slice(None)) + tuple(slice(p[i], p[i] + in_size[i]) for i in range(nd))]
    full = _CONV_T[nd](m, _ones(nd, k, m), stride=s, dilation=d, groups=m.shape[1])
    pads = []
    for i in reversed(range(nd)):
        have = full.shape[2 + i] - p[i]
        pads += [-p[i], in_size[i] - have]
    return F.pad(full, pads)


def adaptive_windows(n_in: int, n_out: int, ref: torch.Tensor) -> torch.Tensor:
    """0/1 matrix (n_out, n_in) of adaptive pooling windows (PyTorch's start/end rule)."""
    i = torch.arange(n_out, device=ref.device)
    start = torch.div(i * n_in, n_out, rounding_mode="floor")
    end = torch.div((i + 1) * n_in + n_out - 1, n_out, rounding_mode="floor")
    j = torch.arange(n_in, device=ref.device)
    return ((j[None, :] >= start[:, None]) & (j[None, :] < end[:, None])).to(ref.dtype)


def interp_support(n_in: int, n_out: int, mode: str, align_corners, scale, ref) -> torch.Tensor:
    """0/1 matrix (n_out, n_in): source positions each output position is interpolated from."""
    eye = torch.eye(n_in, dtype=torch.float64, device=ref.device)[None]  # (1, n_in, n_in)
    kw = {} if mode == "nearest" else {"align_corners": align_corners}
    if mode == "bicubic":   # no 1-D cubic mode: resize the rows of a 2-D identity, columns kept
        w = F.interpolate(eye[None], size=(n_out, n_in), mode=mode, **kw)[0, 0]    # (n_out, n_in)
        return (w.abs() > 0).to(ref.dtype)
    w = F.interpolate(eye, size=n_out, mode="linear" if mode in ("bilinear", "linear") else mode, **kw)
    return (w[0].abs() > 0).to(ref.dtype).t()  # (n_out, n_in)


def separable_apply(m: torch.Tensor, mats: Sequence[torch.Tensor]) -> torch.Tensor:
    """Apply one matrix per spatial axis of a map ``(B, 1, *spatial)``."""
    out = m
    nd = len(mats)
    for i, A in enumerate(mats):
        ax = 2 + i
        out = torch.movedim(torch.movedim(out, ax, -1) @ A.t(), -1, ax)
    return out


# ------------------------------------------------------------------ max pooling ------------
def max_pool_record(x: torch.Tensor, kernel_size, stride=None, padding=0, dilation=1,
                    ceil_mode=False):
    """Max pooling that also returns the arg-max indices (recorded constants)."""
    nd = x.dim() - 2
    fn = {1: F.max_pool1d, 2: F.max_pool2d, 3: F.max_pool3d}[nd]
    if stride is None or (isinstance(stride, (list, tuple)) and len(stride) == 0):
        stride = kernel_size
    return fn(x, kernel_size, stride, padding, dilation, ceil_mode=ceil_mode, return_indices=True)


def adaptive_max_pool_record(x: torch.Tensor, output_size):
    nd = x.dim() - 2
    fn = {1: F.adaptive_max_pool1d, 2: F.adaptive_max_pool2d, 3: F.adaptive_max_pool3d}[nd]
    return fn(x, output_size, return_indices=True)


@shape_args(2)
def max_pool_T(g: torch.Tensor, idx: torch.Tensor, like: torch.Tensor, kernel_size, stride=None, padding=0,
               dilation=1, ceil_mode=False) -> torch.Tensor:
    """Transpose of a 2-d max pool with the indices it recorded: the pool's own backward kernel
    (one op); other ranks and dtypes: :func:`gather_T`."""
    if like.dim() != 4 or g.dtype != like.dtype:
        return gather_T(g, idx, like)
    if stride is None or (isinstance(stride, (list, tuple)) and len(stride) == 0):
        stride = kernel_size
    k, s, p, d = (list(_tuple(v, 2)) for v in (kernel_size, stride, padding, dilation))
    return torch.ops.aten.max_pool2d_with_indices_backward(g, like, k, s, p, d, bool(ceil_mode), idx)


@shape_args(2)
def gather_T(g: torch.Tensor, idx: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Transpose of a max-pool with fixed indices: scatter-add (windows may overlap)."""
    B, C = like.shape[:2]
    out = torch.zeros((B, C, math.prod(like.shape[2:])), dtype=g.dtype, device=g.device)
    out = out.scatter_add(2, idx.flatten(2), g.flatten(2))
    return out.view(like.shape)


def gather(z: torch.Tensor, idx: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """A max-pool with fixed indices applied to ``z`` (broadcastable to the pool's input)."""
    target = (idx.shape[0],) + tuple(like.shape[1:])
    if tuple(z.shape) != target:
        z = z.expand(target)
    return z.flatten(2).gather(2, idx.flatten(2)).view(idx.shape)


# --------------------------------------------------------------------- linear algebra ------
@shape_args(1, sizes=True)
def conv_T(g: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, stride, padding, dilation,
           groups: int, scale=None) -> torch.Tensor:
    """Transpose of a convolution: conv_transpose with the output padding that restores x's size.

    ``scale``: a per-output-channel factor applied to ``g`` first (the transpose of a batch norm
    that follows the convolution); it goes into the weight when the weight is the smaller tensor,
    which saves a pass over the activation."""
    if scale is not None:
        if scale.numel() == weight.shape[0] and weight.numel() < g.numel():
            weight = weight * scale.reshape((-1,) + (1,) * (weight.dim() - 1)).to(weight.dtype)
        else:
            g = g * scale
    size = shape_of(x)  # x: the convolution's input, its stand-in or its shape
    nd = len(size) - 2
    s, d = _tuple(stride, nd), _tuple(dilation, nd)
    k = weight.shape[2:]
    if isinstance(padding, str):
        raise ValueError("string padding is canonicalised before the transpose")
    p = _tuple(padding, nd)
    op = []
    for i in range(nd):
        full = (g.shape[2 + i] - 1) * s[i] - 2 * p[i] + d[i] * (k[i] - 1) + 1
        op.append(size[2 + i] - full)
    if nd == 2 and isinstance(x, torch.Tensor) and x.dtype in (torch.float32, torch.float64) and not _stand_in(x):
        # the convolution's own input-gradient kernel: faster than conv_transpose on CPU (it
        # takes one dtype: g may be half precision under autocast)
        g, weight = g.to(x.dtype), weight.to(x.dtype)
        return torch.ops.aten.convolution_backward(g, x, weight, None, list(s), list(p), list(d), False,
                                                   [0] * nd, groups, [True, False, False])[0]
    return _CONV_T[nd](g, weight, None, stride=s, padding=p, output_padding=tuple(op),
                       groups=groups, dilation=d)


def scale_out_channels(weight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """A convolution weight with output channel k multiplied by ``scale[k]`` (a batch norm that
    follows the convolution, folded into the weight of its transpose)."""
    return weight * scale.reshape((-1,) + (1,) * (weight.dim() - 1)).to(weight.dtype)


def same_padding(x: torch.Tensor, kernel, stride, dilation) -> Tuple[int, ...]:
    """TF 'SAME' padding amounts (F.pad order) — used by conv rules for padding='same'."""
    nd = x.dim() - 2
    k, s, d = (_tuple(v, nd) for v in (kernel, stride, dilation))
    pads = []
    for i in reversed(range(nd)):
        n = x.shape[2 + i]
        total = max((math.ceil(n / s[i]) - 1) * s[i] + (k[i] - 1) * d[i] + 1 - n, 0)
        pads += [total // 2, total - total // 2]
    return tuple(pads)


# ------------------------------------------------------------ TF 'SAME' (timm) ----------
@shape_args(1, 5)
def same_window_sum(m, x, kernel, stride, dilation, out_like):
    """Shadow of a timm '...Same' conv/pool: dynamic SAME padding, then the window sum."""
    return window_sum(F.pad(m, same_padding(x, kernel, stride, dilation)), kernel, stride, 0,
                      dilation, out_like)


def max_pool_same_record(x, kernel, stride, dilation, ceil_mode):
    xp = F.pad(x, same_padding(x, kernel, stride, dilation), value=-float("inf"))
    return max_pool_record(xp, kernel, stride, 0, dilation, ceil_mode)


def gather_same_T(g, idx, x, kernel, stride, dilation):
    pad = same_padding(x, kernel, stride, dilation)
    shape = list(x.shape)
    for k in range(len(pad) // 2):
        shape[-1 - k] += pad[2 * k] + pad[2 * k + 1]
    full = gather_T(g, idx, x.new_empty(shape))
    return F.pad(full, [-p for p in pad])


def gather_same(z, idx, x, kernel, stride, dilation):
    pad = same_padding(x, kernel, stride, dilation)
    z = z.expand((idx.shape[0],) + tuple(x.shape[1:]))
    zp = F.pad(z, pad)
    return gather(zp, idx, zp)


# ------------------------------------------------------------ unit="neuron" shadows -------
def conv_ones(m, x, weight, stride, padding, dilation, groups):
    """Neuron-level structural field of a convolution: every output neuron sums the input
    neurons of its group inside its window."""
    nd = x.dim() - 2
    return _CONV[nd](m, torch.ones_like(weight), None, stride, padding, dilation, groups)


def conv_ones_T(m, x, weight, stride, padding, dilation, groups):
    return conv_T(m, x, torch.ones_like(weight), stride, padding, dilation, groups)


def torch_same_pads(x, kernel, dilation):
    """F.pad amounts of PyTorch's ``padding='same'`` (extra padding on the right/bottom)."""
    nd = x.dim() - 2
    k, d = _tuple(kernel, nd), _tuple(dilation, nd)
    pads = []
    for i in reversed(range(nd)):
        total = d[i] * (k[i] - 1)
        pads += [total // 2, total - total // 2]
    return tuple(pads)


@shape_args(5)
def padded_window_sum(m, pads, kernel, stride, dilation, out_like):
    """Window sum after explicit (possibly asymmetric) zero padding."""
    return window_sum(F.pad(m, list(pads)), kernel, stride, 0, dilation, out_like)


# ------------------------------------------------------------ functions by name ------------
_RESOLVED = {}


def resolve(qualname: str):
    """A function from its qualified name (generated code passes functions by name: fx cannot
    print function objects as arguments)."""
    fn = _RESOLVED.get(qualname)
    if fn is None:
        import importlib
        parts = qualname.split(".")
        for k in range(len(parts) - 1, 0, -1):
            try:
                obj = importlib.import_module(".".join(parts[:k]))
            except ImportError:
                continue
            for p in parts[k:]:
                obj = getattr(obj, p)
            fn = _RESOLVED[qualname] = obj
            break
        else:
            raise ValueError(f"cannot resolve {qualname!r}")
    return fn


def fn_name(fn) -> str:
    from torch.fx.node import _get_qualified_name
    name = _get_qualified_name(fn)
    resolve(name)  # fail at build time, not at run time
    return name


def _call(fn, args, kwargs):
    if isinstance(fn, str):
        if fn.startswith("method:"):  # a tensor method
            return getattr(args[0], fn[7:])(*args[1:], **kwargs)
        return resolve(fn)(*args, **kwargs)
    return fn(*args, **kwargs)
