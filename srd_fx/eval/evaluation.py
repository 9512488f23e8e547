"""The evaluation harness: methods x metrics on a model (the paper's Table 2), Fidelity across
activation functions (Table 4), and a figure of maps (Fig. 3).

    from srd_fx.eval import evaluation as E
    model, acc = srd_fx.eval.train.get_trained("resnet", "relu")
    images, labels, masks = srd_fx.eval.data.DigitScenes("test").tensors(200)
    res = E.evaluate(model, images, labels, masks)                  # method -> metric -> scores
    print(E.table2_markdown({"ResNet (ReLU)": res}))

``evaluate`` works on [0, 1] images and normalises them with ``mean``/``std`` (the digit-scene
constants by default); metrics use the images' labels as targets.
"""
from __future__ import annotations

import dataclasses
import math
import time
from typing import Dict, List, Mapping, Optional, Sequence

import numpy as np
import torch
import torch.nn as nn

from . import baselines as B
from . import data as D
from . import metrics as M

METRIC_LABELS = {"Pointing": "Poi.", "Attribution": "Att.", "Sparseness": "Spa.", "Fidelity": "Fid.",
                 "Stability": "Sta."}
RES_MARK = {"low": "†", "high": "‡", "input": ""}

Scores = Dict[str, Dict[str, np.ndarray]]  # method -> metric -> per-image scores


def _metric_scores(name, model, fid_metric, x, y, a, s, method, settings: M.MetricSettings, a_fid=None):
    try:
        if name == "Pointing":
            return M.pointing_game(model, x, y, a, s, tolerance=settings.tolerance(x.shape[-1]))
        if name == "Attribution":
            return M.attribution_localisation(model, x, y, a, s)
        if name == "Sparseness":
            return M.sparseness(model, x, y, a)
        if name == "Fidelity":
            return M.fidelity(model, x, y, a if a_fid is None else a_fid, settings, metric=fid_metric)
        if name == "Stability":
            def explain(mdl, xx, tt):
                return M.prepare(method(model, xx, tt), xx.shape[-2:])
            return M.stability(model, x, y, a, explain, settings)
    except AssertionError as e:
        # Quantus refuses a batch whose maps are all one value (e.g. all zero): no ordering to score
        if any(w in str(e) for w in ("uniform", "equal to", "less than zero")):
            return np.full(len(x), np.nan)
        raise
    raise KeyError(f"unknown metric {name!r}; choose from {M.METRIC_NAMES}")


def _check_inputs(model, images, labels, masks, metrics):
    for m in metrics:
        if m not in M.HIGHER_IS_BETTER:
            raise KeyError(f"unknown metric {m!r}; choose from {M.METRIC_NAMES}")
    if images.dim() != 4 or images.shape[1] != 3:
        raise ValueError(f"images must be (N, 3, H, W), got {tuple(images.shape)}")
    if len(labels) != len(images) or len(masks) != len(images):
        raise ValueError(f"{len(images)} images, {len(labels)} labels and {len(masks)} masks: they must match")
    if float(images.min()) < -1e-6 or float(images.max()) > 1 + 1e-6:
        raise ValueError("images must be in [0, 1] (they are normalised here with mean/std)")
    if any(m.training for m in model.modules()):
        raise ValueError("the model is in training mode; call model.eval() first")


def n_batches(n_images: int, batch_size: int) -> int:
    return math.ceil(n_images / batch_size)


def evaluate_batches(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, masks: torch.Tensor,
                     batches: Optional[Sequence[int]] = None, methods: Optional[Sequence[str]] = None,
                     metrics: Sequence[str] = M.METRIC_NAMES, settings: M.MetricSettings = M.MetricSettings(),
                     mean=D.DIGITS_MEAN, std=D.DIGITS_STD, batch_size: int = 50, progress: bool = True,
                     desc: str = "evaluate"):
    """:func:`evaluate` batch by batch: yields ``(batch index, {method: {metric: scores}}, {method:
    seconds})`` for the batches ``batches`` (default: all) of ``batch_size`` images.

    Batch ``b`` holds images ``b * batch_size`` to ``(b + 1) * batch_size`` and seeds the metrics'
    random draws with ``settings.seed + b``, so its scores do not depend on which other batches are
    computed, nor where: a data-parallel run that splits the batches between processes gets the
    scores of one process that computes them all."""
    methods = list(methods) if methods is not None else list(B.default_methods(model))
    methods = [B.get_method(m) for m in methods]
    _check_inputs(model, images, labels, masks, metrics)
    batches = list(range(n_batches(len(images), batch_size))) if batches is None else list(batches)
    from tqdm.auto import tqdm
    bar = tqdm(total=len(batches) * len(methods), desc=desc, disable=not progress)
    try:
        for bi in batches:
            sl = slice(bi * batch_size, (bi + 1) * batch_size)
            x = D.normalize(images[sl], mean, std)
            y = labels[sl].long()
            s = masks[sl].bool()
            bsettings = dataclasses.replace(settings, seed=settings.seed + bi)
            fid_metric = M.fidelity_metric(bsettings, shape=x.shape)  # shares subsets and forward passes across methods
            scores, times = {}, {}
            for method in methods:
                bar.set_postfix(method=method.name)
                t0 = time.perf_counter()
                raw = method(model, x, y)
                a = M.prepare(raw, x.shape[-2:])
                # Fidelity's protocol may ask for unclamped maps (Quantus 0.5's normalise_by_max alone)
                a_fid = None if settings.fidelity_clamp else M.prepare(raw, x.shape[-2:], clamp=False)
                scores[method.name] = {k: _metric_scores(k, model, fid_metric, x, y, a, s, method, bsettings, a_fid)
                                       for k in metrics}
                times[method.name] = time.perf_counter() - t0
                bar.update(1)
            yield bi, scores, times
    finally:
        bar.close()


def join_batches(per_batch: Mapping[int, Scores]) -> Scores:
    """The scores of batches ``0..n-1`` (``{batch index: scores}``, any order) joined in image order."""
    order = sorted(per_batch)
    if order != list(range(len(order))):
        raise ValueError(f"batches {sorted(set(range(max(order) + 1)) - set(order))} are missing")
    first = per_batch[order[0]]
    return {m: {k: np.concatenate([np.asarray(per_batch[b][m][k], dtype=np.float64) for b in order])
                for k in d} for m, d in first.items()}


def evaluate(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, masks: torch.Tensor,
             methods: Optional[Sequence[str]] = None, metrics: Sequence[str] = M.METRIC_NAMES,
             settings: M.MetricSettings = M.MetricSettings(), mean=D.DIGITS_MEAN, std=D.DIGITS_STD,
             batch_size: int = 50, progress: bool = True, timings: Optional[dict] = None) -> Scores:
    """Score ``methods`` (default: all of :data:`srd_fx.eval.baselines.METHODS`) with ``metrics`` on the
    given [0, 1] ``images`` (N, 3, H, W), ``labels`` (N,) and ``masks`` (N, H, W).

    Returns ``{method: {metric: per-image scores (N,)}}`` (NaN where Quantus could not score a
    batch).  ``timings``, if a dict, receives the seconds spent per method (maps and metrics)."""
    per_batch, times = {}, {}
    for bi, scores, tim in evaluate_batches(model, images, labels, masks, methods=methods, metrics=metrics,
                                            settings=settings, mean=mean, std=std, batch_size=batch_size,
                                            progress=progress):
        per_batch[bi] = scores
        for k, v in tim.items():
            times[k] = times.get(k, 0.0) + v
    if timings is not None:
        timings.update(times)
    return join_batches(per_batch)


# ----------------------------------------------------------------------------- summaries ----------
def summarise(scores: Scores) -> Dict[str, Dict[str, dict]]:
    """``{method: {metric: {"mean", "sem", "n", "n_nan"}}}`` (NaN-aware)."""
    res = {}
    for meth, d in scores.items():
        res[meth] = {}
        for k, v in d.items():
            v = np.asarray(v, dtype=np.float64)
            ok = v[np.isfinite(v)]
            res[meth][k] = dict(mean=float(ok.mean()) if len(ok) else float("nan"),
                                sem=float(ok.std(ddof=1) / math.sqrt(len(ok))) if len(ok) > 1 else float("nan"),
                                n=int(len(ok)), n_nan=int(len(v) - len(ok)))
    return res


def _ranks(values: Sequence[float], higher: bool) -> List[int]:
    """Rank (0 = best) of each value by its 3-decimal rounding, as the table shows; NaN last."""
    keyed = [(round(v, 3) if higher else -round(v, 3)) if np.isfinite(v) else -np.inf for v in values]
    order = sorted(set(keyed), reverse=True)
    return [order.index(k) if np.isfinite(k) else len(values) for k in keyed]


def _fmt(v: float) -> str:
    if not np.isfinite(v):
        return "-"
    s = f"{v:.3f}"
    return s.replace("0.", ".", 1) if s.startswith("0.") else s.replace("-0.", "-.", 1)


def _mark(text: str, rank: int) -> str:
    return f"**{text}**" if rank == 0 else (f"<ins>{text}</ins>" if rank == 1 else text)


def method_label(name: str) -> str:
    try:
        return name + RES_MARK[B.get_method(name).resolution]
    except KeyError:
        return name


def table2_rows(results: Mapping[str, Scores], metrics: Sequence[str] = M.METRIC_NAMES, summarised: bool = False):
    """(header, rows of (method, [mean per model x metric]), column directions); ``summarised``:
    ``results`` are already :func:`summarise` outputs (e.g. from :func:`read_results_csv`)."""
    summaries = dict(results) if summarised else {label: summarise(sc) for label, sc in results.items()}
    methods = list(dict.fromkeys(m for sc in results.values() for m in sc))
    header, cols, higher = [], [], []
    for label, summ in summaries.items():
        for k in metrics:
            header.append((label, k))
            cols.append([summ.get(m, {}).get(k, {}).get("mean", float("nan")) for m in methods])
            higher.append(M.HIGHER_IS_BETTER[k])
    return methods, header, cols, higher


TOKEN_NOTE = ("Token models (ViT, Mixer): † the encoder output's patch tokens, ‡ the first block's MLP "
              "activation (same patch grid), both upsampled from the grid; prefix tokens dropped.")


def table2_markdown(results: Mapping[str, Scores], metrics: Sequence[str] = M.METRIC_NAMES,
                    n_images: Optional[int] = None, note: str = "", summarised: bool = False) -> str:
    """A Table-2-style markdown table: methods x (model, metric) means; best bold, second underlined;
    ``note``: a sentence appended to the caption; ``summarised``: as :func:`table2_rows`."""
    methods, header, cols, higher = table2_rows(results, metrics, summarised)
    ranks = [_ranks(c, h) for c, h in zip(cols, higher)]
    models = list(results)
    lines = ["| Method | " + " | ".join(f"{lab} {METRIC_LABELS[k]}{'↑' if M.HIGHER_IS_BETTER[k] else '↓'}"
                                      for lab, k in header) + " |",
             "|---|" + "---:|" * len(header)]
    for i, m in enumerate(methods):
        cells = [_mark(_fmt(c[i]), r[i]) for c, r in zip(cols, ranks)]
        lines.append(f"| {method_label(m)} | " + " | ".join(cells) + " |")
    n = f" on {n_images} test images" if n_images else ""
    lines.append("")
    lines.append(f"Mean per image{n} for {', '.join(models)}. † encoder-output resolution, ‡ 4x that "
                 f"resolution, others input resolution. Best in bold, second underlined." + (f" {note}" if note else ""))
    return "\n".join(lines) + "\n"


def table4_markdown(results: Mapping[str, Scores], accuracies: Optional[Mapping[str, float]] = None,
                    metric: str = "Fidelity", n_images: Optional[int] = None) -> str:
    """A Table-4-style markdown table: methods x models (activations), one metric (Fidelity)."""
    methods, header, cols, higher = table2_rows(results, [metric])
    ranks = [_ranks(c, h) for c, h in zip(cols, higher)]
    lines = ["| Method | " + " | ".join(lab for lab, _ in header) + " |", "|---|" + "---:|" * len(header)]
    for i, m in enumerate(methods):
        lines.append(f"| {method_label(m)} | " + " | ".join(_mark(_fmt(c[i]), r[i]) for c, r in zip(cols, ranks))
                     + " |")
    if accuracies:
        lines.append("| *test accuracy* | " + " | ".join(f"{accuracies.get(lab, float('nan')):.3f}"
                                                         for lab, _ in header) + " |")
    n = f" on {n_images} test images" if n_images else ""
    lines.append("")
    lines.append(f"{metric} (mean per image{n}) per activation function. Best in bold, second underlined.")
    return "\n".join(lines) + "\n"


def results_csv(results: Mapping[str, Scores], accuracies: Optional[Mapping[str, float]] = None,
                summarised: bool = False) -> str:
    """Long-format CSV: model, test_accuracy, method, resolution, metric, mean, sem, n, n_nan;
    ``summarised``: as :func:`table2_rows`."""
    import csv
    import io
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["model", "test_accuracy", "method", "resolution", "metric", "mean", "sem", "n", "n_nan"])
    for label, sc in results.items():
        acc = accuracies.get(label, "") if accuracies else ""
        for meth, d in (sc if summarised else summarise(sc)).items():
            res = B.METHODS[meth].resolution if meth in B.METHODS else ""
            for k, v in d.items():
                w.writerow([label, acc if acc == "" else f"{acc:.4f}", meth, res, k, f"{v['mean']:.6f}",
                            f"{v['sem']:.6f}", v["n"], v["n_nan"]])
    return buf.getvalue()


def read_results_csv(text: str):
    """Inverse of :func:`results_csv`: ``({model: {method: {metric: {"mean", "sem", "n", "n_nan"}}}},
    {model: test accuracy})`` (summaries for ``table2_markdown(..., summarised=True)``)."""
    import csv
    import io
    summaries, accuracies = {}, {}
    for row in csv.DictReader(io.StringIO(text)):
        d = summaries.setdefault(row["model"], {}).setdefault(row["method"], {})
        d[row["metric"]] = dict(mean=float(row["mean"]), sem=float(row["sem"]), n=int(row["n"]), n_nan=int(row["n_nan"]))
        if row["test_accuracy"]:
            accuracies[row["model"]] = float(row["test_accuracy"])
    return summaries, accuracies


def ranks_of(results: Mapping[str, Scores], method_prefix: str = "SRD", metrics: Sequence[str] = M.METRIC_NAMES):
    """For each (model, metric): the best rank (1 = best) among methods starting with
    ``method_prefix``, the best such method and the overall best method."""
    methods, header, cols, higher = table2_rows(results, metrics)
    out = {}
    for (label, k), c, h in zip(header, cols, higher):
        r = _ranks(c, h)
        mine = [(r[i], methods[i]) for i in range(len(methods)) if methods[i].startswith(method_prefix)]
        best_rank, best_mine = min(mine) if mine else (None, None)
        out[(label, k)] = dict(rank=None if best_rank is None else best_rank + 1, method=best_mine,
                               best=methods[r.index(0)] if 0 in r else None, n_methods=len(methods))
    return out


# ----------------------------------------------------------------------------- figure -------------
def _wrap_label(label: str, width: int = 11) -> str:
    """A column title that fits its column: long names broken at word, CamelCase or hyphen
    boundaries ("IntegratedGradients" -> "Integrated / Gradients")."""
    import re
    import textwrap
    if len(label) <= width:
        return label
    spaced = re.sub(r"(?<=[a-z])(?=[A-Z][a-z])", " ", label).replace("-", "- ")
    return "\n".join(textwrap.wrap(spaced, width=width, break_long_words=False)).replace("- ", "-")


def plot_maps(model, images: torch.Tensor, labels: torch.Tensor, masks: torch.Tensor,
              methods: Optional[Sequence[str]] = None, mean=D.DIGITS_MEAN, std=D.DIGITS_STD,
              title: Optional[str] = None):
    """A Fig.-3-style grid: one row per image (input first), one column per method; maps prepared
    as for the metrics (divided by the maximum, clamped to [-1, 1]; red positive, blue negative) with
    the mask's outline.  ``model`` may be a ``{label: model}`` mapping: one group of rows per model
    (the columns are the first model's methods; a method another model does not run is left blank).
    Returns the matplotlib Figure."""
    import matplotlib
    import matplotlib.pyplot as plt
    group = dict(model) if isinstance(model, Mapping) else {None: model}
    first = next(iter(group.values()))
    names = [B.get_method(m).name for m in (methods if methods is not None else B.default_methods(first))]
    x = D.normalize(images, mean, std)
    y = labels.long()
    rows = []  # (model label, image index, {method: map})
    for label, mdl in group.items():
        own = set(names if methods is not None else (B.get_method(m).name for m in B.default_methods(mdl)))
        maps = {m: M.prepare(B.get_method(m)(mdl, x, y), x.shape[-2:]).numpy() for m in names if m in own}
        rows += [(label, i, maps) for i in range(len(images))]
    n, k = len(rows), len(names) + 1
    fig, axes = plt.subplots(n, k, figsize=(1.25 * k, 1.3 * n + 0.4), squeeze=False)
    for r, (label, i, maps) in enumerate(rows):
        ax = axes[r, 0]
        ax.imshow(images[i].permute(1, 2, 0).clamp(0, 1).numpy())
        ax.contour(masks[i].numpy().astype(float), levels=[0.5], colors="w", linewidths=0.7)
        ax.set_ylabel(f"label {int(labels[i])}" if label is None else f"{label}\nlabel {int(labels[i])}", fontsize=7)
        for j, m in enumerate(names):
            ax = axes[r, j + 1]
            if m not in maps:
                ax.axis("off")
                continue
            ax.imshow(maps[m][i], cmap="bwr", vmin=-1, vmax=1, interpolation="nearest")
            ax.contour(masks[i].numpy().astype(float), levels=[0.5], colors="k", linewidths=0.6)
    for j, lab in enumerate(["input"] + [method_label(m) for m in names]):
        axes[0, j].set_title(_wrap_label(lab), fontsize=7)
    for ax in axes.flat:
        ax.set_xticks([])
        ax.set_yticks([])
    if title:
        import textwrap
        width = max(40, int(13 * fig.get_figwidth()))  # characters of 9-pt text across the figure
        fig.suptitle("\n".join(textwrap.fill(line, width) for line in title.splitlines()), fontsize=9)
    fig.tight_layout(pad=0.3)
    return fig
