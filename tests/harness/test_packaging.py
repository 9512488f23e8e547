"""The package's boundaries: the compiler imports none of the evaluation harness's libraries, and the
CLI/harness name the missing extra instead of failing with a raw ImportError."""
import os
import subprocess
import sys

import pytest

import srd_fx
from srd_fx.extras import EVAL_LIBRARIES

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
HARNESS_ONLY = ("sklearn", "skimage", "matplotlib", "scipy", "quantus", "captum", "zennit", "pytorch_grad_cam")


def _python(code: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env=env,
                          cwd=ROOT)


def test_compile_imports_no_harness_library():
    r = _python(
        "import sys, torch, torch.nn as nn\n"
        "import srd_fx\n"
        "m = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 5, 3, padding=1), nn.ReLU(),\n"
        "                  nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(5, 3)).eval()\n"
        "x = torch.randn(2, 3, 8, 8)\n"
        "out = srd_fx.compile(m)(x)\n"
        "assert torch.equal(out.logits, m(x)) and out.saliency.shape == (2, 8, 8)\n"
        "print(' '.join(sorted({k.split('.')[0] for k in sys.modules})))\n")
    assert r.returncode == 0, r.stderr
    loaded = set(r.stdout.split())
    assert "srd_fx" in loaded and "networkx" in loaded
    assert not loaded & set(HARNESS_ONLY), sorted(loaded & set(HARNESS_ONLY))


@pytest.mark.parametrize("blocked", ["matplotlib", "sklearn"])
def test_harness_names_the_missing_extra(blocked):
    r = _python(f"import sys; sys.modules[{blocked!r}] = None\n"
                "import srd_fx.eval\n")
    assert r.returncode != 0
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith("srd_fx.errors.MissingDependencyError")
    assert EVAL_LIBRARIES[blocked] in last and 'pip install "srd_fx[eval]"' in last


def test_cli_without_the_extra_lists_commands_and_explains_what_is_missing():
    code = ("import sys; sys.modules['matplotlib'] = None; sys.modules['PIL'] = None\n"
            "from srd_fx.cli import main\n"
            "sys.exit(main(sys.argv[1:]))\n")
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    run = lambda *a: subprocess.run([sys.executable, "-c", code, *a], capture_output=True, text=True,  # noqa: E731
                                    timeout=300, env=env, cwd=ROOT)
    h = run("--help")
    assert h.returncode == 0, h.stderr
    for cmd in ("demo", "explain", "evaluate", "train", "attack", "apop", "ablation", "concepts", "zoo"):
        assert cmd in h.stdout
    for cmd, *opts in (("explain", "chelsea"), ("demo", "--n-images", "1")):
        r = run(cmd, *opts)
        assert r.returncode == 2, (r.stdout, r.stderr)
        assert r.stderr.startswith(f"srd-fx {cmd}: error:"), r.stderr
        assert "srd_fx[eval]" in r.stderr and ("pillow" in r.stderr or "'PIL'" in r.stderr), r.stderr


def test_version_is_written_once():
    import re
    text = open(os.path.join(ROOT, "pyproject.toml")).read()
    assert re.search(r'^dynamic = \["version"\]', text, re.M) and not re.search(r"^version\s*=\s*\"", text, re.M)
    assert re.fullmatch(r"\d+\.\d+\.\d+([ab]\d+|rc\d+)?", srd_fx.__version__)
    from srd_fx.cli import main
    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0


def test_bundled_photo_is_the_scikit_image_one():
    pytest.importorskip("skimage")
    import numpy as np
    import skimage.data
    from srd_fx.eval.io import PACKAGED_PHOTOS, read_image
    assert os.path.exists(PACKAGED_PHOTOS["chelsea"])
    ours = np.asarray(read_image("chelsea"), dtype=np.float64)
    ref = skimage.data.chelsea().astype(np.float64)
    assert ours.shape == ref.shape
    assert np.abs(ours - ref).mean() < 3.0  # JPEG at quality 88: the same photo, a few levels off
