"""Tracing and shape ops that timm's token and hybrid models need (issue 15): shape-specialised
traces of forwards that test sizes and devices, named trace errors, and ops that move positions
(transposed convolution, ...), each against the pair-by-pair reference or the model's own logits
with conservation."""
import pytest
import torch
import torch.nn as nn

import srd_fx
from conftest import conservation_error


class _ShapeTests(nn.Module):
    """A forward with Python control flow on the input's size (``if W > 4``), ``x.size(0)`` in
    an ``expand`` and a test of the device's type choosing an autocast context (timm's LiteMLA):
    only a shape-specialised trace resolves them."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.c1 = nn.Conv2d(3, 4, 3, padding=1)
        self.c2 = nn.Conv2d(4, 4, 3, padding=1)
        self.bias = nn.Parameter(torch.randn(1, 4, 1, 1))
        self.fc = nn.Linear(4, 3)

    def forward(self, x):
        y = torch.relu(self.c1(x))
        if y.shape[-1] > 4:
            y = y + self.bias.expand(x.size(0), -1, y.shape[2], y.shape[3])
        if y.device.type != "meta":
            with torch.autocast(device_type=y.device.type, enabled=False):
                y = self.c2(y)
        else:
            y = self.c2(y)
        return self.fc(torch.relu(y).mean((2, 3)))


def test_size_and_device_tests_resolve_in_the_specialised_trace():
    m = _ShapeTests().double().eval()
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    ex = srd_fx.compile(m, example_input=x[:1])
    out = ex(x)
    with torch.no_grad():
        assert torch.equal(out.logits, m(x))
    assert conservation_error(out) < 1e-10


class _ValueTest(nn.Module):
    def forward(self, x):
        return x if x.sum() > 0 else -x


def test_trace_error_names_the_module():
    m = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Sequential(_ValueTest()), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                      nn.Linear(4, 2)).eval()
    with pytest.raises(srd_fx.TraceError, match=r"in module '1\.0' \(_ValueTest\)"):
        srd_fx.compile(m, example_input=torch.randn(1, 3, 8, 8), encoder_output="relu_1")


# ----------------------------------------------------------------------- several encoder outputs
def test_several_encoder_outputs_eq4_per_tensor():
    """forward_features returns [tokens (B, 16, 6), map (B, 5, 4, 4)]: R_L is (B, 32), the tokens
    then the map's positions, each part Eq. 4 with the Grad-CAM weights averaged over its own
    positions (computed here by autograd on the model's own head)."""
    import naive_srd as N
    m, _ = N.two_outputs_net()
    x = torch.randn(3, 3, 8, 8, dtype=torch.float64)
    out = srd_fx.compile(m, layers=("input", "low"))(x)
    with torch.no_grad():
        assert torch.equal(out.logits, m(x))
        t, n = [f.detach().requires_grad_() for f in m.forward_features(x)]
    with torch.enable_grad():
        logits = m.forward_head([t, n])
        w = torch.nn.functional.one_hot(logits.argmax(1), 5).double() - 1 / 5
        gt, gn = torch.autograd.grad(logits, (t, n), w)
    r_t = torch.relu((gt.mean(1, keepdim=True) * t).sum(2))
    r_n = torch.relu((gn.mean((2, 3), keepdim=True) * n).sum(1)).flatten(1)
    torch.testing.assert_close(out.R_L, torch.cat([r_t, r_n], 1).detach(), rtol=1e-12, atol=1e-12)
    assert out.relevance["low"].shape == (3, 32)
    torch.testing.assert_close(out.saliency.flatten(1).sum(1) + out.lost, out.R_L.sum(1), rtol=1e-10, atol=1e-12)


# ----------------------------------------------------------------------- channels folded into the batch
class _PatchFold(nn.Module):
    """MobileViT's unfold/fold: an NCHW map reshaped through ``(B * C * nh, ph, nw, pw)`` (channels
    in the batch axis) into patch tokens ``(B * P, N, C)`` (patch offsets in the batch axis), a
    token MLP, and the same reshapes back; residual, mean head."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 4, 3, padding=1)
        self.fc1 = nn.Linear(4, 6)
        self.fc2 = nn.Linear(6, 4)
        self.head = nn.Linear(4, 5)

    @staticmethod
    def unfold(x, ph=2, pw=2):
        B, C, H, W = x.shape
        nh, nw = H // ph, W // pw
        t = x.reshape(B * C * nh, ph, nw, pw).transpose(1, 2)
        return t.reshape(B, C, nh * nw, ph * pw).transpose(1, 3).reshape(B * ph * pw, nh * nw, C)

    @staticmethod
    def fold(t, B, C, H, W, ph=2, pw=2):
        nh, nw = H // ph, W // pw
        t = t.contiguous().view(B, ph * pw, nh * nw, -1).transpose(1, 3).reshape(B * C * nh, nw, ph, pw)
        return t.transpose(1, 2).reshape(B, C, H, W)

    def forward(self, x):
        a = torch.relu(self.stem(x))
        t = torch.nn.functional.gelu(self.fc1(self.unfold(a)))
        y = torch.relu(a + self.fold(self.fc2(t), *a.shape))
        return self.head(y.mean((2, 3)))


def _patch_fold_net():
    import naive_srd as N
    torch.manual_seed(0)
    m = _PatchFold().double().eval()

    def tokens(c, a):        # one sample: (1, P, N, 6), positions (P, N), channels last
        return m.fc1(m.unfold(a)).unsqueeze(0)

    def out(c, t, a):
        return a + m.fold(m.fc2(t[0]), 1, *a.shape[1:])

    blocks = [
        N.Block("relu", ["input"], lambda c, x: m.stem(x), [[N.window(3, 1, 1)]], torch.relu),
        N.Block("gelu", ["relu"], tokens, [[N.patches(2, 2)]], torch.nn.functional.gelu, layout="nhwc"),
        N.Block("relu_1", ["gelu", "relu"], out, [[N.patches_back(8, 8, 2, 2)], [N.identity()]], torch.relu),
    ]
    return m, N.Net(blocks, head=lambda A: m.head(A.mean((2, 3))))


def test_patches_folded_into_the_batch_agree_with_the_reference():
    """Labels through a reshape chain whose middle has channels in the batch axis (found again by
    where each element comes from), a layer with patch offsets in the batch axis read out as
    (B, P * N), against the pair-by-pair reference."""
    import naive_srd as N
    m, net = _patch_fold_net()
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(net.head(N.encoder_output(net, x)), m(x), rtol=1e-12, atol=1e-12)
    R_L = torch.rand(2, 8, 8, dtype=torch.float64) + 0.1
    out = srd_fx.compile(m, head=lambda A, logits, target: R_L, layers="all")(x)
    ref = N.propagate(net, x, R_L)
    for layer, r in ref.items():
        got = out.saliency if layer == "input" else out.relevance[layer]
        assert got.shape == (2, r[0].numel()) or got.shape == r.shape, (layer, got.shape)
        assert (got.reshape(r.shape) - r).abs().max().item() <= 1e-8 * R_L.max().item(), layer
    torch.testing.assert_close(out.saliency.sum((1, 2)) + out.lost, R_L.sum((1, 2)), rtol=1e-10, atol=1e-12)


class _HeadsMixedIn(nn.Module):
    """A reshape that mixes channels with positions and is never separated again: refused by name."""

    def __init__(self):
        super().__init__()
        self.c = nn.Conv2d(3, 4, 3, padding=1)
        self.fc = nn.Linear(4, 5)
        self.lin = nn.Linear(32, 32)

    def forward(self, x):
        a = torch.relu(self.c(x))                      # (B, 4, 8, 8)
        t = torch.relu(self.lin(a.reshape(a.shape[0], 8, 32)).reshape(a.shape))
        return self.fc(t.mean((2, 3)))


def test_channels_mixed_with_positions_are_refused_by_name():
    m = _HeadsMixedIn().eval()
    with pytest.raises(srd_fx.UnsupportedOpError, match="mixed with positions"):
        srd_fx.compile(m, example_input=torch.randn(1, 3, 8, 8), encoder_output="relu_1")


# ----------------------------------------------------------------------- F.unfold / F.fold
def _overlap_add(kernel, stride, padding):
    """Reference connectivity of ``F.fold(F.unfold(x))`` on an (H, W) grid: every window slot goes
    back to the position it was cut from, so position i reaches itself once per window covering
    it (padded slots reach nothing)."""
    def conn(hw):
        H, W = hw
        Ho = (H + 2 * padding - kernel) // stride + 1
        Wo = (W + 2 * padding - kernel) // stride + 1
        P = torch.zeros(H * W, H * W, dtype=torch.float64)
        for oh in range(Ho):
            for ow in range(Wo):
                for a in range(kernel):
                    for b in range(kernel):
                        h, w = oh * stride - padding + a, ow * stride - padding + b
                        if 0 <= h < H and 0 <= w < W:
                            P[h * W + w, h * W + w] += 1.0
        return P, (H, W)
    return conn


class _UnfoldFold(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 4, 3, padding=1)
        self.mix = nn.Conv2d(4, 4, 1)
        self.fc = nn.Linear(4, 5)

    def forward(self, x):
        a = torch.relu(self.stem(x))
        t = torch.nn.functional.unfold(a, 3, padding=1, stride=2)          # (B, 4 * 9, 16)
        y = torch.nn.functional.fold(t, a.shape[-2:], 3, padding=1, stride=2)
        return self.fc(torch.relu(self.mix(y)).mean((2, 3)))


def test_unfold_then_fold_agrees_with_the_reference():
    import naive_srd as N
    torch.manual_seed(0)
    m = _UnfoldFold().double().eval()
    f = torch.nn.functional
    blocks = [
        N.Block("relu", ["input"], lambda c, x: m.stem(x), [[N.window(3, 1, 1)]], torch.relu),
        N.Block("relu_1", ["relu"], lambda c, a: m.mix(f.fold(f.unfold(a, 3, padding=1, stride=2), (8, 8), 3,
                                                             padding=1, stride=2)),
                [[_overlap_add(3, 2, 1)]], torch.relu),
    ]
    net = N.Net(blocks, head=lambda A: m.fc(A.mean((2, 3))))
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    R_L = torch.rand(2, 8, 8, dtype=torch.float64) + 0.1
    out = srd_fx.compile(m, head=lambda A, logits, target: R_L, layers="all")(x)
    with torch.no_grad():
        assert torch.equal(out.logits, m(x))
    for layer, r in N.propagate(net, x, R_L).items():
        got = out.saliency if layer == "input" else out.relevance[layer]
        assert (got - r).abs().max().item() <= 1e-8 * R_L.max().item(), layer
