"""A naive, pair-by-pair reference implementation of SRD (SPEC.md §2, §3; paper Eq. 1, 6-8, 11).

It is written from the equations only and shares no code with ``srd_fx``: a tiny network is
described by hand as an ordered list of :class:`Block` s, and every sharing ratio
``mu(i->j)`` between an input PFV ``i`` and an output PFV ``j`` of a block is formed explicitly:

    Lin_{i->j} x_i   from the block's full Jacobian (torch.autograd.functional.jacobian),
                     restricted to position i's channels (the block is affine once its recorded
                     constants, e.g. max-pool indices, are fixed);
    b                = F(0, ..., 0) with the same constants;
    P_a(i->j)        the number of structural paths from position i of input a to position j,
                     a product/sum of explicit 0/1 connectivity matrices written per op with loops;
    n_i = ||x_i||,   D_j = sum_a sum_i P_a(i->j) n^(a)_i;
    v_hat(i->j)      = Lin_{i->j} x_i + b_j P_a(i->j) n_i / D_j        (bias part 0 where D_j = 0);
    mu(i->j)         = <v_hat(i->j), v_j> / ||v_j||^2                   (0 where ||v_j||^2 <= eps);
    R_i              = sum_j mu(i->j) R_j, summed over every block that consumes x  (Eq. 7-8).

Only meant for tiny inputs (8x8, a few channels): the Jacobians and mu matrices are dense.
Everything is computed one sample at a time, in the dtype of the network (use float64).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

# --------------------------------------------------------------------------------------------
# Recorded constants (max-pool indices)
# --------------------------------------------------------------------------------------------


class Consts(dict):
    """Constants of one block for one sample. The first (real) forward records them; every
    later evaluation of the block (Jacobian, zero input) reuses them, which makes the block an
    affine map of its inputs."""


def maxpool_fixed(c: Consts, key: str, x: torch.Tensor, kernel: int, stride: Optional[int] = None,
                  padding: int = 0, dilation: int = 1) -> torch.Tensor:
    """Max pooling of ``x`` (1, C, H, W) whose arg-max indices are recorded in ``c[key]`` on the
    first call and then used as a fixed gather."""
    stride = kernel if stride is None else stride
    if key not in c:
        _, idx = F.max_pool2d(x.detach(), kernel, stride, padding, dilation, return_indices=True)
        c[key] = idx
    idx = c[key]
    return x.flatten(2).gather(2, idx.flatten(2)).view(idx.shape)


# --------------------------------------------------------------------------------------------
# Structural connectivity (the "shadow" of each op), written with explicit loops
# --------------------------------------------------------------------------------------------
# A connectivity op maps an input spatial size (H, W) to (P, (Ho, Wo)) where P[j, i] is the
# number of connections from input position i = h*W + w to output position j = ho*Wo + wo.

Conn = Callable[[Tuple[int, int]], Tuple[torch.Tensor, Tuple[int, int]]]


def _pair(v):
    return (v, v) if isinstance(v, int) else tuple(v)


def window(kernel, stride=1, padding=0, dilation=1) -> Conn:
    """A sliding window (convolution of any groups, average pooling, or max pooling: the WHOLE
    window). Padded positions are absent: they connect to nothing."""
    kh, kw = _pair(kernel)
    sh, sw = _pair(stride)
    ph, pw = _pair(padding)
    dh, dw = _pair(dilation)

    def conn(hw):
        H, W = hw
        Ho = (H + 2 * ph - dh * (kh - 1) - 1) // sh + 1
        Wo = (W + 2 * pw - dw * (kw - 1) - 1) // sw + 1
        P = torch.zeros(Ho * Wo, H * W, dtype=torch.float64)
        for oh in range(Ho):
            for ow in range(Wo):
                for a in range(kh):
                    for b in range(kw):
                        ih = oh * sh - ph + a * dh
                        iw = ow * sw - pw + b * dw
                        if 0 <= ih < H and 0 <= iw < W:
                            P[oh * Wo + ow, ih * W + iw] += 1.0
        return P, (Ho, Wo)
    return conn


def identity() -> Conn:
    """Element-wise ops, batch-norm, add, channel cat: position i connects to position i."""
    def conn(hw):
        H, W = hw
        P = torch.zeros(H * W, H * W, dtype=torch.float64)
        for i in range(H * W):
            P[i, i] = 1.0
        return P, (H, W)
    return conn


def chain(*ops: Conn) -> Conn:
    """Ops applied one after the other: path counts multiply (matrix product)."""
    def conn(hw):
        P = None
        for op in ops:
            Q, hw = op(hw)
            P = Q if P is None else Q @ P
        if P is None:
            return identity()(hw)
        return P, hw
    return conn


# --------------------------------------------------------------------------------------------
# Network description
# --------------------------------------------------------------------------------------------


@dataclass
class Block:
    """One affine block followed by its activation layer.

    name:   the name of the activation layer (its output tensor);
    inputs: names of the tensors the block reads ("input" or earlier block names);
    fn:     fn(consts, *xs) -> v, the pre-activation (batch of one sample); it must use
            ``maxpool_fixed`` (or similar) for data-dependent constants;
    shadow: for every input, a list of connectivity ops, one per structural branch from that
            input to the output (their path counts add up);
    act:    the activation applied to v (None: a virtual identity layer, e.g. the encoder output
            when it is not an activation)."""
    name: str
    inputs: Sequence[str]
    fn: Callable
    shadow: Sequence[Sequence[Conn]]
    act: Optional[Callable] = None


@dataclass
class Net:
    blocks: List[Block]
    head: Callable  # encoder output L -> logits

    @property
    def L(self) -> str:
        return self.blocks[-1].name


def _forward_sample(net: Net, x: torch.Tensor):
    """Forward one sample (1, C, H, W); returns the tensors and the per-block records."""
    env = {"input": x}
    records = []
    for blk in net.blocks:
        c = Consts()
        xs = [env[n] for n in blk.inputs]
        with torch.no_grad():
            v = blk.fn(c, *xs)
            out = v if blk.act is None else blk.act(v.clone())
        env[blk.name] = out
        records.append((c, xs, v))
    return env, records


def block_mu(blk: Block, c: Consts, xs: Sequence[torch.Tensor], v: torch.Tensor,
             eps: float = 1e-12):
    """The sharing ratios of one block for one sample.

    Returns (mus, info): mus[a] is a (HWo, HW_a) matrix with mus[a][j, i] = mu(i -> j) for the
    a-th input; info holds the intermediate quantities (v_hat, D, degenerate positions)."""
    v = v[0]  # (Cv, Ho, Wo)
    Cv, Ho, Wo = v.shape
    HWo = Ho * Wo
    vf = v.reshape(Cv, HWo)
    inputs = tuple(x.detach() for x in xs)

    # Linear part: the Jacobian of the block (affine with recorded constants).
    def f(*z):
        return blk.fn(c, *z)
    jac = torch.autograd.functional.jacobian(f, inputs)
    if not isinstance(jac, tuple):
        jac = (jac,)
    # Bias: the block evaluated on zero inputs, same constants.
    with torch.no_grad():
        b = blk.fn(c, *[torch.zeros_like(x) for x in inputs])[0].reshape(Cv, HWo)
        # Sanity: the block really is affine: v == Lin x + b.
        lin_total = sum(torch.einsum("cjai,ai->cj", J.reshape(Cv, HWo, x.shape[1], -1),
                                     x[0].reshape(x.shape[1], -1)) for J, x in zip(jac, inputs))
        assert torch.allclose(lin_total + b, vf, rtol=1e-9, atol=1e-9 * (1 + vf.abs().max().item())), \
            f"block {blk.name} is not affine in its inputs with the recorded constants"

    # Structural path counts and norms.
    P, n = [], []
    for x, branches in zip(inputs, blk.shadow):
        H, W = x.shape[-2:]
        Pa = torch.zeros(HWo, H * W, dtype=torch.float64)
        for br in branches:
            Q, hw = br((H, W))
            assert hw == (Ho, Wo), f"shadow of {blk.name} has output size {hw}, block {Ho, Wo}"
            Pa = Pa + Q
        P.append(Pa.to(v.dtype))
        n.append(x[0].reshape(x.shape[1], -1).norm(dim=0))  # (HW_a,)
    D = sum(Pa @ na for Pa, na in zip(P, n))  # (HWo,)

    vnorm2 = (vf * vf).sum(0)  # (HWo,)
    live = vnorm2 > eps
    mus, vhats = [], []
    for J, x, Pa, na in zip(jac, inputs, P, n):
        Ca = x.shape[1]
        Ja = J.reshape(Cv, HWo, Ca, -1)
        xa = x[0].reshape(Ca, -1)
        # v_hat(i->j) for every pair (c, j, i): linear part + bias share.
        vhat_lin = torch.einsum("cjai,ai->cji", Ja, xa)
        share = torch.where(D[:, None] > 0, Pa * na[None, :] / torch.where(D > 0, D, torch.ones_like(D))[:, None],
                            torch.zeros_like(Pa))  # (HWo, HW_a)
        vhat = vhat_lin + b[:, :, None] * share[None]
        mu = torch.einsum("cji,cj->ji", vhat, vf)
        mu = torch.where(live[:, None], mu / torch.where(live, vnorm2, torch.ones_like(vnorm2))[:, None],
                         torch.zeros_like(mu))
        mus.append(mu)
        vhats.append(vhat)
    info = dict(vhat=vhats, D=D, b=b, v=vf, live=live,
                degenerate=(~live) | ((D <= 0) & (b.abs().sum(0) > 0)))
    return mus, info


# --------------------------------------------------------------------------------------------
# Backward (relevance) and forward (ERF) passes
# --------------------------------------------------------------------------------------------


def sample_mus(net: Net, x: torch.Tensor, eps: float = 1e-12):
    """For one sample: the forward tensors, and for every block its mu matrices and info."""
    env, records = _forward_sample(net, x)
    per_block = [block_mu(blk, c, xs, v, eps) for blk, (c, xs, v) in zip(net.blocks, records)]
    return env, per_block


def propagate(net: Net, x: torch.Tensor, R_L: torch.Tensor, eps: float = 1e-12) -> Dict[str, torch.Tensor]:
    """SRD backward from R_L (B, h_L, w_L) to the input. Returns name -> (B, h, w) relevance for
    "input" and every block (activation layer) name."""
    outs: Dict[str, List[torch.Tensor]] = {}
    for bi in range(x.shape[0]):
        env, per_block = sample_mus(net, x[bi:bi + 1], eps)
        R = {net.L: R_L[bi].reshape(-1).to(x.dtype)}
        for blk, (mus, _) in zip(reversed(net.blocks), reversed(per_block)):
            Rk = R[blk.name]
            for name, mu in zip(blk.inputs, mus):
                R[name] = R.get(name, 0) + mu.T @ Rk  # R_i = sum_j mu(i->j) R_j
        for name, r in R.items():
            hw = env[name].shape[-2:]
            outs.setdefault(name, []).append(r.reshape(hw))
    return {k: torch.stack(v) for k, v in outs.items()}


def erf_forward(net: Net, x: torch.Tensor, eps: float = 1e-12):
    """Eq. 1 forward: ERF of every PFV of every layer, for one sample x (1, C, H, W).

    Returns (erf, per_block): erf[name] is (HW_layer, H, W): row j is ERF(v_j) over the input
    pixels; ERF of an input pixel is the unit map."""
    env, per_block = sample_mus(net, x, eps)
    H, W = x.shape[-2:]
    E = {"input": torch.eye(H * W, dtype=x.dtype)}
    for blk, (mus, _) in zip(net.blocks, per_block):
        E[blk.name] = sum(mu @ E[name] for name, mu in zip(blk.inputs, mus))
    return {k: e.reshape(-1, H, W) for k, e in E.items()}, per_block


def encoder_output(net: Net, x: torch.Tensor) -> torch.Tensor:
    """The encoder output L for a batch (one sample at a time, like everything here)."""
    return torch.cat([_forward_sample(net, x[b:b + 1])[0][net.L] for b in range(x.shape[0])])
