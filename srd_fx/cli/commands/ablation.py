"""``srd-fx ablation``: the ablation of paper Appendix F (SPEC §5), on the trained digit-scene models.

Three variants of the SRD backward, all read out at the input (SRD-input):

* ``neuron``: scalar neurons instead of PFVs (``srd_fx.compile(unit="neuron")``, LRP-0 with the
  bias shared per neuron);
* ``post``:   PFVs, sharing ratios projected on the post-activation vector (``value="post"``);
* ``srd``:    PFVs and pre-activation values (the method).

Writes, under ``--out``: ``maps.png`` (a Fig.-7-like grid: image, then the three maps, for a few test
scenes per model) and, unless ``--no-metrics``, ``table.md`` / ``table.csv`` / ``ablation.json`` with
the Fidelity and Sparseness of each variant (Quantus, through ``srd_fx.eval.metrics``).
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import sys
import time

from ..args import add_cache_dir, add_digit_models

NAME = "ablation"
HELP = ("Ablation of SRD (paper Appendix F): scalar neurons vs PFVs with post-activation vs SRD; maps "
        "side by side and Fidelity / Sparseness on the digit scenes.")

#: variant -> (label, srd_fx.compile keyword arguments)
VARIANTS = {
    "neuron": ("Neuron (LRP-0)", dict(unit="neuron", value="pre")),
    "post": ("PFV (post-activation)", dict(unit="pfv", value="post")),
    "srd": ("SRD (PFV, pre-activation)", dict(unit="pfv", value="pre")),
}


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_digit_models(p, ["resnet", "vgg"], "Trained digit-scene architectures to run the ablation on (trained and "
                     "cached on first use by srd_fx.eval.train.get_trained).", "Side in pixels of the digit scenes.")
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS),
                   help="Ablation variants to compare (neuron = LRP-0 on scalar neurons, post = PFVs with "
                        "post-activation sharing, srd = the method).")
    p.add_argument("--images", type=int, default=4, help="Number of test scenes shown in maps.png.")
    p.add_argument("--first-image", type=int, default=0, help="Index of the first test scene shown in "
                                                              "maps.png.")
    p.add_argument("--n", type=int, default=200, help="Number of test scenes the metrics are averaged over.")
    p.add_argument("--no-metrics", action="store_true", help="Only draw the maps (skip Fidelity and "
                                                             "Sparseness).")
    p.add_argument("--batch-size", type=int, default=50, help="Images per explainer call.")
    p.add_argument("--seed", type=int, default=0, help="Seed of the metrics' random perturbations.")
    add_cache_dir(p)
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads.")
    p.add_argument("--out", default="srd_fx_results/ablation",
                   help="folder the tables, figures and JSON are written to "
                        "(default: srd_fx_results/ablation)")
    p.add_argument("--no-progress", action="store_true", help="Hide the progress bars.")


def explainers(model, variants, example, head="gradcam"):
    """variant -> compiled SRD explainer (input relevance) of ``model``."""
    import srd_fx
    return {v: srd_fx.compile(model, example_input=example, head=head, **VARIANTS[v][1]) for v in variants}


def saliency(explainer, x, batch_size):
    """SRD-input maps (B, H, W) for the predicted class, in batches."""
    import torch
    out = []
    for i in range(0, len(x), batch_size):
        with torch.no_grad():
            out.append(explainer(x[i:i + batch_size]).saliency)
    return torch.cat(out)


def _display(m):
    """A map divided by its largest absolute value (SPEC §2: display divides by the maximum)."""
    a = abs(m).max()
    return m / a if a > 0 else m


def draw_maps(panels, path):
    """``panels``: model name -> (images (k,3,H,W) in [0,1], labels, preds, {variant: maps (k,H,W)})."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    rows = [(name, j) for name, p in panels.items() for j in range(len(p[0]))]
    variants = list(next(iter(panels.values()))[3])
    ncol = 1 + len(variants)
    fig, axes = plt.subplots(len(rows), ncol, figsize=(1.9 * ncol, 1.9 * len(rows)), squeeze=False)
    im = None
    for r, (name, j) in enumerate(rows):
        images, labels, preds, maps = panels[name]
        ax = axes[r, 0]
        ax.imshow(images[j].permute(1, 2, 0).numpy())
        ax.set_ylabel(f"{name}\nlabel {int(labels[j])}, pred {int(preds[j])}", fontsize=7)
        for c, v in enumerate(variants, start=1):
            im = axes[r, c].imshow(_display(maps[v][j].numpy()), cmap="bwr", vmin=-1, vmax=1)
            if r == 0:
                axes[r, c].set_title(VARIANTS[v][0].replace(" (", "\n("), fontsize=8)
        if r == 0:
            axes[r, 0].set_title("image\n(maps: predicted class)", fontsize=8)
        for ax in axes[r]:
            ax.set_xticks([])
            ax.set_yticks([])
    fig.colorbar(im, ax=axes, shrink=0.6, label="relevance / max |relevance|")
    fig.savefig(path, dpi=130, bbox_inches="tight")
    plt.close(fig)
    return path


def run(args) -> int:
    import torch

    from srd_fx.eval import data as D
    from srd_fx.eval.train import get_trained
    torch.set_num_threads(max(1, args.threads))
    metrics = None
    if not args.no_metrics:
        try:
            from srd_fx.eval import metrics  # Quantus-based (another module of the harness)
        except ImportError as e:
            print(f"srd-fx ablation: the metrics module is not available ({e}); run with --no-metrics "
                  "to draw the maps only", file=sys.stderr)
            return 2
    os.makedirs(args.out, exist_ok=True)
    ds = D.DigitScenes("test", size=args.size, n=max(args.n, args.first_image + args.images))
    show = range(args.first_image, args.first_image + args.images)
    shown = [ds[i] for i in show]
    img_show = torch.stack([a for a, _, _ in shown])
    lab_show = torch.tensor([b for _, b, _ in shown])
    panels, results = {}, {}
    for arch in args.arch:
        t0 = time.time()
        name = f"{arch}/{args.act}"
        model, test_acc = get_trained(arch=arch, act=args.act, size=args.size, cache_dir=args.cache_dir,
                                      progress=not args.no_progress)
        x_show = D.normalize(img_show)
        ex = explainers(model, args.variants, x_show[:1])
        with torch.no_grad():
            preds = model(x_show).argmax(1)
        panels[name] = (img_show, lab_show, preds, {v: saliency(e, x_show, args.batch_size) for v, e in ex.items()})
        if metrics is not None:
            results[name] = {"test_accuracy": test_acc,
                             "metrics": _metrics(metrics, model, ex, ds, args)}
        print(f"{name}: done in {time.time() - t0:.1f} s")
    print("maps:", draw_maps(panels, os.path.join(args.out, "maps.png")))
    if metrics is not None:
        _write_table(results, args)
    return 0


def variant_method(model, variant):
    """The variant as a :class:`srd_fx.eval.baselines.Method` (``method(model, x, target) -> (B, H, W)``),
    compiled once per input shape, so that the evaluation harness scores it like any baseline."""
    import srd_fx
    from srd_fx.eval.baselines import Method
    compiled = {}

    def fn(m, x, t):
        key = (tuple(x.shape[1:]), x.dtype)
        if key not in compiled:
            compiled[key] = srd_fx.compile(m, example_input=x[:1], **VARIANTS[variant][1])
        return compiled[key](x, target=t).saliency

    return Method(VARIANTS[variant][0], fn, "input", "srd_fx")


def _metrics(metrics, model, ex, ds, args):
    """Fidelity and Sparseness of each variant on the first ``--n`` test scenes, through the evaluation
    harness (``srd_fx.eval.evaluation.evaluate``: labelled class as target, maps prepared by
    ``srd_fx.eval.metrics.prepare``, Quantus metrics, one seed per batch shared by the variants)."""
    from srd_fx.eval import evaluation as E
    images, labels, masks = ds.tensors(args.n)
    methods = [variant_method(model, v) for v in ex]
    scores = E.evaluate(model, images, labels, masks, methods=methods, metrics=("Fidelity", "Sparseness"),
                        settings=metrics.MetricSettings(seed=args.seed), batch_size=args.batch_size,
                        progress=not args.no_progress)
    summary = E.summarise(scores)
    return {v: summary[VARIANTS[v][0]] for v in ex}


def _write_table(results, args):
    head = ["Model", "Variant", "Fidelity (↑)", "Sparseness (↑)", "n (Fidelity / Sparseness)"]
    rows = []
    for name, r in results.items():
        for v, m in r["metrics"].items():
            rows.append([name, VARIANTS[v][0]] + [f"{m[k]['mean']:.4f} ± {m[k]['sem']:.4f}"
                                                  for k in ("Fidelity", "Sparseness")]
                        + [f"{m['Fidelity']['n']} / {m['Sparseness']['n']}"])
    with open(os.path.join(args.out, "table.csv"), "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["Model", "Variant", "Fidelity", "Fidelity SEM", "Sparseness", "Sparseness SEM",
                    "n Fidelity", "n Sparseness"])
        for name, r in results.items():
            for v, m in r["metrics"].items():
                w.writerow([name, v, f"{m['Fidelity']['mean']:.6f}", f"{m['Fidelity']['sem']:.6f}",
                            f"{m['Sparseness']['mean']:.6f}", f"{m['Sparseness']['sem']:.6f}",
                            m["Fidelity"]["n"], m["Sparseness"]["n"]])
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    lines += ["", f"Mean ± standard error over the first {args.n} digit-scene test images (size {args.size}), "
                  f"explaining the labelled class; Quantus FaithfulnessCorrelation (Fidelity) and "
                  f"Sparseness via srd_fx.eval.evaluation / srd_fx.eval.metrics, seed {args.seed}. Images whose score is not "
                  f"finite (Quantus cannot score an all-zero map) are left out of the mean: n counts the rest."]
    text = "\n".join(lines) + "\n"
    with open(os.path.join(args.out, "table.md"), "w") as f:
        f.write(text)
    with open(os.path.join(args.out, "ablation.json"), "w") as f:
        json.dump({"arguments": {k: v for k, v in vars(args).items() if not k.startswith("_")},
                   "results": results}, f, indent=1)
    print(text)
