"""Targeted explanation manipulation (srd_fx.methods.robustness, SPEC.md §6)."""
import json
import os

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import srd_fx
from srd_fx.methods import robustness as R



@pytest.fixture(autouse=True)
def _fast_cpu():
    """Softplus(beta) second derivatives underflow to float32 denormals, which make CPU
    convolutions 10-100x slower (the attack command flushes them too); and these tensors are
    tiny, so one thread avoids OpenMP synchronisation on a busy machine (5x faster here)."""
    threads = torch.get_num_threads()
    torch.set_flush_denormal(True)
    torch.set_num_threads(1)
    yield
    torch.set_flush_denormal(False)
    torch.set_num_threads(threads)


ACTS = {"relu": nn.ReLU, "gelu": nn.GELU, "silu": nn.SiLU}


class TinyNet(nn.Module):
    """Conv + BN, max-pool, a residual addition, adaptive pooling and a linear head; ReLUs in
    module (in-place too), functional and tensor-method forms."""

    def __init__(self, act="relu", c=6, k=4):
        super().__init__()
        self.act = act
        self.c1 = nn.Conv2d(3, c, 3, padding=1)
        self.a1 = ACTS[act]() if act != "relu" else nn.ReLU(inplace=True)
        self.c2 = nn.Conv2d(c, c, 3, padding=1)
        self.bn = nn.BatchNorm2d(c)
        self.pool = nn.MaxPool2d(2)
        self.c3 = nn.Conv2d(c, c, 3, padding=1)
        self.gap = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(c, k)

    def _act(self, x, form):
        if self.act != "relu":
            return self.a1(x)
        return {"fn": F.relu, "torch": torch.relu, "method": lambda t: t.relu()}[form](x)

    def forward(self, x):
        x = self.a1(self.c1(x))
        x = self.pool(self._act(self.bn(self.c2(x)), "fn"))
        y = self._act(self.c3(x), "method")
        x = self._act(x + y, "torch")
        return self.fc(self.gap(x).flatten(1))


def tiny(act="relu", seed=0, dtype=torch.float32):
    torch.manual_seed(seed)
    m = TinyNet(act)
    with torch.no_grad():
        m.bn.running_mean.uniform_(-0.2, 0.2)
        m.bn.running_var.uniform_(0.5, 1.5)
        m.bn.weight.uniform_(0.5, 1.5)
        m.bn.bias.uniform_(-0.2, 0.2)
    return m.eval().to(dtype)


def images(n=2, size=12, seed=1, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 3, size, size, generator=g, dtype=dtype)


# ------------------------------------------------------------------------------ fx rewrites -----
class Forms(nn.Module):
    """Every ReLU form, including in-place ones whose input is used again afterwards."""

    def __init__(self, act_fn=None):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.r_mod = nn.ReLU()
        self.r_inp = nn.ReLU(inplace=True)
        self.act_fn = act_fn  # reference: the same network written with act_fn everywhere

    def forward(self, x):
        f = self.act_fn
        a = self.conv(x)
        b = self.r_mod(a) if f is None else f(a)
        c = self.conv(x) - 0.1
        if f is None:
            d = self.r_inp(c)            # in-place: c now holds relu(c)
        else:
            c = f(c)
            d = c
        e = F.relu(a - 0.2) if f is None else f(a - 0.2)
        g = torch.relu(a + 0.1) if f is None else f(a + 0.1)
        h = a * 0.5
        i = h.relu() if f is None else f(h)
        j = a * 0.3
        if f is None:
            j.relu_()                     # in-place method: j used below holds relu(j)
        else:
            j = f(j)
        k = F.relu(a * 0.7, inplace=True) if f is None else f(a * 0.7)
        return b + c + d + e + g + i + j + k


def test_replace_relu_covers_every_form_and_keeps_inplace_semantics():
    torch.manual_seed(0)
    m = Forms().eval()
    x = torch.randn(2, 3, 6, 6)
    gm = R.replace_relu(m, lambda: nn.ReLU())
    assert gm.n_replaced_relu == 7
    assert torch.allclose(gm(x), m(x), atol=1e-6)
    beta = 3.0
    sp = R.softplus_copy(m, beta)
    ref = Forms(act_fn=lambda t: F.softplus(t, beta=beta)).eval()
    ref.load_state_dict(m.state_dict())
    assert torch.allclose(sp(x), ref(x), atol=1e-6)
    assert not torch.allclose(sp(x), m(x), atol=1e-3)   # it really is a different network
    with pytest.raises(ValueError):
        R.softplus_copy(m, 0.0)


def test_lrp_network_computes_the_same_function():
    m = tiny()
    x = images()
    net = R.lrp_network(m, x)
    assert torch.allclose(net(x), m(x), atol=1e-5)
    names = [type(mod).__name__ for mod in net.modules()]
    assert "BatchNorm2d" not in names and "Sum" in names


# ------------------------------------------------------ differentiable maps == library maps -----
@pytest.mark.parametrize("name", ["gradient", "input_x_gradient", "guided_backprop",
                                  "integrated_gradients", "lrp_zplus"])
def test_attacked_map_equals_library_map_on_original_network(name):
    """With beta=None the differentiable re-computation runs on the original network and must
    equal what captum / zennit return."""
    m = tiny()
    x = images(3)
    target = m(x).argmax(1)
    meth = R.make_method(name, m, x, beta=None, ig_steps=5)
    a, logits = meth.attack(x.clone().requires_grad_(True), target)
    assert a.requires_grad                                    # part of a graph: can be attacked
    ref = meth.report(x, target)
    assert ref.shape == (3, 12, 12)
    assert torch.allclose(a.detach(), ref, rtol=1e-4, atol=1e-7 * float(ref.abs().max()))
    assert torch.allclose(logits, m(x), atol=1e-5)


def test_relu_attacked_lrp_ignores_beta():
    """lrp_zplus_relu is attacked on the original network whatever beta the caller passes."""
    m = tiny()
    x = images(2)
    target = m(x).argmax(1)
    meth = R.make_method("lrp_zplus_relu", m, x, beta=10.0)
    assert not any(isinstance(k, nn.Softplus) for k in meth.net.modules())
    a, _ = meth.attack(x.clone().requires_grad_(True), target)
    assert torch.allclose(a.detach(), meth.report(x, target), rtol=1e-4, atol=1e-9)


def _directional_check(fn, x, n_dirs=3, h=1e-6):
    """autograd directional derivatives of a scalar fn against central differences (float64)."""
    xr = x.clone().requires_grad_(True)
    (g,) = torch.autograd.grad(fn(xr), xr)
    assert torch.isfinite(g).all() and g.abs().max() > 0
    gen = torch.Generator().manual_seed(3)
    for _ in range(n_dirs):
        d = torch.randn(x.shape, generator=gen, dtype=x.dtype)
        fd = (fn(x + h * d) - fn(x - h * d)) / (2 * h)
        ad = (g * d).sum()
        assert torch.allclose(ad, fd.detach(), rtol=1e-4, atol=1e-9 * (1 + fd.abs().item())), (ad, fd)
    return g


@pytest.mark.parametrize("name", ["gradient", "guided_backprop", "lrp_zplus"])
def test_gradient_of_attacked_map_matches_finite_differences(name):
    """The attack's gradient (second-order, through captum-equivalent autograd, the guided
    backward and zennit's hooks) is the true derivative of the map on the softplus copy."""
    m = tiny(dtype=torch.float64)
    x = images(1, 8, dtype=torch.float64)
    target = m(x).argmax(1)
    meth = R.make_method(name, m, x, beta=5.0)
    w = torch.rand(1, 8, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    _directional_check(lambda z: (meth.attack(z, target)[0] * w).sum(), x)


@pytest.mark.parametrize("act", ["relu", "gelu", "silu"])
def test_srd_map_gradient_is_finite_nonzero_and_correct(act):
    """SRD is attacked through its compiled module: its map has a real gradient w.r.t. the input
    on ReLU, GELU and SiLU networks (checked against central differences in float64)."""
    m = tiny(act, dtype=torch.float64)
    x = images(1, 8, dtype=torch.float64)
    ex = srd_fx.compile(m, head="ones", example_input=x)
    w = torch.rand(1, 8, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    # a weighted sum: the plain sum of SRD relevance is conserved (constant), its gradient ~ 0
    g = _directional_check(lambda z: (ex(z).saliency.abs() * w).sum(), x)
    assert g.abs().mean() > 1e-6


# ---------------------------------------------------------------------------------- attack -----
def test_attack_on_gradient_moves_map_to_target_and_respects_bounds():
    m = tiny()
    x = images(2, 12, seed=1)
    xt = images(2, 12, seed=7)
    eps = 4 / 255
    seen = []

    def check(t, delta):
        seen.append(t)
        assert delta.abs().max() <= eps + 1e-7
        xa = x + delta
        assert xa.min() >= -1e-7 and xa.max() <= 1 + 1e-7

    meth = R.make_method("gradient", m, x, beta=10.0)
    res = R.manipulate(m, meth, x, xt, max_steps=25, lr=1e-3, eps=eps, step_callback=check)
    assert len(seen) == 25 and res.steps.tolist() == [25, 25] and not res.stopped.any()
    assert (res.linf <= eps + 1e-7).all() and res.linf.min() > 0.5 * eps
    assert res.x_adv.min() >= 0 and res.x_adv.max() <= 1
    # the loss decreased
    best = torch.nan_to_num(res.loss, nan=float("inf")).min(0).values
    assert (best < 0.97 * res.loss[0]).all()
    # the attacked map moved towards the target map (PCC up), on the attacked network ...
    tgt_map, _ = meth.attack(xt.clone().requires_grad_(True), res.target_tgt)
    before, _ = meth.attack(x.clone().requires_grad_(True), res.target_org)
    after, _ = meth.attack(res.x_adv.clone().requires_grad_(True), res.target_org)
    p_before = R.similarity(before, tgt_map)["pcc"]
    p_after = R.similarity(after, tgt_map)["pcc"]
    assert all(a > b + 0.01 for a, b in zip(p_after, p_before)), (p_before, p_after)
    # ... and the logit change is within what the loss allows: lambda2 * MSE(dF) <= loss(delta=0)
    dmse = ((res.attacked_logits_adv - res.attacked_logits_org) ** 2).mean(1)
    assert (1e6 * dmse <= res.loss[0] + 1e-3).all()
    assert torch.allclose(res.attacked_logits_org, meth.net(x), atol=1e-5)


def test_attack_per_channel_bounds_and_pixel_range_every_step():
    """A normalised input (per-channel eps and range), pixels starting at the range edges."""
    m = tiny()
    mean, std = torch.tensor([0.5, 0.4, 0.3]), torch.tensor([0.25, 0.2, 0.3])
    px = images(1, 12)
    px[..., :3, :] = 0.0
    px[..., -3:, :] = 1.0
    x = (px - mean.view(3, 1, 1)) / std.view(3, 1, 1)
    xt = (images(1, 12, seed=4) - mean.view(3, 1, 1)) / std.view(3, 1, 1)
    eps = (8 / 255) / std
    lo, hi = (0 - mean) / std, (1 - mean) / std

    def check(t, delta):
        assert (delta.abs() <= eps.view(1, 3, 1, 1) + 1e-6).all()
        xa = x + delta
        assert (xa >= lo.view(1, 3, 1, 1) - 1e-6).all() and (xa <= hi.view(1, 3, 1, 1) + 1e-6).all()

    res = R.manipulate(m, "srd", x, xt, max_steps=6, lr=2e-2, eps=eps.tolist(),
                       clamp=(lo.tolist(), hi.tolist()), step_callback=check)
    d = res.x_adv - x
    assert (d.abs() <= eps.view(1, 3, 1, 1) + 1e-6).all()
    # with lr 2e-2 the bound is reached and binds somewhere
    assert (d.abs() >= eps.view(1, 3, 1, 1) - 1e-6).any()


def test_stop_rule_fires_when_target_equals_original():
    m = tiny()
    x = images(1)
    res = R.manipulate(m, "gradient", x, x.clone(), max_steps=10)
    assert res.stopped.all() and res.steps.tolist() == [0]
    assert torch.equal(res.x_adv, x)


def test_bad_inputs_raise_clear_errors():
    m = tiny()
    x = images(1)
    with pytest.raises(srd_fx.InputError, match="same shape"):
        R.manipulate(m, "gradient", x, images(1, 10))
    with pytest.raises(srd_fx.InputError, match="outside the valid input range"):
        R.manipulate(m, "gradient", x * 3, x)
    with pytest.raises(srd_fx.NonFiniteError):
        R.manipulate(m, "gradient", x, x * float("nan"))
    with pytest.raises(srd_fx.InputError, match="unknown method"):
        R.manipulate(m, "smoothgrad", x, x)


def test_similarity_values():
    a = torch.rand(2, 16, 16)
    s = R.similarity(a, a * 3)                    # max-normalised: identical maps
    assert np.allclose(s["ssim"], 1) and np.allclose(s["pcc"], 1)
    b = torch.rand(2, 16, 16)
    s = R.similarity(a, b)
    ref = [np.corrcoef(u.ravel(), v.ravel())[0, 1] for u, v in zip(a.numpy(), b.numpy())]
    assert np.allclose(s["pcc"], ref, atol=1e-6)
    assert all(v < 0.5 for v in s["ssim"])


# ------------------------------------------------------------------------------------ CLI -----
def test_run_experiment_writes_table_and_figures(tmp_path):
    from srd_fx.cli.commands import attack as A
    from srd_fx.cli import build_parser
    args = build_parser().parse_args(["attack", "--pairs", "3"])
    assert args.pairs == 3 and args.max_steps == 200 and args.beta == 10.0
    m = tiny()
    imgs = images(6, 12, seed=2)
    labels = torch.arange(6) % 4
    pairs = A.draw_pairs(6, 3, seed=0)
    assert all(i != j for i, j in pairs)
    out = tmp_path / "att"
    summ = A.run_experiment({"tiny": {"model": m, "accuracy": None}}, imgs, labels, pairs, ["gradient", "srd"],
                            str(out), mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25), max_steps=3, batch_size=2,
                            progress=False, command="test")
    for f in ("pairs.csv", "summary.json", "table.md", "bars.png", "examples_tiny.png"):
        assert (out / f).exists() and (out / f).stat().st_size > 0
    st = json.loads((out / "summary.json").read_text())["models"]["tiny"]["methods"]
    for meth in ("gradient", "srd"):
        assert st[meth]["ssim"]["n"] == 3
        assert -1 <= st[meth]["pcc"]["mean"] <= 1
        assert st[meth]["linf_255"]["mean"] <= 8 + 1e-3
        assert st[meth]["steps"]["mean"] <= 3
    assert "SRD" in (out / "table.md").read_text()
