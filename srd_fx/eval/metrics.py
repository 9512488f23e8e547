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
                                                            and target-logit drop (Quantus' sampling);
                                                            other protocols: FIDELITY_PROTOCOLS
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
import dataclasses
import hashlib
import io
import warnings
from dataclasses import dataclass
from typing import Callable, Optional, Union

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
    fidelity_baseline: Union[float, str] = 0.0
    stability_samples: int = 10
    stability_sigma: float = 0.1
    seed: int = 0
    #: Fidelity protocol details (see :data:`FIDELITY_PROTOCOLS`): draw whole pixels (all channels
    #: replaced, Quantus 0.5) instead of single channel values (Quantus 0.6); a fraction of the
    #: pixels / channel values instead of the count ``fidelity_subset``; clamp the max-normalised
    #: maps to [-1, 1]; let Quantus normalise the maps by their maximum (``normalise_by_max``)
    fidelity_pixels: bool = False
    fidelity_fraction: Optional[float] = None
    fidelity_clamp: bool = True
    fidelity_normalise: bool = False

    def tolerance(self, size: int) -> int:
        if self.pointing_tolerance is not None:
            return int(self.pointing_tolerance)
        return int(round(15 * size / 224))

    def subset_size(self, shape) -> int:
        """Fidelity's subset size for inputs shaped ``(B, C, H, W)``: ``fidelity_subset`` features, or
        ``fidelity_fraction`` of the pixels (``fidelity_pixels``) or of the channel values."""
        c, h, w = shape[-3:]
        n = h * w if self.fidelity_pixels else c * h * w
        k = int(self.fidelity_subset) if self.fidelity_fraction is None else \
            int(round(float(self.fidelity_fraction) * n))
        if not 1 <= k <= n:
            raise ValueError(f"Fidelity subset of {k} {'pixels' if self.fidelity_pixels else 'channel values'} "
                             f"for a {c}x{h}x{w} input: it must be between 1 and {n}")
        return k


#: Fidelity protocols: name -> the MetricSettings fields they set.
#: ``quantus-0.6`` (the default, this project's numbers since Table 2/4 were first made): Quantus 0.6's
#: sampling (single channel values out of C*H*W), 200 of them set to 0, maps max-normalised and clamped.
#: ``quantus-0.5``: Quantus 0.5's FaithfulnessCorrelation as shipped: 224 whole pixels (all channels)
#: set to the input's minimum ("black"), Quantus' own normalise_by_max, no clamp.
#: ``paper``: the paper's text: 200 random pixels (all channels) set to 0, maps clamped to [-1, 1]
#: after normalisation.
FIDELITY_PROTOCOLS = {
    "quantus-0.6": dict(fidelity_pixels=False, fidelity_subset=200, fidelity_baseline=0.0, fidelity_clamp=True,
                        fidelity_normalise=False),
    "quantus-0.5": dict(fidelity_pixels=True, fidelity_subset=224, fidelity_baseline="black", fidelity_clamp=False,
                        fidelity_normalise=True),
    "paper": dict(fidelity_pixels=True, fidelity_subset=200, fidelity_baseline=0.0, fidelity_clamp=True,
                  fidelity_normalise=False),
}
DEFAULT_FIDELITY_PROTOCOL = "quantus-0.6"
#: Fidelity baselines Quantus understands besides a number: the input's minimum, its mean
FIDELITY_BASELINES = ("black", "mean")


def fidelity_settings(protocol: str = DEFAULT_FIDELITY_PROTOCOL, subset: Optional[int] = None,
                      fraction: Optional[float] = None, settings: "MetricSettings" = None) -> "MetricSettings":
    """``settings`` (default: :class:`MetricSettings`) with the Fidelity fields of ``protocol``; a
    ``subset`` count or a ``fraction`` (of the pixels or channel values) overrides its subset size."""
    if protocol not in FIDELITY_PROTOCOLS:
        raise ValueError(f"unknown Fidelity protocol {protocol!r}; choose from {', '.join(FIDELITY_PROTOCOLS)}")
    if subset is not None and fraction is not None:
        raise ValueError("give a Fidelity subset size or a fraction, not both")
    if fraction is not None and not 0 < float(fraction) <= 1:
        raise ValueError(f"the Fidelity fraction must be in (0, 1], got {fraction}")
    if subset is not None and int(subset) <= 0:
        raise ValueError(f"the Fidelity subset size must be positive, got {subset}")
    kw = dict(FIDELITY_PROTOCOLS[protocol])
    if subset is not None:
        kw["fidelity_subset"] = int(subset)
    kw["fidelity_fraction"] = None if fraction is None else float(fraction)
    return dataclasses.replace(settings or MetricSettings(), **kw)


# ----------------------------------------------------------------------------- map preparation ----
def prepare(maps: torch.Tensor, size=None, clamp: bool = True) -> torch.Tensor:
    """Resize (B, h, w) maps bilinearly to ``size`` (H, W), divide each by its maximum (by its
    largest magnitude when the maximum is not positive; an all-zero map stays zero), clamp to
    [-1, 1] (unless ``clamp=False``).  Raises on NaN or infinity."""
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
    maps = maps / scale[:, None, None]
    return maps.clamp(-1, 1) if clamp else maps


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
        the subset sampling are paid once per batch instead of once per method.

        With ``pixels=True`` the subsets are drawn among the H*W pixels of the (B, 1, H, W) maps and
        every channel of a chosen pixel is replaced, as Quantus 0.5 did: the perturbation is then
        Quantus' ``baseline_replacement_by_indices`` over the spatial axes, image by image."""

        _shared = None
        pixels = False

        def evaluate_batch(self, model, x_batch, y_batch, a_batch, **kwargs):
            if self.pixels:
                if a_batch.shape != (x_batch.shape[0], 1) + x_batch.shape[2:]:
                    raise ValueError(f"pixel subsets need (B, 1, H, W) maps, got {a_batch.shape}")
            elif x_batch.shape != a_batch.shape:
                a_batch = np.broadcast_to(a_batch, x_batch.shape)
            batch_size = a_batch.shape[0]
            a_batch = a_batch.reshape(batch_size, -1)
            n_features = a_batch.shape[-1]
            key = (hashlib.blake2b(np.ascontiguousarray(x_batch).tobytes(), digest_size=16).digest(),
                   np.asarray(y_batch).tobytes(), self.nr_runs, self.subset_size, self.pixels)
            if self._shared is None or self._shared[0] != key:
                rows = np.arange(batch_size)
                x_input = model.shape_input(x_batch, x_batch.shape, channel_first=True, batched=True)
                y_pred = model.predict(x_input)[rows, y_batch]
                subsets, deltas = [], []
                for _ in range(self.nr_runs):
                    a_ix = np.stack([np.random.choice(n_features, self.subset_size, replace=False)
                                     for _ in range(batch_size)], axis=0)
                    if self.pixels:
                        x_perturbed = np.stack([self.perturb_func(arr=x_batch[i], indices=a_ix[i])
                                                for i in range(batch_size)])
                    else:
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


def fidelity_metric(settings: MetricSettings = MetricSettings(), shared: bool = True, shape=None):
    """The Fidelity metric object: Quantus' ``FaithfulnessCorrelation`` with the settings' protocol
    (``shared=True``: the subclass that reuses one batch's subsets and logit drops across maps).
    ``shape`` (B, C, H, W) of the inputs is needed when the subset is a fraction.

    The protocol is expressed in Quantus' own parameters: ``subset_size``, ``nr_runs``,
    ``perturb_baseline`` (a number, or Quantus' "black" = the input's minimum, "mean" = its mean),
    ``normalise`` (Quantus' ``normalise_by_max``), ``abs=False``; channel-value subsets use Quantus
    0.6's ``batch_baseline_replacement_by_indices``, pixel subsets its ``baseline_replacement_by_indices``
    over the spatial axes (``indexed_axes=(1, 2)``)."""
    import quantus
    from quantus.functions.perturb_func import baseline_replacement_by_indices
    if settings.fidelity_fraction is not None and shape is None:
        raise ValueError("a Fidelity subset given as a fraction needs the input shape")
    subset = settings.subset_size(shape) if shape is not None else int(settings.fidelity_subset)
    base = settings.fidelity_baseline
    base = float(base) if not isinstance(base, str) else base
    if isinstance(base, str) and base not in FIDELITY_BASELINES:
        raise ValueError(f"unknown Fidelity baseline {base!r}: give a number or one of {FIDELITY_BASELINES}")
    kw = dict(nr_runs=settings.fidelity_runs, subset_size=subset, perturb_baseline=base, abs=False,
              normalise=bool(settings.fidelity_normalise), return_aggregate=False, disable_warnings=True)
    if settings.fidelity_pixels:
        metric = _make(_shared_faithfulness_class(), perturb_func=baseline_replacement_by_indices,
                       perturb_func_kwargs=dict(indexed_axes=(1, 2)), **kw)
        metric.pixels = True
        return metric
    cls = _shared_faithfulness_class() if shared else quantus.FaithfulnessCorrelation
    return _make(cls, **kw)


def fidelity(model, x, y, a, settings: MetricSettings = MetricSettings(), metric=None) -> np.ndarray:
    """Quantus ``FaithfulnessCorrelation`` (Bhatt et al.): Pearson correlation, over random subsets
    of input features, between the summed attribution of the subset and the drop of the target
    logit when the subset is set to ``settings.fidelity_baseline``.  Pass the same ``metric``
    (from :func:`fidelity_metric`) for every map of one batch to share the forward passes."""
    x, y, a = _np(x), _np(y), _np(a)
    _check(x, a)
    if metric is None:
        metric = fidelity_metric(settings, shape=x.shape)
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
