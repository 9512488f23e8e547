"""What a GPU would punish, checked on the CPU (issue 18): device-to-host syncs per call, constants
folded at build time (and refreshed when the weights change), and a twin that ``torch.compile``
captures as one graph and that computes the same maps."""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn as nn

import srd_fx
from srd_fx.eval.dispatch import OpCounter
from srd_fx.eval.models import small_resnet

REPO = Path(__file__).resolve().parents[2]


def _tiny_net():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(),
                        nn.Conv2d(4, 4, 3, stride=2, padding=1), nn.BatchNorm2d(4), nn.ReLU(),
                        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3))
    for m in net.modules():  # non-trivial running statistics
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
    return net.eval()


def _syncs(fn):
    with OpCounter() as c:
        fn()
    return c.syncs, c.sync_counts


@pytest.mark.parametrize("target", [None, 1, "tensor"])
def test_one_host_sync_by_default_and_none_with_check_false(target):
    m = small_resnet().eval()
    x = torch.randn(2, 3, 64, 64)
    t = torch.tensor([0, 3]) if target == "tensor" else target
    checked = srd_fx.compile(m, example_input=x[:1])
    fast = srd_fx.compile(m, example_input=x[:1], check=False)
    a, b = checked(x, t), fast(x, t)      # the first calls (nothing lazy left)
    n, which = _syncs(lambda: checked(x, t))
    assert n <= 1, f"the default call waits for the device {n} times: {dict(which)}"
    n, which = _syncs(lambda: fast(x, t))
    assert n == 0, f"check=False still waits for the device {n} times: {dict(which)}"
    assert torch.equal(a.saliency, b.saliency) and torch.equal(a.lost, b.lost)


def test_the_single_check_still_names_what_is_wrong():
    m = small_resnet().eval()
    x = torch.randn(2, 3, 64, 64)
    e = srd_fx.compile(m, example_input=x[:1])
    bad = x.clone()
    bad[1, 0, 3, 3] = float("nan")
    with pytest.raises(srd_fx.NonFiniteError, match="input"):
        e(bad)
    with pytest.raises(srd_fx.InputError, match="out of range"):
        e(x, torch.tensor([0, 10]))
    with pytest.raises(srd_fx.InputError, match="out of range"):
        e(x, 10)


def test_constants_are_folded_and_follow_the_weights():
    net = _tiny_net()
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    net = net.double()
    e = srd_fx.compile(net, example_input=x[:1])
    assert "bn_scale" not in e.code and "bn_shift" not in e.code and "srd_const" in e.code
    before = e(x).saliency
    with torch.no_grad():  # weights change after compile (a training step, load_state_dict)
        net[1].running_var.mul_(3.0)
        net[4].weight.add_(0.5)
        net[0].bias.add_(0.25)
    after = e(x).saliency
    fresh = srd_fx.compile(net, example_input=x[:1])(x).saliency
    assert not torch.allclose(before, after)
    torch.testing.assert_close(after, fresh, rtol=1e-12, atol=1e-14)


def test_generated_code_reads_like_a_backward():
    m = small_resnet().eval()
    code = srd_fx.compile(m, example_input=torch.zeros(1, 3, 64, 64)).code
    lines = code.splitlines()
    assert max(map(len, lines)) <= 200
    assert "# block: " in code and "srd.sharing(" in code and "srd.conv_T(" in code
    assert "srd_fx_" not in code and "rules_norm_" not in code  # one namespace: srd.
    blocks = [l for l in lines if l.strip().startswith("# block: ")]
    assert len(blocks) == len(srd_fx.compile(m, example_input=torch.zeros(1, 3, 64, 64)).activation_layers)


def _inductor_cpu_available():
    """Inductor compiles CPU kernels with the system's C++ compiler: probe it once."""
    try:
        f = torch.compile(lambda t: t * 2 + 1, fullgraph=True)
        return torch.equal(f(torch.ones(3)), torch.full((3,), 3.0)), ""
    except Exception as e:  # noqa: BLE001  (the reason to skip)
        return False, f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"


def test_torch_compile_captures_the_twin_whole_and_matches_eager():
    ok, why = _inductor_cpu_available()
    if not ok:
        pytest.skip(f"torch.compile (Inductor) cannot build CPU kernels here: {why}")
    import torch._dynamo as dynamo
    net = _tiny_net()
    x = torch.randn(2, 3, 8, 8)
    e = srd_fx.compile(net, example_input=x[:1])
    dynamo.reset()
    with torch.no_grad():  # as Explainer calls it (the parameters here require grad)
        explained = dynamo.explain(e.graph_module)(x, None)
    assert explained.graph_break_count == 0, [b.reason for b in explained.break_reasons]
    compiled = torch.compile(e.graph_module, fullgraph=True)
    with torch.no_grad():
        want, got = e.graph_module(x, None), compiled(x, None)
    assert bool(got["ok"])
    for k in ("logits", "saliency", "lost", "R_L"):
        torch.testing.assert_close(got[k], want[k], rtol=1e-5, atol=1e-5 * float(want[k].abs().max()))


def test_gpu_check_dry_run(tmp_path):
    """benchmarks/gpu_check.sh --device cpu --quick: the script a GPU run uses, end to end."""
    env = dict(os.environ, PYTHON=sys.executable, OMP_NUM_THREADS="1")
    r = subprocess.run(["bash", str(REPO / "benchmarks" / "gpu_check.sh"), "--device", "cpu", "--quick",
                        "--out", str(tmp_path)], capture_output=True, text=True, env=env, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    import json
    rows = json.loads((tmp_path / "gpu_check.json").read_text())
    done = [row for row in rows if "srd_s" in row]
    assert {(r["dtype"], r["mode"]) for r in done} == {(d, m) for d in ("float32", "bfloat16")
                                                        for m in ("eager", "compile")}
    assert all(r["map_ok"] for r in done)
