"""Loading models, weights and images the way the command line does (usable from Python too).

    from srd_fx.eval.io import load_model, find_images, read_image, preprocess, overlay
    model = load_model("resnet50", weights="resnet50.pth")          # torchvision / timm / factory
    x, rgb = preprocess(read_image("cat.jpg"), size=224)            # (1, 3, 224, 224), (224, 224, 3)

Model names (:func:`load_model`):

* ``resnet50``: a torchvision name, else a timm name (``efficientnet_b0``);
* ``torchvision:resnet50``, ``timm:resnet50``: one library explicitly;
* ``package.module:factory`` or ``path/to/file.py:factory``: a callable (function or class) that
  returns the ``nn.Module``; called with ``num_classes=`` when that is given.

Every failure raises :class:`ModelLoadError` (a ``ValueError``) with a message that says what was
wrong and what to do; the CLI prints it without a traceback.
"""
from __future__ import annotations

import contextlib
import difflib
import glob
import importlib
import importlib.util
import os
import sys
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image, UnidentifiedImageError

from ..errors import SRDError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
#: scikit-image photos usable by name instead of a file
BUNDLED = ("chelsea", "coffee", "astronaut", "rocket")
#: the one photo shipped inside the package (scikit-image's ``chelsea``, CC0), so that
#: ``srd-fx explain`` works from an installed wheel without scikit-image
PACKAGED_PHOTOS = {"chelsea": os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                           "data", "chelsea.jpg")}
IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")

__all__ = ["ModelLoadError", "load_model", "read_state_dict", "num_classes_of", "model_preprocessing", "find_images",
           "read_image", "preprocess", "upsample", "overlay", "overlay_rgba", "BUNDLED", "IMAGENET_MEAN", "IMAGENET_STD"]


class ModelLoadError(SRDError, ValueError):
    """A model name, factory or weights file that cannot be used (the message says why)."""


# ----------------------------------------------------------------------------- models -------------
def _suggest(name: str, candidates: Sequence[str], n: int = 3) -> str:
    close = difflib.get_close_matches(name, list(dict.fromkeys(candidates)), n=n, cutoff=0.6)
    return f" Did you mean {', '.join(close)}?" if close else ""


def _torchvision_names() -> List[str]:
    import torchvision
    return list(torchvision.models.list_models())


def _timm_names() -> List[str]:
    try:
        import timm
    except ImportError:  # pragma: no cover - timm is a dependency
        return []
    return list(timm.list_models())


def _reachable(url: str, timeout: float = 3.0) -> bool:
    """Whether a TCP connection to ``url``'s host can be opened within ``timeout`` seconds."""
    import socket
    from urllib.parse import urlparse
    u = urlparse(url)
    try:
        socket.create_connection((u.hostname, u.port or (443 if u.scheme == "https" else 80)),
                                 timeout=timeout).close()
        return True
    except (OSError, ValueError):
        return False


@contextlib.contextmanager
def _hub_offline_if_unreachable():
    """Without network, huggingface_hub (timm's downloader) retries for about 50 s before it
    gives up.  When its endpoint cannot be reached, run in its offline mode instead: cached
    weights still load, missing ones fail at once.  Yields the unreachable endpoint, or None."""
    try:
        from huggingface_hub import constants
    except ImportError:  # pragma: no cover - timm depends on it
        yield None
        return
    if constants.HF_HUB_OFFLINE or _reachable(constants.ENDPOINT):
        yield None
        return
    constants.HF_HUB_OFFLINE = True
    try:
        yield constants.ENDPOINT
    finally:
        constants.HF_HUB_OFFLINE = False


def _from_library(lib: str, arch: str, pretrained: bool, num_classes: Optional[int]) -> nn.Module:
    kw = {} if num_classes is None else {"num_classes": int(num_classes)}
    offline = None
    try:
        if lib == "torchvision":
            import torchvision
            if pretrained:  # fail at once when the file is neither cached nor reachable
                url = torchvision.models.get_model_weights(arch).DEFAULT.url
                cached = os.path.join(torch.hub.get_dir(), "checkpoints", os.path.basename(url))
                if not os.path.exists(cached) and not _reachable(url):
                    offline = url
                    raise ConnectionError(url)
            return torchvision.models.get_model(arch, weights="DEFAULT" if pretrained else None, **kw)
        import timm
        if not pretrained:
            return timm.create_model(arch, pretrained=False, **kw)
        with _hub_offline_if_unreachable() as offline:
            return timm.create_model(arch, pretrained=True, **kw)
    except Exception as e:  # no network / no cached download / bad kwargs
        if pretrained:
            why = (f"{offline} cannot be reached and the weights are not in the local cache" if offline
                   else f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")
            raise ModelLoadError(
                f"could not get {lib}'s pretrained weights for {arch!r} ({why}). Without network access, "
                f"download the weights elsewhere and pass them with --weights FILE.") from None
        raise ModelLoadError(f"{lib} could not build {arch!r}: {type(e).__name__}: {e}") from None


def _import_factory(spec: str):
    """``package.module:attr`` or ``path/to/file.py:attr`` -> the attribute."""
    mod_name, _, attr = spec.rpartition(":")
    if not mod_name or not attr:
        raise ModelLoadError(f"{spec!r} is not of the form package.module:factory or file.py:factory")
    if mod_name.endswith(".py"):
        path = os.path.abspath(mod_name)
        if not os.path.exists(path):
            raise ModelLoadError(f"model file {mod_name!r} does not exist (in {spec!r})")
        unique = "_srd_fx_user_" + os.path.splitext(os.path.basename(path))[0]
        try:
            loader_spec = importlib.util.spec_from_file_location(unique, path)
            module = importlib.util.module_from_spec(loader_spec)
            sys.modules[unique] = module
            loader_spec.loader.exec_module(module)
        except Exception as e:
            sys.modules.pop(unique, None)
            raise ModelLoadError(f"importing {mod_name!r} failed: {type(e).__name__}: {e}") from None
    else:
        # as with ``python -m``, a module in the working directory is importable (the ``srd-fx``
        # console script does not put the working directory on sys.path by itself)
        if "" not in sys.path and os.getcwd() not in sys.path:
            sys.path.insert(0, os.getcwd())
        try:
            module = importlib.import_module(mod_name)
        except ImportError as e:
            raise ModelLoadError(f"cannot import module {mod_name!r} (from {spec!r}): {e}. Run from the "
                                 "folder that holds it, add it to PYTHONPATH, or give path/to/file.py:factory"
                                 ) from None
    if not hasattr(module, attr):
        public = [n for n in dir(module) if not n.startswith("_") and callable(getattr(module, n, None))]
        raise ModelLoadError(f"module {mod_name!r} has no attribute {attr!r}." + _suggest(attr, public))
    return getattr(module, attr)


def read_state_dict(path: str) -> Dict[str, torch.Tensor]:
    """The state dict stored in ``path`` (also inside a ``{"state_dict": ...}``/``{"model": ...}``
    checkpoint; a ``module.`` prefix from ``DataParallel`` is removed).  Files are read with
    ``weights_only=True``: a pickled whole model is refused with advice."""
    if not os.path.isfile(path):
        raise ModelLoadError(f"weights file {path!r} does not exist")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise ModelLoadError(
            f"could not read weights from {path!r} ({type(e).__name__}: {str(e).splitlines()[0][:200]}). "
            "srd-fx reads state dicts only (files are not unpickled, for safety): save them with "
            "torch.save(model.state_dict(), path)") from None
    if isinstance(obj, dict):
        for key in ("state_dict", "model_state_dict", "model", "module"):
            if isinstance(obj.get(key), dict):
                obj = obj[key]
                break
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ModelLoadError(f"{path!r} does not hold a state dict of tensors (got {type(obj).__name__}); "
                             "save one with torch.save(model.state_dict(), path)")
    if obj and all(k.startswith("module.") for k in obj):
        obj = {k[len("module."):]: v for k, v in obj.items()}
    return obj


def num_classes_of(path: Optional[str]) -> Optional[int]:
    """The class count of a state-dict file: the row count of its last 2-D weight (the
    classifier's), or None (no file, or no such weight)."""
    if not path:
        return None
    last = [v for k, v in read_state_dict(path).items() if k.endswith("weight") and v.dim() == 2]
    return int(last[-1].shape[0]) if last else None


def _load_weights(model: nn.Module, path: str, name: str) -> None:
    sd = read_state_dict(path)
    own = model.state_dict()
    missing = [k for k in own if k not in sd]
    unexpected = [k for k in sd if k not in own]
    shapes = [(k, tuple(sd[k].shape), tuple(own[k].shape)) for k in own
              if k in sd and tuple(sd[k].shape) != tuple(own[k].shape)]
    if missing or unexpected or shapes:
        parts = []
        if shapes:
            parts.append("shape mismatches " + ", ".join(f"{k}: file {a} vs model {b}" for k, a, b in shapes[:4])
                         + (f" (+{len(shapes) - 4} more)" if len(shapes) > 4 else ""))
        if missing:
            parts.append(f"{len(missing)} tensors missing from the file, e.g. {missing[:3]}")
        if unexpected:
            parts.append(f"{len(unexpected)} tensors in the file that the model lacks, e.g. {unexpected[:3]}")
        hint = "check the model name (it must be the architecture the weights were trained with)"
        # only the last layer differs, and only in its number of outputs: a different class count
        last = next(reversed(own)).rsplit(".", 1)[0] if own else None
        if shapes and not missing and not unexpected and all(
                k.rsplit(".", 1)[0] == last and len(a) == len(b) and a[1:] == b[1:] for k, a, b in shapes):
            k_file = shapes[0][1][0]
            hint = f"the file's classifier has {k_file} outputs: pass --num-classes {k_file}"
        raise ModelLoadError(f"the weights in {path!r} do not match {name!r}: " + "; ".join(parts)
                             + f". Hint: {hint}.")
    model.load_state_dict(sd, strict=True)


def load_model(name: str, weights: Optional[str] = None, pretrained: bool = False,
               num_classes: Optional[int] = None) -> nn.Module:
    """A model by name (see the module docstring), optionally with a state-dict file, in eval mode.

    name:        torchvision/timm name, ``torchvision:NAME``, ``timm:NAME``, ``package.module:factory``
                 or ``path/to/file.py:factory``;
    weights:     a state-dict file (``torch.save(model.state_dict(), path)``) loaded strictly;
    pretrained:  ask the library for its pretrained weights (needs network access or a cache);
    num_classes: classifier size passed to the library / the factory.

    Raises :class:`ModelLoadError` (a ValueError) with a suggestion for unknown names, unreadable or
    mismatched weights."""
    if weights and pretrained:
        raise ModelLoadError("give either weights=FILE (--weights) or pretrained=True (--pretrained), not both")
    if not isinstance(name, str) or not name.strip():
        raise ModelLoadError(f"a model name is needed, got {name!r}")
    name = name.strip()
    lib, sep, rest = name.partition(":")
    if sep and lib in ("torchvision", "timm"):
        names = _torchvision_names() if lib == "torchvision" else _timm_names()
        if rest not in names:
            raise ModelLoadError(f"{lib} has no model {rest!r}." + _suggest(rest, names))
        model = _from_library(lib, rest, pretrained, num_classes)
    elif sep:
        if pretrained:
            raise ModelLoadError("--pretrained applies to torchvision/timm names; a factory builds its own "
                                 "model: pass its weights with --weights FILE")
        factory = _import_factory(name)
        if isinstance(factory, nn.Module):
            model = factory
        elif callable(factory):
            try:
                model = factory() if num_classes is None else factory(num_classes=int(num_classes))
            except Exception as e:
                raise ModelLoadError(f"calling {name} failed: {type(e).__name__}: {e}") from None
        else:
            raise ModelLoadError(f"{name} is a {type(factory).__name__}, not a callable returning an nn.Module")
        if not isinstance(model, nn.Module):
            raise ModelLoadError(f"{name} returned a {type(model).__name__}, not a torch.nn.Module")
    else:
        tv = _torchvision_names()
        if name in tv:
            model = _from_library("torchvision", name, pretrained, num_classes)
        else:
            tm = _timm_names()
            if name not in tm:
                raise ModelLoadError(
                    f"unknown model {name!r}: not a torchvision or timm model name." + _suggest(name, tv + tm)
                    + " Give a torchvision name (resnet50), a timm name (efficientnet_b0) or your own "
                      "package.module:factory / file.py:factory.")
            model = _from_library("timm", name, pretrained, num_classes)
    if weights:
        _load_weights(model, weights, name)
    return model.eval()


def model_preprocessing(model: nn.Module, size: Optional[int] = None, mean=None, std=None
                        ) -> Tuple[int, Tuple[float, ...], Tuple[float, ...]]:
    """(input side, mean, std) for ``model``: the given values, else a timm model's
    ``pretrained_cfg`` (input size, mean, std), else 224 and the ImageNet statistics."""
    cfg = getattr(model, "pretrained_cfg", None) or getattr(model, "default_cfg", None) or {}
    if size is None:
        size = int(cfg["input_size"][-1]) if cfg.get("input_size") else 224
    mean = tuple(mean) if mean is not None else tuple(cfg.get("mean") or IMAGENET_MEAN)
    std = tuple(std) if std is not None else tuple(cfg.get("std") or IMAGENET_STD)
    return int(size), mean, std


# ----------------------------------------------------------------------------- images -------------
def find_images(spec: str) -> List[str]:
    """An image file, a folder (its images, sorted), a glob pattern, or a bundled scikit-image photo
    name (:data:`BUNDLED`)."""
    if spec in BUNDLED:
        return [spec]
    if os.path.isdir(spec):
        files = sorted(f for f in glob.glob(os.path.join(spec, "*")) if f.lower().endswith(IMAGE_EXTS))
        if not files:
            raise FileNotFoundError(f"folder {spec!r} holds no image ({', '.join(IMAGE_EXTS)})")
        return files
    if any(ch in spec for ch in "*?["):
        files = sorted(f for f in glob.glob(spec) if os.path.isfile(f))
        if not files:
            raise FileNotFoundError(f"the pattern {spec!r} matches no file")
        return files
    if not os.path.exists(spec):
        raise FileNotFoundError(f"no image {spec!r}: give a file, a folder, a glob (quoted, e.g. "
                                f"'photos/*.jpg') or one of the bundled photos {', '.join(BUNDLED)}")
    return [spec]


def read_image(spec: str) -> Image.Image:
    """A file or a bundled photo name, as an RGB Pillow image."""
    if spec in PACKAGED_PHOTOS and os.path.exists(PACKAGED_PHOTOS[spec]):
        return Image.open(PACKAGED_PHOTOS[spec]).convert("RGB")
    if spec in BUNDLED:
        import skimage.data
        return Image.fromarray(getattr(skimage.data, spec)()[..., :3]).convert("RGB")
    try:
        return Image.open(spec).convert("RGB")
    except (UnidentifiedImageError, OSError) as e:
        raise ValueError(f"{spec!r} is not an image Pillow can read ({e})") from None


def preprocess(img: Image.Image, size: int = 224, mean=IMAGENET_MEAN, std=IMAGENET_STD
               ) -> Tuple[torch.Tensor, np.ndarray]:
    """Resize (shorter side to ``size``) and centre-crop to ``size`` x ``size``; returns the normalised
    tensor (1, 3, size, size) and the cropped RGB image as floats in [0, 1] (size, size, 3)."""
    if int(size) < 1:
        raise ValueError(f"size must be a positive number of pixels, got {size}")
    w, h = img.size
    s = size / min(w, h)
    img = img.resize((max(size, round(w * s)), max(size, round(h * s))), Image.BILINEAR)
    w, h = img.size
    left, top = (w - size) // 2, (h - size) // 2
    img = img.crop((left, top, left + size, top + size))
    arr = np.asarray(img, dtype=np.float32) / 255.0
    t = torch.from_numpy(arr.copy()).permute(2, 0, 1)
    t = (t - torch.tensor(mean, dtype=t.dtype)[:, None, None]) / torch.tensor(std, dtype=t.dtype)[:, None, None]
    return t[None], arr


def upsample(maps: torch.Tensor, size: Tuple[int, int]) -> torch.Tensor:
    """(B, h, w) maps resized bilinearly to ``size`` (unchanged when already that size)."""
    if tuple(maps.shape[-2:]) == tuple(size):
        return maps
    return F.interpolate(maps[:, None].float(), size=tuple(size), mode="bilinear", align_corners=False)[:, 0]


def overlay_rgba(m: np.ndarray, cmap="bwr", alpha: float = 0.7) -> np.ndarray:
    """The colour layer of :func:`overlay` for a map ``m`` in [-1, 1]: ``cmap`` on [-1, 1] (zero at
    its centre) with opacity ``alpha * |m|``, so that zero relevance leaves the photo as it is."""
    import matplotlib
    cm = matplotlib.colormaps[cmap] if isinstance(cmap, str) else cmap
    rgba = cm(matplotlib.colors.Normalize(vmin=-1.0, vmax=1.0)(np.asarray(m, dtype=np.float64)))
    rgba[..., 3] = alpha * np.abs(m)
    return rgba


def overlay(rgb: np.ndarray, sal: np.ndarray, path: str, title: str = "", cmap: str = "bwr",
            alpha: float = 0.7) -> None:
    """Save a two-panel PNG: the image, and the image with the map on top.

    The map is divided by its largest magnitude and drawn on [-1, 1], centred on zero (use a
    diverging colormap: the default ``bwr`` shows positive relevance red and negative blue).  The
    map's opacity is ``alpha * |map|``: where the relevance is zero the photo shows through
    unchanged."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    try:
        cm = matplotlib.colormaps[cmap]
    except KeyError:
        raise ValueError(f"unknown matplotlib colormap {cmap!r}." + _suggest(cmap, list(matplotlib.colormaps))
                         ) from None
    sal = np.asarray(sal, dtype=np.float64)
    if not np.isfinite(sal).all():
        raise FloatingPointError("the map has NaN or infinite values")
    rgba = overlay_rgba(sal / (np.abs(sal).max() + 1e-12), cm, alpha)
    norm = matplotlib.colors.Normalize(vmin=-1.0, vmax=1.0)
    fig, axes = plt.subplots(1, 2, figsize=(8, 4))
    axes[0].imshow(rgb)
    axes[0].set_title("input")
    axes[1].imshow(rgb)
    axes[1].imshow(rgba)
    axes[1].set_title(title or "SRD")
    fig.colorbar(matplotlib.cm.ScalarMappable(norm=norm, cmap=cm), ax=axes[1], fraction=0.046)
    for a in axes:
        a.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
