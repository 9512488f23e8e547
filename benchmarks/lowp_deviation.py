"""How far float16 / bfloat16 SRD maps are from the float64 map of the same network and input.

For every model, the float64 model is the reference; the same weights are cast to float16 and
bfloat16 (``model.half()`` / ``model.bfloat16()``) and explained on the same images cast to the
low-precision dtype.  Batch-norm statistics are calibrated on real images first (one forward in
training mode on a few crops), so that activations have realistic scales rather than those of a
random initialisation.

Reported per model and dtype (medians and maxima over the images):

* ``finite``     — every map was finite (a NaN/Inf would have raised NonFiniteError);
* ``rel_l2``     — ||S_lp - S_64||_2 / ||S_64||_2 of the saliency map;
* ``norm_max``   — max |S_lp / max|S_lp| - S_64 / max|S_64||, the display map's worst pixel;
* ``pearson``    — Pearson correlation of the two maps (scipy);
* ``conserve``   — |sum S + lost - sum R_L| / sum |R_L| of the low-precision explanation;
* ``logits_rel`` — max |logits_lp - logits_64| / max |logits_64|.

Run:  python benchmarks/lowp_deviation.py [--size 64] [--images 6] [--json out.json]
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import time

import numpy as np
import torch
import torch.nn as nn
import torchvision
from PIL import Image
from scipy.stats import pearsonr
from skimage import data as skdata

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))
import naive_srd as N  # noqa: E402  (tiny reference networks)

import srd_fx  # noqa: E402

MEAN = np.array([0.485, 0.456, 0.406])
STD = np.array([0.229, 0.224, 0.225])


def images(size: int, n: int) -> torch.Tensor:
    """n real RGB images from scikit-image (centre crops, then shifted smaller crops), resized
    with Pillow and normalised with the ImageNet statistics."""
    srcs = [skdata.chelsea(), skdata.coffee(), skdata.astronaut(), skdata.rocket()]
    out = []
    for k in range(n):
        im = Image.fromarray(srcs[k % len(srcs)])
        w, h = im.size
        r = k // len(srcs)                      # 0: centre square, 1, 2, ...: smaller, shifted
        s = int(min(w, h) * (1.0 - 0.2 * r))
        x0, y0 = (w - s) // 2 + r * s // 10, (h - s) // 2
        a = np.asarray(im.crop((x0, y0, x0 + s, y0 + s)).resize((size, size), Image.BILINEAR),
                       dtype=np.float64) / 255.0
        out.append(((a - MEAN) / STD).transpose(2, 0, 1))
    return torch.tensor(np.stack(out), dtype=torch.float64)


def calibrate_bn(model: nn.Module, x: torch.Tensor) -> nn.Module:
    """Batch-norm running statistics = statistics of x (cumulative average over one pass)."""
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.reset_running_stats()
            m.momentum = None
    model.train()
    with torch.no_grad():
        model(x)
    return model.eval()


def models(size: int, calib: torch.Tensor):
    torch.manual_seed(0)
    out = {}
    out["resnet18"] = calibrate_bn(torchvision.models.resnet18(num_classes=10), calib.float()).double()
    out["vgg11_bn"] = calibrate_bn(torchvision.models.vgg11_bn(num_classes=10), calib.float()).double()
    out["mobilenet_v3_small"] = calibrate_bn(torchvision.models.mobilenet_v3_small(num_classes=10),
                                             calib.float()).double()
    out["tiny_resnet (tests/naive_srd)"] = N.resnet_tiny()[0]
    out["tiny_cat (tests/naive_srd)"] = N.cat_net()[0]
    return out


def conservation(o) -> float:
    lost = o.lost if o.lost is not None else 0
    num = (o.saliency.double().sum((1, 2)) + lost - o.R_L.double().sum((1, 2))).abs().detach()
    return (num / o.R_L.double().abs().sum((1, 2)).clamp_min(1e-300)).max().item()


def compare(m64: nn.Module, x64: torch.Tensor, dtype) -> dict:
    ref = srd_fx.compile(m64)(x64)
    tgt = ref.logits.argmax(1)   # same class in both precisions
    mlp = copy.deepcopy(m64)
    mlp = mlp.half() if dtype is torch.float16 else mlp.bfloat16()
    try:
        o = srd_fx.compile(mlp)(x64.to(dtype), target=tgt)
    except srd_fx.SRDError as e:
        return dict(error=f"{type(e).__name__}: {str(e)[:200]}")
    S, S64 = o.saliency.detach().double(), ref.saliency.detach()
    rel, nmax, pcc = [], [], []
    for b in range(x64.shape[0]):
        a, r = S[b].flatten(), S64[b].flatten()
        rel.append(((a - r).norm() / r.norm().clamp_min(1e-300)).item())
        nmax.append((a / a.abs().max().clamp_min(1e-300) - r / r.abs().max().clamp_min(1e-300)).abs().max().item())
        pcc.append(float(pearsonr(a.numpy(), r.numpy()).statistic) if r.std() > 0 and a.std() > 0 else float("nan"))
    return dict(finite=bool(torch.isfinite(o.saliency).all()), map_dtype=str(o.saliency.dtype).replace("torch.", ""),
                rel_l2_median=float(np.median(rel)), rel_l2_max=float(np.max(rel)),
                norm_max_median=float(np.median(nmax)), norm_max_max=float(np.max(nmax)),
                pearson_min=float(np.nanmin(pcc)), pearson_median=float(np.nanmedian(pcc)),
                conserve=conservation(o),
                logits_rel=((o.logits.double() - ref.logits).abs().max() / ref.logits.abs().max()).item())


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--size", type=int, default=64, help="input height and width in pixels")
    ap.add_argument("--images", type=int, default=6, help="number of images explained per model")
    ap.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    ap.add_argument("--json", default=None, help="also write the figures to this JSON file")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    x = images(args.size, args.images)
    calib = images(args.size, 8)
    results = {}
    t0 = time.time()
    for name, m in models(args.size, calib).items():
        xin = x if "tiny" not in name else x[:, :3, ::args.size // 8, ::args.size // 8].contiguous()
        for dt in (torch.float16, torch.bfloat16):
            r = compare(m, xin, dt)
            results[f"{name} / {str(dt).replace('torch.', '')}"] = r
            if "error" in r:
                print(f"{name:32s} {str(dt):15s} ERROR {r['error']}", flush=True)
                continue
            print(f"{name:32s} {str(dt).replace('torch.', ''):9s} finite={r['finite']} "
                  f"rel_l2 median {r['rel_l2_median']:.2e} max {r['rel_l2_max']:.2e} | "
                  f"display-map max|diff| median {r['norm_max_median']:.2e} max {r['norm_max_max']:.2e} | "
                  f"PCC min {r['pearson_min']:.4f} | conservation {r['conserve']:.1e} | "
                  f"logits {r['logits_rel']:.1e}", flush=True)
    print(f"({args.images} images of {args.size}x{args.size}; tiny nets on 8x8 subsamples; "
          f"{time.time() - t0:.0f} s, torch {torch.__version__}, {torch.get_num_threads()} threads)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
