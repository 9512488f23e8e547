"""Command line of the zoo sweep: ``python -m model_zoo_checks`` and ``srd-fx zoo`` share it."""
from __future__ import annotations

import argparse
import json
import os
import random
import shlex
import statistics
import sys
import time
from typing import Dict, List

from . import lists
from .runner import (CACHE_DIR, CI_SUBSET, REPORT_JSON, REPORT_MD, SRD_CACHE, Options, append_cache,
                     code_fingerprint, count_params_meta, load_cache, run_models)
from .shards import ShardWriter, merge, parse_shard, shard_files, shard_from_env, shard_names

PARAMS_CACHE = CACHE_DIR / "params.json"


def add_arguments(p: argparse.ArgumentParser) -> None:
    sel = p.add_argument_group("which models (default: --all)")
    sel.add_argument("--all", action="store_true",
                     help="Check every model of the selected groups (default: the CNN group, every timm CNN "
                          "architecture; see docs/zoo.md).")
    sel.add_argument("--groups", nargs="+", default=["cnn"], metavar="GROUP",
                     choices=list(lists.GROUPS) + ["tokens", "everything"],
                     help=f"Groups that --all, --filter and --sample draw from: {', '.join(lists.GROUPS)}; "
                          "'tokens' is every group but cnn, 'everything' all of timm (default: cnn).")
    sel.add_argument("--filter", action="append", default=[], metavar="PATTERN",
                     help="Only default-list names matching this shell pattern (e.g. 'resnet*'); repeatable.")
    sel.add_argument("--models", nargs="+", default=[], metavar="NAME",
                     help="Check exactly these timm model names (they need not be in the default list).")
    sel.add_argument("--models-file", metavar="PATH",
                     help="Check the names listed in this file (one per line, '#' comments).")
    sel.add_argument("--ci-subset", action="store_true",
                     help=f"Check the fixed fast subset that CI runs ({CI_SUBSET.name}).")
    sel.add_argument("--sample", type=int, default=0, metavar="N",
                     help="Check the N smallest models (by parameter count) of every family of the groups.")
    sel.add_argument("--sample-random", type=int, default=0, metavar="K",
                     help="Also check K more models of every family, drawn at random with --seed from "
                          "those within --max-params (after the --sample smallest).")
    sel.add_argument("--list", action="store_true",
                     help="Print the selected names with their family and timm module, and exit.")
    run = p.add_argument_group("how to run")
    run.add_argument("--jobs", type=int, default=2,
                     help="Worker processes running models in parallel (0: run in this process, no time limit).")
    run.add_argument("--timeout", type=float, default=900.0,
                     help="Per-model wall-clock limit in seconds; a model past it is killed and reported as a timeout.")
    run.add_argument("--threads", type=int, default=1, help="torch threads per worker process.")
    run.add_argument("--max-params", type=float, default=700.0, metavar="MILLIONS",
                     help="Skip (and report as 'skipped: too large') models with more parameters than this.")
    run.add_argument("--size", type=int, default=64,
                     help="Smallest input side tried; each model uses the smallest accepted size from here up.")
    run.add_argument("--seed", type=int, default=0, help="Seed of the weights and of the input.")
    run.add_argument("--raw-init", action="store_true",
                     help="Keep timm's initialisation as it is (zero-init residual gammas switch branches off).")
    run.add_argument("--shard", type=parse_shard, default=None, metavar="I/N",
                     help="Check only shard I of N of the selection (every N-th model from the I-th, 0 <= I < N) "
                          "and write its records to --shard-dir; under torchrun the shard is RANK/WORLD_SIZE.")
    cache = p.add_argument_group("cache and report")
    cache.add_argument("--fresh", action="store_true",
                       help="Ignore cached results and rerun every selected model.")
    cache.add_argument("--retry-failed", action="store_true",
                       help="Rerun only selected models whose latest result is not a pass (even if cached "
                            "with the current code); keep the cached passes.")
    cache.add_argument("--report-only", action="store_true",
                       help="Run nothing; rewrite REPORT.md and report.json from the cache.")
    cache.add_argument("--report", dest="report", action="store_true", default=None,
                       help="Write REPORT.md/report.json even for a partial selection (default: only for --all).")
    cache.add_argument("--no-report", dest="report", action="store_false",
                       help="Do not write REPORT.md/report.json.")
    cache.add_argument("--shard-dir", default=None, metavar="DIR",
                       help="Folder of the shard files (shard-I-of-N.jsonl) that --shard writes and "
                            "--report-only merges (default: the cache folder's shards/).")
    cache.add_argument("--cache-dir", default=None, metavar="DIR",
                       help=f"Folder of the record cache (default: {CACHE_DIR}).")
    cache.add_argument("--report-dir", default=None, metavar="DIR",
                       help="Folder to write REPORT.md and report.json into (default: model_zoo_checks/).")
    cache.add_argument("--no-compile-benchmark", action="store_true",
                       help="Do not time ResNet50's compile for the report.")
    cache.add_argument("--quiet", action="store_true", help="No progress bar.")


def options_from(args) -> Options:
    return Options(seed=args.seed, size=args.size, threads=args.threads, max_params_m=args.max_params,
                   raw_init=args.raw_init, timeout=args.timeout)


def param_counts(names: List[str]) -> Dict[str, int]:
    """Parameter counts (meta device), cached in .cache/params.json."""
    cache = json.loads(PARAMS_CACHE.read_text()) if PARAMS_CACHE.exists() else {}
    missing = [n for n in names if n not in cache]
    if missing:
        from tqdm import tqdm
        for n in tqdm(missing, desc="counting parameters", unit="model"):
            cache[n] = count_params_meta(n)
        PARAMS_CACHE.parent.mkdir(parents=True, exist_ok=True)
        PARAMS_CACHE.write_text(json.dumps(cache, indent=0))
    return {n: cache[n] for n in names}


def groups_of(args) -> List[str]:
    """The groups named by --groups ('tokens' and 'everything' expanded), in report order."""
    want = set(getattr(args, "groups", None) or ["cnn"])
    if "tokens" in want:
        want |= set(lists.TOKEN_GROUPS)
    if "everything" in want:
        want |= set(lists.GROUPS)
    return [g for g in lists.GROUPS if g in want]


def select(args) -> List[str]:
    groups = groups_of(args)
    default = lists.default_models() if groups == ["cnn"] else lists.models_of(groups)
    names: List[str] = []
    if args.models:
        names += args.models
    if args.models_file:
        names += lists.read_list(args.models_file)
    if args.ci_subset:
        names += lists.read_list(CI_SUBSET)
    if args.filter:
        names += lists.select(default, args.filter)
    if args.sample or getattr(args, "sample_random", 0):
        counts = param_counts(default)
        fam: Dict[str, List[str]] = {}
        for n in default:
            fam.setdefault(lists.family_of(n, lists.module_of(n)), []).append(n)
        rng = random.Random(args.seed)
        for f, ms in sorted(fam.items()):
            ms.sort(key=lambda n: (counts.get(n) is None, counts.get(n) or 0, n))
            names += ms[:args.sample]
            rest = sorted(n for n in ms[args.sample:] if (counts.get(n) or 0) <= args.max_params * 1e6)
            names += rng.sample(rest, min(getattr(args, "sample_random", 0), len(rest)))
    if args.all or not names:
        names += default
    seen, out = set(), []
    for n in names:
        if n not in seen:
            seen.add(n)
            out.append(n)
    return out


def compile_benchmark(name: str = "resnet50", repeats: int = 3) -> Dict:
    """Compile time of a timm model with default options (float32, 1x3x224x224 example, one torch
    thread: on a shared machine more threads only wait for each other); ``error`` when it does not
    compile."""
    import timm
    import torch
    import srd_fx
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        torch.manual_seed(0)
        m = timm.create_model(name, pretrained=False).eval()
        x = torch.randn(1, 3, 224, 224)
        walls, cpus = [], []
        for _ in range(repeats):
            t, c = time.perf_counter(), time.process_time()
            try:
                srd_fx.compile(m, example_input=x)
            except Exception as e:
                return dict(error=f"{type(e).__name__}: {str(e).strip().splitlines()[0][:300] if str(e).strip() else ''}",
                            measured=time.strftime("%Y-%m-%d %H:%M"))
            walls.append(time.perf_counter() - t)
            cpus.append(time.process_time() - c)
    finally:
        torch.set_num_threads(before)
    return dict(wall_s=statistics.median(walls), cpu_s=statistics.median(cpus), repeats=repeats,
                input="float32 1x3x224x224", threads=1, all_wall_s=walls, measured=time.strftime("%Y-%m-%d %H:%M"),
                load_avg=f"{os.getloadavg()[0]:.1f}")


#: the models whose compile time the report gives (the targets: under 2 s each)
COMPILE_BENCHMARKS = {"cnn": "resnet50", "transformer": "vit_small_patch16_224"}


def selected_subset(args) -> bool:
    return bool(args.models or args.models_file or args.ci_subset or args.filter or args.sample
                or getattr(args, "sample_random", None))


def run(args) -> int:
    from srd_fx.errors import SRDError
    try:
        return _run(args)
    except SRDError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


def _run(args) -> int:
    from pathlib import Path
    if not (args.all or selected_subset(args) or args.list or args.report_only):
        n = len(lists.default_models())
        print(f"Without a selection this would check all {n} timm CNN architectures of the default list "
              "(hours of CPU time; the latest full sweep's report is model_zoo_checks/REPORT.md). "
              "Pass --all to run that sweep, or choose models with --models NAME..., --filter 'resnet*', "
              "--ci-subset or --sample N; --list prints a selection without running it.", file=sys.stderr)
        return 2
    opts = options_from(args)
    names = select(args)
    cache_dir = Path(args.cache_dir) if args.cache_dir else CACHE_DIR
    srd_cache = cache_dir / "srd.jsonl"
    shard_dir = Path(args.shard_dir) if args.shard_dir else cache_dir / "shards"
    report_dir = Path(args.report_dir) if args.report_dir else REPORT_MD.parent
    shard = args.shard or (None if args.report_only or args.list else shard_from_env())
    merged = None
    if args.report_only and shard_files(shard_dir):
        # merge the shard files: their header names the selection, their records the results
        names, shard_recs, merged = merge(shard_dir)
    writer = None
    if shard is not None:
        writer = ShardWriter(shard_dir, shard[0], shard[1], names, code_fingerprint(opts), opts.key())
        writer.check()
        names = shard_names(names, *shard)
    if args.list:
        for n in names:
            print(f"{n}\t{lists.family_of(n, lists.module_of(n))}\t{lists.module_of(n)}")
        print(f"# {len(names)} models", file=sys.stderr)
        return 0
    full = args.all or not selected_subset(args)
    if merged is not None:
        full = set(names) == set(lists.default_models())
    write = full if args.report is None else args.report
    if merged is not None and args.report is None:
        write = True
    if writer is not None:
        write = bool(args.report)  # a shard writes its records; --report-only merges them into one report
    fp = code_fingerprint(opts)
    cache = {} if args.fresh else load_cache(srd_cache)
    if merged is not None:
        cache = shard_recs
    if writer is not None and not args.fresh:
        cache.update(writer.earlier())
    if args.report_only:
        todo = []
    elif args.retry_failed:
        todo = [n for n in names if cache.get(n, {}).get("status") != "pass"]
    else:
        todo = [n for n in names if cache.get(n, {}).get("fingerprint") != fp or args.fresh]
    if len(todo) > 1 and PARAMS_CACHE.exists():
        # smallest first: most of the list is covered early, the giants run last
        counts = json.loads(PARAMS_CACHE.read_text())
        todo.sort(key=lambda n: (counts.get(n) is None, counts.get(n) or 0))
    print(f"{len(names)} models selected, {len(names) - len(todo)} from the cache, {len(todo)} to run "
          f"(jobs={args.jobs}, timeout={args.timeout:.0f}s, fingerprint {fp})", file=sys.stderr)
    load0 = os.getloadavg()
    t0 = time.perf_counter()
    cmd = "python -m model_zoo_checks " + " ".join(shlex.quote(a) for a in sys.argv[1:]) \
        if sys.argv and "model_zoo_checks" in " ".join(sys.argv[:1] + sys.argv[1:2]) else "python -m model_zoo_checks --all"
    run_stamp = dict(command=cmd, started=time.strftime("%Y-%m-%d %H:%M"))

    def on_record(rec):
        rec["run"] = run_stamp      # which run produced the record (REPORT.md lists the runs)
        append_cache(rec, srd_cache)
        if writer is not None:
            writer.add(rec)

    if writer is not None:
        writer.start([cache[n] for n in names if n in cache and n not in todo])
    results = run_models(todo, opts, jobs=args.jobs, on_record=on_record, progress=not args.quiet,
                         desc="srd zoo" if writer is None else f"srd zoo shard {shard[0]}/{shard[1]}") if todo else []
    if writer is not None:
        writer.finish()
        print(f"wrote {writer.path} ({len(names)} models of {len(writer.header['names'])})", file=sys.stderr)
    for r in results:
        cache[r["model"]] = r
    recs = {n: cache[n] for n in names if n in cache}
    n_pass = sum(r["status"] == "pass" for r in recs.values())
    n_fail = sum(r["status"] == "fail" for r in recs.values())
    print(f"passed {n_pass}/{len(names)}, failed {n_fail}, skipped "
          f"{sum(r['status'] == 'skipped' for r in recs.values())}, not run {len(names) - len(recs)} "
          f"({time.perf_counter() - t0:.0f} s)", file=sys.stderr)
    for r in recs.values():
        if r["status"] == "fail":
            print(f"  FAIL {r['model']}: [{r['category']}] {r.get('reason')}", file=sys.stderr)
    if write:
        from .report import write_report
        meta = dict(load_avg=f"{load0[0]:.1f} at start, {os.getloadavg()[0]:.1f} at end",
                    options=opts.key(), max_params_m=opts.max_params_m, timeout_s=opts.timeout,
                    jobs=args.jobs, threads=args.threads)
        if merged is not None:
            meta["shards"] = merged
        meta["compile_benchmarks"] = {} if args.report_only or args.no_compile_benchmark else {
            COMPILE_BENCHMARKS[g]: compile_benchmark(COMPILE_BENCHMARKS[g]) for g in groups_of(args)
            if g in COMPILE_BENCHMARKS}
        report_dir.mkdir(parents=True, exist_ok=True)
        # the records of this selection are merged over the ones already in report_dir's report.json
        write_report(names, {n: cache[n] for n in names if n in cache}, fingerprint=fp, command=cmd,
                     meta=None if args.report_only and merged is None else meta,
                     md_path=report_dir / REPORT_MD.name, json_path=report_dir / REPORT_JSON.name)
        print(f"wrote {report_dir / REPORT_MD.name} and {report_dir / REPORT_JSON.name}", file=sys.stderr)
        if merged is not None and (merged["missing"] or merged["incomplete"]):
            from .shards import summary_line
            print(summary_line(merged).replace("**", ""), file=sys.stderr)
    return 0 if n_fail == 0 and len(recs) == len(names) else 1


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m model_zoo_checks",
                                description="Compile every timm CNN with srd_fx and check the explainer "
                                            "(float64): logits, conservation, finiteness, batch independence.")
    add_arguments(p)
    return run(p.parse_args(argv))
