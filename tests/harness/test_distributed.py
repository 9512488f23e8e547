"""Data-parallel runs under torchrun (srd_fx.eval.distributed): `explain` and `evaluate` split
between 2 gloo processes write what one process writes; killed runs resume to the uninterrupted
result; bad launches and resumes fail with named errors; zoo shards merge into the one-run report.

The torchrun runs are real (`python -m torch.distributed.run --standalone --nproc_per_node=2`), on
the CPU, one thread per process."""
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import srd_fx
from srd_fx.cli import main
from srd_fx.eval.distributed import World

REPO = Path(__file__).resolve().parents[2]
TINYNET = """
import torch.nn as nn
def make(num_classes=5):
    return nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.ReLU(), nn.Conv2d(6, 8, 3, padding=1), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, num_classes))
"""
EXPLAIN = ["--model", "dist_tinynet:make", "--size", "24", "--threads", "1"]
EVALUATE = ["--size", "32", "--models", "resnet:relu", "--table4-models", "resnet:relu", "resnet:elu",
            "--methods", "GradCAM", "SRD-low", "SRD-input", "--metrics", "Pointing", "Fidelity", "Stability",
            "--n-images", "7", "--batch-size", "2", "--fidelity-runs", "3", "--stability-samples", "2",
            "--figure-images", "2", "--train-setting", "epochs=1", "--train-setting", "n_train=64",
            "--train-setting", "n_test=32", "--no-progress", "--threads", "1"]
TABLES = ["table2.md", "table2.csv", "table4.md", "table4.csv", "fig_maps.png"]


def _env(ws):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), str(ws)]), OMP_NUM_THREADS="1",
               MPLBACKEND="Agg", SRD_FX_CACHE=str(ws / "cache"))
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    return env


def _torchrun(ws, *argv, n=2, timeout=240):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={n}",
           "-m", "srd_fx", *argv]
    return subprocess.run(cmd, cwd=ws, env=_env(ws), capture_output=True, text=True, timeout=timeout)


def _files(folder):
    """name -> bytes of the visible files of a folder."""
    return {p.name: p.read_bytes() for p in sorted(Path(folder).iterdir()) if p.is_file() and not p.name.startswith(".")}


@pytest.fixture(scope="module")
def ws(tmp_path_factory):
    """A user's folder: a model factory, 5 small images, and the single-process reference runs."""
    ws = tmp_path_factory.mktemp("dist")
    (ws / "dist_tinynet.py").write_text(TINYNET)
    rng = np.random.default_rng(0)
    (ws / "imgs").mkdir()
    for i in range(5):
        Image.fromarray(rng.integers(0, 256, (24, 24, 3), dtype=np.uint8)).save(ws / "imgs" / f"im{i}.png")
    sys.path.insert(0, str(ws))
    cwd = os.getcwd()
    os.chdir(ws)
    try:
        assert main(["explain", "imgs", *EXPLAIN, "--out", "ref_maps"]) == 0
        assert main(["evaluate", *EVALUATE, "--cache-dir", str(ws / "cache"), "--out", "ref_eval"]) == 0
    finally:
        os.chdir(cwd)
        sys.path.remove(str(ws))
        sys.modules.pop("dist_tinynet", None)
    return ws


def test_share_covers_every_item_exactly_once():
    for size in range(1, 6):
        for n in range(0, 12):
            shares = [list(World(rank=r, size=size).share(n)) for r in range(size)]
            assert sorted(i for s in shares for i in s) == list(range(n)), (size, n)
            assert max(map(len, shares)) - min(map(len, shares)) <= 1  # balanced, no padding


def test_explain_two_processes_write_the_single_process_maps(ws):
    r = _torchrun(ws, "explain", "imgs", *EXPLAIN, "--out", "maps2")
    assert r.returncode == 0, r.stderr[-3000:]
    ref, got = _files(ws / "ref_maps"), _files(ws / "maps2")
    assert sorted(ref) == [f"im{i}_srd.{e}" for i in range(5) for e in ("npy", "png")]
    assert got == ref  # byte for byte, PNGs included
    # 5 images over 2 ranks: 3 and 2, each logged by the rank that wrote it
    logs = sorted((ws / "maps2" / ".srd_fx").glob("explain-done-rank*.jsonl"))
    assert [len(p.read_text().splitlines()) for p in logs] == [3, 2]
    assert "rank 1 of 2: imgs/im1.png" in r.stdout and "rank 0 of 2: imgs/im0.png" in r.stdout


def test_explain_failing_rank_keeps_the_others_and_a_resume_needs_the_same_world(ws, capsys, monkeypatch):
    bad = ws / "imgs_bad"
    bad.mkdir()
    for p in (ws / "imgs").iterdir():
        (bad / p.name).write_bytes(p.read_bytes())
    (bad / "im5.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")  # rank 1's last image (1, 3, 5)
    r = _torchrun(ws, "explain", "imgs_bad", *EXPLAIN, "--out", "maps_bad")
    assert r.returncode != 0
    assert re.search(r"rank 1 of 2: .*im5\.png", r.stderr), r.stderr[-3000:]
    # every other image is finished and is the single-process map
    assert _files(ws / "maps_bad") == _files(ws / "ref_maps")
    # the run is unfinished: resuming it with one process instead of two is refused, nothing rewritten
    before = {p: p.stat().st_mtime_ns for p in (ws / "maps_bad").rglob("*")}
    monkeypatch.chdir(ws)
    monkeypatch.syspath_prepend(str(ws))
    assert main(["explain", "imgs_bad", *EXPLAIN, "--out", "maps_bad"]) == 2
    err = capsys.readouterr().err
    assert "unfinished explain run of 2 process(es); this one has 1" in err and "--fresh" in err
    assert {p: p.stat().st_mtime_ns for p in (ws / "maps_bad").rglob("*")} == before
    # other settings are refused as well (the maps there would not be the ones asked for)
    assert main(["explain", "imgs_bad", *EXPLAIN, "--layer", "low", "--out", "maps_bad"]) == 2
    assert "layer: 'input' then, 'low' now" in capsys.readouterr().err
    sys.modules.pop("dist_tinynet", None)


def test_explain_killed_and_resumed_equals_uninterrupted(ws, monkeypatch, capsys):
    many = ws / "imgs_many"
    many.mkdir()
    rng = np.random.default_rng(1)
    for i in range(14):
        Image.fromarray(rng.integers(0, 256, (24, 24, 3), dtype=np.uint8)).save(many / f"m{i:02d}.png")
    log = ws / "maps_k" / ".srd_fx" / "explain-done-rank0.jsonl"
    p = subprocess.Popen([sys.executable, "-m", "srd_fx", "explain", "imgs_many", *EXPLAIN, "--out", "maps_k"],
                         cwd=ws, env=_env(ws), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        while p.poll() is None and not (log.exists() and len(log.read_text().splitlines()) >= 2):
            time.sleep(0.01)
        p.send_signal(signal.SIGKILL)
    finally:
        p.wait(timeout=60)
    assert p.returncode == -signal.SIGKILL, "the run finished before it could be killed"
    done = len(log.read_text().splitlines())
    assert 2 <= done < 14
    # a finished file that is not what the log says (cut short) is redone, never trusted
    first = json.loads(log.read_text().splitlines()[0])["item"]
    png = ws / "maps_k" / (Path(first).stem + "_srd.png")
    png.write_bytes(png.read_bytes()[:100])
    monkeypatch.chdir(ws)
    monkeypatch.syspath_prepend(str(ws))
    assert main(["explain", "imgs_many", *EXPLAIN, "--out", "maps_k"]) == 0
    assert f"skipped {done - 1} image(s)" in capsys.readouterr().out
    assert main(["explain", "imgs_many", *EXPLAIN, "--out", "maps_ref"]) == 0
    assert _files(ws / "maps_k") == _files(ws / "maps_ref")
    assert not [f for f in os.listdir(ws / "maps_k") if ".tmp-" in f]
    sys.modules.pop("dist_tinynet", None)


def test_two_inputs_with_one_output_name_are_refused(ws, monkeypatch, capsys):
    (ws / "other").mkdir(exist_ok=True)
    (ws / "other" / "im0.png").write_bytes((ws / "imgs" / "im0.png").read_bytes())
    monkeypatch.chdir(ws)
    monkeypatch.syspath_prepend(str(ws))
    assert main(["explain", "*/im0.png", *EXPLAIN, "--out", "clash"]) == 2
    err = capsys.readouterr().err
    assert "would both be written to" in err and "im0_srd.png" in err
    assert not (ws / "clash").exists()
    sys.modules.pop("dist_tinynet", None)


def test_unreachable_rendezvous_is_a_named_error(ws):
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = dict(_env(ws), RANK="1", WORLD_SIZE="2", LOCAL_RANK="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    r = subprocess.run([sys.executable, "-m", "srd_fx", "explain", "imgs", *EXPLAIN, "--out", "never",
                        "--dist-timeout", "2"], cwd=ws, env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 2
    assert f"rank 1 of 2: the rendezvous at 127.0.0.1:{port} is unreachable" in r.stderr
    assert "Traceback" not in r.stderr and not (ws / "never").exists()


def test_evaluate_two_processes_write_the_single_process_tables(ws):
    r = _torchrun(ws, "evaluate", *EVALUATE, "--cache-dir", str(ws / "cache"), "--out", "eval2")
    assert r.returncode == 0, r.stderr[-3000:]
    ref, got = _files(ws / "ref_eval"), _files(ws / "eval2")
    for name in TABLES:
        assert got[name] == ref[name], name
    run = json.loads(got["run.json"])
    assert run["table2"]["processes"] == 2 and run["table2"]["n_images"] == 7
    assert sorted(os.listdir(ws / "eval2")) == sorted(TABLES + ["run.json"])  # no partial scores left


def test_evaluate_killed_and_resumed_equals_uninterrupted(ws, monkeypatch, capsys):
    parts = ws / "eval_k" / ".srd_fx" / "evaluate"
    p = subprocess.Popen([sys.executable, "-m", "srd_fx", "evaluate", *EVALUATE, "--cache-dir", str(ws / "cache"),
                          "--out", "eval_k"], cwd=ws, env=_env(ws), stdout=subprocess.DEVNULL,
                         stderr=subprocess.DEVNULL)
    try:
        while p.poll() is None and len(list(parts.glob("*/*/batch-*.json"))) < 2:
            time.sleep(0.01)
        p.send_signal(signal.SIGKILL)
    finally:
        p.wait(timeout=60)
    assert p.returncode == -signal.SIGKILL, "the run finished before it could be killed"
    n = len(list(parts.glob("*/*/batch-*.json")))
    monkeypatch.chdir(ws)
    # other settings are refused (the saved scores are not theirs); nothing is removed
    assert main(["evaluate", *EVALUATE, "--seed", "1", "--cache-dir", str(ws / "cache"), "--out", "eval_k"]) == 2
    assert "other settings" in capsys.readouterr().err and len(list(parts.glob("*/*/batch-*.json"))) == n
    assert main(["evaluate", *EVALUATE, "--cache-dir", str(ws / "cache"), "--out", "eval_k"]) == 0
    assert f"resumed {n} batch(es)" in capsys.readouterr().err
    ref, got = _files(ws / "ref_eval"), _files(ws / "eval_k")
    for name in TABLES:
        assert got[name] == ref[name], name


# ----------------------------------------------------------------------------- zoo shards
ZOO = ["lcnet_035", "mobilenetv3_small_050", "resnet10t"]


def _zoo(*argv):
    from model_zoo_checks.cli import main as zoo_main
    return zoo_main(["--jobs", "0", "--quiet", "--no-compile-benchmark", *argv])


def _comparable(md: str) -> str:
    """REPORT.md without what differs between runs: the runs' commands and dates, times, load."""
    lines = [l for l in md.splitlines() if not l.startswith(("Produced by", "- Load average", "- Merged from", "- Run "))]
    return re.sub(r"\d+\.\d+", "#", "\n".join(lines))


def test_zoo_shards_merge_into_the_single_run_report(tmp_path, capsys):
    assert _zoo("--models", *ZOO, "--report", "--cache-dir", str(tmp_path / "one"),
                "--report-dir", str(tmp_path / "one")) == 0
    merged = tmp_path / "merged"
    for i in range(2):  # as on two machines: each its own cache, the shard files copied into one folder
        assert _zoo("--models", *ZOO, "--shard", f"{i}/2", "--cache-dir", str(tmp_path / f"node{i}"),
                    "--shard-dir", str(merged / "shards")) == 0
        assert not (tmp_path / f"node{i}" / "REPORT.md").exists()
    # one shard alone: the report names the missing one and lists its model as not run
    only0 = tmp_path / "only0"
    (only0 / "shards").mkdir(parents=True)
    (only0 / "shards" / "shard-0-of-2.jsonl").write_bytes((merged / "shards" / "shard-0-of-2.jsonl").read_bytes())
    assert _zoo("--report-only", "--cache-dir", str(only0), "--report-dir", str(only0)) == 1
    md0 = (only0 / "REPORT.md").read_text()
    assert "missing: 1/2" in md0 and "## Not run (1)\n\nmobilenetv3_small_050" in md0
    assert _zoo("--report-only", "--cache-dir", str(merged), "--report-dir", str(merged)) == 0
    md1, md2 = (tmp_path / "one" / "REPORT.md").read_text(), (merged / "REPORT.md").read_text()
    assert "Merged from 2 of 2 shards (0/2, 1/2)." in md2
    assert _comparable(md2) == _comparable(md1)
    j1, j2 = (json.loads((d / "report.json").read_text()) for d in (tmp_path / "one", merged))
    strip = lambda r: {k: v for k, v in r.items() if k not in ("times", "wall_s")}  # noqa: E731
    assert [strip(r) for r in j2["records"]] == [strip(r) for r in j1["records"]]
    assert j2["summary"]["passed"] == j1["summary"]["passed"] == 3
    # a resume split another way is refused, and writes nothing
    capsys.readouterr()
    assert _zoo("--models", *ZOO, "--shard", "0/3", "--cache-dir", str(tmp_path / "node0"),
                "--shard-dir", str(merged / "shards")) == 2
    assert "split in 2" in capsys.readouterr().err and not (merged / "shards" / "shard-0-of-3.jsonl").exists()
