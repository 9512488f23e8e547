"""Loading models and images for the command line (and for users who want the same defaults)."""
from __future__ import annotations

import glob
import importlib
import os
from typing import List, Optional, Tuple

import numpy as np
import torch
import torch.nn as nn
from PIL import Image

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
BUNDLED = ("chelsea", "coffee", "astronaut", "rocket")


def load_model(name: str, weights: Optional[str] = None, pretrained: bool = False,
               num_classes: Optional[int] = None) -> nn.Module:
    """A model by torchvision name, timm name, or ``package.module:factory``; eval mode."""
    if ":" in name:
        mod, fn = name.split(":", 1)
        try:
            factory = getattr(importlib.import_module(mod), fn)
        except (ImportError, AttributeError) as e:
            raise SystemExit(f"cannot import {name!r}: {e}")
        model = factory()
    else:
        model = None
        import torchvision
        kw = {} if num_classes is None else {"num_classes": num_classes}
        if name in torchvision.models.list_models():
            model = torchvision.models.get_model(name, weights="DEFAULT" if pretrained else None, **kw)
        else:
            import timm
            if timm.is_model(name):
                model = timm.create_model(name, pretrained=pretrained, **kw)
        if model is None:
            raise SystemExit(f"unknown model {name!r}: give a torchvision name (e.g. resnet50), a timm "
                             "name (e.g. efficientnet_b0) or package.module:factory")
    if weights:
        state = torch.load(weights, map_location="cpu", weights_only=False)
        if isinstance(state, dict):
            for key in ("state_dict", "model", "model_state_dict"):
                if key in state and isinstance(state[key], dict):
                    state = state[key]
        if isinstance(state, nn.Module):
            state = state.state_dict()
        try:
            model.load_state_dict(state)
        except RuntimeError as e:
            raise SystemExit(f"the weights in {weights} do not match {name}: {str(e).splitlines()[0]} "
                             "(check the architecture name and --num-classes)")
    return model.eval()


def find_images(spec: str) -> List[str]:
    """An image file, a folder (its images), a glob, or a bundled scikit-image photo name."""
    if spec in BUNDLED:
        return [spec]
    if os.path.isdir(spec):
        files = sorted(f for f in glob.glob(os.path.join(spec, "*"))
                       if f.lower().endswith((".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")))
    elif any(ch in spec for ch in "*?["):
        files = sorted(glob.glob(spec))
    else:
        files = [spec] if os.path.exists(spec) else []
    if not files:
        raise SystemExit(f"no image found for {spec!r} (a file, a folder, a glob, or one of {BUNDLED})")
    return files


def read_image(spec: str) -> Image.Image:
    if spec in BUNDLED:
        import skimage.data
        return Image.fromarray(getattr(skimage.data, spec)()).convert("RGB")
    return Image.open(spec).convert("RGB")


def preprocess(img: Image.Image, size: int = 224, mean=IMAGENET_MEAN, std=IMAGENET_STD) -> Tuple[torch.Tensor, np.ndarray]:
    """Resize (shorter side) + centre crop to ``size``; returns (normalised tensor (1,3,s,s), RGB array)."""
    w, h = img.size
    s = size / min(w, h)
    img = img.resize((max(size, round(w * s)), max(size, round(h * s))), Image.BILINEAR)
    w, h = img.size
    left, top = (w - size) // 2, (h - size) // 2
    img = img.crop((left, top, left + size, top + size))
    arr = np.asarray(img, dtype=np.float32) / 255.0
    t = torch.from_numpy(arr).permute(2, 0, 1)
    t = (t - torch.tensor(mean)[:, None, None]) / torch.tensor(std)[:, None, None]
    return t[None], arr


def overlay(rgb: np.ndarray, sal: np.ndarray, path: str, title: str = "", cmap: str = "jet",
            alpha: float = 0.5) -> None:
    """Save the image with the normalised saliency map on top (matplotlib)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    m = sal / (np.abs(sal).max() + 1e-12)
    fig, axes = plt.subplots(1, 2, figsize=(8, 4))
    axes[0].imshow(rgb)
    axes[0].set_title("input")
    axes[1].imshow(rgb)
    im = axes[1].imshow(np.clip(m, 0, 1) if m.min() >= 0 else m, cmap=cmap, alpha=alpha,
                        vmin=0 if m.min() >= 0 else -1, vmax=1)
    axes[1].set_title(title or "SRD")
    fig.colorbar(im, ax=axes[1], fraction=0.046)
    for a in axes:
        a.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
