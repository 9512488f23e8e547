"""Token models (docs/method.md "Token models"): which timm token architectures compile, and how
long compiling vit_small_patch16_224 at 224 takes on CPU.

    PYTHONPATH=. python benchmarks/token_models.py                  # the issue's model list
    PYTHONPATH=. python benchmarks/token_models.py vit_tiny_patch16_224 mixer_b16_224
    PYTHONPATH=. python benchmarks/token_models.py --compile-time   # vit_small_patch16_224, 224

Each model: random weights, float64, eval; input at the smallest size the model allows (its
default otherwise); checks: exact logits (<= 1e-10 relative), conservation with ``lost``
(<= 1e-8 of sum |R_L|), finite maps of the input's shape.  One line per model: PASS, or FAIL
with the error class and message (every failure should be a named srd_fx error).
"""
import argparse
import sys
import time

import torch

import srd_fx

MODELS = [
    "vit_tiny_patch16_224", "deit_tiny_patch16_224", "deit_tiny_distilled_patch16_224",
    "vit_small_patch16_224", "swin_tiny_patch4_window7_224", "cait_xxs24_224", "xcit_nano_12_p16_224",
    "mixer_b16_224", "resmlp_12_224", "gmlp_ti16_224", "starnet_s1", "mambaout_femto", "caformer_s18",
    "convformer_s18", "poolformer_s12", "levit_128s", "maxvit_tiny_tf_224", "coatnet_0_rw_224",
    "pvt_v2_b0", "mobilevit_xxs", "mobilevitv2_050", "efficientformer_l1", "efficientformerv2_s0",
    "pit_ti_224", "tiny_vit_5m_224", "convit_tiny", "sequencer2d_s", "volo_d1_224", "focalnet_tiny_srf",
    "davit_tiny", "beit_base_patch16_224", "eva02_tiny_patch14_224", "twins_svt_small", "crossvit_tiny_240",
    "gcvit_xxtiny", "nest_tiny", "edgenext_xx_small", "fastvit_t8", "efficientvit_b0", "hiera_tiny_224",
    "vit_small_patch16_224.dino", "rdnet_tiny",
]


def check(name, size=None):
    import timm
    torch.manual_seed(0)
    kw = {"img_size": size} if size else {}
    try:
        m = timm.create_model(name, pretrained=False, num_classes=7, **kw)
    except TypeError:
        m = timm.create_model(name, pretrained=False, num_classes=7)
    m = m.double().eval()
    shape = m.pretrained_cfg.get("input_size", (3, 224, 224)) if not size else (3, size, size)
    x = torch.randn(2, *shape, dtype=torch.float64)
    t0 = time.perf_counter()
    explainer = srd_fx.compile(m, example_input=x[:1], layers=("input", "low"))
    t_compile = time.perf_counter() - t0
    out = explainer(x)
    with torch.no_grad():
        ref = m(x)
    logit_err = ((out.logits - ref).abs().max() / ref.abs().max().clamp_min(1e-30)).item()
    total = out.saliency.flatten(1).sum(1) + (out.lost if out.lost is not None else 0)
    scale = out.R_L.abs().flatten(1).sum(1).clamp_min(1e-30)
    cons = ((total - out.R_L.flatten(1).sum(1)).abs() / scale).max().item()
    ok = logit_err <= 1e-10 and cons <= 1e-8 and bool(torch.isfinite(out.saliency).all()) \
        and out.saliency.shape == (2,) + tuple(shape[1:])
    return ok, f"compile {t_compile:.2f}s logits {logit_err:.1e} conservation {cons:.1e} " \
               f"low {tuple(out.relevance['low'].shape)}"


def compile_time(repeats=3):
    import timm
    m = timm.create_model("vit_small_patch16_224", pretrained=False).eval()
    x = torch.randn(1, 3, 224, 224)
    srd_fx.compile(m, example_input=x)          # warm imports and caches
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        srd_fx.compile(m, example_input=x)
        best = min(best, time.perf_counter() - t0)
    print(f"vit_small_patch16_224 @224 float32 CPU: compile {best:.2f}s (best of {repeats}, "
          f"{torch.get_num_threads()} threads)")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("models", nargs="*")
    ap.add_argument("--compile-time", action="store_true")
    ap.add_argument("--size", type=int, default=None, help="img_size= for models that take it")
    a = ap.parse_args(argv)
    if a.compile_time:
        compile_time()
        return 0
    passed = 0
    names = a.models or MODELS
    for name in names:
        try:
            ok, msg = check(name, a.size)
        except Exception as e:  # reported, not raised: the point is the list
            ok, msg = False, f"{type(e).__module__}.{type(e).__name__}: {str(e).splitlines()[0][:200]}"
        passed += ok
        print(f"{'PASS' if ok else 'FAIL'} {name}: {msg}", flush=True)
    print(f"{passed}/{len(names)} pass")
    return 0


if __name__ == "__main__":
    sys.exit(main())
