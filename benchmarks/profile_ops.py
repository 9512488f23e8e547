#!/usr/bin/env python
"""Where SRD's time goes, op by op, next to input x gradient (issue 18): ``torch.profiler`` over
one call of each (after one untimed call), aten ops grouped by name and sorted by self CPU time.

    PYTHONPATH=$PWD python benchmarks/profile_ops.py --model timm:convnext_tiny --batch 2 --top 20
    PYTHONPATH=$PWD python benchmarks/profile_ops.py --model timm:vgg16 --batch 2 --memory

Self CPU time is the op's own time (without the ops it calls); on a loaded machine the absolute
figures inflate, the split between ops much less.  ``--memory`` adds the bytes each op allocates
(profile_memory), which shows the ops that hold the call's large temporaries.  The methods are
benchmarks/bench.py's (``srd``: ``explainer(x, target)`` under ``torch.no_grad()``; ``ixg``:
parameters frozen, forward, backward of the target logits, ``x.grad * x``).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench as B  # noqa: E402


def table(method, model, x, t, top, memory):
    bench = B.setup(method, model, x, t, "cpu", "float32")
    bench.run()
    with profile(activities=[ProfilerActivity.CPU], profile_memory=memory) as prof:
        bench.run()
    bench.close()
    ev = prof.key_averages()
    total = sum(e.self_cpu_time_total for e in ev)
    print(f"\n{method}: {total / 1e3:.0f} ms self CPU in {sum(e.count for e in ev)} op calls")
    cols = "self ms   share  calls" + ("   alloc MiB" if memory else "")
    print(f"  {'op':44s} {cols}")
    for e in sorted(ev, key=lambda e: -e.self_cpu_time_total)[:top]:
        extra = f"  {e.self_cpu_memory_usage / 2 ** 20:10.1f}" if memory else ""
        print(f"  {e.key[:44]:44s} {e.self_cpu_time_total / 1e3:7.1f}  {100 * e.self_cpu_time_total / total:5.1f}%"
              f"  {e.count:5d}{extra}")
    return total


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="timm:convnext_tiny")
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--top", type=int, default=20)
    ap.add_argument("--memory", action="store_true", help="also the bytes each op allocates")
    ap.add_argument("--methods", default="ixg,srd")
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    model = B.load_model(a.model)
    x = B.make_input(a.batch, a.size)
    t = B.targets_of(model, x, "cpu", "float32")
    print(f"{a.model}, batch {a.batch}, {a.size}x{a.size}, float32, {a.threads} thread(s)")
    totals = {m: table(m, model, x, t, a.top, a.memory) for m in a.methods.split(",")}
    if "ixg" in totals and "srd" in totals:
        print(f"\nself CPU time srd / ixg: {totals['srd'] / totals['ixg']:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
