"""The paper's five desiderata metrics (Sec. 4.2, Appendix E), computed by Quantus.

Every map is first *prepared* the same way (SPEC §2 and §6): resized bilinearly to the input size,
divided by its maximum, and clamped to [-1, 1] (:func:`prepare`).  Then, per image:

=================  =======================================  ==========================================
metric             Quantus class                            settings
=================  =======================================  ==========================================
Pointing (↑)       ``PointingGame``                         mask dilated by a tolerance (15 px at
                                                            224 px, scaled to the input size)
Attribution (↑)    ``AttributionLocalisation``              positive relevance inside the mask / total
                                                            positive relevance (Appendix E)
Sparseness (↑)     ``Sparseness``                           Gini index of |map|
Fidelity (↑)       ``FaithfulnessCorrelation``              Bhatt et al.: 100 runs, 200 random input
                                                            features (pixel, channel) set to 0,
                                                            Pearson correlation of summed attribution
                                                            and target-logit drop (Quantus' sampling)
Stability (↓)      ``LocalLipschitzEstimate``               Gaussian noise sigma 0.1, max over 10
                                                            samples of ||phi(x)-phi(x')|| / ||x-x'||
=================  =======================================  ==========================================

The normalisation is done by :func:`prepare`, per map; Quantus' own (``normalise_by_max``, over the
whole batch by default, and 0/0 for an all-zero map) is switched off.  Quantus draws its random subsets and noise from NumPy's global generator: the functions
here seed it (``seed``), so every method is scored on the same pixel subsets and noise draws.
"""
from __future__ import annotations

import contextlib
import hashlib
import io
import warnings
from dataclasses import dataclass, field
from typing import Callable, Dict, Optional

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

#: metric name -> True when higher is better
HIGHER_IS_BETTER = {"Pointing": True, "Attribution": True, "Sparseness": True, "Fidelity": True,
                    "Stability": False}
METRIC_NAMES = tuple(HIGHER_IS_BETTER)


@dataclass
class MetricSettings:
    """The evaluation settings (defaults: the paper's, scaled to the input size where they are sizes).

    pointing_tolerance: pixels the mask is dilated by for the Pointing Game (None: 15 px at 224 px,
    scaled to the input); fidelity_runs / fidelity_subset: Bhatt et al.'s number of random subsets
    and pixels per subset; fidelity_baseline: the value the chosen pixels are set to (in model input
    space); stability_samples / stability_sigma: noise draws and their standard deviation; seed:
    NumPy seed for Quantus' random draws."""
    pointing_tolerance: Optional[int] = None
    fidelity_runs: int = 100
    fidelity_subset: int = 200
    fidelity_baseline: float = 0.0
    stability_samples: int = 10
    stability_sigma: float = 0.1
    seed: int = 0

    def tolerance(self, size: int) -> int:
        if self.pointing_tolerance is not None:
            return int(self.pointing_tolerance)
        return int(round(15 * size / 224))


# ----------------------------------------------------------------------------- map preparation ----
def prepare(maps: torch.Tensor, size=None) -> torch.Tensor:
    """Resize (B, h, w) maps bilinearly to ``size`` (H, W), divide each by its maximum (by its
    largest magnitude when the maximum is not positive; an all-zero map stays zero), clamp to
    [-1, 1].  Raises on NaN or infinity."""
    maps = torch.as_tensor(maps).detach().to(torch.float32)
    if maps.dim() == 2:
        maps = maps[None]
    if maps.dim() != 3:
        raise ValueError(f"expected (B, H, W) maps, got shape {tuple(maps.shape)}")
    if not torch.isfinite(maps).all():
        raise FloatingPointError("attribution maps contain NaN or infinity")
    if size is not None and tuple(maps.shape[-2:]) != tuple(size):
        maps = F.interpolate(maps[:, None], size=tuple(size), mode="bilinear", align_corners=False)[:, 0]
    flat = maps.flatten(1)
    top = flat.max(1).values
    mag = flat.abs().max(1).values
    scale = torch.where(top > 0, top, mag)
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    return (maps / scale[:, None, None]).clamp(-1, 1)


def dilate_masks(masks, radius: int) -> np.ndarray:
    """Masks (B, H, W) dilated by a disk of ``radius`` pixels (the Pointing Game's tolerance)."""
    from scipy.ndimage import binary_dilation
    masks = np.asarray(masks, dtype=bool)
    if radius <= 0:
        return masks
    r = int(radius)
    yy, xx = np.mgrid[-r:r + 1, -r:r + 1]
    disk = (yy ** 2 + xx ** 2) <= r * r
    return np.stack([binary_dilation(m, structure=disk) for m in masks])


@contextlib.contextmanager
def _quiet():
    """Silence Quantus' printed advice and warnings (the settings here are deliberate)."""
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        yield


def _make(cls, **kw):
    with _quiet():
        return cls(**kw)


def _np(t) -> np.ndarray:
    return t.detach().cpu().numpy() if isinstance(t, torch.Tensor) else np.asarray(t)


def _check(x, a, s=None):
    if x.ndim != 4:
        raise ValueError(f"x must be (B, C, H, W), got shape {x.shape}")
    if a.shape != (x.shape[0],) + x.shape[2:]:
        raise ValueError(f"maps must be (B, H, W) = {(x.shape[0],) + x.shape[2:]}, got {a.shape}; "
                         f"run metrics.prepare(maps, size) first")
    if s is not None:
        if s.shape != a.shape:
            raise ValueError(f"masks must have the maps' shape {a.shape}, got {s.shape}")
        if not s.reshape(len(s), -1).any(1).all():
            raise ValueError("a mask is empty: localisation metrics need at least one foreground pixel")


# ----------------------------------------------------------------------------- metrics ------------
def pointing_game(model, x, y, a, s, tolerance: int = 0) -> np.ndarray:
    """Quantus ``PointingGame``: 1 where the map's maximum falls in the (dilated) mask, else 0."""
    import quantus
    x, y, a, s = _np(x), _np(y), _np(a), _np(s).astype(bool)
    _check(x, a, s)
    s = dilate_masks(s, tolerance)
    metric = _make(quantus.PointingGame, abs=False, normalise=False, disable_warnings=True)
    with _quiet():
        scores = metric(model=model, x_batch=x, y_batch=y, a_batch=a[:, None], s_batch=s[:, None],
                        device="cpu", batch_size=len(x))
    return np.asarray(scores, dtype=np.float64)


def attribution_localisation(model, x, y, a, s) -> np.ndarray:
    """Quantus ``AttributionLocalisation``: positive relevance inside the mask over all positive
    relevance (Kohlbrenner et al.; Appendix E)."""
    import quantus
    x, y, a, s = _np(x), _np(y), _np(a), _np(s).astype(bool)
    _check(x, a, s)
    metric = _make(quantus.AttributionLocalisation, positive_attributions=True, abs=False, normalise=False,
                                             disable_warnings=True)
    with _quiet():
        scores = metric(model=model, x_batch=x, y_batch=y, a_batch=a[:, None], s_batch=s[:, None],
                        device="cpu", batch_size=len(x))
    return np.asarray(scores, dtype=np.float64)


def sparseness(model, x, y, a) -> np.ndarray:
    """Quantus ``Sparseness``: the Gini index of |map| (Chalasani et al.)."""
    import quantus
    x, y, a = _np(x), _np(y), _np(a)
    _check(x, a)
    metric = _make(quantus.Sparseness, abs=True, normalise=False, disable_warnings=True)
    with _quiet():
        scores = metric(model=model, x_batch=x, y_batch=y, a_batch=a[:, None].copy(), device="cpu",
                        batch_size=len(x))
    return np.asarray(scores, dtype=np.float64)


class CachedForward(nn.Module):
    """Wraps a model and remembers its output for each exact input batch seen (keyed by a hash of
    the input's bytes).  Fidelity's perturbed inputs depend only on the image and the seeded random
    subsets, not on the method, so with this wrapper the forward passes are shared by every method
    scored on the same batch: the results are identical, the work is done once."""

    def __init__(self, model: nn.Module, max_entries: int = 512):
        super().__init__()
        self.model = model
        self.max_entries = max_entries
        self._memo: Dict[bytes, torch.Tensor] = {}
        self.hits = self.misses = 0

    def forward(self, x):
        xc = x.detach().contiguous().cpu()
        key = hashlib.blake2b(xc.numpy().tobytes(), digest_size=16).digest() + repr((tuple(xc.shape), xc.dtype)).encode()
        hit = self._memo.get(key)
        if hit is not None:
            self.hits += 1
            return hit.clone()
        self.misses += 1
        out = self.model(x)
        if len(self._memo) >= self.max_entries:
            self._memo.pop(next(iter(self._memo)))
        self._memo[key] = out.detach().clone()
        return out


def fidelity(model, x, y, a, settings: MetricSettings = MetricSettings()) -> np.ndarray:
    """Quantus ``FaithfulnessCorrelation`` (Bhatt et al.): Pearson correlation, over random pixel
    subsets, between the summed attribution of the subset and the drop of the target logit when
    the subset is set to ``settings.fidelity_baseline``."""
    import quantus
    x, y, a = _np(x), _np(y), _np(a)
    _check(x, a)
    metric = _make(quantus.FaithfulnessCorrelation, 
        nr_runs=settings.fidelity_runs, subset_size=settings.fidelity_subset,
        perturb_baseline=float(settings.fidelity_baseline), abs=False, normalise=False,
        return_aggregate=False, disable_warnings=True)
    np.random.seed(settings.seed)
    with _quiet():
        scores = metric(model=model, x_batch=x, y_batch=y, a_batch=a[:, None].copy(), device="cpu",
                        softmax=False, batch_size=len(x))
    return np.asarray(scores, dtype=np.float64)


def stability(model, x, y, a, explain: Callable, settings: MetricSettings = MetricSettings()) -> np.ndarray:
    """Quantus ``LocalLipschitzEstimate`` (Alvarez-Melis & Jaakkola): max over noisy copies x' of
    ||phi(x) - phi(x')|| / ||x - x'||.  ``explain(model, x_tensor, target_tensor) -> (B, H, W)``
    must return *prepared* maps (see :func:`prepare`)."""
    import quantus
    x, y, a = _np(x), _np(y), _np(a)
    _check(x, a)

    def explain_func(model, inputs, targets, **kw):
        xt = torch.as_tensor(np.asarray(inputs), dtype=torch.float32)
        tt = torch.as_tensor(np.asarray(targets), dtype=torch.long)
        return _np(explain(model, xt, tt))[:, None]

    metric = _make(quantus.LocalLipschitzEstimate, 
        nr_samples=settings.stability_samples, perturb_std=settings.stability_sigma, perturb_mean=0.0,
        abs=False, normalise=False, return_aggregate=False,
        disable_warnings=True)
    np.random.seed(settings.seed)
    with _quiet():
        scores = metric(model=model, x_batch=x, y_batch=y, a_batch=a[:, None].copy(), device="cpu",
                        explain_func=explain_func, batch_size=len(x))
    return np.asarray(scores, dtype=np.float64)
