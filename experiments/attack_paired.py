"""Paired comparison of the attack results (``srd-fx attack`` ``pairs.csv`` files).

Every method is attacked on the same image pairs, so SRD can be compared with each baseline pair
by pair: mean difference (SRD minus baseline) of SSIM and PCC between phi(x_org) and phi(x_adv),
how many pairs SRD wins, and the two-sided Wilcoxon signed-rank p-value (scipy).  Besides the
protocol of the paper (SRD attacked through its own module, the gradient methods and LRP through
the softplus copy), it also reports the worst case over the two attacks run for LRP z+
(softplus copy / ReLU network) and for SRD (own module / softplus copy), pair by pair.

    python experiments/attack_paired.py results/attack_vgg/pairs.csv results/attack_resnet/pairs.csv \
        --out results/attack_paired.md
    python experiments/attack_paired.py results/attack_vit/pairs.csv --out results/attack_vit/paired.md
"""
import argparse
import csv

import numpy as np
from scipy.stats import wilcoxon

LABEL = {"gradient": "Gradient", "input_x_gradient": "Input×Gradient", "guided_backprop": "Guided Backprop",
         "integrated_gradients": "Integrated Gradients", "lrp_zplus": "LRP z+",
         "lrp_zplus_relu": "LRP z+ (ReLU-attacked)", "lrp_worst": "LRP z+ (worse of the two attacks)",
         "attnlrp": "AttnLRP (LXT)", "srd": "SRD", "srd_softplus": "SRD (softplus-attacked)", "srd_worst": "SRD (worse of the two attacks)"}


def table(d: dict, ref: str, others, title: str) -> list:
    lines = [f"\n#### {title}\n", "| baseline | metric | baseline mean | SRD mean | SRD − baseline | SRD wins | "
             "Wilcoxon p |", "|---|---|---|---|---|---|---|"]
    for meth in others:
        for metric in ("ssim", "pcc"):
            a = d[(ref, metric)]
            b = d[(meth, metric)]
            diff = a - b
            p = wilcoxon(a, b).pvalue if np.any(diff != 0) else 1.0
            lines.append(f"| {LABEL[meth]} | {metric.upper()} | {b.mean():.3f} | {a.mean():.3f} | {diff.mean():+.3f} | "
                         f"{int((diff > 0).sum())}/{len(diff)} | {p:.3g} |")
    return lines


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("csv", nargs="+", help="pairs.csv files written by srd-fx attack")
    p.add_argument("--out", default=None, help="also write the tables to this Markdown file")
    a = p.parse_args()
    out = ["Paired comparison of SRD with each baseline (same image pairs; `experiments/attack_paired.py "
           + " ".join(a.csv) + "`)."]
    for path in a.csv:
        with open(path, newline="") as f:
            rows = list(csv.DictReader(f))
        for model in dict.fromkeys(r["model"] for r in rows):
            rm = [r for r in rows if r["model"] == model]
            methods = list(dict.fromkeys(r["method"] for r in rm))
            pairs = sorted({int(r["pair"]) for r in rm})
            # d[(method, metric)] -> values over pairs, in pair order
            d = {}
            for meth in methods:
                by_pair = {int(r["pair"]): r for r in rm if r["method"] == meth}
                for metric in ("ssim", "pcc"):
                    d[(meth, metric)] = np.array([float(by_pair[k][metric]) for k in pairs])
            out.append(f"\n### {model} ({len(pairs)} pairs)")
            base = [m for m in methods if not m.startswith("srd")]
            out += table(d, "srd", base, "protocol of the paper: SRD attacked through its own module")
            if {"lrp_zplus", "lrp_zplus_relu"} <= set(methods) and {"srd", "srd_softplus"} <= set(methods):
                for metric in ("ssim", "pcc"):
                    d[("lrp_worst", metric)] = np.minimum(d[("lrp_zplus", metric)], d[("lrp_zplus_relu", metric)])
                    d[("srd_worst", metric)] = np.minimum(d[("srd", metric)], d[("srd_softplus", metric)])
                others = [m for m in base if not m.startswith("lrp")] + ["lrp_worst"]
                out += table(d, "srd_worst", others, "worst case over the attacks run: SRD (own module / softplus "
                                                     "copy) and LRP z+ (softplus copy / ReLU network)")
    text = "\n".join(out) + "\n"
    print(text)
    if a.out:
        with open(a.out, "w") as f:
            f.write(text)


if __name__ == "__main__":
    main()
