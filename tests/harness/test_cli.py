"""The command line: help of every subcommand, ``srd-fx explain`` on a user model with saved
weights, its error messages, and ``srd-fx demo`` (end to end with --slow)."""
import argparse
import importlib.metadata
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from PIL import Image

import srd_fx
from srd_fx import cli

MEAN, STD = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)
NORM = ["--mean", *map(str, MEAN), "--std", *map(str, STD)]

TINYNET = textwrap.dedent('''
    import torch
    import torch.nn as nn

    def make(num_classes=5):
        """32x32 input; 8x8 encoder output (SRD-low)."""
        torch.manual_seed(0)
        return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                             nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                             nn.Conv2d(16, 16, 3, padding=1), nn.ReLU(),
                             nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, num_classes))

    def other():
        return nn.Sequential(nn.Conv2d(3, 4, 5), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                             nn.Linear(4, 5))

    not_a_model = 3
''')


def _subcommands(parser):
    for a in parser._actions:
        if isinstance(a, argparse._SubParsersAction):
            return dict(a.choices)
    raise AssertionError("srd-fx has no subcommands")


# ----------------------------------------------------------------------------- help ---------------
def test_every_option_of_every_subcommand_has_a_help_sentence():
    parser = cli.build_parser()
    subs = _subcommands(parser)
    assert {"demo", "explain"} <= set(subs)
    missing = []
    for name, sp in [("srd-fx", parser)] + sorted(subs.items()):
        for a in sp._actions:
            if isinstance(a, (argparse._HelpAction, argparse._SubParsersAction)):
                continue
            h = a.help
            if not h or h is argparse.SUPPRESS or len(h.split()) < 3:
                missing.append(f"{name} {'/'.join(a.option_strings) or a.dest}: {h!r}")
    assert not missing, "options without a help sentence:\n" + "\n".join(missing)


def test_help_text_lists_every_option_and_subcommand(capsys):
    parser = cli.build_parser()
    subs = _subcommands(parser)
    with pytest.raises(SystemExit) as e:
        cli.main(["--help"])
    assert e.value.code == 0
    top = capsys.readouterr().out
    for name, sp in subs.items():
        assert name in top
        with pytest.raises(SystemExit) as e:
            cli.main([name, "--help"])
        assert e.value.code == 0
        text = capsys.readouterr().out
        for a in sp._actions:
            for opt in a.option_strings:
                assert opt in text, f"srd-fx {name} --help does not show {opt}"


def test_version_from_python_m():
    r = subprocess.run([sys.executable, "-m", "srd_fx", "--version"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == f"srd_fx {srd_fx.__version__}"
    assert importlib.metadata.version("srd_fx") == srd_fx.__version__  # package metadata agrees


# ----------------------------------------------------------------------------- explain ------------
@pytest.fixture
def workspace(tmp_path, monkeypatch):
    """A user's folder: tinynet.py (model factories), trained-looking weights, and two 32x32 images."""
    (tmp_path / "tinynet.py").write_text(TINYNET)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.chdir(tmp_path)
    sys.modules.pop("tinynet", None)
    ns = {}
    exec(TINYNET, ns)
    torch.manual_seed(123)  # weights different from the factory's own initialisation
    model = ns["make"]()
    for p in model.parameters():
        p.data.normal_(0, 0.3)
    torch.save(model.state_dict(), tmp_path / "w.pt")
    torch.save(ns["make"](num_classes=7).state_dict(), tmp_path / "w7.pt")
    torch.save(ns["other"]().state_dict(), tmp_path / "w_other.pt")
    torch.save(model, tmp_path / "whole_model.pt")
    rng = np.random.default_rng(0)
    (tmp_path / "imgs").mkdir()
    for name in ("a", "b"):
        Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(tmp_path / "imgs" / f"{name}.png")
    (tmp_path / "imgs" / "notes.txt").write_text("not an image")
    return tmp_path, ns, model.eval()


def _reference(model, path, layer="input"):
    """SRD of one image computed here: normalise by hand, compile, explain the predicted class."""
    arr = np.asarray(Image.open(path).convert("RGB"), dtype=np.float32) / 255
    x = (torch.from_numpy(arr).permute(2, 0, 1) - torch.tensor(MEAN)[:, None, None]) / torch.tensor(STD)[:, None, None]
    with torch.no_grad():
        out = srd_fx.compile(model, layers=(layer,))(x[None])
    return out.relevance[layer][0].numpy(), int(out.logits.argmax())


def test_explain_user_factory_with_weights(workspace, capsys):
    tmp, ns, model = workspace
    rc = cli.main(["explain", "imgs/a.png", "--model", "tinynet:make", "--weights", "w.pt", "--size", "32",
                   *NORM, "--out", "out/a.png", "--cmap", "inferno", "--alpha", "0.7"])
    assert rc == 0
    ref, cls = _reference(model, tmp / "imgs" / "a.png")
    raw = np.load(tmp / "out" / "a.npy")
    assert raw.dtype == np.float32 and raw.shape == (32, 32)
    np.testing.assert_allclose(raw, ref, rtol=1e-5, atol=1e-8)
    assert f"class {cls}" in capsys.readouterr().out
    with Image.open(tmp / "out" / "a.png") as im:
        assert im.size == (800, 400)  # image | overlay with colour bar
    # the weights really were loaded: the factory's own initialisation explains differently
    ref_init, _ = _reference(ns["make"]().eval(), tmp / "imgs" / "a.png")
    assert not np.allclose(raw, ref_init)


def test_explain_folder_file_factory_and_layer(workspace):
    tmp, ns, model = workspace
    rc = cli.main(["explain", "imgs", "--model", str(tmp / "tinynet.py") + ":make", "--weights", "w.pt",
                   "--size", "32", *NORM, "--layer", "low", "--out", "maps"])
    assert rc == 0
    # (.srd_fx/ holds the run's resume log)
    assert sorted(f for f in os.listdir(tmp / "maps") if not f.startswith(".")) == [
        "a_srd.npy", "a_srd.png", "b_srd.npy", "b_srd.png"]
    for name in ("a", "b"):
        raw = np.load(tmp / "maps" / f"{name}_srd.npy")
        assert raw.shape == (8, 8)  # the encoder output's own resolution, not resized
        np.testing.assert_allclose(raw, _reference(model, tmp / "imgs" / f"{name}.png", "low")[0], rtol=1e-5, atol=1e-8)
    rc = cli.main(["explain", "imgs/b*.png", "--model", "tinynet:make", "--weights", "w.pt", "--size", "32",
                   *NORM, "--out", "globbed", "--no-npy", "--target", "3"])
    assert rc == 0 and sorted(os.listdir(tmp / "globbed")) == [".srd_fx", "b_srd.png"]


@pytest.mark.parametrize("argv, message", [
    (["--model", "resnet5O"], "unknown model 'resnet5O'.*Did you mean resnet50"),
    (["--model", "timm:efficientnet_b9x"], "timm has no model 'efficientnet_b9x'"),
    (["--model", "tinynet:mak"], "no attribute 'mak'. Did you mean make"),
    (["--model", "nosuchpackage.models:net"], "cannot import module 'nosuchpackage.models'"),
    (["--model", "tinynet:not_a_model"], "not a callable"),
    (["--model", "tinynet:make", "--weights", "missing.pt"], "weights file 'missing.pt' does not exist"),
    (["--model", "tinynet:make", "--weights", "w7.pt"], "do not match.*file \\(7, 16\\) vs model \\(5, 16\\).*--num-classes 7"),
    (["--model", "tinynet:make", "--weights", "w_other.pt"], "do not match.*shape mismatches.*missing from the file"),
    (["--model", "tinynet:make", "--weights", "whole_model.pt"], "state dicts only.*torch.save\\(model.state_dict"),
    (["--model", "tinynet:make", "--weights", "w.pt", "--pretrained"], "not both"),
    (["--model", "tinynet:make", "--target", "9"], "--target 9 is outside the model's 5 classes"),
    (["--model", "tinynet:make", "--layer", "layer9"], "unknown layer 'layer9'"),
    (["--model", "tinynet:make", "--cmap", "nosuchmap"], "unknown matplotlib colormap"),
    (["--model", "tinynet:make", "--alpha", "2"], "--alpha must be in \\[0, 1\\]"),
])
def test_explain_errors_are_clear(workspace, capsys, argv, message):
    import re
    rc = cli.main(["explain", "imgs/a.png", "--size", "32", "--out", "e.png", *argv])
    err = capsys.readouterr().err
    assert rc == 2
    assert re.search(message, err), err
    assert "Traceback" not in err


def test_explain_weights_with_num_classes_and_bad_inputs(workspace, capsys):
    tmp, ns, _ = workspace
    assert cli.main(["explain", "imgs/a.png", "--model", "tinynet:make", "--weights", "w7.pt", "--num-classes", "7",
                     "--size", "32", "--out", "k7.png"]) == 0
    assert np.load(tmp / "k7.npy").shape == (32, 32)
    for spec, msg in [("nothing.png", "no image 'nothing.png'"), ("imgs/*.jpg", "matches no file"),
                      ("imgs/notes.txt", "not an image Pillow can read")]:
        assert cli.main(["explain", spec, "--model", "tinynet:make", "--size", "32"]) == 2
        assert msg in capsys.readouterr().err


def test_load_model_library_names_and_errors():
    from srd_fx.eval.io import ModelLoadError, load_model
    m = load_model("torchvision:resnet18", num_classes=3)
    assert not m.training and m.fc.out_features == 3
    m = load_model("resnet18", num_classes=3)
    assert type(m).__module__.startswith("torchvision")
    m = load_model("timm:resnet10t", num_classes=4)
    assert type(m).__module__.startswith("timm") and m.get_classifier().out_features == 4
    with pytest.raises(ModelLoadError, match="pretrained.*factory builds its own"):
        load_model("os:getcwd", pretrained=True)
    with pytest.raises(ModelLoadError, match="not a torch.nn.Module"):
        load_model("os:getcwd")


# ----------------------------------------------------------------------------- demo ---------------
@pytest.mark.parametrize("argv, message", [
    (["--baselines", "NoSuchMethod"], "unknown method 'NoSuchMethod'"),
    (["--metrics", "Speed"], "unknown metric"),
    (["--train-setting", "epochs"], "KEY=VALUE"),
    (["--train-setting", "epochs=many"], "not a number"),
    (["--n-images", "0"], "--n-images must be at least 1"),
])
def test_demo_rejects_bad_options_before_training(tmp_path, capsys, argv, message):
    rc = cli.main(["demo", "--cache-dir", str(tmp_path), "--out", str(tmp_path / "d.png"), *argv])
    assert rc == 2 and message in capsys.readouterr().err
    assert os.listdir(tmp_path) == []  # nothing trained, nothing written



def test_train_settings_parse_once_for_every_command():
    """demo, evaluate and train share one --train-setting parser: numbers typed like the defaults,
    bad items an OptionError (one clean CLI line, exit 2)."""
    from srd_fx.errors import OptionError
    from srd_fx.eval.train import parse_train_settings
    assert parse_train_settings(["epochs=2.0", "lr=1e-3"]) == {"epochs": 2, "lr": 1e-3}
    assert isinstance(parse_train_settings(["epochs=2.0"])["epochs"], int)
    for bad, message in [("epochs", "KEY=VALUE"), ("colour=3", "KEY=VALUE"), ("epochs=many", "not a number")]:
        with pytest.raises(OptionError, match=message):
            parse_train_settings([bad])

@pytest.mark.slow
def test_demo_end_to_end_small(tmp_path, capsys):
    """The demo with a 1-epoch model on 64 scenes: grid PNG, markdown table, printed table."""
    out = tmp_path / "demo.png"
    rc = cli.main(["demo", "--out", str(out), "--n-images", "2", "--metric-images", "4", "--metrics", "Pointing",
                   "Sparseness", "--cache-dir", str(tmp_path / "cache"), "--no-progress",
                   "--train-setting", "epochs=1", "--train-setting", "n_train=64", "--train-setting", "n_test=16"])
    assert rc == 0
    printed = capsys.readouterr().out
    for m in ("SRD-low", "SRD-high", "SRD-input", "GradCAM", "LRP-z+", "IntegratedGradients"):
        assert f"| {m}" in printed
    with Image.open(out) as im:
        assert im.size[0] > im.size[1] > 0
    assert "| SRD-input |" in (tmp_path / "demo.md").read_text()
    assert len(os.listdir(tmp_path / "cache")) == 2  # weights + record


VITNET = '''
import timm


def make(num_classes=5):
    return timm.models.VisionTransformer(img_size=32, patch_size=8, embed_dim=16, depth=1, num_heads=2,
                                         num_classes=num_classes)
'''


def test_explain_token_model_low_is_the_patch_grid(workspace, capsys):
    """``--layer low`` on a ViT: the (B, N) token relevance, shown and saved as its patch grid; the
    class token's share is reported beside it; ``--layer high`` is refused by name (no 4x layer)."""
    tmp, _, _ = workspace
    (tmp / "vitnet.py").write_text(VITNET)
    sys.modules.pop("vitnet", None)
    ns = {}
    exec(VITNET, ns)
    torch.manual_seed(0)
    model = ns["make"]().eval()
    torch.save(model.state_dict(), tmp / "vit.pt")
    rc = cli.main(["explain", "imgs/a.png", "--model", "vitnet:make", "--weights", "vit.pt", "--size", "32",
                   *NORM, "--layer", "low", "--out", "vit/a.png"])
    assert rc == 0
    raw = np.load(tmp / "vit" / "a.npy")
    tokens, _ = _reference(model, tmp / "imgs" / "a.png", "low")
    assert tokens.shape == (17,) and raw.shape == (4, 4)   # 1 class token + a 4x4 grid of patches
    np.testing.assert_allclose(raw.ravel(), tokens[1:], rtol=1e-5, atol=1e-8)
    assert "prefix tokens hold" in capsys.readouterr().out
    rc = cli.main(["explain", "imgs/a.png", "--model", "vitnet:make", "--size", "32", "--layer", "high",
                   "--out", "vit/b.png"])
    err = capsys.readouterr().err
    assert rc == 2 and "4x the encoder output's resolution" in err and "Traceback" not in err
