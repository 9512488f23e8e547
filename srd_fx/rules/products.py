"""Products (SPEC §8): matrix products with one constant (or gate) operand, and products of
two input-dependent tensors with no gate.

* ``a @ c`` / ``c @ a`` with ``c`` a constant or a gate (attention ``softmax(...) @ v``): linear
  in ``a``.  Contracting a position axis connects positions: output position i is reached from
  input position j when the constant/gate has a non-zero entry ``c[i, j]`` in any head.
* ``a * b`` / ``a @ b`` with both factors input-dependent and neither a gate (StarNet's
  ``act(x1) * x2``, SwiGLU/GEGLU and MambaOut's ``act(a) * b``, gMLP's spatial gating, linear
  attention): the *uniform rule* — the product is taken as the linear function
  ``½ (a ⊙ b̄ + ā ⊙ b)`` of ``(a, b)``, ``ā, b̄`` the recorded values.  It equals the product at
  the recorded point, so the block stays affine and both factors receive relevance.  Its shadow
  passes both factors' maps (a sum); a contraction over a position axis sums the map over it.
* ``x ** p`` (constant p): the uniform rule with p equal factors, ``x̄^(p-1) ⊙ x``.

The analysis (srd_fx/compiler/analysis.py) swaps a product's rule for its uniform variant
(:func:`uniform_rule`) when it finds no gate among its factors.
"""
import operator

import torch

from ..compiler.runtime import shape_of
from .base import Rule, arg, register_rule
from .attention import attend_map, attend_map_T, layout_axes, map_shape


# ------------------------------------------------------------------------ runtime -------
def half(g):
    return g * 0.5


def product_bias(fn, args, k, z):
    """``fn`` of the recorded operands with operand ``k`` replaced by the bias ``z`` flowing in."""
    from ..compiler.runtime import _call
    a = list(args)
    a[k] = z if z.shape == a[k].shape else z.expand(torch.broadcast_shapes(z.shape, a[k].shape))
    return _call(fn, a, {})


def half_sum(*ts):
    out = ts[0]
    for t in ts[1:]:
        out = out + t
    return out * 0.5


def left_map(m, out_shape, caxes_out):
    """Shadow from the left factor of ``a @ b``: its map summed over the contracted (last) axis,
    broadcast over the output's column axis."""
    t = list(out_shape)
    for a in caxes_out:
        t[a] = 1
    m = m.sum(-1, keepdim=True)
    return _broadcast(m, t)


def right_map(m, out_shape, caxes_out):
    """Shadow from the right factor of ``a @ b``: its map summed over the contracted (row) axis,
    broadcast over the output's row axis."""
    t = list(out_shape)
    for a in caxes_out:
        t[a] = 1
    m = m.sum(-2, keepdim=True) if m.dim() >= 2 else m
    return _broadcast(m, t)


def _broadcast(m, t):
    if m.dim() < len(t):
        m = m.reshape([1] * (len(t) - m.dim()) + list(m.shape))
    # a size > 1 where the output map has 1 (heads folded into a channel axis): sum it
    for d, (ms, ts) in enumerate(zip(m.shape, t)):
        if ts == 1 and ms != 1:
            m = m.sum(d, keepdim=True)
    return m.expand(t)


def const_left_map(m, c, channel_axes):
    """Shadow of ``c @ a`` (c constant or gate) on the map of ``a``."""
    return attend_map(m, c, channel_axes)


def const_left_map_T(m, c, like_map, channel_axes):
    return attend_map_T(m, c, like_map, channel_axes)


def matmul_const_T(g, c, a, side):
    """Lin^T g of ``a -> a @ c`` (``side`` "left") or ``a -> c @ a`` ("right"), both of rank >= 2:
    ``g @ c^T`` or ``c^T @ g``, summed back over the axes ``a`` (its shape) was broadcast along."""
    ct = c.transpose(-2, -1)
    out = torch.matmul(g, ct) if side == "left" else torch.matmul(ct, g)
    shape = shape_of(a)
    if out.shape == shape:
        return out
    if out.dim() > len(shape):
        out = out.sum(dim=tuple(range(out.dim() - len(shape))))
    return out.sum_to_size(shape)


def pow_T(g, x, p):
    return g * x.pow(p - 1)


def _matmul_caxes(sa, ca, sb, cb, rank):
    """Channel axes of ``a @ b`` (ranks >= 2): rows from ``a``, columns from ``b``, leading axes
    channel where the operand that has them (size > 1) says so."""
    out = set()
    ra, rb = len(sa), len(sb)
    for d in range(rank - 2):
        da, db = d - (rank - ra), d - (rank - rb)
        in_a = da >= 0 and da in ca and (sa[da] > 1 or db < 0 or sb[db] == 1)
        in_b = db >= 0 and db in cb and (sb[db] > 1 or da < 0 or sa[da] == 1)
        if in_a or in_b:
            out.add(d)
    if (ra - 2) in ca:
        out.add(rank - 2)
    if (rb - 1) in cb:
        out.add(rank - 1)
    return tuple(sorted(out))


# -------------------------------------------------------------------------- rules -------
def _operands(node):
    return list(node.args[:2]) if len(node.args) >= 2 else [node.args[0], node.kwargs.get("other")]


class MatMul(Rule):
    """``a @ c`` or ``c @ a`` with ``c`` a constant or a gate (attention weights)."""
    pointwise = False
    gate_args = (0, 1)

    def _sides(self, b, node):
        x, y = _operands(node)
        mains = b.main_inputs(node)
        if x in mains:
            return "left", x, y
        return "right", y, x

    def transpose(self, b, node, g):
        # the constant's (gate's) transpose applied to g, without replaying the product on zeros
        side, a, c = self._sides(b, node)
        if a is c or not b.is_tensor(c) or len(b.shape(a)) < 2 or len(b.shape(c)) < 2:
            return b.vjp(node, g)
        return [b.call(matmul_const_T, g, b.val(c), b.size_of(a), side)]

    def layout(self, b, node):
        side, a, c = self._sides(b, node)
        sa, ca, rank = b.shape(a), layout_axes(b, a), len(b.shape(node))
        sc = b.shape(c) if b.is_tensor(c) else (1,) * len(sa) if isinstance(c, torch.fx.Node) else (1, 1)
        if side == "left":   # rows of a, columns of c: a column of c is a channel when a's last axis is
            cc = (len(sc) - 1,) if (len(sa) - 1) in ca else ()
            return _matmul_caxes(sa, ca, sc, cc, rank)
        # c @ a: c's rows are a's rows re-mixed: a position axis when a's row axis is one
        cc = (len(sc) - 2,) if (len(sa) - 2) in ca else ()
        return _matmul_caxes(sc, cc, sa, ca, rank)

    def _contracted_channel(self, b, node, side, a):
        ra = len(b.shape(a))
        return (ra - 1 if side == "left" else ra - 2) in layout_axes(b, a) or b.unit == "neuron"

    def shadow(self, b, node, ms):
        side, a, c = self._sides(b, node)
        if side == "left":
            from .shape import matmul_map
            return b.call(matmul_map, ms[0], b.size_of(node), b.caxes(node), self._contracted_channel(b, node, side, a))
        return b.call(const_left_map, ms[0], b.val(c), b.caxes(a))

    def shadow_T(self, b, node, m):
        side, a, c = self._sides(b, node)
        if side == "left":
            from .shape import matmul_map_T
            return [b.call(matmul_map_T, m, b.size_of(a), b.caxes(a), self._contracted_channel(b, node, side, a))]
        return [b.call(const_left_map_T, m, b.val(c), b.call(map_shape, b.size_of(a), b.caxes(a)), b.caxes(a))]


class UniformProduct(Rule):
    """``a * b`` or ``a @ b``, both factors input-dependent, no gate: ½ (a ⊙ b̄ + ā ⊙ b)."""
    pointwise = True

    def __init__(self, matmul=False):
        self.matmul = matmul
        self.pointwise = not matmul

    def layout(self, b, node):
        x, y = _operands(node)
        if not self.matmul:
            # the factor with the output's full shape names the channel axes
            full = [f for f in (x, y) if b.is_tensor(f) and b.shape(f) == b.shape(node)]
            return b.caxes(full[0] if full else b.main_inputs(node)[0])
        return _matmul_caxes(b.shape(x), layout_axes(b, x), b.shape(y), layout_axes(b, y), len(b.shape(node)))

    def transpose(self, b, node, g):
        # the op is bilinear: its VJP at the recorded point gives (g b̄, ā g); the rule takes half
        return b.vjp(node, b.call(half, g), at_point=True)

    def bias(self, b, node, zs):
        x, y = _operands(node)
        by = {}
        for i, z in zip(b.main_inputs(node), zs):
            if z is not None:
                by[i] = z
        if not by:
            return None
        fn = b._callable(node)
        terms = [b.call(product_bias, fn, [b.val(x), b.val(y)], k, by[f])
                 for k, f in enumerate((x, y)) if f in by]
        return b.call(half_sum, *terms)

    def shadow(self, b, node, ms):
        if not self.matmul:
            return super().shadow(b, node, ms)
        x, y = _operands(node)
        size, cax = b.size_of(node), b.caxes(node)
        return b.sum_maps([b.call(left_map, ms[0], size, cax), b.call(right_map, ms[1], size, cax)])

    def shadow_T(self, b, node, m):
        if not self.matmul:
            return super().shadow_T(b, node, m)
        x, y = _operands(node)
        size, cax = b.size_of(node), b.caxes(node)
        return [b.vjp_shadow(left_map, (size, cax), m, x)[0], b.vjp_shadow(right_map, (size, cax), m, y)[0]]


class Pow(Rule):
    """``x ** p`` with a constant exponent: the uniform rule with p equal factors, linear
    ``x -> x̄^(p-1) ⊙ x`` (equal to ``x̄^p`` at the recorded point); keeps positions."""
    main_args = (0,)

    def _p(self, node):
        return arg(node, 1, "exponent")

    def transpose(self, b, node, g):
        return [b.call(pow_T, g, b.val(node.args[0]), self._p(node))]

    def bias(self, b, node, zs):
        if zs[0] is None:
            return None
        return b.call(pow_T, zs[0], b.val(node.args[0]), self._p(node))


def uniform_rule(rule):
    """The uniform-rule variant of a product rule with no gate, or None (not a product)."""
    from .elementwise import Mul
    if isinstance(rule, MatMul):
        return _UNIFORM_MATMUL
    if isinstance(rule, Mul):
        return _UNIFORM_MUL
    return None


_UNIFORM_MUL = UniformProduct(matmul=False)
_UNIFORM_MATMUL = UniformProduct(matmul=True)

for t in (operator.matmul, torch.matmul, "method:matmul", torch.bmm, "method:bmm"):
    register_rule(t, MatMul())
for t in (operator.pow, torch.pow, "method:pow"):
    register_rule(t, Pow())
