#!/usr/bin/env python
"""What a method holds at its memory peak (issue 18): the resident set after every aten op of one
call, and at the op where it peaks, the tensors the generated SRD code (and the runtime helpers it
is inside) hold, largest first.

    PYTHONPATH=$PWD python benchmarks/live_memory.py --model timm:vgg16 --batch 2
    PYTHONPATH=$PWD python benchmarks/live_memory.py --model timm:convnext_tiny --batch 2 --methods srd --top 30

As in bench.py's memory workers, glibc's mmap threshold is pinned at one page (the script re-executes
itself with ``MALLOC_MMAP_THRESHOLD_=4096``), so every tensor buffer is its own mapping and the resident
set follows the live tensors; the peak is reported above the resident set before the call (the loaded
model and the method's setup), like bench.py's ``peak_mb``.  The call is run twice under a
``TorchDispatchMode``: the first finds the op at which the resident set peaks, the second stops there
and lists the tensors alive in the Python frames of the call (the generated code's variables by
name; a buffer shared by several views is counted once).  For input×gradient the tensors autograd
saved for the backward are not Python variables: their total is the peak minus what is listed.
"""
from __future__ import annotations

import argparse
import gc
import os
import sys
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench as B  # noqa: E402

PAGE = os.sysconf("SC_PAGE_SIZE")
MiB = 2 ** 20


def rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * PAGE


class Watch(TorchDispatchMode):
    """Resident set after every op; with ``stop_at`` set, a snapshot of the live tensors there."""

    def __init__(self, stop_at=None):
        super().__init__()
        self.n, self.peak, self.peak_at, self.peak_op = 0, 0, -1, ""
        self.stop_at, self.snapshot = stop_at, None

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        r = rss()
        if r > self.peak:
            self.peak, self.peak_at, self.peak_op = r, self.n, str(func)
        if self.n == self.stop_at:
            self.snapshot = live_tensors(out)
        self.n += 1
        return out


def live_tensors(out):
    """{buffer: (bytes, [names])} of the tensors bound in the frames of the call (and ``out``)."""
    found = {}

    def add(name, t):
        if isinstance(t, torch.Tensor) and t.device.type == "cpu" and not isinstance(t, torch.nn.Parameter):
            try:
                st = t.untyped_storage()
            except (RuntimeError, NotImplementedError):
                return
            key = st.data_ptr()
            if key == 0:
                return
            nb, names = found.get(key, (st.nbytes(), []))
            names.append(name)
            found[key] = (nb, names)
        elif isinstance(t, (tuple, list)):
            for k, v in enumerate(t):
                add(f"{name}[{k}]", v)

    add("<op output>", out)
    f = sys._getframe(1)
    while f is not None:
        code = f.f_code
        where = "gen" if "eval_with_key" in code.co_filename else Path(code.co_filename).stem + "." + code.co_name
        if "torch/" in code.co_filename.replace("\\", "/") and where != "gen":
            f = f.f_back
            continue
        for k, v in list(f.f_locals.items()):
            add(f"{where}:{k}", v)
        f = f.f_back
    return found


def profile(method, model, x, t, top):
    bench = B.setup(method, model, x, t, "cpu", "float32")
    bench.run()
    gc.collect()
    base = rss()
    w = Watch()
    with w:
        bench.run()
    gc.collect()
    w2 = Watch(stop_at=w.peak_at)
    with w2:
        bench.run()
    bench.close()
    print(f"\n{method}: {w.n} ops; peak {(w.peak - base) / MiB:.1f} MiB above the resident set before the call, "
          f"after op {w.peak_at} ({w.peak_op})")
    snap = w2.snapshot or {}
    total = sum(nb for nb, _ in snap.values())
    print(f"  tensors bound in the call's frames at that op: {total / MiB:.1f} MiB in {len(snap)} buffers "
          f"(the rest: autograd's saved tensors, allocator slack, parameters excluded)")
    rows = sorted(snap.values(), key=lambda r: -r[0])
    for nb, names in rows[:top]:
        print(f"  {nb / MiB:9.1f} MiB  {', '.join(dict.fromkeys(names))[:140]}")
    return (w.peak - base) / MiB


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="timm:vgg16")
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--top", type=int, default=25)
    ap.add_argument("--methods", default="ixg,srd")
    a = ap.parse_args(argv)
    if os.environ.get("MALLOC_MMAP_THRESHOLD_") != str(B.MMAP_THRESHOLD):
        env = dict(os.environ, MALLOC_MMAP_THRESHOLD_=str(B.MMAP_THRESHOLD),
                   MALLOC_TRIM_THRESHOLD_=str(B.MMAP_THRESHOLD))
        env.pop("MALLOC_MMAP_MAX_", None)
        os.execve(sys.executable, [sys.executable, str(Path(__file__).resolve())]
                  + (sys.argv[1:] if argv is None else list(argv)), env)
    torch.set_num_threads(1)
    model = B.load_model(a.model)
    x = B.make_input(a.batch, a.size)
    t = B.targets_of(model, x, "cpu", "float32")
    print(f"{a.model}, batch {a.batch}, {a.size}x{a.size}, float32")
    peaks = {m: profile(m, model, x, t, a.top) for m in a.methods.split(",")}
    if "ixg" in peaks and "srd" in peaks:
        print(f"\npeak srd / ixg: {peaks['srd'] / peaks['ixg']:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
