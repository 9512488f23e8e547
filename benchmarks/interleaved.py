"""Time ratios measured interleaved: on a shared machine the load changes from minute to minute,
so the methods are called in turn (round-robin), each round timing every method once (after one
untimed call), and the median per method is reported with its ratio to input×gradient. Peak memory comes from
bench.py's fresh worker processes (VmHWM), one per method.

    python benchmarks/interleaved.py --model torchvision:resnet50 --batch 8 --methods ixg,srd --memory
    python benchmarks/interleaved.py --model timm:convnext_tiny --batch 1 \
        --methods ixg,srd,zennit_lrp,captum_lrp
    python benchmarks/interleaved.py --batches 1,2,4,8,16 --methods forward,ixg,srd --threads 1 \
        --repeats 9 --no-mmap --out results/benchmarks/cpu-batch-interleaved/no-mmap

With ``--batches`` the rounds go over every (batch size, method) pair, and the batch-linearity fit
of bench.py (t(B) = a + b B; per image, (t(B) - a)/B relative to b) is printed for each method, on
the median and on the minimum over rounds (the minimum is the least disturbed by other jobs).

Each timed call also records its minor page faults and system time (``getrusage``): glibc serves
allocations above its mmap threshold (at most 32 MiB) with a fresh ``mmap`` that the kernel zero-fills
page by page on every call, and frees them with ``munmap``. From ResNet50 at batch 16 on, the activations
cross that size and every call pays ~0.5 M page faults (~0.9 s of system time, for input×gradient and SRD
alike): the allocator, not the computation, is then what grows faster than the batch. ``--no-mmap``
re-runs the script with ``MALLOC_MMAP_MAX_=0`` and a large ``MALLOC_TRIM_THRESHOLD_`` (glibc's documented
tunables; PyTorch's CPU tuning guide recommends a caching allocator such as jemalloc/tcmalloc for the
same reason) so that freed memory is reused, and the timings show the computation's own scaling.

The methods and their setup are bench.py's (same model, input, targets and conditions).
"""
import argparse
import json
import math
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench as B  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="torchvision:resnet50",
                    help="torchvision:<name>, timm:<name> or a bare name (as in bench.py)")
    ap.add_argument("--batch", type=int, default=8, help="batch size")
    ap.add_argument("--size", type=int, default=224, help="input side")
    ap.add_argument("--methods", default="ixg,srd",
                    help="comma-separated bench.py methods (ixg, srd, zennit_lrp, captum_lrp, gradcam, forward)")
    ap.add_argument("--repeats", type=int, default=5, help="rounds (each times every method once); median reported")
    ap.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    ap.add_argument("--memory", action="store_true",
                    help="also measure the peak memory of ixg and srd in fresh worker processes")
    ap.add_argument("--batches", default=None,
                    help="comma-separated batch sizes: time every method at each (interleaved) and fit t(B) = a + b B")
    ap.add_argument("--no-mmap", action="store_true",
                    help="re-run with glibc's mmap off (MALLOC_MMAP_MAX_=0, MALLOC_TRIM_THRESHOLD_=64 GiB): freed "
                         "memory is reused instead of being unmapped and page-faulted in again on every call")
    ap.add_argument("--out", default=None, help="also write report.md and results.json (every round) to this folder")
    args = ap.parse_args(argv)
    if args.no_mmap and os.environ.get("MALLOC_MMAP_MAX_") != "0":
        B.reexec_without_mmap(argv)
    torch.set_num_threads(args.threads)
    methods = args.methods.split(",")
    batches = [int(b) for b in args.batches.split(",")] if args.batches else [args.batch]
    model = B.load_model(args.model)
    xs = {b: B.make_input(b, args.size) for b in batches}
    ts = {b: B.targets_of(model, xs[b], "cpu", "float32") for b in batches}
    # set up per round: zennit/captum hooks and in-place switches must not leak into other methods
    keys = [(m, b) for b in batches for m in methods]
    timed = B.time_interleaved(lambda k: B.setup(k[0], model, xs[k[1]], ts[k[1]], "cpu", "float32"), keys, "cpu",
                               1, args.repeats, fresh=True)
    failed = {m: tr["error"] for (m, b), tr in timed.items() if "error" in tr}
    runs = [m for m in methods if m not in failed]
    times = {(m, b): timed[(m, b)]["times_s"] for m in runs for b in batches}
    faults = {(m, b): timed[(m, b)]["minor_faults"] for m in runs for b in batches}
    sys_s = {(m, b): timed[(m, b)]["system_s"] for m in runs for b in batches}
    cpu_s = {(m, b): timed[(m, b)]["cpu_s"] for m in runs for b in batches}
    cpu_med = {k: statistics.median(v) for k, v in cpu_s.items()}
    first = {(m, b): sum(timed[(m, b)]["warmup_s"]) for m in runs for b in batches}
    med = {k: statistics.median(v) for k, v in times.items()}
    best = {k: min(v) for k, v in times.items()}
    lines = []
    say = lambda line: (print(line), lines.append(line))  # noqa: E731
    load0 = os.getloadavg()
    say(f"{args.model}, {args.size}x{args.size}, CPU, {args.threads} threads, {args.repeats} interleaved rounds "
        f"(median / min; CPU time = user + system of all threads, median), load average {load0[0]:.2f}; glibc mmap {'off (MALLOC_MMAP_MAX_=0)' if os.environ.get('MALLOC_MMAP_MAX_') == '0' else 'on (default)'}:")
    for b in batches:
        ref, ref_min = med.get(("ixg", b), math.nan), best.get(("ixg", b), math.nan)
        ref_cpu = cpu_med.get(("ixg", b), math.nan)
        for m in methods:
            if m in failed:
                say(f"  b{b:<3d} {m:12s} fails ({failed[m]})")
            else:
                say(f"  b{b:<3d} {m:12s} {med[(m, b)]:8.3f} s / {best[(m, b)]:8.3f} s   ratio to ixg "
                    f"{med[(m, b)] / ref:5.2f} / {best[(m, b)] / ref_min:5.2f}   CPU {cpu_med[(m, b)]:7.3f} s "
                    f"(ratio {cpu_med[(m, b)] / ref_cpu:5.2f})   first call {first[(m, b)]:7.1f} s   page faults "
                    f"{statistics.median(faults[(m, b)]):9.0f}, system time {statistics.median(sys_s[(m, b)]):6.3f} s")
    fits = {}
    if len(batches) > 1:
        for m in runs:
            for stat, d in (("median", med), ("min", best)):
                f = B.linear_fit([dict(batch=b, median_s=d[(m, b)], status="ok") for b in batches])
                fits[f"{m}/{stat}"] = f
                devs = ", ".join(f"B={b}: {v * 100:+.1f}%" for b, v in f["per_image_dev"])
                say(f"  {m:12s} {stat:6s} t(B) = {f['a_s'] * 1e3:7.1f} ms + {f['b_s'] * 1e3:6.1f} ms x B; "
                    f"per-image deviation {devs} (max {f['max_abs_dev'] * 100:.1f}%)")
    mem = {}
    if args.memory:
        for b in batches:
            for m in ("ixg", "srd"):
                r = B.cpu_peak_mb_in_worker(dict(model=args.model, size=args.size, batch=b, method=m,
                                                 threads=args.threads))
                mem[f"{m}/b{b}"] = r.get("peak_mb", math.nan)
                say(f"  b{b:<3d} peak memory {m:4s} {mem[f'{m}/b{b}']:8.1f} MiB"
                    + (f"  ({r['error']})" if "error" in r else ""))
            say(f"  b{b:<3d} memory ratio srd / ixg {mem[f'srd/b{b}'] / mem[f'ixg/b{b}']:.2f}")
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        load = os.getloadavg()
        cmd = "python benchmarks/interleaved.py " + " ".join(sys.argv[1:] if argv is None else argv)
        (out / "report.md").write_text(
            f"# Interleaved timing: {args.model}\n\nCommand: `{cmd}`  \nDate: "
            f"{time.strftime('%Y-%m-%d %H:%M')}; torch {torch.__version__}; load average at the end "
            f"{load[0]:.2f} / {load[1]:.2f} / {load[2]:.2f}.\n\n```\n" + "\n".join(lines) + "\n```\n")
        (out / "results.json").write_text(json.dumps(dict(
            model=args.model, size=args.size, threads=args.threads, repeats=args.repeats, failed=failed,
            malloc_mmap_off=os.environ.get("MALLOC_MMAP_MAX_") == "0",
            times={f"{m}/b{b}": v for (m, b), v in times.items()},
            minor_faults={f"{m}/b{b}": v for (m, b), v in faults.items()},
            system_s={f"{m}/b{b}": v for (m, b), v in sys_s.items()},
            cpu_s={f"{m}/b{b}": v for (m, b), v in cpu_s.items()},
            first_call_s={f"{m}/b{b}": v for (m, b), v in first.items()}, fits=fits, peak_mb=mem), indent=1))
    return 0

if __name__ == "__main__":
    sys.exit(main())
