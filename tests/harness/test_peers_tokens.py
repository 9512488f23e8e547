"""model_zoo_checks.peers_tokens's map worker gives LXT's own maps (regression: the worker once let the
garbage collector undo LXT's patches before the call, so AttnLRP and CP-LRP both came out as plain
input x gradient)."""
import pytest
import torch

pytest.importorskip("lxt")
pytest.importorskip("zennit")

from model_zoo_checks import peers_tokens
from model_zoo_checks.runner import Options, build_model, pick_input
from srd_fx.eval import lxt_patches

MODEL = "deit_tiny_patch16_224"


@pytest.fixture(scope="module")
def case():
    opts = Options()
    model = build_model(MODEL, opts)
    x, ref = pick_input(model, opts)
    return model, x[:1], ref[:1].argmax(1)


@pytest.mark.parametrize("variant", lxt_patches.VARIANTS)
def test_map_worker_gives_lxts_map(case, variant):
    model, x, t = case
    rec = peers_tokens.map_worker(MODEL, f"lxt_{variant}")
    assert rec["produced"] and rec["finite"]
    expected = float(lxt_patches.relevance(model, x, t, variant).sum())
    assert rec["sum_R_input"] == pytest.approx(expected, rel=1e-9, abs=1e-12)
    with torch.enable_grad():
        xr = x.detach().clone().requires_grad_(True)
        model(xr).gather(1, t[:, None]).sum().backward()
    plain = float((xr * xr.grad).sum())
    assert abs(rec["sum_R_input"] - plain) > 1e-6 * abs(plain), "LXT's patches did not act: plain input x gradient"
