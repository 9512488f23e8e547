"""Conservation (SPEC §2): sum of R over the input == sum of R^L, per sample; exact logits;
batch independence. On torchvision VGG/ResNet (random weights, randomised batch-norm
statistics, 32x32 inputs) and on the tiny networks of tests/naive_srd.py."""
import copy

import pytest
import torch
import torch.nn as nn
import torchvision

import naive_srd as N
import srd_fx

TORCHVISION = ["vgg11", "vgg11_bn", "vgg16", "vgg16_bn", "resnet18", "resnet50"]
TOL = {torch.float64: 1e-10, torch.float32: 1e-4}


def _randomise(model, gen):
    """Random conv biases and random batch-norm statistics / affine parameters."""
    N.randomize_bn(model, gen)
    with torch.no_grad():
        for mod in model.modules():
            if isinstance(mod, nn.Conv2d) and mod.bias is not None:
                mod.bias.copy_(0.1 * torch.randn(mod.bias.shape, generator=gen))
    return model


def make_torchvision(name, seed=0):
    """A torchvision model with random weights, in eval mode, float64.

    VGG's encoder (``features``, ``avgpool``) is torchvision's; its classifier keeps its layout
    (Linear-ReLU-Dropout twice, then Linear) but is 32 wide instead of 4096, because initialising
    the 25088x4096 layer alone would take seconds. The classifier is the head (after L), which
    SRD does not propagate through."""
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    if name.startswith("vgg"):
        with torch.device("meta"):
            model = getattr(torchvision.models, name)(num_classes=10)
        model.features.to_empty(device="cpu")
        for mod in model.features.modules():
            if isinstance(mod, nn.Conv2d):
                nn.init.kaiming_normal_(mod.weight, mode="fan_out", nonlinearity="relu")
                nn.init.zeros_(mod.bias)
            elif isinstance(mod, nn.BatchNorm2d):
                mod.reset_parameters()
        model.classifier = nn.Sequential(nn.Linear(512 * 7 * 7, 32), nn.ReLU(True), nn.Dropout(),
                                         nn.Linear(32, 32), nn.ReLU(True), nn.Dropout(), nn.Linear(32, 10))
    else:
        model = getattr(torchvision.models, name)(num_classes=10)
    return _randomise(model, gen).double().eval()


def _rel_err(out):
    total = out.R_L.sum((1, 2))
    assert (out.R_L.abs().sum((1, 2)) > 0).all(), "degenerate test case: R^L is all zero"
    return ((out.saliency.sum((1, 2)) - total).abs() / out.R_L.abs().sum((1, 2))).max().item()


@pytest.mark.parametrize("name", TORCHVISION)
def test_torchvision_conservation_and_logits(name):
    model64 = make_torchvision(name)
    model32 = copy.deepcopy(model64).float()
    x64 = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    for model, x in [(model64, x64), (model32, x64.float())]:
        out = srd_fx.compile(model, head="ones", layers=("input", "low"))(x)
        with torch.no_grad():
            assert torch.equal(out.logits, model(x)), f"{name} {x.dtype}: logits differ from model(x)"
        assert out.saliency.dtype == x.dtype
        assert torch.isfinite(out.saliency).all()
        err = _rel_err(out)
        assert err < TOL[x.dtype], f"{name} {x.dtype}: conservation error {err:.2e}"


@pytest.mark.parametrize("name", ["resnet18", "vgg11_bn"])
def test_torchvision_gradcam_head_conservation(name):
    model = make_torchvision(name)
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    out = srd_fx.compile(model)(x)
    assert _rel_err(out) < TOL[torch.float64]


@pytest.mark.parametrize("name", ["resnet18", "vgg11_bn"])
def test_torchvision_batch_independence(name):
    model = make_torchvision(name)
    x = torch.randn(3, 3, 32, 32, dtype=torch.float64)
    _assert_batch_independent(srd_fx.compile(model, layers="all"), x, name)


def _assert_batch_independent(explainer, x, name):
    """Each sample explained alone gives its row of the batch (logits, R_L, every layer's map)."""
    batch = explainer(x)
    for b in range(x.shape[0]):
        one = explainer(x[b:b + 1])
        torch.testing.assert_close(one.logits[0], batch.logits[b], rtol=0, atol=1e-12)
        torch.testing.assert_close(one.R_L[0], batch.R_L[b], rtol=0, atol=1e-12)
        for layer, r in batch.relevance.items():
            torch.testing.assert_close(one.relevance[layer][0], r[b], rtol=0, atol=1e-12,
                                       msg=f"{name}/{layer}, sample {b}")


@pytest.mark.parametrize("name", sorted(N.TINY_NETS))
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_tiny_nets_conservation(name, dtype):
    model, net = N.TINY_NETS[name]()
    x = torch.randn(3, 3, 8, 8, dtype=torch.float64)
    # Every block is non-degenerate on this input (||v_j|| > 0, D_j > 0), so conservation is exact.
    for b in range(3):
        _, per_block = N.sample_mus(net, x[b:b + 1])
        assert not any(info["degenerate"].any() for _, info in per_block)
    R_L = torch.rand(3, *N.encoder_output(net, x).shape[-2:], dtype=dtype) + 0.1
    model, x = model.to(dtype), x.to(dtype)
    for head in ["gradcam", "ones", lambda A, logits, target: R_L]:
        out = srd_fx.compile(model, head=head, layers="all")(x)
        with torch.no_grad():
            assert torch.equal(out.logits, model(x))
        err = _rel_err(out)
        assert err < TOL[dtype], f"{name} {dtype} head={head}: conservation error {err:.2e}"


@pytest.mark.parametrize("name", sorted(N.TINY_NETS))
def test_tiny_nets_batch_independence(name):
    model, _ = N.TINY_NETS[name]()
    x = torch.randn(3, 3, 8, 8, dtype=torch.float64)
    _assert_batch_independent(srd_fx.compile(model, layers="all"), x, name)
