import importlib.util
import pathlib

import pytest
import torch


def pytest_addoption(parser):
    parser.addoption("--slow", action="store_true", default=False, help="run slow tests (full sweeps)")


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: long-running checks, run with --slow")


def pytest_collection_modifyitems(config, items):
    if config.getoption("--slow"):
        return
    skip = pytest.mark.skip(reason="slow: run with --slow")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True, scope="session")
def _one_thread():
    """One torch thread for the whole suite: its tensors are small, and on a shared 2-core
    machine extra threads only add contention (several times slower)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


# ----------------------------------------------------------------------------- shared helpers
# (imported by the test modules: ``from conftest import fixed_head, ...``)
def fixed_head(R_L, seen=None):
    """A head that hands the backward the given initial relevance ``R_L`` (B, h, w); the encoder
    outputs it is shown are appended to ``seen``."""
    def head(A, logits, target):
        if seen is not None:
            seen.append(A.detach().clone())
        return R_L
    return head


def conservation_error(out):
    """|sum saliency + lost - sum R_L| / sum |R_L|, worst sample of an SRDOutput."""
    lost = out.lost if out.lost is not None else torch.zeros_like(out.R_L[:, 0, 0])
    num = (out.saliency.sum((1, 2)) + lost - out.R_L.sum((1, 2))).abs()
    return (num / out.R_L.abs().sum((1, 2)).clamp_min(1e-300)).max().item()


def assert_close_to(got, ref, tol, scale, what):
    """Same shape and max |got - ref| <= tol * scale."""
    assert got.shape == ref.shape, f"{what}: shape {tuple(got.shape)} != {tuple(ref.shape)}"
    err = (got - ref).abs().max().item()
    assert err <= tol * scale, f"{what}: max |srd_fx - naive| = {err:.3e} > {tol:g} * {scale:.3e}"
    return err


def naive_agreement(model, net, x, R_L, tol, **options):
    """Explain ``x`` with srd_fx from the initial relevance ``R_L`` and compare the input map and
    every activation layer's map with the naive reference ``net`` (tests/naive_srd.py), pairing
    the layers in order.  Returns (SRDOutput, worst error / scale)."""
    import naive_srd as N
    import srd_fx
    e = srd_fx.compile(model, head=fixed_head(R_L), layers="all", **options)
    out = e(x)
    ref = N.propagate(net, x, R_L)
    names = [b.name for b in net.blocks]
    assert len(e.activation_layers) == len(names), (e.activation_layers, names)
    scale = max(max(t.abs().max().item() for t in ref.values()), 1e-300)
    worst = 0.0
    for got, want in [("input", "input")] + list(zip(e.activation_layers, names)):
        worst = max(worst, assert_close_to(out.relevance[got], ref[want], tol, scale, got) / scale)
    return out, worst


def layer_by_layer(model, net, x, L, logits, tol, name, conserve_rtol=1e-10):
    """The strict agreement check against the naive reference ``net``: same activation layers
    (by name), same encoder output ``L``, the model's ``logits``, and every layer's map, the input
    map and R_L within ``tol`` of the scale of a random R_L; the reference itself conserves.
    Returns (SRDOutput, R_L)."""
    import naive_srd as N
    import srd_fx
    R_L = torch.rand(x.shape[0], *L.shape[-2:], dtype=torch.float64) + 0.1
    seen = []
    explainer = srd_fx.compile(model, head=fixed_head(R_L, seen), layers="all")
    out = explainer(x)
    assert explainer.activation_layers == [b.name for b in net.blocks]
    assert explainer.encoder_output == net.L
    torch.testing.assert_close(seen[-1], L, rtol=0, atol=1e-12)
    assert torch.equal(out.logits, logits), "logits differ from model(x)"
    ref = N.propagate(net, x, R_L)
    scale = R_L.abs().max().item()
    assert set(ref) <= set(out.relevance), sorted(set(ref) - set(out.relevance))
    for layer, r in ref.items():
        assert_close_to(out.relevance[layer], r, tol, scale, f"{name}/{layer}")
    assert_close_to(out.saliency, ref["input"], tol, scale, f"{name}/saliency")
    assert_close_to(out.R_L, R_L, tol, scale, f"{name}/R_L")
    # the reference conserves relevance: sum over the input == sum over L
    torch.testing.assert_close(ref["input"].sum((1, 2)), R_L.sum((1, 2)), rtol=conserve_rtol, atol=0)
    return out, R_L


def assert_zoo_pass(rec, name, min_layers):
    """A zoo runner record (model_zoo_checks.runner.check_model) that passed every check."""
    from model_zoo_checks import runner
    assert rec["status"] == "pass", f"{name}: [{rec['category']}] {rec['reason']}\n{rec.get('detail') or ''}"
    m = rec["metrics"]
    assert m["logits_rel_err"] <= runner.LOGITS_TOL
    assert m["conservation_rel_err"] <= runner.CONSERVATION_TOL
    assert m["batch_rel_err"] <= runner.BATCH_TOL
    assert m["n_maps"] >= 3 and rec["n_layers"] >= min_layers


def experiment_module(name):
    """The script ``experiments/<name>.py`` imported as a module (experiments/ is not a package)."""
    path = pathlib.Path(__file__).resolve().parents[1] / "experiments" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod
