"""REPORT.md and report.json from the cached records of a sweep (and peers.json, if present)."""
from __future__ import annotations

import datetime
import json
import math
import os
import platform
import statistics
from collections import Counter, defaultdict
from pathlib import Path
from typing import Dict, List, Optional, Sequence

from . import lists
from .runner import (CATEGORIES, CATEGORY_HELP, CONSERVATION_TOL, LOGITS_TOL, BATCH_TOL, HERE,
                     REPORT_JSON, REPORT_MD)

PEERS_JSON = HERE / "peers.json"
PEER_TOL = 1e-3


def _esc(s) -> str:
    return str(s if s is not None else "").replace("|", "\\|").replace("\n", " ").replace("`", "'")


def _fmt_s(v: Optional[float]) -> str:
    return "" if v is None else f"{v:.2f}"


def _pct(a: int, b: int) -> str:
    return f"{100.0 * a / b:.1f}%" if b else "n/a"


def summarise(names: Sequence[str], records: Dict[str, Dict], fingerprint: str) -> Dict:
    recs = [records[n] for n in names if n in records]
    n_total = len(names)
    n_pass = sum(r["status"] == "pass" for r in recs)
    n_skip = sum(r["status"] == "skipped" for r in recs)
    n_fail = sum(r["status"] == "fail" for r in recs)
    cats = Counter(r["category"] for r in recs if r["status"] == "fail")
    ops = Counter(r.get("op") for r in recs if r.get("category") == "unsupported-op")
    comp = [r["times"]["compile_s"] for r in recs if r.get("times", {}).get("compile_s") is not None]
    return dict(
        total=n_total, run=len(recs), not_run=n_total - len(recs), passed=n_pass, failed=n_fail,
        skipped=n_skip, pass_rate=(n_pass / n_total if n_total else None),
        pass_rate_of_run=(n_pass / (n_pass + n_fail) if n_pass + n_fail else None),
        stale=sum(r.get("fingerprint") != fingerprint for r in recs),
        categories=dict(cats), unsupported_ops=dict(ops),
        compile_s_median=(statistics.median(comp) if comp else None),
        compile_s_p90=(sorted(comp)[int(0.9 * (len(comp) - 1))] if comp else None),
        compile_s_max=(max(comp) if comp else None),
        families=len({lists.family_of(n, lists.module_of(n)) for n in names}),
    )


def family_table(names: Sequence[str], records: Dict[str, Dict]) -> List[Dict]:
    fam: Dict[str, Dict] = defaultdict(lambda: dict(models=0, passed=0, failed=0, skipped=0, not_run=0, compile=[]))
    for n in names:
        f = lists.family_of(n, lists.module_of(n))
        row = fam[f]
        row["models"] += 1
        r = records.get(n)
        if r is None:
            row["not_run"] += 1
            continue
        row[{"pass": "passed", "fail": "failed", "skipped": "skipped"}[r["status"]]] += 1
        if r.get("times", {}).get("compile_s") is not None:
            row["compile"].append(r["times"]["compile_s"])
    out = []
    for f, row in sorted(fam.items()):
        c = row.pop("compile")
        out.append(dict(family=f, **row, pass_rate=row["passed"] / row["models"],
                        compile_s_median=(statistics.median(c) if c else None)))
    return out


def _short_error(err: Optional[str]) -> str:
    """Group peer errors: captum's 'Module of type <class X> has no rule' by X, else the type."""
    import re
    err = err or "?"
    m = re.search(r"Module of type <class '([\w.]+)'>", err)
    if m:
        return f"no LRP rule for {m.group(1).rsplit('.', 1)[-1]}"
    return err.split(":")[0]


def _peer_summary(names: Sequence[str], peers: Dict) -> Optional[Dict]:
    recs = peers.get("records", {})
    if not recs or not names:
        return None
    out = {}
    for method in ("srd", "zennit", "captum"):
        got = [recs[n].get(method) for n in names if n in recs and recs[n].get(method)]
        if not got:
            continue
        out[method] = dict(
            run=len(got),
            produced=sum(g.get("produced", False) for g in got),
            finite=sum(g.get("produced", False) and g.get("finite", False) for g in got),
            conserved=sum(bool(g.get("conserved")) for g in got),
            errors=Counter(_short_error(g.get("error")) for g in got if not g.get("produced")),
        )
    return out


def srd_entry(r: Dict) -> Dict:
    """The SRD column of the side-by-side table, from an SRD sweep record."""
    if r is None:
        return None
    produced = r.get("status") == "pass" or r.get("category") in (
        "logits-mismatch", "conservation", "batch-dependence", "degenerate")
    err = (r.get("metrics") or {}).get("conservation_rel_err")
    finite = produced and r.get("category") != "non-finite" and "non-finite" not in (r.get("failed_checks") or [])
    return dict(produced=bool(produced), finite=bool(finite),
                conserved=bool(produced and isinstance(err, (int, float)) and err <= PEER_TOL),
                conservation_rel_err=err, error=None if produced else f"{r.get('category')}: {r.get('reason')}")


def write_report(names: Sequence[str], records: Dict[str, Dict], *, fingerprint: str, command: str,
                 meta: Optional[Dict] = None, md_path: Path = REPORT_MD, json_path: Path = REPORT_JSON) -> Dict:
    import timm
    import torch
    s = summarise(names, records, fingerprint)
    fams = family_table(names, records)
    peers = json.loads(PEERS_JSON.read_text()) if PEERS_JSON.exists() else {}
    if peers.get("records"):
        for n, pr in peers["records"].items():
            pr["srd"] = srd_entry(records.get(n))
    psum = _peer_summary([n for n in names if n in peers.get("records", {})], peers)
    now = datetime.datetime.now().strftime("%Y-%m-%d %H:%M")
    meta = dict(meta or {})
    meta.update(generated=now, command=command, timm=timm.__version__, torch=torch.__version__,
                python=platform.python_version(), cpus=os.cpu_count(), fingerprint=fingerprint,
                tolerances=dict(logits=LOGITS_TOL, conservation=CONSERVATION_TOL, batch=BATCH_TOL))
    L: List[str] = []
    w = L.append
    w("# srd_fx model-zoo report")
    w("")
    w(f"Produced by `{command}` ({now}; timm {timm.__version__}, torch {torch.__version__}, "
      f"{os.cpu_count()} CPU cores; code fingerprint `{fingerprint}`). How the list is derived and what "
      "each check means: [docs/zoo.md](../docs/zoo.md). Per-model numbers: [report.json](report.json).")
    w("")
    w("## Summary")
    w("")
    scope = "the default list" if set(names) == set(lists.default_models()) else "this selection"
    w(f"- Models: **{s['total']}** timm CNN architectures in **{s['families']}** families ({scope}).")
    w(f"- **Passed {s['passed']} / {s['total']} = {_pct(s['passed'], s['total'])}** of {scope} "
      f"(failed {s['failed']}, skipped as too large {s['skipped']}, not run {s['not_run']}). "
      f"Of the models actually checked: {_pct(s['passed'], s['passed'] + s['failed'])}.")
    if s["stale"]:
        w(f"- {s['stale']} record(s) come from an older version of the compiler (fingerprint differs) "
          "and are marked *stale* below; rerun to refresh them.")
    w(f"- Checks (float64): compile; logits relative error <= {LOGITS_TOL:g}; "
      f"|sum R^input + lost - sum R^L| <= {CONSERVATION_TOL:g} * sum|R^L| per sample; every map finite "
      f"(`layers=\"all\"`); batch of 2 equals the samples alone (relative error <= {BATCH_TOL:g}).")
    lost = [(n, records[n]["metrics"].get("lost_frac")) for n in names
            if records.get(n, {}).get("status") == "pass" and (records[n].get("metrics") or {}).get("lost_frac")]
    lost = sorted(((n, f) for n, f in lost if f and f > CONSERVATION_TOL), key=lambda t: -t[1])
    w(f"- *lost* is the relevance SRD drops, per docs/method.md \"Lost relevance and conservation\", where a position's PFV norm "
      "or its bias-share denominator D_j is zero (`out.lost`); the check verifies that it accounts for the "
      f"whole imbalance. Passing models with lost > {CONSERVATION_TOL:g} * sum|R^L|: {len(lost)}"
      + (f" (largest: {', '.join(f'{n} {100 * f:.2f}%' for n, f in lost[:5])}) — ReLU layers of "
         "few channels followed by 1x1 convolutions, where every channel of a position can be zero."
         if lost else "."))
    if s["compile_s_median"] is not None:
        w(f"- Compile time (`srd_fx.compile(model, layers=\"all\", example_input=x)`, wall clock): median "
          f"{s['compile_s_median']:.2f} s, 90th percentile {s['compile_s_p90']:.2f} s, max {s['compile_s_max']:.2f} s.")
    if meta.get("resnet50_compile"):
        b = meta["resnet50_compile"]
        w(f"- ResNet50 compile time (default options, {b['input']}, median of {b['repeats']}): "
          f"**{b['wall_s']:.2f} s** wall, {b['cpu_s']:.2f} s CPU (target: under 2 s).")
    if meta.get("shards"):
        from .shards import summary_line
        w(f"- {summary_line(meta['shards'])}")
    if meta.get("load_avg"):
        w(f"- Load average of the machine during the run (shared with other jobs): {meta['load_avg']}; "
          "wall-clock times are inflated accordingly.")
    w("")
    w("### Seed architectures")
    w("")
    w("| model | status | compile s | reason |")
    w("|---|---|---|---|")
    for n in lists.SEED_MODELS:
        r = records.get(n)
        if r is None:
            w(f"| {n} | not run | | |")
        else:
            w(f"| {n} | {r['status']} | {_fmt_s(r.get('times', {}).get('compile_s'))} | {_esc(r.get('reason'))} |")
    w("")
    w("### Failures by cause")
    w("")
    w("| cause | models | meaning |")
    w("|---|---|---|")
    for c in CATEGORIES:
        if s["categories"].get(c):
            w(f"| {c} | {s['categories'][c]} | {CATEGORY_HELP[c]} |")
    if not s["categories"]:
        w("| (none) | 0 | |")
    w("")
    if s["unsupported_ops"]:
        w("Unsupported ops (from `UnsupportedOpError`):")
        w("")
        w("| op | models | examples |")
        w("|---|---|---|")
        by_op = defaultdict(list)
        for n in names:
            r = records.get(n)
            if r and r.get("category") == "unsupported-op":
                by_op[r.get("op")].append(n)
        for op, ms in sorted(by_op.items(), key=lambda kv: -len(kv[1])):
            w(f"| {_esc(op)} | {len(ms)} | {', '.join(ms[:6])}{' ...' if len(ms) > 6 else ''} |")
        w("")
    w("## Per-family pass rates")
    w("")
    w("| family | models | passed | failed | skipped | not run | pass rate | median compile s |")
    w("|---|---|---|---|---|---|---|---|")
    for f in fams:
        w(f"| {f['family']} | {f['models']} | {f['passed']} | {f['failed']} | {f['skipped']} | {f['not_run']} | "
          f"{100 * f['pass_rate']:.0f}% | {_fmt_s(f['compile_s_median'])} |")
    w("")
    w("## SRD vs zennit vs captum")
    w("")
    if psum:
        w(f"Measured by `{peers.get('command', 'python -m model_zoo_checks.peers')}` ({peers.get('generated', '')}) "
          "on the same models, weights and inputs (float64, one sample, target = argmax). zennit: "
          "`EpsilonPlusFlat` with `SequentialMergeBatchNorm` (zennit's general canonizer; its ResNet/VGG "
          "canonizers are written for torchvision's classes), initial relevance = the target logit. "
          "captum: `captum.attr.LRP` with its default rules. *Produced a map*: no exception and a map "
          "of the input's shape; *conserves*: |sum R^input - R^out| <= 1e-3 |R^out| (SRD: R^out = sum R^L).")
        w("")
        w("| method | models run | produced a map | finite map | conserves within 1e-3 |")
        w("|---|---|---|---|---|")
        for m, v in psum.items():
            w(f"| {m} | {v['run']} | {v['produced']} ({_pct(v['produced'], v['run'])}) | {v['finite']} | "
              f"{v['conserved']} ({_pct(v['conserved'], v['run'])}) |")
        w("")
        for m, v in psum.items():
            if v["errors"]:
                errs = ", ".join(f"{k or '?'} x{c}" for k, c in v["errors"].most_common(6))
                w(f"- {m} errors: {_esc(errs)}")
        w("")
    else:
        w("Not measured yet: run `python -m model_zoo_checks.peers --all --jobs 2`.")
        w("")
    w("## Every failure")
    w("")
    w("| model | family | cause | reason |")
    w("|---|---|---|---|")
    nf = 0
    for n in names:
        r = records.get(n)
        if r and r["status"] == "fail":
            nf += 1
            stale = " *(stale)*" if r.get("fingerprint") != fingerprint else ""
            w(f"| {n} | {r.get('family')} | {r['category']}{stale} | {_esc(r.get('reason'))[:400]} |")
    if not nf:
        w("| (none) | | | |")
    w("")
    skipped = [n for n in names if records.get(n, {}).get("status") == "skipped"]
    if skipped:
        w("## Skipped (too large for the sweep's parameter budget)")
        w("")
        for n in skipped:
            w(f"- {n}: {_esc(records[n].get('reason'))}")
        w("")
    not_run = [n for n in names if n not in records]
    if not_run:
        w(f"## Not run ({len(not_run)})")
        w("")
        w(", ".join(not_run))
        w("")
    w("## Per-model times")
    w("")
    w("<details><summary>every model: status, input size, parameters, build/compile/explain/total seconds</summary>")
    w("")
    w("| model | status | input | params (M) | build s | compile s | explain s | total s |")
    w("|---|---|---|---|---|---|---|---|")
    for n in names:
        r = records.get(n)
        if not r:
            continue
        t = r.get("times", {})
        p = r.get("params")
        size = "x".join(str(v) for v in r["input_size"][1:]) if r.get("input_size") else ""
        w(f"| {n} | {r['status']} | {size} | {'' if p is None else f'{p / 1e6:.1f}'} | {_fmt_s(t.get('build_s'))} | "
          f"{_fmt_s(t.get('compile_s'))} | {_fmt_s(t.get('explain_s'))} | {_fmt_s(r.get('wall_s', t.get('total_s')))} |")
    w("")
    w("</details>")
    w("")
    md_path.write_text("\n".join(L))
    doc = dict(meta=meta, summary=s, families=fams, peers_summary=_jsonable(psum),
               records=[records[n] for n in names if n in records], not_run=not_run)
    json_path.write_text(json.dumps(_jsonable(doc), indent=1, sort_keys=False))
    return s


def _jsonable(o):
    if isinstance(o, dict):
        return {str(k): _jsonable(v) for k, v in o.items()}
    if isinstance(o, (list, tuple)):
        return [_jsonable(v) for v in o]
    if isinstance(o, float) and not math.isfinite(o):
        return str(o)
    return o
