"""The model-zoo runner: the CI subset of timm CNNs compiles and passes every check, and the
runner's own machinery (list derivation, failure classification, time limit) does what it says.

The subset is model_zoo_checks/ci_subset.txt (35 models, one per family, 64 px, float64); the full
sweep is `python -m model_zoo_checks --all --jobs 2` (see docs/zoo.md)."""
import math
import os
import multiprocessing as mp

import pytest
import timm
import torch
import torch.nn as nn

import srd_fx
from model_zoo_checks import lists, runner
from conftest import assert_zoo_pass

CI = lists.read_list(runner.CI_SUBSET)


# ----------------------------------------------------------------------------- the list
def test_every_timm_module_is_classified():
    assert lists.unclassified_modules() == [], (
        "timm has modules that model_zoo_checks/lists.py neither includes nor excludes; classify them")
    assert not set(lists.CNN_MODULES) & set(lists.NON_CNN_MODULES)


def test_default_list_is_the_cnn_modules_minus_exclusions():
    names = lists.default_models()
    assert len(names) == len(set(names))
    expected = {n for m in lists.CNN_MODULES for n in timm.list_models(module=m)} - set(lists.excluded_names())
    assert set(names) == expected
    assert set(lists.SEED_MODELS) <= set(names)
    for m in ("vision_transformer", "swin_transformer", "maxxvit", "mlp_mixer", "byoanet"):
        assert not set(timm.list_models(module=m)) & set(names), m
    for n in ("test_resnet", "resnet50_clip", "mobilenetv4_hybrid_medium"):
        assert n not in names
    # architecture names, not pretrained tags
    assert not any("." in n for n in names)
    assert len({lists.family_of(n, lists.module_of(n)) for n in names}) >= 40


def test_ci_subset_covers_enough_families():
    assert len(CI) >= 30 and len(set(CI)) == len(CI)
    assert set(CI) <= set(lists.default_models())
    assert len({lists.family_of(n, lists.module_of(n)) for n in CI}) >= 20


# ----------------------------------------------------------------------------- the subset
@pytest.fixture
def one_thread():
    # many small (depthwise) ops: one thread is faster than two fighting over a shared machine
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.mark.parametrize("name", CI)
def test_ci_model_passes_every_check(name, one_thread):
    rec = runner.check_model(name, runner.Options(threads=1))
    assert_zoo_pass(rec, name, min_layers=3)
    assert rec["times"]["compile_s"] > 0


# ----------------------------------------------------------------------------- the machinery
def test_build_redraws_switched_off_branches():
    raw = runner.build_model("resnet18", runner.Options(raw_init=True))
    new = runner.build_model("resnet18", runner.Options())
    # timm zero-initialises the last BN gamma of every residual block
    assert torch.count_nonzero(raw.layer1[0].bn2.weight) == 0
    assert torch.count_nonzero(new.layer1[0].bn2.weight) == new.layer1[0].bn2.weight.numel()
    # non-constant parameters (conv kernels) are timm's own
    assert torch.equal(raw.layer1[0].conv1.weight, new.layer1[0].conv1.weight)
    assert new.layer1[0].conv1.weight.dtype == torch.float64 and not new.training


class _Bilinear(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 4, 3, padding=1)
        self.b = nn.Conv2d(3, 4, 3, padding=1)
        self.fc = nn.Linear(4, 5)

    def forward(self, x):
        h = torch.relu(self.a(x)) / torch.relu(self.b(x))   # input-dependent divisor: not affine
        return self.fc(h.mean((2, 3)))


class _Branchy(nn.Module):
    def __init__(self):
        super().__init__()
        self.c = nn.Conv2d(3, 4, 3)

    def forward(self, x):
        if x.sum() > 0:      # data-dependent control flow: torch.fx cannot trace it
            x = -x
        return self.c(x).mean((2, 3))


def test_failures_are_classified_with_the_op():
    x = torch.randn(1, 3, 8, 8)
    with pytest.raises(srd_fx.UnsupportedOpError) as e:
        srd_fx.compile(_Bilinear().eval(), example_input=x)
    c = runner.classify_exception(e.value, "compile")
    assert c["category"] == "unsupported-op"
    assert c["op"].split(":")[0] in ("truediv", "operator.truediv", "<built-in function truediv>")
    with pytest.raises(srd_fx.TraceError) as e:
        srd_fx.compile(_Branchy().eval(), example_input=x)
    c = runner.classify_exception(e.value, "compile")
    assert c["category"] == "trace-error" and "TraceError" in c["reason"]
    c = runner.classify_exception(ValueError("boom"), "explain (batch of 2)")
    assert c["category"] == "exception" and c["reason"] == "explain (batch of 2): ValueError: boom"


def test_encoder_only_model_is_refused_by_srd_fx_by_name(one_thread):
    """A timm model that returns its tokens, not logits (as timm's '*_enc' encoders do): the sweep
    gives it to srd_fx, which refuses it with a named error that says what to do."""
    rec = runner.check_model("vit_tiny_patch16_224", runner.Options(threads=1),
                             dict(img_size=32, num_classes=0, global_pool=""))
    assert rec["status"] == "fail" and rec["category"] == "unsupported-op", rec
    assert "(1, 5, 192), not (batch, classes)" in rec["reason"] and "classification head" in rec["reason"]


def test_pool_kills_a_model_past_its_time_limit_and_goes_on():
    # 0.1 s is far less than a worker needs to import torch on any machine: both models must
    # time out, be recorded, and leave no worker process behind.
    recs = runner.run_models(["lcnet_035", "resnet10t"], runner.Options(timeout=0.1), jobs=1, progress=False)
    assert [r["model"] for r in recs] == ["lcnet_035", "resnet10t"]
    assert all(r["category"] == "timeout" and r["status"] == "fail" for r in recs)
    assert all(r["wall_s"] >= 0.1 for r in recs)
    assert mp.active_children() == []


def test_pool_runs_a_model_in_a_worker():
    recs = runner.run_models(["lcnet_035"], runner.Options(timeout=600), jobs=1, progress=False)
    assert len(recs) == 1 and recs[0]["status"] == "pass", recs[0]
    assert math.isfinite(recs[0]["times"]["compile_s"])
    assert recs[0]["fingerprint"] == runner.code_fingerprint(runner.Options(timeout=600))
    assert mp.active_children() == []


def test_cli_lists_the_ci_subset(capsys):
    from srd_fx.cli import main
    assert main(["zoo", "--ci-subset", "--list"]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    assert [l.split("\t")[0] for l in out] == CI


@pytest.mark.skipif(not os.path.exists("/proc/self/statm"), reason="no /proc on this system")
def test_memory_wait_counts_the_workers_own_heap():
    """A worker that checked a big model holds its heap for the next one: the memory it may use is
    MemAvailable plus its own resident memory (it used to wait for memory it held itself)."""
    held = torch.ones(64 * 2 ** 20, dtype=torch.float64)   # 512 MiB, touched
    with open("/proc/meminfo") as f:
        avail = next(float(l.split()[1]) * 1024 for l in f if l.startswith("MemAvailable:"))
    assert runner._mem_available() - avail > 0.9 * held.numel() * 8
