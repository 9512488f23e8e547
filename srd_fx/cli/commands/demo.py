"""``srd-fx demo``: the quickest meaningful picture of SRD.

Trains (first run, cached afterwards) the small digit-scenes ResNet of the evaluation harness,
explains held-out scenes with SRD (low / high / input) and three baselines from captum, zennit and
pytorch-grad-cam, writes one PNG grid with the ground-truth outlines and prints a metrics table
computed by Quantus (the same code as ``srd-fx evaluate``, on fewer images)."""
from __future__ import annotations

import argparse
import importlib.util
import os
import shlex
import sys
import time

from ..args import add_cache_dir, add_train_settings

NAME = "demo"
HELP = ("Train (or load from cache) the digit-scenes ResNet, explain held-out scenes with SRD and three "
        "baselines, write a PNG grid with ground-truth outlines and print a metrics table.")

SRD_METHODS = ("SRD-low", "SRD-high", "SRD-input")
DEFAULT_BASELINES = ("GradCAM", "LRP-z+", "IntegratedGradients")
DEFAULT_METRICS = ("Pointing", "Attribution", "Sparseness", "Fidelity")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", default="srd_fx_demo",
                   help="Folder to write demo.png (the grid) and demo.md (the table and the command) into, "
                        "created if needed; or a path ending in .png for the grid, with the .md next to it "
                        "(default: srd_fx_demo).")
    p.add_argument("--n-images", type=int, default=6,
                   help="Held-out scenes shown in the grid, one row each (default: 6).")
    p.add_argument("--metric-images", type=int, default=50,
                   help="Held-out scenes scored for the metrics table; 0 skips the table (default: 50).")
    p.add_argument("--baselines", nargs="+", default=list(DEFAULT_BASELINES), metavar="METHOD",
                   help="Baseline methods shown next to SRD (names from srd_fx.eval.baselines.METHODS; "
                        "default: GradCAM LRP-z+ IntegratedGradients).")
    p.add_argument("--metrics", nargs="+", default=list(DEFAULT_METRICS), metavar="METRIC",
                   help="Quantus metrics of the table, from Pointing Attribution Sparseness Fidelity Stability "
                        "(default: all but Stability, the slowest).")
    p.add_argument("--seed", type=int, default=0,
                   help="Seed of the held-out scenes and of the metrics' random draws (default: 0).")
    add_cache_dir(p, "Where the trained model is cached (default: $SRD_FX_CACHE or ~/.cache/srd_fx).")
    add_train_settings(p, "Override a training setting (epochs, n_train, n_test, batch_size, lr, weight_decay, "
                          "seed), e.g. epochs=1 for a smoke test; repeatable. Changes the cache entry.")
    p.add_argument("--threads", type=int, default=None,
                   help="Number of CPU threads for torch when explaining and scoring (default: torch's choice, "
                        "but 1 when the machine is already busy, i.e. its load average is at least its number "
                        "of cores). Training always uses one thread, so that its weights are the same on "
                        "every machine.")
    p.add_argument("--no-progress", action="store_true",
                   help="Hide the progress bars.")


def _fail(msg: str) -> int:
    print(f"srd-fx demo: error: {msg}", file=sys.stderr)
    return 2


def _busy_machine_threads():
    """1 when the CPUs are already busy (load average >= cores), else None (torch's choice).  On a
    shared machine several torch threads per process wait on each other: one thread was 6x faster
    per training step at a load of 11 on 2 cores."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        cores = os.cpu_count() or 1
    try:
        load = os.getloadavg()[0]
    except (AttributeError, OSError):  # pragma: no cover - not available
        return None
    if cores > 1 and load >= cores:
        print(f"note: the machine is busy (load {load:.1f} on {cores} cores): using 1 torch thread "
              "(--threads N to choose)", file=sys.stderr)
        return 1
    return None


def run(args: argparse.Namespace) -> int:
    t_start = time.perf_counter()
    import torch

    from srd_fx.eval import baselines as B
    from srd_fx.eval import data as D
    from srd_fx.eval import evaluation as E
    from srd_fx.eval import metrics as M
    from srd_fx.eval.train import TRAIN_THREADS, cached_record, get_trained, parse_train_settings, resolve_cache_dir

    missing = [pkg for mod, pkg in (("captum", "captum"), ("zennit", "zennit"), ("pytorch_grad_cam", "grad-cam"),
                                    ("quantus", "quantus"), ("scipy", "scipy"))
               if importlib.util.find_spec(mod) is None]
    if missing:
        return _fail(f"the demo's baselines and metrics need {', '.join(missing)}: pip install "
                     f"'srd_fx[baselines]' (or pip install {' '.join(missing)})")
    png = args.out if args.out.lower().endswith(".png") else os.path.join(args.out, "demo.png")
    if args.n_images < 1:
        return _fail("--n-images must be at least 1")
    if args.metric_images < 0:
        return _fail("--metric-images must be 0 (no table) or more")
    try:
        methods = list(SRD_METHODS) + [B.get_method(m).name for m in args.baselines]
        train_kw = parse_train_settings(args.train_setting)
    except (KeyError, ValueError) as e:
        return _fail(e.args[0] if e.args else str(e))
    methods = list(dict.fromkeys(methods))
    bad = [m for m in args.metrics if m not in M.HIGHER_IS_BETTER]
    if bad:
        return _fail(f"unknown metric(s) {bad}; choose from {', '.join(M.METRIC_NAMES)}")
    threads = args.threads or _busy_machine_threads()
    if threads:
        torch.set_num_threads(threads)
    progress = not args.no_progress
    size = 64

    # 1. the model
    cache = resolve_cache_dir(args.cache_dir)
    cached = cached_record("resnet", "relu", size, cache_dir=args.cache_dir, **train_kw) is not None
    print(f"[1/3] digit-scenes ResNet: {'loading it from' if cached else 'training it (first run only) into'} "
          f"{cache}", flush=True)
    t0 = time.perf_counter()
    model, acc = get_trained("resnet", "relu", size=size, cache_dir=args.cache_dir, progress=progress, **train_kw)
    t_model = time.perf_counter() - t0
    times = {"model": t_model}
    print(f"      test accuracy {acc:.3f} ({t_model:.0f} s)", flush=True)

    # 2. the grid
    n_total = max(args.n_images, args.metric_images)
    images, labels, masks = D.DigitScenes("test", size=size, n=n_total, seed=args.seed).tensors(progress=False)
    print(f"[2/3] explaining {args.n_images} held-out scenes with {', '.join(methods)}", flush=True)
    t0 = time.perf_counter()
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    k = args.n_images
    fig = E.plot_maps(model, images[:k], labels[:k], masks[:k], methods=methods,
                      title=f"Held-out digit scenes, digit-scenes ResNet (test accuracy {acc:.3f})\n"
                            "red: positive relevance, blue: negative, outline: the digit (ground truth)")
    if os.path.dirname(png):
        os.makedirs(os.path.dirname(png), exist_ok=True)
    fig.savefig(png, dpi=150)
    plt.close(fig)
    times["grid"] = time.perf_counter() - t0
    print(f"      wrote {png} ({times['grid']:.0f} s)", flush=True)

    # 3. the table
    table = ""
    if args.metric_images:
        n = args.metric_images
        print(f"[3/3] scoring {n} held-out scenes with Quantus: {', '.join(args.metrics)}", flush=True)
        t0 = time.perf_counter()
        settings = M.MetricSettings(seed=args.seed)
        scores = E.evaluate(model, images[:n], labels[:n], masks[:n], methods=methods, metrics=args.metrics,
                            settings=settings, batch_size=50, progress=progress)
        table = E.table2_markdown({"ResNet": scores}, metrics=args.metrics, n_images=n)
        times["table"] = time.perf_counter() - t0
        print(f"      ({times['table']:.0f} s)\n")
        print(table)
    total = time.perf_counter() - t_start
    md = os.path.splitext(png)[0] + ".md"
    cmd = "srd-fx demo " + " ".join(shlex.quote(a) for a in sys.argv[2:]) if len(sys.argv) > 1 and \
        sys.argv[1] == NAME else "srd-fx demo"
    with open(md, "w") as f:
        f.write(f"![SRD demo]({os.path.basename(png)})\n\n"
                f"Made by `{cmd.strip()}` in {total:.0f} s ({'model loaded from the cache' if cached else 'training'} "
                f"{times['model']:.0f} s, grid {times['grid']:.0f} s, table {times.get('table', 0):.0f} s; "
                f"torch threads: {torch.get_num_threads()}, training: {TRAIN_THREADS}); digit-scenes ResNet, test accuracy "
                f"{acc:.3f}.\n\n"
                + table)
    print(f"done in {total:.0f} s: {png}, {md}")
    return 0
