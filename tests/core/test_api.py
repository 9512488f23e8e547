"""The public API: options, errors, rule registration, generated code, gradients, ERFs."""
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision

import srd_fx
from srd_fx.rules import Affine


def tiny(act=nn.ReLU):
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), act(),
        nn.MaxPool2d(2), nn.Conv2d(8, 8, 3, padding=1), act(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 5)).eval().double()


def conserved(out):
    rel = (out.saliency.sum((1, 2)) - out.R_L.sum((1, 2))).abs() / out.R_L.abs().sum((1, 2)).clamp_min(1e-300)
    return rel.max().item()


def test_logits_exact_and_conservation_on_resnet18():
    m = torchvision.models.resnet18(num_classes=7).eval().double()
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    out = srd_fx.compile(m)(x)
    assert torch.equal(out.logits, m(x))
    assert out.saliency.shape == (2, 32, 32)
    assert conserved(out) < 1e-10


@pytest.mark.parametrize("act", [nn.ReLU, nn.GELU, nn.SiLU])
def test_map_is_differentiable_wrt_input(act):
    m = tiny(act)
    x = torch.randn(1, 3, 8, 8, dtype=torch.float64, requires_grad=True)
    sal = srd_fx.compile(m, head="ones")(x).saliency
    (g,) = torch.autograd.grad((sal ** 2).sum(), x)
    assert torch.isfinite(g).all() and g.abs().sum() > 0


def test_target_forms_agree():
    m = tiny()
    x = torch.randn(3, 3, 8, 8, dtype=torch.float64)
    e = srd_fx.compile(m)
    pred = m(x).argmax(1)
    a = e(x).saliency
    b = e(x, target=pred).saliency
    assert torch.allclose(a, b)
    c = e(x, target=2).saliency
    d = e(x, target=torch.full((3,), 2)).saliency
    assert torch.allclose(c, d)


def test_ones_head_and_callable_head():
    m = tiny()
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    out = srd_fx.compile(m, head="ones")(x)
    assert torch.allclose(out.R_L, torch.ones_like(out.R_L))
    assert torch.allclose(out.saliency.sum((1, 2)), torch.full((2,), float(out.R_L[0].numel()), dtype=torch.float64))
    seed = lambda A, logits, t: A.abs().sum(1)
    out2 = srd_fx.compile(m, head=seed)(x)
    assert conserved(out2) < 1e-10


def test_erf_sums_to_one_and_recomposes_the_map():
    m = torchvision.models.resnet18(num_classes=4).eval().double()
    x = torch.randn(2, 3, 64, 64, dtype=torch.float64)
    e = srd_fx.compile(m, layers=("input", "low"))
    out = e(x)
    E = e.erf(x, "low")                        # (B, P, H, W), all 2x2 positions of L
    assert E.shape == (2, 4, 64, 64)
    assert torch.allclose(E.sum((2, 3)), torch.ones(2, 4, dtype=torch.float64), atol=1e-10)
    recomposed = torch.einsum("bp,bphw->bhw", out.R_L.reshape(2, -1), E)   # Eq. 3
    assert torch.allclose(recomposed, out.saliency, atol=1e-12)


def test_layers_by_module_name_and_high_low():
    m = torchvision.models.resnet18(num_classes=4).eval().double()
    x = torch.randn(1, 3, 64, 64, dtype=torch.float64)
    out = srd_fx.compile(m, layers=("input", "low", "high", "layer2", "layer1.0.relu"))(x)
    assert out.relevance["low"].shape == (1, 2, 2)
    assert out.relevance["high"].shape == (1, 8, 8)
    assert torch.equal(out.relevance["high"], out.relevance["layer2"])
    # relevance is conserved layer by layer on a chain of single-input blocks
    assert torch.allclose(out.relevance["low"].sum(), out.saliency.sum())


def test_ablation_variants_conserve():
    m = tiny(nn.ELU)
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    for unit in ("pfv", "neuron"):
        for value in ("pre", "post"):
            assert conserved(srd_fx.compile(m, unit=unit, value=value)(x)) < 1e-10


def test_generated_code_reads_like_an_srd_backward():
    e = srd_fx.compile(tiny(), example_input=torch.zeros(1, 3, 8, 8, dtype=torch.float64))
    code = e.code
    for piece in ("sharing(", "conv_T(", "pfv_dot(", "max_pool_T(", "window_sum", "gradcam("):
        assert piece in code, piece


# ------------------------------------------------------------------------- bad input -------
def test_training_mode_is_refused():
    with pytest.raises(srd_fx.TrainingModeError, match="eval"):
        srd_fx.compile(tiny().train())


class Weird(nn.Module):
    def forward(self, x):
        return x * 2.0 + 1.0


class Scale(nn.Module):  # a leaf the user registers
    def __init__(self):
        super().__init__()
        self.s = nn.Parameter(torch.tensor(1.5))

    def forward(self, x):
        return torch.fft.ifft(torch.fft.fft(x)).real * self.s


def with_op(op):
    return nn.Sequential(nn.Conv2d(3, 4, 3), op, nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                         nn.Linear(4, 3)).eval().double()


def test_op_without_rule_names_the_node_and_shows_registration():
    m = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Softshrink(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                      nn.Linear(4, 3)).eval().double()
    with pytest.raises(srd_fx.UnsupportedOpError) as err:
        srd_fx.compile(m)(torch.randn(1, 3, 8, 8, dtype=torch.float64))
    msg = str(err.value)
    assert "'_1'" in msg and "target 1" in msg and "Softshrink" in msg and "register_rule" in msg


def test_registered_rule_makes_an_unknown_leaf_work():
    srd_fx.register_rule(Scale, Affine(linear=True, pointwise=True))
    m = with_op(Scale())
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    out = srd_fx.compile(m)(x)
    assert torch.allclose(out.logits, m(x))
    assert conserved(out) < 1e-10


class Branchy(nn.Module):
    def __init__(self):
        super().__init__()
        self.c = nn.Conv2d(3, 3, 1)

    def forward(self, x):
        if x.sum() > 0:
            return self.c(x).mean((2, 3))
        return x.mean((2, 3))


def test_untraceable_model_says_what_to_do():
    with pytest.raises(srd_fx.TraceError, match="control flow"):
        srd_fx.compile(Branchy().eval())(torch.randn(1, 3, 8, 8))
    with pytest.raises(srd_fx.TraceError, match="control flow"):
        srd_fx.compile(Branchy().eval(), example_input=torch.randn(1, 3, 8, 8))


def test_wrong_rank_target_range_and_nan():
    e = srd_fx.compile(tiny())
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    e(x)
    with pytest.raises(srd_fx.InputError, match="rank"):
        e(x[0])
    with pytest.raises(srd_fx.InputError, match="out of range"):
        e(x, target=5)
    with pytest.raises(srd_fx.InputError, match="out of range"):
        e(x, target=torch.tensor([0, -1]))
    bad = x.clone()
    bad[0, 0, 0, 0] = float("nan")
    with pytest.raises(srd_fx.NonFiniteError):
        e(bad)
    with pytest.raises(srd_fx.InputError, match="channels"):
        e(torch.randn(1, 4, 8, 8, dtype=torch.float64))


def _uniform_head(A, logits, target):
    return torch.ones(A.shape[0], *A.shape[2:], dtype=A.dtype)


@pytest.mark.parametrize("head", ["gradcam", "ones", _uniform_head], ids=["gradcam", "ones", "callable"])
def test_every_head_checks_the_target_against_the_logits(head):
    e = srd_fx.compile(tiny(), head=head)          # 5 classes
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    ok = e(x, target=4)
    assert torch.isfinite(ok.saliency).all()
    for bad in (99, 5, -1, torch.tensor([0, 7]), torch.tensor([[0, 1]]), torch.tensor([0.0, 1.0])):
        with pytest.raises(srd_fx.InputError, match=r"0\.\.4|\(2,\)"):
            e(x, target=bad)


def test_nan_weights_are_refused():
    m = tiny()
    with torch.no_grad():
        m[0].weight[0, 0, 0, 0] = float("nan")
    with pytest.raises(srd_fx.NonFiniteError, match="0.weight"):
        srd_fx.compile(m)


def test_product_without_gate_follows_the_uniform_rule():
    """``y * y`` has no gate: SPEC §8's uniform rule makes it the linear ``ȳ ⊙ y``; the logits
    stay exact and relevance is conserved (up to the reported loss)."""
    class Sq(nn.Module):
        def __init__(self):
            super().__init__()
            self.c = nn.Conv2d(3, 4, 3)
            self.fc = nn.Linear(4, 2)

        def forward(self, x):
            y = self.c(x)
            y = torch.relu(y * y)
            return self.fc(y.mean((2, 3)))

    m = Sq().eval().double()
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    out = srd_fx.compile(m)(x)
    with torch.no_grad():
        assert torch.equal(out.logits, m(x))
    total = out.saliency.flatten(1).sum(1) + (out.lost if out.lost is not None else 0)
    torch.testing.assert_close(total, out.R_L.flatten(1).sum(1), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("arch", ["resnet18", "convnext_tiny"])
def test_explaining_writes_nothing_outside_its_temporaries(arch):
    """The generated backward writes some products in place into fresh temporaries
    (``overwrite_g``): the input, the parameters, the buffers and the recorded activations that
    the model or a second call would read must stay untouched, and a second call gives the same
    maps bit for bit."""
    m = getattr(torchvision.models, arch)(num_classes=4).eval().double()
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    x0 = x.clone()
    state0 = {k: v.clone() for k, v in m.state_dict().items()}
    e = srd_fx.compile(m, layers="all", example_input=x[:1])
    a, b = e(x), e(x)
    assert torch.equal(x, x0)
    assert all(torch.equal(v, state0[k]) for k, v in m.state_dict().items())
    assert torch.equal(a.saliency, b.saliency) and all(torch.equal(a.relevance[k], b.relevance[k]) for k in a.relevance)
    assert torch.equal(a.logits, m(x))
