"""Token models (SPEC §8) against the independent pair-by-pair reference (tests/naive_srd.py):
a tiny timm VisionTransformer with fused and with manual attention (class token, position
embedding, pre-norm block), a shifted-window attention block, an MLP-Mixer block, a SwiGLU MLP,
a StarNet-style star block and a linear-attention block.  Relevance must agree layer by layer to
1e-8 of the scale of R (float64), the logits must be the model's, and relevance is conserved up
to the reported ``lost``."""
import pytest
import torch

import naive_srd as N
import srd_fx

TOL = 1e-8
NETS = sorted(N.TOKEN_NETS)


def _fixed_head(R_L):
    return lambda A, logits, target: R_L


def _build(name, batch=2):
    m, net = N.TOKEN_NETS[name]()
    torch.manual_seed(1)
    return m, net, torch.randn(batch, 3, 8, 8, dtype=torch.float64)


@pytest.mark.parametrize("name", NETS)
def test_description_matches_module(name):
    m, net, x = _build(name)
    with torch.no_grad():
        torch.testing.assert_close(net.head(N.encoder_output(net, x)), m(x), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("name", NETS)
def test_token_layer_by_layer_agreement(name):
    m, net, x = _build(name)
    L = N.encoder_output(net, x)
    pos = N.positions(L, net.layout(net.L, L))
    R_L = torch.rand(x.shape[0], *pos, dtype=torch.float64) + 0.1
    explainer = srd_fx.compile(m, head=_fixed_head(R_L), layers="all")
    out = explainer(x)
    assert explainer.activation_layers == [b.name for b in net.blocks]
    assert explainer.encoder_output == net.L
    with torch.no_grad():
        assert torch.equal(out.logits, m(x))
    ref = N.propagate(net, x, R_L)
    scale = R_L.abs().max().item()
    for layer, r in ref.items():
        got = out.saliency if layer == "input" else out.relevance[layer]
        assert got.shape == r.shape, (layer, tuple(got.shape), tuple(r.shape))
        err = (got - r).abs().max().item()
        assert err <= TOL * scale, f"{name}/{layer}: max |srd_fx - naive| = {err:.3e}"
    # conservation: the input map plus the reported loss holds R_L
    total = out.saliency.flatten(1).sum(1) + (out.lost if out.lost is not None else 0)
    torch.testing.assert_close(total, R_L.flatten(1).sum(1), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("name", NETS)
def test_token_gradcam_conserves(name):
    """The default head (Eq. 4 with the mean over all positions of L) on the same models:
    exact logits, finite maps, conservation with ``lost``."""
    m, _, x = _build(name)
    out = srd_fx.compile(m)(x)
    with torch.no_grad():
        assert torch.equal(out.logits, m(x))
    assert torch.isfinite(out.saliency).all() and out.saliency.shape == (2, 8, 8)
    total = out.saliency.flatten(1).sum(1) + (out.lost if out.lost is not None else 0)
    torch.testing.assert_close(total, out.R_L.flatten(1).sum(1), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("name", ["vit_fused", "mixer"])
def test_token_erf_matches_forward_accumulation(name):
    """ERFs of token PFVs (SPEC §3): backward passes seeded one-hot at a token layer equal the
    reference's explicit forward accumulation (Eq. 1)."""
    m, net, x = _build(name, batch=1)
    erf_ref, _ = N.erf_forward(net, x)
    layer = net.blocks[0].name
    explainer = srd_fx.compile(m, example_input=x)
    n_pos = erf_ref[layer].shape[0]
    got = explainer.erf(x, layer, positions=[(i,) for i in range(n_pos)])
    err = (got[0] - erf_ref[layer]).abs().max().item()
    assert err <= TOL * erf_ref[layer].abs().max().item(), f"{name}: ERF differs by {err:.3e}"


def test_token_grid_splits_prefix_and_patches():
    """The read-out of a ViT token layer: the patch grid (B, h, w) and the class token (B, 1)
    hold the layer's whole relevance."""
    m, net, x = _build("vit_fused")
    explainer = srd_fx.compile(m, layers=("input", "low", "blocks_0_mlp_act"))
    out = explainer(x)
    for key in ("low", "blocks_0_mlp_act"):
        r = out.relevance[key]
        assert r.shape == (2, 5)
        grid, prefix = explainer.token_grid(r)
        assert grid.shape == (2, 2, 2) and prefix.shape == (2, 1)
        torch.testing.assert_close(grid.sum((1, 2)) + prefix.sum(1), r.sum(1), rtol=1e-12, atol=0)
        assert torch.equal(grid[:, 0, 1], r[:, 2])        # row-major: token 1 + (0 * 2 + 1)
    # without a model: the fewest prefix tokens leaving a grid of the input's aspect ratio
    grid, prefix = srd_fx.token_grid(torch.arange(10.0).reshape(1, 10))
    assert grid.shape == (1, 3, 3) and prefix.tolist() == [[0.0]]
    with pytest.raises(srd_fx.InputError):
        srd_fx.token_grid(torch.zeros(1, 5), n_prefix=2)


def test_recurrent_layer_is_refused_with_the_node():
    class Rec(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.patch = torch.nn.Conv2d(3, 4, 4, 4)
            self.rnn = torch.nn.LSTM(4, 4, batch_first=True)
            self.head = torch.nn.Linear(4, 2)

        def forward(self, x):
            t = torch.relu(self.patch(x).flatten(2).transpose(1, 2))
            y, _ = self.rnn(t)
            return self.head(y.mean(1))

    with pytest.raises(srd_fx.UnsupportedOpError, match="recurrent layer.*rnn"):
        srd_fx.compile(Rec().eval())(torch.randn(1, 3, 8, 8))


def test_optional_forward_arguments_are_not_inputs():
    """``forward(x, attn_mask=None, is_causal=False)`` compiles: the defaulted arguments are
    traced at their defaults; a required second argument is still refused by name."""
    class Opt(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.c = torch.nn.Conv2d(3, 4, 3)
            self.fc = torch.nn.Linear(4, 2)

        def forward(self, x, attn_mask=None, is_causal=False, scale=1.0):
            y = torch.relu(self.c(x)) * scale
            if is_causal:
                y = -y
            return self.fc(y.mean((2, 3)))

    m = Opt().eval().double()
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    out = srd_fx.compile(m)(x)
    with torch.no_grad():
        assert torch.equal(out.logits, m(x))

    class Two(Opt):
        def forward(self, x, other):
            return super().forward(x) + other.sum()

    with pytest.raises(srd_fx.SRDError, match="other"):
        srd_fx.compile(Two().eval())(x.float())


def test_class_token_selection_ends_the_encoder():
    """Without timm's forward_features, L is the input of the first global reduction over
    positions: here the selection of the class token ``x[:, 0]`` (SPEC §8)."""
    class ClsNet(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.patch = torch.nn.Conv2d(3, 8, 4, 4)
            self.cls = torch.nn.Parameter(torch.randn(1, 1, 8))
            self.attn = torch.nn.MultiheadAttention(8, 2, batch_first=True)
            self.fc = torch.nn.Linear(8, 16)
            self.fc2 = torch.nn.Linear(16, 8)
            self.head = torch.nn.Linear(8, 3)

        def forward(self, x):
            t = self.patch(x).flatten(2).transpose(1, 2)
            t = torch.cat([self.cls.expand(t.shape[0], -1, -1), t], 1)
            q = self.fc(t)
            t = t + self.fc2(torch.nn.functional.gelu(q))
            return self.head(t[:, 0])

    m = ClsNet().eval().double()
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    explainer = srd_fx.compile(m, layers=("input", "low"))
    out = explainer(x)
    assert explainer.encoder_output == "add"
    assert out.relevance["low"].shape == (2, 5)
    with torch.no_grad():
        assert torch.equal(out.logits, m(x))
    total = out.saliency.flatten(1).sum(1) + out.lost
    torch.testing.assert_close(total, out.R_L.flatten(1).sum(1), rtol=1e-10, atol=1e-12)
