"""Smoke test of an installed srd_fx wheel (run by .ci/wheel_check.sh in a fresh venv, outside the
repository).  Stage ``core``: the wheel alone (plus torch/torchvision); stage ``eval``: with the
``eval`` extra."""
import os
import subprocess
import sys
import sysconfig

stage = sys.argv[1]
import srd_fx  # noqa: E402
import torch  # noqa: E402
import torchvision  # noqa: E402

site = sysconfig.get_paths()["purelib"]
assert srd_fx.__file__.startswith(site), f"srd_fx imported from {srd_fx.__file__}, not the venv's {site}"
from importlib.metadata import version  # noqa: E402

assert version("srd_fx") == srd_fx.__version__, (version("srd_fx"), srd_fx.__version__)
assert os.path.exists(os.path.join(os.path.dirname(srd_fx.__file__), "py.typed"))
cli = os.path.join(os.path.dirname(sys.executable), "srd-fx")


def srd_fx_cli(*args, ok=True):
    r = subprocess.run([cli, *args], capture_output=True, text=True, timeout=600)
    if ok and r.returncode != 0:
        raise SystemExit(f"srd-fx {' '.join(args)} failed ({r.returncode}):\n{r.stdout}\n{r.stderr}")
    return r


def check(model, x, name):
    model = model.eval()
    out = srd_fx.compile(model, layers=("input", "low"))(x)
    assert torch.allclose(out.logits, model(x), rtol=1e-5, atol=1e-5), name
    total = out.saliency.flatten(1).sum(1) + out.lost
    assert torch.allclose(total, out.R_L.flatten(1).sum(1), rtol=1e-4, atol=1e-6), f"{name}: not conserved"
    assert torch.isfinite(out.saliency).all(), name
    print(f"{name}: logits exact, conserved, saliency {tuple(out.saliency.shape)}")


torch.manual_seed(0)
assert srd_fx_cli("--version").stdout.strip() == f"srd_fx {srd_fx.__version__}"
commands = ["demo", "explain", "evaluate", "train", "attack", "apop", "ablation", "concepts", "zoo"]
help_text = srd_fx_cli("--help").stdout
assert all(c in help_text for c in commands), help_text
for c in commands:
    srd_fx_cli(c, "--help")
print(f"srd-fx --help and --help of {len(commands)} subcommands: ok")

# README's usage example, as written there (random weights: nothing can be downloaded in CI)
model = torchvision.models.resnet50().eval()
x = torch.randn(1, 3, 224, 224)
explainer = srd_fx.compile(model, layers=("input", "low", "high"))
out = explainer(x)
assert torch.allclose(out.logits, model(x), rtol=1e-4, atol=1e-4)
assert out.saliency.shape == (1, 224, 224)
assert out.relevance["low"].shape == (1, 7, 7) and out.relevance["high"].shape == (1, 28, 28)
assert "def forward" in explainer.code
print(f"README example (torchvision resnet50): maps {tuple(out.saliency.shape)}, low {tuple(out.relevance['low'].shape)}, "
      f"high {tuple(out.relevance['high'].shape)}; generated code {len(explainer.code.splitlines())} lines")

x = torch.randn(2, 3, 64, 64)
with torch.no_grad():
    check(torchvision.models.resnet18(num_classes=10), x, "torchvision resnet18")

if stage == "core":
    harness = [m for m in ("sklearn", "skimage", "matplotlib", "scipy", "quantus") if m in sys.modules]
    assert not harness, harness
    r = srd_fx_cli("explain", "chelsea", "--model", "resnet18", ok=False)
    assert r.returncode == 2 and 'pip install "srd_fx[eval]"' in r.stderr, (r.returncode, r.stderr)
    print("core: no harness library imported; srd-fx explain names the missing extra:", r.stderr.strip()[:120])
else:
    import timm
    with torch.no_grad():
        check(timm.create_model("efficientnet_b0", num_classes=10), x, "timm efficientnet_b0")
    out = os.path.abspath("chelsea_srd.png")
    r = srd_fx_cli("explain", "chelsea", "--model", "resnet18", "--size", "96", "--out", out)
    assert os.path.getsize(out) > 1000 and os.path.exists(out[:-4] + ".npy"), r.stdout
    print("srd-fx explain on the bundled photo:", r.stdout.strip())
    r = srd_fx_cli("zoo", "--list", "--ci-subset")
    listed = [ln for ln in r.stdout.splitlines() if ln.strip()]
    assert len(listed) >= 5, r.stdout
    r = srd_fx_cli("zoo", "--models", "resnet18", "--no-report", "--jobs", "1", "--quiet")
    print(f"srd-fx zoo: --ci-subset lists {len(listed)} models; --models resnet18:", r.stdout.strip()[-200:])
print(f"wheel smoke test ({stage}): ok")
