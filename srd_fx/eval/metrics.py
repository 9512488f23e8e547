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
whole batch by default, and 0/0 for an all-zero map) is switched off.  Quantus draws its random
subsets and noise from NumPy's global generator: the functions here seed it (``seed``), so every
method is scored on the same feature subsets and noise draws.
"""
from __future__ import annotations

import contextlib
import hashlib
import io
import warnings
from dataclasses import dataclass
from typing import Callable, Optional

import numpy as np
import torch
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
    and of input features per subset; fidelity_baseline: the value the chosen features are set to
    (in model input space); stability_samples / stability_sigma: noise draws and their standard deviation; seed:
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


def _shared_faithfulness_class():
    import quantus

    class SharedFaithfulnessCorrelation(quantus.FaithfulnessCorrelation):
        """Quantus' ``FaithfulnessCorrelation`` whose random subsets and logit drops are computed once
        per input batch and reused for every further map of the same batch.

        The first call runs Quantus' own loop (the same random draws in the same order, the same
        perturbation function and model calls) and keeps the subsets and the logit drops; later
        calls on the same inputs only sum each map over the kept subsets and correlate.  The
        scores are therefore exactly Quantus' (a test checks this), while the 100 forward passes and
        the subset sampling are paid once per batch instead of once per method."""

        _shared = None

        def evaluate_batch(self, model, x_batch, y_batch, a_batch, **kwargs):
            if x_batch.shape != a_batch.shape:
                a_batch = np.broadcast_to(a_batch, x_batch.shape)
            batch_size = a_batch.shape[0]
            a_batch = a_batch.reshape(batch_size, -1)
            n_features = a_batch.shape[-1]
            key = (hashlib.blake2b(np.ascontiguousarray(x_batch).tobytes(), digest_size=16).digest(),
                   np.asarray(y_batch).tobytes(), self.nr_runs, self.subset_size)
            if self._shared is None or self._shared[0] != key:
                rows = np.arange(batch_size)
                x_input = model.shape_input(x_batch, x_batch.shape, channel_first=True, batched=True)
                y_pred = model.predict(x_input)[rows, y_batch]
                subsets, deltas = [], []
                for _ in range(self.nr_runs):
                    a_ix = np.stack([np.random.choice(n_features, self.subset_size, replace=False)
                                     for _ in range(batch_size)], axis=0)
                    x_perturbed = self.perturb_func(arr=x_batch.reshape(batch_size, -1), indices=a_ix)
                    x_input = model.shape_input(x_perturbed.reshape(*x_batch.shape), x_batch.shape,
                                                channel_first=True, batched=True)
                    deltas.append(y_pred - model.predict(x_input)[rows, y_batch])
                    subsets.append(a_ix)
                self._shared = (key, subsets, np.stack(deltas, axis=1))
            _, subsets, pred_deltas = self._shared
            att_sums = np.stack([a_batch[np.arange(batch_size)[:, None], a_ix].sum(axis=-1) for a_ix in subsets],
                                axis=1)
            return self.similarity_func(a=att_sums, b=pred_deltas, batched=True).tolist()

    return SharedFaithfulnessCorrelation


def fidelity_metric(settings: MetricSettings = MetricSettings(), shared: bool = True):
    """The Fidelity metric object: Quantus' ``FaithfulnessCorrelation`` with the paper's settings
    (``shared=True``: the subclass that reuses one batch's subsets and logit drops across maps)."""
    import quantus
    cls = _shared_faithfulness_class() if shared else quantus.FaithfulnessCorrelation
    return _make(cls, nr_runs=settings.fidelity_runs, subset_size=settings.fidelity_subset,
                 perturb_baseline=float(settings.fidelity_baseline), abs=False, normalise=False,
                 return_aggregate=False, disable_warnings=True)


def fidelity(model, x, y, a, settings: MetricSettings = MetricSettings(), metric=None) -> np.ndarray:
    """Quantus ``FaithfulnessCorrelation`` (Bhatt et al.): Pearson correlation, over random subsets
    of input features, between the summed attribution of the subset and the drop of the target
    logit when the subset is set to ``settings.fidelity_baseline``.  Pass the same ``metric``
    (from :func:`fidelity_metric`) for every map of one batch to share the forward passes."""
    x, y, a = _np(x), _np(y), _np(a)
    _check(x, a)
    if metric is None:
        metric = fidelity_metric(settings)
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
