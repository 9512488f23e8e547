"""Peak memory of explaining a large batch, with and without ``chunk_size`` (CPU).

Every configuration is run twice: as a plain call, and under ``torch.no_grad()``.  (The
explainer's outputs are differentiable; when they carry an autograd graph, every chunk's saved
activations stay alive with its outputs, and chunking cannot bound the peak.)

Each configuration runs in a fresh subprocess (peak resident memory is a process-lifetime high
water mark).  The subprocess builds the model and the input batch, compiles the explainer and
runs it once on two samples (so that the twin is built), then records ``ru_maxrss`` as its
baseline, explains the whole batch, and records ``ru_maxrss`` again.  The difference is the
memory the explanation itself needed at its peak.  With ``chunk_size=n`` only n samples'
activations (and recorded constants and relevance maps) are alive at a time, so the peak should
grow with n, not with the batch.

Run:  python benchmarks/memory_chunking.py [--model resnet18] [--batch 64] [--size 64]
                                          [--chunks none,16,4] [--json out.json]
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path
import subprocess
import sys

_CHILD = r"""
import gc, json, resource, sys, time, torch, torchvision
import srd_fx
torch.set_num_threads({threads})
torch.manual_seed(0)
m = getattr(torchvision.models, {model!r})(num_classes=10).eval()
x = torch.randn({batch}, 3, {size}, {size})
chunk = {chunk}
e = srd_fx.compile(m, chunk_size=chunk)
e(x[:2])                                   # build the twin
gc.collect()
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
t = time.perf_counter()
if {no_grad}:
    with torch.no_grad():
        out = e(x)
else:
    out = e(x)
dt = time.perf_counter() - t
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
sal = out.saliency.detach()
print(json.dumps(dict(base_kib=base, peak_kib=peak, seconds=dt, finite=bool(torch.isfinite(sal).all()),
                      holds_graph=out.saliency.grad_fn is not None,
                      checksum=float(sal.double().sum()))))
"""


def run(model, batch, size, chunk, threads, no_grad):
    code = _CHILD.format(model=model, batch=batch, size=size, chunk=chunk, threads=threads, no_grad=no_grad)
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    if res.returncode != 0:
        raise RuntimeError(res.stderr[-3000:])
    return json.loads(res.stdout.strip().splitlines()[-1])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="resnet18", help="a torchvision classification model name")
    ap.add_argument("--batch", type=int, default=64, help="samples explained in one call")
    ap.add_argument("--size", type=int, default=64, help="input height and width in pixels")
    ap.add_argument("--chunks", default="none,16,4",
                    help="comma-separated chunk sizes to compare ('none': no chunking)")
    ap.add_argument("--threads", type=int, default=2, help="torch CPU threads in each run")
    ap.add_argument("--json", default=None, help="also write the figures to this JSON file")
    args = ap.parse_args(argv)
    if sys.platform != "linux":
        print("ru_maxrss is read in KiB, as on Linux; figures elsewhere would be mis-scaled")
    rows = []
    for no_grad in (False, True):
        ctx = "under torch.no_grad()" if no_grad else "default (autograd on)"
        print(f"-- {ctx}")
        first = None
        for c in args.chunks.split(","):
            chunk = None if c.strip().lower() == "none" else int(c)
            r = run(args.model, args.batch, args.size, chunk, args.threads, no_grad)
            r.update(chunk_size=chunk, no_grad=no_grad, explain_peak_mib=(r["peak_kib"] - r["base_kib"]) / 1024)
            rows.append(r)
            first = r["explain_peak_mib"] if first is None else first
            print(f"{args.model} batch {args.batch} {args.size}x{args.size} float32 chunk_size={str(chunk):>4s}: "
                  f"peak above baseline {r['explain_peak_mib']:7.1f} MiB ({100 * r['explain_peak_mib'] / first:5.1f}% "
                  f"of the first row; baseline {r['base_kib'] / 1024:6.1f} MiB; outputs hold the autograd graph: "
                  f"{r['holds_graph']}; {r['seconds']:.1f} s; finite={r['finite']}; sum of maps {r['checksum']:.6g})",
                  flush=True)
    print(f"(torch CPU, {args.threads} threads; each row a fresh process; "
          f"peak = ru_maxrss after explaining - ru_maxrss before; times are wall-clock on a shared machine)")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
