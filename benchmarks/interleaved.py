"""Time ratios measured interleaved: on a shared machine the load changes from minute to minute,
so the methods are called in turn (round-robin), each round timing every method once (after one
untimed call), and the median per method is reported with its ratio to input×gradient. Peak memory comes from
bench.py's fresh worker processes (VmHWM), one per method.

    python benchmarks/interleaved.py --model torchvision:resnet50 --batch 8 --methods ixg,srd --memory
    python benchmarks/interleaved.py --model timm:convnext_tiny --batch 1 \
        --methods ixg,srd,zennit_lrp,captum_lrp

The methods and their setup are bench.py's (same model, input, targets and conditions).
"""
import argparse
import math
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
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    methods = args.methods.split(",")
    model = B.load_model(args.model)
    x = B.make_input(args.batch, args.size)
    t = B.targets_of(model, x, "cpu", "float32")
    benches, failed = {}, {}
    for m in methods:
        try:
            bench = B.setup(m, model, x, t, "cpu", "float32")
            bench.run()  # warm-up (and the check that the method runs on this model)
            bench.close()
            benches[m] = True
        except Exception as e:  # noqa: BLE001  (a library failing on a model is a result)
            failed[m] = f"{type(e).__name__}: {str(e).splitlines()[0][:120] if str(e) else ''}"
    times = {m: [] for m in benches}
    for _ in range(args.repeats):
        for m in benches:
            # set up per round: zennit/captum hooks and in-place switches must not leak into other methods
            bench = B.setup(m, model, x, t, "cpu", "float32")
            bench.run()
            t0 = time.perf_counter()
            bench.run()
            times[m].append(time.perf_counter() - t0)
            bench.close()
    med = {m: statistics.median(v) for m, v in times.items()}
    ref = med.get("ixg", math.nan)
    print(f"{args.model}, batch {args.batch}, {args.size}x{args.size}, CPU, {args.threads} threads, "
          f"median of {args.repeats} interleaved rounds:")
    for m in methods:
        if m in failed:
            print(f"  {m:12s} fails ({failed[m]})")
        else:
            print(f"  {m:12s} {med[m]:8.3f} s   ratio to ixg {med[m] / ref:5.2f}")
    if args.memory:
        mem = {}
        for m in ("ixg", "srd"):
            r = B.cpu_peak_mb_in_worker(dict(model=args.model, size=args.size, batch=args.batch, method=m,
                                             threads=args.threads))
            mem[m] = r.get("peak_mb", math.nan)
            print(f"  peak memory {m:4s} {mem[m]:8.1f} MiB" + (f"  ({r['error']})" if "error" in r else ""))
        print(f"  memory ratio srd / ixg {mem['srd'] / mem['ixg']:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
