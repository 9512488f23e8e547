"""Maps are read out in the input's (row, column) orientation, whatever permute the model applies
(SPEC §8 "Read-out"; docs/method.md "Read-out").

A face-detector-style head ``x.permute(0, 3, 2, 1).contiguous()`` then ``dense(x.view(B, -1))``
makes the permuted tensor the encoder output L; its map (``low``, ``R_L``) and everything derived
from it (``high``, ERFs, ``propagate``) must still be (rows, columns).  Checked against the naive
pair-by-pair reference (tests/naive_srd.py) and against the same function written without the
permute (the dense weights rearranged, a 1x1 convolution for a per-position Linear), whose maps
the rest of the suite checks against the naive reference.
"""
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import naive_srd as N
import srd_fx

PERMS = [(0, 3, 2, 1), (0, 2, 3, 1), (0, 3, 1, 2), (0, 1, 3, 2), (0, 1, 2, 3)]


def xin(b=2, hw=(8, 10), seed=1):
    return torch.randn(b, 3, *hw, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))


def to_layout(R, perm):
    """A map (B, h, w) in the position order of ``A = features.permute(perm)`` (the layout a
    callable head sees A in)."""
    return R[:, None].permute(perm).squeeze(list(perm).index(1))


class PermutedDense(nn.Module):
    """PlainNet's features, then permute(perm).contiguous() and a dense layer on the flattened
    tensor (which makes the permuted tensor the encoder output L)."""

    def __init__(self, features, perm, hw):
        super().__init__()
        self.features, self.perm = features, list(perm)
        c = 8
        n = c * hw[0] * hw[1]
        self.dense = nn.Linear(n, 5).double()
        with torch.no_grad():
            self.dense.weight.copy_(torch.randn(5, n, generator=torch.Generator().manual_seed(3)) / n ** 0.5)

    def body(self, x):
        m = self.features
        x = m.act1(m.bn1(m.conv1(x)))
        x = m.act2(m.bn2(m.conv2(x)))
        return m.act3(m.conv3(x))

    def forward(self, x):
        a = self.body(x).permute(*self.perm).contiguous()
        return self.dense(a.view(a.shape[0], -1))


class Unpermuted(nn.Module):
    """The same function as PermutedDense with no permute: the dense weights rearranged."""

    def __init__(self, pm: PermutedDense, hw):
        super().__init__()
        self.pm = pm
        shp = torch.empty(1, 8, *hw).permute(*pm.perm).shape[1:]
        inv = [pm.perm.index(i) for i in range(4)]
        w = pm.dense.weight.detach().reshape(5, *shp).permute(0, *inv[1:])
        self.dense = nn.Linear(w[0].numel(), 5).double()
        with torch.no_grad():
            self.dense.weight.copy_(w.reshape(5, -1))
            self.dense.bias.copy_(pm.dense.bias)

    def forward(self, x):
        return self.dense(self.pm.body(x).flatten(1))


@pytest.mark.parametrize("hw", [(8, 10), (8, 8)], ids=["8x10", "8x8"])
@pytest.mark.parametrize("perm", PERMS, ids=lambda p: "".join(map(str, p)))
def test_permuted_encoder_output_agrees_with_the_naive_reference(perm, hw):
    model, net = N.plain_net()
    m = PermutedDense(model, perm, hw).eval()
    x = xin(hw=hw)
    R = torch.rand(x.shape[0], *hw, dtype=x.dtype, generator=torch.Generator().manual_seed(5)) + 0.1
    e = srd_fx.compile(m, head=lambda A, logits, t: to_layout(R, perm), layers="all")
    out = e(x)
    ref = N.propagate(net, x, R)
    torch.testing.assert_close(out.R_L, R, rtol=0, atol=0)
    torch.testing.assert_close(out.relevance["low"], R, rtol=0, atol=0)
    assert len(e.activation_layers) == 4        # act1..act3 and L (the permuted tensor, virtual)
    pairs = [("input", "input")] + list(zip(e.activation_layers[:3], [b.name for b in net.blocks]))
    scale = max(t.abs().max().item() for t in ref.values())
    for got, want in pairs:
        assert out.relevance[got].shape == ref[want].shape, got
        err = (out.relevance[got] - ref[want]).abs().max().item()
        assert err <= 1e-10 * scale, f"{got}: |srd_fx - naive| = {err:.3e}"
    torch.testing.assert_close(out.saliency, ref["input"], rtol=0, atol=1e-10 * scale)


@pytest.mark.parametrize("perm", PERMS, ids=lambda p: "".join(map(str, p)))
def test_permuted_head_gives_the_maps_of_the_unpermuted_model(perm):
    """Every read-out (input, low, high, named layers, R_L, ERFs, propagate) with the real
    Grad-CAM head equals that of the same function without the permute."""
    hw = (8, 10)
    model, _ = N.plain_net()
    m = PermutedDense(model, perm, hw).eval()
    r = Unpermuted(m, hw).eval()
    x = xin(hw=hw)
    torch.testing.assert_close(m(x), r(x), rtol=1e-12, atol=1e-12)
    e = srd_fx.compile(m, layers="all")
    er = srd_fx.compile(r, layers="all")
    out, ref = e(x), er(x)
    tol = dict(rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(out.R_L, ref.R_L, **tol)
    torch.testing.assert_close(out.saliency, ref.saliency, **tol)
    torch.testing.assert_close(out.relevance["low"], ref.relevance["low"], **tol)
    for a, b in zip(e.activation_layers[:3], er.activation_layers[:3]):
        torch.testing.assert_close(out.relevance[a], ref.relevance[b], **tol)
    # ERFs seeded at L, positions in (row, column) of the input, and what reaches act2
    pos = [(0, 0), (1, 6), (7, 2)]
    torch.testing.assert_close(e.erf(x, "low", pos), er.erf(x, "low", pos), **tol)
    got = e.erf(x, "low", pos, read=[e.activation_layers[1]])[e.activation_layers[1]]
    want = er.erf(x, "low", pos, read=[er.activation_layers[1]])[er.activation_layers[1]]
    torch.testing.assert_close(got, want, **tol)
    # propagate a map given in the input's orientation
    R = ref.relevance["low"].flip(1)
    torch.testing.assert_close(e.propagate(x, "low", R), er.propagate(x, "low", R), **tol)


class RoundTrip(nn.Module):
    """A per-position Linear applied in a permuted layout, with an activation layer in that
    layout, then permuted back: (0, 3, 2, 1) there and back, or channels-last (0, 2, 3, 1) and
    back with (0, 3, 1, 2) (ConvNeXt-style)."""

    def __init__(self, there, back, conv=False):
        super().__init__()
        torch.manual_seed(0)
        self.there, self.back = there, back
        self.c1 = nn.Conv2d(3, 6, 3, padding=1)
        self.mix = nn.Conv2d(6, 6, 1) if conv else nn.Linear(6, 6)
        self.c2 = nn.Conv2d(6, 6, 3, stride=2, padding=1)
        self.c3 = nn.Conv2d(6, 8, 3, stride=2, padding=1)
        self.fc = nn.Linear(8, 4)

    def forward(self, x):
        x = F.relu(self.c1(x))
        if isinstance(self.mix, nn.Conv2d):
            x = F.relu(self.mix(x))
        else:
            x = F.relu(self.mix(x.permute(*self.there))).permute(*self.back)
        x = F.relu(self.c2(x))
        x = F.relu(self.c3(x))
        return self.fc(x.mean((2, 3)))


@pytest.mark.parametrize("there,back", [((0, 3, 2, 1), (0, 3, 2, 1)), ((0, 2, 3, 1), (0, 3, 1, 2))],
                         ids=["transposed", "channels_last"])
def test_round_trip_layers_are_read_in_input_orientation(there, back):
    m = RoundTrip(there, back).double().eval()
    r = RoundTrip(there, back, conv=True).double().eval()
    with torch.no_grad():
        for name in ("c1", "c2", "c3", "fc"):
            getattr(r, name).load_state_dict(getattr(m, name).state_dict())
        r.mix.weight.copy_(m.mix.weight[:, :, None, None])
        r.mix.bias.copy_(m.mix.bias)
    x = xin(hw=(16, 20))
    torch.testing.assert_close(m(x), r(x), rtol=1e-12, atol=1e-12)
    e = srd_fx.compile(m, layers="all")
    er = srd_fx.compile(r, layers="all")
    out, ref = e(x), er(x)
    assert len(e.activation_layers) == len(er.activation_layers) == 4
    tol = dict(rtol=1e-9, atol=1e-12)
    for a, b in zip(["input", "low"] + e.activation_layers, ["input", "low"] + er.activation_layers):
        torch.testing.assert_close(out.relevance[a], ref.relevance[b], **tol)
    torch.testing.assert_close(out.R_L, ref.R_L, **tol)
    # SRD-high (4x L) and the ERFs of PFVs of the layer computed in the permuted layout
    eh, erh = srd_fx.compile(m, layers=("high",)), srd_fx.compile(r, layers=("high",))
    torch.testing.assert_close(eh(x).relevance["high"], erh(x).relevance["high"], **tol)
    mid, rmid = e.activation_layers[1], er.activation_layers[1]
    assert out.relevance[mid].shape == (2, 16, 20)
    pos = [(0, 19), (15, 0), (3, 7)]
    torch.testing.assert_close(e.erf(x, mid, pos), er.erf(x, rmid, pos), **tol)
