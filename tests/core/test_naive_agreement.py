"""The compiled SRD explainer against the independent pair-by-pair reference (tests/naive_srd.py).

Every tiny network is explained by ``srd_fx.compile`` and by the naive implementation from the
same initial relevance R^L (a callable head), and the relevance maps must agree at every
activation layer and at the input to 1e-8 of the scale of R (float64). The default Grad-CAM head
is checked against an explicit Eq. 4 computation, and the ERFs (Eq. 1, forward) against
backward passes seeded one-hot (Appendix C).
"""
import pytest
import torch
import torch.nn.functional as F

import naive_srd as N
import srd_fx
from conftest import assert_close_to, fixed_head, layer_by_layer

TOL = 1e-8
NETS = sorted(N.TINY_NETS)


def _build(name, batch=2):
    m, net = N.TINY_NETS[name]()
    x = torch.randn(batch, 3, 8, 8, dtype=torch.float64)
    return m, net, x


@pytest.mark.parametrize("name", NETS)
def test_description_matches_module(name):
    """The hand-written block description computes the module's logits (else the comparison
    below would be meaningless)."""
    m, net, x = _build(name)
    with torch.no_grad():
        ref = m(x)
        got = net.head(N.encoder_output(net, x))
    torch.testing.assert_close(got, ref, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("name", NETS)
def test_layer_by_layer_agreement(name):
    m, net, x = _build(name)
    L = N.encoder_output(net, x)
    with torch.no_grad():
        logits = m(x)
    out, R_L = layer_by_layer(m, net, x, L, logits, TOL, name, conserve_rtol=1e-12)
    assert_close_to(out.relevance["low"], R_L, TOL, R_L.abs().max().item(), f"{name}/low")


def test_signed_initial_relevance():
    """A signed R^L (negative entries too) propagates identically: nothing assumes R >= 0."""
    m, net, x = _build("resnet")
    L = N.encoder_output(net, x)
    R_L = torch.randn(x.shape[0], *L.shape[-2:], dtype=torch.float64)
    out = srd_fx.compile(m, head=fixed_head(R_L), layers="all")(x)
    ref = N.propagate(net, x, R_L)
    for layer, r in ref.items():
        assert_close_to(out.relevance[layer], r, TOL, R_L.abs().max().item(), f"signed/{layer}")


def test_module_names_select_the_same_layers():
    """layers= given as module names (dotted paths) returns the same maps as the fx node names."""
    m, net, x = _build("resnet")
    L = N.encoder_output(net, x)
    R_L = torch.rand(x.shape[0], *L.shape[-2:], dtype=torch.float64)
    modules = ["block1.act1", "block1.act2", "block2.act1", "block2.act2"]
    out = srd_fx.compile(m, head=fixed_head(R_L), layers=["input"] + modules)(x)
    ref = N.propagate(net, x, R_L)
    for mod in modules:
        assert_close_to(out.relevance[mod], ref[mod.replace(".", "_")], TOL, R_L.abs().max().item(), mod)
    assert_close_to(out.relevance["input"], ref["input"], TOL, R_L.abs().max().item(), "input")


def test_naive_reference_is_discriminative():
    """Sanity of the comparison itself: the alternatives SPEC §2 rejects (max-pool shadow = the
    arg-max only, one path per input position) give relevance that differs by far more than TOL."""
    for name, block, wrong in [("pools", "act2", [[N.chain(N.window(1, 2, 0), N.window(3, 1, 1))]]),
                               ("cat", "silu", [[N.window(3, 1, 1)]])]:
        m, net, x = _build(name)
        L = N.encoder_output(net, x)
        R_L = torch.rand(x.shape[0], *L.shape[-2:], dtype=torch.float64) + 0.1
        out = srd_fx.compile(m, head=fixed_head(R_L))(x)
        for b in net.blocks:
            if b.name == block:
                b.shadow = wrong
        alt = N.propagate(net, x, R_L)["input"]
        assert (out.saliency - alt).abs().max().item() > 1e3 * TOL * R_L.max().item()


# ---------------------------------------------------------------------------------------------
# Default head: Grad-CAM based initial relevance (Eq. 4)
# ---------------------------------------------------------------------------------------------

def _eq4(net, x, target):
    """Eq. 4 written out: alpha^c_k = mean_i dy^c/dA^k_i for every class c (one autograd call
    per class), Phi^c = sum_k alpha^c_k A^k, R = max(Phi^t - mean_c Phi^c, 0)."""
    A = N.encoder_output(net, x).detach().requires_grad_(True)
    y = net.head(A)
    K = y.shape[1]
    phis = []
    for c in range(K):
        (g,) = torch.autograd.grad(y[:, c].sum(), A, retain_graph=True)
        alpha = g.mean((2, 3))                                   # (B, C)
        phis.append((alpha[:, :, None, None] * A).sum(1))        # (B, h, w)
    phi = torch.stack(phis, 1).detach()                           # (B, K, h, w)
    t = y.argmax(1) if target is None else torch.as_tensor(target).expand(x.shape[0])
    phi_t = phi[torch.arange(x.shape[0]), t]
    return F.relu(phi_t - phi.mean(1)), y.detach()


@pytest.mark.parametrize("name,target", [("resnet", None), ("pools", None), ("cat", "int"),
                                         ("strided", "tensor")])
def test_gradcam_head_matches_eq4(name, target):
    m, net, x = _build(name, batch=3)
    with torch.no_grad():
        y = m(x)
    if target == "int":        # the best class of sample 0, for the whole batch
        target = int(y[0].argmax())
    elif target == "tensor":   # the second-best class of every sample
        target = y.argsort(1)[:, -2]
    R_ref, logits = _eq4(net, x, target)
    assert R_ref.sum() > 0, "degenerate test case: all-zero Grad-CAM maps"
    out = srd_fx.compile(m, layers="all")(x, target=target)
    scale = R_ref.abs().max().item()
    assert_close_to(out.R_L, R_ref, TOL, scale, f"{name}/R_L")
    assert_close_to(out.relevance["low"], R_ref, TOL, scale, f"{name}/low")
    torch.testing.assert_close(out.logits, logits, rtol=1e-12, atol=1e-12)
    ref = N.propagate(net, x, R_ref)
    for layer, r in ref.items():
        assert_close_to(out.relevance[layer], r, TOL, scale, f"{name}/{layer}")


# ---------------------------------------------------------------------------------------------
# ERF: forward accumulation (Eq. 1) == backward pass seeded one-hot (Appendix C)
# ---------------------------------------------------------------------------------------------

def _one_hot_seeds(h, w):
    return torch.eye(h * w, dtype=torch.float64).reshape(h * w, h, w)


@pytest.mark.parametrize("name", ["resnet", "pools", "cat"])
def test_erf_forward_equals_backward(name):
    m, net, x = _build(name, batch=1)
    erf, per_block = N.erf_forward(net, x)
    E_L = erf[net.L]                                  # (h_L * w_L, H, W)
    hL, wL = N.encoder_output(net, x).shape[-2:]
    # One backward pass per PFV of L, as a batch of copies of x each seeded at its own position.
    seeds = _one_hot_seeds(hL, wL)
    xs = x.expand(hL * wL, -1, -1, -1).contiguous()
    out = srd_fx.compile(m, head=fixed_head(seeds))(xs)
    assert_close_to(out.saliency, E_L, TOL, 1.0, f"{name}/ERF(L)")

    # Non-degenerate norms everywhere: every ERF (and every block's mu over i) sums to 1.
    assert not any(info["degenerate"].any() for _, info in per_block), "degenerate test case"
    for _, (mus, _) in zip(net.blocks, per_block):
        torch.testing.assert_close(sum(mu.sum(1) for mu in mus),
                                   torch.ones(mus[0].shape[0], dtype=torch.float64), rtol=0, atol=1e-12)
    torch.testing.assert_close(out.saliency.sum((1, 2)), torch.ones(hL * wL, dtype=torch.float64),
                               rtol=0, atol=1e-12, msg="ERF sums of srd_fx")
    for layer, e in erf.items():
        torch.testing.assert_close(e.sum((1, 2)), torch.ones(e.shape[0], dtype=torch.float64),
                                   rtol=0, atol=1e-12, msg=f"ERF sums at {layer}")


@pytest.mark.parametrize("layer", ["act1", "act2"])
def test_erf_of_intermediate_layer(layer):
    """An ERF at an inner layer is the backward pass seeded there (encoder_output=<layer>)."""
    m, net, x = _build("plain", batch=1)
    erf, _ = N.erf_forward(net, x)
    seeds = _one_hot_seeds(8, 8)
    out = srd_fx.compile(m, head=fixed_head(seeds), encoder_output=layer)(x.expand(64, -1, -1, -1))
    assert_close_to(out.saliency, erf[layer], TOL, 1.0, f"ERF({layer})")
