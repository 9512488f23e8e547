"""Fidelity (Quantus ``FaithfulnessCorrelation``) of seven methods under different protocols: why our
Fidelity ordering differs from the paper's (issue 20).

Methods: input x gradient, integrated gradients, Grad-CAM, LRP-z+, SRD-low, SRD-high, SRD-input, on
the digit-scene ResNet and VGG (``srd_fx.eval.train.get_trained``, cached).  Settings swept:

* subset fraction: 0.15 %, 0.45 %, 1.8 %, 5.5 %, 20 % of the pixels (pixel subsets) or of the channel
  values (channel-value subsets);
* baseline: 0 (the mean colour after normalisation), the input's minimum (Quantus' "black"), the
  per-image mean (Quantus' "mean");
* unit: pixel subsets (all channels replaced, Quantus 0.5) or single channel values (Quantus 0.6);
* input size: 64 and 224 (the same test scenes rendered at 224 px), each scored on the model trained
  at that size (``get_trained(size=...)``, cached; ``--train-setting 224:epochs=5`` changes the
  recipe at one size).  ``--train-size 64`` runs the 64-px models at every size instead (they are
  fully convolutional with global pooling, so they run at 224 unchanged, but near chance);

plus the three named protocols of ``srd-fx evaluate --fidelity-protocol`` at each size.  Maps are
computed once per batch and scored under every setting; each setting shares its random subsets and
forward passes across the methods (``metrics.fidelity_metric``), seeded with ``seed + batch``.

Writes OUT/fidelity_protocol.csv (one row per model, size, setting, method), fidelity_protocol.md
(the table) and fidelity_protocol.png (Fidelity against subset fraction per method); after every
batch, fidelity_protocol.partial.csv holds the rows of the images scored so far (``--merge`` takes it).

    python experiments/fidelity_protocol.py [--models resnet vgg] [--n-images 200] [--nr-runs 100]
        [--sizes 64 224] [--center UNIT:BASELINE:FRACTION] [--train-setting [SIZE:]KEY=VALUE ...]
        [--train-size N] [--out results]
"""
import argparse
import csv
import dataclasses
import itertools
import os
import sys
import time

import numpy as np
import torch

from srd_fx.eval import baselines as B
from srd_fx.eval import data as D
from srd_fx.eval import evaluation as E
from srd_fx.eval import metrics as M
from srd_fx.errors import OptionError
from srd_fx.eval.train import accuracy, cached_record, get_trained, parse_train_settings
from srd_fx.eval.train import settings as train_recipe

METHODS = ["InputXGradient", "IntegratedGradients", "GradCAM", "LRP-z+", "SRD-low", "SRD-high", "SRD-input"]
SHORT = {"InputXGradient": "IxG", "IntegratedGradients": "IG", "GradCAM": "GradCAM", "LRP-z+": "LRP-z+",
         "SRD-low": "SRD-low", "SRD-high": "SRD-high", "SRD-input": "SRD-input"}
FRACTIONS = [0.0015, 0.0045, 0.018, 0.055, 0.20]
BASELINES = {"zero": 0.0, "min": "black", "mean": "mean"}
UNITS = {"pixel": True, "channel": False}
SRD = ("SRD-low", "SRD-high", "SRD-input")


def design_cells(fractions, baselines, units, center=None):
    """The (unit, baseline, fraction) sweep cells: the full factorial of the given levels, or with
    ``center`` = (unit, baseline, fraction) a one-factor-at-a-time design: the center, then every
    other level of each axis with the other two axes held at the center's levels (every level of
    every axis visited, 1 + (levels - 1) summed over the axes cells instead of their product)."""
    if center is None:
        return list(itertools.product(units, baselines, fractions))
    cu, cb, cf = center
    cells = [center]
    cells += [(cu, cb, f) for f in fractions if f != cf]
    cells += [(cu, b, cf) for b in baselines if b != cb]
    cells += [(u, cb, cf) for u in units if u != cu]
    return cells


def parse_center(text):
    """``UNIT:BASELINE:FRACTION`` (e.g. ``pixel:zero:0.0045``) as a (unit, baseline, fraction) cell;
    raises ``OptionError`` otherwise."""
    parts = text.split(":")
    try:
        unit, base, frac = parts
        frac = float(frac)
    except ValueError:
        raise OptionError(f"--center expects UNIT:BASELINE:FRACTION, e.g. pixel:zero:0.0045, got {text!r}") from None
    if unit not in UNITS or base not in BASELINES or not 0 < frac <= 1:
        raise OptionError(f"--center {text!r}: UNIT in {list(UNITS)}, BASELINE in {list(BASELINES)}, "
                          f"FRACTION in (0, 1]")
    return unit, base, frac


def settings_list(fractions, baselines, units, protocols, center=None):
    """(label dict, MetricSettings) for every sweep cell (:func:`design_cells`) and every named protocol."""
    out = []
    for unit, base, frac in design_cells(fractions, baselines, units, center):
        st = dataclasses.replace(M.MetricSettings(), fidelity_pixels=UNITS[unit], fidelity_baseline=BASELINES[base],
                                 fidelity_fraction=frac, fidelity_clamp=True, fidelity_normalise=False)
        out.append((dict(setting="sweep", unit=unit, baseline=base, fraction=frac, clamp=True), st))
    for name in protocols:
        st = M.fidelity_settings(name)
        base = {0.0: "zero", "black": "min", "mean": "mean"}[st.fidelity_baseline]
        out.append((dict(setting=name, unit="pixel" if st.fidelity_pixels else "channel", baseline=base,
                         fraction=None, clamp=st.fidelity_clamp), st))
    return out


def train_settings(items, size):
    """The training settings for models trained at ``size``: every ``--train-setting`` item
    ``KEY=VALUE`` (all sizes) or ``SIZE:KEY=VALUE`` (that size only), as keyword arguments of
    ``get_trained``.  Raises ``OptionError`` on a malformed item."""
    chosen = []
    for it in items or ():
        head, sep, rest = it.partition(":")
        if not sep:
            chosen.append(it)
        elif not head.isdigit():
            raise OptionError(f"--train-setting expects [SIZE:]KEY=VALUE with SIZE an integer, got {it!r}")
        elif int(head) == size:
            chosen.append(rest)
    return parse_train_settings(chosen)


def run_model(arch, size, args, cells, writer, rows):
    train_size = args.train_size or size
    kw = train_settings(args.train_setting, train_size)
    model, test_acc = get_trained(arch, "relu", size=train_size, cache_dir=args.cache_dir, progress=False, **kw)
    # channels-last weights: on CPU the convolutions run about 3x (VGG) / 2x (ResNet) faster at 224 px
    # with the same logits up to float rounding (inputs stay in the default layout)
    model = model.to(memory_format=torch.channels_last)
    record = cached_record(arch, "relu", size=train_size, cache_dir=args.cache_dir, **kw)
    images, labels, masks = D.DigitScenes("test", size=size, n=args.n_images, seed=args.seed).tensors(args.n_images)
    acc = accuracy(model, images, labels)  # on the scored images, at this size
    print(f"{arch} @ {size}: accuracy {acc:.3f} on the {len(images)} scored images (trained at {train_size} px, "
          f"{record['settings']['epochs']} epochs: {test_acc:.3f} on its 1000 test images)", file=sys.stderr, flush=True)
    scores = {}  # cell index -> method -> list of per-image scores
    for bi in range(E.n_batches(len(images), args.batch_size)):
        sl = slice(bi * args.batch_size, (bi + 1) * args.batch_size)
        x, y = D.normalize(images[sl]), labels[sl].long()
        t0 = time.perf_counter()
        raw = {m: B.get_method(m)(model, x, y) for m in METHODS}
        maps = {c: {m: M.prepare(r, x.shape[-2:], clamp=c) for m, r in raw.items()} for c in (True, False)}
        t_maps = time.perf_counter() - t0
        for ci, (lab, st) in enumerate(cells):
            st = dataclasses.replace(st, fidelity_runs=args.nr_runs, seed=args.seed + bi)
            metric = M.fidelity_metric(st, shape=x.shape)
            for m in METHODS:
                s = E._metric_scores("Fidelity", model, metric, x, y, maps[st.fidelity_clamp][m], None, None, st)
                scores.setdefault(ci, {}).setdefault(m, []).extend(np.asarray(s, dtype=np.float64).tolist())
        print(f"  batch {bi}: maps {t_maps:.0f}s, all settings {time.perf_counter() - t0 - t_maps:.0f}s",
              file=sys.stderr, flush=True)
        # the images scored so far, so that a run cut short still leaves its results
        write_csv(os.path.join(args.out, "fidelity_protocol.partial.csv"),
                  rows + summarise(arch, size, train_size, record, acc, images.shape, cells, scores, args))
    for row in summarise(arch, size, train_size, record, acc, images.shape, cells, scores, args):
        writer.writerow(row)
        rows.append(row)


def summarise(arch, size, train_size, record, acc, shape, cells, scores, args):
    """One CSV row per cell and method: the mean and standard error of the per-image scores."""
    out = []
    c, h, w = shape[1:]
    for ci, (lab, st) in enumerate(cells):
        st = dataclasses.replace(st, fidelity_runs=args.nr_runs)
        k = st.subset_size((1, c, h, w))
        n_units = h * w if st.fidelity_pixels else c * h * w
        for m in METHODS:
            v = np.asarray(scores[ci][m])
            ok = v[np.isfinite(v)]
            row = dict(model="ResNet" if arch == "resnet" else "VGG", size=size, train_size=train_size,
                       train_epochs=record["settings"]["epochs"], accuracy=round(acc, 4),
                       **lab, subset_size=k, subset_percent=round(100 * k / n_units, 3),
                       method=m, fidelity=round(float(ok.mean()), 5) if len(ok) else float("nan"),
                       sem=round(float(ok.std(ddof=1) / np.sqrt(len(ok))), 5) if len(ok) > 1 else float("nan"),
                       n_images=len(v), n_nan=int((~np.isfinite(v)).sum()), nr_runs=args.nr_runs)
            out.append(row)
    return out


def markdown(rows, commands):
    lines = ["Fidelity (mean over images; Quantus FaithfulnessCorrelation) per method and protocol.", ""]
    lines += [f"Command: `{c}`" for c in commands] + ["",
             "`SRD>IxG`: the best SRD variant's Fidelity minus input x gradient's (positive: the paper's ordering).",
             ""]
    models = {}
    for r in rows:
        models.setdefault((r["model"], r["size"], r["train_size"], r["n_images"]), (r["train_epochs"], r["accuracy"]))
    lines += ["| model | input size | trained at (px) | epochs | scored images | accuracy on them |",
              "|---|---:|---:|---:|---:|---:|"]
    lines += [f"| {m} | {s} | {t} | {e} | {n} | {a:.3f} |" for (m, s, t, n), (e, a) in models.items()]
    lines.append("")
    head = "| model | size | trained | images | runs | setting | unit | baseline | subset | " + \
           " | ".join(SHORT[m] for m in METHODS) + " | best | SRD>IxG |"
    sep = "|---|---:|---:|---:|---:|---|---|---|---:|" + "---:|" * len(METHODS) + "---|---:|"
    groups = {}
    for r in rows:
        key = (r["model"], r["size"], r["train_size"], r["n_images"], r["nr_runs"], r["setting"], r["unit"],
               r["baseline"], r["fraction"], r["subset_size"], r["subset_percent"])
        groups.setdefault(key, {})[r["method"]] = r["fidelity"]
    lines += [head, sep]
    for (model, size, train_size, n, runs, setting, unit, base, frac, k, pct), vals in groups.items():
        best = max(vals, key=lambda m: -np.inf if np.isnan(vals[m]) else vals[m])
        srd = max(vals[m] for m in SRD)
        lines.append(f"| {model} | {size} | {train_size} | {n} | {runs} | {setting} | {unit} | {base} | {k} ({pct:g} %) | "
                     + " | ".join(f"{vals[m]:.3f}" for m in METHODS)
                     + f" | {SHORT[best]} | {srd - vals['InputXGradient']:+.3f} |")
    lines += side_by_side(rows)
    return "\n".join(lines) + "\n"


def side_by_side(rows):
    """Markdown lines comparing, per model, each sweep cell scored at two input sizes: IxG, IG, the
    best SRD map and the first method at each size (of each size's largest run: most images, then most
    runs)."""
    sizes = sorted({r["size"] for r in rows})
    if len(sizes) < 2:
        return []
    small, large = sizes[0], sizes[-1]
    cells = {}  # (model, size, unit, baseline, fraction) -> (n_images, nr_runs, {method: fidelity})
    for r in rows:
        if r["setting"] != "sweep" or r["train_size"] != r["size"]:
            continue
        key = (r["model"], r["size"], r["unit"], r["baseline"], r["fraction"])
        n = (r["n_images"], r["nr_runs"])
        if key not in cells or n > cells[key][:2]:
            cells[key] = (*n, {})
        if n == cells[key][:2]:
            cells[key][2][r["method"]] = r["fidelity"]

    def summary(vals):
        srd = max(SRD, key=lambda m: vals[m])
        first = max(vals, key=lambda m: -np.inf if np.isnan(vals[m]) else vals[m])
        return f"{vals['InputXGradient']:.3f} | {vals['IntegratedGradients']:.3f} | {vals[srd]:.3f} ({srd[4:]}) | {SHORT[first]}"

    out = ["", f"Side by side: the sweep cells scored at both {small} and {large} px (each on the model trained at "
                f"that size); `images/runs` of each size's run.", "",
           f"| model | unit | baseline | subset | {small} px images/runs | IxG | IG | best SRD | first "
           f"| {large} px images/runs | IxG | IG | best SRD | first |",
           "|---|---|---|---:|---|---:|---:|---:|---|---|---:|---:|---:|---|"]
    for (model, size, unit, base, frac), (n, runs, vals) in cells.items():
        other = cells.get((model, small, unit, base, frac))
        if size != large or other is None or len(vals) < len(METHODS) or len(other[2]) < len(METHODS):
            continue
        out.append(f"| {model} | {unit} | {base} | {100 * frac:g} % | {other[0]}/{other[1]} | {summary(other[2])} "
                   f"| {n}/{runs} | {summary(vals)} |")
    return out


def plot(rows, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    panels = sorted({(r["model"], r["size"], r["train_size"], r["n_images"]) for r in rows if r["setting"] == "sweep"})
    combos = [(u, b) for u in UNITS for b in BASELINES if any(r["unit"] == u and r["baseline"] == b
                                                             and r["setting"] == "sweep" for r in rows)]
    if not panels or not combos:
        return
    fig, axes = plt.subplots(len(panels), len(combos), figsize=(3.2 * len(combos), 2.8 * len(panels)),
                             squeeze=False, sharex=True)
    for i, (model, size, train_size, n_images) in enumerate(panels):
        for j, (unit, base) in enumerate(combos):
            ax = axes[i][j]
            here = [r for r in rows if r["setting"] == "sweep" and (r["model"], r["size"], r["train_size"],
                                                                    r["n_images"]) == (model, size, train_size, n_images)]
            if not any((r["unit"], r["baseline"]) == (unit, base) for r in here):
                ax.axis("off")   # not run at this size
                continue
            for m in METHODS:
                pts = sorted((r["fraction"], r["fidelity"]) for r in here
                             if r["unit"] == unit and r["baseline"] == base and r["method"] == m)
                if pts:
                    ax.plot([100 * p[0] for p in pts], [p[1] for p in pts], marker="o", ms=3, label=SHORT[m],
                            ls="-" if m.startswith("SRD") else "--")
            ax.set_xscale("log")
            ax.axhline(0, color="grey", lw=0.5)
            trained = "" if train_size == size else f" (model of {train_size}px)"
            ax.set_title(f"{model} {size}px{trained}, {n_images} img: {unit}, baseline {base}", fontsize=7)
            if i == len(panels) - 1:
                ax.set_xlabel("subset (% of units)", fontsize=8)
            if j == 0:
                ax.set_ylabel("Fidelity", fontsize=8)
            ax.tick_params(labelsize=7)
    axes[0][0].legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def read_rows(path):
    """Rows of a fidelity_protocol.csv, typed, and the command that wrote it (from the .md beside it)."""
    rows = []
    with open(path) as f:
        for r in csv.DictReader(f):
            # CSVs written before train_size existed were all scored on the 64-px models (8/12 epochs)
            r.setdefault("train_size", "64")
            r.setdefault("train_epochs", str(train_recipe("resnet" if r["model"] == "ResNet" else "vgg", "relu",
                                                          64)["epochs"]))
            for k in ("size", "train_size", "train_epochs", "subset_size", "n_images", "n_nan", "nr_runs"):
                r[k] = int(r[k])
            for k in ("accuracy", "subset_percent", "fidelity", "sem"):
                r[k] = float(r[k])
            r["fraction"] = float(r["fraction"]) if r["fraction"] else None
            rows.append(r)
    with open(os.path.join(os.path.dirname(path), "fidelity_protocol.md")) as f:
        commands = [l[len("Command: `"):-1] for l in f.read().splitlines() if l.startswith("Command: `")]
    return rows, commands


FIELDS = ["model", "size", "train_size", "train_epochs", "accuracy", "setting", "unit", "baseline", "fraction", "clamp", "subset_size",
          "subset_percent", "method", "fidelity", "sem", "n_images", "n_nan", "nr_runs"]


def write_csv(path, rows):
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=FIELDS)
        w.writeheader()
        w.writerows(rows)


def merge(paths, out, command=None):
    """Join the CSVs of several runs (e.g. one per model) into OUT's csv, table and plot."""
    rows, commands = [], []
    for p in paths:
        r, c = read_rows(p)
        rows += r
        commands += c
    commands += [command] if command else []
    os.makedirs(out, exist_ok=True)
    write_csv(os.path.join(out, "fidelity_protocol.csv"), rows)
    md = markdown(rows, commands)
    with open(os.path.join(out, "fidelity_protocol.md"), "w") as f:
        f.write(md)
    plot(rows, os.path.join(out, "fidelity_protocol.png"))
    print(md)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", nargs="+", default=["resnet", "vgg"], choices=["resnet", "vgg"])
    p.add_argument("--n-images", type=int, default=200)
    p.add_argument("--nr-runs", type=int, default=100)
    p.add_argument("--sizes", type=int, nargs="+", default=[64, 224])
    p.add_argument("--fractions", type=float, nargs="*", default=FRACTIONS,
                   help="Subset fractions of the sweep (none: score only the named --protocols).")
    p.add_argument("--baselines", nargs="+", default=list(BASELINES), choices=list(BASELINES))
    p.add_argument("--units", nargs="+", default=list(UNITS), choices=list(UNITS))
    p.add_argument("--center", default=None, metavar="UNIT:BASELINE:FRACTION",
                   help="One-factor-at-a-time design around this cell (e.g. pixel:zero:0.0045) instead of the "
                        "full factorial of --fractions x --baselines x --units.")
    p.add_argument("--protocols", nargs="*", default=list(M.FIDELITY_PROTOCOLS), choices=list(M.FIDELITY_PROTOCOLS))
    p.add_argument("--batch-size", type=int, default=20)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--cache-dir", default=None)
    p.add_argument("--train-setting", action="append", default=[], metavar="[SIZE:]KEY=VALUE",
                   help="Training setting of the models (get_trained's keywords), for every size or, with "
                        "SIZE:, only for the models trained at SIZE px; repeatable.")
    p.add_argument("--train-size", type=int, default=None,
                   help="Score every size on the models trained at this size (default: each size on its own).")
    p.add_argument("--out", default="results")
    p.add_argument("--merge", nargs="+", default=None, metavar="CSV",
                   help="Only join the fidelity_protocol.csv files of earlier runs into OUT (no scoring).")
    args = p.parse_args(argv)
    if args.merge:
        merge(args.merge, args.out, "python experiments/fidelity_protocol.py " + " ".join(
            argv if argv is not None else sys.argv[1:]))
        return
    for size in set(args.sizes) | {args.train_size or 64}:
        try:
            train_settings(args.train_setting, size)  # fail on a malformed setting before any work
        except OptionError as e:
            p.error(str(e))
    try:
        center = parse_center(args.center) if args.center else None
    except OptionError as e:
        p.error(str(e))
    torch.set_num_threads(args.threads)
    command = "python experiments/fidelity_protocol.py " + " ".join(argv if argv is not None else sys.argv[1:])
    cells = settings_list(args.fractions, args.baselines, args.units, args.protocols, center)
    os.makedirs(args.out, exist_ok=True)
    csv_path = os.path.join(args.out, "fidelity_protocol.csv")
    rows = []
    t0 = time.perf_counter()
    with open(csv_path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=FIELDS)
        writer.writeheader()
        for arch in args.models:
            for size in args.sizes:
                run_model(arch, size, args, cells, writer, rows)
                f.flush()
    md = markdown(rows, [command]) + f"\n{time.perf_counter() - t0:.0f} s on {args.threads} torch thread(s).\n"
    with open(os.path.join(args.out, "fidelity_protocol.md"), "w") as f:
        f.write(md)
    plot(rows, os.path.join(args.out, "fidelity_protocol.png"))
    print(md)


if __name__ == "__main__":
    main()
