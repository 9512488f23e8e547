"""A naive, pair-by-pair reference implementation of SRD (SPEC.md §2, §3; paper Eq. 1, 6-8, 11).

It is written from the equations only and shares no code with ``srd_fx``: a tiny network is
described by hand as an ordered list of :class:`Block` s, and every sharing ratio
``mu(i->j)`` between an input PFV ``i`` and an output PFV ``j`` of a block is formed explicitly:

    Lin_{i->j} x_i   from the block's full Jacobian (torch.autograd.functional.jacobian),
                     restricted to position i's channels (the block is affine once its recorded
                     constants, e.g. max-pool indices, gate values, normalisation statistics,
                     are fixed);
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
import torch.nn as nn
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


def recorded(c: Consts, key: str, fn: Callable[[], torch.Tensor]) -> torch.Tensor:
    """A data-dependent constant of the block (a gate value, a normalisation statistic):
    ``fn()`` is evaluated on the first (real) forward only and stored in ``c[key]``; every later
    evaluation of the block (Jacobian, zero input) reuses the stored value (SPEC §2, "Gates and
    data-dependent constants")."""
    if key not in c:
        with torch.no_grad():
            c[key] = fn().detach()
    return c[key]


def gate_fixed(c: Consts, key: str, x: torch.Tensor,
               gate_fn: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """``x * g`` where the gate ``g = gate_fn(x)`` (a sigmoid output, a (1, C, 1, 1) squeeze
    branch) is recorded on the real forward: the product is linear in ``x``, its structural
    shadow is the identity, and the gate branch is not an input of the block (no relevance)."""
    g = recorded(c, key, lambda: gate_fn(x))
    return x * g


def norm_fixed(c: Consts, key: str, x: torch.Tensor, dims: Sequence[int], weight: Optional[torch.Tensor],
               bias: Optional[torch.Tensor], eps: float) -> torch.Tensor:
    """A normalisation over the axes ``dims`` of ``x`` (LayerNorm over channels: ``dims=(1,)`` for
    NCHW) whose mean and variance (biased) are recorded on the real forward: an affine map
    ``(x - mean) / sqrt(var + eps) * weight + bias`` with constant mean and variance. ``weight``
    and ``bias`` are per channel (axis 1) or None."""
    dims = tuple(dims)
    mean = recorded(c, key + ".mean", lambda: x.mean(dims, keepdim=True))
    var = recorded(c, key + ".var", lambda: ((x - x.mean(dims, keepdim=True)) ** 2).mean(dims, keepdim=True))
    y = (x - mean) / torch.sqrt(var + eps)
    shape = [1] * x.dim()
    shape[1] = -1
    if weight is not None:
        y = y * weight.reshape(shape)
    if bias is not None:
        y = y + bias.reshape(shape)
    return y


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


def window_transposed(kernel, stride=1, padding=0, dilation=1, output_padding=0) -> Conn:
    """A transposed convolution: input position i is spread over the output positions
    ``i * stride - padding + k * dilation`` (k over the kernel); the output has
    ``(H - 1) * stride - 2 * padding + dilation * (kernel - 1) + output_padding + 1`` rows."""
    kh, kw = _pair(kernel)
    sh, sw = _pair(stride)
    ph, pw = _pair(padding)
    dh, dw = _pair(dilation)
    oph, opw = _pair(output_padding)

    def conn(hw):
        H, W = hw
        Ho = (H - 1) * sh - 2 * ph + dh * (kh - 1) + oph + 1
        Wo = (W - 1) * sw - 2 * pw + dw * (kw - 1) + opw + 1
        P = torch.zeros(Ho * Wo, H * W, dtype=torch.float64)
        for ih in range(H):
            for iw in range(W):
                for a in range(kh):
                    for b in range(kw):
                        oh = ih * sh - ph + a * dh
                        ow = iw * sw - pw + b * dw
                        if 0 <= oh < Ho and 0 <= ow < Wo:
                            P[oh * Wo + ow, ih * W + iw] += 1.0
        return P, (Ho, Wo)
    return conn


def identity() -> Conn:
    """Element-wise ops, batch-norm, add, channel cat: position i connects to position i."""
    def conn(hw):
        n = 1
        for s_ in hw:
            n *= s_
        P = torch.zeros(n, n, dtype=torch.float64)
        for i in range(n):
            P[i, i] = 1.0
        return P, tuple(hw)
    return conn


def pad(left: int, right: int, top: int, bottom: int) -> Conn:
    """Zero padding (possibly asymmetric, as timm's 'same' convolutions do): every input position
    connects to its shifted copy; the padded positions connect to nothing (they are not PFVs)."""
    def conn(hw):
        H, W = hw
        Ho, Wo = H + top + bottom, W + left + right
        P = torch.zeros(Ho * Wo, H * W, dtype=torch.float64)
        for h in range(H):
            for w in range(W):
                P[(h + top) * Wo + (w + left), h * W + w] = 1.0
        return P, (Ho, Wo)
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


# Token models (SPEC §8): position grids are tuples — (H, W) for images and channels-last
# maps, (N,) for token sequences.

def flat() -> Conn:
    """Flatten a grid into a token sequence, row-major (``x.flatten(2).transpose(1, 2)``)."""
    def conn(hw):
        n = 1
        for s in hw:
            n *= s
        return identity()((n, 1))[0], (n,)
    return conn


def prefix(k: int) -> Conn:
    """``cat([constant tokens (k of them), x], dim=tokens)``: token i becomes token k + i; the k
    prefix tokens are constants (no input PFV reaches them)."""
    def conn(hw):
        (N,) = hw
        P = torch.zeros(N + k, N, dtype=torch.float64)
        for i in range(N):
            P[k + i, i] = 1.0
        return P, (N + k,)
    return conn


def full(n_out: int) -> Conn:
    """Every input position reaches every one of ``n_out`` output positions once (attention with
    no zero weight, a token-mixing linear layer, a contraction over tokens broadcast back)."""
    def conn(hw):
        n = 1
        for s in hw:
            n *= s
        return torch.ones(n_out, n, dtype=torch.float64), (n_out,)
    return conn


def placed(offset: int, total: int) -> Conn:
    """A token sequence placed at ``offset`` in a sequence of ``total`` tokens (several encoder
    outputs packed one after the other)."""
    def conn(hw):
        (N,) = hw
        P = torch.zeros(total, N, dtype=torch.float64)
        for i in range(N):
            P[offset + i, i] = 1.0
        return P, (total,)
    return conn


def patches(ph: int, pw: int) -> Conn:
    """An (H, W) grid cut into ph x pw patches and regrouped as a (P, N) grid: P = ph * pw offsets
    inside a patch, N patches, both row-major (MobileViT's unfold; the P axis is folded into the
    batch axis by the model)."""
    def conn(hw):
        H, W = hw
        P, N = ph * pw, (H // ph) * (W // pw)
        M = torch.zeros(P * N, H * W, dtype=torch.float64)
        for h in range(H):
            for w in range(W):
                p, n = (h % ph) * pw + (w % pw), (h // ph) * (W // pw) + (w // pw)
                M[p * N + n, h * W + w] = 1.0
        return M, (P, N)
    return conn


def patches_back(H: int, W: int, ph: int, pw: int) -> Conn:
    """The inverse of :func:`patches`: a (P, N) grid folded back into the (H, W) grid."""
    def conn(hw):
        M, _ = patches(ph, pw)((H, W))
        return M.t().contiguous(), (H, W)
    return conn


def grid_to_tokens() -> Conn:
    """Alias of :func:`flat` for readability in channels-last grids."""
    return flat()


def tokens_to_grid(h: int, w: int) -> Conn:
    def conn(hw):
        return identity()((h, w))[0], (h, w)
    return conn


def shifted_windows(ws: int, shift: int) -> Conn:
    """Swin's (shifted) window attention on an (H, W) grid: the grid is rolled by -shift, cut in
    ws x ws windows, every token attends to every token of its window (the shift mask only adds a
    finite -100 to the scores: no weight is zero), and the result is rolled back."""
    def conn(hw):
        H, W = hw
        P = torch.zeros(H * W, H * W, dtype=torch.float64)
        rolled = lambda h, w: ((h - shift) % H, (w - shift) % W)   # where (h, w) lands after roll
        for h in range(H):
            for w in range(W):
                for h2 in range(H):
                    for w2 in range(W):
                        a, b = rolled(h, w), rolled(h2, w2)
                        if a[0] // ws == b[0] // ws and a[1] // ws == b[1] // ws:
                            P[h * W + w, h2 * W + w2] = 1.0
        return P, (H, W)
    return conn


def ln_fixed(c: Consts, key: str, x: torch.Tensor, weight, bias, eps: float) -> torch.Tensor:
    """LayerNorm over the last (channel) axis with the forward pass's statistics recorded."""
    mean = recorded(c, key + ".mean", lambda: x.mean(-1, keepdim=True))
    var = recorded(c, key + ".var", lambda: ((x - x.mean(-1, keepdim=True)) ** 2).mean(-1, keepdim=True))
    y = (x - mean) / torch.sqrt(var + eps)
    if weight is not None:
        y = y * weight
    if bias is not None:
        y = y + bias
    return y


def rms_fixed(c: Consts, key: str, x: torch.Tensor, weight, eps: float) -> torch.Tensor:
    """RMSNorm over the last (channel) axis with the forward pass's mean square recorded: a pure
    per-position scale (no centring, no bias)."""
    ms = recorded(c, key + ".ms", lambda: (x * x).mean(-1, keepdim=True))
    y = x / torch.sqrt(ms + eps)
    return y if weight is None else y * weight


def uniform(c: Consts, key: str, a: torch.Tensor, b: torch.Tensor, op=torch.mul) -> torch.Tensor:
    """A product of two input-dependent factors with no gate (SPEC §8): the linear function
    ``½ (op(a, b̄) + op(ā, b))`` with ``ā, b̄`` recorded on the real forward."""
    a0 = recorded(c, key + ".a", lambda: a)
    b0 = recorded(c, key + ".b", lambda: b)
    return 0.5 * (op(a, b0) + op(a0, b))


# --------------------------------------------------------------------------------------------
# Network description
# --------------------------------------------------------------------------------------------


@dataclass
class Block:
    """One affine block followed by its activation layer.

    name:   the name of the activation layer (its output tensor);
    inputs: names of the tensors the block reads ("input" or earlier block names);
    fn:     fn(consts, *xs) -> v, the pre-activation (batch of one sample); it must use
            ``maxpool_fixed``, ``gate_fixed``, ``norm_fixed`` or ``recorded`` for
            data-dependent constants;
    shadow: for every input, a list of connectivity ops, one per structural branch from that
            input to the output (their path counts add up);
    act:    the activation applied to v (None: a virtual identity layer, e.g. the encoder output
            when it is not an activation)."""
    name: str
    inputs: Sequence[str]
    fn: Callable
    shadow: Sequence[Sequence[Conn]]
    act: Optional[Callable] = None
    layout: Optional[str] = None   # the output's layout (default: "nchw" for rank 4, else "tokens")


@dataclass
class Net:
    blocks: List[Block]
    head: Callable  # encoder output L -> logits

    @property
    def L(self) -> str:
        return self.blocks[-1].name

    def layout(self, name: str, t: torch.Tensor) -> str:
        for blk in self.blocks:
            if blk.name == name and blk.layout is not None:
                return blk.layout
        return default_layout(t)


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


# --------------------------------------------------------------------------------------------
# Layouts (SPEC §8): where the channels of a tensor are.  "nchw": (1, C, H, W); "nhwc":
# (1, H, W, C); "tokens": (1, N, C); "ncl": (1, C, N) (a token axis last, e.g. MLP-Mixer's
# token-mixing hidden layer).  A PFV is the channel vector at one position.
# --------------------------------------------------------------------------------------------


def default_layout(t: torch.Tensor) -> str:
    return "nchw" if t.dim() == 4 else "tokens"


def to_cp(t: torch.Tensor, layout: str) -> torch.Tensor:
    """One sample (batch axis of size 1) as a (channels, positions) matrix."""
    t = t[0]
    if layout in ("nchw", "ncl"):
        return t.reshape(t.shape[0], -1)
    return t.reshape(-1, t.shape[-1]).T          # nhwc, tokens: channels last


def from_cp(m: torch.Tensor, layout: str, like: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`to_cp` (shape of ``like``)."""
    if layout in ("nchw", "ncl"):
        return m.reshape(like.shape)
    return m.T.reshape(like.shape)


def positions(t: torch.Tensor, layout: str) -> Tuple[int, ...]:
    """The position grid of a tensor: (H, W), (N,), ..."""
    if layout in ("nchw", "ncl"):
        return tuple(t.shape[2:])
    return tuple(t.shape[1:-1])


def block_mu(blk: Block, c: Consts, xs: Sequence[torch.Tensor], v: torch.Tensor,
             eps: float = 1e-12, layouts: Optional[Sequence[str]] = None, out_layout: Optional[str] = None):
    """The sharing ratios of one block for one sample.

    Returns (mus, info): mus[a] is a (HWo, HW_a) matrix with mus[a][j, i] = mu(i -> j) for the
    a-th input; info holds the intermediate quantities (v_hat, D, degenerate positions).
    ``layouts`` / ``out_layout``: the inputs' and the output's layouts (default: by rank)."""
    layouts = list(layouts) if layouts is not None else [default_layout(x) for x in xs]
    out_layout = out_layout or default_layout(v)
    out_pos = positions(v, out_layout)
    vf = to_cp(v, out_layout)  # (Cv, HWo)
    Cv, HWo = vf.shape
    inputs = tuple(x.detach() for x in xs)
    xcp = tuple(to_cp(x, lay) for x, lay in zip(inputs, layouts))

    # Linear part: the Jacobian of the block (affine with recorded constants), in (C, P) form.
    def f(*z):
        native = [from_cp(zi, lay, x) for zi, lay, x in zip(z, layouts, inputs)]
        return to_cp(blk.fn(c, *native), out_layout)
    jac = torch.autograd.functional.jacobian(f, xcp, vectorize=True)
    if not isinstance(jac, tuple):
        jac = (jac,)
    # Bias: the block evaluated on zero inputs, same constants.
    with torch.no_grad():
        b = to_cp(blk.fn(c, *[torch.zeros_like(x) for x in inputs]), out_layout)
        # Sanity: the block really is affine: v == Lin x + b.
        lin_total = sum(torch.einsum("cjai,ai->cj", J, xa) for J, xa in zip(jac, xcp))
        assert torch.allclose(lin_total + b, vf, rtol=1e-9, atol=1e-9 * (1 + vf.abs().max().item())), \
            f"block {blk.name} is not affine in its inputs with the recorded constants"

    # Structural path counts and norms.
    P, n = [], []
    for x, lay, xa, branches in zip(inputs, layouts, xcp, blk.shadow):
        Pa = torch.zeros(HWo, xa.shape[1], dtype=torch.float64)
        for br in branches:
            Q, hw = br(positions(x, lay))
            assert tuple(hw) == out_pos, f"shadow of {blk.name} has output size {hw}, block {out_pos}"
            Pa = Pa + Q
        P.append(Pa.to(v.dtype))
        n.append(xa.norm(dim=0))  # (HW_a,)
    D = sum(Pa @ na for Pa, na in zip(P, n))  # (HWo,)

    vnorm2 = (vf * vf).sum(0)  # (HWo,)
    live = vnorm2 > eps
    mus, vhats = [], []
    for Ja, xa, Pa, na in zip(jac, xcp, P, n):
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
    per_block = [block_mu(blk, c, xs, v, eps, [net.layout(n, t) for n, t in zip(blk.inputs, xs)],
                          net.layout(blk.name, v))
                 for blk, (c, xs, v) in zip(net.blocks, records)]
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
            outs.setdefault(name, []).append(r.reshape(positions(env[name], net.layout(name, env[name]))))
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


# --------------------------------------------------------------------------------------------
# Tiny test networks, each with its hand-written block description
# --------------------------------------------------------------------------------------------
# Every factory returns (module, Net); the module is float64, in eval mode, with random
# weights and random batch-norm statistics/affine parameters. Block names are the fx node names
# of the activation layers (module path with "." -> "_", functional calls "relu", "relu_1", ...).

def randomize_bn(model: nn.Module, generator: Optional[torch.Generator] = None) -> nn.Module:
    """Random running statistics and affine parameters for every batch-norm layer."""
    for mod in model.modules():
        if isinstance(mod, nn.modules.batchnorm._BatchNorm):
            c = mod.num_features
            with torch.no_grad():
                mod.running_mean.copy_(0.5 * torch.randn(c, generator=generator))
                mod.running_var.copy_(0.5 + torch.rand(c, generator=generator))
                if mod.affine:
                    mod.weight.copy_(0.5 + torch.rand(c, generator=generator))
                    mod.bias.copy_(0.3 * torch.randn(c, generator=generator))
    return model


def _relu(v):
    return torch.relu(v)


class PlainNet(nn.Module):
    """conv/BN/ReLU stack, module activations (one in-place), nn.AdaptiveAvgPool2d + Linear head."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 6, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(6)
        self.act1 = nn.ReLU()
        self.conv2 = nn.Conv2d(6, 6, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(6)
        self.act2 = nn.ReLU(inplace=True)
        self.conv3 = nn.Conv2d(6, 8, 3, padding=1)
        self.act3 = nn.ReLU()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.flat = nn.Flatten()
        self.fc = nn.Linear(8, 5)

    def forward(self, x):
        x = self.act1(self.bn1(self.conv1(x)))
        x = self.act2(self.bn2(self.conv2(x)))
        x = self.act3(self.conv3(x))
        return self.fc(self.flat(self.pool(x)))


def plain_net():
    m = randomize_bn(PlainNet()).double().eval()
    blocks = [
        Block("act1", ["input"], lambda c, x: m.bn1(m.conv1(x)), [[window(3, 1, 1)]], _relu),
        Block("act2", ["act1"], lambda c, x: m.bn2(m.conv2(x)), [[window(3, 1, 1)]], _relu),
        Block("act3", ["act2"], lambda c, x: m.conv3(x), [[window(3, 1, 1)]], _relu),
    ]
    return m, Net(blocks, head=lambda A: m.fc(A.mean((2, 3))))


class StridedNet(nn.Module):
    """Stride 2, dilation 2, groups, depthwise, 1x1, non-square kernels, bias and no bias;
    functional, module and tensor-method activations; head: mean over space + Linear."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, stride=2, padding=1)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=2, dilation=2, groups=2)
        self.lrelu = nn.LeakyReLU(0.1)
        self.conv3 = nn.Conv2d(8, 8, 3, padding=1, groups=8, bias=False)
        self.bn3 = nn.BatchNorm2d(8)
        self.conv4 = nn.Conv2d(8, 8, (3, 1), padding=(1, 0))
        self.conv5 = nn.Conv2d(8, 6, 2, bias=False)
        self.conv6 = nn.Conv2d(6, 6, (1, 3), stride=(1, 2), padding=(0, 1))
        self.fc = nn.Linear(6, 4)

    def forward(self, x):
        x = F.relu(self.conv1(x))            # 8x8 -> 4x4
        x = self.lrelu(self.conv2(x))
        x = F.elu(self.bn3(self.conv3(x)))
        x = self.conv4(x).relu()
        x = torch.tanh(self.conv5(x))        # 4x4 -> 3x3
        x = F.silu(self.conv6(x))            # 3x3 -> 3x2
        return self.fc(x.mean((2, 3)))


def strided_net():
    m = randomize_bn(StridedNet()).double().eval()
    blocks = [
        Block("relu", ["input"], lambda c, x: m.conv1(x), [[window(3, 2, 1)]], _relu),
        Block("lrelu", ["relu"], lambda c, x: m.conv2(x), [[window(3, 1, 2, 2)]],
              lambda v: F.leaky_relu(v, 0.1)),
        Block("elu", ["lrelu"], lambda c, x: m.bn3(m.conv3(x)), [[window(3, 1, 1)]], F.elu),
        Block("relu_1", ["elu"], lambda c, x: m.conv4(x), [[window((3, 1), 1, (1, 0))]], _relu),
        Block("tanh", ["relu_1"], lambda c, x: m.conv5(x), [[window(2)]], torch.tanh),
        Block("silu", ["tanh"], lambda c, x: m.conv6(x), [[window((1, 3), (1, 2), (0, 1))]], F.silu),
    ]
    return m, Net(blocks, head=lambda A: m.fc(A.mean((2, 3))))


class PoolNet(nn.Module):
    """Overlapping max-pool 3x3 s2 p1, avg-pool 3x3 s1 p1 (zero padding counted in the mean),
    non-overlapping max-pool 2x2 ending the encoder (L is a virtual identity layer), SiLU and
    GELU modules, flatten + Linear head."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 6, 3, padding=1)
        self.act1 = nn.ReLU(inplace=True)
        self.pool1 = nn.MaxPool2d(3, 2, 1)
        self.conv2 = nn.Conv2d(6, 6, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(6)
        self.act2 = nn.SiLU()
        self.pool2 = nn.AvgPool2d(3, 1, 1)
        self.conv3 = nn.Conv2d(6, 8, 1)
        self.act3 = nn.GELU()
        self.pool3 = nn.MaxPool2d(2)
        self.fc = nn.Linear(8 * 2 * 2, 5)

    def forward(self, x):
        x = self.pool1(self.act1(self.conv1(x)))       # 8x8 -> 4x4
        x = self.act2(self.bn2(self.conv2(x)))
        x = self.act3(self.conv3(self.pool2(x)))
        x = self.pool3(x)                              # 4x4 -> 2x2 (encoder output)
        return self.fc(torch.flatten(x, 1))


def pool_net():
    m = randomize_bn(PoolNet()).double().eval()
    blocks = [
        Block("act1", ["input"], lambda c, x: m.conv1(x), [[window(3, 1, 1)]], _relu),
        Block("act2", ["act1"], lambda c, x: m.bn2(m.conv2(maxpool_fixed(c, "p1", x, 3, 2, 1))),
              [[chain(window(3, 2, 1), window(3, 1, 1))]], F.silu),
        Block("act3", ["act2"], lambda c, x: m.conv3(F.avg_pool2d(x, 3, 1, 1)),
              [[chain(window(3, 1, 1), window(1))]], F.gelu),
        Block("pool3", ["act3"], lambda c, x: maxpool_fixed(c, "p3", x, 2), [[window(2, 2)]], None),
    ]
    return m, Net(blocks, head=lambda A: m.fc(torch.flatten(A, 1)))


class BasicBlock(nn.Module):
    def __init__(self, cin, cout, stride, act1, act2):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.act1 = act1
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.act2 = act2
        self.down = None
        if stride != 1 or cin != cout:
            self.down = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        y = self.act1(self.bn1(self.conv1(x)))
        y = self.bn2(self.conv2(y))
        return self.act2(y + (x if self.down is None else self.down(x)))


class ResNetTiny(nn.Module):
    """Stem + an identity residual block + a downsampling block with a 1x1-conv shortcut
    (multi-input blocks, fan-out of a block input), global average pooling + Linear head."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.block1 = BasicBlock(8, 8, 1, nn.ReLU(inplace=True), nn.ReLU(inplace=True))
        self.block2 = BasicBlock(8, 12, 2, nn.ELU(), nn.ReLU())
        self.fc = nn.Linear(12, 5)

    def forward(self, x):
        x = F.relu(self.bn(self.conv(x)))
        x = self.block2(self.block1(x))
        return self.fc(F.adaptive_avg_pool2d(x, 1).flatten(1))


def resnet_tiny():
    m = randomize_bn(ResNetTiny()).double().eval()
    b1, b2 = m.block1, m.block2
    blocks = [
        Block("relu", ["input"], lambda c, x: m.bn(m.conv(x)), [[window(3, 1, 1)]], _relu),
        Block("block1_act1", ["relu"], lambda c, x: b1.bn1(b1.conv1(x)), [[window(3, 1, 1)]], _relu),
        Block("block1_act2", ["block1_act1", "relu"], lambda c, y, x: b1.bn2(b1.conv2(y)) + x,
              [[window(3, 1, 1)], [identity()]], _relu),
        Block("block2_act1", ["block1_act2"], lambda c, x: b2.bn1(b2.conv1(x)), [[window(3, 2, 1)]], F.elu),
        Block("block2_act2", ["block2_act1", "block1_act2"],
              lambda c, y, x: b2.bn2(b2.conv2(y)) + b2.down(x),
              [[window(3, 1, 1)], [window(1, 2, 0)]], _relu),
    ]
    return m, Net(blocks, head=lambda A: m.fc(A.mean((2, 3))))


class CatNet(nn.Module):
    """Channel cat of two branches feeding a conv (two-input block sharing D); a cat inside one
    block (one input reaching the output through two branches); a RepVGG-like sum of a 3x3, a
    1x1 and the identity (three paths from one input position); avg-pool without counting the
    padding; in-place functional and tensor-method activations."""

    def __init__(self):
        super().__init__()
        self.conv0 = nn.Conv2d(3, 6, 3, padding=1)
        self.a0 = nn.LeakyReLU(0.2, inplace=True)
        self.br1 = nn.Conv2d(6, 4, 1)
        self.br2 = nn.Conv2d(6, 4, 3, padding=1)
        self.convm = nn.Conv2d(8, 6, 3, padding=1)
        self.bnm = nn.BatchNorm2d(6)
        self.conva = nn.Conv2d(6, 3, 3, padding=1, bias=False)
        self.bna = nn.BatchNorm2d(3)
        self.convb = nn.Conv2d(6, 3, 1)
        self.rep3 = nn.Conv2d(6, 6, 3, padding=1)
        self.rep1 = nn.Conv2d(6, 6, 1)
        self.convf = nn.Conv2d(6, 6, 1)
        self.fc = nn.Linear(6, 5)

    def forward(self, x):
        z = self.a0(self.conv0(x))
        y1 = F.relu(self.br1(z), inplace=True)
        y2 = F.elu(self.br2(z))
        t = torch.tanh(self.bnm(self.convm(torch.cat([y1, y2], 1))))
        g = F.gelu(torch.cat([self.bna(self.conva(t)), self.convb(t)], dim=1))
        s = F.silu(self.rep3(g) + self.rep1(g) + g)
        p = F.avg_pool2d(s, 3, stride=2, padding=1, count_include_pad=False)   # 8x8 -> 4x4
        r = self.convf(p).relu_()
        return self.fc(F.adaptive_avg_pool2d(r, (1, 1)).flatten(1))


def cat_net():
    m = randomize_bn(CatNet()).double().eval()
    blocks = [
        Block("a0", ["input"], lambda c, x: m.conv0(x), [[window(3, 1, 1)]],
              lambda v: F.leaky_relu(v, 0.2)),
        Block("relu", ["a0"], lambda c, z: m.br1(z), [[window(1)]], _relu),
        Block("elu", ["a0"], lambda c, z: m.br2(z), [[window(3, 1, 1)]], F.elu),
        Block("tanh", ["relu", "elu"], lambda c, a, b: m.bnm(m.convm(torch.cat([a, b], 1))),
              [[window(3, 1, 1)], [window(3, 1, 1)]], torch.tanh),
        Block("gelu", ["tanh"], lambda c, t: torch.cat([m.bna(m.conva(t)), m.convb(t)], 1),
              [[window(3, 1, 1), window(1)]], F.gelu),
        Block("silu", ["gelu"], lambda c, g: m.rep3(g) + m.rep1(g) + g,
              [[window(3, 1, 1), window(1), identity()]], F.silu),
        Block("relu_", ["silu"], lambda c, s: m.convf(F.avg_pool2d(s, 3, 2, 1, count_include_pad=False)),
              [[chain(window(3, 2, 1), window(1))]], _relu),
    ]
    return m, Net(blocks, head=lambda A: m.fc(A.mean((2, 3))))


class UpNet(nn.Module):
    """Strided conv, then a transposed convolution back up (stride 2, padding 1, output
    padding 1: LowFormer's upsampling), a residual from the stem, global average pooling."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 4, 3, padding=1)
        self.down = nn.Conv2d(4, 6, 3, stride=2, padding=1)
        self.up = nn.ConvTranspose2d(6, 4, 3, stride=2, padding=1, output_padding=1)
        self.fc = nn.Linear(4, 5)

    def forward(self, x):
        s = torch.relu(self.stem(x))
        d = torch.relu(self.down(s))
        y = torch.relu(s + self.up(d))
        return self.fc(y.mean((2, 3)))


def up_net():
    torch.manual_seed(0)
    m = UpNet().double().eval()
    blocks = [
        Block("relu", ["input"], lambda c, x: m.stem(x), [[window(3, 1, 1)]], _relu),
        Block("relu_1", ["relu"], lambda c, s: m.down(s), [[window(3, 2, 1)]], _relu),
        Block("relu_2", ["relu_1", "relu"], lambda c, d, s: s + m.up(d),
              [[window_transposed(3, 2, 1, 1, 1)], [identity()]], _relu),
    ]
    return m, Net(blocks, head=lambda A: m.fc(A.mean((2, 3))))


TINY_NETS = {
    "up": up_net,
    "plain": plain_net,
    "strided": strided_net,
    "pools": pool_net,
    "resnet": resnet_tiny,
    "cat": cat_net,
}


# --------------------------------------------------------------------------------------------
# Tiny token models (SPEC §8), each with its hand-written block description
# --------------------------------------------------------------------------------------------

def _vit_attention(c: Consts, key: str, attn, x: torch.Tensor) -> torch.Tensor:
    """Multi-head self-attention written from its definition: the weights
    softmax(q k^T / sqrt(d)) are a recorded gate, the output is linear in the values."""
    B, N, C = x.shape
    h = attn.num_heads
    d = C // h
    Wq, Wk, Wv = attn.qkv.weight.split(C)
    bq, bk, bv = attn.qkv.bias.split(C)

    def weights():
        q = F.linear(x, Wq, bq).reshape(B, N, h, d).transpose(1, 2)
        k = F.linear(x, Wk, bk).reshape(B, N, h, d).transpose(1, 2)
        return torch.softmax(q @ k.transpose(-2, -1) / d ** 0.5, dim=-1)
    w = recorded(c, key, weights)
    v = F.linear(x, Wv, bv).reshape(B, N, h, d).transpose(1, 2)
    return F.linear((w @ v).transpose(1, 2).reshape(B, N, C), attn.proj.weight, attn.proj.bias)


def tiny_vit(fused: bool, patch_bias: bool = True, rms: bool = False):
    """A timm VisionTransformer: 8x8 input, 4x4 patches (4 tokens + a class token), a position
    embedding, one pre-norm block (attention + GELU MLP), final LayerNorm (L = forward_features),
    class-token head.  ``fused``: F.scaled_dot_product_attention, else the manual softmax.
    ``patch_bias=False``: a patch embedding without bias (timm's PE/EVA models), so the class
    token is the only constant that enters the token sequence's cat.  ``rms``: every norm is
    timm's RmsNorm (``F.rms_norm``, weight only) instead of LayerNorm."""
    import timm
    torch.manual_seed(0)
    extra = dict(norm_layer=timm.layers.RmsNorm) if rms else {}
    m = timm.models.vision_transformer.VisionTransformer(
        img_size=8, patch_size=4, in_chans=3, num_classes=5, embed_dim=8, depth=1, num_heads=2,
        mlp_ratio=2.0, global_pool="token", **extra).double().eval()
    if not patch_bias:
        m.patch_embed.proj.register_parameter("bias", None)
    with torch.no_grad():
        m.cls_token.normal_()
        m.pos_embed.normal_(std=0.5)
        for p_ in m.parameters():
            p_.add_(0.05 * torch.randn_like(p_))
    blk = m.blocks[0]
    blk.attn.fused_attn = fused

    def tokens(x):
        t = m.patch_embed.proj(x).flatten(2).transpose(1, 2)
        return torch.cat([m.cls_token.expand(x.shape[0], -1, -1), t], 1) + m.pos_embed

    def norm(c, key, mod, t):
        if rms:
            return rms_fixed(c, key, t, mod.weight, mod.eps)
        return ln_fixed(c, key, t, mod.weight, mod.bias, mod.eps)

    def x1(c, x):
        t = tokens(x)
        return t + _vit_attention(c, "attn", blk.attn, norm(c, "ln1", blk.norm1, t))

    def pre_act(c, x):
        return blk.mlp.fc1(norm(c, "ln2", blk.norm2, x1(c, x)))

    def L(c, a, x):
        y = x1(c, x) + blk.mlp.fc2(a)
        return norm(c, "ln", m.norm, y)

    emb = chain(window(4, 4), flat(), prefix(1))
    mix = chain(emb, full(5))
    blocks = [
        Block("blocks_0_mlp_act", ["input"], pre_act, [[emb, mix]], F.gelu),
        Block("rms_norm_2" if rms else "layer_norm_2", ["blocks_0_mlp_act", "input"], L,
              [[identity()], [emb, mix]]),
    ]
    return m, Net(blocks, head=lambda A: m.head(A[:, 0]))


def tiny_mixer():
    """A timm MlpMixer: 8x8 input, 4x4 patches (4 tokens), one block: token-mixing MLP (4 -> 4
    -> 4 tokens, GELU on the hidden token axis) and channel MLP, final LayerNorm, mean head."""
    import timm
    torch.manual_seed(0)
    m = timm.models.mlp_mixer.MlpMixer(num_classes=5, img_size=8, in_chans=3, patch_size=4, num_blocks=1,
                                       embed_dim=8, mlp_ratio=(0.5, 2.0)).double().eval()
    with torch.no_grad():
        for p_ in m.parameters():
            p_.add_(0.05 * torch.randn_like(p_))
    blk = m.blocks[0]

    def tokens(x):
        return m.stem.proj(x).flatten(2).transpose(1, 2)

    def ln(c, key, mod, t):
        return ln_fixed(c, key, t, mod.weight, mod.bias, mod.eps)

    def tok_pre(c, x):
        return blk.mlp_tokens.fc1(ln(c, "ln1", blk.norm1, tokens(x)).transpose(1, 2))

    def x1(c, a, x):
        return tokens(x) + blk.mlp_tokens.fc2(a).transpose(1, 2)

    def ch_pre(c, a, x):
        return blk.mlp_channels.fc1(ln(c, "ln2", blk.norm2, x1(c, a, x)))

    def L(c, b, a, x):
        return ln(c, "ln", m.norm, x1(c, a, x) + blk.mlp_channels.fc2(b))

    emb = chain(window(4, 4), flat())
    blocks = [
        Block("blocks_0_mlp_tokens_act", ["input"], tok_pre,
              [[chain(emb, full(blk.mlp_tokens.fc1.out_features))]], F.gelu, layout="ncl"),
        Block("blocks_0_mlp_channels_act", ["blocks_0_mlp_tokens_act", "input"], ch_pre,
              [[full(4)], [emb]], F.gelu),
        Block("norm", ["blocks_0_mlp_channels_act", "blocks_0_mlp_tokens_act", "input"], L,
              [[identity()], [full(4)], [emb]]),
    ]
    return m, Net(blocks, head=lambda A: m.head(A.mean(1)))


class SwiGLUNet(nn.Module):
    """Patch tokens, a pre-norm SwiGLU MLP (``silu(fc_g(x)) * fc_x(x)``, a product of two
    input-dependent tensors with no gate) with a residual, mean over tokens, linear head."""

    def __init__(self):
        super().__init__()
        self.patch = nn.Conv2d(3, 8, 4, 4)
        self.norm = nn.LayerNorm(8)
        self.fc_g = nn.Linear(8, 12)
        self.fc_x = nn.Linear(8, 12)
        self.act = nn.SiLU()
        self.fc2 = nn.Linear(12, 8)
        self.head = nn.Linear(8, 5)

    def forward(self, x):
        t = self.patch(x).flatten(2).transpose(1, 2)
        y = self.norm(t)
        t = t + self.fc2(self.act(self.fc_g(y)) * self.fc_x(y))
        return self.head(t.mean(1))


def swiglu_net():
    torch.manual_seed(0)
    m = SwiGLUNet().double().eval()

    def tokens(x):
        return m.patch(x).flatten(2).transpose(1, 2)

    def y(c, x):
        return ln_fixed(c, "ln", tokens(x), m.norm.weight, m.norm.bias, m.norm.eps)

    def L(c, a, x):
        return tokens(x) + m.fc2(uniform(c, "glu", a, m.fc_x(y(c, x))))

    emb = chain(window(4, 4), flat())
    blocks = [
        Block("act", ["input"], lambda c, x: m.fc_g(y(c, x)), [[emb]], F.silu),
        Block("add", ["act", "input"], L, [[identity()], [emb, emb]]),
    ]
    return m, Net(blocks, head=lambda A: m.head(A.mean(1)))


class StarNet(nn.Module):
    """A StarNet-style star block on a conv stem: depthwise conv, two 1x1 branches,
    ``relu6(f1(x)) * f2(x)`` (no gate), 1x1 + depthwise conv, residual; global average pooling."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 6, 3, padding=1)
        self.dw = nn.Conv2d(6, 6, 3, padding=1, groups=6)
        self.f1 = nn.Conv2d(6, 12, 1)
        self.f2 = nn.Conv2d(6, 12, 1)
        self.act = nn.ReLU6()
        self.g = nn.Conv2d(12, 6, 1)
        self.dw2 = nn.Conv2d(6, 6, 3, padding=1, groups=6)
        self.fc = nn.Linear(6, 5)

    def forward(self, x):
        s = F.relu(self.stem(x))
        y = self.dw(s)
        y = self.act(self.f1(y)) * self.f2(y)
        s = s + self.dw2(self.g(y))
        return self.fc(F.adaptive_avg_pool2d(s, 1).flatten(1))


def star_net():
    torch.manual_seed(0)
    m = StarNet().double().eval()

    def L(c, a, s):
        return s + m.dw2(m.g(uniform(c, "star", a, m.f2(m.dw(s)))))

    blocks = [
        Block("relu", ["input"], lambda c, x: m.stem(x), [[window(3, 1, 1)]], _relu),
        Block("act", ["relu"], lambda c, s: m.f1(m.dw(s)), [[window(3, 1, 1)]], lambda v: F.relu6(v)),
        Block("add", ["act", "relu"], L,
              [[window(3, 1, 1)], [identity(), chain(window(3, 1, 1), window(3, 1, 1))]]),
    ]
    return m, Net(blocks, head=lambda A: m.fc(A.mean((2, 3))))


class LinearAttentionNet(nn.Module):
    """Patch tokens + GELU, a linear-attention block ``x + proj(q @ (k^T @ v)) / N`` (two
    products of input-dependent tensors, one contracting the token axis), mean head."""

    def __init__(self):
        super().__init__()
        self.patch = nn.Conv2d(3, 8, 4, 4)
        self.q = nn.Linear(8, 8)
        self.k = nn.Linear(8, 8)
        self.v = nn.Linear(8, 8)
        self.proj = nn.Linear(8, 8)
        self.head = nn.Linear(8, 5)

    def forward(self, x):
        t = F.gelu(self.patch(x).flatten(2).transpose(1, 2))
        kv = self.k(t).transpose(1, 2) @ self.v(t)
        t = t + self.proj(self.q(t) @ kv) / t.shape[1]
        return self.head(t.mean(1))


def linear_attention_net():
    torch.manual_seed(0)
    m = LinearAttentionNet().double().eval()

    def L(c, t):
        kv = uniform(c, "kv", m.k(t).transpose(1, 2), m.v(t), torch.matmul)
        return t + m.proj(uniform(c, "qkv", m.q(t), kv, torch.matmul)) / t.shape[1]

    blocks = [
        Block("gelu", ["input"], lambda c, x: m.patch(x).flatten(2).transpose(1, 2),
              [[chain(window(4, 4), flat())]], F.gelu),
        Block("add", ["gelu"], L, [[identity(), identity(), full(4), full(4)]]),
    ]
    return m, Net(blocks, head=lambda A: m.head(A.mean(1)))


class SwinNet(nn.Module):
    """2x2 patches on an 8x8 input (a 4x4 channels-last grid), one timm SwinTransformerBlock with
    2x2 windows shifted by 1 (relative-position bias and shift mask in the gate branch), mean head."""

    def __init__(self):
        super().__init__()
        from timm.models.swin_transformer import SwinTransformerBlock
        self.patch = nn.Conv2d(3, 8, 2, 2)
        self.block = SwinTransformerBlock(dim=8, input_resolution=(4, 4), num_heads=2, window_size=2,
                                          shift_size=1, mlp_ratio=2.0)
        self.head = nn.Linear(8, 5)

    def forward(self, x):
        t = self.patch(x).permute(0, 2, 3, 1)
        return self.head(self.block(t).mean((1, 2)))


def swin_net():
    torch.manual_seed(0)
    m = SwinNet().double().eval()
    with torch.no_grad():
        for p_ in m.parameters():
            p_.add_(0.05 * torch.randn_like(p_))
        m.block.attn.relative_position_bias_table.normal_()
    blk = m.block
    ws, sh, heads = 2, 1, 2

    def window_attention(c, t):
        B, H, W, C = t.shape
        d = C // heads
        y = torch.roll(t, (-sh, -sh), (1, 2))
        y = y.reshape(B, H // ws, ws, W // ws, ws, C).permute(0, 1, 3, 2, 4, 5).reshape(-1, ws * ws, C)
        Wq, Wk, Wv = blk.attn.qkv.weight.split(C)
        bq, bk, bv = blk.attn.qkv.bias.split(C)
        nW = (H // ws) * (W // ws)

        def weights():
            q = F.linear(y, Wq, bq).reshape(-1, ws * ws, heads, d).transpose(1, 2)
            k = F.linear(y, Wk, bk).reshape(-1, ws * ws, heads, d).transpose(1, 2)
            s = q @ k.transpose(-2, -1) / d ** 0.5 + blk.attn._get_rel_pos_bias()
            s = s.view(-1, nW, heads, ws * ws, ws * ws) + blk.attn_mask.unsqueeze(1).unsqueeze(0)
            return torch.softmax(s.view(-1, heads, ws * ws, ws * ws), dim=-1)
        w = recorded(c, "attn", weights)
        v = F.linear(y, Wv, bv).reshape(-1, ws * ws, heads, d).transpose(1, 2)
        o = blk.attn.proj((w @ v).transpose(1, 2).reshape(-1, ws * ws, C))
        o = o.reshape(B, H // ws, W // ws, ws, ws, C).permute(0, 1, 3, 2, 4, 5).reshape(B, H, W, C)
        return torch.roll(o, (sh, sh), (1, 2))

    def x1(c, x):
        t = m.patch(x).permute(0, 2, 3, 1)
        n1 = blk.norm1
        return t + window_attention(c, ln_fixed(c, "ln1", t, n1.weight, n1.bias, n1.eps))

    def pre(c, x):   # the MLP runs on the (B, H*W, C) token sequence
        n2 = blk.norm2
        t = x1(c, x)
        return blk.mlp.fc1(ln_fixed(c, "ln2", t.reshape(t.shape[0], -1, t.shape[-1]), n2.weight, n2.bias, n2.eps))

    def L(c, a, x):
        t = x1(c, x)
        return t + blk.mlp.fc2(a).reshape(t.shape)

    emb = window(2, 2)
    att = chain(emb, shifted_windows(ws, sh))
    blocks = [
        Block("block_mlp_act", ["input"], pre, [[chain(emb, flat()), chain(att, flat())]], F.gelu),
        Block("reshape_3", ["block_mlp_act", "input"], L, [[tokens_to_grid(4, 4)], [emb, att]], layout="nhwc"),
    ]
    return m, Net(blocks, head=lambda A: m.head(A.mean((1, 2))))


def grid_windows(g: int) -> Conn:
    """MaxViT's grid attention on an (H, W) grid: a g x g grid of windows with stride (H/g, W/g);
    tokens (h, w) and (h2, w2) attend to each other when h = h2 and w = w2 modulo (H/g, W/g)."""
    def conn(hw):
        H, W = hw
        P = torch.zeros(H * W, H * W, dtype=torch.float64)
        for h in range(H):
            for w in range(W):
                for h2 in range(H):
                    for w2 in range(W):
                        if h % (H // g) == h2 % (H // g) and w % (W // g) == w2 % (W // g):
                            P[h * W + w, h2 * W + w2] = 1.0
        return P, (H, W)
    return conn


class MaxViTNet(nn.Module):
    """2x2 patches on an 8x8 input (a 4x4 channels-last grid of 4 channels), one timm MaxViT
    PartitionAttentionCl: 2x2 window ('block') or grid partition, two heads of size 2 laid out
    head-first in the qkv channels, a relative-position bias, a GELU MLP.  A window holds 4
    tokens, as many as there are channels: the head merge (B', 4, 2, 2) -> (B', 2, 2, 4) must not
    be read as moving channels to positions."""

    def __init__(self, partition: str):
        super().__init__()
        from timm.models.maxxvit import MaxxVitTransformerCfg, PartitionAttentionCl
        self.patch = nn.Conv2d(3, 4, 2, 2)
        cfg = MaxxVitTransformerCfg(dim_head=2, window_size=(2, 2), expand_ratio=2.0)
        self.block = PartitionAttentionCl(4, partition, cfg=cfg)
        self.head = nn.Linear(4, 5)

    def forward(self, x):
        t = self.patch(x).permute(0, 2, 3, 1)
        return self.head(self.block(t).mean((1, 2)))


def maxvit_net(partition: str, fused: bool):
    torch.manual_seed(0)
    m = MaxViTNet(partition).double().eval()
    with torch.no_grad():
        for p_ in m.parameters():
            p_.add_(0.05 * torch.randn_like(p_))
        m.block.attn.rel_pos.relative_position_bias_table.normal_()
    blk = m.block
    blk.attn.fused_attn = fused
    heads, dh, g = 2, 2, 2

    def split(t):     # (1, H, W, C) -> (windows, g * g, C), and its inverse
        B, H, W, C = t.shape
        if partition == "block":
            return t.reshape(B, H // g, g, W // g, g, C).permute(0, 1, 3, 2, 4, 5).reshape(-1, g * g, C)
        return t.reshape(B, g, H // g, g, W // g, C).permute(0, 2, 4, 1, 3, 5).reshape(-1, g * g, C)

    def merge(o, like):
        B, H, W, C = like.shape
        if partition == "block":
            return o.reshape(B, H // g, W // g, g, g, C).permute(0, 1, 3, 2, 4, 5).reshape(B, H, W, C)
        return o.reshape(B, H // g, W // g, g, g, C).permute(0, 3, 1, 4, 2, 5).reshape(B, H, W, C)

    def partition_attention(c, t):
        y = split(t)
        n, C = y.shape[1], y.shape[2]
        # head-first qkv: output channel h * 3 * dh + j * dh + e is (q, k, v)[j] of head h
        Wqkv = blk.attn.qkv.weight.reshape(heads, 3, dh, C)
        bqkv = blk.attn.qkv.bias.reshape(heads, 3, dh)

        def proj(j):
            return torch.einsum("wnc,hec->whne", y, Wqkv[:, j]) + bqkv[:, j][None, :, None, :]

        def weights():
            s = proj(0) @ proj(1).transpose(-2, -1) * dh ** -0.5 + blk.attn.rel_pos.get_bias()
            return torch.softmax(s, dim=-1)
        w = recorded(c, "attn", weights)
        o = (w @ proj(2)).transpose(1, 2).reshape(-1, n, heads * dh)
        return merge(blk.attn.proj(o), t)

    def x1(c, x):
        t = m.patch(x).permute(0, 2, 3, 1)
        n1 = blk.norm1
        return t + partition_attention(c, ln_fixed(c, "ln1", t, n1.weight, n1.bias, n1.eps))

    def pre(c, x):
        n2 = blk.norm2
        return blk.mlp.fc1(ln_fixed(c, "ln2", x1(c, x), n2.weight, n2.bias, n2.eps))

    def L(c, a, x):
        return x1(c, x) + blk.mlp.fc2(a)

    emb = window(2, 2)
    att = chain(emb, shifted_windows(g, 0) if partition == "block" else grid_windows(g))
    blocks = [
        Block("block_mlp_act", ["input"], pre, [[emb, att]], F.gelu, layout="nhwc"),
        # the fx name of L: the manual attention's relative-position bias is one more add
        Block("add_2" if fused else "add_3", ["block_mlp_act", "input"], L, [[identity()], [emb, att]],
              layout="nhwc"),
    ]
    return m, Net(blocks, head=lambda A: m.head(A.mean((1, 2))))


def strided_groups(s: int) -> Conn:
    """``t.view(B, s, -1, C).amax(dim=1)`` on N tokens (Hiera's max-pool over the query stride):
    output token m is the max over input tokens k * (N / s) + m, k < s — the whole window."""
    def conn(hw):
        (N,) = hw
        M = N // s
        P = torch.zeros(M, N, dtype=torch.float64)
        for m_ in range(M):
            for k in range(s):
                P[m_, k * M + m_] = 1.0
        return P, (M,)
    return conn


def amax_fixed(c: Consts, key: str, x: torch.Tensor, dim: int) -> torch.Tensor:
    """``x.amax(dim)`` with the arg-max recorded on the real forward: a gather (linear)."""
    idx = recorded(c, key, lambda: x.argmax(dim, keepdim=True))
    return x.gather(dim, idx).squeeze(dim)


class AmaxNet(nn.Module):
    """Hiera's token max-pool: 2x2 patches (16 tokens) + GELU, a linear layer, a max over the 4
    query-stride groups of tokens (``view(B, 4, -1, C).amax(dim=1)``: 16 -> 4 tokens), a
    residual linear layer on the pooled tokens, mean head."""

    def __init__(self):
        super().__init__()
        self.patch = nn.Conv2d(3, 8, 2, 2)
        self.proj = nn.Linear(8, 6)
        self.fc = nn.Linear(6, 6)
        self.head = nn.Linear(6, 5)

    def forward(self, x):
        t = F.gelu(self.patch(x).flatten(2).transpose(1, 2))
        u = self.proj(t).view(t.shape[0], 4, -1, 6).amax(dim=1)
        return self.head((u + self.fc(u)).mean(1))


def amax_net():
    torch.manual_seed(0)
    m = AmaxNet().double().eval()

    def L(c, t):
        u = amax_fixed(c, "max", m.proj(t).view(1, 4, -1, 6), 1)
        return u + m.fc(u)

    blocks = [
        Block("gelu", ["input"], lambda c, x: m.patch(x).flatten(2).transpose(1, 2),
              [[chain(window(2, 2), flat())]], F.gelu),
        Block("add", ["gelu"], L, [[strided_groups(4), strided_groups(4)]]),
    ]
    return m, Net(blocks, head=lambda A: m.head(A.mean(1)))


class TwoOutputs(nn.Module):
    """A timm-style model whose ``forward_features`` returns two tensors of different widths and
    layouts (CrossViT, CoaT): channels-last tokens (B, 16, 6) and an NCHW map (B, 5, 4, 4); the
    head pools each and adds their logits."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 4, 3, padding=1)
        self.tok = nn.Conv2d(4, 6, 2, stride=2)
        self.down = nn.Conv2d(4, 5, 3, stride=2, padding=1)
        self.fc1 = nn.Linear(6, 5)
        self.fc2 = nn.Linear(5, 5)

    def forward_features(self, x):
        a = torch.relu(self.stem(x))
        t = torch.relu(self.tok(a).flatten(2).transpose(1, 2))
        return [t, self.down(a)]

    def forward_head(self, xs):
        return self.fc1(xs[0].mean(1)) + self.fc2(xs[1].mean((2, 3)))

    def forward(self, x):
        return self.forward_head(self.forward_features(x))


def two_outputs_net():
    """L packs the two outputs: 16 tokens then the 16 positions of the map (row-major), channels
    padded to 6 (the virtual layer at L is the packed tensor)."""
    torch.manual_seed(0)
    m = TwoOutputs().double().eval()

    def L(c, t, a):
        n = m.down(a).flatten(2).transpose(1, 2)                       # (1, 16, 5)
        return torch.cat([t, F.pad(n, (0, 1))], dim=1)

    blocks = [
        Block("relu", ["input"], lambda c, x: m.stem(x), [[window(3, 1, 1)]], _relu),
        Block("relu_1", ["relu"], lambda c, a: m.tok(a).flatten(2).transpose(1, 2),
              [[chain(window(2, 2), flat())]], _relu),
        Block("pack_features", ["relu_1", "relu"], L,
              [[placed(0, 32)], [chain(window(3, 2, 1), flat(), placed(16, 32))]]),
    ]

    def head(A):
        return m.fc1(A[:, :16].mean(1)) + m.fc2(A[:, 16:, :5].mean(1))
    return m, Net(blocks, head=head)


TOKEN_NETS = {
    "two_outputs": two_outputs_net,
    "amax_tokens": amax_net,
    "vit_fused": lambda: tiny_vit(True),
    "vit_no_patch_bias": lambda: tiny_vit(True, patch_bias=False),
    "vit_rms_norm": lambda: tiny_vit(True, rms=True),
    "maxvit_block": lambda: maxvit_net("block", True),
    "maxvit_grid_manual": lambda: maxvit_net("grid", False),
    "vit_manual": lambda: tiny_vit(False),
    "mixer": tiny_mixer,
    "swiglu": swiglu_net,
    "star": star_net,
    "linear_attention": linear_attention_net,
    "swin": swin_net,
}
