#!/usr/bin/env python
"""SRD on a GPU next to input x gradient: time, peak memory, images/s, and the maps checked
against the CPU float64 result (issue 18).  Run it through ``benchmarks/gpu_check.sh``.

For each model (ResNet-50 and ConvNeXt-T at batch 64, 224) and dtype (float32, and bfloat16 by
autocast), each of

* ``eager``            the explainer / input x gradient as they are;
* ``compile``          ``torch.compile`` (Inductor) of the explainer's graph module (``fullgraph=True``)
                       and of the model for input x gradient;
* ``reduce-overhead``  the same with ``mode="reduce-overhead"`` (CUDA graphs; CUDA only)

times SRD (``srd_fx.compile(model, check=False)``: the fast mode, no host sync in the call) and
input x gradient (parameters frozen: forward, backward of the target logits, ``x.grad * x``), and
compares the SRD map of the first images with the float64 map computed on the CPU.  A time
budget (``--budget``) skips the compiled modes that would not fit and says so.

    benchmarks/gpu_check.sh                       # on the GPU: the full check (<= 8 minutes)
    benchmarks/gpu_check.sh --device cpu --quick  # dry run: small models and inputs, seconds

``--quick`` (the CI dry run) uses two small timm models of the same families at 64 px, batch 2:
resnet10t (one basic block per stage) and convnext_atto with one block per stage
(``depths=(1, 1, 1, 1)``: every kind of ConvNeXt layer, a third of the graph), and on the CPU runs the
compiled modes with dynamo's ``eager`` backend (the whole graph is captured, nothing is compiled to
C++).  Capturing the graphs (dynamo tracing SRD and input x gradient once per dtype) is most of the
dry run's CPU time, so the explainer is built once per model and the graphs are kept small.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import srd_fx  # noqa: E402

FULL = dict(models=("timm:resnet50", "timm:convnext_tiny"), batch=64, size=224, warmup=3, repeats=10, check_n=4)
QUICK = dict(models=("timm:resnet10t", "timm:convnext_atto"), batch=2, size=64, warmup=1, repeats=2, check_n=2,
             model_kwargs={"timm:convnext_atto": dict(depths=(1, 1, 1, 1))})
TOL = {"float32": dict(rel=1e-3, corr=0.9999), "bfloat16": dict(rel=0.25, corr=0.95)}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def load(name, device, **kwargs):
    import timm
    torch.manual_seed(0)
    m = timm.create_model(name.split(":")[-1], pretrained=False, **kwargs).eval().to(device)
    for p in m.parameters():
        p.requires_grad_(False)
    return m


def sync(device):
    if device == "cuda":
        torch.cuda.synchronize()


def timed(fn, device, warmup, repeats):
    for _ in range(warmup):
        fn()
    sync(device)
    ts = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        sync(device)
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts)


def peak_mb(fn, device):
    if device != "cuda":
        return None
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - before) / 2 ** 20


def methods(model, explainer, x, t, dtype, mode, device):
    """(srd, ixg) callables for one dtype and mode (``explainer``: ``srd_fx.compile(model, check=False)``)."""
    ctx = (lambda: torch.autocast(device_type=device, dtype=DTYPES[dtype])) if dtype != "float32" \
        else (lambda: torch.autocast(device_type=device, enabled=False))
    gm, net = explainer.graph_module, model
    if mode != "eager":
        kw = dict(fullgraph=True)
        if mode == "reduce-overhead":
            kw["mode"] = "reduce-overhead"
        if device == "cpu":
            kw["backend"] = "eager"  # the dry run: capture the whole graph, compile nothing
        gm, net = torch.compile(gm, **kw), torch.compile(model, **{k: v for k, v in kw.items() if k != "fullgraph"})

    def srd():
        with torch.no_grad(), ctx():
            return gm(x, t)["saliency"]

    def ixg():
        xr = x.detach().requires_grad_(True)
        with ctx():
            logits = net(xr)
        logits.gather(1, t[:, None]).float().sum().backward()
        return (xr.grad * xr.detach()).sum(1)
    return srd, ixg


def compare(got, ref):
    got, ref = got.detach().double().cpu().flatten(1), ref.flatten(1)
    rel = ((got - ref).abs().amax(1) / ref.abs().amax(1).clamp_min(1e-300)).max().item()
    g, r = got - got.mean(1, keepdim=True), ref - ref.mean(1, keepdim=True)
    corr = ((g * r).sum(1) / (g.norm(dim=1) * r.norm(dim=1)).clamp_min(1e-300)).min().item()
    return rel, corr


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--quick", action="store_true", help="small models and inputs (the CI dry run)")
    p.add_argument("--models", help="comma-separated timm names (default: resnet50, convnext_tiny)")
    p.add_argument("--dtypes", default="float32,bfloat16")
    p.add_argument("--modes", help="eager,compile,reduce-overhead (reduce-overhead needs CUDA)")
    p.add_argument("--budget", type=float, default=420.0, help="seconds; compiled modes past it are skipped")
    p.add_argument("--out", type=Path, default=Path("gpu_check_out"))
    a = p.parse_args(argv)
    cfg = dict(QUICK if a.quick else FULL)
    if a.models:
        cfg["models"] = tuple(a.models.split(","))
    dev = a.device
    if dev == "cuda" and not torch.cuda.is_available():
        print("no CUDA device: run with --device cpu (the dry run)", file=sys.stderr)
        return 2
    modes = a.modes.split(",") if a.modes else ["eager", "compile"] + (["reduce-overhead"] if dev == "cuda" else [])
    t_start = time.perf_counter()
    a.out.mkdir(parents=True, exist_ok=True)
    rows, failures = [], []
    print(f"device {torch.cuda.get_device_name() if dev == 'cuda' else 'cpu'}, torch {torch.__version__}, "
          f"batch {cfg['batch']}, {cfg['size']}x{cfg['size']}", flush=True)
    for name in cfg["models"]:
        kwargs = cfg.get("model_kwargs", {}).get(name, {})
        model_cpu = load(name, "cpu", **kwargs).double()
        g = torch.Generator().manual_seed(0)
        x_cpu = torch.randn(cfg["batch"], 3, cfg["size"], cfg["size"], generator=g, dtype=torch.float64)
        with torch.no_grad():
            t_cpu = model_cpu(x_cpu).argmax(1)
        n = cfg["check_n"]
        ref = srd_fx.compile(model_cpu, example_input=x_cpu[:1])(x_cpu[:n], t_cpu[:n]).saliency
        del model_cpu
        model = load(name, dev, **kwargs)
        x, t = x_cpu.float().to(dev), t_cpu.to(dev)
        explainer = srd_fx.compile(model, example_input=x[:1], check=False)
        for dtype in a.dtypes.split(","):
            for mode in modes:
                row = dict(model=name, dtype=dtype, mode=mode, **({"model_kwargs": kwargs} if kwargs else {}))
                if mode != "eager" and time.perf_counter() - t_start > a.budget:
                    row["skipped"] = f"past the {a.budget:.0f} s budget"
                    rows.append(row)
                    print(json.dumps(row), flush=True)
                    continue
                try:
                    srd, ixg = methods(model, explainer, x, t, dtype, mode, dev)
                    t0 = time.perf_counter()
                    srd(), ixg()  # compiles, if anything is compiled
                    row["first_call_s"] = time.perf_counter() - t0
                    ts, ti = timed(srd, dev, cfg["warmup"], cfg["repeats"]), timed(ixg, dev, cfg["warmup"], cfg["repeats"])
                    ms, mi = peak_mb(srd, dev), peak_mb(ixg, dev)
                    rel, corr = compare(srd()[:n], ref)
                    ok = rel <= TOL[dtype]["rel"] and corr >= TOL[dtype]["corr"]
                    row.update(srd_s=ts, ixg_s=ti, time_ratio=ts / ti, srd_img_s=cfg["batch"] / ts,
                               ixg_img_s=cfg["batch"] / ti, srd_mb=ms, ixg_mb=mi,
                               mem_ratio=ms / mi if ms and mi else None, map_rel_err=rel, map_corr=corr,
                               map_ok=ok)
                    if not ok:
                        failures.append(f"{name} {dtype} {mode}: map rel err {rel:.2e}, corr {corr:.5f}")
                except Exception as e:  # noqa: BLE001  (a failure is a result; the run goes on)
                    row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}"
                    failures.append(f"{name} {dtype} {mode}: {row['error']}")
                rows.append(row)
                print(json.dumps(row), flush=True)
    lines = ["| model | dtype | mode | SRD ms | ixg ms | time ratio | SRD img/s | ixg img/s | memory ratio | map rel err | map corr |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if "srd_s" not in r:
            lines.append(f"| {r['model']} | {r['dtype']} | {r['mode']} | {r.get('skipped') or r.get('error')} |||||||| |")
            continue
        mem = f"{r['mem_ratio']:.2f}" if r["mem_ratio"] else "n/a"
        lines.append(f"| {r['model'].split(':')[-1]} | {r['dtype']} | {r['mode']} | {r['srd_s'] * 1e3:.1f} | "
                     f"{r['ixg_s'] * 1e3:.1f} | {r['time_ratio']:.2f} | {r['srd_img_s']:.0f} | {r['ixg_img_s']:.0f} | "
                     f"{mem} | {r['map_rel_err']:.1e} | {r['map_corr']:.5f} |")
    report = "\n".join(lines)
    (a.out / "gpu_check.md").write_text(report + "\n")
    (a.out / "gpu_check.json").write_text(json.dumps(rows, indent=1))
    print("\n" + report)
    print(f"\n{len(rows)} rows in {time.perf_counter() - t_start:.0f} s; "
          + ("all maps agree with CPU float64" if not failures else "FAILURES:\n  " + "\n  ".join(failures)))
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
