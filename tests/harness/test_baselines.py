"""The attribution methods: shapes on every architecture used, and agreement with independent
computations where one is short (gradients, Grad-CAM, IG completeness, LRP conservation, SRD)."""
import pytest
import torch
import torch.nn.functional as F

import srd_fx
from srd_fx.eval import baselines as B
from srd_fx.eval.models import build, cam_layers


SIZE = 64
SMALL = 32   # the every-method sweep runs at 32x32 to stay fast


def _randomise_bn(model):
    """Untrained batch-norm layers are the identity; give them statistics like a trained net's."""
    g = torch.Generator().manual_seed(0)
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.copy_(torch.rand(m.num_features, generator=g) * 0.2 - 0.1)
            m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.weight.data.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.bias.data.copy_(torch.rand(m.num_features, generator=g) * 0.2 - 0.1)
    return model


def _models(size):
    torch.manual_seed(0)
    return {name: _randomise_bn(build(arch, act, size=size)).eval()
            for name, (arch, act) in {"resnet-relu": ("resnet", "relu"), "resnet-gelu": ("resnet", "gelu"),
                                      "vgg-relu": ("vgg", "relu")}.items()}


@pytest.fixture(scope="module")
def models():
    return _models(SIZE)


@pytest.fixture(scope="module")
def small_models():
    return _models(SMALL)


@pytest.fixture(scope="module")
def batch():
    g = torch.Generator().manual_seed(1)
    return torch.randn(2, 3, SIZE, SIZE, generator=g), torch.tensor([1, 7])


@pytest.mark.parametrize("arch", ["resnet-relu", "resnet-gelu", "vgg-relu"])
def test_every_method_gives_input_sized_finite_maps(small_models, arch):
    model = small_models[arch]
    x, t = torch.randn(2, 3, SMALL, SMALL), torch.tensor([1, 7])
    before = model(x).detach()
    for name, method in B.METHODS.items():
        a = method(model, x, t)
        assert a.shape == (2, SMALL, SMALL), name
        assert a.dtype == torch.float32 and torch.isfinite(a).all(), name
    # no method leaves hooks, merged batch-norms or replaced layers behind
    assert torch.equal(model(x), before)
    assert not any(m._forward_hooks or m._backward_hooks for m in model.modules())


def test_native_resolutions_match_srd_layers(models, batch):
    x, t = batch
    for arch, (low, high) in {"resnet-relu": ("layer4", "layer1"), "vgg-relu": ("features", "features.9")}.items():
        model = models[arch]
        assert cam_layers(model, x) == (low, high)
        out = srd_fx.compile(model, layers=("low", "high"))(x, t)
        shapes = {}
        for name in (low, high):
            h = model.get_submodule(name).register_forward_hook(lambda m, i, o, n=name: shapes.__setitem__(n, o.shape))
            model(x)
            h.remove()
        assert out.relevance["low"].shape[-2:] == shapes[low][-2:] == (4, 4)
        assert out.relevance["high"].shape[-2:] == shapes[high][-2:] == (16, 16)
        assert B.METHODS["SRD-low"].fn(model, x, t).shape == (2, 4, 4)
        assert B.METHODS["SRD-high"].fn(model, x, t).shape == (2, 16, 16)


def _grad(model, x, t):
    x = x.clone().requires_grad_()
    out = model(x)
    return torch.autograd.grad(out[torch.arange(len(t)), t].sum(), x)[0]


def test_gradient_methods_match_autograd(models, batch):
    model = models["resnet-relu"]
    x, t = batch
    g = _grad(model, x, t)
    assert torch.allclose(B.METHODS["Saliency"](model, x, t), g.abs().sum(1), atol=1e-6)
    assert torch.allclose(B.METHODS["InputXGradient"](model, x, t), (x * g).sum(1), atol=1e-6)


def test_integrated_gradients_completeness(models, batch):
    """IG's maps sum to f(x) - f(0) (up to the 50-step Riemann sum)."""
    model = models["resnet-gelu"]
    x, t = batch
    ig = B.METHODS["IntegratedGradients"](model, x, t)
    with torch.no_grad():
        delta = model(x)[torch.arange(2), t] - model(torch.zeros_like(x))[torch.arange(2), t]
    assert torch.allclose(ig.sum((1, 2)), delta, rtol=0.05, atol=1e-3)


def test_gradcam_is_grad_weighted_encoder_output(models, batch):
    """pytorch-grad-cam's GradCAM at the encoder output equals relu(sum_k mean(dy/dA_k) A_k),
    min-max scaled and bilinearly upsampled."""
    model = models["resnet-relu"]
    x, t = batch
    acts = {}
    h = model.get_submodule("layer4").register_forward_hook(lambda m, i, o: acts.__setitem__("A", o))
    out = model(x)
    h.remove()
    A = acts["A"]
    g = torch.autograd.grad(out[torch.arange(2), t].sum(), A)[0]
    cam = torch.relu((g.mean((2, 3), keepdim=True) * A).sum(1)).detach()

    def minmax(c):
        c = c - c.amin((1, 2), keepdim=True)
        return c / (c.amax((1, 2), keepdim=True) + 1e-7)
    ref = minmax(F.interpolate(minmax(cam)[:, None], size=(SIZE, SIZE), mode="bilinear", align_corners=False)[:, 0])
    assert torch.allclose(B.METHODS["GradCAM"](model, x, t), ref, atol=1e-5)


def test_lrp_zplus_conserves_relevance_through_timm_residual_blocks(models, batch):
    """With every bias zero, the z+ rule conserves relevance: the input map sums to the one-hot
    output's 1, which needs the residual additions split by the timm canonizer."""
    import copy
    model = copy.deepcopy(models["resnet-relu"])
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.bias.data.zero_()
            m.running_mean.zero_()
    model.fc.bias.data.zero_()
    x, t = batch
    x = x.abs()
    lrp = B.METHODS["LRP-z+"](model, x, t)
    assert torch.allclose(lrp.sum((1, 2)), torch.ones(2), atol=1e-3)


def test_srd_entries_are_the_compiled_explainer(models, batch):
    model = models["resnet-gelu"]
    x, t = batch
    out = srd_fx.compile(model, layers=("input", "low", "high"))(x, t)
    assert torch.allclose(B.METHODS["SRD-input"](model, x, t), out.saliency, atol=1e-6)
    low = B.METHODS["SRD-low"].fn(model, x, t)
    assert torch.allclose(low, out.relevance["low"], atol=1e-6)
    # conservation: the input map sums to the relevance at the encoder output
    assert torch.allclose(out.saliency.sum((1, 2)), out.R_L.sum((1, 2)), rtol=1e-4, atol=1e-6)
    # compiled once per model and input shape
    e1 = B.get_explainer(model, x)
    assert B.get_explainer(model, x) is e1


def test_targets_and_errors(models, batch):
    model = models["vgg-relu"]
    x, _ = batch
    m = B.get_method("gradinput")
    assert m is B.METHODS["InputXGradient"] and B.get_method("SRD") is B.METHODS["SRD-input"]
    # an int target is used for the whole batch; None means the predicted class
    assert torch.allclose(m(model, x, 3), m(model, x, torch.tensor([3, 3])))
    pred = model(x).argmax(1)
    assert torch.allclose(m(model, x, None), m(model, x, pred))
    with pytest.raises(ValueError, match="entries"):
        m(model, x, torch.tensor([1, 2, 3]))
    with pytest.raises(ValueError, match=r"\(B, C, H, W\)"):
        m(model, x[0], 1)
    with pytest.raises(KeyError, match="available"):
        B.get_method("DeepLift")
    model.train()
    try:
        with pytest.raises(ValueError, match="eval"):
            m(model, x, 1)
    finally:
        model.eval()


def test_one_registry_for_baselines_and_attack_methods(models, batch):
    """Baselines and attack methods are entries of one registry (srd_fx.methods.registry): each use
    is a live table of it; names are unique per use; a registered method is checked and shaped like
    the built-in ones."""
    from srd_fx.errors import InputError, UnknownMethodError
    from srd_fx.methods import robustness as R
    from srd_fx.methods.registry import REGISTRY, Method, Registry
    assert set(B.METHODS) | set(R.METHODS) == set(REGISTRY) and not set(B.METHODS) & set(R.METHODS)
    assert all(REGISTRY[n] is B.METHODS[n] for n in B.METHODS)
    assert R.METHODS["srd"].label == "SRD (ours)" and B.get_method("srd") is B.METHODS["SRD-input"]
    with pytest.raises(UnknownMethodError, match="unknown method 'smoothgrad'; available: gradient"):
        R.make_method("smoothgrad", models["vgg-relu"], batch[0])

    reg = Registry()
    maps = reg.view("explain")
    x, t = batch
    seen = []
    pixel = reg.register(Method("Abs", lambda m, x_, t_: seen.append(t_) or x_.abs(), "input", "test",
                                aliases=("absolute",)))
    coarse = reg.register(Method("Coarse", lambda m, x_, t_: x_[:, :, ::4, ::4], "low", "test"))
    assert list(maps) == ["Abs", "Coarse"] and maps.lookup("ABSOLUTE") is pixel
    model = models["vgg-relu"]
    assert torch.equal(pixel(model, x, 3), x.abs().sum(1)) and torch.equal(seen[-1], torch.tensor([3, 3]))
    ref = F.interpolate(x[:, :, ::4, ::4].sum(1)[:, None], size=x.shape[-2:], mode="bilinear",
                        align_corners=False)[:, 0]
    assert torch.allclose(coarse(model, x, 1), ref)
    with pytest.raises(InputError, match="already registered"):
        reg.register(Method("abs", lambda m, x_, t_: x_, "input", "test"))
    reg.register(Method("Abs", lambda m, x_, t_: -x_.abs(), "input", "test"), replace=True)
    assert list(maps) == ["Coarse", "Abs"] and torch.equal(maps["Abs"](model, x, 1), -x.abs().sum(1))
    # an attack-only entry of the same name is another use: allowed, and not a map maker
    reg.register(Method("abs", None, "input", "test", attack=lambda m, e, b: None))
    assert list(reg.view("attack")) == ["abs"] and len(maps) == 2
    with pytest.raises(InputError, match="attack method"):
        reg.view("attack")["abs"](model, x, 1)
    with pytest.raises(UnknownMethodError, match="available: Coarse, Abs"):
        maps.lookup("DeepLift")
