"""Networks on which the fuzzing suite (tests/core/test_fuzz.py) or the hostile-input suite found a
core bug, saved as explicit, shrunk specs and minimal models.

A test marked ``xfail(strict=True, reason="needs core: ...")`` documents a bug that is still
open: it fails today, and the strict mark turns it red the day the core is fixed, so that the
mark is removed and the test keeps guarding the fix.
"""
import pytest
import torch
import torch.nn as nn

import naive_srd as N
import srd_fx
from test_fuzz import check_network


def _conv(cout, k=3, p=1, s=1, bias=True):
    return dict(cout=cout, k=[k, k], s=s, p=[p, p], d=1, g=1, bias=bias, form="module")


# =============================================================================================
# 1. timm's functional activations were registered as rules, but fx traced *into* them
# =============================================================================================
def _timm_fn(name):
    from timm.layers import activations as A
    return getattr(A, name)


class _TimmFnNet(nn.Module):
    def __init__(self, name):
        super().__init__()
        torch.manual_seed(0)
        self.fn = _timm_fn(name)
        self.c1 = nn.Conv2d(3, 4, 3, padding=1)
        self.c2 = nn.Conv2d(4, 4, 3, padding=1)
        self.fc = nn.Linear(4, 3)

    def forward(self, x):
        return self.fc(self.fn(self.c2(self.fn(self.c1(x)))).mean((2, 3)))


# What went wrong before the fix (srd_fx/compiler/trace.py now wraps a registered plain-Python function
# reached through a module attribute or through its own Python module as one fx leaf node):
_TIMM_FN_BUGS = {
    "swish": "x * sigmoid(x) was taken for a gated linear map: both activation layers vanished and "
             "the map was that of one affine block (conservation still held: a plausible, wrong map)",
    "quick_gelu": "x * sigmoid(1.702 x): same as swish",
    "hard_sigmoid": "relu6(x + 3) / 6: the layer became the inner relu6, the +3 joined the block bias",
    "mish": "x * tanh(softplus(x)): refused (product without a gate) although a rule is registered",
    "hard_swish": "x * relu6(x + 3) / 6: refused although a rule is registered",
    "hard_mish": "0.5 x (x + 2).clamp(0, 2): refused although a rule is registered",
}


@pytest.mark.parametrize("name", list(_TIMM_FN_BUGS))
def test_timm_functional_activation_is_one_layer(name):
    """``self.fn = timm.layers.activations.swish; self.fn(conv(x))`` must be an activation
    layer like ``F.silu`` (two layers here), with the naive implementation's map."""
    m = _TimmFnNet(name).double().eval()
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    fn = m.fn
    blocks = [N.Block("a", ["input"], lambda c, x_: m.c1(x_), [[N.window(3, 1, 1)]], fn),
              N.Block("b", ["a"], lambda c, a: m.c2(a), [[N.window(3, 1, 1)]], fn)]
    net = N.Net(blocks, head=lambda A: m.fc(A.mean((2, 3))))
    R = torch.rand(2, 8, 8, dtype=torch.float64) + 0.1
    e = srd_fx.compile(m, head=lambda A, logits, t: R, layers="all")
    out = e(x)
    assert len(e.activation_layers) == 2, e.activation_layers
    # the tracer's temporary wrapping is undone: the model and timm hold the original function
    assert m.fn is _timm_fn(name) and m.fn.__module__ == "timm.layers.activations"
    ref = N.propagate(net, x, R)
    assert (out.saliency - ref["input"]).abs().max().item() <= 1e-8 * ref["input"].abs().max().item()


def test_timm_functional_activation_in_a_generated_network():
    """The generated-network form of the same check, for a timm function that works (gelu
    calls F.gelu, which has a rule): guards the sweep's set-up."""
    spec = dict(seed=3, cin=2, hw=[7, 8], tail=None, head="mean", classes=3, stages=[
        dict(type="conv", pre=None, conv=_conv(4), bn="module", act="timm.gelu"),
        dict(type="conv", pre=None, conv=_conv(4), bn=None, act="timm.gelu_tanh")])
    check_network(spec)


# =============================================================================================
# 2. ``v = v.add_(shortcut)``: the twin's bias pass runs the in-place add on an expanded tensor
# =============================================================================================
def test_residual_written_with_add_():
    """Shrunk from a generated network: one residual stage, ``v = v.add_(sc)``. Fix: emit the
    out-of-place op (``torch.add``) for in-place add/sub/mul/div in the bias and transpose passes."""
    spec = dict(seed=0, cin=2, hw=[6, 6], tail=None, head="mean", classes=2, stages=[
        dict(type="res", pre=None, cout=3, shortcut="conv", add=".add_", act="F.relu",
             inner=[dict(conv=_conv(3), bn=None, act="F.relu")])])
    check_network(spec)


def test_residual_written_with_iadd_and_torch_add():
    """The forms that work (``v += sc``, ``torch.add``, ``v.add``) on the same network."""
    for form in ("+=", "torch.add", ".add", "sc+v", "-neg"):
        spec = dict(seed=0, cin=2, hw=[6, 6], tail=None, head="mean", classes=2, stages=[
            dict(type="res", pre=None, cout=3, shortcut="conv", add=form, act="F.relu",
                 inner=[dict(conv=_conv(3), bn=None, act="F.relu")])])
        check_network(spec)


# =============================================================================================
# 3. a sigmoid activation multiplied by a spatial gate of the same shape
# =============================================================================================
def test_one_channel_sigmoid_times_spatial_gate():
    """Found by the generator (a 'post' gate stage whose first conv had one output channel and a
    sigmoid activation, then a CBAM-style spatial gate; the error even blamed ``amax`` in the
    gate branch). Shrunk to: conv(1 channel) -> sigmoid -> a * sigmoid(conv(a)) -> conv -> relu.
    Both factors are sigmoid outputs of the same shape; the one computed from the other is the gate."""
    spec = dict(seed=0, cin=2, hw=[8, 8], tail=None, head="mean", classes=3, stages=[
        dict(type="gate", pre=None, where="post", conv=_conv(1), bn=None, gate="spatial", mul="u*g",
             residual=False, act1="nn.Sigmoid", conv2=_conv(2), act="F.relu")])
    check_network(spec)


def test_two_channel_sigmoid_times_spatial_gate():
    """With two channels the gate is told apart by its shape: this works and stays working."""
    spec = dict(seed=0, cin=2, hw=[8, 8], tail=None, head="mean", classes=3, stages=[
        dict(type="gate", pre=None, where="post", conv=_conv(2), bn=None, gate="spatial", mul="u*g",
             residual=False, act1="nn.Sigmoid", conv2=_conv(2), act="F.relu")])
    check_network(spec)


# =============================================================================================
# 4. max-pool ties between identical (bias-only) PFVs: found by the 300-network run
# =============================================================================================
_TIE_SPEC = {
    "seed": 3, "cin": 1, "hw": [6, 10], "tail": None, "head": "mean", "classes": 2, "stages": [
        {"type": "gate", "where": "post", "gate": "spatial", "mul": ".mul", "residual": False,
         "pre": {"kind": "max", "k": 2, "s": 2, "p": 0, "d": 1, "cip": False, "form": "module", "ceil": True},
         "conv": _conv(4, k=1, p=0), "bn": None, "act1": "F.relu", "conv2": _conv(2, k=1, p=0), "act": "nn.Mish"},
        {"type": "conv", "conv": _conv(1, k=1, p=0, bias=False), "bn": None, "act": "F.relu",
         "pre": {"kind": "max", "k": 2, "s": 1, "p": 0, "d": 1, "cip": False, "form": "module", "ceil": True},
         "fpad": None, "post": None, "drop": None}]}


def test_maxpool_ties_between_dead_positions():
    """Where every channel of the ReLU before a 1x1 conv is zero, the conv's output is its bias:
    several PFVs are *identical*, and the next max-pool's arg-max among them is decided by the
    last bit of the forward pass, which differs between a batch and a single sample.  The
    relevance parked on the chosen position is lost one block further down (its receptive field
    has zero norm), so the input map does not depend on the choice -- but a layer map does.

    This network made the first version of the fuzz check fail (it compared the *batched* layer
    maps with the per-sample reference: 323 vs 1.16 at one position). The check now compares the
    batched input map, and every layer sample by sample; both must hold here."""
    check_network(_TIE_SPEC)
    from test_fuzz import build
    m, net = build(_TIE_SPEC)
    g = torch.Generator().manual_seed(4)
    x = torch.randn(2, 1, 6, 10, dtype=torch.float64, generator=g)
    e = srd_fx.compile(m, head="ones", layers="all")
    both = e(x)
    for b in range(2):
        one = e(x[b:b + 1])
        torch.testing.assert_close(one.saliency[0], both.saliency[b], rtol=0, atol=1e-12)
        torch.testing.assert_close(one.lost[0], both.lost[b], rtol=0, atol=1e-12)


# =============================================================================================
# 2. lost relevance of a layer whose windows are folded into the batch axis (timm's EfficientViT
#    (MSRA) LocalWindowAttention: `RuntimeError: The size of tensor a (2) must match ... (8)`)
# =============================================================================================
class _FoldedWindows(nn.Module):
    """A 1x1 conv without bias, 4x4 windows folded into the batch (B * 4, C, 4, 4), two
    activation layers inside the windows (a conv with bias between them), windows unfolded, mean
    head.  Where the input is zero the second block's receptive field has zero norm (D = 0) but a
    bias: that relevance is lost, on a layer whose batch axis holds B * 4 windows."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 4, 1, bias=False)
        self.conv2 = nn.Conv2d(4, 4, 1)
        self.fc = nn.Linear(4, 3)

    def forward(self, x):
        B, _, H, W = x.shape
        y = self.conv1(x)
        C = y.shape[1]
        w = y.view(B, C, H // 4, 4, W // 4, 4).permute(0, 2, 4, 1, 3, 5).reshape(-1, C, 4, 4)
        w = torch.relu(self.conv2(torch.relu(w)))
        y = w.view(B, H // 4, W // 4, C, 4, 4).permute(0, 3, 1, 4, 2, 5).reshape(B, C, H, W)
        return self.fc(y.mean((2, 3)))


def test_lost_relevance_of_windows_folded_into_the_batch():
    torch.manual_seed(0)
    m = _FoldedWindows().double().eval()
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    x[0, :, :4, :4] = 0          # sample 0: one window with zero norm
    x[1, :, 4:, :] = 0           # sample 1: two
    e = srd_fx.compile(m, head="ones", layers="all")
    out = e(x)
    assert out.lost.shape == (2,) and (out.lost > 0).all()
    # the layers inside the windows read out per sample: (B, windows x window positions)
    assert {k: tuple(v.shape) for k, v in out.relevance.items() if k != "input"} == \
        {"relu": (2, 64), "relu_1": (2, 64), "reshape_1": (2, 8, 8), "low": (2, 8, 8)}
    torch.testing.assert_close(out.saliency.sum((1, 2)) + out.lost, out.R_L.flatten(1).sum(1),
                               rtol=1e-12, atol=1e-12)
    for b in range(2):     # the windows of sample b are charged to sample b
        one = e(x[b:b + 1])
        torch.testing.assert_close(one.lost[0], out.lost[b], rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(one.saliency[0], out.saliency[b], rtol=1e-12, atol=1e-12)
        for k, r in out.relevance.items():
            torch.testing.assert_close(one.relevance[k][0], r[b], rtol=1e-12, atol=1e-12)
    # seeding such a layer is refused by name (it raised a raw RuntimeError)
    for call in (lambda: e.erf(x, "relu"), lambda: e.propagate(x, "relu", out.relevance["relu"])):
        with pytest.raises(srd_fx.LayerError, match="folded into the batch axis"):
            call()
