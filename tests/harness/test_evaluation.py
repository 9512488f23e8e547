"""The harness: evaluate(), the tables and figure, cached training, and `srd-fx evaluate`."""
import csv
import io
import json
import math
import os

import numpy as np
import pytest
import torch
from PIL import Image

from srd_fx.eval import data as D
from srd_fx.eval import evaluation as E
from srd_fx.eval import metrics as M
from srd_fx.eval import train as T
from srd_fx.cli import main
from srd_fx.eval.models import build


SIZE = 32


@pytest.fixture(scope="module")
def setup():
    torch.manual_seed(0)
    model = build("resnet", "relu", size=SIZE).eval()
    images, labels, masks = D.DigitScenes("test", size=SIZE, n=4, seed=0).tensors()
    return model, images, labels, masks


def test_evaluate_scores_every_method_and_metric(setup):
    model, images, labels, masks = setup
    st = M.MetricSettings(fidelity_runs=5, stability_samples=2)
    times = {}
    res = E.evaluate(model, images, labels, masks, methods=["Saliency", "GradCAM", "SRD-input"], settings=st,
                     batch_size=2, progress=False, timings=times)
    assert list(res) == ["Saliency", "GradCAM", "SRD-input"] and set(times) == set(res)
    for meth, d in res.items():
        assert list(d) == list(M.METRIC_NAMES)
        for k, v in d.items():
            assert v.shape == (4,), (meth, k)
        ok = lambda v: v[np.isfinite(v)]
        assert set(ok(d["Pointing"]).tolist()) <= {0.0, 1.0}
        assert np.all((ok(d["Attribution"]) >= 0) & (ok(d["Attribution"]) <= 1))
        assert np.all((ok(d["Sparseness"]) >= 0) & (ok(d["Sparseness"]) <= 1))
        assert np.all(np.abs(ok(d["Fidelity"])) <= 1 + 1e-9)
        assert np.all(ok(d["Stability"]) >= 0)
    # the pipeline is: normalise the images, run the method, prepare the map, score with Quantus
    x = D.normalize(images[:2])
    a = M.prepare(E.B.get_method("SRD-input")(model, x, labels[:2]), x.shape[-2:])
    direct = M.attribution_localisation(model, x, labels[:2], a, masks[:2])
    assert np.allclose(res["SRD-input"]["Attribution"][:2], direct, equal_nan=True)


def test_evaluate_rejects_bad_input(setup):
    model, images, labels, masks = setup
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        E.evaluate(model, D.normalize(images), labels, masks, methods=["GradCAM"], progress=False)
    with pytest.raises(ValueError, match="must match"):
        E.evaluate(model, images, labels[:3], masks, methods=["GradCAM"], progress=False)
    with pytest.raises(KeyError, match="metric"):
        E.evaluate(model, images, labels, masks, methods=["GradCAM"], metrics=["Faithfulness"], progress=False)


def _fake():
    """Hand-made scores: method -> metric -> per-image values with known means."""
    def sc(p, a, s, f, st):
        return {"Pointing": np.array([p, p]), "Attribution": np.array([a, a]), "Sparseness": np.array([s, s]),
                "Fidelity": np.array([f - 0.01, f + 0.01]), "Stability": np.array([st, np.nan])}
    return {"m1": {"GradCAM": sc(1.0, 0.2, 0.3, 0.10, 0.5), "SRD-input": sc(0.5, 0.6, 0.7, 0.30, 0.1),
                   "Saliency": sc(0.0, 0.4, 0.9, 0.20, 0.9)}}


def test_table2_marks_best_and_second_per_column():
    md = E.table2_markdown(_fake(), n_images=2)
    rows = {line.split("|")[1].strip(): [c.strip() for c in line.split("|")[2:-1]]
            for line in md.splitlines() if line.startswith("| ") and "Method" not in line}
    assert rows["GradCAM†"] == ["**1.000**", ".200", ".300", ".100", "<ins>.500</ins>"]
    assert rows["SRD-input"] == ["<ins>.500</ins>", "**.600**", "<ins>.700</ins>", "**.300**", "**.100**"]
    assert rows["Saliency"] == [".000", "<ins>.400</ins>", "**.900**", "<ins>.200</ins>", ".900"]
    assert "m1 Sta.↓" in md and "2 test images" in md
    ranks = E.ranks_of(_fake())
    assert ranks[("m1", "Fidelity")] == {"rank": 1, "method": "SRD-input", "best": "SRD-input", "n_methods": 3}
    assert ranks[("m1", "Pointing")]["rank"] == 2


def test_table2_merges_a_csv_of_other_models():
    """`evaluate --merge-table2`: a table rebuilt from an earlier run's CSV (models with other
    methods, e.g. the CNNs) plus this run's scores equals the table of both runs scored at once."""
    rng = np.random.default_rng(0)
    cnn = {m: {k: rng.random(4) for k in M.METRIC_NAMES} for m in ("Saliency", "GradCAM", "SRD-input")}
    vit = {m: {k: rng.random(4) for k in M.METRIC_NAMES} for m in ("AttnLRP", "SRD-input")}
    both = E.table2_markdown({"ResNet (ReLU)": cnn, "ViT (GELU)": vit}, n_images=4)
    old, acc = E.read_results_csv(E.results_csv({"ResNet (ReLU)": cnn}, {"ResNet (ReLU)": 0.877}))
    assert acc == {"ResNet (ReLU)": 0.877}
    merged = {**old, "ViT (GELU)": E.summarise(vit)}
    assert E.table2_markdown(merged, n_images=4, summarised=True) == both
    assert "| AttnLRP | - | - | - | - | - |" in both  # a method the CNN run did not score
    again = E.results_csv(merged, {"ResNet (ReLU)": 0.877}, summarised=True)
    assert E.read_results_csv(again)[0] == E.read_results_csv(
        E.results_csv({"ResNet (ReLU)": cnn, "ViT (GELU)": vit}, {"ResNet (ReLU)": 0.877}))[0]


def test_table4_and_csv():
    res = {"ReLU": _fake()["m1"], "ELU": {k: {m: -v for m, v in d.items()} for k, d in _fake()["m1"].items()}}
    md = E.table4_markdown(res, {"ReLU": 0.9, "ELU": 0.85})
    assert "| Method | ReLU | ELU |" in md
    assert "| SRD-input | **.300** | -.300 |" in md
    assert "| *test accuracy* | 0.900 | 0.850 |" in md
    rows = list(csv.DictReader(io.StringIO(E.results_csv(res, {"ReLU": 0.9, "ELU": 0.85}))))
    assert len(rows) == 2 * 3 * 5
    r = next(r for r in rows if r["model"] == "ReLU" and r["method"] == "SRD-input" and r["metric"] == "Stability")
    assert float(r["mean"]) == pytest.approx(0.1) and r["n"] == "1" and r["n_nan"] == "1"
    assert r["resolution"] == "input" and r["test_accuracy"] == "0.9000"


def test_figure_grid(setup, tmp_path):
    model, images, labels, masks = setup
    fig = E.plot_maps(model, images[:2], labels[:2], masks[:2], methods=["GradCAM", "SRD-high"])
    assert len(fig.axes) == 2 * 3
    path = tmp_path / "fig.png"
    fig.savefig(path, dpi=50)
    assert Image.open(path).size[0] > 50


def test_get_trained_caches_on_disk(tmp_path, monkeypatch):
    kw = dict(epochs=1, n_train=64, n_test=32, batch_size=32)
    model, acc = T.get_trained("vgg", "relu", size=SIZE, cache_dir=str(tmp_path), progress=False, **kw)
    assert not model.training and 0.0 <= acc <= 1.0
    files = sorted(os.listdir(tmp_path))
    assert len(files) == 2 and files[0].startswith("vgg-relu-32-")
    rec = T.cached_record("vgg", "relu", size=SIZE, cache_dir=str(tmp_path), **kw)
    assert rec["test_accuracy"] == acc and rec["settings"]["n_train"] == 64
    # the test accuracy is the model's accuracy on the test scenes
    xte, yte, _ = D.DigitScenes("test", size=SIZE, n=32, seed=0).tensors()
    assert T.accuracy(model, xte, yte) == pytest.approx(acc)
    # a second call loads the same weights without training (the record is not rewritten)
    mtime = os.path.getmtime(tmp_path / files[1])
    again, acc2 = T.get_trained("vgg", "relu", size=SIZE, cache_dir=str(tmp_path), progress=False, **kw)
    assert acc2 == acc and os.path.getmtime(tmp_path / files[1]) == mtime
    for p, q in zip(model.state_dict().values(), again.state_dict().values()):
        assert torch.equal(p, q)
    # $SRD_FX_CACHE is the default location
    monkeypatch.setenv("SRD_FX_CACHE", str(tmp_path))
    assert T.resolve_cache_dir() == str(tmp_path) and T.resolve_cache_dir("/x") == "/x"
    with pytest.raises(TypeError, match="unknown training settings"):
        T.get_trained("vgg", "relu", cache_dir=str(tmp_path), epoch=3)
    with pytest.raises(ValueError, match="activation"):
        T.get_trained("resnet", "softsign", cache_dir=str(tmp_path))


def test_fine_tuning_starts_from_the_model_of_another_size(tmp_path):
    """init_size=N: training starts from the (cached) model trained at N px on the same data settings
    with N's own recipe; the parent is part of the cache key; without init_size the key is unchanged."""
    data = dict(n_train=64, n_test=16, batch_size=32)
    assert T.settings("resnet", "relu", 32, init_size=0, **data) == T.settings("resnet", "relu", 32, **data)
    assert T.parse_train_settings(["init_size=16"]) == {"init_size": 16}
    parent, _ = T.get_trained("resnet", "relu", size=16, cache_dir=str(tmp_path), progress=False, **data)
    files = sorted(os.listdir(tmp_path))
    mtimes = [os.path.getmtime(tmp_path / f) for f in files]
    # a learning rate so small that the weights cannot move: they must be the parent's
    kw = dict(epochs=1, lr=1e-12, weight_decay=0.0, init_size=16, **data)
    child, _ = T.get_trained("resnet", "relu", size=32, cache_dir=str(tmp_path), progress=False, **kw)
    assert [os.path.getmtime(tmp_path / f) for f in files] == mtimes     # the parent came from the cache
    assert len(os.listdir(tmp_path)) == 4
    rec = T.cached_record("resnet", "relu", size=32, cache_dir=str(tmp_path), **kw)
    assert rec["settings"]["init_from"] == T.cache_key(T.settings("resnet", "relu", 16, **data))
    scratch = T.train("resnet", "relu", 32, progress=False, **{k: v for k, v in kw.items() if k != "init_size"})[0]
    convs = [k for k, v in parent.state_dict().items() if k.endswith("weight") and v.dim() == 4]
    for k in convs:
        assert torch.allclose(child.state_dict()[k], parent.state_dict()[k], atol=1e-9), k
        assert not torch.allclose(scratch.state_dict()[k], parent.state_dict()[k], atol=1e-3), k
    with pytest.raises(ValueError, match="own size"):
        T.settings("resnet", "relu", 32, init_size=32)
    with pytest.raises(ValueError, match="position embeddings"):
        T.settings("vit", "gelu", 32, init_size=16)


def test_vgg_fine_tuning_copies_the_features_and_starts_a_fresh_classifier(tmp_path):
    """init_size=N for the VGG: its convolutions start from the N-px model's; its classifier, whose first
    linear depends on the input size, starts from the same seeded initialisation as training from scratch."""
    data = dict(n_train=64, n_test=16, batch_size=32)
    parent, _ = T.get_trained("vgg", "relu", size=16, cache_dir=str(tmp_path), progress=False, **data)
    kw = dict(epochs=1, lr=1e-12, weight_decay=0.0, **data)   # too small a learning rate to move a weight
    child, _ = T.get_trained("vgg", "relu", size=32, cache_dir=str(tmp_path), progress=False, init_size=16, **kw)
    scratch = T.train("vgg", "relu", 32, progress=False, **kw)[0]
    sp, sc, ss = parent.state_dict(), child.state_dict(), scratch.state_dict()
    assert sc["classifier.1.weight"].shape != sp["classifier.1.weight"].shape
    for k in sc:
        if k.startswith("features."):
            assert torch.allclose(sc[k], sp[k], atol=1e-9), k
            if sc[k].dim() == 4:   # the convolutions' weights: scratch training starts elsewhere
                assert not torch.allclose(ss[k], sp[k], atol=1e-3), k
        else:
            assert torch.allclose(sc[k], ss[k], atol=1e-9), k


def _folder(root, size=48):
    rng = np.random.default_rng(0)
    for cls in ("cat", "dog"):
        (root / "img" / cls).mkdir(parents=True)
        (root / "seg" / cls).mkdir(parents=True)
        for j in range(2):
            Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)).save(root / "img" / cls / f"{j}.jpg")
            m = np.zeros((size, size), np.uint8)
            m[10:30, 12:40] = 1
            Image.fromarray(m).save(root / "seg" / cls / f"{j}.png")


def test_cli_on_an_image_folder_with_a_torchvision_model(tmp_path, capsys):
    import torchvision
    _folder(tmp_path)
    torch.manual_seed(0)
    weights = tmp_path / "r18.pt"
    torch.save(torchvision.models.resnet18(num_classes=2).state_dict(), weights)
    out = tmp_path / "out"
    rc = main(["evaluate", "--data", str(tmp_path / "img"), "--masks", str(tmp_path / "seg"), "--size", "64",
               "--models", "torchvision:resnet18", "--weights", str(weights), "--methods", "GradCAM", "SRD-input",
               "--metrics", "Pointing", "Attribution", "Sparseness", "--n-images", "4", "--figure-images", "2",
               "--out", str(out), "--no-progress"])
    assert rc == 0
    assert sorted(os.listdir(out)) == ["fig_maps.png", "run.json", "table2.csv", "table2.md"]
    md = (out / "table2.md").read_text()
    assert "| GradCAM† |" in md and "| SRD-input |" in md and "torchvision:resnet18 Poi.↑" in md
    rows = list(csv.DictReader(open(out / "table2.csv")))
    assert {r["method"] for r in rows} == {"GradCAM", "SRD-input"} and all(r["n"] == "4" for r in rows)
    run = json.loads((out / "run.json").read_text())["table2"]
    assert run["n_images"] == 4 and "torchvision:resnet18" in run["test_accuracy"]
    assert run["command"].startswith("srd-fx evaluate --data ") and "--weights" in run["command"]


def test_cli_errors(tmp_path, capsys):
    _folder(tmp_path)
    assert main(["evaluate", "--data", str(tmp_path / "img"), "--models", "torchvision:resnet18",
                 "--out", str(tmp_path / "o")]) == 2
    assert "--masks" in capsys.readouterr().err
    assert main(["evaluate", "--methods", "DeepLift", "--out", str(tmp_path / "o")]) == 2
    assert "unknown method" in capsys.readouterr().err
    assert main(["evaluate", "--metrics", "AUC", "--out", str(tmp_path / "o")]) == 2


def test_cli_digits_tables_with_tiny_training(tmp_path):
    out = tmp_path / "out"
    rc = main(["evaluate", "--size", str(SIZE), "--models", "resnet:relu", "--table4-models", "resnet:relu",
               "resnet:elu", "--methods", "GradCAM", "SRD-low", "SRD-input", "--metrics", "Pointing", "Fidelity",
               "--n-images", "4", "--batch-size", "4", "--fidelity-runs", "3", "--figure-images", "2",
               "--train-setting", "epochs=1", "--train-setting", "n_train=64", "--train-setting", "n_test=32",
               "--cache-dir", str(tmp_path / "cache"), "--out", str(out), "--no-progress", "--threads", "1"])
    assert rc == 0
    t4 = (out / "table4.md").read_text()
    assert "| Method | ReLU | ELU |" in t4 and "*test accuracy*" in t4 and "| SRD-low† |" in t4
    t2 = (out / "table2.md").read_text()
    assert "ResNet (ReLU) Fid.↑" in t2
    # the ReLU ResNet's Fidelity is computed once and shared by both tables
    r2 = {(r["method"]): r["mean"] for r in csv.DictReader(open(out / "table2.csv")) if r["metric"] == "Fidelity"}
    r4 = {(r["method"]): r["mean"] for r in csv.DictReader(open(out / "table4.csv")) if r["model"] == "ReLU"}
    assert r2 == r4
    assert len(os.listdir(tmp_path / "cache")) == 4   # two models, weights + record each


@pytest.mark.slow
def test_reduced_paper_run_every_method_and_metric(tmp_path):
    """The reduced version of the full runs (experiments/ci_reduced.sh): all 17 methods, all five
    metrics, both tables, briefly trained models, a few images."""
    from srd_fx.eval.baselines import METHODS
    out = tmp_path / "out"
    rc = main(["evaluate", "--n-images", "8", "--batch-size", "8", "--fidelity-runs", "10", "--stability-samples", "3",
               "--figure-images", "2", "--train-setting", "epochs=1", "--train-setting", "n_train=1000",
               "--train-setting", "n_test=200", "--cache-dir", str(tmp_path / "cache"), "--out", str(out),
               "--no-progress", "--threads", "1"])
    assert rc == 0
    t2 = (out / "table2.md").read_text().splitlines()
    assert t2[0].count("|") == 1 + 2 * 5 + 1
    assert len([l for l in t2 if l.startswith("| ") and "Method" not in l]) == len(METHODS)
    t4 = (out / "table4.md").read_text()
    assert "| Method | ReLU | ELU | LeakyReLU | Swish | GELU | Tanh |" in t4
    rows = list(csv.DictReader(open(out / "table2.csv")))
    assert len(rows) == 2 * len(METHODS) * 5


def test_cli_fidelity_protocol(tmp_path, capsys):
    base = ["evaluate", "--size", str(SIZE), "--models", "resnet:relu", "--table4-models", "none",
            "--methods", "InputXGradient", "SRD-input", "--metrics", "Fidelity", "--n-images", "4", "--batch-size", "4",
            "--fidelity-runs", "3", "--figure-images", "0", "--train-setting", "epochs=1", "--train-setting",
            "n_train=64", "--train-setting", "n_test=32", "--cache-dir", str(tmp_path / "cache"), "--no-progress",
            "--threads", "1"]
    assert main(base + ["--fidelity-subset", "10", "--fidelity-fraction", "0.1", "--out", str(tmp_path / "e")]) == 2
    assert "not both" in capsys.readouterr().err
    assert main(base + ["--fidelity-fraction", "1.5", "--out", str(tmp_path / "e")]) == 2
    assert "fraction" in capsys.readouterr().err
    assert main(base + ["--fidelity-subset", str(SIZE * SIZE + 1), "--fidelity-protocol", "paper",
                        "--out", str(tmp_path / "e")]) == 2
    assert "between 1 and" in capsys.readouterr().err
    out = tmp_path / "out"
    assert main(base + ["--fidelity-protocol", "paper", "--fidelity-fraction", "0.05", "--out", str(out)]) == 0
    ms = json.load(open(out / "run.json"))["table2"]["metric_settings"]
    assert (ms["fidelity_pixels"], ms["fidelity_fraction"], ms["fidelity_baseline"], ms["fidelity_clamp"]) == \
        (True, 0.05, 0.0, True)
    rows = [r for r in csv.DictReader(open(out / "table2.csv")) if r["metric"] == "Fidelity"]
    assert len(rows) == 2 and all(math.isfinite(float(r["mean"])) for r in rows)
