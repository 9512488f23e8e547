"""The mistakes a new user makes, and what srd_fx answers: every one is an ``SRDError`` naming the
cause and the fix, the command line prints it without a traceback, and no command replaces
committed results with a partial run."""
import hashlib
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
import torch.nn as nn
from PIL import Image

import srd_fx
from srd_fx import cli

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


class FixedSizeNet(nn.Module):
    """A Linear after flatten: only 32x32 inputs fit."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3)
        self.relu = nn.ReLU()
        self.fc = nn.Linear(8 * 30 * 30, 10)

    def forward(self, x):
        return self.fc(self.relu(self.conv(x)).flatten(1))


class TwoInputs(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(8, 10)

    def forward(self, x, y):
        return self.fc(self.pool(torch.relu(self.conv(x) + self.conv(y))).flatten(1))


class Mid(nn.Module):
    """conv -> relu -> ``op`` -> relu -> pool -> fc, for an op srd_fx has no rule for."""

    def __init__(self, op):
        super().__init__()
        self.op = op
        self.conv = nn.Conv2d(3, 8, 3)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(8, 10)

    def forward(self, x):
        return self.fc(self.pool(torch.relu(self.op(torch.relu(self.conv(x))))).flatten(1))


def _fft_real(h):
    return torch.fft.fft(h).real


def _sorted(h):
    return torch.sort(h, dim=-1).values


# ----------------------------------------------------------------------------- compile / call -----
def test_wrong_input_size_names_the_failing_module_and_the_root_cause(capfd):
    explainer = srd_fx.compile(FixedSizeNet().eval())
    with pytest.raises(srd_fx.InputError) as e:
        explainer(torch.randn(1, 3, 40, 40))
    msg = str(e.value)
    assert "mat1 and mat2 shapes cannot be multiplied" in msg and "module 'fc' (Linear)" in msg
    assert "(1, 3, 40, 40)" in msg and "size the model was built for" in msg
    assert "tlparse" not in msg
    assert "Traceback" not in capfd.readouterr().err  # torch's ShapeProp prints one; ours does not
    # the explainer still works at the size the model was built for
    assert explainer(torch.randn(2, 3, 32, 32)).saliency.shape == (2, 32, 32)


def test_wrong_channel_count_says_how_many_channels():
    with pytest.raises(srd_fx.InputError, match=r"module 'conv' \(Conv2d\).*to have 3 channels.*x.expand"):
        srd_fx.compile(FixedSizeNet().eval())(torch.randn(1, 1, 32, 32))


def test_two_input_model_is_refused_with_the_wrapping_recipe():
    with pytest.raises(srd_fx.InputError, match=r"(?s)takes 2 inputs \(x, y\).*class OneInput") as e:
        srd_fx.compile(TwoInputs().eval())(torch.randn(1, 3, 16, 16))
    # the recipe in the message works as written
    ns = {"torch": torch}
    exec(textwrap.dedent(str(e.value).split("e.g.\n", 1)[1].rsplit("\nand compile", 1)[0]), ns)
    model, other = TwoInputs().eval(), torch.randn(1, 3, 16, 16)
    x = torch.randn(1, 3, 16, 16)
    out = srd_fx.compile(ns["OneInput"](model, other).eval())(x)
    torch.testing.assert_close(out.logits, model(x, other), rtol=0, atol=0)


def test_example_input_tuple_and_numpy_input_are_input_errors():
    model = FixedSizeNet().eval()
    with pytest.raises(srd_fx.InputError, match="(?s)example input is a tuple of 2.*one tensor"):
        srd_fx.compile(model, example_input=(torch.randn(1, 3, 32, 32), torch.randn(1, 3, 32, 32)))
    arr = np.zeros((1, 3, 32, 32), np.float32)
    with pytest.raises(srd_fx.InputError, match=r"got ndarray.*torch.from_numpy"):
        srd_fx.compile(model)(arr)                                  # not built yet
    built = srd_fx.compile(model, example_input=torch.zeros(1, 3, 32, 32))
    with pytest.raises(srd_fx.InputError, match=r"got ndarray.*torch.from_numpy"):
        built(arr)                                                  # already built


def test_unknown_layer_is_a_layer_error_that_is_also_a_key_error():
    model = FixedSizeNet().eval()
    for make in (lambda: srd_fx.compile(model, layers=("nope",))(torch.randn(1, 3, 32, 32)),
                 lambda: srd_fx.compile(model, layers=("nope",), example_input=torch.randn(1, 3, 32, 32))):
        with pytest.raises(srd_fx.LayerError) as e:
            make()
        assert isinstance(e.value, srd_fx.SRDError) and isinstance(e.value, KeyError)
        assert str(e.value).startswith("unknown layer 'nope'") and "['relu']" in str(e.value)
    with pytest.raises(srd_fx.LayerError, match="no node or module named 'nope'"):
        srd_fx.compile(model, encoder_output="nope", example_input=torch.randn(1, 3, 32, 32))


@pytest.mark.parametrize("op, name, what", [
    (_fft_real, "torch.fft.fft", r"complex64 tensor, of which node '\w+' takes .real"),
    (_sorted, "torch.sort", r"tuple \(torch.return_types.sort\), of which node '\w+' takes .values"),
])
def test_unsupported_op_behind_an_attribute_is_named_with_the_recipe(op, name, what):
    with pytest.raises(srd_fx.UnsupportedOpError) as e:
        srd_fx.compile(Mid(op).eval())(torch.randn(1, 3, 12, 12))
    msg = str(e.value)
    assert msg.startswith(f"srd_fx has no rule for {name} ")
    import re
    assert re.search(what, msg), msg
    assert "srd_fx.register_rule(MyOp, Affine())" in msg


def test_the_recipe_for_an_fft_op_works():
    """The fix the message proposes: the op in a module of its own, registered as Affine."""
    from srd_fx.rules import Affine

    class ScaleFFT(nn.Module):  # ifft(fft(x)).real * 1.5 == 1.5 x: linear and position-preserving
        def forward(self, h):
            return torch.fft.ifft(torch.fft.fft(h)).real * 1.5

    srd_fx.register_rule(ScaleFFT, Affine())
    torch.manual_seed(0)
    model = Mid(ScaleFFT()).double().eval()
    x = torch.randn(2, 3, 12, 12, dtype=torch.float64)
    out = srd_fx.compile(model)(x)
    torch.testing.assert_close(out.logits, model(x), rtol=0, atol=0)
    torch.testing.assert_close(out.saliency.sum((1, 2)) + out.lost, out.R_L.sum((1, 2)), rtol=1e-10, atol=1e-12)


# ----------------------------------------------------------------------------- command line -------
TINYNET = textwrap.dedent('''
    import torch.nn as nn

    def build_net(num_classes=5):
        return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                             nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(),
                             nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, num_classes))
''')


@pytest.fixture
def folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "mymodels_t23.py").write_text(TINYNET)
    sys.modules.pop("mymodels_t23", None)
    rng = np.random.default_rng(0)
    (tmp_path / "imgs").mkdir()
    for name in ("a", "c"):
        Image.fromarray(rng.integers(0, 256, (24, 24, 3), dtype=np.uint8)).save(tmp_path / "imgs" / f"{name}.png")
    (tmp_path / "imgs" / "b.png").write_bytes(b"\x89PNG\r\n\x1a\n this is not a PNG")  # corrupt
    return tmp_path


def test_cli_prints_one_message_for_an_srd_error_and_debug_shows_the_traceback(folder, capsys):
    assert cli.main(["explain", "imgs/a.png", "--model", "mymodels_t23:build_net", "--size", "24",
                     "--out", "x.png", "--layer", "nope"]) == 2
    err = capsys.readouterr().err
    assert "unknown layer 'nope'" in err and "Traceback" not in err
    # `concepts` does not handle the error itself: main() prints it as one message, exit 2
    argv = ["concepts", "--arch", "resnet", "--layer", "nope", "--epochs", "1", "--n-train", "32",
            "--n-test", "8", "--n-index", "4", "--cache-dir", str(folder / "cache"), "--out", "c.png"]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert "\nsrd-fx concepts: error: unknown layer 'nope'" in err and "Traceback" not in err
    assert not (folder / "c.png").exists()
    with pytest.raises(srd_fx.LayerError):
        cli.main(argv + ["--debug"])


def test_console_script_imports_a_factory_from_the_working_directory(folder):
    """``srd-fx`` (a console script) has no working directory on sys.path; ``python -P`` reproduces
    that.  ``--model mymodels:build_net`` run from the folder holding mymodels.py must work."""
    code = ("import sys; assert '' not in sys.path and __import__('os').getcwd() not in sys.path; "
            "from srd_fx.cli import main; sys.exit(main(sys.argv[1:]))")
    env = dict(os.environ, PYTHONPATH=REPO, MPLBACKEND="Agg")
    r = subprocess.run([sys.executable, "-P", "-c", code, "explain", "imgs/a.png", "--model",
                        "mymodels_t23:build_net", "--size", "24", "--out", "a_srd.png"],
                       cwd=folder, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    assert (folder / "a_srd.png").exists() and np.load(folder / "a_srd.npy").shape == (24, 24)


def test_explain_skips_a_corrupt_image_goes_on_and_fails_at_the_end(folder, capsys):
    rc = cli.main(["explain", "imgs", "--model", "mymodels_t23:build_net", "--size", "24", "--out", "maps"])
    err = capsys.readouterr().err
    assert rc == 2
    assert "warning:" in err and "b.png" in err and "1 of 3 images could not be read" in err
    written = sorted(f for f in os.listdir(folder / "maps") if not f.startswith("."))  # .srd_fx: resume state
    assert written == ["a_srd.npy", "a_srd.png", "c_srd.npy", "c_srd.png"]


def test_overlay_is_diverging_centred_on_zero_and_transparent_at_zero(tmp_path):
    import matplotlib
    from srd_fx.eval.io import overlay, overlay_rgba
    m = np.array([[0.0, 1.0], [-1.0, 0.5]])
    rgba = overlay_rgba(m, "bwr", alpha=0.7)
    np.testing.assert_allclose(rgba[..., 3], 0.7 * np.abs(m))            # transparent at zero
    np.testing.assert_allclose(rgba[0, 1, :3], matplotlib.colormaps["bwr"](1.0)[:3])   # +1: red end
    np.testing.assert_allclose(rgba[1, 0, :3], matplotlib.colormaps["bwr"](0.0)[:3])   # -1: blue end
    np.testing.assert_allclose(rgba[0, 0, :3], matplotlib.colormaps["bwr"](0.5)[:3])   # 0: the centre
    # a non-negative map is drawn on the same centred scale (its 0.5 is half-way to red, not the middle)
    np.testing.assert_allclose(overlay_rgba(np.array([[0.5]]), "bwr", 1.0)[0, 0, :3],
                               matplotlib.colormaps["bwr"](0.75)[:3])
    sal = np.zeros((16, 16))
    sal[2, 3] = 3.0
    overlay(np.full((16, 16, 3), 0.5), sal, str(tmp_path / "o.png"))
    with Image.open(tmp_path / "o.png") as im:
        assert im.size == (800, 400)


def test_pretrained_without_network_fails_at_once(monkeypatch):
    """With the hub's endpoint unreachable (a closed local port), timm's pretrained weights that
    are not cached fail at once with the clear message instead of ~50 s of retries."""
    hub = pytest.importorskip("huggingface_hub")
    import timm
    from srd_fx.eval.io import ModelLoadError, load_model
    cfg = timm.models.get_pretrained_cfg("resnet10t")
    repo = cfg.hf_hub_id
    if any(isinstance(hub.try_to_load_from_cache(repo, f), str)
           for f in ("model.safetensors", "pytorch_model.bin")):
        pytest.skip("resnet10t's pretrained weights are in the local cache")
    monkeypatch.setattr(hub.constants, "ENDPOINT", "http://127.0.0.1:9")
    with pytest.raises(ModelLoadError, match=r"127.0.0.1:9 cannot be reached and the weights are not in "
                                             r"the local cache.*--weights FILE"):
        load_model("timm:resnet10t", pretrained=True)
    assert hub.constants.HF_HUB_OFFLINE is False  # restored


# ----------------------------------------------------------------------------- committed results --
def _digest(path):
    return hashlib.sha256(open(path, "rb").read()).hexdigest()


def test_bare_zoo_runs_nothing_and_says_what_all_would_do(capsys):
    from model_zoo_checks import lists
    before = {p: _digest(p) for p in (os.path.join(REPO, "model_zoo_checks", "REPORT.md"),
                                      os.path.join(REPO, "model_zoo_checks", "report.json"))}
    assert cli.main(["zoo"]) == 2
    err = capsys.readouterr().err
    assert f"all {len(lists.default_models())} timm CNN architectures" in err and "--all" in err
    assert {p: _digest(p) for p in before} == before


def test_partial_peer_run_never_replaces_the_committed_peers_json(tmp_path, monkeypatch, capsys):
    from model_zoo_checks import peers
    committed = os.path.join(REPO, "model_zoo_checks", "peers.json")
    before = _digest(committed)
    monkeypatch.setattr(peers, "PEERS_CACHE", tmp_path / "peers.jsonl")
    monkeypatch.setattr(peers, "PEERS_PARTIAL", tmp_path / "peers-partial.json")
    peers.main(["--models", "resnet10t", "--no-report", "--jobs", "0", "--quiet"])
    assert _digest(committed) == before
    import json
    doc = json.loads((tmp_path / "peers-partial.json").read_text())
    assert list(doc["records"]) == ["resnet10t"] and doc["records"]["resnet10t"]["zennit"] is not None
    assert str(tmp_path / "peers-partial.json") in capsys.readouterr().err


def test_training_does_not_depend_on_the_callers_thread_count():
    from srd_fx.eval.train import TRAIN_THREADS, train
    kw = dict(epochs=1, n_train=64, n_test=16, batch_size=32)
    before = torch.get_num_threads()
    weights = []
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            model, record = train("resnet", "relu", 32, progress=False, **kw)
            assert torch.get_num_threads() == threads          # restored
            assert record["torch_threads"] == TRAIN_THREADS
            weights.append(model.state_dict())
    finally:
        torch.set_num_threads(before)
    for k in weights[0]:
        assert torch.equal(weights[0][k], weights[1][k]), k


def test_torchvision_pretrained_without_network_names_the_unreachable_file():
    import torchvision
    from srd_fx.eval.io import ModelLoadError, _reachable, load_model
    url = torchvision.models.get_model_weights("resnet18").DEFAULT.url
    if os.path.exists(os.path.join(torch.hub.get_dir(), "checkpoints", os.path.basename(url))):
        pytest.skip("resnet18's weights are in torch's cache")
    if _reachable(url):
        pytest.skip(f"{url} is reachable from this machine")
    with pytest.raises(ModelLoadError, match=f"{url} cannot be reached.*--weights FILE"):
        load_model("torchvision:resnet18", pretrained=True)
