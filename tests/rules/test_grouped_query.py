"""Grouped-query attention (timm's ``AttentionRope(num_kv_heads=...)``, as in Sapiens2 and Gemma4's
ViTs): the key/value heads are copied with ``repeat_interleave`` along the head axis.  The same
function written without the copy -- every key/value head's projection tiled in the weights, a
plain multi-head attention -- must get the same maps, layer by layer; and a copy along positions
(``repeat_interleave`` on the token axis) conserves relevance."""
import pytest
import torch
import torch.nn as nn

import srd_fx

Attention = pytest.importorskip("timm.layers.attention").AttentionRope


class Net(nn.Module):
    def __init__(self, kv_heads: int, rep_tokens: bool = False):
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 2, stride=2)
        self.attn = Attention(16, num_heads=4, num_kv_heads=kv_heads, qkv_fused=False)
        self.mlp = nn.Sequential(nn.Linear(16, 32), nn.GELU(), nn.Linear(32, 16))
        self.head = nn.Linear(16, 5)
        self.rep_tokens = rep_tokens

    def forward(self, x):
        t = torch.relu(self.stem(x)).flatten(2).transpose(1, 2)       # (B, N, C)
        if self.rep_tokens:
            t = t.repeat_interleave(2, dim=1)
        t = t + self.attn(t)
        t = t + self.mlp(t)
        return self.head(t.mean(1))


def _tiled(g: Net) -> Net:
    """The multi-head twin of the grouped-query ``g``: head h uses key/value head h // groups."""
    r = Net(kv_heads=4).double().eval()
    sd = dict(g.state_dict())
    groups, d = 2, 4
    for name in ("k_proj", "v_proj"):
        for p in ("weight", "bias"):
            w = sd[f"attn.{name}.{p}"]
            sd[f"attn.{name}.{p}"] = w.reshape(2, d, *w.shape[1:]).repeat_interleave(groups, 0).reshape(4 * d, *w.shape[1:])
    r.load_state_dict(sd)
    return r


def _x(seed=0):
    return torch.randn(2, 3, 8, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))


def test_grouped_query_attention_gives_the_maps_of_its_tiled_twin():
    torch.manual_seed(0)
    g = Net(kv_heads=2).double().eval()
    r = _tiled(g)
    x = _x()
    torch.testing.assert_close(g(x), r(x), rtol=1e-12, atol=1e-12)
    out = srd_fx.compile(g, layers="all")(x)
    ref = srd_fx.compile(r, layers="all")(x)
    torch.testing.assert_close(out.logits, g(x), rtol=0, atol=0)
    assert set(out.relevance) == set(ref.relevance)
    for k in out.relevance:
        torch.testing.assert_close(out.relevance[k], ref.relevance[k], rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(out.lost, ref.lost, rtol=1e-9, atol=1e-12)


def test_tokens_copied_along_positions_conserve():
    torch.manual_seed(1)
    m = Net(kv_heads=2, rep_tokens=True).double().eval()
    x = _x(1)
    out = srd_fx.compile(m, layers="all")(x)
    torch.testing.assert_close(out.logits, m(x), rtol=0, atol=0)
    total = out.R_L.flatten(1).sum(1) - out.lost
    torch.testing.assert_close(out.saliency.flatten(1).sum(1), total, rtol=1e-10, atol=1e-12)
    assert torch.isfinite(out.saliency).all() and out.saliency.shape == (2, 8, 8)
