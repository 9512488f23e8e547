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

``--images A:B`` scores only images A..B-1 of the seeded set of ``--n-images`` (A a multiple of
``--batch-size``), with the batch numbers, hence the random subsets, that a run over all of them
gives those images; ``--merge`` joins the rows of one cell scored on adjacent image ranges (A:B and
B:C) into one row over A:C, so a long run can be completed or split across processes.

    python experiments/fidelity_protocol.py [--models resnet vgg] [--n-images 200] [--nr-runs 100]
        [--sizes 64 224] [--center UNIT:BASELINE:FRACTION] [--train-setting [SIZE:]KEY=VALUE ...]
        [--train-size N] [--images A:B] [--out results]
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


def parse_images(text, n_images, batch_size):
    """``A:B`` (either side may be empty) as the image range (first, stop) scored out of ``n_images``;
    ``None`` is all of them.  Raises ``OptionError`` unless 0 <= A < B <= n_images and A is a
    multiple of ``batch_size`` (so the batches, and their seeds, are those of a run over all images)."""
    if text is None:
        return 0, n_images
    head, sep, tail = text.partition(":")
    try:
        first, stop = int(head or 0), int(tail or n_images)
    except ValueError:
        first = stop = None
    if not sep or first is None or not 0 <= first < stop <= n_images or first % batch_size:
        raise OptionError(f"--images expects A:B with 0 <= A < B <= --n-images ({n_images}) and A a multiple of "
                          f"--batch-size ({batch_size}), got {text!r}")
    return first, stop


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
    first, stop = parse_images(args.images, len(images), args.batch_size)
    acc = accuracy(model, images[first:stop], labels[first:stop])  # on the scored images, at this size
    print(f"{arch} @ {size}: accuracy {acc:.3f} on the {stop - first} scored images {first}:{stop} (trained at "
          f"{train_size} px, {record['settings']['epochs']} epochs: {test_acc:.3f} on its 1000 test images)",
          file=sys.stderr, flush=True)
    scores = {}  # cell index -> method -> list of per-image scores
    correct = 0  # of the images scored so far
    # batch numbers (and seeds) as in a run over all images; the last batch may stop early at `stop`
    for bi in range(first // args.batch_size, E.n_batches(stop, args.batch_size)):
        sl = slice(bi * args.batch_size, min((bi + 1) * args.batch_size, stop))
        x, y = D.normalize(images[sl]), labels[sl].long()
        t0 = time.perf_counter()
        with torch.no_grad():
            correct += int((model(x).argmax(1) == y).sum())
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
        acc = correct / (sl.stop - first)
        write_csv(os.path.join(args.out, "fidelity_protocol.partial.csv"),
                  rows + summarise(arch, size, train_size, record, acc, images.shape, cells, scores, args, first))
    for row in summarise(arch, size, train_size, record, acc, images.shape, cells, scores, args, first):
        writer.writerow(row)
        rows.append(row)


def summarise(arch, size, train_size, record, acc, shape, cells, scores, args, first=0):
    """One CSV row per cell and method: the mean and standard error of the per-image scores (of the
    images ``first``, ``first + 1``, ... scored so far; ``acc`` is the accuracy on them)."""
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
                       n_images=len(v), first_image=first, n_nan=int((~np.isfinite(v)).sum()),
                       nr_runs=args.nr_runs)
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
            r["first_image"] = r.get("first_image") or "0"   # written before image ranges: from image 0
            for k in ("size", "train_size", "train_epochs", "subset_size", "n_images", "first_image", "n_nan",
                      "nr_runs"):
                r[k] = int(r[k])
            for k in ("accuracy", "subset_percent", "fidelity", "sem"):
                r[k] = float(r[k])
            r["fraction"] = float(r["fraction"]) if r["fraction"] else None
            rows.append(r)
    with open(os.path.join(os.path.dirname(path), "fidelity_protocol.md")) as f:
        commands = [l[len("Command: `"):-1] for l in f.read().splitlines() if l.startswith("Command: `")]
    return rows, commands


FIELDS = ["model", "size", "train_size", "train_epochs", "accuracy", "setting", "unit", "baseline", "fraction", "clamp", "subset_size",
          "subset_percent", "method", "fidelity", "sem", "n_images", "first_image", "n_nan", "nr_runs"]
#: the columns that vary between image ranges of one cell; the others identify the cell
PER_RANGE = ("accuracy", "fidelity", "sem", "n_images", "first_image", "n_nan")


def pool(parts):
    """Mean and standard error of the union of groups of scores given as (count, mean, standard error)."""
    parts = [(k, m, 0.0 if k == 1 else s) for k, m, s in parts if k > 0]
    n = sum(k for k, _, _ in parts)
    if n == 0:
        return float("nan"), float("nan")
    mean = sum(k * m for k, m, _ in parts) / n
    # squared deviations from the joint mean: each group's own (from its standard error) plus its offset
    ss = sum((k - 1) * k * s ** 2 + k * (m - mean) ** 2 for k, m, s in parts)
    return mean, float(np.sqrt(ss / (n - 1) / n)) if n > 1 else float("nan")


def join_ranges(rows):
    """Rows of one cell scored on adjacent image ranges (``first_image`` A with ``n_images`` n, and
    ``first_image`` A + n) joined into one row over both: the mean and standard error of the union of
    their per-image scores (from each part's count, mean and standard error: exact up to the CSV's
    rounding), the accuracy weighted by image count.  Other rows are kept as they are, in order.
    The CSV does not record ``--batch-size`` or ``--seed``: join only ranges scored with the same ones
    (then the joined row is what one run over A:C gives)."""
    rows = [dict(r) for r in rows]
    cell = lambda r: tuple((k, r[k]) for k in FIELDS if k not in PER_RANGE)
    joined = True
    while joined:
        joined = False
        ends = {(cell(r), r["first_image"] + r["n_images"]): i for i, r in enumerate(rows)}
        for j, r in enumerate(rows):
            i = ends.get((cell(r), r["first_image"]))
            if i is None or i == j or r["first_image"] == 0:
                continue
            a, b = rows[i], r
            mean, sem = pool([(p["n_images"] - p["n_nan"], p["fidelity"], p["sem"]) for p in (a, b)])
            a.update(fidelity=round(mean, 5), sem=round(sem, 5),
                     accuracy=round((a["n_images"] * a["accuracy"] + b["n_images"] * b["accuracy"])
                                    / (a["n_images"] + b["n_images"]), 4),
                     n_images=a["n_images"] + b["n_images"], n_nan=a["n_nan"] + b["n_nan"])
            del rows[j]
            joined = True
            break
    return rows


def write_csv(path, rows):
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=FIELDS)
        w.writeheader()
        w.writerows(rows)


def merge(paths, out, command=None):
    """Join the CSVs of several runs (e.g. one per model, or one cell's adjacent image ranges:
    :func:`join_ranges`) into OUT's csv, table and plot."""
    rows, commands = [], []
    for p in paths:
        r, c = read_rows(p)
        rows += r
        commands += c
    rows = join_ranges(rows)
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
    p.add_argument("--images", default=None, metavar="A:B",
                   help="Score only images A..B-1 of the --n-images (A a multiple of --batch-size; the random "
                        "subsets are those of a run over all of them); --merge joins adjacent ranges (scored "
                        "with the same --batch-size and --seed).")
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
        parse_images(args.images, args.n_images, args.batch_size)
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
