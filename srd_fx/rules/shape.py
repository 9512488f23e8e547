"""Ops that move positions or channels: cat, split/chunk, indexing, flatten/view/reshape,
permute/transpose, pad, upsample/interpolate.

Their transposes are autograd's VJP (exact: these ops are linear) except cat (a split).  Their
shadows act on one-channel maps: ops along channel axes leave the map alone (cat along
channels sums the maps), ops along positions are applied to the map itself.
"""
import math
import operator

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..compiler import runtime as ops

from ..errors import UnsupportedOpError
from .base import Meta, Rule, arg, register_rule
from .attention import layout_axes, map_shape


# ------------------------------------------------------------------------ runtime -------
def cat_T(g, dim, xs):
    """Lin^T of cat: ``g`` split back into the items (``xs``: the items or their shapes)."""
    sizes = [ops.shape_of(x)[dim] for x in xs]
    return list(torch.split(g, sizes, dim=dim))


def list_bias(zs, xs, dim, how="cat"):
    """The bias flowing out of a cat/stack: pieces (None = zero) broadcast to a common batch
    (``xs``: the items' shapes; one piece at least is not None)."""
    B = max((z.shape[0] for z in zs if z is not None), default=1)
    ref = next(z for z in zs if z is not None)
    parts = []
    for z, x in zip(zs, xs):
        shape = (B,) + tuple(ops.shape_of(x)[1:])
        parts.append(ref.new_zeros(shape) if z is None else z.expand(shape))
    return torch.cat(parts, dim=dim) if how == "cat" else torch.stack(parts, dim=dim)


def _zero_filled(maps, xs, caxes):
    """Maps of the list's items, zeros for items that carry no relevance (constants)."""
    full = []
    for m, x in zip(maps, xs):
        if m is None:
            shape = list(x.shape)
            for a in caxes:
                shape[a] = 1
            m = x.new_zeros(shape)
        full.append(m)
    return full


def cat_maps(maps, xs, dim, caxes, channel):
    """Shadow of cat: channel cat sums maps, positional cat concatenates them."""
    if channel:
        out = None
        for m in maps:
            if m is not None:
                out = m if out is None else out + m
        return out
    return torch.cat(_zero_filled(maps, xs, caxes), dim=dim)


def cat_maps_T(m, xs, dim, channel):
    if channel:
        return [m for _ in xs]
    return list(torch.split(m, [ops.shape_of(x)[dim] for x in xs], dim=dim))


@ops.shape_args(1)
def reshape_map(m, out, caxes):
    """Shadow of a reshape: same positions -> reshape; positions merged into one -> sum.  ``out``:
    the output or its shape (so for the helpers below that take a tensor only for its shape)."""
    target = list(ops.shape_of(out))
    for a in caxes:
        target[a] = 1
    if m.numel() == math.prod(target):
        return m.reshape(target)
    if math.prod(target[1:]) == 1:  # every position flows into the single output PFV
        return m.sum(dim=tuple(range(1, m.dim()))).reshape(target)
    raise ValueError(f"reshape of the map {tuple(m.shape)} -> {tuple(target)} mixes channels and positions")


def reduce_keep(m, axes):
    return m.sum(dim=tuple(axes), keepdim=True)


@ops.shape_args(1)
def reshape_map_T(m, x, caxes, absorbed=()):
    target = list(ops.shape_of(x))
    for a in caxes:
        target[a] = 1
    small = list(target)
    for a in absorbed:
        small[a] = 1
    return m.reshape(small).expand(target) if absorbed else m.reshape(target)


@ops.shape_args(1)
def reshape_bias(z, x, out_shape):
    return z.expand(ops.shape_of(x)).reshape(out_shape)


@ops.shape_args(1)
def reshape_T(g, x):
    return g.reshape(ops.shape_of(x))


def _is_array_index(i):
    """An integer-array index entry: a tensor, a list of ints, or (while tracing) a graph node."""
    return isinstance(i, (torch.Tensor, list, torch.fx.Node))


def normalise_index(idx, rank):
    """``idx`` as a tuple of one entry per axis (ints, slices and at most one 1-D integer array, which
    selects positions or channels along its axis and keeps that axis in place)."""
    idx = idx if isinstance(idx, tuple) else (idx,)
    if any(i is None or isinstance(i, bool) for i in idx):
        raise UnsupportedOpError("indexing with None or a bool inside a block is not supported; "
                                 "use unsqueeze / torch.where outside the explained part")
    arrays = [i for i in idx if _is_array_index(i)]
    if len(arrays) > 1 or any(isinstance(i, torch.Tensor) and (i.dtype == torch.bool or i.dim() != 1)
                              for i in arrays):
        raise UnsupportedOpError("advanced indexing inside a block is supported only with one 1-D integer "
                                 "index (x[:, :, perm]); this index has several or a mask or a multi-dimensional one")
    n_ell = sum(i is Ellipsis for i in idx)
    if n_ell:
        k = idx.index(Ellipsis)
        fill = rank - (len(idx) - 1)
        idx = idx[:k] + (slice(None),) * fill + idx[k + 1:]
    return idx + (slice(None),) * (rank - len(idx))


def _map_index(idx, caxes):
    """The index of a one-channel map: an int on a channel axis picks the map's single entry, any
    other entry on a channel axis keeps it (size 1); position axes are indexed as the tensor is."""
    return tuple((0 if isinstance(i, int) else slice(None)) if d in caxes else i for d, i in enumerate(idx))


def index_map(m, idx, caxes):
    return m[_map_index(normalise_index(idx, m.dim()), caxes)]


@ops.shape_args(1)
def index_map_T(m, x, idx, caxes):
    shape = list(ops.shape_of(x))
    for a in caxes:
        shape[a] = 1
    out = m.new_zeros(shape)
    idx = _map_index(normalise_index(idx, len(shape)), caxes)
    arr = [d for d, i in enumerate(idx) if _is_array_index(i)]
    if not arr:
        out[idx] = m
        return out
    # an integer array along a position axis may repeat positions: their map entries add up
    d = arr[0]
    view = out[tuple(slice(None) if k == d else i for k, i in enumerate(idx))]
    dv = d - sum(isinstance(i, int) for i in idx[:d])
    view.index_add_(dv, torch.as_tensor(idx[d], device=m.device), m)
    return out


def split_item(x, how, size_or_n, dim, i):
    if how == "unbind":
        return x.select(dim, i)
    parts = torch.split(x, size_or_n, dim) if how == "split" else torch.chunk(x, size_or_n, dim)
    return parts[i]


def split_item_T(g, x, how, size_or_n, dim, i):
    shape = ops.shape_of(x)
    if how == "unbind":
        out = g.new_zeros(shape)
        out.select(dim, i).copy_(g)
        return out
    x = torch.empty(shape, device="meta")  # the sizes of the parts, as torch splits them
    parts = torch.split(x, size_or_n, dim) if how == "split" else torch.chunk(x, size_or_n, dim)
    start = sum(p.shape[dim] for p in parts[:i])
    pad = [0, 0] * (x.dim() - dim % x.dim() - 1) + [start, x.shape[dim] - start - g.shape[dim]]
    return F.pad(g, pad)


def pad_map(m, pad, caxes, mode="constant"):
    rank = m.dim()
    pad = list(pad)
    for k in range(len(pad) // 2):
        if (rank - 1 - k) in caxes:
            pad[2 * k] = pad[2 * k + 1] = 0
    return F.pad(m, pad, mode=mode) if mode != "constant" else F.pad(m, pad)


def pad_map_T(m, x, pad, caxes):
    rank = m.dim()
    crop = []
    for k in range(len(pad) // 2):
        if (rank - 1 - k) in caxes:
            crop += [0, 0]
        else:
            crop += [-pad[2 * k], -pad[2 * k + 1]]
    return F.pad(m, crop)


def interp_maps(m, x, out, mode, align_corners):
    sx, so = ops.shape_of(x), ops.shape_of(out)
    return [ops.interp_support(sx[2 + i], so[2 + i], mode, align_corners, None, m)
            for i in range(len(sx) - 2)]


def interp_map(m, x, out, mode, align_corners):
    return ops.separable_apply(m, interp_maps(m, x, out, mode, align_corners))


def interp_map_T(m, x, out, mode, align_corners):
    return ops.separable_apply(m, [A.t() for A in interp_maps(m, x, out, mode, align_corners)])


# -------------------------------------------------------------------------- rules -------
class _ListOp(Rule):
    """Ops over a list of tensors (cat, stack): per-item pieces routed back to the main inputs."""
    pointwise = False
    how = "cat"

    def _spec(self, b, node):
        xs, dim = arg(node, 0, "tensors"), arg(node, 1, "dim", 0)
        return list(xs), dim % len(b.shape(node))

    def _route(self, b, node, pieces, xs):
        """Item k of ``pieces`` to the k-th list item, summed when a tensor appears twice."""
        got = {}
        for k, x in enumerate(xs):
            if x in b.main_inputs(node):
                p = b.call(operator.getitem, pieces, k)
                got[x] = p if x not in got else b.call(torch.add, got[x], p)
        return b.first_occurrence(node, got)

    def bias(self, b, node, zs):
        xs, dim = self._spec(b, node)
        mains = set(b.main_inputs(node))
        # a constant item (a class token: SPEC §8, prefix tokens) is bias even when no bias flows in
        if all(z is None for z in zs) and all(x in mains for x in xs):
            return None
        by = dict(zip(b.main_inputs(node), zs))
        pieces = [by.get(x) if x in mains else b.val(x) for x in xs]
        return b.call(list_bias, pieces, [b.size_of(x) for x in xs], dim, self.how)


class Cat(_ListOp):

    def layout(self, b, node):
        xs, _ = self._spec(b, node)
        mains = [x for x in xs if x in b.main_inputs(node)]
        return b.caxes(mains[0])

    def transpose(self, b, node, g):
        xs, dim = self._spec(b, node)
        return self._route(b, node, b.call(cat_T, g, dim, [b.size_of(x) for x in xs], name="g_split"), xs)

    def shadow(self, b, node, ms):
        xs, dim = self._spec(b, node)
        by = dict(zip(b.main_inputs(node), ms))
        channel = dim in b.caxes(node)
        return b.call(cat_maps, [by.get(x) for x in xs], [b.val(x) for x in xs], dim, b.caxes(node), channel)

    def shadow_T(self, b, node, m):
        xs, dim = self._spec(b, node)
        channel = dim in b.caxes(node)
        return self._route(b, node, b.call(cat_maps_T, m, [b.size_of(x) for x in xs], dim, channel), xs)


def _row_major_groups(si, so):
    """The groups of a row-major reshape ``si -> so``: pairs (input axes, output axes) whose sizes
    have equal products, each as small as possible, axes of size 1 left out.  None when the sizes
    do not line up (a reshape that is not a plain view)."""
    ins = [d for d in range(len(si)) if si[d] != 1]
    outs = [d for d in range(len(so)) if so[d] != 1]
    groups, i, o = [], 0, 0
    while i < len(ins) and o < len(outs):
        gi, go = [ins[i]], [outs[o]]
        pi, po = si[ins[i]], so[outs[o]]
        i, o = i + 1, o + 1
        while pi != po:
            if pi < po and i < len(ins):
                gi.append(ins[i]); pi *= si[ins[i]]; i += 1
            elif po < pi and o < len(outs):
                go.append(outs[o]); po *= so[outs[o]]; o += 1
            else:
                return None
        groups.append((gi, go))
    return groups if i == len(ins) and o == len(outs) else None


def _exact_plan(si, so, ci):
    """The reshape plan read from which elements go where, when that is unambiguous: every group
    of the row-major reshape (see :func:`_row_major_groups`) is made of channel axes only or of
    batch/position axes only, no channel group touches the batch axis, and the output has no new
    axis of size 1 (whose label the sizes do not tell).  A channel group's output axes are channel
    axes; the others are positions, or the batch axis (windows folded into it or unfolded from it
    stay positions, SPEC §8).  Unlike matching sizes, this cannot mistake a head size or a channel
    count for a token count (MaxViT: (B, 64, 2, 32) -> (B, 8, 8, 64) merges the heads back, it does
    not move channels to positions).  None otherwise: the size-matching plans below decide."""
    if any(so[d] == 1 for d in range(1, len(so))):
        return None
    groups = _row_major_groups(si, so)
    if groups is None:
        return None
    out_c = []
    for gi, go in groups:
        kinds = {d in ci for d in gi}
        if len(kinds) != 1:
            return None
        if kinds == {True}:
            if 0 in gi or 0 in go:
                return None
            out_c += go
    if not out_c:       # only size-1 channels: no channel axis to read (an empty set means unlabelled)
        return None
    return tuple(sorted(out_c)), ()


def _absorbing_plan(si, so, ci):
    """Positions merged into channels read from the row-major grouping (see
    :func:`_row_major_groups`): a group made of position axes only stays positions; a group that
    holds a channel axis becomes channels and *absorbs* its position axes (NaFlexViT's patchify
    ``(B, nh, nw, ph, pw, C) -> (B, nh * nw, ph * pw * C)``: a patch token's PFV holds every pixel of
    the patch).  None when the sizes do not group, the batch axis is grouped with a channel, or no
    position axis is left."""
    groups = _row_major_groups(si, so)
    if groups is None:
        return None
    out_c, absorbed = [], []
    for gi, go in groups:
        if any(d in ci for d in gi):
            if 0 in gi or 0 in go:
                return None
            out_c += go
            absorbed += [d for d in gi if d not in ci]
    if not out_c or not any(so[d] > 1 for d in range(1, len(so)) if d not in out_c):
        return None     # nothing merged, or every position merged into one PFV inside a block
    return tuple(sorted(out_c)), tuple(sorted(absorbed))


class Reshape(Rule):
    """flatten / view / reshape.

    Positions are matched between input and output (channels may be split or merged freely).
    Input positions that are merged into the output's channels (flatten to (B, F), timm's
    space-to-depth) are *absorbed*: the output PFV is reached from all of them, so the shadow sums
    the map over them."""
    pointwise = False

    def _plan(self, info, node):
        """(output channel axes, absorbed input axes), from the analysis ``info``."""
        x = info.main_inputs(node)[0]
        si, so, ci = list(info.shape(x)), list(info.shape(node)), info.caxes(x)
        P = [d for d in range(1, len(si)) if d not in ci]
        psz = [si[d] for d in P]
        csz = [si[d] for d in ci]
        exact = _exact_plan(si, so, ci) if len(so) > 2 else None
        if exact is not None:
            return exact
        if si[0] != so[0] and ci:
            # positions folded into (or unfolded from) the batch axis (LeViT's flatten(0, 1) for a
            # BatchNorm1d, window partitions): the channel axes are found by their sizes
            if list(ci) == list(range(len(si) - len(ci), len(si))) and so[len(so) - len(ci):] == csz:
                return tuple(range(len(so) - len(ci), len(so))), ()
            if list(ci) == list(range(1, 1 + len(ci))) and so[1:1 + len(ci)] == csz:
                return tuple(range(1, 1 + len(ci))), ()
        if si[0] != so[0]:
            info.unsupported(node, f"reshape {tuple(si)} -> {tuple(so)} moves channels into the batch axis")
        if len(so) == 2:  # (B, F): one PFV
            return (1,), tuple(P)
        rest = so[1:]
        # positions kept as trailing (NCHW-like) or leading (NHWC-like) output dims, possibly after
        # absorbing the leading input positions (space-to-depth); a channels-last input tries the
        # channels-last reading first (a head size equal to the token count is then no ambiguity)
        channels_last = bool(ci) and list(ci) == list(range(len(si) - len(ci), len(si))) and P and max(P) < min(ci)
        leading = [(tuple(range(1 + len(P), len(so))), ())] \
            if rest[:len(P)] == psz and len(rest) > len(P) else []
        trailing = [(tuple(range(1, 1 + len(rest) - k)), tuple(P[:len(P) - k]))
                    for k in range(len(P), 0, -1)
                    if rest[len(rest) - k:] == psz[len(psz) - k:] and len(rest) > k]
        if channels_last and rest[len(rest) - len(ci):] == csz and not leading:
            # channels stay the trailing dims, positions split finer (a window partition); read
            # before the NCHW space-to-depth plans, which a channel size equal to a position size
            # would otherwise match
            return tuple(range(len(so) - len(ci), len(so))), ()
        for plan in (leading + trailing if channels_last else trailing + leading)[:1]:
            return plan
        # channels kept as the leading (NCHW-like) or trailing dims, positions split finer
        if ci and list(ci) == list(range(1, 1 + len(ci))) and rest[:len(ci)] == csz:
            return tuple(range(1, 1 + len(ci))), ()
        if ci and list(ci) == list(range(len(si) - len(ci), len(si))) and rest[len(rest) - len(ci):] == csz:
            return tuple(range(len(so) - len(ci), len(so))), ()
        # token layouts (SPEC §8): positions regrouped in front of the channels, channels split into
        # heads or merged back (MaxViT: (B, 7, 7, C) -> (B, 49, 3, heads, d), Twins: (B, 8, 8, 7, 7,
        # C) -> (B, 64, 49, 3, heads, d)), or channels in front (CoAtNet: (B, C, 14, 14) -> (B,
        # heads, d, 196)); channels-last space-to-depth keeping the leading positions (Swin's patch
        # merging)
        n_pos, n_ch = math.prod(psz), math.prod(csz)
        for j in range(1, len(rest)):
            head, tail = math.prod(rest[:j]), math.prod(rest[j:])
            if channels_last and head == n_pos and tail == n_ch:       # positions first, then channels
                return tuple(range(1 + j, len(so))), ()
            if not channels_last and ci and list(ci) == list(range(1, 1 + len(ci))) \
                    and head == n_ch and tail == n_pos:                 # channels first, then positions
                return tuple(range(1, 1 + j)), ()
        if channels_last:
            for k in range(len(P) - 1, 0, -1):
                if rest[:k] == psz[:k] and len(rest) > k:
                    return tuple(range(1 + k, len(so))), tuple(P[k:])
        absorbing = _absorbing_plan(si, so, ci)
        if absorbing is not None:
            return absorbing
        info.unsupported(node, f"reshape {tuple(si)} -> {tuple(so)} mixes channels and positions in a way "
                               "srd_fx cannot map; register a rule for this module")

    def layout(self, b, node):
        # where every element comes from says exactly which axes are channels and which are
        # positions (sizes alone are ambiguous: a channel count equal to a grid size, a patch
        # axis of size 1, MobileViTv2's (B, C, 1, 2, 1, 2) patch split)
        x = b.main_inputs(node)[0]
        found = b.provenance_layout(node)
        if found == () and node.users and all(isinstance(b.rule.get(u), Reshape) for u in node.users):
            return ()   # mixed, but only reshaped again: the next reshape reads its labels from the elements
        if found != () or b.caxes(x) == () or x in b.folded or b.shape(x)[0] != b.shape(node)[0]:
            # an unlabelled result: channels folded into the batch axis or mixed with positions
            # (MobileViT's unfold to patches, MViTv2's head merge) until a later reshape separates
            # them; unless positions merge into channels with positions left (TNT's pixels into
            # their patch token): those are absorbed
            return found or b.provenance_layout(node, absorb=True)
        try:
            # positions merged into channels (a flatten to (B, F), space-to-depth): the size plan
            # says which positions are absorbed
            return self._plan(b, node)[0]
        except UnsupportedOpError:
            return found

    def _by_elements(self, b, node):
        """The shadow follows the elements (the op on the map spread over the channels) when either
        side is unlabelled, or the size-based plan disagrees with the labels found from the
        elements.  unit="neuron" maps are full size anyway."""
        if b.unit == "neuron":
            return False
        info = b.info
        x = info.main_inputs(node)[0]
        if info.caxes(node) == () or info.caxes(x) == () or x in info.folded or node in info.folded:
            return True
        try:
            return self._plan(info, node)[0] != info.caxes(node)
        except UnsupportedOpError:
            return True

    def transpose(self, b, node, g):
        return [b.call(reshape_T, g, b.size_of(b.main_inputs(node)[0]))]

    def _full_map_spec(self, b, node):
        # a view of the expanded (non-contiguous) map may not exist: reshape it
        fn = "method:" + {"view": "reshape"}.get(node.target, node.target) if node.op == "call_method" \
            else fn_name_of(node.target)
        return fn, b.size_of(b.main_inputs(node)[0]), b.caxes(node), b.val(node.args[1:]), b.val(node.kwargs)

    def shadow(self, b, node, ms):
        if b.unit != "neuron" and node in b.info.absorbs:   # each output PFV sums the PFVs it absorbs
            x = b.main_inputs(node)[0]
            return b.call(absorbed_map, ms[0], *self._full_map_spec(b, node)[:2], b.caxes(x),
                          *self._full_map_spec(b, node)[2:])
        if self._by_elements(b, node):   # the op itself on the map spread over the channels
            return b.call(rearranged_map, ms[0], *self._full_map_spec(b, node))
        absorbed = self._plan(b.info, node)[1] if b.unit != "neuron" else ()
        m = b.call(reduce_keep, ms[0], absorbed) if absorbed else ms[0]
        return b.call(reshape_map, m, b.size_of(node), b.caxes(node))

    def shadow_T(self, b, node, m):
        x = b.main_inputs(node)[0]
        if b.unit != "neuron" and node in b.info.absorbs:
            fn, size, cout, args, kwargs = self._full_map_spec(b, node)
            return b.vjp_shadow(absorbed_map, (fn, size, b.caxes(x), cout, args, kwargs), m, x)
        if self._by_elements(b, node):
            return b.vjp_shadow(rearranged_map, self._full_map_spec(b, node), m, x)
        absorbed = self._plan(b.info, node)[1] if b.unit != "neuron" else ()
        return [b.call(reshape_map_T, m, b.size_of(x), b.caxes(x), absorbed)]

    def bias(self, b, node, zs):
        # the bias flowing in may have batch 1; the reshape's sizes name the real batch (B, N, ...)
        if zs[0] is None:
            return None
        return b.call(reshape_bias, zs[0], b.size_of(b.main_inputs(node)[0]), b.size_of(node))

    def is_global_reduction(self, b, node):
        x = b.main_inputs(node)[0]
        return len(b.shape(node)) == 2 and len(b.shape(x)) >= 3 and b.shape(node)[0] == b.shape(x)[0] and \
            any(b.shape(x)[d] > 1 for d in range(2, len(b.shape(x))))


class Stack(_ListOp):
    """torch.stack: a new axis; before the channel axis it is a channel axis (paths stacked into
    one PFV, as in selective-kernel attention), otherwise a new position axis."""
    how = "stack"

    def _channel(self, info, node):
        """The new axis is a channel axis (from the analysis ``info``)."""
        xs, dim = self._spec(info, node)
        mains = [x for x in xs if x in info.main_inputs(node)]
        return dim <= max(info.caxes(mains[0]))

    def layout(self, b, node):
        xs, dim = self._spec(b, node)
        mains = [x for x in xs if x in b.main_inputs(node)]
        ci = tuple(c + 1 if c >= dim else c for c in b.caxes(mains[0]))
        return tuple(sorted(ci + ((dim,) if self._channel(b, node) else ())))

    def transpose(self, b, node, g):
        xs, dim = self._spec(b, node)
        return self._route(b, node, b.call(torch.unbind, g, dim), xs)

    def shadow(self, b, node, ms):
        xs, dim = self._spec(b, node)
        by = dict(zip(b.main_inputs(node), ms))
        return b.call(stack_maps, [by.get(x) for x in xs], [b.val(x) for x in xs], dim,
                      b.caxes(xs[0]) if xs[0] in by else b.caxes(b.main_inputs(node)[0]),
                      self._channel(b.info, node))

    def shadow_T(self, b, node, m):
        xs, dim = self._spec(b, node)
        return self._route(b, node, b.call(stack_maps_T, m, len(xs), dim, self._channel(b.info, node)), xs)


def stack_maps(maps, xs, dim, caxes, channel):
    full = _zero_filled(maps, xs, caxes)
    if channel:
        out = full[0]
        for m in full[1:]:
            out = out + m
        return out.unsqueeze(dim)
    return torch.stack(full, dim=dim)


def stack_maps_T(m, n, dim, channel):
    if channel:
        return [m.squeeze(dim) for _ in range(n)]
    return list(torch.unbind(m, dim))


class Permute(Rule):
    """permute / transpose / movedim: positions and channels are moved, maps follow."""
    pointwise = False

    def _perm(self, b, node):
        rank = len(b.shape(node))
        t = node.target
        name = t if isinstance(t, str) else t.__name__
        if name == "permute":
            p = node.args[1:] if len(node.args) > 2 else node.args[1] if len(node.args) > 1 else node.kwargs["dims"]
            if isinstance(p, int):
                p = node.args[1:]
            return [d % rank for d in p]
        a = node.args[1] % rank
        c = node.args[2] % rank
        p = list(range(rank))
        p[a], p[c] = p[c], p[a]
        return p

    def layout(self, b, node):
        p = self._perm(b, node)
        ci = b.caxes(b.main_inputs(node)[0])
        return tuple(sorted(p.index(c) for c in ci))

    def shadow(self, b, node, ms):
        return b.call(torch.permute, ms[0], self._perm(b, node))

    def shadow_T(self, b, node, m):
        p = self._perm(b, node)
        inv = [p.index(i) for i in range(len(p))]
        return [b.call(torch.permute, m, inv)]

    def transpose(self, b, node, g):
        p = self._perm(b, node)
        inv = [p.index(i) for i in range(len(p))]
        return [b.call(torch.permute, g, inv)]


class GetItem(Rule):
    """Tensor indexing/slicing, and items of split/chunk."""
    pointwise = False

    def _split(self, node):
        src = node.args[0]
        if isinstance(src, torch.fx.Node) and getattr(src, "op", None) in ("call_method", "call_function"):
            t = src.target if isinstance(src.target, str) else getattr(src.target, "__name__", "")
            if t in ("split", "chunk"):
                size = arg(src, 1, "split_size_or_sections" if t == "split" else "chunks")
                return src.args[0], t, size, arg(src, 2, "dim", 0), node.args[1]
            if t == "unbind":   # one slice along dim (q, k, v = qkv.unbind(0))
                return src.args[0], t, None, arg(src, 1, "dim", 0), node.args[1]
        return None

    def layout(self, b, node):
        sp = self._split(node)
        x = sp[0] if sp else node.args[0]
        ci = b.caxes(x)
        if sp and sp[1] == "unbind":
            if ci == ():
                return ()       # an item of an unlabelled tensor is unlabelled
            d = sp[3] % len(b.shape(x))
            return tuple(c - (c > d) for c in ci if c != d) or (len(b.shape(node)) - 1,)
        if sp:
            return ci
        idx = normalise_index(node.args[1], len(b.shape(x)))
        kept = [d for d, i in enumerate(idx) if not isinstance(i, int)]
        return tuple(kept.index(c) for c in ci if c in kept) or (1,)

    def is_global_reduction(self, b, node):
        """Selecting one token (``x[:, 0]``, a class-token head) ends the encoder (SPEC §8)."""
        if self._split(node) or not b.is_tensor(node.args[0]):
            return False
        x = node.args[0]
        shape, ci = b.shape(x), b.caxes(x)
        pos = [d for d in range(1, len(shape)) if d not in ci]
        try:
            idx = normalise_index(node.args[1], len(shape))
        except ValueError:
            return False
        return bool(pos) and any(shape[d] > 1 for d in pos) and all(isinstance(idx[d], int) for d in pos)

    def transpose(self, b, node, g):
        sp = self._split(node)
        if sp:
            x, how, size, dim, i = sp
            return [b.call(split_item_T, g, b.size_of(x), how, size, dim, i)]
        return b.vjp(node, g)

    def shadow(self, b, node, ms):
        sp = self._split(node)
        if sp:
            x, how, size, dim, i = sp
            if dim % len(b.shape(x)) in b.caxes(x):
                return b.call(split_item, ms[0], how, size, dim, 0) if how == "unbind" else ms[0]
            return b.call(split_item, ms[0], how, size, dim, i)
        x = node.args[0]
        return b.call(index_map, ms[0], b.val(node.args[1]), b.caxes(x))

    def shadow_T(self, b, node, m):
        sp = self._split(node)
        if sp:
            x, how, size, dim, i = sp
            if dim % len(b.shape(x)) in b.caxes(x):
                return [b.call(torch.unsqueeze, m, dim % len(b.shape(x)))] if how == "unbind" else [m]
            return [b.call(split_item_T, m, b.call(map_shape, b.size_of(x), b.caxes(x)), how, size, dim, i)]
        x = node.args[0]
        return [b.call(index_map_T, m, b.size_of(x), b.val(node.args[1]), b.caxes(x))]

    def bias(self, b, node, zs):
        if zs[0] is None:
            return None
        sp = self._split(node)
        z = b.call(materialize, zs[0], b.size_of(sp[0] if sp else node.args[0]))
        if sp:
            x, how, size, dim, i = sp
            return b.call(split_item, z, how, size, dim, i)
        return b.call(operator.getitem, z, b.val(node.args[1]))


def materialize(z, like):
    """Broadcast a bias tensor (possibly batch 1 / spatially constant) to ``like``'s shape
    (``like``: a tensor or its shape)."""
    shape = ops.shape_of(like)
    return z.expand(z.shape[0] if z.shape[0] == 1 else shape[0], *shape[1:]) \
        if z.dim() == len(shape) else z.expand(shape)


class Pad(Rule):
    pointwise = False

    def _spec(self, b, node):
        if node.op == "call_module":
            m = b.module(node)
            return list(m.padding), "constant", getattr(m, "value", 0.0)
        pad, mode, value = arg(node, 1, "pad"), arg(node, 2, "mode", "constant"), arg(node, 3, "value", 0.0)
        return b.val(list(pad)), mode, value or 0.0   # sizes computed in the forward (Swin's pad to windows)

    def bias(self, b, node, zs):
        pad, mode, value = self._spec(b, node)
        if zs[0] is None and (mode != "constant" or value == 0):
            return None
        return b.apply_with_inputs(node, zs)

    def shadow(self, b, node, ms):
        pad, mode, _ = self._spec(b, node)
        return b.call(pad_map, ms[0], pad, b.caxes(node), mode)

    def shadow_T(self, b, node, m):
        pad, mode, _ = self._spec(b, node)
        x = b.main_inputs(node)[0]
        if mode != "constant":
            return b.vjp_shadow(pad_map, (pad, b.caxes(node), mode), m, x)
        return [b.call(pad_map_T, m, b.size_of(x), pad, b.caxes(x))]


class Interpolate(Rule):
    pointwise = False

    def _spec(self, b, node):
        if node.op == "call_module":
            m = b.module(node)
            return m.mode, m.align_corners
        return arg(node, 3, "mode", "nearest"), arg(node, 4, "align_corners")

    def layout(self, b, node):
        return (1,)

    def shadow(self, b, node, ms):
        mode, ac = self._spec(b, node)
        return b.call(interp_map, ms[0], b.size_of(node.args[0]), b.size_of(node), mode, ac)

    def shadow_T(self, b, node, m):
        mode, ac = self._spec(b, node)
        return [b.call(interp_map_T, m, b.size_of(node.args[0]), b.size_of(node), mode, ac)]


class Unsqueeze(Rule):
    """unsqueeze / squeeze of size-1 axes: maps follow, channel axes are renumbered."""
    pointwise = False

    def _dim(self, b, node, rank):
        return arg(node, 1, "dim")

    def _name(self, node):
        t = node.target
        return t if isinstance(t, str) else t.__name__

    def layout(self, b, node):
        x = b.main_inputs(node)[0]
        ci = b.caxes(x)
        si, so = b.shape(x), b.shape(node)
        if self._name(node) == "unsqueeze":
            d = self._dim(b, node, len(so)) % len(so)
            return tuple(c + 1 if c >= d else c for c in ci)
        kept = [i for i in range(len(si)) if not (si[i] == 1 and len(so) < len(si) and
                                                  (self._dim(b, node, len(si)) is None or
                                                   i in _dims_of(self._dim(b, node, len(si)), len(si))))]
        return tuple(kept.index(c) for c in ci if c in kept) or (len(so) - 1,)

    def transpose(self, b, node, g):
        return [b.call(reshape_T, g, b.size_of(b.main_inputs(node)[0]))]

    def shadow(self, b, node, ms):
        return b.call(reshape_map, ms[0], b.size_of(node), b.caxes(node))

    def shadow_T(self, b, node, m):
        x = b.main_inputs(node)[0]
        return [b.call(reshape_map_T, m, b.size_of(x), b.caxes(x))]


def _dims_of(d, rank):
    d = (d,) if isinstance(d, int) else tuple(d)
    return tuple(v % rank for v in d)


def matmul_map(m, out, caxes, channel):
    target = list(ops.shape_of(out))
    for a in caxes:
        target[a] = 1
    if channel:
        return m.expand(target) if list(m.shape) != target else m
    return m.sum(-1, keepdim=True).expand(target)


def matmul_map_T(m, a, caxes, channel):
    target = list(ops.shape_of(a))
    for c in caxes:
        target[c] = 1
    if channel:
        return ops.expand_map(m, a, caxes)
    return m.sum(-1, keepdim=True).expand(target)


for t in ("method:unsqueeze", torch.unsqueeze, "method:squeeze", torch.squeeze):
    register_rule(t, Unsqueeze())
register_rule(torch.cat, Cat())
register_rule(torch.stack, Stack())
register_rule(torch.concat, Cat())
for t in (torch.flatten, "method:flatten", nn.Flatten, "method:view", "method:reshape", torch.reshape):
    register_rule(t, Reshape())
def roll_map(m, shifts, dims, caxes):
    """Shadow of ``torch.roll``: the map is rolled along the position axes (a roll along a channel
    axis leaves the PFVs where they are)."""
    shifts = (shifts,) if isinstance(shifts, int) else tuple(shifts)
    if dims is None:
        return m.flatten().roll(shifts[0]).reshape(m.shape) if not caxes else m
    dims = (dims,) if isinstance(dims, int) else tuple(dims)
    keep = [(s, d % m.dim()) for s, d in zip(shifts, dims) if d % m.dim() not in caxes]
    if not keep:
        return m
    return torch.roll(m, [s for s, _ in keep], [d for _, d in keep])


def roll_map_T(m, shifts, dims, caxes):
    shifts = (shifts,) if isinstance(shifts, int) else tuple(shifts)
    return roll_map(m, tuple(-s for s in shifts), dims, caxes)


class Roll(Rule):
    """``torch.roll`` (Swin's cyclic shift): positions are permuted, maps follow."""
    pointwise = False

    def _spec(self, node):
        return arg(node, 1, "shifts"), arg(node, 2, "dims")

    def transpose(self, b, node, g):
        shifts, dims = self._spec(node)
        shifts = (shifts,) if isinstance(shifts, int) else tuple(shifts)
        return [b.call(torch.roll, g, tuple(-s for s in shifts), dims)]

    def shadow(self, b, node, ms):
        shifts, dims = self._spec(node)
        return b.call(roll_map, ms[0], shifts, dims, b.caxes(node))

    def shadow_T(self, b, node, m):
        shifts, dims = self._spec(node)
        return [b.call(roll_map_T, m, shifts, dims, b.caxes(node))]


for t in (torch.roll, "method:roll"):
    register_rule(t, Roll())


def rearranged_map(m, fn, x_shape, caxes_out, args, kwargs):
    """Shadow of a pure rearrangement of positions ``fn(x, *args)`` (timm's window_reverse and
    kin): the map is broadcast over the channels, rearranged, and one channel is kept."""
    from ..compiler.runtime import _call
    out = _call(fn, [m.expand(x_shape), *args], kwargs)
    idx = tuple(slice(0, 1) if d in caxes_out else slice(None) for d in range(out.dim()))
    return out[idx]


def absorbed_map(m, fn, x_shape, caxes_in, caxes_out, args, kwargs):
    """Shadow of a reshape that merges positions into channels (an absorbing reshape): each input
    PFV's map is put at channel 0 of its PFV (zeros elsewhere), the reshape is applied, and every
    output PFV sums what landed in it (the maps of all the PFVs it absorbed)."""
    from ..compiler.runtime import _call
    pad = []
    for d in reversed(range(len(x_shape))):
        pad += [0, x_shape[d] - m.shape[d]] if d in caxes_in else [0, 0]
    out = _call(fn, [F.pad(m, pad), *args], kwargs)
    return out.sum(dim=tuple(caxes_out), keepdim=True) if caxes_out else out


def rearranged_bias(z, fn, x, args, kwargs):
    from ..compiler.runtime import _call
    return _call(fn, [z.expand(ops.shape_of(x)), *args], kwargs)


class Rearrange(Rule):
    """A function that only moves positions (window/grid reverse, de-blockify): linear, channels
    stay the channel axis (last or 1), its shadow is the function applied to the map."""
    pointwise = False
    main_args = (0,)

    def layout(self, b, node):
        x = node.args[0]
        ci, rank = layout_axes(b, x), len(b.shape(x))
        return (len(b.shape(node)) - 1,) if ci == (rank - 1,) else ci

    def _fn(self, node):
        from ..compiler.runtime import fn_name
        return fn_name(node.target)

    def bias(self, b, node, zs):
        if zs[0] is None:
            return None
        return b.call(rearranged_bias, zs[0], self._fn(node), b.size_of(node.args[0]), b.val(node.args[1:]),
                      b.val(node.kwargs))

    def shadow(self, b, node, ms):
        return b.call(rearranged_map, ms[0], self._fn(node), b.size_of(node.args[0]), b.caxes(node),
                      b.val(node.args[1:]), b.val(node.kwargs))

    def shadow_T(self, b, node, m):
        x = node.args[0]
        return b.vjp_shadow(rearranged_map, (self._fn(node), b.size_of(x), b.caxes(node),
                                             b.val(node.args[1:]), b.val(node.kwargs)), m, x)


def _register_timm_rearrangements():
    import importlib
    names = {"timm.models.swin_transformer": ["window_reverse"],
             "timm.models.swin_transformer_v2": ["window_reverse"],
             "timm.models.swin_transformer_v2_cr": ["window_reverse"],
             "timm.models.gcvit": ["window_reverse"], "timm.models.davit": ["window_reverse"],
             "timm.models.maxxvit": ["window_reverse", "window_reverse_nchw", "grid_reverse",
                                     "grid_reverse_nchw"],
             "timm.models.nest": ["deblockify"]}
    for mod, fns in names.items():
        try:
            m = importlib.import_module(mod)
        except Exception:
            continue
        for f in fns:
            if callable(getattr(m, f, None)):
                register_rule(getattr(m, f), Rearrange())


_register_timm_rearrangements()


def expand_map(m, out_shape, caxes_out):
    """Shadow of ``expand``: a size-1 position axis broadcast to n positions reaches each of them
    from its one source position (channel axes stay size 1 in the map)."""
    t = list(out_shape)
    for a in caxes_out:
        t[a] = 1
    if m.dim() < len(t):
        m = m.reshape([1] * (len(t) - m.dim()) + list(m.shape))
    return m.expand(t)


class Expand(Rule):
    """``x.expand(...)`` / ``x.expand_as(y)``: copies along size-1 axes (MobileViTv2's context
    vector broadcast over the tokens); ``y`` only gives the shape."""
    pointwise = False
    main_args = (0,)

    def layout(self, b, node):
        x = node.args[0]
        shift = len(b.shape(node)) - len(b.shape(x))
        return tuple(c + shift for c in b.caxes(x))

    def transpose(self, b, node, g):
        return [b.unbroadcast(g, node.args[0], node)]

    def shadow(self, b, node, ms):
        return b.call(expand_map, ms[0], b.size_of(node), b.caxes(node))

    def shadow_T(self, b, node, m):
        x = node.args[0]
        return b.vjp_shadow(expand_map, (b.size_of(node), b.caxes(node)), m, x)

    def bias(self, b, node, zs):
        if zs[0] is None:
            return None
        return _copied_bias(b, node, zs[0])


def repeat_interleave_map(m, repeats, dim, caxes):
    """Shadow of ``repeat_interleave`` along ``dim``: along a channel axis (grouped-query attention
    repeats its key/value heads) the map stays; along positions each position's map is copied."""
    d = dim % m.dim()
    return m if d in caxes else m.repeat_interleave(repeats, dim=d)


class RepeatInterleave(Rule):
    """``x.repeat_interleave(n, dim)`` / ``torch.repeat_interleave(x, n, dim)`` with an int ``n``:
    copies along one axis, labels kept; transposed by autograd (linear)."""
    pointwise = False
    main_args = (0,)

    def _spec(self, b, node):
        n, dim = arg(node, 1, "repeats"), arg(node, 2, "dim")
        if not isinstance(n, int) or dim is None:
            b.unsupported(node, "repeat_interleave needs an int count and a dim inside a block")
        return n, dim

    def layout(self, b, node):
        return b.caxes(node.args[0])

    def transpose(self, b, node, g):
        return b.vjp(node, g)

    def shadow(self, b, node, ms):
        n, dim = self._spec(b, node)
        return b.call(repeat_interleave_map, ms[0], n, dim, b.caxes(node))

    def shadow_T(self, b, node, m):
        n, dim = self._spec(b, node)
        return b.vjp_shadow(repeat_interleave_map, (n, dim, b.caxes(node)), m, node.args[0])

    def bias(self, b, node, zs):
        if zs[0] is None:
            return None
        return _copied_bias(b, node, zs[0])


for t in ("method:repeat_interleave", torch.repeat_interleave):
    register_rule(t, RepeatInterleave())


def _copied_bias(b, node, z):
    """The bias flowing through an op that only copies (expand, repeat_interleave): the op itself,
    method or function, applied to the bias broadcast to its input's shape."""
    fn = "method:" + node.target if node.op == "call_method" else fn_name_of(node.target)
    return b.call(rearranged_bias, z, fn, b.size_of(node.args[0]), b.val(node.args[1:]), b.val(node.kwargs))


def fn_name_of(f):
    from ..compiler.runtime import fn_name
    return fn_name(f)


for t in ("method:expand", "method:expand_as"):
    register_rule(t, Expand())


class ReshapeAs(Reshape):
    """``x.reshape_as(y)`` / ``x.view_as(y)``: ``y`` only gives the shape."""
    main_args = (0,)


for t in ("method:reshape_as", "method:view_as"):
    register_rule(t, ReshapeAs())
for t in ("method:permute", torch.permute, "method:transpose", torch.transpose):
    register_rule(t, Permute())
register_rule(operator.getitem, GetItem())
for t in (F.pad, nn.ZeroPad2d, nn.ConstantPad1d, nn.ConstantPad2d, nn.ConstantPad3d, nn.ZeroPad1d):
    register_rule(t, Pad())
for t in (F.interpolate, nn.Upsample, nn.UpsamplingNearest2d, nn.UpsamplingBilinear2d):
    register_rule(t, Interpolate())
_meta = Meta()
for t in ("method:size", "method:dim", getattr, len, "method:split", torch.split, "method:chunk", torch.chunk,
          "method:unbind", torch.unbind):
    register_rule(t, _meta)


# ------------------------------------------------------------- several encoder outputs -------
# A timm ``forward_features`` that returns a list of tensors (CrossViT's branches, CoaT's
# parallel scales, EfficientViM's stage outputs) has them packed into one token tensor
# ``(B, sum of positions, widest channels)``: each tensor's positions flattened in its own order,
# its channels padded with zeros.  The head reads them back with ``unpack_feature``; the analysis
# inserts both (srd_fx.compiler.analysis).  ``specs``: per tensor (permutation putting its
# position axes before its channel axes, position sizes, channel sizes).
def _token_view(x, spec):
    perm, pos, ch = spec
    return x.permute(perm).reshape(x.shape[0], math.prod(pos), math.prod(ch))


def pack_features(xs, specs):
    B = max(x.shape[0] for x in xs)
    flat = [_token_view(x, s) for x, s in zip(xs, specs)]
    C = max(f.shape[2] for f in flat)
    return torch.cat([F.pad(f, (0, C - f.shape[2])).expand(B, -1, -1) for f in flat], dim=1)


def unpack_feature(A, i, specs):
    start = sum(math.prod(s[1]) for s in specs[:i])
    perm, pos, ch = specs[i]
    t = A[:, start:start + math.prod(pos), :math.prod(ch)].reshape(A.shape[0], *pos, *ch)
    return t.permute([perm.index(d) for d in range(len(perm))])


def pack_maps(ms, specs):
    """Shadow of :func:`pack_features`: the one-channel maps, flattened and concatenated."""
    B = max(m.shape[0] for m in ms)
    flat = [m.permute(s[0]).reshape(m.shape[0], math.prod(s[1]), 1) for m, s in zip(ms, specs)]
    return torch.cat([f.expand(B, -1, -1) for f in flat], dim=1)


def pack_maps_T(m, specs):
    out, start = [], 0
    for perm, pos, ch in specs:
        n = math.prod(pos)
        t = m[:, start:start + n].reshape(m.shape[0], *pos, *([1] * len(ch)))
        out.append(t.permute([perm.index(d) for d in range(len(perm))]))
        start += n
    return out


class PackFeatures(Rule):
    """:func:`pack_features`: the encoder outputs as one token tensor (positions on axis 1,
    channels on axis 2); linear (its transpose is autograd's), its shadow concatenates maps."""
    pointwise = False

    def layout(self, b, node):
        return (2,)

    def shadow(self, b, node, ms):
        return b.call(pack_maps, list(ms), node.args[1])

    def shadow_T(self, b, node, m):
        parts = b.call(pack_maps_T, m, node.args[1])
        return [b.call(operator.getitem, parts, k) for k in range(len(node.args[1]))]


register_rule(pack_features, PackFeatures())


class ScaleImage(Rule):
    """timm's CrossViT ``scale_image(x, size, crop_scale)`` (a no-trace function): the identity,
    a centre crop or a bicubic resize of the input to ``size``.  Linear; its shadow is the
    function on the map for the identity and the crop, the interpolation's source positions for
    the resize."""
    pointwise = False
    main_args = (0,)

    def _resized(self, b, node):
        x = node.args[0]
        same = b.shape(x)[-2:] == b.shape(node)[-2:]
        crop = arg(node, 2, "crop_scale", False) and all(o <= i for o, i in zip(b.shape(node)[-2:], b.shape(x)[-2:]))
        return not (same or crop)

    def shadow(self, b, node, ms):
        x = node.args[0]
        if self._resized(b, node):
            return b.call(interp_map, ms[0], b.val(x), b.val(node), "bicubic", False)
        return b.call(node.target, ms[0], *b.val(node.args[1:]), **b.val(node.kwargs))

    def shadow_T(self, b, node, m):
        x = node.args[0]
        if self._resized(b, node):
            return [b.call(interp_map_T, m, b.val(x), b.val(node), "bicubic", False)]
        return b.vjp_shadow(node.target, (*b.val(node.args[1:]),), m, x)


def _register_scale_image():
    try:
        from timm.models.crossvit import scale_image
    except Exception:
        return
    register_rule(scale_image, ScaleImage())


_register_scale_image()


# ------------------------------------------------------------------ unfold / fold -------------
def unfold_map(m, x_shape, kernel_size, dilation=1, padding=0, stride=1):
    """Shadow of ``F.unfold``: the map spread over the channels, unfolded like the tensor (every
    slot of a window holds its source position's value; padded slots 0)."""
    return F.unfold(m.expand(x_shape), kernel_size, dilation, padding, stride)


def fold_map(m, output_size, kernel_size, dilation=1, padding=0, stride=1):
    """Shadow of ``F.fold`` on a full-size map (its channel factor replicated): overlapping slots
    add up (one path each); one channel of the result is the output's map."""
    return F.fold(m, output_size, kernel_size, dilation, padding, stride)[:, :1]


_UNFOLD_ARGS = ("input", "kernel_size", "dilation", "padding", "stride")
_FOLD_ARGS = ("input", "output_size", "kernel_size", "dilation", "padding", "stride")


def unfold_args(b, node):
    """(kernel_size, dilation, padding, stride) of an F.unfold call or nn.Unfold module."""
    return _window_args(b, node, _UNFOLD_ARGS)


def _window_args(b, node, names):
    """(kernel_size, dilation, padding, stride) or (output_size, ...) of F.unfold/F.fold or the
    nn.Unfold/nn.Fold module."""
    if node.op == "call_module":
        mod = b.module(node)
        return tuple(getattr(mod, n) for n in names[1:])
    defaults = {"dilation": 1, "padding": 0, "stride": 1}
    return tuple(arg(node, i, n, defaults.get(n)) for i, n in enumerate(names) if i > 0)


class Unfold(Rule):
    """``F.unfold`` / ``nn.Unfold`` (VOLO, TNT): windows cut out of an NCHW map into
    ``(B, C * k * k, L)``.  The output axis 1 mixes the channels with the offsets inside a window,
    so the output is unlabelled (a full-size map); a later reshape that separates them gets its
    labels back (GraphInfo.provenance_layout replays the unfold).  Linear: transposed by autograd."""
    pointwise = False
    main_args = (0,)

    def layout(self, b, node):
        return ()

    def shadow(self, b, node, ms):
        return b.call(unfold_map, ms[0], b.size_of(node.args[0]), *b.val(_window_args(b, node, _UNFOLD_ARGS)))

    def shadow_T(self, b, node, m):
        x = node.args[0]
        return b.vjp_shadow(unfold_map, (b.size_of(x), *b.val(_window_args(b, node, _UNFOLD_ARGS))), m, x)


class Fold(Rule):
    """``F.fold`` / ``nn.Fold`` (VOLO's outlook attention): window slots added back into an NCHW
    map (overlap-add).  Its input must be unlabelled (slots and channels mixed on axis 1, as
    ``F.unfold`` makes them); the output is NCHW.  Shadow: the fold of the full-size map (a path
    per covering window), one channel kept."""
    pointwise = False
    main_args = (0,)

    def layout(self, b, node):
        if b.caxes(node.args[0]) not in ((), (1,)):
            b.unsupported(node, "F.fold of a tensor whose axis 1 is not the window vector")
        return (1,)

    def shadow(self, b, node, ms):
        fn = fold_map if b.caxes(node.args[0]) == () else fold_window_map
        return b.call(fn, ms[0], *b.val(_window_args(b, node, _FOLD_ARGS)))

    def shadow_T(self, b, node, m):
        x = node.args[0]
        fn = fold_map if b.caxes(x) == () else fold_window_map
        return b.vjp_shadow(fn, tuple(b.val(_window_args(b, node, _FOLD_ARGS))), m, x)


def fold_window_map(m, output_size, kernel_size, dilation=1, padding=0, stride=1):
    """Shadow of ``F.fold`` whose input holds one PFV per window (``(B, C * k * k, L)`` read as L
    window vectors): each window spreads to the positions it covers (the transpose of the window
    sum of the matching convolution)."""
    H, W = (output_size, output_size) if isinstance(output_size, int) else output_size
    k, d, p, s = (v if isinstance(v, (tuple, list)) else (v, v) for v in (kernel_size, dilation, padding, stride))
    Ho = (H + 2 * p[0] - d[0] * (k[0] - 1) - 1) // s[0] + 1
    Wo = (W + 2 * p[1] - d[1] * (k[1] - 1) - 1) // s[1] + 1
    return ops.window_sum_T(m.reshape(m.shape[0], 1, Ho, Wo), k, s, p, d, (H, W))


for t in (F.unfold, nn.Unfold):
    register_rule(t, Unfold())
for t in (F.fold, nn.Fold):
    register_rule(t, Fold())


# ------------------------------------------------------------------ Tensor.unfold -------------
def tensor_unfold_map(m, dim, size, step, channel):
    """Shadow of ``x.unfold(dim, size, step)``: along a position axis the map is unfolded like the
    tensor (each window slot is its source position); along a channel axis the PFVs stay where
    they are (a new channel axis of size 1 is added)."""
    return m.unsqueeze(-1) if channel else m.unfold(dim, size, step)


class TensorUnfold(Rule):
    """``Tensor.unfold(dim, size, step)`` (HaloNet's overlapping key/value windows): windows of
    ``size`` slots every ``step`` along ``dim``, the slots as a new last axis.  A gather: linear,
    transposed by autograd (overlapping slots add up).  Along a position axis both the window
    index and the new slot axis are positions; along a channel axis both are channels."""
    pointwise = False
    main_args = (0,)

    def spec(self, node, rank):
        """(dim, size, step) with ``dim`` non-negative for an input of rank ``rank``."""
        d = arg(node, 1, "dimension")
        return d % rank, arg(node, 2, "size"), arg(node, 3, "step")

    def _channel(self, b, node):
        x = node.args[0]
        return self.spec(node, len(b.shape(x)))[0] in layout_axes(b, x)

    def layout(self, b, node):
        ci = b.caxes(node.args[0])
        return tuple(ci) + ((len(b.shape(node)) - 1,) if self._channel(b, node) else ())

    def shadow(self, b, node, ms):
        x = node.args[0]
        return b.call(tensor_unfold_map, ms[0], *self.spec(node, len(b.shape(x))), self._channel(b, node))

    def shadow_T(self, b, node, m):
        x = node.args[0]
        return b.vjp_shadow(tensor_unfold_map, (*self.spec(node, len(b.shape(x))), self._channel(b, node)), m, x)


register_rule("method:unfold", TensorUnfold())
