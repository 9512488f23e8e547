"""Indexing with one 1-D integer array inside a block (timm's CSATv2 reorders DCT channels with
``x[:, :, self.permutation]``): along channels it is a relabelling of each PFV's channels, along a
position axis a gather of positions.  Each model below computes the same function as a twin
written without the index (the permutation folded into the conv weights, or ``flip``), whose
rules the rest of the suite checks against the naive reference; SRD's maps must agree layer by
layer.  Several arrays, masks and None are refused with a named error."""
import pytest
import torch
import torch.nn as nn

import srd_fx
from srd_fx.errors import SRDError

G = torch.Generator().manual_seed(0)
PERM = torch.randperm(6, generator=G)


class Net(nn.Module):
    """conv -> [index] -> relu -> conv -> relu -> mean -> linear; ``how`` picks the index."""

    def __init__(self, how: str):
        super().__init__()
        self.how = how
        self.c1 = nn.Conv2d(3, 6, 3, padding=1)
        self.c2 = nn.Conv2d(6, 5, 3, padding=1)
        self.fc = nn.Linear(5, 4)
        self.register_buffer("perm", PERM.clone())
        self.register_buffer("rev", torch.arange(9, -1, -1))

    def forward(self, x):
        a = self.c1(x)
        if self.how == "channels":
            a = a[:, self.perm]
        elif self.how == "positions":
            a = a[:, :, :, self.rev]
        elif self.how == "list":
            a = a[..., [0, 0, 1, 2, 3, 4, 5, 6, 7, 8]]   # a repeated column: its relevance adds up
        elif self.how == "two arrays":      # broadcast arrays on every axis: refused
            a = a[:, self.perm.view(6, 1, 1), torch.arange(8).view(1, 8, 1), self.rev.view(1, 1, 10)]
        elif self.how == "mask":            # a boolean mask (every channel kept): refused
            a = a[:, self.perm >= 0]
        return self.fc(torch.relu(self.c2(torch.relu(a))).mean((2, 3)))


def _twin_of_channels(m):
    """The same function with the channel permutation moved into c1's weights."""
    r = Net("none").double().eval()
    r.load_state_dict(m.state_dict())
    with torch.no_grad():
        r.c1.weight.copy_(m.c1.weight[PERM])
        r.c1.bias.copy_(m.c1.bias[PERM])
    return r


def _twin_of_positions(m):
    """The same function up to the input's column order: c1 mirrored, run on the mirrored input
    (conv(x)[..., rev] = conv_mirrored(x[..., rev]) with symmetric padding)."""
    r = Net("none").double().eval()
    r.load_state_dict(m.state_dict())
    with torch.no_grad():
        r.c1.weight.copy_(m.c1.weight.flip(3))
    return r


@pytest.mark.parametrize("how", ["channels", "positions"])
def test_integer_array_index_gives_the_maps_of_its_twin(how):
    torch.manual_seed(1)
    m = Net(how).double().eval()
    r = _twin_of_channels(m) if how == "channels" else _twin_of_positions(m)
    x = torch.randn(2, 3, 8, 10, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    xr = x if how == "channels" else x.flip(3)
    torch.testing.assert_close(m(x), r(xr), rtol=1e-12, atol=1e-12)
    out = srd_fx.compile(m, layers="all")(x)
    ref = srd_fx.compile(r, layers="all")(xr)
    tol = dict(rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(out.logits, m(x), rtol=0, atol=0)
    assert set(out.relevance) == set(ref.relevance) == {"input", "low", "relu", "relu_1"}
    for k in out.relevance:   # every layer after the index is in the same column order in both
        want = ref.relevance[k] if k != "input" or how == "channels" else ref.relevance[k].flip(-1)
        torch.testing.assert_close(out.relevance[k], want, **tol)
    torch.testing.assert_close(out.saliency, ref.saliency if how == "channels" else ref.saliency.flip(-1), **tol)


def test_repeated_positions_add_their_relevance_and_conserve():
    m = Net("list").double().eval()
    x = torch.randn(2, 3, 8, 10, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    out = srd_fx.compile(m, layers="all")(x)
    total = out.R_L.flatten(1).sum(1) - out.lost
    torch.testing.assert_close(out.saliency.flatten(1).sum(1), total, rtol=1e-10, atol=1e-12)
    assert torch.isfinite(out.saliency).all()
    # column 9 of the first conv's output is dropped and column 0 read twice: the input relevance
    # of the first relu's column 0 is that of two columns
    assert out.relevance["relu"].shape == (2, 8, 10)


@pytest.mark.parametrize("how", ["two arrays", "mask"])
def test_other_advanced_indexing_is_refused_by_name(how):
    m = Net(how).double().eval()
    x = torch.randn(1, 3, 8, 10, dtype=torch.float64)
    with pytest.raises(SRDError, match="advanced indexing"):
        srd_fx.compile(m, example_input=x)(x)
