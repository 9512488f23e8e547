#!/usr/bin/env python
"""Cost of an SRD explanation next to input x gradient, zennit LRP, captum LRP and GradCAM.

One script, one process for the timings (peak memory on CPU is read in fresh worker processes of
this same script, see "Peak memory" below).  Sections (``--sections``):

* ``table``    forward, input x gradient, SRD and the baselines on each model of ``--models`` at
               each batch of ``--batches`` (and, on CUDA, each dtype of ``--dtypes``);
* ``batch``    SRD and input x gradient time (and memory) against batch size on one model;
* ``size``     the same against the input size;
* ``profile``  ``torch.profiler`` top ops of one SRD call, and the number of Python function
               calls and aten op calls of one SRD call at two batch sizes, two input sizes and two
               channel widths (equal counts: no Python loop over samples, positions or channels);
* ``compile``  wall-clock time of ``srd_fx.compile`` for each model of the table;
* ``gpu``      (CUDA only) images/s of forward, input x gradient and SRD at ``--gpu-batch``.

It writes ``report.md`` (tables of ratios to input x gradient), ``results.json``, ``bench.png``
and ``profile.txt`` to ``--out``.

Definitions (the same for every method):

* the model is in eval mode and every parameter has ``requires_grad=False``, so no method pays for
  weight gradients (the row "input x gradient, params require grad" shows what a naive
  ``loss.backward()`` with trainable parameters costs);
* the target of every sample is the predicted class, computed once outside the timed region and
  passed to every method;
* input x gradient = ``x.grad * x`` after one ``backward()`` of the target logits, summed over
  channels to a (B, H, W) map;
* SRD = ``explainer(x, target)`` under ``torch.no_grad()`` with ``explainer =
  srd_fx.compile(model, example_input=x[:1])`` (head "gradcam", the input map only);
* a method's one-time setup (compiling the explainer, building a zennit composite and registering
  its hooks, wrapping the model in captum/pytorch-grad-cam objects) is not timed;
* time: median of ``--repeats`` calls after ``--warmup`` calls; ``time.perf_counter`` on CPU, CUDA
  events (with a synchronise before the start event) on a GPU;
* peak memory: on CUDA ``torch.cuda.max_memory_allocated()`` during one call minus the memory
  allocated before it; on CPU, each (model, batch, method) runs in a fresh worker process with
  glibc's mmap threshold pinned at 4 KiB (so freed tensor buffers go back to the OS and the
  resident set follows the live tensors), which sets up the method, runs it once, then resets the
  kernel's peak-RSS counter (``/proc/self/clear_refs``) and reports ``VmHWM - VmRSS`` over a
  second call: the extra resident memory one call needs beyond the loaded model and the method's
  setup.
"""
from __future__ import annotations

import argparse
import contextlib
import datetime
import gc
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time
import traceback
from pathlib import Path
from typing import Callable, Dict, List, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]

DEFAULT_MODELS = "torchvision:resnet50,torchvision:vgg16,timm:efficientnet_b0,timm:convnext_tiny"
#: --quick checks that every code path runs (a torchvision and a timm model), not the big models
QUICK_MODELS = "torchvision:resnet18,timm:efficientnet_b0"
METHODS = ("forward", "ixg", "ixg_pgrad", "srd", "zennit_lrp", "captum_lrp", "gradcam")
LABELS = {
    "forward": "forward (no grad)",
    "ixg": "input×gradient",
    "ixg_pgrad": "input×gradient, params require grad",
    "srd": "SRD (srd_fx)",
    "srd_tc": "SRD, torch.compile",
    "ixg_tc": "input×gradient, torch.compile",
    "zennit_lrp": "zennit LRP EpsilonPlusFlat",
    "captum_lrp": "captum LRP",
    "gradcam": "GradCAM (pytorch-grad-cam)",
}
SHORT = {"forward": "forward", "ixg": "ixg", "ixg_pgrad": "ixg+pgrad", "srd": "SRD", "srd_tc": "SRD tc",
         "ixg_tc": "ixg tc", "zennit_lrp": "zennit LRP", "captum_lrp": "captum LRP", "gradcam": "GradCAM"}
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
MMAP_THRESHOLD = 4096  # bytes: every tensor buffer above one page is its own mapping

FULL = dict(size=224, batches=(1, 8), repeats=5, warmup=2, scaling_batches=(1, 2, 4, 8, 16),
            scaling_sizes=(112, 224, 448), size_batch=1, profile_size=112, compile_repeats=3, gpu_batch=64)
QUICK = dict(size=64, batches=(1, 2), repeats=2, warmup=1, scaling_batches=(1, 2, 4), scaling_sizes=(64, 96),
             size_batch=1, profile_size=64, compile_repeats=1, gpu_batch=8)


# ============================================================================ models and inputs ====
def load_model(name: str, device="cpu") -> nn.Module:
    """A torchvision or timm model by name ("torchvision:resnet50", "timm:convnext_tiny"), random
    weights (seed 0), eval mode, every parameter frozen."""
    from srd_fx.eval.io import load_model as _load
    torch.manual_seed(0)
    model = _load(name).to(device).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def make_input(batch: int, size: int, device="cpu") -> torch.Tensor:
    """The four scikit-image photographs (chelsea, coffee, astronaut, rocket), cycled to fill the
    batch, resized to size x size and normalised with the ImageNet statistics."""
    from skimage import data
    imgs = [getattr(data, n)() for n in ("chelsea", "coffee", "astronaut", "rocket")]
    ts = [F.interpolate(torch.from_numpy(im).permute(2, 0, 1)[None].float() / 255, size=(size, size),
                        mode="bilinear", antialias=True, align_corners=False) for im in imgs]
    x = torch.cat([ts[i % len(ts)] for i in range(batch)])
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    return ((x - mean) / std).contiguous().to(device)


def short_name(model_name: str) -> str:
    return model_name.split(":")[-1]


def no_inplace(model: nn.Module):
    """Turn off ``inplace`` on activation modules for the duration (zennit's and captum's backward
    hooks cannot wrap in-place ops): the evaluation harness's own context manager."""
    from srd_fx.eval.baselines import no_inplace as _no_inplace
    return _no_inplace(model)


def amp(device: str, dtype: str):
    """The autocast context for ``dtype`` (float32: none)."""
    if dtype == "float32":
        return contextlib.nullcontext()
    return torch.autocast(device_type=device, dtype=DTYPES[dtype])


# ============================================================================ methods ==============
class Bench:
    """A method set up on one model: ``run()`` explains the fixed input once; ``close()`` undoes the
    setup (hooks, in-place flags, requires_grad)."""

    def __init__(self, run: Callable[[], object], close: Callable[[], None] = lambda: None):
        self.run, self.close = run, close


_SRD_CACHE: Dict[tuple, object] = {}


def srd_explainer(model, x):
    """The explainer of ``model`` for inputs shaped like ``x`` (compiled once per shape)."""
    import srd_fx
    key = (id(model), tuple(x.shape[1:]), x.dtype, str(x.device))
    if key not in _SRD_CACHE:
        _SRD_CACHE[key] = srd_fx.compile(model, example_input=x[:1])
    return _SRD_CACHE[key]


def setup(method: str, model: nn.Module, x: torch.Tensor, t: torch.Tensor, device: str, dtype: str) -> Bench:
    ctx = lambda: amp(device, dtype)  # noqa: E731

    if method == "forward":
        def run():
            with torch.no_grad(), ctx():
                return model(x)
        return Bench(run)

    if method in ("ixg", "ixg_pgrad", "ixg_tc"):
        params = list(model.parameters())
        net = torch.compile(model) if method == "ixg_tc" else model
        if method == "ixg_pgrad":
            for p in params:
                p.requires_grad_(True)

        def run():
            xr = x.detach().requires_grad_(True)
            with ctx():
                logits = net(xr)
            logits.gather(1, t[:, None]).sum().backward()
            out = (xr.grad * xr.detach()).sum(1)
            if method == "ixg_pgrad":
                for p in params:
                    p.grad = None
            return out

        def close():
            for p in params:
                p.requires_grad_(False)
                p.grad = None
        return Bench(run, close)

    if method in ("srd", "srd_tc"):
        explainer = srd_explainer(model, x)
        if method == "srd":
            def run():
                with torch.no_grad(), ctx():
                    return explainer(x, target=t).saliency
        else:
            gm = torch.compile(explainer.graph_module)

            def run():
                with torch.no_grad(), ctx():
                    return gm(x, t)["saliency"]
        return Bench(run)

    if method == "zennit_lrp":
        from zennit.attribution import Gradient
        from zennit.canonizers import SequentialMergeBatchNorm
        from zennit.composites import EpsilonPlusFlat
        from zennit.torchvision import ResNetCanonizer, VGGCanonizer
        import torchvision
        if isinstance(model, torchvision.models.ResNet):
            canonizers = [ResNetCanonizer()]
        elif isinstance(model, torchvision.models.VGG):
            canonizers = [VGGCanonizer()]
        else:
            canonizers = [SequentialMergeBatchNorm()]
        stack = contextlib.ExitStack()
        stack.enter_context(no_inplace(model))
        attributor = stack.enter_context(Gradient(model=model, composite=EpsilonPlusFlat(canonizers=canonizers)))
        onehot = lambda y: F.one_hot(t, y.shape[-1]).to(y.dtype)  # noqa: E731

        def run():
            with ctx():
                _, rel = attributor(x, onehot)
            return rel.sum(1)
        return Bench(run, stack.close)

    if method == "captum_lrp":
        from captum.attr import LRP
        stack = contextlib.ExitStack()
        stack.enter_context(no_inplace(model))
        lrp = LRP(model)

        def run():
            with ctx():
                return lrp.attribute(x.detach().requires_grad_(True), target=t).sum(1)
        return Bench(run, stack.close)

    if method == "gradcam":
        from pytorch_grad_cam import GradCAM
        from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget
        from srd_fx.eval.models import cam_layers, get_module
        low, _ = cam_layers(model, x)
        cam = GradCAM(model=model, target_layers=[get_module(model, low)])
        targets = [ClassifierOutputTarget(int(c)) for c in t]

        def run():
            with ctx():
                # the input carries the graph (the parameters are frozen), as for input x gradient
                return cam(input_tensor=x.detach().requires_grad_(True), targets=targets)
        return Bench(run, cam.activations_and_grads.release)

    raise ValueError(f"unknown method {method!r}; choose from {', '.join(LABELS)}")


def targets_of(model, x, device, dtype):
    with torch.no_grad(), amp(device, dtype):
        return model(x).argmax(1)


# ============================================================================ timing ===============
def sync(device):
    if device == "cuda":
        torch.cuda.synchronize()


def time_calls(fn, device: str, warmup: int, repeats: int):
    """Seconds per call of ``fn``: (the ``warmup`` calls, the ``repeats`` timed calls after them)."""
    first = []
    for _ in range(warmup):
        t0 = time.perf_counter()
        fn()
        sync(device)
        first.append(time.perf_counter() - t0)
    return first, [timed_call(fn, device) for _ in range(repeats)]


def error_line(e: BaseException) -> str:
    """A failure as one line: the exception's type and the first line of its message."""
    msg = str(e).strip()
    return f"{type(e).__name__}: {msg.splitlines()[0][:200] if msg else ''}"


def timed_call(fn, device: str) -> float:
    """Seconds taken by one call of ``fn`` (CUDA events on a GPU)."""
    if device == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda.synchronize()
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        return start.elapsed_time(end) / 1e3
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def time_interleaved(make, keys, device: str, warmup: int, rounds: int, fresh=False):
    """Round-robin timing: every round times one call of each key in turn, so that all keys share
    the same minutes of a machine whose load drifts.  ``make(key)`` returns a Bench; with ``fresh``
    it is set up anew (and warmed up once) every round, e.g. for methods that install hooks.
    Returns {key: dict(times_s, warmup_s, minor_faults, system_s, cpu_s)} or {key: dict(error)}
    (``cpu_s``: the process's user + system CPU time of the call, all threads: less sensitive than the
    wall time to other jobs on the machine)."""
    import resource
    res, benches = {}, {}
    for k in keys:
        try:
            bench = make(k)
            first, _ = time_calls(bench.run, device, max(warmup, 1), 0)
            res[k] = dict(times_s=[], warmup_s=first, minor_faults=[], system_s=[], cpu_s=[])
            if fresh:
                bench.close()
            else:
                benches[k] = bench
        except Exception as e:  # noqa: BLE001  (a library failing on a model is a result)
            res[k] = dict(error=error_line(e))
    for _ in range(rounds):
        for k in keys:
            if "error" in res[k]:
                continue
            bench = benches[k] if not fresh else make(k)
            try:
                if fresh:
                    bench.run()
                r0 = resource.getrusage(resource.RUSAGE_SELF)
                res[k]["times_s"].append(timed_call(bench.run, device))
                r1 = resource.getrusage(resource.RUSAGE_SELF)
                res[k]["minor_faults"].append(r1.ru_minflt - r0.ru_minflt)
                res[k]["system_s"].append(r1.ru_stime - r0.ru_stime)
                res[k]["cpu_s"].append(r1.ru_utime + r1.ru_stime - r0.ru_utime - r0.ru_stime)
            except Exception as e:  # noqa: BLE001  (e.g. out of memory at the largest point: a result)
                res[k] = dict(error=error_line(e))
            if fresh:
                bench.close()
    for bench in benches.values():
        bench.close()
    return res


def cuda_peak_mb(fn) -> float:
    """Peak CUDA memory allocated during one call of ``fn`` beyond what was allocated before (MiB)."""
    gc.collect()
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2 ** 20


def _proc_status() -> Dict[str, int]:
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(("VmRSS", "VmHWM")):
                k, v = line.split(":")
                out[k] = int(v.split()[0])  # KiB
    return out


def _reset_hwm() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def cpu_peak_mb_in_worker(spec: dict) -> dict:
    """Run ``spec`` (model, size, batch, method, threads) in a fresh worker process; returns
    {"peak_mb", "setup_mb", "mem_method"} or {"error"}."""
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_=str(MMAP_THRESHOLD), MALLOC_TRIM_THRESHOLD_=str(MMAP_THRESHOLD))
    env.pop("MALLOC_MMAP_MAX_", None)  # (--no-mmap's setting would keep freed memory in the heap: no peak to read)
    cmd = [sys.executable, str(Path(__file__).resolve()), "--_worker", json.dumps(spec)]
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=spec.get("timeout", 1800))
    except subprocess.TimeoutExpired:
        return {"error": "memory worker timed out"}
    lines = [l for l in p.stdout.splitlines() if l.startswith("BENCH_WORKER ")]
    if p.returncode != 0 or not lines:
        tail = (p.stderr or p.stdout).strip().splitlines()[-1:] or ["no output"]
        return {"error": f"memory worker failed (rc {p.returncode}): {tail[0][:200]}"}
    return json.loads(lines[-1][len("BENCH_WORKER "):])


def worker_main(spec: dict) -> int:
    """The body of a memory worker (``--_worker SPEC``)."""
    if spec.get("threads"):
        torch.set_num_threads(spec["threads"])
    model = load_model(spec["model"])
    x = make_input(spec["batch"], spec["size"])
    t = targets_of(model, x, "cpu", "float32")
    gc.collect()
    loaded = _proc_status()["VmRSS"]
    bench = setup(spec["method"], model, x, t, "cpu", "float32")
    bench.run()  # first call: lazy allocations (hooks, kernel caches) belong to the setup
    gc.collect()
    base = _proc_status()["VmRSS"]
    if _reset_hwm():
        bench.run()
        peak = _proc_status()["VmHWM"]
        how = "VmHWM-VmRSS (clear_refs)"
    else:  # no clear_refs (not Linux): ru_maxrss is a lifetime maximum, so this is a lower bound
        import resource
        bench.run()
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        how = "ru_maxrss-VmRSS (lower bound)"
    print("BENCH_WORKER " + json.dumps({"peak_mb": (peak - base) / 1024, "setup_mb": (base - loaded) / 1024,
                                        "mem_method": how}), flush=True)
    return 0


# ============================================================================ one measurement ======
def measure(method, model, model_name, x, t, *, device, dtype, cfg, memory=True) -> dict:
    """Time ``method`` (and its peak memory); failures are recorded, not raised."""
    rec = dict(model=short_name(model_name), method=method, label=LABELS[method], batch=int(x.shape[0]),
               size=int(x.shape[-1]), dtype=dtype, device=device)
    bench = None
    try:
        bench = setup(method, model, x, t, device, dtype)
        warm, times = time_calls(bench.run, device, cfg["warmup"], cfg["repeats"])
        rec.update(status="ok", times_s=times, median_s=statistics.median(times), warmup_s=warm)
        if memory and device == "cuda":
            rec.update(peak_mb=cuda_peak_mb(bench.run), mem_method="torch.cuda.max_memory_allocated")
    except Exception as e:  # noqa: BLE001  (a library failing on a model is a result)
        rec.update(status="fails", error=error_line(e))
        if cfg.get("verbose"):
            traceback.print_exc()
    finally:
        if bench is not None:
            try:
                bench.close()
            except Exception:  # noqa: BLE001
                pass
        gc.collect()
        if device == "cuda":
            torch.cuda.empty_cache()
    # (on CPU a worker would recompile a torch.compile'd method: its memory is not measured there)
    if memory and device == "cpu" and rec["status"] == "ok" and dtype == "float32" and not method.endswith("_tc"):
        mem = cpu_peak_mb_in_worker(dict(model=model_name, size=rec["size"], batch=rec["batch"], method=method,
                                         threads=cfg.get("threads")))
        if "error" in mem:
            rec["mem_error"] = mem["error"]
        else:
            rec.update(mem)
    return rec


def log(msg):
    print(f"[{datetime.datetime.now():%H:%M:%S}] {msg}", flush=True)


def fmt_rec(r):
    if r["status"] != "ok":
        return f"{r['model']} b{r['batch']} {r['size']}px {r['dtype']} {r['method']}: FAILS ({r['error']})"
    mem = f", peak {r['peak_mb']:.0f} MiB" if "peak_mb" in r else ""
    return f"{r['model']} b{r['batch']} {r['size']}px {r['dtype']} {r['method']}: {r['median_s'] * 1e3:.1f} ms{mem}"


# ============================================================================ sections =============
def section_table(args, cfg, device, res):
    methods = list(METHODS) + (["ixg_tc", "srd_tc"] if args.torch_compile else [])
    rows = res.setdefault("table", [])
    for name in args.models:
        model = load_model(name, device)
        for batch in cfg["batches"]:
            x = make_input(batch, cfg["size"], device)
            for dtype in args.dtypes:
                t = targets_of(model, x, device, dtype)
                for m in methods:
                    r = measure(m, model, name, x, t, device=device, dtype=dtype, cfg=cfg, memory=args.memory)
                    rows.append(r)
                    log(fmt_rec(r))
        _SRD_CACHE.clear()
        del model
        gc.collect()


def section_scaling(args, cfg, device, res, kind):
    """SRD and input×gradient at each batch size (or input size), timed interleaved: every round
    calls each (point, method) once, so a drift of the machine's load does not pass for
    non-linearity."""
    name = args.scaling_model
    model = load_model(name, device)
    pts = cfg["scaling_batches"] if kind == "batch" else cfg["scaling_sizes"]
    inputs = {}
    for v in pts:
        batch, size = (v, cfg["size"]) if kind == "batch" else (cfg["size_batch"], v)
        x = make_input(batch, size, device)
        inputs[v] = (x, targets_of(model, x, device, "float32"))
    keys = [(v, m) for v in pts for m in ("ixg", "srd")]
    timed = time_interleaved(lambda k: setup(k[1], model, *inputs[k[0]], device, "float32"), keys, device,
                             cfg["warmup"], cfg["repeats"])
    rows = []
    for (v, m), tr in timed.items():
        x = inputs[v][0]
        rec = dict(model=short_name(name), method=m, label=LABELS[m], batch=int(x.shape[0]), size=int(x.shape[-1]),
                   dtype="float32", device=device, timing="interleaved")
        if "error" in tr:
            rec.update(status="fails", error=tr["error"])
        else:
            rec.update(status="ok", median_s=statistics.median(tr["times_s"]), min_s=min(tr["times_s"]), **tr)
            if args.memory and device == "cuda":
                bench = setup(m, model, *inputs[v], device, "float32")
                rec.update(peak_mb=cuda_peak_mb(bench.run), mem_method="torch.cuda.max_memory_allocated")
                bench.close()
            elif args.memory:
                mem = cpu_peak_mb_in_worker(dict(model=name, size=rec["size"], batch=rec["batch"], method=m,
                                                 threads=cfg.get("threads")))
                rec.update({"mem_error": mem["error"]} if "error" in mem else mem)
        rows.append(rec)
        log(f"[{kind} scaling] " + fmt_rec(rec))
    res[f"{kind}_scaling"] = dict(model=short_name(name), rows=rows)
    if kind == "batch":
        res["batch_scaling"]["fit"] = {m: linear_fit([r for r in rows if r["method"] == m]) for m in ("ixg", "srd")}
    _SRD_CACHE.clear()


def linear_fit(rows):
    """Least-squares t(B) = a + b B; per point, the per-image time beyond the fixed overhead a,
    (t(B) - a) / B, relative to b."""
    pts = [(r["batch"], r["median_s"]) for r in rows if r["status"] == "ok"]
    if len(pts) < 2:
        return None
    n = len(pts)
    mb = sum(p[0] for p in pts) / n
    mt = sum(p[1] for p in pts) / n
    sbb = sum((p[0] - mb) ** 2 for p in pts)
    b = sum((p[0] - mb) * (p[1] - mt) for p in pts) / sbb
    a = mt - b * mb
    dev = [[int(B), ((tt - a) / B - b) / b] for B, tt in sorted(pts)]
    return dict(a_s=a, b_s=b, per_image_dev=dev, max_abs_dev=max(abs(d) for _, d in dev))


class _CallCounter:
    """Counts, during a block, the Python function calls made in srd_fx's own code (the package, its
    rules and the generated twin) and the torch functions called from Python (a
    ``TorchFunctionMode`` sees each call issued by Python code, not the ops torch runs inside it)."""

    def __init__(self):
        self.py = 0
        self.torch = 0
        self.roots = (str(REPO / "srd_fx"), "<eval_with_key")

    def __enter__(self):
        from torch.overrides import TorchFunctionMode
        counter = self

        class Mode(TorchFunctionMode):
            def __torch_function__(self, func, types, args=(), kwargs=None):
                if getattr(func, "__name__", "") != "__get__":  # attribute reads (x.shape) are not ops
                    counter.torch += 1
                return func(*args, **(kwargs or {}))

        def prof(frame, event, arg):
            if event == "call" and frame.f_code.co_filename.startswith(self.roots):
                self.py += 1
        self._mode = Mode()
        self._mode.__enter__()
        sys.setprofile(prof)
        return self

    def __exit__(self, *exc):
        sys.setprofile(None)
        self._mode.__exit__(*exc)


def _one_call_counts(model, batch, size, device):
    x = make_input(batch, size, device)
    explainer = srd_explainer(model, x)
    with torch.no_grad():
        explainer(x)  # warm-up
        with _CallCounter() as cc:
            explainer(x)
        sync(device)
    return dict(batch=batch, size=size, python_calls=cc.py, torch_calls=cc.torch)


def section_profile(args, cfg, device, res, out_dir):
    from torch.profiler import ProfilerActivity, profile
    name = args.scaling_model
    model = load_model(name, device)
    batch = max(cfg["batches"])
    x = make_input(batch, cfg["size"], device)
    explainer = srd_explainer(model, x)
    code = explainer.code
    loops = sum(1 for line in code.splitlines() if line.strip().startswith(("for ", "while ")))
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
    with torch.no_grad():
        explainer(x)
        sync(device)
        with profile(activities=acts) as prof:
            explainer(x)
            sync(device)
    ka = prof.key_averages()
    sort = "self_cpu_time_total"
    if device == "cuda":
        sort = "self_device_time_total" if hasattr(ka[0], "self_device_time_total") else "self_cuda_time_total"
    table = ka.table(sort_by=sort, row_limit=20)
    (out_dir / "profile.txt").write_text(
        f"torch.profiler, one SRD call, {short_name(name)} batch {batch} {cfg['size']}x{cfg['size']} on {device}, "
        f"sorted by {sort}\n\n{table}\n")
    top = []
    for e in sorted(ka, key=lambda e: getattr(e, sort), reverse=True)[:15]:
        top.append(dict(op=e.key, calls=e.count, self_ms=getattr(e, sort) / 1e3))
    total = sum(getattr(e, sort) for e in ka) / 1e3
    # invariance of the call counts
    s = cfg["profile_size"]
    counts = [dict(model=short_name(name), **_one_call_counts(model, 1, s, device)),
              dict(model=short_name(name), **_one_call_counts(model, 2, s, device)),
              dict(model=short_name(name), **_one_call_counts(model, 1, 2 * s, device))]
    wide = args.wide_model
    if wide:
        try:
            wm = load_model(wide, device)
            counts.append(dict(model=short_name(wide), **_one_call_counts(wm, 1, s, device)))
            del wm
        except Exception as e:  # noqa: BLE001
            counts.append(dict(model=short_name(wide), error=f"{type(e).__name__}: {e}"[:200]))
    res["profile"] = dict(model=short_name(name), batch=batch, size=cfg["size"], sort=sort, top=top,
                          total_self_ms=total, generated_loops=loops, generated_lines=len(code.splitlines()),
                          counts=counts)
    log(f"[profile] top op {top[0]['op']}; loops in generated code: {loops}; counts {counts}")
    _SRD_CACHE.clear()


def section_compile(args, cfg, device, res):
    import srd_fx
    rows = []
    for name in args.models:
        model = load_model(name, device)
        x = make_input(1, cfg["size"], device)
        times = []
        try:
            for _ in range(cfg["compile_repeats"]):
                gc.collect()
                t0 = time.perf_counter()
                srd_fx.compile(model, example_input=x)
                times.append(time.perf_counter() - t0)
            rows.append(dict(model=short_name(name), size=cfg["size"], times_s=times, median_s=statistics.median(times)))
            log(f"[compile] {short_name(name)}: {statistics.median(times):.2f} s")
        except Exception as e:  # noqa: BLE001
            rows.append(dict(model=short_name(name), size=cfg["size"], error=f"{type(e).__name__}: {e}"[:200]))
            log(f"[compile] {short_name(name)}: FAILS {e}")
    res["compile"] = rows
    z = zoo_compile_summary()
    if z:
        res["zoo_compile"] = z


def zoo_compile_summary():
    """Compile-time figures of the committed zoo report (model_zoo_checks/report.json), or None."""
    zoo = REPO / "model_zoo_checks" / "report.json"
    if not zoo.exists():
        return None
    try:
        z = json.loads(zoo.read_text())
    except (ValueError, OSError):
        return None
    s, m = z.get("summary", {}), z.get("meta", {})
    return dict(median_s=s.get("compile_s_median"), p90_s=s.get("compile_s_p90"), max_s=s.get("compile_s_max"),
                models=s.get("run"), resnet50=m.get("resnet50_compile"), command=m.get("command"),
                generated=m.get("generated"))


def section_gpu(args, cfg, device, res):
    if device != "cuda":
        res["gpu"] = dict(skipped="CUDA is not available on this machine (torch.cuda.is_available() is False)")
        return
    name = args.scaling_model
    model = load_model(name, device)
    B = cfg["gpu_batch"]
    x = make_input(B, cfg["size"], device)
    rows = []
    methods = ["forward", "ixg", "srd"] + (["ixg_tc", "srd_tc"] if args.torch_compile else [])
    for dtype in args.dtypes:
        t = targets_of(model, x, device, dtype)
        for m in methods:
            r = measure(m, model, name, x, t, device=device, dtype=dtype, cfg=cfg, memory=args.memory)
            if r["status"] == "ok":
                r["images_per_s"] = B / r["median_s"]
            rows.append(r)
            log("[gpu] " + fmt_rec(r))
    res["gpu"] = dict(model=short_name(name), batch=B, rows=rows)
    _SRD_CACHE.clear()


# ============================================================================ report ===============
def _get(rows, **kw):
    for r in rows:
        if all(r.get(k) == v for k, v in kw.items()):
            return r
    return None


def _ratio(r, ref, key):
    if not r or not ref or r.get("status") != "ok" or ref.get("status") != "ok" or key not in r or key not in ref:
        return None
    return r[key] / ref[key] if ref[key] > 0 else None


def _cell(v, fmt="{:.2f}"):
    return "–" if v is None else fmt.format(v)


def _status_cell(r, key, ref):
    if r is None:
        return "–"
    if r["status"] != "ok":
        return "fails"
    return _cell(_ratio(r, ref, key))


def write_report(res, out_dir: Path, cfg):
    meta = res["meta"]
    L = []
    if meta["quick"]:
        L += ["> **QUICK RUN (`--quick`): tiny inputs and 1-2 repeats on a shared machine. These numbers "
              "check that the script works end to end; they are NOT measurements.**", ""]
    L += [f"# srd_fx benchmark — {meta['device_name']}", "",
          f"Command: `{meta['command']}`  ", f"Date: {meta['date']}; torch {meta['torch']}, torchvision "
          f"{meta['torchvision']}, timm {meta['timm']}, zennit {meta['zennit']}, captum {meta['captum']}, "
          f"grad-cam {meta['grad_cam']}; Python {meta['python']}.  ",
          f"Machine: {meta['cpu']} ({meta['cpus']} CPUs), torch threads {meta['threads']}; load average "
          f"{meta['load_start']} at start, {meta.get('load_end', '?')} at end.  ",
          f"Timing: median of {cfg['repeats']} calls after {cfg['warmup']} warm-up calls "
          f"({'CUDA events' if meta['device'] == 'cuda' else 'time.perf_counter'}); the batch- and size-scaling "
          "sections time their points interleaved (round-robin, one call of each per round)"
          + ("; glibc mmap off (`--no-mmap`)" if meta.get("malloc_mmap_off") else "") + ". Weights: random (seed 0); "
          "inputs: scikit-image photos, ImageNet-normalised; target: the predicted class, computed once and "
          "passed to every method.  ",
          "Input×gradient: `x.grad * x` after one `backward()` of the target logits, parameters frozen "
          "(`requires_grad=False`) for every method; SRD: `explainer(x, target)` under `torch.no_grad()`.  ",
          f"Peak memory: {meta['memory']}.", ""]
    rows = res.get("table", [])
    methods = [m for m in list(METHODS) + ["ixg_tc", "srd_tc"] if any(r["method"] == m for r in rows)]
    groups = []
    for r in rows:
        g = (r["model"], r["batch"], r["size"], r["dtype"])
        if g not in groups:
            groups.append(g)
    if rows:
        for key, title in (("median_s", "Time"), ("peak_mb", "Peak memory")):
            L += [f"## {title} relative to input×gradient", "",
                  "| model | batch | size | dtype | " + " | ".join(SHORT[m] for m in methods) + " |",
                  "|---|---|---|---|" + "---|" * len(methods)]
            for g in groups:
                sel = dict(model=g[0], batch=g[1], size=g[2], dtype=g[3])
                ref = _get(rows, method="ixg", **sel)
                cells = [_status_cell(_get(rows, method=m, **sel), key, ref) for m in methods]
                L.append(f"| {g[0]} | {g[1]} | {g[2]} | {g[3]} | " + " | ".join(cells) + " |")
            L.append("")
        L += ["## Absolute figures", "",
              "| model | batch | size | dtype | method | median ms | min–max ms | ms / image | × ixg time | "
              "peak MiB | × ixg memory | setup MiB | note |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for r in rows:
            sel = dict(model=r["model"], batch=r["batch"], size=r["size"], dtype=r["dtype"])
            ref = _get(rows, method="ixg", **sel)
            if r["status"] != "ok":
                L.append(f"| {r['model']} | {r['batch']} | {r['size']} | {r['dtype']} | {r['label']} | fails | | | | | | "
                         f"| {r['error'].replace('|', '/')} |")
                continue
            L.append(f"| {r['model']} | {r['batch']} | {r['size']} | {r['dtype']} | {r['label']} | "
                     f"{r['median_s'] * 1e3:.1f} | {min(r['times_s']) * 1e3:.1f}–{max(r['times_s']) * 1e3:.1f} | "
                     f"{r['median_s'] * 1e3 / r['batch']:.1f} | {_cell(_ratio(r, ref, 'median_s'))} | "
                     f"{_cell(r.get('peak_mb'), '{:.0f}')} | {_cell(_ratio(r, ref, 'peak_mb'))} | "
                     f"{_cell(r.get('setup_mb'), '{:.0f}')} | {_note(r)} |")
        L.append("")
    for kind, var in (("batch", "batch"), ("size", "size")):
        sc = res.get(f"{kind}_scaling")
        if not sc:
            continue
        L += [f"## SRD time against {'batch size' if kind == 'batch' else 'input size'} ({sc['model']})", "",
              f"| {var} | ixg ms | SRD ms | SRD ms / image | SRD / ixg time | ixg peak MiB | SRD peak MiB | "
              "SRD / ixg memory |", "|---|---|---|---|---|---|---|---|"]
        vals = sorted({r[var] for r in sc["rows"]})
        for v in vals:
            ri, rs = _get(sc["rows"], method="ixg", **{var: v}), _get(sc["rows"], method="srd", **{var: v})
            ms = lambda r: "fails" if r is None or r["status"] != "ok" else f"{r['median_s'] * 1e3:.1f}"  # noqa: E731
            mb = lambda r: _cell(r.get("peak_mb") if r else None, "{:.0f}")  # noqa: E731
            per = f"{rs['median_s'] * 1e3 / rs['batch']:.1f}" if rs and rs["status"] == "ok" else "–"
            L.append(f"| {v} | {ms(ri)} | {ms(rs)} | {per} | {_cell(_ratio(rs, ri, 'median_s'))} | {mb(ri)} | "
                     f"{mb(rs)} | {_cell(_ratio(rs, ri, 'peak_mb'))} |")
        if kind == "batch":
            for m in ("srd", "ixg"):
                f = sc["fit"].get(m)
                if f:
                    devs = ", ".join(f"B={b}: {d * 100:+.1f}%" for b, d in f["per_image_dev"])
                    L.append(f"\n{LABELS[m]}: least-squares fit t(B) = {f['a_s'] * 1e3:.1f} ms + "
                             f"{f['b_s'] * 1e3:.1f} ms × B; per-image time beyond the fixed overhead, "
                             f"(t(B) − a)/B, relative to the slope: {devs} (max |deviation| "
                             f"{f['max_abs_dev'] * 100:.1f}%).")
        L.append("")
    pr = res.get("profile")
    if pr:
        L += [f"## Profile of one SRD call ({pr['model']}, batch {pr['batch']}, {pr['size']}×{pr['size']})", "",
              f"Top ops by {pr['sort']} (`torch.profiler`; full table in `profile.txt`; total self time "
              f"{pr['total_self_ms']:.1f} ms):", "", "| op | calls | self ms |", "|---|---|---|"]
        L += [f"| `{e['op']}` | {e['calls']} | {e['self_ms']:.2f} |" for e in pr["top"]]
        L += ["", f"Python loops (`for`/`while`) in the generated twin's code: **{pr['generated_loops']}** "
              f"(of {pr['generated_lines']} lines). Calls made by one SRD call (after a warm-up call): Python "
              "function calls in srd_fx's code (the package, `srd_fx/rules/`, the generated twin; `sys.setprofile`) and "
              "torch functions called from Python (`TorchFunctionMode`, attribute reads such as `x.shape` not "
              "counted). Equal counts across batch sizes, "
              "input sizes and channel widths mean that no Python loop runs over samples, positions or channels "
              "(the aten kernels torch picks inside a call do depend on the shapes, so the profiler's aten "
              "counts are not compared):", "",
              "| model | batch | size | srd_fx Python calls | torch calls |", "|---|---|---|---|---|"]
        for c in pr["counts"]:
            if "error" in c:
                L.append(f"| {c['model']} | | | fails: {c['error']} | |")
            else:
                L.append(f"| {c['model']} | {c['batch']} | {c['size']} | {c['python_calls']} | {c['torch_calls']} |")
        L.append("")
    comp = res.get("compile")
    if comp:
        L += ["## Compile time of `srd_fx.compile` (wall clock)", "", "| model | input | median s | all s |",
              "|---|---|---|---|"]
        for c in comp:
            if "error" in c:
                L.append(f"| {c['model']} | {c['size']}² | fails | {c['error']} |")
            else:
                L.append(f"| {c['model']} | 1×3×{c['size']}² | {c['median_s']:.2f} | "
                         + ", ".join(f"{v:.2f}" for v in c["times_s"]) + " |")
        z = res.get("zoo_compile")
        if z:
            zoo_link = os.path.relpath(REPO / "model_zoo_checks" / "REPORT.md", out_dir.resolve())
            L += ["", f"Model zoo ({z['models']} timm CNNs at 64×64, `layers=\"all\"`, float64; "
                  f"[model_zoo_checks/REPORT.md]({zoo_link}), `{z['command']}`, "
                  f"{z['generated']}): median {z['median_s']:.2f} s, 90th percentile {z['p90_s']:.2f} s, "
                  f"max {z['max_s']:.2f} s."]
        L.append("")
    gpu = res.get("gpu")
    if gpu:
        L += ["## GPU throughput", ""]
        if "skipped" in gpu:
            L += [f"Skipped: {gpu['skipped']}.", ""]
        else:
            L += [f"{gpu['model']}, batch {gpu['batch']}, {cfg['size']}×{cfg['size']}, on {meta['device_name']}:", "",
                  "| dtype | method | median ms | images/s | × ixg time | peak MiB |", "|---|---|---|---|---|---|"]
            for r in gpu["rows"]:
                ref = _get(gpu["rows"], method="ixg", dtype=r["dtype"])
                if r["status"] != "ok":
                    L.append(f"| {r['dtype']} | {r['label']} | fails | | | {r['error']} |")
                else:
                    L.append(f"| {r['dtype']} | {r['label']} | {r['median_s'] * 1e3:.1f} | {r['images_per_s']:.0f} | "
                             f"{_cell(_ratio(r, ref, 'median_s'))} | {_cell(r.get('peak_mb'), '{:.0f}')} |")
            L.append("")
    L += ["## Targets", ""]
    if meta["quick"]:
        L += ["(Quick run: the verdicts below are computed the same way as for a real run, but on numbers that "
              "mean nothing.)", ""]
    L += [f"- {line}" for line in check_targets(res)] + [""]
    (out_dir / "report.md").write_text("\n".join(L))


def _note(r):
    notes = [r["mem_error"]] if r.get("mem_error") else []
    if r["method"].endswith("_tc") and r.get("warmup_s"):
        notes.append(f"first call (torch.compile) {r['warmup_s'][0]:.1f} s")
    return "; ".join(notes)


def check_targets(res) -> List[str]:
    """The issue's targets, evaluated on these results."""
    out = []
    rows = res.get("table", [])
    dev = res["meta"]["device"]
    mark = lambda ok: "**met**" if ok else "**not met**"  # noqa: E731
    if dev == "cpu":
        sel = [r for r in rows if r["model"] == "resnet50" and r["batch"] == 8 and r["dtype"] == "float32"]
        srd, ixg = _get(sel, method="srd"), _get(sel, method="ixg")
        tr, mr = _ratio(srd, ixg, "median_s"), _ratio(srd, ixg, "peak_mb")
        if tr is not None:
            txt = f"CPU ResNet50 batch 8 ({srd['size']}²): SRD time = {tr:.2f} × input×gradient (target ≤ 1.25: {mark(tr <= 1.25)})"
            if mr is not None:
                txt += f"; peak memory = {mr:.2f} × (target ≤ 1.3: {mark(mr <= 1.3)})"
            out.append(txt)
        else:
            out.append("CPU ResNet50 batch 8: not in this run")
    bad, n = [], 0
    for g in sorted({(r["model"], r["batch"], r["size"], r["dtype"]) for r in rows}):
        sel = dict(model=g[0], batch=g[1], size=g[2], dtype=g[3])
        s = _get(rows, method="srd", **sel)
        for m in ("zennit_lrp", "captum_lrp"):
            o = _get(rows, method=m, **sel)
            if s is None or o is None or o["status"] != "ok":
                continue
            n += 1
            if s["status"] != "ok" or s["median_s"] >= o["median_s"]:
                bad.append(f"{SHORT[m]} on {g[0]} b{g[1]} {g[3]}")
    if rows:
        fails = sorted({f"{SHORT[r['method']]} on {r['model']}" for r in rows
                        if r["method"] in ("zennit_lrp", "captum_lrp") and r["status"] != "ok"})
        out.append(f"SRD faster than zennit LRP and captum LRP wherever they run: {n - len(bad)} of {n} comparisons "
                   f"({mark(not bad)}{'; slower than ' + ', '.join(bad) if bad else ''})"
                   + (f"; the library fails on: {', '.join(fails)}" if fails else ""))
    bs = res.get("batch_scaling")
    if bs and bs["fit"].get("srd"):
        f = bs["fit"]["srd"]
        Bs = [b for b, _ in f["per_image_dev"]]
        out.append(f"SRD time linear in batch size (B = {Bs[0]}…{Bs[-1]}): max per-image deviation beyond the fixed "
                   f"overhead {f['max_abs_dev'] * 100:.1f}% (target ≤ 10%: {mark(f['max_abs_dev'] <= 0.10)})")
        if dev == "cpu":
            s4, i4 = _get(bs["rows"], method="srd", batch=4), _get(bs["rows"], method="ixg", batch=4)
            tr, mr = _ratio(s4, i4, "median_s"), _ratio(s4, i4, "peak_mb")
            if tr is not None:
                out.append(f"Issue 2, CPU {bs['model']} batch 4 ({s4['size']}²): explainer(x) time = {tr:.2f} × "
                           f"input×gradient (≤ 1.5: {mark(tr <= 1.5)})"
                           + (f", peak memory = {mr:.2f} × (≤ 1.5: {mark(mr <= 1.5)})" if mr is not None else ""))
    pr = res.get("profile")
    if pr:
        ok = [c for c in pr["counts"] if "error" not in c]
        same_py = len({c["python_calls"] for c in ok}) == 1
        tc = [c["torch_calls"] for c in ok]
        # A loop over samples, positions or channels would multiply the torch calls by the 2x batch,
        # 4x positions or 2x width of the settings; shape-dependent fast paths (the BN scale folded
        # into the conv weight only where the weight is the smaller tensor) change them by a few.
        spread = (max(tc) - min(tc)) / min(tc) if tc else 0.0
        flat_torch = spread <= 0.02
        out.append(f"No Python loop over positions or channels: {pr['generated_loops']} loops in the generated code; "
                   f"counts of srd_fx Python calls {'identical' if same_py else 'differ'} and of torch calls "
                   f"{'identical' if spread == 0 else f'within {100 * spread:.1f}% (shape-dependent fast paths; a loop would multiply them by 2-4)'} "
                   f"across {len(ok)} (batch, size, width) settings "
                   f"({mark(pr['generated_loops'] == 0 and same_py and flat_torch)})")
    gpu = res.get("gpu")
    if gpu and "rows" in gpu:
        s, i = _get(gpu["rows"], method="srd", dtype="float32"), _get(gpu["rows"], method="ixg", dtype="float32")
        tr = _ratio(s, i, "median_s")
        if tr is not None:
            out.append(f"GPU {gpu['model']} batch {gpu['batch']}: SRD = {tr:.2f} × input×gradient in float32 "
                       f"(target ≤ 1.3: {mark(tr <= 1.3)})")
        for dt in ("float32", "bfloat16"):
            s = _get(gpu["rows"], method="srd", dtype=dt)
            if s and s["status"] == "ok":
                out.append(f"GPU SRD throughput, {dt}: {s['images_per_s']:.0f} images/s")
    elif gpu:
        out.append(f"GPU targets: not measured ({gpu['skipped']})")
    return out


def plot(res, out_dir: Path, quick: bool):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker
    fig, axes = plt.subplots(1, 3, figsize=(17, 4.8))
    rows = [r for r in res.get("table", []) if r["dtype"] == "float32"]
    ax = axes[0]
    if not rows:
        ax.set_visible(False)
    else:
        bmax = max(r["batch"] for r in rows)
        models = list(dict.fromkeys(r["model"] for r in rows))
        methods = [m for m in METHODS if m != "ixg" and any(r["method"] == m for r in rows)]
        w = 0.8 / max(1, len(methods))
        for k, m in enumerate(methods):
            xs, ys, fails = [], [], []
            for i, mod in enumerate(models):
                r = _get(rows, model=mod, batch=bmax, method=m)
                ref = _get(rows, model=mod, batch=bmax, method="ixg")
                v = _ratio(r, ref, "median_s")
                if v is None:
                    fails.append(i + (k - len(methods) / 2 + 0.5) * w)
                else:
                    xs.append(i + (k - len(methods) / 2 + 0.5) * w)
                    ys.append(v)
            bars = ax.bar(xs, ys, width=w, label=SHORT[m])
            for fx in fails:
                ax.text(fx, 1.0, "fails", rotation=90, ha="center", va="bottom", fontsize=7,
                        color=bars.patches[0].get_facecolor() if bars.patches else "k")
        ax.axhline(1.0, color="k", lw=0.8, ls="--")
        ax.set_yscale("log")
        ax.set_xticks(range(len(models)))
        ax.set_xticklabels(models)
        ax.set_ylabel("time / input×gradient time")
        ax.set_title(f"float32, batch {bmax}")
        ax.legend(fontsize=7, ncol=2)
    for ax, kind, var, xlabel in ((axes[1], "batch", "batch", "batch size"),
                                  (axes[2], "size", "size", "input side (pixels)")):
        sc = res.get(f"{kind}_scaling")
        if not sc:
            ax.set_visible(False)
            continue
        for m, style in (("ixg", "o-"), ("srd", "s-")):
            pts = sorted((r[var], r["median_s"] * 1e3) for r in sc["rows"] if r["method"] == m and r["status"] == "ok")
            if pts:
                ax.plot([p[0] for p in pts], [p[1] for p in pts], style, label=LABELS[m])
        if kind == "batch":
            f = sc["fit"].get("srd")
            if f:
                bs = [b for b, _ in f["per_image_dev"]]
                ax.plot(bs, [(f["a_s"] + f["b_s"] * b) * 1e3 for b in bs], "k:", lw=1, label="SRD linear fit")
        else:
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            sizes = sorted({r[var] for r in sc["rows"]})
            ax.set_xticks(sizes)
            ax.set_xticklabels([str(v) for v in sizes])
            ax.xaxis.set_minor_locator(matplotlib.ticker.NullLocator())
        ax.set_xlabel(xlabel)
        ax.set_ylabel("ms per call")
        ax.set_title(f"{sc['model']}: time against {xlabel}")
        ax.legend(fontsize=8)
    title = f"srd_fx benchmark on {res['meta']['device_name']}"
    if quick:
        title += "  —  QUICK RUN, NOT A MEASUREMENT"
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(out_dir / "bench.png", dpi=110)
    plt.close(fig)


# ============================================================================ main =================
def _version(dist):
    try:
        from importlib.metadata import version
        return version(dist)
    except Exception:  # noqa: BLE001
        return "not installed"


def _cpu_name():
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _load():
    try:
        return " ".join(f"{v:.1f}" for v in os.getloadavg())
    except OSError:
        return "?"


def build_parser():
    p = argparse.ArgumentParser(description="Time and measure the memory of SRD against input×gradient, zennit "
                                            "LRP, captum LRP and GradCAM (see the module docstring).")
    p.add_argument("--quick", action="store_true",
                   help="tiny settings (64x64 inputs, batches 1 and 2, 2 repeats) to check that the script runs; "
                        "the numbers are not measurements")
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"),
                   help="where to run: auto = cuda when available, else cpu")
    p.add_argument("--models", default=None,
                   help="comma-separated models for the comparison table (torchvision:<name>, timm:<name> or a bare "
                        f"name; default {DEFAULT_MODELS}, with --quick {QUICK_MODELS})")
    p.add_argument("--out", default=None,
                   help="output folder (default srd_fx_results/benchmarks/<device>[-quick] in the working directory)")
    p.add_argument("--sections", default="table,batch,size,profile,compile,gpu",
                   help="comma-separated sections to run: table, batch, size, profile, compile, gpu")
    p.add_argument("--dtypes", default=None,
                   help="comma-separated dtypes (float32, float16, bfloat16; the last two via autocast); default: "
                        "float32 on cpu, all three on cuda")
    p.add_argument("--batches", default=None, help="comma-separated batch sizes of the table (default 1,8)")
    p.add_argument("--size", type=int, default=None, help="input side of the table and batch scaling (default 224)")
    p.add_argument("--repeats", type=int, default=None, help="timed calls per measurement (default 5; the median is reported)")
    p.add_argument("--warmup", type=int, default=None, help="untimed calls before timing (default 2)")
    p.add_argument("--scaling-model", default="torchvision:resnet50",
                   help="model of the batch/size scaling, profile and GPU throughput sections")
    p.add_argument("--scaling-batches", default=None, help="comma-separated batch sizes of the batch scaling (default 1,2,4,8,16)")
    p.add_argument("--scaling-sizes", default=None, help="comma-separated input sides of the size scaling (default 112,224,448)")
    p.add_argument("--wide-model", default="torchvision:wide_resnet50_2",
                   help="the scaling model with wider channels, for the loop check of the profile section ('' to skip)")
    p.add_argument("--gpu-batch", type=int, default=None, help="batch size of the GPU throughput section (default 64)")
    p.add_argument("--torch-compile", action="store_true",
                   help="also time torch.compile of the generated SRD module (and of the model for input×gradient)")
    p.add_argument("--no-memory", dest="memory", action="store_false",
                   help="skip the peak-memory measurements (on CPU they take one worker process per measurement)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's default)")
    p.add_argument("--verbose", action="store_true", help="print the traceback of every failing method")
    p.add_argument("--no-mmap", action="store_true",
                   help="re-run with glibc's mmap off (MALLOC_MMAP_MAX_=0, MALLOC_TRIM_THRESHOLD_=64 GiB): without it "
                        "every tensor above 32 MiB is mmap'd and page-faulted in again on every call (see "
                        "benchmarks/interleaved.py); the memory workers set their own allocator settings")
    p.add_argument("--rewrite-report", action="store_true",
                   help="measure nothing: rewrite report.md and bench.png from the results.json in --out")
    p.add_argument("--_worker", default=None, help=argparse.SUPPRESS)
    return p


def reexec_without_mmap(argv=None):
    """Replace this process by the same command with glibc's mmap off (environment read at start)."""
    env = dict(os.environ, MALLOC_MMAP_MAX_="0", MALLOC_TRIM_THRESHOLD_=str(64 * 2 ** 30))
    os.execve(sys.executable, [sys.executable, str(Path(sys.argv[0]).resolve())]
              + list(sys.argv[1:] if argv is None else argv), env)


def _ints(s):
    return tuple(int(v) for v in str(s).split(",") if v.strip())


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if args._worker:
        return worker_main(json.loads(args._worker))
    if args.no_mmap and os.environ.get("MALLOC_MMAP_MAX_") != "0":
        reexec_without_mmap(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        print("bench.py: --device cuda, but CUDA is not available here (torch.cuda.is_available() is False; "
              f"torch {torch.__version__}). Run with --device cpu (or --device auto), or on a machine with a GPU "
              "and a CUDA build of torch.", file=sys.stderr)
        return 2
    device = "cuda" if args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available()) else "cpu"
    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = dict(QUICK if args.quick else FULL)
    for k in ("size", "repeats", "warmup", "gpu_batch"):
        if getattr(args, k) is not None:
            cfg[k] = getattr(args, k)
    for k in ("batches", "scaling_batches", "scaling_sizes"):
        if getattr(args, k) is not None:
            cfg[k] = _ints(getattr(args, k))
    if cfg["repeats"] < 1 or cfg["warmup"] < 0:
        print("bench.py: --repeats must be >= 1 and --warmup >= 0", file=sys.stderr)
        return 2
    cfg["threads"], cfg["verbose"] = args.threads, args.verbose
    args.models = [m.strip() for m in (args.models or (QUICK_MODELS if args.quick else DEFAULT_MODELS)).split(",")
                   if m.strip()]
    args.dtypes = [d.strip() for d in (args.dtypes or ("float32,float16,bfloat16" if device == "cuda" else "float32")).split(",")]
    bad = [d for d in args.dtypes if d not in DTYPES]
    if bad:
        print(f"bench.py: unknown dtype(s) {bad}; choose from {', '.join(DTYPES)}", file=sys.stderr)
        return 2
    if args.rewrite_report:
        out_dir = Path(args.out) if args.out else REPO / "results" / "benchmarks" / "cpu"
        res = json.loads((out_dir / "results.json").read_text())
        if "zoo_compile" in res and zoo_compile_summary():  # the zoo report may be newer than the run
            res["zoo_compile"] = zoo_compile_summary()
            (out_dir / "results.json").write_text(json.dumps(res, indent=1))
        write_report(res, out_dir, res["meta"]["cfg"])
        plot(res, out_dir, res["meta"]["quick"])
        log(f"rewrote {out_dir / 'report.md'} and {out_dir / 'bench.png'} from results.json")
        return 0
    sections = [s.strip() for s in args.sections.split(",") if s.strip()]
    unknown = set(sections) - {"table", "batch", "size", "profile", "compile", "gpu"}
    if unknown:
        print(f"bench.py: unknown section(s) {sorted(unknown)}", file=sys.stderr)
        return 2
    device_name = torch.cuda.get_device_name() if device == "cuda" else f"CPU ({_cpu_name()})"
    slug = device if device == "cpu" else "cuda-" + "".join(c if c.isalnum() else "-" for c in device_name).strip("-").lower()
    # the committed results/benchmarks/ are written only when --out names them: a quick or partial
    # run never replaces a committed full one
    out_dir = Path(args.out) if args.out else Path("srd_fx_results") / "benchmarks" / (slug + ("-quick" if args.quick else ""))
    out_dir.mkdir(parents=True, exist_ok=True)

    if device == "cuda":
        mem_txt = "`torch.cuda.max_memory_allocated()` during one call minus the memory allocated before it (MiB)"
    elif args.memory:
        mem_txt = ("extra resident memory of one call beyond the loaded model and the method's setup, in a fresh "
                   "worker process per measurement: `VmHWM − VmRSS` after resetting the peak with "
                   "`/proc/self/clear_refs`, glibc mmap threshold pinned at 4 KiB (MiB)")
    else:
        mem_txt = "not measured (--no-memory)"
    res = {"meta": dict(command="python " + " ".join([os.path.relpath(__file__, REPO)] + (argv if argv is not None else sys.argv[1:])),
                        date=f"{datetime.datetime.now():%Y-%m-%d %H:%M}", quick=args.quick, device=device,
                        device_name=device_name, torch=torch.__version__, torchvision=_version("torchvision"),
                        timm=_version("timm"), zennit=_version("zennit"), captum=_version("captum"),
                        grad_cam=_version("grad-cam"), python=platform.python_version(), cpu=_cpu_name(),
                        cpus=os.cpu_count(), threads=torch.get_num_threads(), load_start=_load(), memory=mem_txt,
                malloc_mmap_off=os.environ.get("MALLOC_MMAP_MAX_") == "0",
                        cfg={k: v for k, v in cfg.items() if k != "verbose"}, models=args.models, dtypes=args.dtypes)}
    log(f"device {device_name}; output {out_dir}; sections {sections}; cfg {res['meta']['cfg']}")
    if device == "cpu" and "gpu" in sections:
        log("CUDA is not available: the GPU throughput section is skipped")
    t0 = time.time()
    runners = dict(table=lambda: section_table(args, cfg, device, res),
                   batch=lambda: section_scaling(args, cfg, device, res, "batch"),
                   size=lambda: section_scaling(args, cfg, device, res, "size"),
                   profile=lambda: section_profile(args, cfg, device, res, out_dir),
                   compile=lambda: section_compile(args, cfg, device, res),
                   gpu=lambda: section_gpu(args, cfg, device, res))
    for s in sections:
        log(f"== section {s}")
        try:
            runners[s]()
        except Exception as e:  # noqa: BLE001  (keep what the other sections measured)
            traceback.print_exc()
            res.setdefault("section_errors", {})[s] = f"{type(e).__name__}: {e}"[:300]
        res["meta"]["load_end"] = _load()
        res["meta"]["wall_s"] = time.time() - t0
        (out_dir / "results.json").write_text(json.dumps(res, indent=1, default=str))
    write_report(res, out_dir, cfg)
    plot(res, out_dir, args.quick)
    log(f"done in {time.time() - t0:.0f} s: {out_dir / 'report.md'}, {out_dir / 'bench.png'}")
    return 1 if res.get("section_errors") else 0


if __name__ == "__main__":
    sys.exit(main())
