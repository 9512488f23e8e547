"""experiments/fidelity_protocol.py: every input size is scored on the model trained at that size (or,
with --train-size, on one size's model), with per-size training settings, and the CSV says which."""
import csv
import math

import numpy as np
import pytest

from conftest import experiment_module
from srd_fx.errors import OptionError
from srd_fx.eval import data as D
from srd_fx.eval.train import accuracy, cached_record, get_trained

TRAIN = ["--train-setting", "epochs=1", "--train-setting", "n_train=64", "--train-setting", "n_test=16",
         "--train-setting", "48:seed=1"]
KW = {32: dict(epochs=1, n_train=64, n_test=16), 48: dict(epochs=1, n_train=64, n_test=16, seed=1)}


@pytest.fixture(scope="module")
def fp():
    return experiment_module("fidelity_protocol")


def run(fp, out, cache, *extra):
    fp.main(["--models", "resnet", "--n-images", "4", "--batch-size", "4", "--nr-runs", "2", "--fractions", "0.05",
             "--baselines", "zero", "--units", "pixel", "--protocols", "paper", "--cache-dir", str(cache),
             "--out", str(out), *TRAIN, *extra])
    return fp.read_rows(str(out / "fidelity_protocol.csv"))[0]


def test_train_settings_apply_to_all_sizes_or_one(fp):
    items = ["seed=3", "32:epochs=1", "48:epochs=2"]
    assert fp.train_settings(items, 32) == {"seed": 3, "epochs": 1}
    assert fp.train_settings(items, 64) == {"seed": 3}
    with pytest.raises(OptionError, match="SIZE an integer"):
        fp.train_settings(["x:epochs=1"], 32)
    with pytest.raises(OptionError, match="KEY in"):
        fp.train_settings(["32:bogus=1"], 32)
    with pytest.raises(SystemExit):   # checked before any training or scoring
        fp.main(["--sizes", "32", "--train-setting", "32:epochs=many", "--out", "unused"])


def test_each_size_is_scored_on_its_own_model(fp, tmp_path):
    cache = tmp_path / "cache"
    rows = run(fp, tmp_path / "native", cache, "--sizes", "32", "48")
    for size in (32, 48):
        mine = [r for r in rows if r["size"] == size]
        assert len(mine) == 2 * len(fp.METHODS)   # one sweep cell and the paper protocol
        model, _ = get_trained("resnet", "relu", size=size, cache_dir=str(cache), progress=False, **KW[size])
        images, labels, _ = D.DigitScenes("test", size=size, n=4, seed=0).tensors()
        assert {(r["train_size"], r["train_epochs"], r["accuracy"]) for r in mine} == \
            {(size, 1, round(accuracy(model, images, labels), 4))}
        assert all(math.isfinite(r["fidelity"]) and r["n_images"] == 4 for r in mine)
        assert cached_record("resnet", "relu", size=size, cache_dir=str(cache), **KW[size])["settings"]["seed"] == \
            KW[size].get("seed", 0)
    # the partial CSV, rewritten after every batch, ends equal to the final one
    assert (tmp_path / "native" / "fidelity_protocol.partial.csv").read_text() == \
        (tmp_path / "native" / "fidelity_protocol.csv").read_text()
    # the side-by-side table: the sweep cell at 32 and at 48 px, each size's own numbers
    ixg = {r["size"]: r["fidelity"] for r in rows if r["setting"] == "sweep" and r["method"] == "InputXGradient"}
    side = [l for l in (tmp_path / "native" / "fidelity_protocol.md").read_text().splitlines()
            if l.startswith("| ResNet | pixel | zero | 5 % |")]
    assert len(side) == 1
    cols = [c.strip() for c in side[0].split("|")]
    assert (cols[5], cols[10]) == ("4/2", "4/2")
    assert float(cols[6]) == pytest.approx(ixg[32], abs=5e-4) and float(cols[11]) == pytest.approx(ixg[48], abs=5e-4)
    n_cached = len(list(cache.iterdir()))
    assert n_cached == 4   # two models, weights and record each

    # --train-size: the 32-px model on the 48-px scenes; nothing new is trained
    rows = run(fp, tmp_path / "cross", cache, "--sizes", "48", "--train-size", "32")
    model, _ = get_trained("resnet", "relu", size=32, cache_dir=str(cache), progress=False, **KW[32])
    images, labels, _ = D.DigitScenes("test", size=48, n=4, seed=0).tensors()
    assert {(r["size"], r["train_size"], r["accuracy"]) for r in rows} == \
        {(48, 32, round(accuracy(model, images, labels), 4))}
    assert len(list(cache.iterdir())) == n_cached

    # merging keeps the two 48-px runs apart; the table lists each model once
    fp.merge([str(tmp_path / "native" / "fidelity_protocol.csv"), str(tmp_path / "cross" / "fidelity_protocol.csv")],
             str(tmp_path / "merged"))
    md = (tmp_path / "merged" / "fidelity_protocol.md").read_text()
    assert sum(l.startswith("| ResNet | 48 | 32 | 1 | 4 |") for l in md.splitlines()) == 1
    assert sum(l.startswith("| ResNet | 48 | 48 | 4 | 2 | paper |") for l in md.splitlines()) == 1
    assert sum(l.startswith("| ResNet | 48 | 32 | 4 | 2 | paper |") for l in md.splitlines()) == 1


def test_csv_without_train_size_reads_as_the_64px_models(fp, tmp_path):
    """CSVs written before the train_size column were all scored on the standard 64-px models."""
    path = tmp_path / "fidelity_protocol.csv"
    fields = [f for f in fp.FIELDS if f not in ("train_size", "train_epochs")]
    row = dict(model="VGG", size=224, accuracy=0.1, setting="paper", unit="pixel", baseline="zero", fraction="",
               clamp=True, subset_size=200, subset_percent=0.4, method="SRD-low", fidelity=0.05, sem=0.01,
               n_images=20, n_nan=0, nr_runs=10)
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields)
        w.writeheader()
        w.writerow(row)
    (tmp_path / "fidelity_protocol.md").write_text("Command: `old`\n")
    rows, commands = fp.read_rows(str(path))
    assert (rows[0]["train_size"], rows[0]["train_epochs"], commands) == (64, 12, ["old"])


def test_one_factor_at_a_time_design_visits_every_level_once(fp):
    """--center: the center cell plus, per axis, each other level with the other axes at the center's;
    without it, the full factorial."""
    fr, bs, us = fp.FRACTIONS, list(fp.BASELINES), list(fp.UNITS)
    center = fp.parse_center("pixel:zero:0.0045")
    cells = fp.design_cells(fr, bs, us, center)
    assert cells[0] == center and len(set(cells)) == len(cells) == 1 + (len(fr) - 1) + (len(bs) - 1) + (len(us) - 1)
    assert all(sum(a != b for a, b in zip(c, center)) == 1 for c in cells[1:])
    for axis, levels in enumerate((us, bs, fr)):
        assert {c[axis] for c in cells} == set(levels)
    assert sorted(fp.design_cells(fr, bs, us)) == sorted((u, b, f) for u in us for b in bs for f in fr)
    labels = [lab for lab, _ in fp.settings_list(fr, bs, us, ["paper"], center)]
    assert [(l["unit"], l["baseline"], l["fraction"]) for l in labels[:-1]] == cells and labels[-1]["setting"] == "paper"
    for bad in ("pixel:zero", "pixel:black:0.01", "voxel:zero:0.01", "pixel:zero:2"):
        with pytest.raises(OptionError, match="--center"):
            fp.parse_center(bad)
    with pytest.raises(SystemExit):   # refused before any training or scoring
        fp.main(["--center", "pixel:zero", "--out", "unused"])


def test_image_ranges_score_as_one_run_and_merge_into_it(fp, tmp_path):
    """--images A:B scores those images with the batches (and random subsets) of a run over all of them:
    two adjacent ranges merged give the whole run's rows (mean and standard error up to the CSV's
    rounding, accuracy and image count exactly); a range off the batch grid is refused."""
    cache = tmp_path / "cache"
    args = ("--sizes", "32", "--n-images", "8", "--fractions", "0.05", "0.2")
    full = run(fp, tmp_path / "full", cache, *args)
    head = run(fp, tmp_path / "head", cache, *args, "--images", ":4")
    tail = run(fp, tmp_path / "tail", cache, *args, "--images", "4:")
    assert {r["first_image"] for r in full + head} == {0} and {r["first_image"] for r in tail} == {4}
    assert {r["n_images"] for r in head + tail} == {4}
    model, _ = get_trained("resnet", "relu", size=32, cache_dir=str(cache), progress=False, **KW[32])
    images, labels, _ = D.DigitScenes("test", size=32, n=8, seed=0).tensors()
    assert {r["accuracy"] for r in tail} == {round(accuracy(model, images[4:], labels[4:]), 4)}
    fp.merge([str(tmp_path / "head" / "fidelity_protocol.csv"), str(tmp_path / "tail" / "fidelity_protocol.csv")],
             str(tmp_path / "merged"))
    merged = fp.read_rows(str(tmp_path / "merged" / "fidelity_protocol.csv"))[0]
    assert len(merged) == len(full) == 3 * len(fp.METHODS)
    key = lambda r: (r["setting"], r["fraction"], r["method"])
    by = {key(r): r for r in merged}
    for r in full:
        m = by[key(r)]
        assert (m["n_images"], m["first_image"], m["accuracy"], m["n_nan"]) == \
            (r["n_images"], 0, r["accuracy"], r["n_nan"])
        assert m["fidelity"] == pytest.approx(r["fidelity"], abs=2e-5) and m["sem"] == pytest.approx(r["sem"], abs=2e-5)
    # the ranges differ in their scores (the pooling is not a copy of one part)
    assert any(h["fidelity"] != t["fidelity"] for h, t in zip(head, tail))
    # overlapping or non-adjacent ranges stay apart
    kept = fp.join_ranges(full + tail)
    assert len(kept) == len(full) + len(tail)
    for bad in ("2:6", "4:4", "0:9", "x:4", "4"):
        with pytest.raises(OptionError, match="--images"):
            fp.parse_images(bad, 8, 4)


def test_pooled_mean_and_standard_error_match_numpy():
    fp_ = experiment_module("fidelity_protocol")
    rng = np.random.default_rng(0)
    parts = [rng.normal(size=k) for k in (1, 5, 12)]
    stats = [(len(p), p.mean(), p.std(ddof=1) / np.sqrt(len(p)) if len(p) > 1 else float("nan")) for p in parts]
    allv = np.concatenate(parts)
    mean, sem = fp_.pool(stats + [(0, float("nan"), float("nan"))])
    assert mean == pytest.approx(allv.mean(), rel=1e-12)
    assert sem == pytest.approx(allv.std(ddof=1) / np.sqrt(len(allv)), rel=1e-12)
