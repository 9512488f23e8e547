"""Token models: SRD next to LXT (AttnLRP, CP-LRP), zennit and input x gradient.

    python -m model_zoo_checks.peers_tokens                  # both parts below; writes peers_tokens.json + REPORT.md
    python -m model_zoo_checks.peers_tokens --part maps --models vit_tiny_patch16_224 mixer_s16_224

Part ``maps`` (does a method give a map, and does it conserve?): every model of ``--models``
(default: the token CI subset, model_zoo_checks/ci_tokens.txt, plus the three timing models), built
as the zoo sweep builds it (float64, seeded weights, the zoo's input size), one sample, target =
the argmax.  *Produced a map*: a finite attribution of the input's spatial shape, no exception.
*Conserves*: ``|sum R^input - R^out| <= 1e-3 |R^out|`` with ``R^out`` the target logit (LXT,
zennit) or ``sum R^L`` minus SRD's reported ``lost`` (SRD: the same balance the zoo checks).

Part ``timing`` (cost next to input x gradient): ``--timing-models`` (default
vit_small_patch16_224, deit_small_patch16_224, swin_tiny_patch4_window7_224) at batch 8, 224 x 224,
float32, CPU, ``--threads`` torch threads (default 1), every parameter frozen, the predicted class
as target; the methods are those of ``benchmarks/bench.py`` (LXT's below).  On a shared machine the
load drifts from minute to minute, so all methods of one model are timed in one process,
interleaved: ``--warmup`` untimed rounds, then ``--repeats`` rounds that each set up every method in
turn, time one call (wall clock and the process's CPU time, which other jobs disturb less) and undo
the setup (hooks, LXT's patches); medians are reported.  Peak memory = ``VmHWM - VmRSS`` over one
call in a fresh process per (model, method) with glibc's mmap threshold at 4 KiB, as bench.py
measures it.  The results are written to ``--out`` after every model and every memory worker;
``--resume`` keeps those already measured with the same settings, so a run that is killed goes on
where it stopped:

    python -m model_zoo_checks.peers_tokens --part timing --resume --no-report   # one model at a time is fine:
    python -m model_zoo_checks.peers_tokens --part timing --timing-models swin_tiny_patch4_window7_224 --resume

SRD is measured only where ``srd_fx.compile`` accepts the model.

The methods:

* ``srd``: ``srd_fx.compile(model, example_input=x[:1])(x, target)``, the input map;
* ``ixg``: input x gradient (the reference of the ratios);
* ``lxt_attnlrp`` / ``lxt_cplrp``: LXT's efficient (gradient x input) implementation with the timm
  patch map and zennit composite of ``srd_fx.eval.lxt_patches`` (the evaluation's AttnLRP /
  CP-LRP baselines; see its docstring): LXT's norm and identity-rule patches, LXT's attention
  wrappers around ``F.scaled_dot_product_attention``, ``Gamma(0.25)`` on ``Conv2d`` and
  ``Gamma(0.05)`` on ``Linear`` outside the attention, as in LXT's ViT example;
* ``zennit_lrp``: zennit ``EpsilonPlusFlat`` with ``SequentialMergeBatchNorm`` (as for the CNNs),
  no attention support of its own.

Every (model, method) runs in its own process: LXT's patches change classes and functions for the
whole process.
"""
from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import math
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional

from .report import PEER_TOL as TOL
from .report import TOKEN_MAP_METHODS as MAP_METHODS
from .report import TOKEN_PEER_METHODS as METHODS
from .report import TOKEN_PEERS_JSON as OUT_JSON
from .report import token_peers_markdown as render_markdown

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
TIMING_MODELS = ("vit_small_patch16_224", "deit_small_patch16_224", "swin_tiny_patch4_window7_224")


# ------------------------------------------------------------------------------------ LXT for timm
def _lxt_bench(variant: str, model, x, t):
    """A bench.Bench for LXT on ``model``: srd_fx.eval.lxt_patches's patches and composite, undone
    by ``close``."""
    from benchmarks.bench import Bench
    from srd_fx.eval import lxt_patches
    stack = contextlib.ExitStack()
    stack.enter_context(lxt_patches.patched(variant))
    stack.enter_context(lxt_patches.composite().context(model))

    def run():
        xr = x.detach().requires_grad_(True)
        y = model(xr)
        y.gather(1, t[:, None]).sum().backward()
        return (xr * xr.grad).sum(1)
    return Bench(run, stack.close)


def setup(method: str, model, x, t):
    """A bench.Bench for ``method`` (benchmarks/bench.py's own for srd, ixg and zennit_lrp)."""
    if method.startswith("lxt_"):
        return _lxt_bench(method[4:], model, x, t)
    from benchmarks.bench import setup as bench_setup
    return bench_setup(method, model, x, t, "cpu", "float32")


# ------------------------------------------------------------------------------------ workers
def _error(e: BaseException) -> Dict:
    msg = str(e).strip().replace(str(REPO), "<repo>").replace(sys.prefix, "<python>")
    return dict(error=f"{type(e).__name__}: {msg.splitlines()[0][:300] if msg else ''}")


def map_worker(name: str, method: str) -> Dict:
    """Part ``maps`` for one (model, method), in this process."""
    import torch
    from .runner import Options, build_model, pick_input
    torch.set_num_threads(1)
    opts = Options()
    model = build_model(name, opts)
    x, ref = pick_input(model, opts)
    x1 = x[:1]
    t = ref[:1].argmax(1)
    rec: Dict = dict(input_size=list(x.shape[1:]))
    tic = time.perf_counter()
    try:
        if method == "srd":
            import srd_fx
            with torch.enable_grad():
                out = srd_fx.compile(model, example_input=x1)(x1, target=t)
            attr = out.saliency
            r_out = float(out.R_L.sum()) - float(out.lost.sum())
        else:
            # keep the Bench until the call is done: dropping it at once lets the garbage collector
            # finalise its context managers (LXT's patches, zennit's composite) before ``run`` runs,
            # and the map silently becomes plain input x gradient
            bench = setup(method, model, x1, t)
            try:
                attr = bench.run().detach()
            finally:
                bench.close()
            with torch.no_grad():
                r_out = float(model(x1)[0, t[0]])
    except Exception as e:  # a method that fails on a model: a result
        rec.update(produced=False, finite=False, conserved=False, **_error(e))
        rec["time_s"] = time.perf_counter() - tic
        return rec
    rec["time_s"] = time.perf_counter() - tic
    rec["finite"] = bool(torch.isfinite(attr).all())
    rec["produced"] = tuple(attr.shape[-2:]) == tuple(x.shape[-2:]) and rec["finite"]
    total = float(attr.sum())
    err = abs(total - r_out) / abs(r_out) if r_out else float("inf")
    rec.update(sum_R_input=total, R_out=r_out, conservation_rel_err=err if math.isfinite(err) else str(err),
               conserved=bool(rec["produced"] and math.isfinite(err) and err <= TOL))
    return rec


def _timing_inputs(name: str, batch: int, size: int):
    from benchmarks.bench import load_model, make_input, targets_of
    model = load_model(f"timm:{name}")
    x = make_input(batch, size)
    return model, x, targets_of(model, x, "cpu", "float32")


def time_worker(name: str, methods: List[str], batch: int, size: int, warmup: int, repeats: int) -> Dict:
    """Part ``timing`` for one model, every method in this process, interleaved: each round sets up
    every method in turn, times one call (wall clock and the process's CPU time, all threads) and
    undoes the setup (hooks, LXT's patches), so that all methods share the same minutes of a machine
    whose load drifts.  ``warmup`` untimed rounds come first.  Returns {method: record}."""
    from benchmarks.bench import error_line
    model, x, t = _timing_inputs(name, batch, size)
    recs: Dict[str, Dict] = {m: dict(times_s=[], cpu_s=[], setup_s=[]) for m in methods}
    for rnd in range(warmup + repeats):
        for m in methods:
            rec = recs[m]
            if rec.get("error"):
                continue
            try:
                tic = time.perf_counter()
                bench = setup(m, model, x, t)
                setup_s = time.perf_counter() - tic
                try:
                    c0, w0 = time.process_time(), time.perf_counter()
                    bench.run()
                    w1, c1 = time.perf_counter(), time.process_time()
                finally:
                    bench.close()
            except Exception as e:  # a method that fails on a model: a result
                recs[m] = dict(error=error_line(e))
                continue
            if rnd < warmup:
                rec.setdefault("warmup_s", []).append(w1 - w0)
            else:
                rec["times_s"].append(w1 - w0)
                rec["cpu_s"].append(c1 - c0)
                rec["setup_s"].append(setup_s)
    for m, rec in recs.items():
        if not rec.get("error") and rec["times_s"]:
            rec.update(median_s=statistics.median(rec["times_s"]), cpu_median_s=statistics.median(rec["cpu_s"]))
    return recs


def mem_worker(name: str, method: str, batch: int, size: int) -> Dict:
    """Part ``timing``, peak extra resident memory of one call (MiB), as benchmarks/bench.py measures it."""
    import gc
    from benchmarks.bench import _proc_status, _reset_hwm
    model, x, t = _timing_inputs(name, batch, size)
    bench = setup(method, model, x, t)
    bench.run()
    gc.collect()
    base = _proc_status()["VmRSS"]
    if not _reset_hwm():
        return dict(error="no /proc/self/clear_refs: peak memory not measurable here")
    bench.run()
    return dict(peak_mb=(_proc_status()["VmHWM"] - base) / 1024, mem_method="VmHWM-VmRSS (clear_refs)")


def _in_process(kind: str, spec: Dict, timeout: float, threads: int) -> Dict:
    """Run one worker in a fresh process (``python -m model_zoo_checks.peers_tokens --_worker``)."""
    from benchmarks.bench import MMAP_THRESHOLD
    env = dict(os.environ, OMP_NUM_THREADS=str(threads),
               PYTHONPATH=os.pathsep.join([str(REPO)] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]))
    if kind == "mem":
        env.update(MALLOC_MMAP_THRESHOLD_=str(MMAP_THRESHOLD), MALLOC_TRIM_THRESHOLD_=str(MMAP_THRESHOLD))
        env.pop("MALLOC_MMAP_MAX_", None)
    cmd = [sys.executable, "-m", "model_zoo_checks.peers_tokens", "--_worker", json.dumps(dict(spec, kind=kind, threads=threads))]
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout, cwd=str(REPO))
    except subprocess.TimeoutExpired:
        return dict(error=f"timeout: still running after {timeout:.0f} s (killed)")
    lines = [l for l in p.stdout.splitlines() if l.startswith("PEERS_WORKER ")]
    if p.returncode != 0 or not lines:
        tail = (p.stderr or p.stdout).strip().splitlines()[-1:] or ["no output"]
        return dict(error=f"worker failed (rc {p.returncode}): {tail[0][:300]}")
    return json.loads(lines[-1][len("PEERS_WORKER "):])


def _worker_main(spec: Dict) -> int:
    import torch
    torch.set_num_threads(spec.get("threads", 1))
    import warnings
    warnings.filterwarnings("ignore")
    kind = spec["kind"]
    try:
        if kind == "map":
            rec = map_worker(spec["model"], spec["method"])
        elif kind == "time":
            rec = time_worker(spec["model"], spec["methods"], spec["batch"], spec["size"], spec["warmup"], spec["repeats"])
        else:
            rec = mem_worker(spec["model"], spec["method"], spec["batch"], spec["size"])
    except Exception as e:  # reported as the method's failure on this model
        rec = _error(e)
    print("PEERS_WORKER " + json.dumps(rec, default=str), flush=True)
    return 0


def _save(path: Path, doc: Dict) -> None:
    """Write ``doc`` to ``path`` atomically (a run killed mid-write leaves the previous file)."""
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(doc, indent=1, default=str))
    os.replace(tmp, path)


def default_map_models() -> List[str]:
    from .lists import parse_entry, read_list
    from .runner import CI_TOKENS
    names = [parse_entry(l)[0] for l in read_list(CI_TOKENS)] if CI_TOKENS.exists() else []
    return names + [n for n in TIMING_MODELS if n not in names]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m model_zoo_checks.peers_tokens",
                                description="SRD next to LXT (AttnLRP, CP-LRP), zennit and input x gradient on timm "
                                            "token models: maps, conservation, time and peak memory.")
    p.add_argument("--part", choices=("maps", "timing", "both"), default="both")
    p.add_argument("--models", nargs="+", default=None, help="models of the maps part (default: the token CI subset "
                                                             "and the timing models)")
    p.add_argument("--timing-models", nargs="+", default=list(TIMING_MODELS))
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--repeats", type=int, default=3, help="timed rounds (each times every method once)")
    p.add_argument("--warmup", type=int, default=1, help="untimed rounds first")
    p.add_argument("--timeout", type=float, default=1800.0,
                   help="per worker, seconds (timing: one worker per model, all methods; memory and maps: one per "
                        "(model, method))")
    p.add_argument("--resume", action="store_true",
                   help="timing: keep the (model, method) results already in --out that were measured with the same "
                        "settings, measure only the rest (a run killed half way goes on where it stopped)")
    p.add_argument("--no-memory", dest="memory", action="store_false")
    p.add_argument("--no-report", dest="report", action="store_false", help="do not rewrite REPORT.md")
    p.add_argument("--out", default=str(OUT_JSON),
                   help="the JSON file the results are merged into (default model_zoo_checks/peers_tokens.json)")
    p.add_argument("--_worker", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args._worker:
        return _worker_main(json.loads(args._worker))
    out_json = Path(args.out)
    doc = json.loads(out_json.read_text()) if out_json.exists() else {}
    cmd = "python -m model_zoo_checks.peers_tokens " + " ".join(sys.argv[1:] if argv is None else argv)
    now = datetime.datetime.now().strftime("%Y-%m-%d %H:%M")
    if args.part in ("maps", "both"):
        maps = doc.get("maps") or {}
        for n in args.models or default_map_models():
            maps.setdefault(n, {})
            for m in [m for m in args.methods if m in MAP_METHODS]:
                maps[n][m] = r = _in_process("map", dict(model=n, method=m), args.timeout, args.threads)
                print(f"maps {n} {m}: " + (r.get("error") or f"produced={r.get('produced')} conserved={r.get('conserved')} "
                                                            f"err={r.get('conservation_rel_err')}"), file=sys.stderr)
            doc.update(maps=maps, maps_command=cmd.strip(), maps_generated=now)
            _save(out_json, doc)
    if args.part in ("timing", "both"):
        settings = dict(batch=args.batch, size=args.size, threads=args.threads, repeats=args.repeats, warmup=args.warmup)
        tim = doc.get("timing") or {}
        for n in args.timing_models:
            rows = tim.get(n) or {}
            same = rows.get("_settings") == settings
            todo = [m for m in args.methods if not (args.resume and same and (rows.get(m) or {}).get("median_s"))]
            if todo:
                load0 = os.getloadavg()[0]
                spec = dict(model=n, methods=todo, batch=args.batch, size=args.size, warmup=args.warmup,
                            repeats=args.repeats)
                got = _in_process("time", spec, args.timeout, args.threads)
                if not same:
                    rows = {}
                stamp = dict(measured=datetime.datetime.now().strftime("%Y-%m-%d %H:%M"),
                             load_avg=f"{load0:.1f}-{os.getloadavg()[0]:.1f}")
                for m in todo:
                    rows[m] = dict(got.get(m) or {"error": got.get("error", "no result")}, **stamp)
                rows["_settings"], rows["_command"] = settings, cmd.strip()
                tim[n] = rows
                doc.update(timing=tim, timing_command=cmd.strip(), timing_generated=now, timing_settings=settings)
                _save(out_json, doc)  # resumable: a model measured is kept even if a later one is killed
            for m in args.methods if args.memory else ():
                r = rows.get(m) or {}
                if r.get("error") or (args.resume and same and r.get("peak_mb") is not None and m not in todo):
                    continue
                mem = _in_process("mem", dict(model=n, method=m, batch=args.batch, size=args.size), args.timeout,
                                  args.threads)
                r.update({k: v for k, v in mem.items() if k in ("peak_mb", "mem_method")})
                if mem.get("error"):
                    r["mem_error"] = mem["error"]
                _save(out_json, doc)
            for m in args.methods:
                r = rows.get(m) or {}
                print(f"timing {n} {m}: " + (r.get("error") or
                                             f"{r.get('median_s', float('nan')):.3f} s wall, {r.get('cpu_median_s', float('nan')):.3f} s CPU, "
                                             f"{r.get('peak_mb', float('nan')):.0f} MiB"), file=sys.stderr)
    import lxt
    import timm
    import torch
    import zennit
    doc["versions"] = dict(lxt=getattr(lxt, "__version__", "2.1"), zennit=getattr(zennit, "__version__", "?"),
                           timm=timm.__version__, torch=torch.__version__)
    _save(out_json, doc)
    print(render_markdown(doc))
    if args.report:
        from .report import write_report
        from .runner import Options, code_fingerprint
        write_report([], {}, fingerprint=code_fingerprint(Options()), command="", meta=None)
        print("rewrote model_zoo_checks/REPORT.md", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
