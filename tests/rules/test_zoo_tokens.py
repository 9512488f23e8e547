"""The zoo beyond CNNs: the groups cover every timm architecture exactly once, the token CI subset
(model_zoo_checks/ci_tokens.txt: real timm token models from different timm modules, random
weights, float64, small inputs) passes every check of the sweep, and a report written from a
partial run keeps the committed results of the other groups.

The subset lists the token models that passed on main when it was last updated; a listed model
that stops passing fails here.  The full sweep: `python -m model_zoo_checks --all --groups tokens`."""
import json

import pytest
import timm
import torch
import torch.nn as nn

import srd_fx
from model_zoo_checks import lists, runner
from conftest import assert_zoo_pass

CI_TOKENS = [lists.parse_entry(line) for line in lists.read_list(runner.CI_TOKENS)]


# ----------------------------------------------------------------------------- the groups
def test_groups_cover_every_timm_architecture_once():
    every = timm.list_models()
    assert sorted(lists.models_of(lists.GROUPS)) == sorted(every)
    assert set(lists.models_of(["cnn"])) == set(lists.default_models())
    sizes = {g: len(lists.models_of([g])) for g in lists.GROUPS}
    assert sum(sizes.values()) == len(every)          # disjoint
    assert all(sizes[g] > 0 for g in lists.GROUPS)
    assert len(lists.models_of(lists.TOKEN_GROUPS)) == len(every) - len(lists.default_models())
    with pytest.raises(ValueError):
        lists.models_of(["transformers"])


@pytest.mark.parametrize("name,group", [
    ("resnet50", "cnn"), ("vit_small_patch16_224", "transformer"), ("swin_tiny_patch4_window7_224", "transformer"),
    ("deit_small_patch16_224", "transformer"), ("coatnet_0_rw_224", "hybrid"), ("mobilevit_s", "hybrid"),
    ("resnet50_clip", "hybrid"), ("mobilenetv4_hybrid_medium", "hybrid"), ("mixer_b16_224", "mlp"),
    ("gmlp_s16_224", "mlp"), ("poolformer_s12", "other"), ("sequencer2d_s", "other"), ("test_vit", "other"),
    ("test_resnet", "other"),
])
def test_group_of(name, group):
    assert lists.group_of(name) == group


def test_token_families_are_timm_modules():
    for n in lists.models_of(lists.TOKEN_GROUPS):
        fam, mod = lists.family_of(n, lists.module_of(n)), lists.module_of(n)
        assert fam in (mod, lists.TEST_CONFIG_FAMILY, f"{mod} (attention variants)"), (n, fam, mod)
    # CNN families are unchanged by the token groups
    assert lists.family_of("resnet50", "resnet") == "ResNet"
    assert lists.family_of("vgg16", "vgg") == "VGG"


def test_cli_selects_groups(capsys):
    from srd_fx.cli import main
    assert main(["zoo", "--groups", "mlp", "--all", "--list"]) == 0
    out = [line.split("\t") for line in capsys.readouterr().out.strip().splitlines()]
    assert [r[0] for r in out] == lists.models_of(["mlp"])
    assert {r[2] for r in out} == {"mlp_mixer"}


def test_cli_sample_is_smallest_plus_seeded_draw(capsys):
    from srd_fx.cli import main
    argv = ["zoo", "--groups", "mlp", "--sample", "1", "--sample-random", "2", "--list"]
    assert main(argv) == 0
    first = [line.split("\t")[0] for line in capsys.readouterr().out.strip().splitlines()]
    assert main(argv) == 0
    again = [line.split("\t")[0] for line in capsys.readouterr().out.strip().splitlines()]
    assert first == again and len(set(first)) == 3     # seeded: the same draw
    counts = {n: runner.count_params_meta(n) for n in lists.models_of(["mlp"])}
    assert counts[first[0]] == min(counts.values())


# ----------------------------------------------------------------------------- the token CI subset
def test_ci_tokens_subset_spans_timm_modules():
    names = [n for n, _ in CI_TOKENS]
    assert len(names) == len(set(names)) >= 15
    assert all(lists.group_of(n) in lists.TOKEN_GROUPS for n in names)
    assert len({lists.module_of(n) for n in names}) == len(names)   # one per timm module


@pytest.mark.parametrize("name,kwargs", CI_TOKENS, ids=[n for n, _ in CI_TOKENS])
def test_ci_token_model_passes_every_check(name, kwargs):
    rec = runner.check_model(name, runner.Options(threads=1), kwargs)
    assert_zoo_pass(rec, name, min_layers=2)


# ----------------------------------------------------------------------------- the checks themselves
def test_orientation_check_catches_a_transposed_map():
    net = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 4, 3, padding=1), nn.ReLU(),
                        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3)).double().eval()
    x = torch.randn(2, 3, 6, 10, dtype=torch.float64)      # H != W: a transpose shows
    out = srd_fx.compile(net, example_input=x[:1])(x)
    assert runner.orientation_errors(out, x) == []
    out.saliency = out.saliency.transpose(1, 2)
    assert any("saliency" in e for e in runner.orientation_errors(out, x))


def test_named_srd_errors_and_raw_exceptions_are_told_apart():
    c = runner.classify_exception(srd_fx.InputError("bad rank"), "compile")
    assert c["category"] == "srd-error" and c["op"] == "InputError"
    c = runner.classify_exception(RuntimeError("The expanded size of the tensor"), "explain (batch of 2)")
    assert c["category"] == "exception" and "RuntimeError" in c["reason"]
    assert "bug" in runner.CATEGORY_HELP["exception"]


def test_report_from_a_partial_run_keeps_the_committed_records(tmp_path):
    from model_zoo_checks import report
    committed = json.loads(runner.REPORT_JSON.read_text())
    before = {r["model"]: r for r in committed["records"]}
    (tmp_path / "report.json").write_text(runner.REPORT_JSON.read_text())
    rec = runner.check_model("test_vit", runner.Options(threads=1))      # a real record of the "other" group
    rec["fingerprint"] = "f" * 16
    report.write_report(["test_vit"], {"test_vit": rec}, fingerprint="f" * 16, command="a partial run",
                        meta={}, md_path=tmp_path / "REPORT.md", json_path=tmp_path / "report.json")
    after = json.loads((tmp_path / "report.json").read_text())
    recs = {r["model"]: r for r in after["records"]}
    assert set(before) | {"test_vit"} == set(recs)
    assert all(recs[n] == before[n] for n in before if n != "test_vit")
    assert recs["test_vit"]["status"] == rec["status"]
    assert after["meta"]["groups"]["other"]["command"] == "a partial run"
    cnn = committed["summary"] if "summary_by_group" not in committed else committed["summary_by_group"]["cnn"]
    assert after["summary_by_group"]["cnn"]["passed"] == cnn["passed"]
    md = (tmp_path / "REPORT.md").read_text()
    assert "## Summary by group" in md and "## Token groups" in md
    for g in lists.GROUPS:
        assert f"| {g} |" in md
