"""``srd-fx evaluate``: the paper's comparisons (Table 2, Table 4, Fig. 3) on digit scenes or on an
image folder with masks."""
from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import platform
import shlex
import sys
import time

from ..args import add_cache_dir, add_dist_timeout, add_train_settings

NAME = "evaluate"
HELP = ("Score SRD (low, high, input resolution) and 14 baseline maps with the paper's metrics; write a "
        "Table-2-style table (methods x metrics), a Table-4-style table (Fidelity across activations) and "
        "a figure of maps.")

DEFAULT_TABLE2 = ["resnet:relu", "vgg:relu"]
DEFAULT_TABLE4 = [f"resnet:{a}" for a in ("relu", "elu", "leakyrelu", "silu", "gelu", "tanh")]
ACT_LABELS = {"relu": "ReLU", "elu": "ELU", "leakyrelu": "LeakyReLU", "silu": "Swish", "gelu": "GELU", "tanh": "Tanh"}


def add_arguments(p):
    p.add_argument("--data", default="digits",
                   help="'digits' (digit scenes, built locally) or the root of an image folder "
                        "root/<class>/<image> (ImageNet-S50 layout); default: digits.")
    p.add_argument("--masks", default=None,
                   help="Mask folder masks/<class>/<image stem>.png for --data PATH (ImageNet-S "
                        "R+256G codes or non-zero pixels).")
    p.add_argument("--class-index", default=None,
                   help="JSON file mapping class folder -> model output index (default: sorted folder order).")
    p.add_argument("--size", type=int, default=None,
                   help="Input side in pixels (default 64 for digits, 224 for a folder).")
    p.add_argument("--models", nargs="+", default=None, metavar="MODEL",
                   help="Models of the Table-2 comparison. Digits: ARCH:ACT with ARCH in {resnet, vgg, vit, "
                        "mixer} (trained here and cached; vit:gelu and mixer:gelu are the token models, "
                        "compared with their own methods, see docs/evaluation.md); folder: torchvision:NAME or timm:NAME. "
                        "Default: resnet:relu vgg:relu. 'none' skips Table 2.")
    p.add_argument("--table4-models", nargs="+", default=None, metavar="MODEL",
                   help="Models of the Table-4 comparison (Fidelity per activation). Default: the six "
                        "digit ResNets (relu elu leakyrelu silu gelu tanh); 'none' skips it.")
    p.add_argument("--weights", default=None,
                   help="State-dict file for the (single) torchvision/timm model given with --models.")
    p.add_argument("--num-classes", type=int, default=None,
                   help="Classifier size of a torchvision/timm model (default: from --weights, else the library's).")
    p.add_argument("--pretrained", action="store_true",
                   help="Use the library's pretrained weights for torchvision/timm models (needs them cached or network access).")
    p.add_argument("--methods", nargs="+", default=None,
                   help="Methods to compare (default: every method for CNNs, srd_fx.eval.baselines.TOKEN_METHODS "
                        "for token models; see srd_fx.eval.baselines.METHODS).")
    p.add_argument("--metrics", nargs="+", default=None,
                   help="Table-2 metrics (default: Pointing Attribution Sparseness Fidelity Stability).")
    p.add_argument("--n-images", type=int, default=200, help="Number of test images (default 200).")
    p.add_argument("--batch-size", type=int, default=50, help="Images per batch (default 50).")
    p.add_argument("--seed", type=int, default=0, help="Seed of the scenes and of the metrics' random draws (default 0).")
    p.add_argument("--fidelity-runs", type=int, default=100, help="Random subsets per image for Fidelity (default 100).")
    p.add_argument("--fidelity-protocol", default="quantus-0.6", choices=["quantus-0.6", "quantus-0.5", "paper"],
                   help="Fidelity protocol (default quantus-0.6: 200 single channel values set to 0, maps clamped; "
                        "quantus-0.5: 224 whole pixels set to the input's minimum, no clamp; paper: 200 whole "
                        "pixels set to 0, maps clamped). See docs/evaluation.md.")
    p.add_argument("--fidelity-subset", type=int, default=None,
                   help="Input features (pixels or channel values, per the protocol) replaced per subset "
                        "(default: the protocol's, 200 or 224).")
    p.add_argument("--fidelity-fraction", type=float, default=None,
                   help="Instead of --fidelity-subset: the fraction (0-1] of the pixels or channel values replaced.")
    p.add_argument("--stability-samples", type=int, default=10, help="Noisy copies per image for Stability (default 10).")
    p.add_argument("--pointing-tolerance", type=int, default=None,
                   help="Pointing Game tolerance in pixels (default: 15 px at 224 px, scaled to --size).")
    p.add_argument("--figure-images", type=int, default=4,
                   help="Images in the figure of maps (default 4; 0 for no figure).")
    p.add_argument("--figure", default=None, metavar="PATH",
                   help="Where the figure of maps goes (default: OUT/fig_maps.png).")
    p.add_argument("--out", default="srd_fx_results",
                   help="Output folder (default: srd_fx_results; the committed results/ are written only when you name them).")
    add_cache_dir(p, "Cache of trained digit models (default: $SRD_FX_CACHE or ~/.cache/srd_fx).")
    add_train_settings(p, "Override a training setting of the digit models (epochs, n_train, n_test, "
                          "batch_size, lr, weight_decay, seed); repeatable.")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's choice).")
    p.add_argument("--no-progress", action="store_true", help="Hide progress bars.")
    p.add_argument("--merge-table2", action="store_true",
                   help="Keep the models of OUT/table2.csv that this run does not score: table2.md/.csv get "
                        "their columns (means as that file has them) next to this run's, and run.json keeps "
                        "that run's record under table2's 'merged' (e.g. the token models next to the CNNs).")
    p.add_argument("--fresh", action="store_true",
                   help="Discard the scores an interrupted earlier run left in --out (by default a rerun "
                        "resumes from them).")
    add_dist_timeout(p)


ARCH_LABELS = {"resnet": "ResNet", "vgg": "VGG", "vit": "ViT", "mixer": "Mixer"}


def _model_label(spec: str) -> str:
    arch, _, act = spec.partition(":")
    if arch in ARCH_LABELS:
        return f"{ARCH_LABELS[arch]} ({ACT_LABELS.get(act, act)})"
    return spec


def _t4_label(spec: str, specs) -> str:
    """Table-4 column: the activation when every model is the same digit architecture."""
    archs = {x.partition(":")[0] for x in specs}
    arch, _, act = spec.partition(":")
    if len(archs) == 1 and arch in ("resnet", "vgg"):
        return ACT_LABELS.get(act, act)
    return _model_label(spec)


def _none(lst):
    return lst is not None and len(lst) == 1 and lst[0].lower() == "none"


def run(args) -> int:
    import srd_fx
    from srd_fx.eval import distributed
    try:
        world = distributed.init("cpu", args.dist_timeout)  # the metrics run on the CPU: gloo
    except srd_fx.SRDError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    try:
        return _run(args, world)
    finally:
        world.close()


def _run(args, world) -> int:
    import hashlib
    import re
    import shutil

    import torch
    import srd_fx
    from srd_fx.eval.distributed import RunState, atomic_path, write_text
    from srd_fx.eval import data as D
    from srd_fx.eval import evaluation as E
    from srd_fx.eval import metrics as M
    from srd_fx.eval.baselines import get_method
    from srd_fx.eval.models import is_token_model
    if args.threads:
        torch.set_num_threads(args.threads)
    digits = args.data == "digits"
    size = args.size or (64 if digits else 224)
    progress = not args.no_progress and world.is_main
    metrics = args.metrics or list(M.METRIC_NAMES)
    for m in metrics:
        if m not in M.HIGHER_IS_BETTER:
            print(f"error: unknown metric {m!r}; choose from {', '.join(M.METRIC_NAMES)}", file=sys.stderr)
            return 2
    try:
        methods = [get_method(m).name for m in args.methods] if args.methods else None
    except KeyError as e:
        print(f"error: {e.args[0]}", file=sys.stderr)
        return 2
    if args.n_images <= 0 or args.batch_size <= 0:
        print("error: --n-images and --batch-size must be positive", file=sys.stderr)
        return 2
    t2_specs = [] if _none(args.models) else (args.models or (DEFAULT_TABLE2 if digits else None))
    t4_specs = [] if _none(args.table4_models) else (args.table4_models or (DEFAULT_TABLE4 if digits else []))
    if t2_specs is None:
        print("error: with --data PATH give the model with --models torchvision:NAME or timm:NAME", file=sys.stderr)
        return 2
    if not t2_specs and not t4_specs:
        print("error: nothing to do (both --models and --table4-models are 'none')", file=sys.stderr)
        return 2
    try:
        settings = M.fidelity_settings(args.fidelity_protocol, subset=args.fidelity_subset,
                                       fraction=args.fidelity_fraction, settings=M.MetricSettings(
                                           pointing_tolerance=args.pointing_tolerance, fidelity_runs=args.fidelity_runs,
                                           stability_samples=args.stability_samples, seed=args.seed))
        settings.subset_size((3, size, size))
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2

    # ---- data
    if digits:
        if args.masks:
            print("error: --masks is for --data PATH; digit scenes make their own masks", file=sys.stderr)
            return 2
        ds = D.DigitScenes("test", size=size, n=max(args.n_images, 1), seed=args.seed)
        mean, std = D.DIGITS_MEAN, D.DIGITS_STD
    else:
        if not args.masks:
            print("error: --data PATH needs --masks PATH (masks/<class>/<image stem>.png)", file=sys.stderr)
            return 2
        try:
            ds = D.ImageFolderWithMasks(args.data, args.masks, size=size, class_index=args.class_index)
        except (FileNotFoundError, ValueError) as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        mean, std = D.IMAGENET_MEAN, D.IMAGENET_STD
    images, labels, masks = ds.tensors(args.n_images, progress=progress)
    keep = masks.flatten(1).any(1)
    if not keep.all() and world.is_main:
        print(f"note: skipping {int((~keep).sum())} images with an empty mask", file=sys.stderr)
        images, labels, masks = images[keep], labels[keep], masks[keep]

    # ---- models
    from srd_fx.eval.train import parse_train_settings
    train_kw = parse_train_settings(args.train_setting)
    accuracies, models = {}, {}

    def get(spec):
        if spec in models:
            return models[spec]
        arch, _, act = spec.partition(":")
        if digits:
            from srd_fx.eval.models import ARCHS
            if arch not in ARCHS or not act:
                raise SystemExit(f"error: digit models are ARCH:ACT with ARCH in {', '.join(ARCHS)} (got {spec!r})")
            from srd_fx.eval.train import get_trained
            model, acc = get_trained(arch, act, size=size, cache_dir=args.cache_dir, progress=progress, **train_kw)
        else:
            from srd_fx.eval.io import load_model, num_classes_of
            if args.weights and len(t2_specs) + len(t4_specs) > 1:
                raise SystemExit("error: --weights applies to a single model; give one model with --models")
            try:
                model = load_model(spec, weights=args.weights, pretrained=args.pretrained,
                                   num_classes=args.num_classes or num_classes_of(args.weights))
            except (ValueError, FileNotFoundError, RuntimeError) as e:
                raise SystemExit(f"error: {e}")
            from srd_fx.eval.train import accuracy
            acc = accuracy(model, images, labels, mean, std)
        models[spec] = model
        accuracies[_model_label(spec)] = acc
        return model

    # Resumable, data-parallel scoring: the batches of each (model, metrics) job are split between the
    # processes (every world.size-th from the rank on); each batch's scores are saved in
    # OUT/.srd_fx/evaluate/ as soon as they are computed, and rank 0 gathers them all.
    state = RunState(args.out, "evaluate", _resume_settings(args, images, labels, masks), world)
    try:
        state.check(fresh=args.fresh)
    except srd_fx.SRDError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    # the scores' folder is named after the settings too: a node without the shared file system (so
    # without rank 0's record of the settings) never reuses scores made under other ones
    key = hashlib.blake2b(json.dumps(state.settings, sort_keys=True).encode(), digest_size=6).hexdigest()
    parts = os.path.join(state.dir, "evaluate", key)
    world.barrier()
    if world.is_main:
        os.makedirs(args.out, exist_ok=True)
        if args.fresh:
            shutil.rmtree(os.path.dirname(parts), ignore_errors=True)
        state.begin(fresh=args.fresh)
    world.barrier()
    with world.main_first():  # rank 0 trains (or downloads) and caches; the others load its cache
        for spec in dict.fromkeys(t2_specs + t4_specs):
            get(spec)

    record = dict(command=command_line(args), data=args.data, size=size, n_images=len(images),
                  metric_settings=dataclasses.asdict(settings), processes=world.size,
                  torch_threads=torch.get_num_threads(), python=platform.python_version(), torch=torch.__version__,
                  tables={})
    cache: dict = {}   # spec -> scores (rank 0), so a model in both tables is scored once per metric
    scored: dict = {}  # spec -> metrics scored so far (every rank: they must agree on the jobs)
    resumed = [0]

    def score_job(spec, todo):
        tag = hashlib.blake2b(spec.encode(), digest_size=4).hexdigest()
        job = os.path.join(parts, f"{re.sub(r'[^A-Za-z0-9_.-]+', '_', spec)}-{tag}-{'+'.join(todo)}")
        os.makedirs(job, exist_ok=True)
        nb = E.n_batches(len(images), args.batch_size)
        got = {}
        for bi in world.share(nb):
            try:
                with open(os.path.join(job, f"batch-{bi:05d}.json")) as f:
                    got[bi] = json.load(f)
            except (OSError, ValueError):
                continue
        n_old = len(got)
        left = [bi for bi in world.share(nb) if bi not in got]
        batches = E.evaluate_batches(get(spec), images, labels, masks, batches=left, methods=methods,
                                     metrics=todo, settings=settings, mean=mean, std=std,
                                     batch_size=args.batch_size, progress=progress, desc=f"evaluate {spec}")
        n_new = 0
        try:
            for bi, sc, tim in batches:
                got[bi] = dict(scores={m: {k: [float(v) for v in a] for k, a in d.items()} for m, d in sc.items()},
                               seconds=tim)
                write_text(os.path.join(job, f"batch-{bi:05d}.json"), json.dumps(got[bi]))
                n_new += 1
        except (srd_fx.SRDError, ValueError, FloatingPointError, RuntimeError, AssertionError) as e:
            bi = left[n_new]
            who = f"{world.label}: " if world.distributed else ""
            lo, hi = bi * args.batch_size, min((bi + 1) * args.batch_size, len(images)) - 1
            raise SystemExit(f"error: {who}{spec}, batch {bi} (test images {lo}..{hi}): {type(e).__name__}: "
                             f"{str(e).splitlines()[0] if str(e) else ''}. The batches already scored are kept "
                             f"in {parts}: rerun the same command to resume.") from None
        everyone = world.gather((got, n_old))
        if not world.is_main:
            return None, None
        per_batch, seconds = {}, {}
        for g, n in everyone:
            resumed[0] += n
            for bi, rec in g.items():
                per_batch[int(bi)] = rec["scores"]
                for m, t in rec["seconds"].items():
                    seconds[m] = seconds.get(m, 0.0) + t
        return E.join_batches(per_batch), seconds

    def scores_for(spec, mets):
        todo = [m for m in mets if m not in scored.setdefault(spec, set())]
        if todo:
            t0 = time.perf_counter()
            res, tim = score_job(spec, todo)
            scored[spec].update(todo)
            if world.is_main:
                for meth, d in res.items():
                    cache.setdefault(spec, {}).setdefault(meth, {}).update(d)
                record.setdefault("seconds", {})[f"{spec} {'+'.join(todo)}"] = round(time.perf_counter() - t0, 1)
                record.setdefault("seconds_per_method", {})[f"{spec} {'+'.join(todo)}"] = {
                    k: round(v, 1) for k, v in tim.items()}
        if not world.is_main:
            return None
        return {meth: {k: d[k] for k in mets} for meth, d in cache[spec].items()}

    written = []
    if t2_specs:
        t0 = time.perf_counter()
        res2 = {_model_label(s): scores_for(s, metrics) for s in t2_specs}
        if world.is_main:
            record["tables"]["table2"] = dict(models=t2_specs, metrics=metrics, seconds=round(time.perf_counter() - t0, 1))
            note = E.TOKEN_NOTE if any(is_token_model(get(s)) for s in t2_specs) else ""
            summ, acc2 = {k: E.summarise(v) for k, v in res2.items()}, dict(accuracies)
            old_path = os.path.join(args.out, "table2.csv")
            if args.merge_table2 and os.path.exists(old_path):
                with open(old_path) as f:
                    old, old_acc = E.read_results_csv(f.read())
                kept = {k: v for k, v in old.items() if k not in summ}
                summ = {**kept, **summ}
                acc2 = {**{k: old_acc[k] for k in kept if k in old_acc}, **acc2}
                record["tables"]["table2"]["merged_models"] = list(kept)
            md = E.table2_markdown(summ, metrics, n_images=len(images), note=note, summarised=True)
            _write(args.out, "table2.md", md, written)
            _write(args.out, "table2.csv", E.results_csv(summ, acc2, summarised=True), written)
            print(md)
    if t4_specs:
        t0 = time.perf_counter()
        res4 = {_t4_label(s, t4_specs): scores_for(s, ["Fidelity"]) for s in t4_specs}
        if world.is_main:
            acc4 = {_t4_label(s, t4_specs): accuracies[_model_label(s)] for s in t4_specs}
            record["tables"]["table4"] = dict(models=t4_specs, metrics=["Fidelity"], seconds=round(time.perf_counter() - t0, 1))
            md = E.table4_markdown(res4, acc4, n_images=len(images))
            _write(args.out, "table4.md", md, written)
            _write(args.out, "table4.csv", E.results_csv(res4, acc4), written)
            print(md)
    if not world.is_main:
        return 0
    if args.figure_images > 0:
        n = min(args.figure_images, len(images))
        if len(t2_specs) > 1 and all(is_token_model(get(s)) for s in t2_specs):
            # token models share their methods: one figure, a group of rows per model
            what = {_model_label(s): get(s) for s in t2_specs}
            title = f"{', '.join(what)}: maps on test images (outline: mask)"
        else:
            spec = (t2_specs or t4_specs)[0]
            what, title = get(spec), f"{_model_label(spec)}: maps on test images (outline: mask)"
        fig = E.plot_maps(what, images[:n], labels[:n], masks[:n], methods=methods, mean=mean, std=std, title=title)
        path = args.figure or os.path.join(args.out, "fig_maps.png")
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        with atomic_path(path) as tmp:
            fig.savefig(tmp, dpi=110)
        written.append(path)
    record["test_accuracy"] = accuracies
    # run.json keeps the latest run that produced each table
    runs_path = os.path.join(args.out, "run.json")
    runs = {}
    if os.path.exists(runs_path):
        try:
            with open(runs_path) as f:
                runs = json.load(f)
        except (OSError, ValueError):
            runs = {}
    for table in record["tables"] or {"figure": None}:
        if table == "table2" and record["tables"]["table2"].get("merged_models") and "table2" in runs:
            prev = runs["table2"]
            record = dict(record, merged=prev.get("merged", []) + [{k: v for k, v in prev.items() if k != "merged"}])
        runs[table] = record
    _write(args.out, "run.json", json.dumps(runs, indent=1, default=str) + "\n", written)
    if resumed[0]:
        print(f"resumed {resumed[0]} batch(es) scored by an interrupted earlier run", file=sys.stderr)
    # finished: the per-batch scores have served (a later run recomputes, with the code of its day)
    shutil.rmtree(os.path.dirname(parts), ignore_errors=True)
    os.remove(state.path)
    with contextlib.suppress(OSError):
        os.rmdir(state.dir)
    print("wrote " + ", ".join(written))
    return 0


def _resume_settings(args, images, labels, masks) -> dict:
    """What the scores depend on: every option but where and how the run goes, and the data itself."""
    import hashlib
    import srd_fx
    skip = {"out", "no_progress", "fresh", "dist_timeout", "threads", "figure_images", "figure", "command"}
    opts = {k: v for k, v in sorted(vars(args).items()) if not k.startswith("_") and k not in skip}
    h = hashlib.blake2b(digest_size=16)
    for t in (images, labels, masks):
        h.update(t.contiguous().numpy().tobytes())
    return dict(options=opts, data_hash=h.hexdigest(), srd_fx=srd_fx.__version__)


def command_line(args) -> str:
    """The full command line of this run, every option spelled out (for results/ and the docs)."""
    parts = ["srd-fx", NAME]
    for k, v in vars(args).items():
        if k.startswith("_") or k == "command" or v is None or v is False or v == []:
            continue
        opt = "--" + k.replace("_", "-")
        if v is True:
            parts.append(opt)
        elif isinstance(v, list):
            for item in v if k == "train_setting" else [v]:
                parts += [opt] + ([item] if k == "train_setting" else [str(x) for x in item])
        else:
            parts += [opt, str(v)]
    return " ".join(shlex.quote(p) for p in parts)


def _write(out, name, text, written):
    from srd_fx.eval.distributed import write_text
    path = os.path.join(out, name)
    write_text(path, text)
    written.append(path)
