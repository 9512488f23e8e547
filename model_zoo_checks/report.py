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


def load_committed(json_path: Path = REPORT_JSON):
    """(records, meta) of the committed report.json: the results of earlier sweeps, which a report
    written from a partial run keeps.  An older flat ``meta`` (one CNN sweep) becomes
    ``meta["groups"]["cnn"]``."""
    if not json_path.exists():
        return {}, dict(groups={}, compile_benchmarks={})
    try:
        doc = json.loads(json_path.read_text())
    except json.JSONDecodeError:
        return {}, dict(groups={}, compile_benchmarks={})
    recs = {r["model"]: r for r in doc.get("records", []) if isinstance(r, dict) and "model" in r}
    meta = doc.get("meta", {})
    if "groups" not in meta:
        old = {k: v for k, v in meta.items() if k not in ("resnet50_compile", "resnet50_compile_error")}
        meta = dict(groups={"cnn": old} if old else {},
                    compile_benchmarks={"resnet50": meta["resnet50_compile"]} if meta.get("resnet50_compile") else {})
    meta.setdefault("groups", {})
    meta.setdefault("compile_benchmarks", {})
    return recs, meta


def family_estimate(names: Sequence[str], records: Dict[str, Dict]) -> float:
    """Expected number of passing models when each family's unchecked models (not run or skipped for
    size) pass at the rate of that family's checked ones; a family with no checked model counts 0."""
    est = 0.0
    for f in family_table(names, records):
        checked = f["passed"] + f["failed"]
        if checked:
            est += f["passed"] + (f["not_run"] + f["skipped"]) * f["passed"] / checked
    return est


def _group_row(g: str, names: Sequence[str], records: Dict[str, Dict], fingerprint: str) -> Dict:
    s = summarise(names, records, fingerprint)
    s["raw_exceptions"] = s["categories"].get("exception", 0)
    s["group"] = g
    return s


def _fail_tables(w, names: Sequence[str], records: Dict[str, Dict], s: Dict) -> None:
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


def _family_rows(w, names: Sequence[str], records: Dict[str, Dict]) -> None:
    w("| family | models | passed | failed | skipped | not run | pass rate | pass rate of the checked | median compile s |")
    w("|---|---|---|---|---|---|---|---|---|")
    for f in family_table(names, records):
        checked = f["passed"] + f["failed"]
        w(f"| {f['family']} | {f['models']} | {f['passed']} | {f['failed']} | {f['skipped']} | {f['not_run']} | "
          f"{100 * f['pass_rate']:.0f}% | {_pct(f['passed'], checked)} | {_fmt_s(f['compile_s_median'])} |")
    w("")


def _compile_line(model: str, b: Dict) -> str:
    if b.get("error"):
        return f"- {model} compile time: not measured, compile fails on this code ({_esc(b['error'])[:200]})."
    return (f"- {model} compile time (default options, {b['input']}, median of {b['repeats']}, "
            f"{b.get('threads', 1)} thread): **{b['wall_s']:.2f} s** wall, {b['cpu_s']:.2f} s CPU "
            f"(target: under 2 s; measured {b.get('measured', '?')}).")


def _runs_section(w, records: Dict[str, Dict], M: Dict) -> None:
    """The runs that produced the records: each record carries the command and start time of its
    run (``"run"``, stamped by the CLI); records older than the stamp are counted together, with
    the last run recorded for their group."""
    runs: Dict[tuple, Counter] = {}
    for n, r in records.items():
        stamp = r.get("run") or {}
        key = (stamp.get("started", ""), stamp.get("command", ""), r.get("fingerprint", "?"))
        runs.setdefault(key, Counter())[lists.group_of(n)] += 1
    w("Runs that produced the records (command, start, code fingerprint, records per group):")
    w("")
    for (started, command, fp), per_group in sorted(runs.items(), key=lambda kv: (kv[0][0] == "", kv[0])):
        counts = ", ".join(f"{g} {k}" for g, k in sorted(per_group.items()))
        if command:
            w(f"- Run `{_esc(command)}` ({started}, fingerprint `{fp}`): {counts}")
        else:
            w(f"- Run not recorded: {counts} records with fingerprint `{fp}` from runs before the records named their run")
    older = {g: gm for g, gm in M.get("groups", {}).items()
             if any(not r.get("run") and lists.group_of(n) == g for n, r in records.items())}
    for command in dict.fromkeys(gm.get("command") for gm in older.values() if gm.get("command")):
        groups = [g for g, gm in older.items() if gm.get("command") == command]
        gm = older[groups[0]]
        w(f"- Run recorded last for the {', '.join(groups)} group{'s' if len(groups) > 1 else ''} before that: "
          f"`{_esc(command)}` ({gm.get('generated', '?')}"
          + (f"; load average {gm['load_avg']}" if gm.get("load_avg") else "") + ")")
    for g, gm in M.get("groups", {}).items():    # a sharded run: which shards were merged, which are missing
        if gm.get("shards"):
            from .shards import summary_line
            w(f"- {summary_line(gm['shards'])} ({g} group, its last run)")
    w("")


def write_report(names: Sequence[str], records: Dict[str, Dict], *, fingerprint: str, command: str,
                 meta: Optional[Dict] = None, md_path: Path = REPORT_MD, json_path: Path = REPORT_JSON) -> Dict:
    """Rewrite REPORT.md and report.json over every timm architecture, by group.

    ``records`` (this run's, or the cache's) are merged over the committed report.json records, so
    a run of one group (or of a sample) never loses another group's results.  ``meta`` describes the
    run of ``names``: it is stored for the groups those names belong to (a ``meta`` that already has
    ``"groups"`` is a whole earlier meta and replaces nothing); its ``"compile_benchmarks"``
    are merged by model."""
    import timm
    import torch
    old_recs, M = load_committed(json_path)
    records = {**old_recs, **{n: r for n, r in records.items() if r}}
    now = datetime.datetime.now().strftime("%Y-%m-%d %H:%M")
    if meta is None:             # a rewrite from the records (--report-only): the runs stay as they were
        pass
    elif "groups" in meta:
        M = dict(meta)
        M.setdefault("compile_benchmarks", {})
    else:
        meta = dict(meta)
        benches = meta.pop("compile_benchmarks", {})
        M["compile_benchmarks"].update(benches)
        run_groups = sorted({lists.group_of(n) for n in names if n in records})
        for g in run_groups:
            # the code that produced the group's records of this run (their own fingerprint)
            fps = Counter(records[n].get("fingerprint") for n in names if n in records and lists.group_of(n) == g)
            M["groups"][g] = dict(meta, generated=now, command=command, selected=sum(
                lists.group_of(n) == g for n in names), fingerprint=fps.most_common(1)[0][0] or fingerprint)
    M.update(timm=timm.__version__, torch=torch.__version__, python=platform.python_version(),
             cpus=os.cpu_count(), fingerprint=fingerprint, generated=now,
             tolerances=dict(logits=LOGITS_TOL, conservation=CONSERVATION_TOL, batch=BATCH_TOL))

    by_group: Dict[str, List[str]] = {g: [] for g in lists.GROUPS}
    for n in sorted(set(timm.list_models()) | set(records)):
        by_group[lists.group_of(n)].append(n)
    every = [n for g in lists.GROUPS for n in by_group[g]]
    rows = {g: _group_row(g, by_group[g], records, fingerprint) for g in lists.GROUPS}
    tok = [n for g in lists.TOKEN_GROUPS for n in by_group[g]]
    tok_s = summarise(tok, records, fingerprint)
    all_s = summarise(every, records, fingerprint)

    cnn = by_group["cnn"]
    s = rows["cnn"]
    fams = family_table(cnn, records)
    peers = json.loads(PEERS_JSON.read_text()) if PEERS_JSON.exists() else {}
    if peers.get("records"):
        for n, pr in peers["records"].items():
            pr["srd"] = srd_entry(records.get(n))
    psum = _peer_summary([n for n in cnn if n in peers.get("records", {})], peers)

    L: List[str] = []
    w = L.append
    w("# srd_fx model-zoo report")
    w("")
    w(f"Produced by the runs listed under the summary; written {now} (timm {timm.__version__}, torch "
      f"{torch.__version__}, {os.cpu_count()} CPU cores; current code fingerprint `{fingerprint}`).")
    w("")
    w(f"Every architecture of timm {timm.__version__} ({len(every)}), in five groups. How the lists and groups are "
      "derived and what each check means: [docs/zoo.md](../docs/zoo.md). Per-model numbers: [report.json](report.json).")
    w("")
    w("## Summary by group")
    w("")
    w("| group | what | models | checked | passed | failed | skipped | not run | pass rate of the group | "
      "pass rate of the checked | raw exceptions |")
    w("|---|---|---|---|---|---|---|---|---|---|---|")
    for g in lists.GROUPS + ("tokens", "all"):
        r = rows.get(g) or (tok_s if g == "tokens" else all_s)
        what = lists.GROUP_HELP.get(g, "transformer + hybrid + mlp + other" if g == "tokens" else "all of timm")
        name = f"**{g}**" if g in ("tokens", "all") else g
        w(f"| {name} | {what} | {r['total']} | {r['passed'] + r['failed']} | {r['passed']} | {r['failed']} | "
          f"{r['skipped']} | {r['not_run']} | {_pct(r['passed'], r['total'])} | "
          f"{_pct(r['passed'], r['passed'] + r['failed'])} | {r['categories'].get('exception', 0)} |")
    w("")
    w(f"- Checks (float64, the same for every group): compile; logits relative error <= {LOGITS_TOL:g}; "
      f"|sum R^input + lost - sum R^L| <= {CONSERVATION_TOL:g} * sum|R^L| per sample; every map finite "
      f"(`layers=\"all\"`) and in the input's orientation (saliency (B, H, W), layers (B, N) or (B, h, w)); "
      f"batch of 2 equals the samples alone (relative error <= {BATCH_TOL:g}). *Pass rate of the group* counts "
      "models not run as not passed; *pass rate of the checked* is over the models that passed or failed.")
    checked_tok = tok_s["passed"] + tok_s["failed"]
    w(f"- Token groups: **{checked_tok} of {tok_s['total']} architectures checked so far "
      f"({_pct(checked_tok, tok_s['total'])})**, {tok_s['passed']} passed "
      f"({_pct(tok_s['passed'], checked_tok)} of the checked). The checked ones are a sample (see the runs below), "
      "not the whole groups: the pass rate of the checked is an estimate, and the smallest models of a family "
      "need not be representative of the family. The full sweep: "
      "`python -m model_zoo_checks --all --groups tokens --jobs N --report`.")
    est_tok = sum(family_estimate(by_group[g], records) for g in lists.TOKEN_GROUPS)
    est_all = est_tok + family_estimate(by_group["cnn"], records)
    w(f"- Family-weighted estimate (an extrapolation, not a measurement): if each family's unchecked models "
      f"pass at the rate of its checked ones (a family with none checked counts 0), about **{est_tok:.0f} of "
      f"{tok_s['total']} token architectures ({_pct(round(est_tok), tok_s['total'])})** and **{est_all:.0f} of "
      f"{len(every)} timm architectures ({_pct(round(est_all), len(every))})** would pass.")
    raw = [n for n in every if records.get(n, {}).get("category") == "exception"]
    w(f"- Raw (non-srd_fx) exceptions: {len(raw)}" + (
        f" — each a bug in srd_fx: {', '.join(raw[:12])}{' ...' if len(raw) > 12 else ''}." if raw else
        " (every failure is a named srd_fx error, a timeout or a build error)."))
    for model, b in sorted(M.get("compile_benchmarks", {}).items()):
        w(_compile_line(model, b))
    w("")
    _runs_section(w, records, M)
    stale = {g: rows[g]["stale"] for g in lists.GROUPS if rows[g]["stale"]}
    if stale:
        w(f"- Records from an older version of the compiler (fingerprint differs from the current one): "
          f"{', '.join(f'{g} {k}' for g, k in stale.items())}; rerun to refresh them.")
    w("")

    w("## CNN group (the default list)")
    w("")
    w(f"- Models: **{s['total']}** timm CNN architectures in **{s['families']}** families.")
    w(f"- **Passed {s['passed']} / {s['total']} = {_pct(s['passed'], s['total'])}** "
      f"(failed {s['failed']}, skipped as too large {s['skipped']}, not run {s['not_run']}). "
      f"Of the models actually checked: {_pct(s['passed'], s['passed'] + s['failed'])}.")
    lost = [(n, records[n]["metrics"].get("lost_frac")) for n in every
            if records.get(n, {}).get("status") == "pass" and (records[n].get("metrics") or {}).get("lost_frac")]
    lost = sorted(((n, f) for n, f in lost if f and f > CONSERVATION_TOL), key=lambda t: -t[1])
    w(f"- *lost* is the relevance SRD drops, per docs/method.md \"Lost relevance and conservation\", where a position's PFV norm "
      "or its bias-share denominator D_j is zero (`out.lost`); the check verifies that it accounts for the "
      f"whole imbalance. Passing models (any group) with lost > {CONSERVATION_TOL:g} * sum|R^L|: {len(lost)}"
      + (f" (largest: {', '.join(f'{n} {100 * f:.2f}%' for n, f in lost[:5])})." if lost else "."))
    if s["compile_s_median"] is not None:
        w(f"- Compile time (`srd_fx.compile(model, layers=\"all\", example_input=x)`, wall clock): median "
          f"{s['compile_s_median']:.2f} s, 90th percentile {s['compile_s_p90']:.2f} s, max {s['compile_s_max']:.2f} s.")
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
    _fail_tables(w, cnn, records, s)
    w("### Per-family pass rates")
    w("")
    w("| family | models | passed | failed | skipped | not run | pass rate | median compile s |")
    w("|---|---|---|---|---|---|---|---|")
    for f in fams:
        w(f"| {f['family']} | {f['models']} | {f['passed']} | {f['failed']} | {f['skipped']} | {f['not_run']} | "
          f"{100 * f['pass_rate']:.0f}% | {_fmt_s(f['compile_s_median'])} |")
    w("")
    w("### SRD vs zennit vs captum")
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

    w("## Token groups")
    w("")
    for g in lists.TOKEN_GROUPS:
        names_g, r = by_group[g], rows[g]
        w(f"### {g}: {lists.GROUP_HELP[g]}")
        w("")
        w(f"{r['total']} architectures in {r['families']} families (timm modules); checked {r['passed'] + r['failed']}"
          f" ({_pct(r['passed'] + r['failed'], r['total'])}), passed {r['passed']} "
          f"({_pct(r['passed'], r['passed'] + r['failed'])} of the checked), skipped {r['skipped']}, "
          f"not run {r['not_run']}.")
        w("")
        if r["passed"] + r["failed"]:
            _fail_tables(w, names_g, records, r)
        _family_rows(w, names_g, records)
    w(_token_peer_section())

    w("## Every failure")
    w("")
    w("| model | group | family | cause | reason |")
    w("|---|---|---|---|---|")
    nf = 0
    for n in every:
        r = records.get(n)
        if r and r["status"] == "fail":
            nf += 1
            st = " *(stale)*" if r.get("fingerprint") != fingerprint else ""
            w(f"| {n} | {lists.group_of(n)} | {r.get('family')} | {r['category']}{st} | {_esc(r.get('reason'))[:400]} |")
    if not nf:
        w("| (none) | | | | |")
    w("")
    skipped = [n for n in every if records.get(n, {}).get("status") == "skipped"]
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
    w("<details><summary>every checked model: status, input size, parameters, build/compile/explain/total seconds</summary>")
    w("")
    w("| model | group | status | input | params (M) | build s | compile s | explain s | total s |")
    w("|---|---|---|---|---|---|---|---|---|")
    for n in every:
        r = records.get(n)
        if not r:
            continue
        t = r.get("times", {})
        p = r.get("params")
        size = "x".join(str(v) for v in r["input_size"][1:]) if r.get("input_size") else ""
        w(f"| {n} | {lists.group_of(n)} | {r['status']} | {size} | {'' if p is None else f'{p / 1e6:.1f}'} | "
          f"{_fmt_s(t.get('build_s'))} | {_fmt_s(t.get('compile_s'))} | {_fmt_s(t.get('explain_s'))} | "
          f"{_fmt_s(r.get('wall_s', t.get('total_s')))} |")
    w("")
    w("</details>")
    w("")
    md_path.write_text("\n".join(L))
    # "summary", meta "command" and "resnet50_compile" keep their CNN meaning (benchmarks/bench.py reads them)
    M["command"] = (M["groups"].get("cnn") or {}).get("command")
    M["resnet50_compile"] = M["compile_benchmarks"].get("resnet50")
    doc = dict(meta=M, summary=s, summary_by_group=dict(all=all_s, tokens=tok_s, **rows),
               family_weighted_estimate=dict(tokens=round(est_tok, 1), all=round(est_all, 1)), families={
        g: family_table(by_group[g], records) for g in lists.GROUPS}, peers_summary=_jsonable(psum),
        records=[records[n] for n in every if n in records],
        not_run=sorted(n for n in every if n not in records))
    json_path.write_text(json.dumps(_jsonable(doc), indent=1, sort_keys=False))
    return s


TOKEN_PEERS_JSON = HERE / "peers_tokens.json"
TOKEN_PEER_METHODS = ("srd", "lxt_attnlrp", "lxt_cplrp", "zennit_lrp", "ixg")
TOKEN_MAP_METHODS = ("srd", "lxt_attnlrp", "lxt_cplrp", "zennit_lrp")
TOKEN_PEER_LABELS = {"srd": "SRD (srd_fx)", "ixg": "input×gradient", "lxt_attnlrp": "LXT AttnLRP",
                     "lxt_cplrp": "LXT CP-LRP", "zennit_lrp": "zennit EpsilonPlusFlat"}
TOKEN_PEER_TARGET_RATIO = 1.5


def _token_peer_section() -> str:
    """The token-model peer table (LXT, zennit, SRD vs input x gradient) from peers_tokens.json."""
    if not TOKEN_PEERS_JSON.exists():
        return ("## Token models: SRD vs LXT vs zennit\n\nNot measured yet: run "
                "`python -m model_zoo_checks.peers_tokens`.\n")
    return token_peers_markdown(json.loads(TOKEN_PEERS_JSON.read_text()))


def token_peers_markdown(doc: Dict) -> str:
    """The REPORT.md section of peers_tokens.json (model_zoo_checks/peers_tokens.py)."""
    L: List[str] = ["## Token models: SRD vs LXT vs zennit", ""]
    w = L.append
    maps = doc.get("maps") or {}
    if maps:
        w(f"Measured by `{doc.get('maps_command', '')}` ({doc.get('maps_generated', '')}) on {len(maps)} token models "
          f"(float64, the zoo's weights and input, one sample, target = argmax; see model_zoo_checks/peers_tokens.py "
          f"for each method's setting). *Map*: a finite map of the input's shape, no exception; *conserves*: "
          f"|sum R^input - R^out| <= {PEER_TOL:g} |R^out| (R^out = the target logit; SRD: sum R^L - lost).")
        w("")
        w("| method | models | produced a map | conserves within 1e-3 | most common error |")
        w("|---|---|---|---|---|")
        from collections import Counter
        for m in TOKEN_MAP_METHODS:
            got = [maps[n][m] for n in maps if m in maps[n]]
            if not got:
                continue
            errs = Counter((g.get("error") or "").split(":")[0] for g in got if g.get("error"))
            top = ", ".join(f"{k} x{c}" for k, c in errs.most_common(2))
            w(f"| {TOKEN_PEER_LABELS[m]} | {len(got)} | {sum(bool(g.get('produced')) for g in got)} "
              f"({_pct(sum(bool(g.get('produced')) for g in got), len(got))}) | "
              f"{sum(bool(g.get('conserved')) for g in got)} ({_pct(sum(bool(g.get('conserved')) for g in got), len(got))}) | "
              f"{top} |")
        w("")
        w("<details><summary>per model: conservation error |sum R^input - R^out| / |R^out| (or the error)</summary>")
        w("")
        w("| model | " + " | ".join(TOKEN_PEER_LABELS[m] for m in TOKEN_MAP_METHODS) + " |")
        w("|---|" + "---|" * len(TOKEN_MAP_METHODS))
        for n in sorted(maps):
            cells = []
            for m in TOKEN_MAP_METHODS:
                g = maps[n].get(m) or {}
                if g.get("error"):
                    cells.append(str(g["error"]).replace("|", "\\|")[:80])
                elif isinstance(g.get("conservation_rel_err"), (int, float)):
                    cells.append(f"{g['conservation_rel_err']:.1e}")
                else:
                    cells.append(str(g.get("conservation_rel_err", "")))
            w(f"| {n} | " + " | ".join(cells) + " |")
        w("")
        w("</details>")
        w("")
    tim = doc.get("timing") or {}
    if tim:
        s = doc.get("timing_settings", {})
        w(f"Cost next to input×gradient, measured by `{doc.get('timing_command', '')}` ({doc.get('timing_generated', '')}; "
          f"batch {s.get('batch')}, {s.get('size')}x{s.get('size')}, float32, CPU, {s.get('threads')} thread(s), "
          f"parameters frozen; all methods of a model timed in one process, interleaved: {s.get('warmup')} untimed "
          f"round(s), then the median of {s.get('repeats')} rounds (a model measured by another command says so "
          f"below the table); *CPU s* is the process's CPU time of the call (all "
          f"threads), which other jobs on the machine disturb less than the wall clock; peak memory = extra resident "
          f"memory of one call in a fresh process, as benchmarks/bench.py measures it). Target for SRD: <= "
          f"{TOKEN_PEER_TARGET_RATIO:g}x input×gradient in time and in memory.")
        w("")
        w("| model | method | wall s | × ixg | CPU s | × ixg | peak MiB | × ixg memory | measured (load average) |")
        w("|---|---|---|---|---|---|---|---|---|")

        def ratio(r, ref, key):
            v, v0 = r.get(key), ref.get(key)
            return f"{v / v0:.2f}" if isinstance(v, (int, float)) and isinstance(v0, (int, float)) and v0 else ""

        def num(v, fmt):
            return format(v, fmt) if isinstance(v, (int, float)) else ""

        for n, rows in tim.items():
            ref = rows.get("ixg", {})
            for m in TOKEN_PEER_METHODS:
                r = rows.get(m)
                if r is None:
                    continue
                if r.get("error"):
                    w(f"| {n} | {TOKEN_PEER_LABELS[m]} | {str(r['error']).replace('|', '/')[:120]} | | | | | | "
                      f"{r.get('measured', '')} |")
                    continue
                w(f"| {n} | {TOKEN_PEER_LABELS[m]} | {num(r.get('median_s'), '.3f')} | {ratio(r, ref, 'median_s')} | "
                  f"{num(r.get('cpu_median_s'), '.3f')} | {ratio(r, ref, 'cpu_median_s')} | {num(r.get('peak_mb'), '.0f')} | "
                  f"{ratio(r, ref, 'peak_mb')} | {r.get('measured', '')} ({r.get('load_avg', '?')}) |")
        w("")
        for n, rows in tim.items():
            if rows.get("_command") and rows["_command"] != doc.get("timing_command"):
                w(f"- {n}: `{rows['_command']}` ({(rows.get('_settings') or {}).get('repeats')} rounds after "
                  f"{(rows.get('_settings') or {}).get('warmup')})")
        w("")
    if not maps and not tim:
        w("Not measured yet: run `python -m model_zoo_checks.peers_tokens`.")
        w("")
    return "\n".join(L)


def _jsonable(o):
    if isinstance(o, dict):
        return {str(k): _jsonable(v) for k, v in o.items()}
    if isinstance(o, (list, tuple)):
        return [_jsonable(v) for v in o]
    if isinstance(o, float) and not math.isfinite(o):
        return str(o)
    return o
