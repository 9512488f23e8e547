"""``srd-fx attack``: targeted explanation manipulation (Dombrowski et al. 2019; paper Sec. 4.3, Fig. 4).

For N random (original, target) pairs of digit-scene test images and every method (Gradient,
Input×Gradient, Guided Backprop, Integrated Gradients, LRP z+, SRD), perturb the original image
within 8/255 (L-infinity, valid pixel range) so that its explanation moves to the target image's
explanation while the logits stay put (:func:`srd_fx.methods.robustness.manipulate`), then compare the
original-network maps before and after: SSIM and Pearson correlation (PCC) between
phi(x_org) and phi(x_adv) (higher = more robust), the logit change, the achieved L-infinity
and the number of steps.

Writes, under ``--out``: ``pairs.csv`` (one row per model, method and pair, appended as the run
goes), ``summary.json`` (settings, command, mean ± std per model and method), ``table.md``,
``bars.png`` (Fig. 4 bottom) and ``examples_<model>.png`` (Fig. 4 top).
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import shlex
import sys
import time
from typing import Dict, List, Sequence, Tuple

from ..args import add_cache_dir, add_digit_models

NAME = "attack"
HELP = ("Targeted explanation manipulation (Dombrowski et al. 2019): SSIM / PCC between the "
        "explanations before and after the attack, per method (paper Sec. 4.3, Fig. 4).")

FIELDS = ["model", "method", "pair", "index_org", "index_target", "label_org", "label_target",
          "class_org", "class_adv", "class_kept", "ssim", "pcc", "ssim_target_before", "ssim_target_after",
          "pcc_target_before", "pcc_target_after", "logit_change_l2", "logit_change_max", "logit_norm",
          "attacked_logit_change_l2", "linf", "linf_255", "steps", "stopped", "loss_start", "loss_end",
          "expl_loss_start", "expl_loss_end", "seconds"]


def add_arguments(p: argparse.ArgumentParser) -> None:
    from srd_fx.methods.robustness import METHODS, PAPER_METHODS
    g = p.add_argument_group("models and data (the evaluation harness: trained digit-scene models)")
    add_digit_models(g, ["vgg", "resnet"], "Architectures of the trained digit-scene models to attack (trained and "
                     "cached on first use by srd_fx.eval.train.get_trained; vit and mixer are the token models).",
                     "Side in pixels of the digit scenes and models.", archs=("resnet", "vgg", "vit", "mixer"),
                     act_default=None, act_help="Activation of the trained models (relu, elu, leakyrelu, silu, "
                                                "gelu, tanh; default relu for resnet/vgg, gelu for vit/mixer).")
    g.add_argument("--pool", type=int, default=1000, help="Number of test scenes the random pairs are drawn "
                                                          "from.")
    g.add_argument("--min-accuracy", type=float, default=0.5,
                   help="Refuse to attack a trained model whose test accuracy is below this (an untrained "
                        "model's explanations say nothing about the method); 0 disables the check.")
    add_cache_dir(g)
    a = p.add_argument_group("attack (SPEC.md §6)")
    a.add_argument("--pairs", type=int, default=20, help="Number of random (original, target) image pairs "
                                                         "(the paper uses 100).")
    a.add_argument("--methods", nargs="+", default=list(PAPER_METHODS), choices=sorted(METHODS),
                   help="Explanation methods to attack (default: the paper's six); two extra attacks are "
                        "available as checks: lrp_zplus_relu attacks LRP z+ on the ReLU network itself and "
                        "srd_softplus attacks SRD through the softplus copy; attnlrp is LXT's AttnLRP, for the "
                        "token models.")
    a.add_argument("--max-steps", type=int, default=200, help="Maximum number of optimiser steps per pair.")
    a.add_argument("--lr", type=float, default=1e-3, help="Adam learning rate on the perturbation (in the "
                                                          "model's normalised input units).")
    a.add_argument("--lambda1", type=float, default=1e11, help="Weight of the explanation term.")
    a.add_argument("--lambda2", type=float, default=1e6, help="Weight of the logit term.")
    a.add_argument("--eps", type=float, default=8.0, help="L-infinity bound of the perturbation in pixel "
                                                          "units of 1/255.")
    a.add_argument("--stop-mse", type=float, default=1e-3, help="Stop a pair once the MSE between its "
                                                                "max-normalised attacked map and the target "
                                                                "map is at most this.")
    a.add_argument("--beta", type=float, default=10.0, help="Softplus beta of the network copy the gradient "
                                                            "methods and LRP are attacked through.")
    a.add_argument("--ig-steps", type=int, default=8, help="Gauss-Legendre points of Integrated Gradients "
                                                           "(attacked and reported maps alike).")
    a.add_argument("--batch-size", type=int, default=10, help="Pairs attacked together (independently) in "
                                                              "one batch.")
    a.add_argument("--seed", type=int, default=0, help="Seed of the random pairs.")
    o = p.add_argument_group("output")
    o.add_argument("--out", default="srd_fx_results/attack",
                   help="folder the tables, figures and JSON are written to (default: srd_fx_results/attack)")
    o.add_argument("--examples", type=int, default=1, help="Pairs shown in examples_<model>.png.")
    o.add_argument("--threads", type=int, default=2, help="torch CPU threads.")
    o.add_argument("--device", default="cpu", help="torch device to run on (cpu, cuda, ...).")
    o.add_argument("--no-progress", action="store_true", help="Hide the progress bar.")


# ------------------------------------------------------------------------------------------------
def draw_pairs(n_pool: int, n_pairs: int, seed: int) -> List[Tuple[int, int]]:
    """``n_pairs`` random (original, target) index pairs of distinct images."""
    import numpy as np
    if n_pool < 2:
        raise ValueError("need at least 2 images to draw pairs from")
    rng = np.random.default_rng(seed)
    return [tuple(int(v) for v in rng.choice(n_pool, 2, replace=False)) for _ in range(n_pairs)]


def _stats(vals: Sequence[float]) -> Dict[str, float]:
    import numpy as np
    a = np.asarray([v for v in vals if v == v], dtype=float)  # drop NaN
    if a.size == 0:
        return {"mean": float("nan"), "std": float("nan"), "n": 0}
    return {"mean": float(a.mean()), "std": float(a.std(ddof=1)) if a.size > 1 else 0.0, "n": int(a.size)}


def run_experiment(models: Dict[str, dict], images, labels, pairs: Sequence[Tuple[int, int]],
                   methods: Sequence[str], out: str, *, mean, std, max_steps: int = 200, lr: float = 1e-3,
                   lambda1: float = 1e11, lambda2: float = 1e6, eps_pixels: float = 8 / 255,
                   stop_mse: float = 1e-3, beta: float = 10.0, ig_steps: int = 8, batch_size: int = 10,
                   examples: int = 1, progress: bool = True, device: str = "cpu", command: str = "",
                   extra: dict = None) -> dict:
    """Attack every model in ``models`` (name -> {"model": eval-mode nn.Module, "accuracy": float})
    with every method on every pair of ``images`` ((N, 3, H, W) in [0, 1]; the models see
    ``(image - mean) / std``).  Writes the outputs under ``out`` and returns the summary dict."""
    import numpy as np
    import torch
    from tqdm.auto import tqdm
    from srd_fx.methods import robustness as R
    from srd_fx.eval.data import normalize

    os.makedirs(out, exist_ok=True)
    mean_t = torch.as_tensor(mean, dtype=torch.float32)
    std_t = torch.as_tensor(std, dtype=torch.float32)
    eps = (eps_pixels / std_t).tolist()
    clamp = (((0 - mean_t) / std_t).tolist(), ((1 - mean_t) / std_t).tolist())
    csv_path = os.path.join(out, "pairs.csv")
    fcsv = open(csv_path, "w", newline="")
    writer = csv.DictWriter(fcsv, fieldnames=FIELDS)
    writer.writeheader()
    rows: List[dict] = []
    example_maps: Dict[str, dict] = {}
    timing: Dict[str, Dict[str, float]] = {}
    total = len(models) * len(methods) * len(pairs)
    bar = tqdm(total=total, desc="attack", unit="pair", disable=not progress)
    t_start = time.time()
    for mname, entry in models.items():
        model = entry["model"].to(device).eval()
        for p in model.parameters():
            p.requires_grad_(False)
        timing[mname] = {}
        example_maps[mname] = {}
        for meth in methods:
            t_meth = time.time()
            built = None
            for b0 in range(0, len(pairs), batch_size):
                chunk = pairs[b0:b0 + batch_size]
                io = torch.tensor([i for i, _ in chunk])
                it = torch.tensor([j for _, j in chunk])
                x_org = normalize(images[io], mean, std).to(device)
                x_tgt = normalize(images[it], mean, std).to(device)
                if built is None:
                    built = R.make_method(meth, model, x_org, beta=beta, ig_steps=ig_steps)
                bar.set_postfix(model=mname, method=meth)
                t0 = time.time()
                res = R.manipulate(model, built, x_org, x_tgt, lambda1=lambda1, lambda2=lambda2, lr=lr,
                                   max_steps=max_steps, eps=eps, stop_mse=stop_mse, beta=beta, clamp=clamp,
                                   ig_steps=ig_steps)
                sec = (time.time() - t0) / len(chunk)
                s_adv = R.similarity(res.maps["org"], res.maps["adv"])
                s_tb = R.similarity(res.maps["org"], res.maps["target"])
                s_ta = R.similarity(res.maps["adv"], res.maps["target"])
                dl = (res.logits_adv - res.logits_org)
                dla = (res.attacked_logits_adv - res.attacked_logits_org)
                linf_px = ((res.x_adv - x_org).abs() * std_t.to(device).view(1, -1, 1, 1)).flatten(1).amax(1)
                for k, (i, j) in enumerate(chunk):
                    loss_k = res.loss[:, k]
                    loss_k = loss_k[torch.isfinite(loss_k)]
                    el = res.expl_loss[:, k]
                    el = el[torch.isfinite(el)]
                    row = dict(
                        model=mname, method=meth, pair=b0 + k, index_org=i, index_target=j,
                        label_org=int(labels[i]), label_target=int(labels[j]),
                        class_org=int(res.target_org[k]), class_adv=int(res.logits_adv[k].argmax()),
                        class_kept=int(res.target_org[k] == res.logits_adv[k].argmax()),
                        ssim=s_adv["ssim"][k], pcc=s_adv["pcc"][k],
                        ssim_target_before=s_tb["ssim"][k], ssim_target_after=s_ta["ssim"][k],
                        pcc_target_before=s_tb["pcc"][k], pcc_target_after=s_ta["pcc"][k],
                        logit_change_l2=float(dl[k].norm()), logit_change_max=float(dl[k].abs().max()),
                        logit_norm=float(res.logits_org[k].norm()),
                        attacked_logit_change_l2=float(dla[k].norm()),
                        linf=float(res.linf[k]), linf_255=float(linf_px[k] * 255),
                        steps=int(res.steps[k]), stopped=int(res.stopped[k]),
                        loss_start=float(loss_k[0]), loss_end=float(loss_k.min()),
                        expl_loss_start=float(el[0]), expl_loss_end=float(el[-1]), seconds=sec)
                    rows.append(row)
                    writer.writerow({k2: (f"{v:.6g}" if isinstance(v, float) else v) for k2, v in row.items()})
                fcsv.flush()
                if b0 == 0:
                    n_ex = min(examples, len(chunk))
                    example_maps[mname][meth] = {
                        "x_org": images[io[:n_ex]], "x_target": images[it[:n_ex]],
                        "x_adv": _to_pixels(res.x_adv[:n_ex].cpu(), mean, std),
                        **{k2: v[:n_ex].cpu() for k2, v in res.maps.items()}}
                bar.update(len(chunk))
            timing[mname][meth] = time.time() - t_meth
    bar.close()
    fcsv.close()
    wall = time.time() - t_start

    summary = {"command": command, "settings": dict(
        pairs=len(pairs), methods=list(methods), max_steps=max_steps, lr=lr, lambda1=lambda1, lambda2=lambda2,
        eps_pixels_255=eps_pixels * 255, stop_mse=stop_mse, beta=beta, ig_steps=ig_steps, batch_size=batch_size,
        mean=list(mean), std=list(std), **(extra or {})),
        "wall_seconds": round(wall, 1), "models": {}}
    keys = ["ssim", "pcc", "ssim_target_before", "ssim_target_after", "pcc_target_before", "pcc_target_after",
            "logit_change_l2", "logit_change_max", "logit_norm", "attacked_logit_change_l2", "class_kept",
            "linf_255", "steps", "stopped", "loss_start", "loss_end"]
    for mname, entry in models.items():
        ms = {"accuracy": entry.get("accuracy"), "methods": {}}
        for meth in methods:
            rs = [r for r in rows if r["model"] == mname and r["method"] == meth]
            ms["methods"][meth] = {k: _stats([r[k] for r in rs]) for k in keys}
            ms["methods"][meth]["seconds"] = round(timing[mname][meth], 1)
        summary["models"][mname] = ms
    with open(os.path.join(out, "summary.json"), "w") as f:
        json.dump(summary, f, indent=1)
    with open(os.path.join(out, "table.md"), "w") as f:
        f.write(format_table(summary))
    plot_bars(summary, os.path.join(out, "bars.png"))
    for mname in models:
        plot_examples(example_maps[mname], methods, os.path.join(out, f"examples_{mname}.png"), mname)
    return summary


def _to_pixels(x, mean, std):
    from srd_fx.eval.data import denormalize
    return denormalize(x, mean, std).clamp(0, 1)


def _label(meth: str) -> str:
    from srd_fx.methods.robustness import METHODS
    return METHODS[meth].label


def format_table(summary: dict) -> str:
    lines = []
    s = summary["settings"]
    lines.append(f"Targeted manipulation, {s['pairs']} pairs, max {s['max_steps']} Adam steps (lr {s['lr']}), "
                 f"L-inf <= {s['eps_pixels_255']:g}/255, softplus beta {s['beta']}, IG {s['ig_steps']} points.\n")
    lines.append(f"Command: `{summary['command']}`\n")
    for mname, ms in summary["models"].items():
        acc = ms.get("accuracy")
        lines.append(f"\n### {mname}" + (f" (test accuracy {acc:.3f})" if acc is not None else "") + "\n")
        lines.append("| method | SSIM(org, adv) ↑ | PCC(org, adv) ↑ | PCC(φ, φ(x_target)): org → adv | "
                     "‖ΔF‖₂ (‖F‖₂) | class kept | L∞ ×255 | steps | s |")
        lines.append("|---|---|---|---|---|---|---|---|---|")
        for meth, st in ms["methods"].items():
            def ms_(k, d=3):
                return f"{st[k]['mean']:.{d}f} ± {st[k]['std']:.{d}f}"
            lines.append(
                f"| {_label(meth)} | {ms_('ssim')} | {ms_('pcc')} | {st['pcc_target_before']['mean']:.3f} → "
                f"{st['pcc_target_after']['mean']:.3f} | {ms_('logit_change_l2')} ({st['logit_norm']['mean']:.2f}) | "
                f"{st['class_kept']['mean']:.2f} | {st['linf_255']['mean']:.2f} | {st['steps']['mean']:.0f} | "
                f"{st['seconds']:.0f} |")
    return "\n".join(lines) + "\n"


def plot_bars(summary: dict, path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np
    models = list(summary["models"])
    fig, axes = plt.subplots(len(models), 2, figsize=(10, 3.2 * len(models)), squeeze=False)
    for r, mname in enumerate(models):
        meths = list(summary["models"][mname]["methods"])
        for c, key in enumerate(("ssim", "pcc")):
            ax = axes[r, c]
            st = summary["models"][mname]["methods"]
            m = np.array([st[k][key]["mean"] for k in meths])
            s = np.array([st[k][key]["std"] for k in meths])
            colours = ["tab:red" if k.startswith("srd") else "tab:blue" for k in meths]
            ax.bar(range(len(meths)), m, yerr=s, color=colours, capsize=3)
            ax.set_xticks(range(len(meths)))
            ax.set_xticklabels([_label(k) for k in meths], rotation=30, ha="right", fontsize=8)
            ax.set_ylabel(key.upper())
            ax.set_title(f"{mname}: {key.upper()}(φ(x_org), φ(x_adv))", fontsize=9)
            ax.set_ylim(min(0.0, float(np.nanmin(m - s)) - 0.05), 1.0)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_examples(ex: dict, methods: Sequence[str], path: str, title: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    meths = [m for m in methods if m in ex]
    if not meths:
        return
    n = ex[meths[0]]["org"].shape[0]
    fig, axes = plt.subplots(3 * n, 1 + len(meths), figsize=(1.9 * (1 + len(meths)), 1.9 * 3 * n), squeeze=False)
    rows = (("x_org", "org", "original"), ("x_target", "target", "target"), ("x_adv", "adv", "manipulated"))
    for k in range(n):
        for r, (img_key, map_key, name) in enumerate(rows):
            ax = axes[3 * k + r, 0]
            ax.imshow(ex[meths[-1]][img_key][k].permute(1, 2, 0).numpy())
            ax.set_ylabel(name, fontsize=8)
            for c, meth in enumerate(meths):
                m = ex[meth][map_key][k]
                axm = axes[3 * k + r, c + 1]
                axm.imshow((m / (m.max() + 1e-30)).numpy(), cmap="inferno", vmin=0, vmax=1)
                if k == 0 and r == 0:
                    axm.set_title(_label(meth), fontsize=8)
        for ax in axes[3 * k:3 * k + 3].ravel():
            ax.set_xticks([])
            ax.set_yticks([])
    fig.suptitle(f"{title}: explanations of the original, target and manipulated image", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ------------------------------------------------------------------------------------------------
def run(args) -> int:
    import torch
    from srd_fx.eval import data as D
    from srd_fx.eval.train import get_trained

    torch.set_num_threads(max(1, args.threads))
    # softplus(beta) second derivatives underflow to float32 denormals, which slow CPU
    # convolutions down 10-100x; flushing them to zero changes no reported digit
    torch.set_flush_denormal(True)
    if args.pairs < 1 or args.batch_size < 1 or args.max_steps < 0:
        print("error: --pairs and --batch-size must be >= 1 and --max-steps >= 0", file=sys.stderr)
        return 2
    ds = D.DigitScenes("test", size=args.size, n=args.pool)
    images, labels, _ = ds.tensors(progress=not args.no_progress)
    pairs = draw_pairs(len(images), args.pairs, args.seed)
    models = {}
    for arch in args.arch:
        act = args.act or ("gelu" if arch in ("vit", "mixer") else "relu")
        model, acc = get_trained(arch=arch, act=act, size=args.size, cache_dir=args.cache_dir,
                                 progress=not args.no_progress)
        if acc < args.min_accuracy:
            print(f"error: the trained {arch}/{act} model has test accuracy {acc:.3f} < --min-accuracy "
                  f"{args.min_accuracy}: it did not learn, and attacking its explanations would measure "
                  f"nothing. Retrain it (delete its file in the cache directory, or change the training "
                  f"settings) or pass --min-accuracy 0 to attack it anyway.", file=sys.stderr)
            return 2
        models[f"{arch}-{act}"] = {"model": model.eval(), "accuracy": acc}
    argv = sys.argv[1:]
    if "attack" in argv:
        argv = argv[argv.index("attack") + 1:]
    command = "srd-fx attack " + " ".join(shlex.quote(a) for a in argv)
    summary = run_experiment(
        models, images, labels, pairs, args.methods, args.out, mean=D.DIGITS_MEAN, std=D.DIGITS_STD,
        max_steps=args.max_steps, lr=args.lr, lambda1=args.lambda1, lambda2=args.lambda2,
        eps_pixels=args.eps / 255, stop_mse=args.stop_mse, beta=args.beta, ig_steps=args.ig_steps,
        batch_size=args.batch_size, examples=args.examples, progress=not args.no_progress, device=args.device,
        command=command, extra=dict(arch=args.arch, act=args.act, size=args.size, pool=args.pool, seed=args.seed,
                                    threads=args.threads))
    print(format_table(summary))
    print(f"wrote {args.out}/(pairs.csv, summary.json, table.md, bars.png, examples_*.png) in "
          f"{summary['wall_seconds']:.0f} s")
    return 0
