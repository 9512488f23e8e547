"""Where SRD ranks in each column of results/table2.csv and results/table4.csv, next to the paper's
claim for the same column (its Table 2 on VGG16 / ResNet50 with ImageNet-S50, its Table 4 on
ResNet50 with CIFAR-100).  Writes results/srd_ranks.md and prints it.

    python experiments/srd_ranks.py [--results results]
"""
import argparse
import csv
import os
from collections import defaultdict

HIGHER = {"Pointing": True, "Attribution": True, "Sparseness": True, "Fidelity": True, "Stability": False}

# The paper's rank of the best SRD variant per column (Table 2: SRD-low/high/input among 17 rows;
# Table 4: SRD among 12 rows), read off its tables.
PAPER_T2 = {
    "VGG": {"Pointing": (1, "SRD-high .948"), "Attribution": (2, "SRD-high .566 (ScoreCAM .582)"),
            "Sparseness": (1, "SRD-input .788"), "Fidelity": (1, "SRD-high .206"),
            "Stability": (1, "SRD-input .099")},
    "ResNet": {"Pointing": (1, "SRD-input .953"), "Attribution": (1, "SRD-high .579"),
               "Sparseness": (2, "SRD-input .724 (GuidedBackprop .741)"), "Fidelity": (1, "SRD-high .142"),
               "Stability": (1, "SRD-input .104")},
}


def load(path):
    means = defaultdict(dict)  # (model, metric) -> method -> mean
    with open(path) as f:
        for r in csv.DictReader(f):
            means[(r["model"], r["metric"])][r["method"]] = float(r["mean"])
    return means


def rank_table(means, paper=None):
    lines = ["| model | metric | best SRD variant (rank of 17) | its value | best method | its value | paper |",
             "|---|---|---|---:|---|---:|---|"]
    for (model, metric), vals in means.items():
        sign = 1 if HIGHER[metric] else -1
        order = sorted(vals, key=lambda m: -sign * round(vals[m], 3))
        keyed = [round(vals[m], 3) for m in order]
        rank = {m: sorted(set(keyed), key=lambda v: -sign * v).index(round(vals[m], 3)) + 1 for m in vals}
        srd = min((m for m in vals if m.startswith("SRD")), key=lambda m: rank[m])
        best = order[0]
        p = ""
        if paper is not None:
            key = "VGG" if model.startswith("VGG") else "ResNet"
            pr = paper.get(key, {}).get(metric)
            p = f"rank {pr[0]} ({pr[1]})" if pr else ""
        lines.append(f"| {model} | {metric} | {srd}: {rank[srd]} | {vals[srd]:.3f} | {best} | {vals[best]:.3f} | {p} |")
    return lines


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--results", default="results", help="folder with table2.csv and table4.csv")
    args = ap.parse_args()
    out = ["# Where SRD ranks", ""]
    t2 = os.path.join(args.results, "table2.csv")
    if os.path.exists(t2):
        out += ["## Table 2 (digit scenes) vs the paper's Table 2 (ImageNet-S50)", ""]
        out += rank_table(load(t2), PAPER_T2) + [""]
    t4 = os.path.join(args.results, "table4.csv")
    if os.path.exists(t4):
        out += ["## Table 4 (Fidelity per activation) vs the paper's Table 4 (SRD best on all six)", ""]
        out += rank_table(load(t4), {"ResNet": {"Fidelity": (1, "SRD best")}}) + [""]
    text = "\n".join(out)
    with open(os.path.join(args.results, "srd_ranks.md"), "w") as f:
        f.write(text)
    print(text)
