"""unit="neuron" (SPEC §5, the Appendix F ablation) is LRP-0 on bias-free ReLU networks.

With scalar neurons, no biases and value="pre", SRD's block rule is the z-rule
R_i = x_i * sum_j w_ij R_j / z_j on pre-activations z, and the relevance of a ReLU output is that of
its input.  That is LRP-0, i.e. the epsilon rule with epsilon -> 0.  The reference is computed by two
real library calls, zennit's ``Epsilon`` rule and captum's ``LRP`` with ``EpsilonRule``, seeded with
the same neuron relevance at the encoder output L as SRD (a callable head returning one relevance
per neuron):

* zennit: the sub-network input -> L, with ``attr_output=R`` (the relevance at L);
* captum: the sub-network input -> pre-activation of L, followed by a bias-free linear "seed" layer
  with weights R / z, so that its epsilon rule hands exactly R to L's pre-activation (captum always
  starts from the output value of the target).

The epsilon is 1e-20 (the limit epsilon -> 0 in float64: far below every |z| of these nets); the
test ``test_the_stabiliser_is_the_only_difference`` shows the gap to the libraries is linear in
epsilon.  Everything is float64.
"""
import copy

import pytest
import torch
import torch.nn as nn
from captum.attr import LRP, InputXGradient
from captum.attr._utils.lrp_rules import EpsilonRule
from zennit.attribution import Gradient
from zennit.composites import LayerMapComposite, layer_map_base
from zennit.rules import Epsilon
from zennit.types import Convolution, Linear

import srd_fx

EPS = 1e-20
DT = torch.float64


# ------------------------------------------------------------------ bias-free ReLU networks ----
def _run(net, x):
    for name in net.BODY:
        x = getattr(net, name)(x)
    return x


def body(net):
    """The sub-network input -> L as an nn.Sequential sharing the modules (for the libraries)."""
    return nn.Sequential(*[getattr(net, name) for name in net.BODY])


class ConvNet(nn.Module):
    """conv-relu-maxpool, conv-relu-avgpool, conv-relu (= L, input of the global mean) | mean, linear."""

    def __init__(self, cin=3):
        super().__init__()
        self.c1, self.r1, self.p1 = nn.Conv2d(cin, 6, 3, padding=1, bias=False), nn.ReLU(), nn.MaxPool2d(2)
        self.c2, self.r2, self.p2 = nn.Conv2d(6, 8, 3, padding=1, bias=False), nn.ReLU(), nn.AvgPool2d(2)
        self.c3, self.r3 = nn.Conv2d(8, 8, 3, padding=1, bias=False), nn.ReLU()
        self.fc = nn.Linear(8, 5, bias=False)

    BODY = ("c1", "r1", "p1", "c2", "r2", "p2", "c3", "r3")  # input -> L (post-activation)

    def forward(self, x):
        return self.fc(_run(self, x).mean((2, 3)))


class LinearNet(nn.Module):
    """A linear layer inside the explained part: L is the ReLU after fc1 (named by the user)."""

    def __init__(self):
        super().__init__()
        self.c1, self.r1, self.p1 = nn.Conv2d(3, 6, 3, padding=1, bias=False), nn.ReLU(), nn.MaxPool2d(2)
        self.c2, self.r2, self.p2 = nn.Conv2d(6, 8, 3, padding=1, bias=False), nn.ReLU(), nn.AvgPool2d(2)
        self.flat, self.fc1, self.r3 = nn.Flatten(), nn.Linear(8 * 4 * 4, 12, bias=False), nn.ReLU()
        self.fc2 = nn.Linear(12, 5, bias=False)

    BODY = ("c1", "r1", "p1", "c2", "r2", "p2", "flat", "fc1", "r3")

    def forward(self, x):
        return self.fc2(_run(self, x))


class PoolNet(nn.Module):
    """VGG-like: L is the output of the last max-pool (a virtual identity layer, SPEC §1)."""

    def __init__(self):
        super().__init__()
        self.c1, self.r1, self.p1 = nn.Conv2d(3, 6, 3, padding=1, bias=False), nn.ReLU(), nn.MaxPool2d(2)
        self.c2, self.r2, self.p2 = nn.Conv2d(6, 4, 3, padding=1, bias=False), nn.ReLU(), nn.MaxPool2d(2)
        self.fc = nn.Linear(4 * 4 * 4, 5, bias=False)

    BODY = ("c1", "r1", "p1", "c2", "r2", "p2")

    def forward(self, x):
        return self.fc(_run(self, x).flatten(1))


class Split(nn.Module):
    """Takes the C-channel image stacked as one channel (B, 1, C*H, W): SRD's input map, summed over
    one channel, is then the per-element input relevance of the wrapped network."""

    def __init__(self, net, c):
        super().__init__()
        self.net, self.c = net, c

    def forward(self, x):
        return self.net(x.reshape(x.shape[0], self.c, x.shape[2] // self.c, x.shape[3]))


def _model(cls, *a):
    return cls(*a).to(DT).eval()


# ------------------------------------------------------------------ the library references ----
def zennit_lrp(net, x, R, eps=EPS, read=None):
    """LRP-0 by zennit: Epsilon on conv/linear, Norm (= z-rule) on avg-pools, Pass on ReLU, the
    gradient through max-pools; ``R`` is the relevance at the output of ``net``.  ``read``: name ->
    module of ``net`` whose output relevance is returned as well."""
    net = copy.deepcopy(net)
    mods = dict(net.named_children())
    comp = LayerMapComposite(layer_map=layer_map_base(stabilizer=eps)
                             + [(Convolution, Epsilon(epsilon=eps)), (Linear, Epsilon(epsilon=eps))])
    got = {}

    def keep(key):
        def hook(module, inputs, output):  # after zennit's own hook: sees the relevance of the output
            output.register_hook(lambda g: got.__setitem__(key, g))
        return hook

    with Gradient(net, comp) as attributor:
        hooks = [mods[str(i)].register_forward_hook(keep(k)) for k, i in (read or {}).items()]
        _, rel = attributor(x, attr_output=R)
        for h in hooks:
            h.remove()
    return (rel, got) if read is not None else rel


def captum_lrp(pre, x, R, eps=EPS):
    """LRP-0 by captum: EpsilonRule everywhere, seeded at the output of ``pre`` (L's
    pre-activation, where R / z is finite) through a linear layer with weights R / z."""
    out = []
    for b in range(x.shape[0]):
        net = copy.deepcopy(pre)
        z, r = net(x[b:b + 1]).detach(), R[b:b + 1]
        assert (r[z == 0] == 0).all(), "a linear seed cannot put relevance on a zero pre-activation"
        seed = nn.Linear(z.numel(), 1, bias=False).to(DT)
        with torch.no_grad():
            seed.weight.copy_(torch.where(z == 0, torch.zeros_like(r), r / z).reshape(1, -1))
        model = nn.Sequential(*net, nn.Flatten(), seed).eval()
        for m in model:
            if isinstance(m, (nn.Conv2d, nn.Linear, nn.MaxPool2d, nn.AvgPool2d, nn.Flatten)):
                m.rule = EpsilonRule(epsilon=eps)
        out.append(LRP(model).attribute(x[b:b + 1].clone().requires_grad_(), target=0).detach())
    return torch.cat(out)


def srd_neuron(model, x, R, **kw):
    """SRD with unit="neuron", seeded with the neuron relevance R at L."""
    ex = srd_fx.compile(model, head=lambda A, logits, target: R, unit="neuron", **kw)
    return ex(x)


def _close(a, b, rel=1e-11):
    """Agreement to float64 rounding, relative to the map's scale."""
    scale = max(a.abs().max().item(), b.abs().max().item(), 1e-300)
    err = (a - b).abs().max().item()
    assert err <= rel * scale, f"max |difference| {err:.3g} at scale {scale:.3g}"


# ------------------------------------------------------------------ agreement with LRP-0 ------
@pytest.mark.parametrize("cin", [3, 1])
def test_neuron_unit_is_lrp0_on_a_conv_net(cin):
    """Input map and the maps after relu1/relu2 equal zennit's and captum's LRP-0; with one input
    channel the input map is per element."""
    model = _model(ConvNet, cin)
    x = torch.randn(2, cin, 16, 16, dtype=DT)
    sub = body(model)
    R = torch.randn_like(sub(x))                        # any signed neuron relevance at L
    out = srd_neuron(model, x, R, layers=("input", "r1", "r2"))
    assert out.lost.abs().max().item() == 0.0            # no z^2 <= eps (1e-12) anywhere: nothing dropped
    z, inner = zennit_lrp(sub, x, R, read={"r1": 1, "r2": 4})
    c = captum_lrp(nn.Sequential(*list(sub)[:-1]), x, R)  # seed at r3's pre-activation (c3 output)
    _close(out.saliency, z.sum(1))
    _close(out.saliency, c.sum(1))
    _close(out.relevance["r1"], inner["r1"].sum(1))
    _close(out.relevance["r2"], inner["r2"].sum(1))
    # LRP-0 on a bias-free net is conservative, so all of them sum to sum(R)
    torch.testing.assert_close(out.saliency.sum((1, 2)), R.sum((1, 2, 3)), rtol=1e-10, atol=1e-10)


def test_neuron_unit_is_lrp0_per_element_on_rgb():
    """The RGB image stacked as one channel: SRD's input map is per (channel, pixel) and equals both
    libraries' per-element relevance of the original network."""
    model = _model(ConvNet, 3)
    x = torch.randn(2, 3, 16, 16, dtype=DT)
    sub = body(model)
    R = torch.randn_like(sub(x))
    out = srd_neuron(Split(model, 3).eval(), x.reshape(2, 1, 48, 16), R)
    per_element = out.saliency.reshape(2, 3, 16, 16)
    _close(per_element, zennit_lrp(sub, x, R))
    _close(per_element, captum_lrp(nn.Sequential(*list(sub)[:-1]), x, R))


def test_neuron_unit_is_lrp0_through_a_linear_layer():
    """L after a linear layer (flatten + linear inside the explained block), named by the user."""
    model = _model(LinearNet)
    x = torch.randn(2, 3, 16, 16, dtype=DT)
    sub = body(model)
    R = torch.randn_like(sub(x))
    out = srd_neuron(model, x, R, encoder_output="r3")
    assert out.lost.abs().max().item() == 0.0
    _close(out.saliency, zennit_lrp(sub, x, R).sum(1))
    _close(out.saliency, captum_lrp(nn.Sequential(*list(sub)[:-1]), x, R).sum(1))


def test_neuron_unit_is_lrp0_at_a_max_pool_encoder_output():
    """L = the last max-pool's output (VGG).  Seeded on its non-zero neurons, SRD = zennit = captum.
    Relevance put on a zero neuron of L cannot be shared by the z-rule (z = 0): SRD drops it and
    reports it in ``out.lost``, exactly.  (zennit, whose max-pool passes the plain gradient, would
    route it to the arg-max's negative pre-activation instead: not compared here.)"""
    model = _model(PoolNet)
    x = torch.randn(2, 3, 16, 16, dtype=DT)
    sub = body(model)
    A = sub(x)
    alive = (A != 0).to(DT)
    assert 0 < alive.mean() < 1                          # the case is exercised
    R = torch.randn_like(A)
    out = srd_neuron(model, x, R * alive)
    assert out.lost.abs().max().item() == 0.0
    _close(out.saliency, zennit_lrp(sub, x, R * alive).sum(1))
    _close(out.saliency, captum_lrp(sub, x, (R * alive)).sum(1))  # L's "pre-activation" is L itself
    full = srd_neuron(model, x, R)
    _close(full.saliency, out.saliency)
    torch.testing.assert_close(full.lost, (R * (1 - alive)).sum((1, 2, 3)), rtol=1e-12, atol=1e-12)


def test_the_stabiliser_is_the_only_difference():
    """With a finite epsilon the libraries differ from SRD by O(epsilon): the gap shrinks 1000x
    from 1e-12 to 1e-15 (and to rounding at 1e-20, above)."""
    model = _model(ConvNet, 3)
    x = torch.randn(2, 3, 16, 16, dtype=DT)
    sub = body(model)
    R = torch.randn_like(sub(x))
    sal = srd_neuron(model, x, R).saliency
    gap = [(zennit_lrp(sub, x, R, eps=e).sum(1) - sal).abs().max().item() for e in (1e-12, 1e-15)]
    assert gap[0] < 1e-6 * sal.abs().max().item()
    assert 900 < gap[0] / gap[1] < 1100, gap


# ------------------------------------------------------------------ why: LRP-0 = input x gradient
def test_lrp0_equals_input_times_gradient():
    """For a bias-free ReLU net, LRP-0 of the read-out f = <c, A(x)> (seed R = c * A at L) is
    x * df/dx.  SRD's neuron unit with that seed, and zennit, both equal captum's InputXGradient."""
    model = _model(ConvNet, 3)
    x = torch.randn(2, 3, 16, 16, dtype=DT)
    sub = body(model)
    A = sub(x)
    c = torch.randn(A.shape[1:], dtype=DT)
    readout = nn.Linear(c.numel(), 1, bias=False).to(DT)
    with torch.no_grad():
        readout.weight.copy_(c.reshape(1, -1))
    f = nn.Sequential(copy.deepcopy(sub), nn.Flatten(), readout).eval()
    ixg = InputXGradient(f).attribute(x.clone().requires_grad_(), target=0).detach()
    ex = srd_fx.compile(model, head=lambda A_, logits, target: c * A_, unit="neuron")
    _close(ex(x).saliency, ixg.sum(1))
    _close(zennit_lrp(sub, x, c * A.detach()), ixg)


# ------------------------------------------------------------------ conservation, head="ones" ---
@pytest.mark.parametrize("cls", [ConvNet, LinearNet, PoolNet])
def test_neuron_ones_conserves_up_to_reported_loss(cls):
    """head="ones" gives 1/C per neuron of L.  Relevance on a neuron with z = 0 has no contributions
    to share (SPEC §2): it is lost, and ``out.lost`` reports it, so sum R^input + lost = sum R^L.
    With a ReLU at L nothing is lost (a dead ReLU still has z != 0: value="pre"); with a max-pool at L
    the loss is exactly (number of zero neurons of L) / C."""
    model = _model(cls)
    x = torch.randn(2, 3, 16, 16, dtype=DT)
    kw = dict(encoder_output="r3") if cls is LinearNet else {}
    out = srd_fx.compile(model, head="ones", unit="neuron", **kw)(x)
    R_L = out.R_L.flatten(1).sum(1) if out.R_L.dim() > 1 else out.R_L  # (B,) for a 2-D L
    torch.testing.assert_close(out.saliency.sum((1, 2)) + out.lost, R_L, rtol=1e-12, atol=1e-12)
    A = body(model)(x)
    zeros_of_L = (A == 0).to(DT).flatten(1).sum(1)
    expected = zeros_of_L / A.shape[1] if cls is PoolNet else torch.zeros(2, dtype=DT)
    if cls is PoolNet:
        assert (expected > 0).all()
    torch.testing.assert_close(out.lost, expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("unit,channels", [("neuron", 8), ("pfv", 1)])
def test_post_value_reports_what_it_drops(unit, channels):
    model = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1, bias=False), nn.ReLU(), nn.MaxPool2d(2),
                          nn.Conv2d(6, channels, 3, padding=1, bias=False), nn.ReLU(),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(channels, 5)).to(DT).eval()
    x = torch.randn(2, 3, 16, 16, dtype=DT)
    out = srd_fx.compile(model, head="ones", unit=unit, value="post")(x)
    R_L = out.R_L.sum((1, 2))
    assert (out.saliency.sum((1, 2)) < R_L - 1).all()   # relevance is dropped (dead units of L) ...
    torch.testing.assert_close(out.saliency.sum((1, 2)) + out.lost, R_L, rtol=1e-12, atol=1e-12)  # ... and reported


def test_propagate_honours_the_neuron_unit():
    model = _model(ConvNet, 3)
    x = torch.randn(1, 3, 16, 16, dtype=DT)
    R = torch.randn_like(body(model)(x))
    ex = srd_fx.compile(model, unit="neuron")
    _close(ex.propagate(x, "r3", R), srd_neuron(model, x, R).saliency)
    with pytest.raises(srd_fx.InputError, match="unit='neuron'"):
        ex.erf(x, "r3", positions=[(0, 0)])
