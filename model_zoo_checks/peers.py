"""The same zoo through zennit and captum LRP: does each produce a map, and does it conserve?

    python -m model_zoo_checks.peers --all --jobs 2

For every model of the selection (same weights, input and float64 as the SRD sweep; the first
sample only; target = argmax of the logits):

* zennit: ``EpsilonPlusFlat(canonizers=[SequentialMergeBatchNorm()])`` with the ``Gradient``
  attributor and initial relevance = the target logit (one-hot times the output).
  ``SequentialMergeBatchNorm`` is zennit's architecture-independent canonizer; its
  ``ResNetCanonizer``/``VGGCanonizer`` match torchvision's classes only, so they do not apply
  to timm models.
* captum: ``captum.attr.LRP(model).attribute(x, target, return_convergence_delta=True)`` with
  captum's default rules.

"Produced a map": the call returned an attribution of the input's shape (no exception).
"Conserves": ``|sum R^input - R^out| <= 1e-3 * |R^out|``.  Results are cached in
``.cache/peers.jsonl`` and summarised in the committed ``peers.json``; REPORT.md is rewritten
with the side-by-side table (the SRD column comes from the SRD sweep's records).  Only a run over
the whole default list writes those two; a partial selection (``--models``, ``--filter``, ...)
writes ``.cache/peers-partial.json`` and leaves the committed files alone.
"""
from __future__ import annotations

import argparse
import copy
import datetime
import json
import math
import os
import re
import shlex
import sys
import time
import traceback
from typing import Dict

from . import lists
from .cli import PARAMS_CACHE, add_arguments, options_from, select
from .report import PEER_TOL, PEERS_JSON, write_report
from .runner import (CACHE_DIR, SRD_CACHE, Options, append_cache, build_model, code_fingerprint, load_cache,
                     pick_input, run_models, with_threads)

PEERS_CACHE = CACHE_DIR / "peers.jsonl"


def _summarise_map(attr, x, r_out) -> Dict:
    import torch
    out = dict(produced=tuple(attr.shape) == tuple(x.shape), shape=list(attr.shape))
    out["finite"] = bool(torch.isfinite(attr).all())
    total = float(attr.sum())
    out["sum_R_input"] = total if math.isfinite(total) else str(total)
    out["R_out"] = r_out
    err = abs(total - r_out) / abs(r_out) if r_out != 0 else float("inf")
    out["conservation_rel_err"] = err if math.isfinite(err) else str(err)
    out["conserved"] = bool(out["produced"] and math.isfinite(err) and err <= PEER_TOL)
    out["all_zero"] = bool((attr == 0).all())
    return out


def _portable(text: str) -> str:
    """A traceback excerpt without this machine's paths: installed packages as
    ``site-packages/...``, files of this repository relative to its root."""
    text = re.sub(r'"[^"]*[/\\](site-packages|dist-packages)[/\\]', r'"\1/', text)
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    return text.replace(root + os.sep, "")


def _error(e: BaseException) -> Dict:
    first = str(e).strip().splitlines()[0] if str(e).strip() else ""
    return dict(produced=False, finite=False, conserved=False,
                error=f"{type(e).__name__}: {first[:300]}",
                where=_portable("".join(traceback.format_exception(type(e), e, e.__traceback__)[-2:]))[-600:])


def run_zennit(model, x1, target: int) -> Dict:
    import torch
    from zennit.attribution import Gradient
    from zennit.canonizers import SequentialMergeBatchNorm
    from zennit.composites import EpsilonPlusFlat
    t = time.perf_counter()
    try:
        composite = EpsilonPlusFlat(canonizers=[SequentialMergeBatchNorm()])
        with Gradient(model=model, composite=composite) as attributor:
            out, attr = attributor(x1.clone(), lambda y: y * torch.nn.functional.one_hot(
                torch.tensor([target]), y.shape[1]).to(y.dtype))
        r_out = float(out.detach()[0, target])
        rec = _summarise_map(attr.detach(), x1, r_out)
    except Exception as e:
        rec = _error(e)
    rec["time_s"] = time.perf_counter() - t
    return rec


def run_captum(model, x1, target: int) -> Dict:
    from captum.attr import LRP
    t = time.perf_counter()
    try:
        lrp = LRP(model)
        attr, delta = lrp.attribute(x1.clone().requires_grad_(True), target=target,
                                    return_convergence_delta=True)
        import torch
        with torch.no_grad():
            r_out = float(model(x1)[0, target])
        rec = _summarise_map(attr.detach(), x1, r_out)
        rec["captum_delta"] = float(delta.reshape(-1)[0])
    except Exception as e:
        rec = _error(e)
    rec["time_s"] = time.perf_counter() - t
    return rec


def check_peers(name: str, opts: Options) -> Dict:
    """zennit and captum LRP on one model (never raises)."""
    return with_threads(_check_peers, name, opts)


def _check_peers(name: str, opts: Options) -> Dict:
    rec: Dict = dict(model=name, module=lists.module_of(name), family=lists.family_of(name, lists.module_of(name)),
                     status="fail", category=None)
    try:
        model = build_model(name, opts)
        x, ref = pick_input(model, opts)
    except Exception as e:
        rec.update(category="build-error", reason=f"{type(e).__name__}: {str(e)[:300]}")
        return rec
    for p in model.parameters():
        p.requires_grad_(False)
    x1 = x[:1]
    target = int(ref[0].argmax())
    rec["input_size"] = list(x.shape[1:])
    # each method gets its own copy: a failed run may leave hooks or merged norms behind
    rec["zennit"] = run_zennit(copy.deepcopy(model), x1, target)
    rec["captum"] = run_captum(model, x1, target)
    rec["status"] = "pass"
    rec["category"] = "pass"
    return rec


#: where a run over part of the default list writes its records (the committed peers.json holds
#: the full sweep and is only written by a full one)
PEERS_PARTIAL = CACHE_DIR / "peers-partial.json"


def write_peers_json(names, peers: Dict[str, Dict], command: str, path=None) -> None:
    doc = dict(generated=datetime.datetime.now().strftime("%Y-%m-%d %H:%M"), command=command, tolerance=PEER_TOL,
               zennit="EpsilonPlusFlat(canonizers=[SequentialMergeBatchNorm()]), Gradient attributor, "
                      "initial relevance = target logit",
               captum="captum.attr.LRP default rules",
               records={n: {k: peers[n].get(k) for k in ("family", "input_size", "zennit", "captum", "reason")}
                        for n in names if n in peers})
    path = PEERS_JSON if path is None else path
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(doc, indent=1, default=str))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m model_zoo_checks.peers",
                                description="Run zennit (EpsilonPlusFlat) and captum LRP over the zoo selection "
                                            "and record whether each produces a map and conserves relevance.")
    add_arguments(p)
    args = p.parse_args(argv)
    opts = options_from(args)
    names = select(args)
    fp = code_fingerprint(opts)
    cache = {} if args.fresh else load_cache(PEERS_CACHE)
    todo = [] if args.report_only else [n for n in names if n not in cache or
                                        cache[n].get("options") != opts.key()]
    if len(todo) > 1 and PARAMS_CACHE.exists():
        counts = json.loads(PARAMS_CACHE.read_text())
        todo.sort(key=lambda n: (counts.get(n) is None, counts.get(n) or 0))
    print(f"peers: {len(names)} models, {len(todo)} to run", file=sys.stderr)

    def keep(rec):
        rec["options"] = opts.key()
        append_cache(rec, PEERS_CACHE)

    for r in (run_models(todo, opts, task="peers", jobs=args.jobs, on_record=keep, progress=not args.quiet,
                         desc="peers") if todo else []):
        cache[r["model"]] = r
    full = args.all or not (args.models or args.models_file or args.ci_subset or args.filter or args.sample)
    report_names = lists.default_models() if full else names
    cmd = "python -m model_zoo_checks.peers " + " ".join(shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:]))
    write_peers_json(report_names, cache, cmd.strip(), path=None if full else PEERS_PARTIAL)
    print(f"wrote {'model_zoo_checks/peers.json' if full else PEERS_PARTIAL} "
          + ("" if full else "(a partial run never replaces the committed peers.json)"), file=sys.stderr)
    for m in ("zennit", "captum"):
        got = [cache[n].get(m) for n in names if n in cache and cache[n].get(m)]
        print(f"{m}: produced {sum(g['produced'] for g in got)}/{len(got)}, conserved within {PEER_TOL:g}: "
              f"{sum(g['conserved'] for g in got)}", file=sys.stderr)
    if args.report is not False and full:
        srd = load_cache(SRD_CACHE)
        prev = {}
        from .runner import REPORT_JSON
        if REPORT_JSON.exists():
            try:
                prev = json.loads(REPORT_JSON.read_text()).get("meta", {})
            except json.JSONDecodeError:
                prev = {}
        write_report(report_names, {n: srd[n] for n in report_names if n in srd}, fingerprint=fp,
                     command=prev.get("command", "python -m model_zoo_checks --all --jobs 2"), meta=prev)
        print("rewrote model_zoo_checks/REPORT.md with the peer table", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
