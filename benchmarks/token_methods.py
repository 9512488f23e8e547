"""Time per explanation of every token-model method of the evaluation (``srd_fx.eval.baselines
.TOKEN_METHODS``) on the digit-scene ViT and Mixer, side by side, at batch 8 on CPU.

    PYTHONPATH=. OMP_NUM_THREADS=1 python benchmarks/token_methods.py                 # vit:gelu mixer:gelu
    PYTHONPATH=. python benchmarks/token_methods.py --models vit:gelu --threads 2 --repeats 5

Each (model, method): the method of the evaluation's registry (``get_method(name)(model, x, t)``,
the call Table 2 makes), on 8 digit test scenes (64x64), target = the label; ``--warmup`` untimed
calls (compiling SRD's explainer, importing the libraries), then the median of ``--repeats``
timed calls.  The models are the trained, cached ones (``srd_fx.eval.train.get_trained``; training
them first takes minutes), or with ``--random-weights`` fresh seeded ones (no method's cost depends
on the weights' values).  Prints a markdown table (seconds per batch of 8, and per image) and
the machine's load average, which matters on a shared machine.
"""
import argparse
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.bench import time_calls  # noqa: E402
from srd_fx.eval import baselines as B  # noqa: E402
from srd_fx.eval import data as D  # noqa: E402
from srd_fx.eval.models import build  # noqa: E402
from srd_fx.eval.train import get_trained  # noqa: E402


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", nargs="+", default=["vit:gelu", "mixer:gelu"])
    p.add_argument("--methods", nargs="+", default=list(B.TOKEN_METHODS))
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--random-weights", action="store_true",
                   help="time fresh seeded models (head re-drawn: timm zero-initialises it) instead of the trained ones")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    import warnings
    warnings.filterwarnings("ignore")
    images, labels, _ = D.DigitScenes("test", n=args.batch).tensors()
    x, t = D.normalize(images), labels.long()
    load0 = os.getloadavg()[0]
    res = {}
    for spec in args.models:
        arch, _, act = spec.partition(":")
        if args.random_weights:
            torch.manual_seed(0)
            model = build(arch, act).eval()
            torch.nn.init.normal_(model.head.weight, std=0.2)
        else:
            model, _ = get_trained(arch, act, progress=False)
        for name in args.methods:
            method = B.get_method(name)
            _, times = time_calls(lambda: method(model, x, t), "cpu", args.warmup, args.repeats)
            res[(spec, method.name)] = statistics.median(times)
            print(f"{spec} {method.name}: {res[(spec, method.name)]:.3f} s", file=sys.stderr)
    names = [B.get_method(n).name for n in args.methods]
    print(f"| Method | " + " | ".join(f"{s} s/batch | {s} ms/image" for s in args.models) + " |")
    print("|---|" + "---:|---:|" * len(args.models))
    for n in names:
        cells = []
        for s in args.models:
            v = res[(s, n)]
            cells += [f"{v:.3f}", f"{1000 * v / args.batch:.0f}"]
        print(f"| {n} | " + " | ".join(cells) + " |")
    print(f"\n{'random' if args.random_weights else 'trained'} weights, batch {args.batch}, 64x64, CPU, {args.threads} torch thread(s), median of {args.repeats} after "
          f"{args.warmup} warm-up; load average {load0:.1f} at start, {os.getloadavg()[0]:.1f} at end")
    return 0


if __name__ == "__main__":
    sys.exit(main())
