#!/usr/bin/env python
"""aten ops and device-to-host syncs per SRD call next to input x gradient (issue 18).

On a GPU every aten op is at least one kernel launch and one pass over its tensors, and every
device-to-host sync stalls the stream and makes the call impossible to capture as a CUDA graph;
both can be counted on the CPU.  One ``explainer(x)`` call (head "gradcam", the input map only,
under ``torch.no_grad()``) and one input x gradient as a user runs it for attribution
(parameters frozen, so no weight gradients: forward, ``backward()`` of the target logits,
``x.grad * x`` summed over channels) are counted with :class:`srd_fx.eval.dispatch.OpCounter`.
Counts do not depend on the machine, its load or the weights (random, seed 0).

    PYTHONPATH=$PWD python benchmarks/op_count.py                   # the five models, batch 2, 224
    PYTHONPATH=$PWD python benchmarks/op_count.py --fast            # compile(..., check=False)
    PYTHONPATH=$PWD python benchmarks/op_count.py --models timm:resnet18 --size 64 --top 15
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

from srd_fx.eval.dispatch import OpCounter  # noqa: E402

DEFAULT_MODELS = ("torchvision:resnet50,torchvision:vgg16,timm:efficientnet_b0,timm:convnext_tiny,"
                  "timm:vit_small_patch16_224")


def count(model, x, *, check=True):
    import srd_fx
    explainer = srd_fx.compile(model, example_input=x[:1], check=check)
    with torch.no_grad():
        explainer(x)  # warm: nothing lazy is counted
        with OpCounter() as srd:
            explainer(x)
    with torch.no_grad():
        t = model(x).argmax(1)

    def ixg():
        xr = x.detach().requires_grad_(True)
        model(xr).gather(1, t[:, None]).sum().backward()
        return (xr.grad * xr.detach()).sum(1)
    ixg()
    with OpCounter() as ref:
        ixg()
    return srd, ref


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", default=DEFAULT_MODELS)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--fast", action="store_true", help="compile(..., check=False): the fast mode")
    p.add_argument("--top", type=int, default=0, help="also list the N most frequent SRD ops per model")
    p.add_argument("--json", type=Path, help="write the rows here")
    a = p.parse_args(argv)
    torch.set_num_threads(1)
    from bench import load_model
    rows = []
    print(f"batch {a.batch}, {a.size}x{a.size}, check={not a.fast}\n")
    print("| model | SRD aten ops | input×gradient aten ops | ratio | syncs per SRD call | syncs per ixg call |")
    print("|---|---|---|---|---|---|")
    for name in a.models.split(","):
        model = load_model(name)
        torch.manual_seed(0)
        x = torch.randn(a.batch, 3, a.size, a.size)
        srd, ref = count(model, x, check=not a.fast)
        row = dict(model=name, srd_ops=srd.total, ixg_ops=ref.total, ratio=srd.total / ref.total,
                   srd_syncs=srd.syncs, ixg_syncs=ref.syncs, sync_ops=dict(srd.sync_counts),
                   top=srd.counts.most_common(a.top or 25))
        rows.append(row)
        syncs = f"{srd.syncs}" + (f" ({', '.join(f'{k} ×{v}' for k, v in srd.sync_counts.items())})" if srd.syncs else "")
        print(f"| {name.split(':')[-1]} | {srd.total:,} | {ref.total:,} | {row['ratio']:.2f}× | {syncs} | {ref.syncs} |",
              flush=True)
        if a.top:
            print("  " + ", ".join(f"{k.split('.', 1)[-1]} {v}" for k, v in srd.counts.most_common(a.top)))
    if a.json:
        a.json.write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
