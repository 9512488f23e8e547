"""``srd-fx apop``: Activation-Pattern-Only Prediction (paper Appendix D: Tables 1 and 3, Fig. 6).

For every model: top-1/top-5 accuracy of the original model, of APOP and of "APOP & relu" with the
replacement inputs zeros, ones and N(0, 1) (a Table-3-like table), and with ``--binarize`` the
accuracy when a single activation layer is binarised, for every layer (a Fig.-6-like plot with the
chance line).  Models: the trained digit-scene models of the evaluation harness (``--arch``,
``--act``), or any torchvision/timm model with user weights evaluated on an ImageFolder
(``--model``, ``--weights``, ``--imagefolder``).

Writes, under ``--out``: ``table.md``, ``table.csv``, ``apop.json`` and, with ``--binarize``,
``binarize.csv`` and ``binarize.png``.
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import sys
import time

from ..args import add_cache_dir

NAME = "apop"
HELP = ("Activation-Pattern-Only Prediction: accuracy with the recorded activation pattern replayed "
        "on zeros / ones / N(0,1), and per-layer binarisation (paper Appendix D).")


def add_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("trained digit-scene models (default)")
    g.add_argument("--arch", nargs="+", default=["resnet", "vgg"], choices=["resnet", "vgg"],
                   help="Architectures of the trained digit-scene models to evaluate (trained and cached "
                        "on first use by srd_fx.eval.train.get_trained).")
    g.add_argument("--act", nargs="+", default=["relu"],
                   help="Activations of the trained models (relu, elu, leakyrelu, silu, gelu, tanh); every "
                        "--arch is combined with every --act.")
    g.add_argument("--size", type=int, default=64, help="Side in pixels of the digit scenes (and of the "
                                                         "models trained on them).")
    g.add_argument("--n", type=int, default=1000, help="Number of test images (digit scenes: the first N "
                                                       "test scenes; ImageFolder: the first N images).")
    add_cache_dir(g)
    u = p.add_argument_group("your own model (instead of the trained ones)")
    u.add_argument("--model", default=None, help="A torchvision or timm model name, e.g. torchvision:resnet50 "
                                                 "or timm:resnet18; needs --weights and --imagefolder.")
    u.add_argument("--weights", default=None, help="State-dict file for --model "
                                                   "(torch.save(model.state_dict(), FILE)).")
    u.add_argument("--imagefolder", default=None, help="Directory in torchvision ImageFolder layout "
                                                       "(DIR/<class>/<image>) to evaluate --model on; labels "
                                                       "are the sorted class-folder indices.")
    u.add_argument("--image-size", type=int, default=224, help="Centre-crop side for --imagefolder images "
                                                               "(resized to SIZE*256/224 first).")
    u.add_argument("--num-classes", type=int, default=None, help="Classifier size of --model (default: read "
                                                                 "from the weights file).")
    u.add_argument("--mean", type=float, nargs=3, default=None, help="Normalisation mean of --model (default: "
                                                                     "the timm model's, else ImageNet's).")
    u.add_argument("--std", type=float, nargs=3, default=None, help="Normalisation std of --model (default: "
                                                                    "the timm model's, else ImageNet's).")
    e = p.add_argument_group("experiment")
    e.add_argument("--inputs", nargs="+", default=["zeros", "ones", "normal"],
                   choices=["zeros", "ones", "normal"],
                   help="Replacement inputs APOP replays the pattern on (in the model's normalised input "
                        "space, as in the paper).")
    e.add_argument("--binarize", action="store_true", help="Also binarise each activation layer in turn "
                                                          "(Fig. 6) and plot accuracy per layer.")
    e.add_argument("--batch-size", type=int, default=100, help="Images per forward pass.")
    e.add_argument("--seed", type=int, default=0, help="Seed of the N(0,1) replacement input.")
    e.add_argument("--threads", type=int, default=2, help="torch CPU threads.")
    e.add_argument("--device", default="cpu", help="torch device to run on (cpu, cuda, ...).")
    e.add_argument("--out", default="srd_fx_results/apop",
                   help="Output directory for the table, JSON and plot (default: srd_fx_results/apop).")
    e.add_argument("--no-progress", action="store_true", help="Hide the progress bars.")


# ------------------------------------------------------------------------------- data and models ----
def _batches(x, y, batch_size, device):
    for i in range(0, len(x), batch_size):
        yield x[i:i + batch_size].to(device), y[i:i + batch_size].to(device)


def _trained_sources(args):
    from srd_fx.eval import data as D
    from srd_fx.eval.train import cached_record, get_trained
    images, labels, _ = D.DigitScenes("test", size=args.size, n=args.n).tensors(progress=not args.no_progress)
    x = D.normalize(images, D.DIGITS_MEAN, D.DIGITS_STD)
    for arch in args.arch:
        for act in args.act:
            model, test_acc = get_trained(arch=arch, act=act, size=args.size, cache_dir=args.cache_dir,
                                          progress=not args.no_progress)
            rec = cached_record(arch=arch, act=act, size=args.size, cache_dir=args.cache_dir) or {}
            info = {"source": "digit scenes", "arch": arch, "act": act, "size": args.size,
                    "reported_test_accuracy": test_acc, "train_settings": rec.get("settings")}
            yield f"{arch}/{act}", model, x, labels, info


def _user_source(args):
    import torch
    import torchvision.transforms as T
    from torchvision.datasets import ImageFolder

    from srd_fx.eval import data as D
    from srd_fx.eval.io import load_model, num_classes_of
    if not args.weights or not args.imagefolder:
        raise SystemExit("srd-fx apop: --model needs --weights FILE (a state dict) and --imagefolder DIR "
                         "(no pretrained weights or data sets are downloaded)")
    if not os.path.isdir(args.imagefolder):
        raise SystemExit(f"srd-fx apop: --imagefolder {args.imagefolder!r} is not a directory")
    ds = ImageFolder(args.imagefolder)
    model = load_model(args.model, weights=args.weights, num_classes=args.num_classes or num_classes_of(args.weights))
    cfg = getattr(model, "pretrained_cfg", None) or {}
    mean = tuple(args.mean or cfg.get("mean") or D.IMAGENET_MEAN)
    std = tuple(args.std or cfg.get("std") or D.IMAGENET_STD)
    s = args.image_size
    ds.transform = T.Compose([T.Resize(round(s * 256 / 224)), T.CenterCrop(s), T.ToTensor(),
                              T.Normalize(mean, std)])
    n = min(args.n, len(ds))
    items = [ds[i] for i in range(n)]
    x = torch.stack([a for a, _ in items])
    y = torch.tensor([b for _, b in items])
    with torch.no_grad():
        k = model(x[:1]).shape[-1]
    if len(ds.classes) > k:
        raise SystemExit(f"srd-fx apop: {args.imagefolder!r} has {len(ds.classes)} class folders but "
                         f"{args.model} has {k} outputs; labels are the sorted folder indices, so the "
                         "folder must hold (a prefix of) the model's classes in its order")
    info = {"source": os.path.abspath(args.imagefolder), "model": args.model, "weights": args.weights,
            "image_size": s, "mean": mean, "std": std, "classes": len(ds.classes)}
    yield args.model, model, x, y, info


# ------------------------------------------------------------------------------- outputs ------------
def _fmt(v):
    return f"{v:.4f}"


def write_table(results, out_dir, inputs):
    """Table 3 layout: per model and input, top-1 and top-5 of Ori. / APOP / APOP & relu."""
    head = ["Model", "Input", "Top-1 Ori.", "Top-1 APOP", "Top-1 APOP & relu",
            "Top-5 Ori.", "Top-5 APOP", "Top-5 APOP & relu"]
    rows = []
    for name, r in results.items():
        acc = r["accuracy"]
        for i in inputs:
            rows.append([name, i] + [_fmt(acc[k][t]) for t in ("top1", "top5")
                                      for k in ("original", f"apop/{i}", f"apop_relu/{i}")])
    with open(os.path.join(out_dir, "table.csv"), "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(head)
        w.writerows(rows)
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    lines.append("")
    notes = []
    chances = {(r["chance"]["top1"], r["chance"]["top5"], r["num_classes"]) for r in results.values()}
    if len(chances) == 1:
        c1, c5, k = chances.pop()
        notes.append(f"Chance: top-1 {_fmt(c1)}, top-5 {_fmt(c5)} ({k} classes).")
    else:
        notes.append("Chance: " + "; ".join(f"{n}: top-1 {_fmt(r['chance']['top1'])}, top-5 "
                                            f"{_fmt(r['chance']['top5'])}" for n, r in results.items()) + ".")
    sizes = {r["n"] for r in results.values()}
    notes.append(f"Images: {sizes.pop()} per model." if len(sizes) == 1 else
                 "Images: " + "; ".join(f"{n}: {r['n']}" for n, r in results.items()) + ".")
    reported = [f"{n}: {_fmt(r['reported_test_accuracy'])}" for n, r in results.items()
                if r.get("reported_test_accuracy") is not None]
    if reported:
        notes.append("Test accuracy recorded at training (srd_fx.eval.train): " + "; ".join(reported) + ".")
    lines.append(" ".join(notes))
    text = "\n".join(lines) + "\n"
    with open(os.path.join(out_dir, "table.md"), "w") as f:
        f.write(text)
    return text


def write_binarize(results, out_dir):
    """Fig. 6: accuracy with one activation layer binarised, per layer, with the chance line."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    with open(os.path.join(out_dir, "binarize.csv"), "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["Model", "Layer index", "Layer", "Module", "Top-1", "Top-5"])
        for name, r in results.items():
            for j, l in enumerate(r["binarized"]):
                acc = r["accuracy"][f"binarize/{l}"]
                w.writerow([name, j, l, r["module_of"].get(l) or "", _fmt(acc["top1"]), _fmt(acc["top5"])])
    n = len(results)
    width = max(6.0, 0.55 * max(len(r["binarized"]) for r in results.values()) + 2) + 2.2
    fig, axes = plt.subplots(n, 1, figsize=(width, 3.2 * n), squeeze=False)
    for ax, (name, r) in zip(axes[:, 0], results.items()):
        layers = r["binarized"]
        idx = list(range(len(layers)))
        for t, colour in (("top1", "tab:blue"), ("top5", "tab:orange")):
            label = "top-1" if t == "top1" else "top-5"
            ax.plot(idx, [r["accuracy"][f"binarize/{l}"][t] for l in layers], "o-", color=colour,
                    label=f"{label}, layer binarised")
            ax.axhline(r["accuracy"]["original"][t], color=colour, ls=":", lw=1, label=f"{label}, original")
            ax.axhline(r["chance"][t], color=colour, ls="--", lw=1, alpha=0.7, label=f"{label}, chance")
        ax.set_xticks(idx)
        ax.set_xticklabels([r["module_of"].get(l) or l for l in layers], rotation=35, ha="right", fontsize=7)
        ax.set_ylim(0, 1.02)
        ax.set_ylabel("accuracy")
        ax.set_title(f"{name}: particular layer binarisation ({r['n']} images)", fontsize=9)
        ax.grid(alpha=0.3)
    axes[0, 0].legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0)
    fig.tight_layout()
    path = os.path.join(out_dir, "binarize.png")
    fig.savefig(path, dpi=130)
    plt.close(fig)
    return path


# ------------------------------------------------------------------------------- entry point --------
def run(args) -> int:
    import torch

    from srd_fx.methods.apop import evaluate
    torch.set_num_threads(max(1, args.threads))
    if args.n <= 0 or args.batch_size <= 0:
        print("srd-fx apop: --n and --batch-size must be positive", file=sys.stderr)
        return 2
    os.makedirs(args.out, exist_ok=True)
    sources = _user_source(args) if args.model else _trained_sources(args)
    results = {}
    for name, model, x, y, info in sources:
        t0 = time.time()
        model = model.to(args.device).eval()
        r = evaluate(model, _batches(x, y, args.batch_size, args.device), inputs=tuple(args.inputs),
                     binarize_layers=bool(args.binarize), seed=args.seed, progress=not args.no_progress)
        r["seconds"] = round(time.time() - t0, 1)
        r.update(info)
        results[name] = r
        acc = r["accuracy"]
        print(f"{name}: original top-1 {_fmt(acc['original']['top1'])}, " + ", ".join(
            f"APOP {i} {_fmt(acc[f'apop/{i}']['top1'])} (& relu {_fmt(acc[f'apop_relu/{i}']['top1'])})"
            for i in args.inputs) + f"  [{r['n']} images, {r['seconds']} s]")
    meta = {"arguments": {k: v for k, v in vars(args).items() if not k.startswith("_")},
            "torch": torch.__version__, "threads": torch.get_num_threads()}
    with open(os.path.join(args.out, "apop.json"), "w") as f:
        json.dump({"meta": meta, "results": results}, f, indent=1, default=str)
    print(write_table(results, args.out, args.inputs))
    if args.binarize:
        print("plot:", write_binarize(results, args.out))
    print("results in", os.path.abspath(args.out))
    return 0
