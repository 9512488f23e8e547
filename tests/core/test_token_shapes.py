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
        srd_fx.compile(m, example_input=torch.randn(1, 3, 8, 8))


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
