"""Zoo canonicalisations added for the failures of the first timm sweep (issue 3).

Each case is a real timm layer (or a plain torch op) in a tiny network, float64: the twin's logits
equal the model's, relevance balances (R^input + lost = R^L, SPEC "Conservation"), and the
specific decision is checked — a normalisation statistic or an upsampled sigmoid gate is a
constant of its block (its branch gets no relevance), FRN's ``max(x, tau)`` is an activation
layer, and a ``max`` of two input-dependent tensors is refused.
"""
import pytest
import torch
import torch.nn as nn
from timm.layers import EvoNorm2dB0, EvoNorm2dS0, FilterResponseNormTlu2d
from timm.models.ghostnet import GhostModuleV2

import srd_fx


def _balanced(e, x):
    out = e(x)
    assert torch.equal(out.logits, e.model(x)) or torch.allclose(out.logits, e.model(x), rtol=1e-12, atol=0)
    lhs = out.saliency.flatten(1).sum(1) + out.lost
    rhs = out.R_L.flatten(1).sum(1)
    assert torch.allclose(lhs, rhs, rtol=1e-10, atol=1e-12 * float(out.R_L.abs().sum())), (lhs, rhs)
    return out


class Net(nn.Module):
    def __init__(self, mid, c=8):
        super().__init__()
        self.conv1 = nn.Conv2d(3, c, 3, padding=1)
        self.mid = mid
        self.conv2 = nn.Conv2d(c, c, 3, padding=1)
        self.act = nn.ReLU()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(c, 4)

    def forward(self, x):
        return self.fc(self.pool(self.act(self.conv2(self.mid(self.conv1(x))))).flatten(1))


def _randomise(m):
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in m.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype) * 0.5 + (0.5 if p.dim() <= 1 else 0))
        for mod in m.modules():
            if isinstance(getattr(mod, "running_var", None), torch.Tensor):
                mod.running_var.uniform_(0.5, 1.5)
    return m.double().eval()


def test_evonorm_s0_group_statistic_is_a_constant():
    """EvoNorm-S0 divides by ``group_std(x)``, a group variance broadcast back to (B, C, H, W)
    with expand + reshape: a statistic, recorded as a constant (like LayerNorm's)."""
    m = _randomise(Net(EvoNorm2dS0(8, groups=2)))
    x = torch.randn(2, 3, 10, 10, dtype=torch.float64)
    e = srd_fx.compile(m, layers="all", example_input=x[:1])
    _balanced(e, x)
    assert "truediv" in e.code, "EvoNorm's division is in the twin"


def test_evonorm_b0_elementwise_divisor_is_refused():
    """EvoNorm-B0 divides by ``max(running std, x * v + instance_std(x))``: an element-wise,
    input-dependent divisor, no statistic and no gate — refused, naming the node."""
    m = _randomise(Net(EvoNorm2dB0(8)))
    with pytest.raises(srd_fx.UnsupportedOpError, match="truediv"):
        srd_fx.compile(m, example_input=torch.randn(1, 3, 10, 10, dtype=torch.float64))


def test_frn_tlu_maximum_is_an_activation_layer():
    """FilterResponseNorm + TLU: ``torch.maximum(x, tau)`` with a learned tau is an element-wise
    nonlinearity ending the block; tau's ``.to(x.dtype)`` does not make it input-dependent."""
    m = _randomise(Net(FilterResponseNormTlu2d(8)))
    x = torch.randn(2, 3, 10, 10, dtype=torch.float64)
    e = srd_fx.compile(m, layers="all", example_input=x[:1])
    assert any("maximum" in a for a in e.activation_layers), e.activation_layers
    _balanced(e, x)


def test_maximum_of_two_input_dependent_tensors_is_refused():
    class Max(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Conv2d(8, 8, 1), nn.Conv2d(8, 8, 1)

        def forward(self, x):
            return torch.maximum(self.a(x), self.b(x))

    m = _randomise(Net(Max()))
    with pytest.raises(srd_fx.UnsupportedOpError, match="maximum.*2 input-dependent tensors"):
        srd_fx.compile(m, example_input=torch.randn(1, 3, 8, 8, dtype=torch.float64))


def test_ghostnetv2_upsampled_sigmoid_gate():
    """GhostNetV2's attention: ``out * F.interpolate(sigmoid(short_conv(avg_pool(x))))``; the
    upsampled sigmoid is a gate, so the short_conv branch receives no relevance."""
    m = _randomise(Net(GhostModuleV2(8, 8)))
    x = torch.randn(2, 3, 12, 12, dtype=torch.float64)
    e = srd_fx.compile(m, layers="all", example_input=x[:1])
    _balanced(e, x)
    # the sigmoid is a gate (a constant of the block), not an activation layer
    assert not any("sigmoid" in a for a in e.activation_layers), e.activation_layers


def test_head_with_input_independent_parameter_expression():
    """timm's RmsNorm2d head uses ``weight.reshape(...)`` — an expression of parameters only,
    copied into the extracted head (convnext_*_rms failed with KeyError before)."""
    from timm.layers import RmsNorm2d

    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 8, 3, padding=1)
            self.act = nn.GELU()
            self.pool = nn.AdaptiveAvgPool2d(1)
            self.norm = RmsNorm2d(8)
            self.fc = nn.Linear(8, 5)

        def forward(self, x):
            return self.fc(self.norm(self.pool(self.act(self.conv(x)))).flatten(1))

    m = _randomise(M())
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    e = srd_fx.compile(m, head="ones", layers="all")
    _balanced(e, x)


def test_lost_relevance_accounts_for_the_whole_imbalance():
    """A 1x1 convolution after a ReLU whose every channel is zero at some positions: the bias share
    of those positions has D_j = 0 and is lost (SPEC "Conservation"); out.lost reports exactly it."""
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.c1 = nn.Conv2d(3, 2, 1)
            self.r1 = nn.ReLU()
            self.c2 = nn.Conv2d(2, 4, 1)
            self.r2 = nn.ReLU()
            self.pool = nn.AdaptiveAvgPool2d(1)
            self.fc = nn.Linear(4, 3)

        def forward(self, x):
            return self.fc(self.pool(self.r2(self.c2(self.r1(self.c1(x))))).flatten(1))

    m = _randomise(M())
    with torch.no_grad():
        m.c1.bias.fill_(-1.0)           # many positions with both channels at zero
        m.c2.bias.fill_(1.0)            # a bias that reaches them
        m.fc.weight.abs_()
    x = torch.randn(2, 3, 6, 6, dtype=torch.float64)
    e = srd_fx.compile(m, head="ones")
    out = _balanced(e, x)
    assert (out.lost > 1e-3).all(), out.lost   # the imbalance is real and fully reported


def test_torchvision_stochastic_depth_is_the_identity_in_eval():
    """torchvision's EfficientNet calls ``torchvision.ops.stochastic_depth`` (an fx-wrapped
    function) in every residual block: the identity outside training."""
    import torchvision
    m = torchvision.models.efficientnet_b0(num_classes=5).double().eval()
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    e = srd_fx.compile(m, example_input=x[:1])
    _balanced(e, x)
    assert "stochastic_depth" in e.code


class _LambdaScale(nn.Module):
    """``x * exp(lam).type_as(x)`` (timm's DiffAttention computes its lambda like this)."""

    def __init__(self, meta_only: bool):
        super().__init__()
        self.lam = nn.Parameter(torch.full((8, 1, 1), 0.3))
        self.meta_only = meta_only

    def forward(self, x):
        lam = self.lam.exp()
        return x * (lam.type_as(x) if self.meta_only else lam)


def test_type_as_lends_only_the_dtype():
    """``type_as(q)`` takes only q's dtype: a parameter expression cast that way stays a constant
    of the block (a scale), so the explainer equals the one without the cast, map for map."""
    x = torch.randn(2, 3, 10, 10, dtype=torch.float64)
    outs = []
    for meta_only in (True, False):
        m = _randomise(Net(_LambdaScale(meta_only)))
        e = srd_fx.compile(m, layers="all", example_input=x[:1])
        outs.append(_balanced(e, x))
    assert outs[0].relevance.keys() == outs[1].relevance.keys()
    for k in outs[0].relevance:
        torch.testing.assert_close(outs[0].relevance[k], outs[1].relevance[k], rtol=1e-12, atol=0)
