"""Pieces shared by the window ops (convolutions and pooling).

* Recorded arg-max indices: max pooling keeps the indices of its forward pass; its transpose
  scatters back to them (windows may overlap) and its bias gathers at them.
* Same-window shadows: timm's dynamic TF 'SAME' padding ops (Conv2dSame, MaxPool2dSame, dynamic
  CondConv2d) sum a one-channel map over the padded window; the transpose is autograd's.
"""
import operator

from ..compiler import runtime as ops


def record_indices(b, node, record_fn, *args):
    """Emit ``record_fn(x, *args) -> (out, indices)`` for the op's input ``x``; keep the indices
    for :func:`indices_T` and :func:`indices_bias`; return the output."""
    both = b.call(record_fn, b.val(node.args[0]), *args, name=node.name + "_rec")
    out = b.call(operator.getitem, both, 0, name=node.name)
    b.set_recorded(node, "indices", b.call(operator.getitem, both, 1, name=node.name + "_idx"))
    return out


def indices_T(b, node, g, gather_T=ops.gather_T, *args):
    """Transpose of a recorded-index op: ``g`` scattered back to the recorded indices."""
    return [b.call(gather_T, g, b.recorded(node, "indices"), b.val(node.args[0]), *args)]


def indices_bias(b, node, z, gather=ops.gather, *args):
    """The bias ``z`` flowing in, gathered at the recorded indices (None: structurally zero)."""
    if z is None:
        return None
    return b.call(gather, z, b.recorded(node, "indices"), b.val(node.args[0]), *args)


def same_window_shadow(b, node, m, kernel, stride, dilation):
    """Shadow of a 'SAME'-padded window op: ``m`` summed over each output's window."""
    return b.call(ops.same_window_sum, m, b.val(node.args[0]), kernel, stride, dilation, b.val(node))


def same_window_shadow_T(b, node, m, kernel, stride, dilation):
    """Transpose of :func:`same_window_shadow` (by autograd), as a one-item list."""
    x = node.args[0]
    return b.vjp_shadow(ops.same_window_sum, (b.val(x), kernel, stride, dilation, b.val(node)), m, x)


def window_shadow(b, node, m, kernel, stride, padding, dilation, out=None):
    """Shadow of a zero-padded window op: ``m`` summed over each output's window (``out``: the
    output or its shape; default the output's twin value)."""
    return b.call(ops.window_sum, m, kernel, stride, padding, dilation, b.val(node) if out is None else out)


def window_shadow_T(b, node, m, kernel, stride, padding, dilation):
    """Transpose of :func:`window_shadow`, as a one-item list."""
    return [b.call(ops.window_sum_T, m, kernel, stride, padding, dilation, b.map_of(node.args[0]))]
