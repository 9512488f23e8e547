"""The zoo sweep: build each timm model, compile it with srd_fx and check the explainer.

Per model (see docs/zoo.md for the reasoning behind each choice):

* build: ``timm.create_model(name, pretrained=False)`` with a fixed seed, created directly in
  float64, eval mode; then every parameter that timm initialises to one constant (zero-init last
  BN gamma, layer-scale 1e-6, skip-init gains, ...) and the BN running statistics are redrawn from
  the same seeded generator, so that no residual branch is switched off (``--raw-init`` keeps
  timm's init as it is);
* input: (2, C, s, s) standard normal, float64, where s is the smallest size from
  ``--size`` upwards that the model accepts and that leaves the last feature map at least 2x2
  (``fixed_input_size`` models use their configured size);
* checks: compile succeeds (or fails with ``UnsupportedOpError`` / ``TraceError``: counted with
  the op); logits equal ``model(x)`` (relative error <= 1e-10); conservation
  ``|sum R^input - sum R^L| <= 1e-8 * sum |R^L|`` per sample; every map finite; the batch of two
  equals each sample explained alone (relative error <= 1e-10).

Models run in worker processes (``--jobs``) with a per-model wall-clock limit: a model that runs
past it is killed and recorded as a timeout, and a worker that dies (out of memory) is recorded
as crashed; the sweep always goes on.  Each finished model is appended to a cache
(``model_zoo_checks/.cache/srd.jsonl``) so an interrupted sweep resumes where it stopped.
"""
from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import math
import multiprocessing as mp
import os
import re
import sys
import time
import traceback
from multiprocessing.connection import wait as mp_wait
from pathlib import Path
from typing import Callable, Dict, Iterable, List, Optional, Sequence

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
CACHE_DIR = HERE / ".cache"
SRD_CACHE = CACHE_DIR / "srd.jsonl"
REPORT_MD = HERE / "REPORT.md"
REPORT_JSON = HERE / "report.json"
CI_SUBSET = HERE / "ci_subset.txt"
CI_TOKENS = HERE / "ci_tokens.txt"

LOGITS_TOL = 1e-10        # relative error of the compiled logits against model(x)
CONSERVATION_TOL = 1e-8   # |sum R^input - sum R^L| <= tol * sum |R^L|
BATCH_TOL = 1e-10         # batch-of-two vs one-by-one, relative to the map's max |value|

# Failure categories, in the order they are reported.
CATEGORIES = (
    "unsupported-op", "trace-error", "srd-error", "logits-mismatch", "conservation", "non-finite",
    "orientation", "batch-dependence", "degenerate", "timeout", "crashed", "exception", "build-error",
    "no-input-size",
)
CATEGORY_HELP = {
    "unsupported-op": "compile raised srd_fx.UnsupportedOpError (the op is named)",
    "trace-error": "compile raised srd_fx.TraceError (torch.fx could not trace the model)",
    "srd-error": "compile or a call raised another named srd_fx error (its class is given)",
    "logits-mismatch": f"compiled logits differ from model(x) by more than {LOGITS_TOL:g} (relative)",
    "conservation": f"|sum R^input - sum R^L| > {CONSERVATION_TOL:g} * sum |R^L|",
    "non-finite": "a map or the logits contain NaN/Inf (or srd_fx raised NonFiniteError)",
    "orientation": "a map is not in the input's orientation: the saliency is not (B, H, W) with the input's "
                   "H and W, or a layer's map is not (B, N) or (B, h, w)",
    "batch-dependence": f"the batch of two differs from the samples explained alone by more than {BATCH_TOL:g}",
    "degenerate": "R^L is zero everywhere for a sample, so conservation was not tested",
    "timeout": "the model ran past the per-model time limit and was killed",
    "crashed": "the worker process died (usually out of memory)",
    "exception": "a raw (not srd_fx) exception escaped compile or a call: a bug in srd_fx (type and message given)",
    "build-error": "timm could not build the model (not an srd_fx problem)",
    "no-input-size": "no tried input size was accepted by the model's own forward",
}


# ---------------------------------------------------------------------------------- options
@dataclasses.dataclass
class Options:
    seed: int = 0
    size: int = 64                 # smallest input side tried
    threads: int = 1               # torch threads per worker
    max_params_m: float = 700.0    # skip models above this many million parameters
    raw_init: bool = False         # keep timm's init (zero-init gammas etc.) as it is
    timeout: float = 900.0         # per-model wall-clock limit, seconds (worker pool only)

    def key(self) -> Dict:
        """The options that change a result (the cache key includes them)."""
        return dict(seed=self.seed, size=self.size, raw_init=self.raw_init,
                    tol=(LOGITS_TOL, CONSERVATION_TOL, BATCH_TOL))


def code_fingerprint(opts: Options) -> str:
    """Hash of the compiler's source, the library versions and the result-changing options:
    a cached record is reused only when it matches."""
    h = hashlib.sha256()
    # the compiler pipeline and the rules (not the evaluation/CLI modules, which cannot change a record)
    pkg = REPO / "srd_fx"
    files = ([pkg / "errors.py"] + sorted((pkg / "compiler").glob("*.py")) + sorted((pkg / "rules").glob("*.py"))
             + [Path(__file__)])
    for f in files:
        try:
            h.update(f.name.encode() + b"\0" + f.read_bytes())
        except OSError:
            pass
    import timm
    import torch
    h.update(f"timm={timm.__version__} torch={torch.__version__}".encode())
    h.update(json.dumps(opts.key(), sort_keys=True).encode())
    return h.hexdigest()[:16]


# ---------------------------------------------------------------------------------- building
def count_params_meta(name: str) -> Optional[int]:
    """Parameter count without allocating memory (built on the meta device); None if that fails."""
    import timm
    import torch
    try:
        with torch.device("meta"):
            m = timm.create_model(name, pretrained=False)
        return sum(p.numel() for p in m.parameters())
    except Exception:
        return None


def redraw_constant_init(model, seed: int) -> List[str]:
    """Redraw every parameter whose elements are all equal (timm's zero-init last BN gamma,
    layer-scale 1e-6, skip-init gains, zero biases) and the BN running statistics, from a seeded
    generator, so that every branch of the random network carries signal.  Returns the names of
    the redrawn parameters."""
    import torch
    g = torch.Generator().manual_seed(seed + 1)
    changed = []
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.numel() == 0 or not p.is_floating_point():
                continue
            flat = p.detach().reshape(-1)
            if not bool((flat == flat[0]).all()):
                continue
            leaf = name.rsplit(".", 1)[-1]
            if leaf == "bias" or leaf.endswith("_bias") or leaf in ("beta", "b"):
                new = torch.randn(p.shape, generator=g, dtype=torch.float64) * 0.1
            else:  # scales: weight/gamma/gain/layer scale
                new = torch.rand(p.shape, generator=g, dtype=torch.float64) * 0.75 + 0.25
            p.copy_(new.to(p.dtype))
            changed.append(name)
        for mod in model.modules():
            rm, rv = getattr(mod, "running_mean", None), getattr(mod, "running_var", None)
            if isinstance(rm, torch.Tensor) and isinstance(rv, torch.Tensor) and rm.is_floating_point():
                rm.copy_((torch.randn(rm.shape, generator=g, dtype=torch.float64) * 0.1).to(rm.dtype))
                rv.copy_((torch.rand(rv.shape, generator=g, dtype=torch.float64) + 0.5).to(rv.dtype))
    return changed


def _mem_available() -> Optional[float]:
    """Memory this process can use for the next model, in bytes: MemAvailable from /proc/meminfo
    plus this process's own resident memory (a worker keeps the heap of the model it checked
    before, and reuses it for the next one; without it, a worker would wait for memory it holds
    itself).  None where there is no /proc."""
    try:
        with open("/proc/meminfo") as f:
            avail = next((float(l.split()[1]) * 1024 for l in f if l.startswith("MemAvailable:")), None)
        with open("/proc/self/statm") as f:
            own = int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return None
    return None if avail is None else avail + own


def build_model(name: str, opts: Options, **model_kwargs):
    """The float64 eval-mode model of the sweep (see the module docstring); ``model_kwargs`` go to
    ``timm.create_model`` (the CI subsets use them for small inputs, e.g. ``img_size=64``)."""
    import timm
    import torch
    torch.manual_seed(opts.seed)
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        model = timm.create_model(name, pretrained=False, **model_kwargs)
    finally:
        torch.set_default_dtype(old)
    model = model.double().eval()
    if not opts.raw_init:
        redraw_constant_init(model, opts.seed)
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def candidate_sizes(model, opts: Options) -> List[int]:
    cfg = getattr(model, "pretrained_cfg", None) or {}
    default = int(cfg.get("input_size", (3, 224, 224))[-1])
    if cfg.get("fixed_input_size"):
        return [default]
    low = opts.size
    if cfg.get("min_input_size"):
        low = max(low, int(cfg["min_input_size"][-1]))
    try:
        red = int(model.feature_info[-1]["reduction"])
        low = max(low, 2 * red)   # last feature map at least 2x2
    except Exception:
        pass
    sizes = [s for s in (32, 48, 64, 96, 128, 160, 192, 224, 256, 299, 320, 331) if s >= low]
    return sorted(set(sizes[:5] + [default]))


def make_input(model, size: int, seed: int):
    import torch
    cfg = getattr(model, "pretrained_cfg", None) or {}
    chans = int(cfg.get("input_size", (3,))[0])
    g = torch.Generator().manual_seed(seed + 2)
    return torch.randn(2, chans, size, size, generator=g, dtype=torch.float64)


def pick_input(model, opts: Options, sizes: Optional[Sequence[int]] = None):
    """Return (x, reference logits) at the smallest accepted size (of ``sizes`` when given), or
    raise the last error.  A model whose forward runs but never returns (B, classes) (an
    encoder-only model) gets its smallest accepted input: srd_fx is then the one to refuse it, by
    name."""
    import torch
    last, ran = None, None
    for s in sizes or candidate_sizes(model, opts):
        x = make_input(model, s, opts.seed)
        try:
            with torch.no_grad():
                ref = model(x)
        except Exception as e:  # too small for the model: try the next size
            last = e
            continue
        if isinstance(ref, torch.Tensor) and ref.dim() == 2:
            return x, ref
        ran = ran or (x, ref)
    if ran is not None:
        return ran
    raise NoInputSize(f"{type(last).__name__}: {last}")


class NoInputSize(Exception):
    pass


# ---------------------------------------------------------------------------------- classifying
_NODE_RE = re.compile(r"node '([^']+)' \((call_module|call_function|call_method|get_attr|placeholder|output)"
                      r"[ ,]+(?:target )?([^,)]*)(?:, type ([\w.]+))?\)(?:: ([^\n]*))?")


def unsupported_op(msg: str, model=None) -> str:
    """The op an UnsupportedOpError names (module type, function or method, and the rule's reason
    when it gives one), else the message's first line."""
    m = _NODE_RE.search(msg)
    if m:
        op = m.group(4) or m.group(3).strip()
        if m.group(2) == "call_module" and not m.group(4) and model is not None:
            try:
                op = type(model.get_submodule(op)).__name__
            except Exception:
                pass
        op = op.replace("_VariableFunctionsClass.", "torch.")
        if m.group(5):
            op += f": {m.group(5).strip()[:100]}"
        return op
    return msg.strip().splitlines()[0][:160] if msg.strip() else "?"


def classify_exception(e: BaseException, stage: str, model=None) -> Dict:
    import srd_fx
    msg = str(e)
    first = msg.strip().splitlines()[0] if msg.strip() else ""
    if isinstance(e, srd_fx.UnsupportedOpError):
        return dict(category="unsupported-op", op=unsupported_op(msg, model), reason=first[:300], detail=msg[:3000])
    if isinstance(e, srd_fx.TraceError):
        inner = e.__cause__
        why = f"{type(inner).__name__}: {str(inner).strip().splitlines()[0] if str(inner).strip() else ''}" if inner else first
        return dict(category="trace-error", op=None, reason=why[:300], detail=msg[:3000])
    if isinstance(e, srd_fx.NonFiniteError):
        return dict(category="non-finite", op=None, reason=f"{stage}: NonFiniteError: {first[:250]}", detail=msg[:3000])
    if isinstance(e, srd_fx.SRDError):
        return dict(category="srd-error", op=type(e).__name__, reason=f"{stage}: {type(e).__name__}: {first[:250]}",
                    detail=msg[:3000])
    tb = "".join(traceback.format_exception(type(e), e, e.__traceback__)[-6:])
    # no machine paths in the records (they are committed): the checkout and the Python installation
    tb = tb.replace(str(REPO) + os.sep, "").replace(sys.prefix, "<python>").replace(sys.base_prefix, "<python>")
    return dict(category="exception", op=None, reason=f"{stage}: {type(e).__name__}: {first[:250]}",
                detail=(msg[:1500] + "\n" + tb[-1500:]))


def _rel(a, b):
    import torch
    scale = float(b.abs().max()) if b.numel() else 0.0
    diff = float((a - b).abs().max()) if a.numel() else 0.0
    if not math.isfinite(diff):
        return float("inf")
    return diff / scale if scale > 0 else diff


# ---------------------------------------------------------------------------------- the check
def orientation_errors(out, x) -> List[str]:
    """What is not in the input's orientation (docs/method.md, the read-out of token models): the saliency must be
    (B, H, W) with the input's batch, height and width; R_L and every layer's map (B, N) for a token
    layer or (B, h, w) for a grid.  Empty when all is well."""
    b, h, w = x.shape[0], x.shape[-2], x.shape[-1]
    errs = []
    if tuple(out.saliency.shape) != (b, h, w):
        errs.append(f"saliency is {tuple(out.saliency.shape)}, not {(b, h, w)}")
    for k, v in [("R_L", out.R_L), *[(f"relevance[{k}]", v) for k, v in out.relevance.items()]]:
        if v is not None and (v.dim() not in (2, 3) or v.shape[0] != b):
            errs.append(f"{k} is {tuple(v.shape)}, not (B, N) or (B, h, w) with B = {b}")
    return errs


def with_threads(check: Callable[[str, "Options"], Dict], name: str, opts: "Options") -> Dict:
    """``check(name, opts)`` with ``opts.threads`` torch threads; the caller's setting is restored."""
    import torch
    before = torch.get_num_threads()
    torch.set_num_threads(max(1, opts.threads))
    try:
        return check(name, opts)
    finally:
        torch.set_num_threads(before)


def check_model(name: str, opts: Options, model_kwargs: Optional[Dict] = None) -> Dict:
    """Build, compile and check one model; never raises (failures are in the record).  ``model_kwargs``
    go to ``timm.create_model``; an ``img_size`` among them is also the input size."""
    return with_threads(lambda n, o: _check_model(n, o, dict(model_kwargs or {})), name, opts)


def _check_model(name: str, opts: Options, model_kwargs: Dict) -> Dict:
    import torch
    from . import lists
    rec: Dict = dict(model=name, module=lists.module_of(name), family=lists.family_of(name, lists.module_of(name)),
                     status="fail", category=None, op=None, reason=None, detail=None, params=None,
                     input_size=None, times={}, metrics={})
    if model_kwargs:
        rec["model_kwargs"] = model_kwargs
    t_all, c_all = time.perf_counter(), time.process_time()
    n = count_params_meta(name)
    rec["params"] = n
    if n is not None and n > opts.max_params_m * 1e6:
        rec.update(status="skipped", category="too-large",
                   reason=f"skipped: too large ({n / 1e6:.0f}M parameters > --max-params {opts.max_params_m:g}M)")
        return rec
    need = (n or 0) * 8 * 3 + 1.5e9     # float64 weights, their init and the activations, roughly
    waited = 0
    while _mem_available() is not None and _mem_available() < need and waited < 600:
        time.sleep(15)                  # another big model is running: wait for its memory
        waited += 15
    if _mem_available() is not None and _mem_available() < need:
        rec.update(status="skipped", category="too-large",
                   reason=f"skipped: too large for the free memory (needs ~{need / 1e9:.0f} GB, "
                          f"{_mem_available() / 1e9:.0f} GB available after waiting {waited} s)")
        return rec
    try:
        t = time.perf_counter()
        model = build_model(name, opts, **model_kwargs)
        rec["times"]["build_s"] = time.perf_counter() - t
        if n is None:
            rec["params"] = sum(p.numel() for p in model.parameters())
    except Exception as e:
        rec.update(category="build-error", reason=f"{type(e).__name__}: {str(e).strip()[:250]}")
        return rec
    try:
        img = model_kwargs.get("img_size")
        x, ref = pick_input(model, opts, sizes=[img] if isinstance(img, int) else None)
    except NoInputSize as e:
        rec.update(category="no-input-size", reason=str(e)[:300])
        return rec
    rec["input_size"] = list(x.shape[1:])

    import srd_fx
    stage = "compile"
    try:
        t, c = time.perf_counter(), time.process_time()
        explainer = srd_fx.compile(model, layers="all", example_input=x[:1])
        rec["times"]["compile_s"] = time.perf_counter() - t
        rec["times"]["compile_cpu_s"] = time.process_time() - c
        rec["n_layers"] = len(explainer.activation_layers)
        stage = "explain (batch of 2)"
        t = time.perf_counter()
        out = explainer(x)
        rec["times"]["explain_s"] = time.perf_counter() - t
        stage = "explain (one sample)"
        singles = [explainer(x[i:i + 1]) for i in range(x.shape[0])]
    except Exception as e:
        rec.update(classify_exception(e, stage, model))
        rec["times"]["total_s"] = time.perf_counter() - t_all
        rec["times"]["total_cpu_s"] = time.process_time() - c_all
        return rec

    with torch.no_grad():
        fails = []
        m = rec["metrics"]
        maps = {"saliency": out.saliency, "R_L": out.R_L, **{f"relevance[{k}]": v for k, v in out.relevance.items()}}
        bad = [k for k, v in [("logits", out.logits)] + list(maps.items()) if not torch.isfinite(v).all()]
        m["n_maps"] = len(maps)
        if bad:
            fails.append(("non-finite", f"non-finite values in {bad[:4]}{' ...' if len(bad) > 4 else ''}"))
        wrong = orientation_errors(out, x)
        if wrong:
            fails.append(("orientation", "; ".join(wrong[:3]) + (" ..." if len(wrong) > 3 else "")))
        m["logits_rel_err"] = _rel(out.logits, ref)
        if not m["logits_rel_err"] <= LOGITS_TOL:
            fails.append(("logits-mismatch", f"logits relative error {m['logits_rel_err']:.3g} > {LOGITS_TOL:g}"))
        m["conservation_head"] = "gradcam"
        cons_out = out
        if any(float(al) == 0 for al in out.R_L.flatten(1).abs().sum(1)):
            # Eq. 4 can be zero everywhere on a random network (every position's Phi^c below the
            # class mean): conservation would hold vacuously, so test it with R^L = 1 instead.
            try:
                with torch.enable_grad():
                    cons_out = srd_fx.compile(model, head="ones", example_input=x[:1])(x)
                m["conservation_head"] = "ones (Grad-CAM head is zero on this random network)"
            except Exception as e:
                fails.append(("exception", f"head='ones' rerun: {type(e).__name__}: {str(e)[:200]}"))
        # docs/method.md "Lost relevance and conservation": relevance is lost exactly where ||v_j|| or D_j is zero; the
        # explainer reports it per sample (out.lost), so the balance checked is R^input + lost = R^L.
        s_in = cons_out.saliency.flatten(1).sum(1) + cons_out.lost.reshape(-1).to(cons_out.saliency.dtype)
        s_L = cons_out.R_L.flatten(1).sum(1)
        a_L = cons_out.R_L.flatten(1).abs().sum(1)
        m["sum_R_L"] = [float(v) for v in s_L]
        m["sum_R_input"] = [float(v) for v in cons_out.saliency.flatten(1).sum(1)]
        m["lost"] = [float(v) for v in cons_out.lost.reshape(-1)]
        m["lost_frac"] = max((float(l.abs()) / float(al) for l, al in zip(cons_out.lost.reshape(-1), a_L)
                              if float(al) > 0), default=None)
        cons = [(float((si - sl).abs()) / float(al)) if float(al) > 0 else float("nan")
                for si, sl, al in zip(s_in, s_L, a_L)]
        m["conservation_rel_err"] = max((c for c in cons if not math.isnan(c)), default=None)
        if any(float(al) == 0 for al in a_L):
            fails.append(("degenerate", f"R^L is zero everywhere for sample(s) "
                                        f"{[i for i, al in enumerate(a_L) if float(al) == 0]}"))
        bad_c = [i for i, (si, sl, al) in enumerate(zip(s_in, s_L, a_L))
                 if not float((si - sl).abs()) <= CONSERVATION_TOL * float(al)]
        if bad_c and not bad:
            fails.append(("conservation", f"|sum R^input + lost - sum R^L| / sum|R^L| = "
                                          f"{m['conservation_rel_err']:.3g} > {CONSERVATION_TOL:g} (sample(s) {bad_c}"
                                          f"{', head=ones' if cons_out is not out else ''})"))
        b_err = 0.0
        worst = None
        for i, o in enumerate(singles):
            pairs = [("logits", o.logits, out.logits[i:i + 1]), ("saliency", o.saliency, out.saliency[i:i + 1]),
                     ("R_L", o.R_L, out.R_L[i:i + 1])]
            pairs += [(f"relevance[{k}]", o.relevance[k], out.relevance[k][i:i + 1]) for k in out.relevance]
            for k, a, b in pairs:
                e = _rel(a, b)
                if not e <= b_err:
                    b_err, worst = e, k
        m["batch_rel_err"] = b_err
        if not b_err <= BATCH_TOL:
            fails.append(("batch-dependence", f"batch of 2 vs alone: relative error {b_err:.3g} in {worst}"))
    rec["times"]["total_s"] = time.perf_counter() - t_all
    rec["times"]["total_cpu_s"] = time.process_time() - c_all
    if fails:
        rec["category"] = fails[0][0]
        rec["reason"] = "; ".join(r for _, r in fails)
        rec["failed_checks"] = [c for c, _ in fails]
    else:
        rec.update(status="pass", category="pass")
    return rec


# ---------------------------------------------------------------------------------- worker pool
TASKS: Dict[str, str] = {"srd": "model_zoo_checks.runner:check_model",
                         "peers": "model_zoo_checks.peers:check_peers"}


def _resolve(spec: str) -> Callable:
    import importlib
    mod, fn = spec.split(":")
    return getattr(importlib.import_module(mod), fn)


def _worker(conn, task: str, opts: Options):
    os.environ.setdefault("OMP_NUM_THREADS", str(opts.threads))
    fn = _resolve(TASKS[task])
    fp = code_fingerprint(opts)   # the code this worker imported
    while True:
        try:
            name = conn.recv()
        except EOFError:
            return
        if name is None:
            return
        try:
            rec = fn(name, opts)
        except BaseException as e:  # the check functions catch their own; this is a last resort
            rec = dict(model=name, status="fail", category="exception",
                       reason=f"runner: {type(e).__name__}: {str(e)[:250]}")
        rec["fingerprint"] = fp
        conn.send(rec)


class _Slot:
    def __init__(self, ctx, task, opts):
        self.parent, child = ctx.Pipe()
        self.proc = ctx.Process(target=_worker, args=(child, task, opts), daemon=True)
        self.proc.start()
        child.close()
        self.name: Optional[str] = None
        self.started = 0.0

    def stop(self, kill=False):
        try:
            if kill:
                self.proc.kill()     # only our own child process
            else:
                self.parent.send(None)
        except Exception:
            pass
        self.proc.join(timeout=10)
        if self.proc.is_alive():
            self.proc.kill()
            self.proc.join()


def run_models(names: Sequence[str], opts: Options, *, task: str = "srd", jobs: int = 1,
               on_record: Optional[Callable[[Dict], None]] = None, progress: bool = True,
               desc: str = "zoo") -> List[Dict]:
    """Run ``task`` on every name in worker processes (``jobs`` at a time), each with the
    ``opts.timeout`` limit.  ``jobs=0`` runs in this process (no time limit).  Records come back
    in completion order; ``on_record`` sees each as it finishes."""
    from tqdm import tqdm
    import srd_fx
    fp = code_fingerprint(opts)
    out: List[Dict] = []
    bar = tqdm(total=len(names), desc=desc, unit="model", disable=not progress, dynamic_ncols=True)

    def finish(rec):
        from . import lists
        rec.setdefault("module", lists.module_of(rec["model"]))
        rec.setdefault("family", lists.family_of(rec["model"], rec["module"]))
        rec.setdefault("fingerprint", fp)
        rec["task"] = task
        rec["srd_fx_version"] = srd_fx.__version__
        out.append(rec)
        if on_record:
            on_record(rec)
        bar.set_postfix_str(f"{rec['model']}: {rec.get('category')}", refresh=False)
        bar.update(1)

    if jobs <= 0:
        fn = _resolve(TASKS[task])
        for name in names:
            t = time.perf_counter()
            rec = fn(name, opts)
            rec["wall_s"] = time.perf_counter() - t
            finish(rec)
        bar.close()
        return out

    ctx = mp.get_context("spawn")
    queue = list(names)
    import signal
    if hasattr(signal, "SIGTERM") and __import__("threading").current_thread() is __import__("threading").main_thread():
        def _term(signum, frame):   # `kill PID` stops the workers too (the finally below)
            raise SystemExit(128 + signum)
        signal.signal(signal.SIGTERM, _term)
    slots = [_Slot(ctx, task, opts) for _ in range(min(jobs, len(queue)) or 1)]
    try:
        while queue or any(s.name for s in slots):
            for i, s in enumerate(slots):
                if s.name is None and queue:
                    if not s.proc.is_alive():
                        slots[i] = s = _Slot(ctx, task, opts)
                    s.name, s.started = queue.pop(0), time.perf_counter()
                    s.parent.send(s.name)
            busy = [s for s in slots if s.name]
            if not busy:
                continue
            ready = mp_wait([s.parent for s in busy] + [s.proc.sentinel for s in busy], timeout=2.0)
            now = time.perf_counter()
            for i, s in enumerate(slots):
                if s.name is None:
                    continue
                rec = None
                if s.parent in ready:
                    try:
                        rec = s.parent.recv()
                        rec["wall_s"] = now - s.started
                    except (EOFError, OSError):
                        rec = None
                if rec is None and (s.proc.sentinel in ready or not s.proc.is_alive()):
                    code = s.proc.exitcode
                    rec = dict(model=s.name, status="fail", category="crashed",
                               reason=f"worker died (exit code {code}{', killed: out of memory?' if code in (-9, 137) else ''})",
                               wall_s=now - s.started)
                    s.stop(kill=True)
                    slots[i] = _Slot(ctx, task, opts) if queue else s
                elif rec is None and now - s.started > opts.timeout:
                    rec = dict(model=s.name, status="fail", category="timeout",
                               reason=f"timeout: still running after {opts.timeout:.0f} s (killed)",
                               wall_s=now - s.started)
                    s.stop(kill=True)
                    slots[i] = _Slot(ctx, task, opts) if queue else s
                if rec is not None:
                    s.name = None
                    slots[i].name = None
                    finish(rec)
    finally:
        for s in slots:
            s.stop(kill=bool(s.name))
        bar.close()
    return out


# ---------------------------------------------------------------------------------- cache
def load_cache(path: Path = SRD_CACHE) -> Dict[str, Dict]:
    """model -> its latest record in the cache."""
    recs: Dict[str, Dict] = {}
    if path.exists():
        with open(path) as f:
            for line in f:
                line = line.strip()
                if not line:
                    continue
                try:
                    r = json.loads(line)
                except json.JSONDecodeError:
                    continue   # a line cut by a kill
                recs[r["model"]] = r
    return recs


def append_cache(rec: Dict, path: Path = SRD_CACHE) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        f.write(json.dumps(rec, default=_json_default) + "\n")


def _json_default(o):
    if isinstance(o, float) and not math.isfinite(o):
        return str(o)
    return str(o)
