"""Attribution methods behind one interface: ``method(model, x, target) -> (B, H, W)`` map.

``x`` is the (normalised) model input (B, C, H, W), ``target`` an int or a LongTensor (B,) of class
indices (None: the predicted class).  Every method returns a float tensor of shape (B, H, W) at the
input resolution; methods that work at a lower resolution are upsampled bilinearly (their native
resolution is ``method.resolution``: "input", "low" = encoder output, "high" = the layer with 4x its
resolution, the paper's † and ‡).

The methods come from their libraries:

* captum: Saliency (|gradient|), GuidedBackprop, InputXGradient, IntegratedGradients (zero baseline,
  50 steps), SmoothGrad (``NoiseTunnel(Saliency)``, 20 samples, sigma = 0.15 x the input range);
  pixel maps are summed over channels;
* zennit: LRP-z+ (the z+ rule on every convolution and linear layer, batch-norm merged into the
  preceding convolution, residual additions through zennit's ``Sum`` layer, activations passed);
* pytorch-grad-cam: GradCAM, GradCAM++, ScoreCAM, AblationCAM, XGradCAM and LayerCAM at the encoder
  output ("low"), LayerCAM at the "high" layer, and FullGrad (the library's maps: ReLU, min-max
  scaled, bilinearly resized to the input);
* srd_fx: SRD-low, SRD-high, SRD-input, from ``srd_fx.compile(model, layers=("input", "low",
  "high"))``; the explainer is compiled once per model and input shape and cached.

Each is a :class:`srd_fx.methods.registry.Method` in the one method registry; ``register(Method(name,
fn, resolution, source))`` adds another baseline (listed in ``METHODS``, offered by the CLI).

The CAM target layers are found by :func:`srd_fx.eval.models.cam_layers` (the same layers SRD-low and
SRD-high read out); :func:`set_cam_layers` overrides them for a model.
"""
from __future__ import annotations

import contextlib
import weakref
from typing import Dict, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..methods.registry import REGISTRY, RESOLUTIONS, Method, UnknownMethodError  # noqa: F401
from .models import cam_layers, get_module


@contextlib.contextmanager
def no_inplace(model):
    """Temporarily turn off ``inplace`` on activation modules (captum's and zennit's backward hooks
    cannot wrap in-place ops)."""
    changed = [m for m in model.modules() if getattr(m, "inplace", False) is True]
    for m in changed:
        m.inplace = False
    try:
        yield
    finally:
        for m in changed:
            m.inplace = True


# ----------------------------------------------------------------------------- captum ------------
def _saliency(model, x, t):
    from captum.attr import Saliency
    with no_inplace(model):
        return Saliency(model).attribute(x.requires_grad_(), target=t, abs=True)


def _guided_backprop(model, x, t):
    from captum.attr import GuidedBackprop
    with no_inplace(model):
        return GuidedBackprop(model).attribute(x.requires_grad_(), target=t)


def _input_x_gradient(model, x, t):
    from captum.attr import InputXGradient
    with no_inplace(model):
        return InputXGradient(model).attribute(x.requires_grad_(), target=t)


def _integrated_gradients(model, x, t, n_steps: int = 50):
    from captum.attr import IntegratedGradients
    with no_inplace(model):
        return IntegratedGradients(model).attribute(x, baselines=torch.zeros_like(x), target=t, n_steps=n_steps,
                                                    internal_batch_size=max(n_steps, 64))


def _smoothgrad(model, x, t, nt_samples: int = 20, noise_level: float = 0.15):
    from captum.attr import NoiseTunnel, Saliency
    sigma = noise_level * float(x.max() - x.min())
    with no_inplace(model):
        return NoiseTunnel(Saliency(model)).attribute(x.requires_grad_(), nt_type="smoothgrad", nt_samples=nt_samples,
                                                      stdevs=sigma, target=t, nt_samples_batch_size=nt_samples)


# ----------------------------------------------------------------------------- zennit ------------
def _lrp_zplus(model, x, t):
    # the attack's LRP z+ (zennit's z+ rule on every convolution and linear layer, batch norm folded
    # into the convolutions, residual additions split by zennit's Sum): one implementation
    from ..methods.robustness import lrp_zplus
    with torch.enable_grad():
        return lrp_zplus(model, x, t)


# ----------------------------------------------------------------------------- pytorch-grad-cam ---
_CAM_LAYERS: "weakref.WeakKeyDictionary[nn.Module, Tuple[str, str]]" = weakref.WeakKeyDictionary()


def set_cam_layers(model: nn.Module, low: str, high: str) -> None:
    """Use the modules named ``low`` and ``high`` as the CAM target layers for ``model``."""
    get_module(model, low), get_module(model, high)
    _CAM_LAYERS[model] = (low, high)


def get_cam_layers(model: nn.Module, x: torch.Tensor) -> Tuple[str, str]:
    """The (low, high) CAM target layer names for ``model`` (found once, then cached)."""
    if model not in _CAM_LAYERS:
        _CAM_LAYERS[model] = cam_layers(model, x)
    return _CAM_LAYERS[model]


def _cam(cls_name: str, which: str = "low", **attrs):
    def fn(model, x, t):
        import pytorch_grad_cam
        from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget
        cls = getattr(pytorch_grad_cam, cls_name)
        if cls_name == "FullGrad":
            layers = []
        else:
            low, high = get_cam_layers(model, x)
            layers = [get_module(model, low if which == "low" else high)]
        with cls(model=model, target_layers=layers) as cam:
            for k, v in attrs.items():
                setattr(cam, k, v)
            maps = cam(input_tensor=x, targets=[ClassifierOutputTarget(int(c)) for c in t])
        return torch.from_numpy(maps)
    return fn


def _fullgrad(model, x, t):
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "FullGrad does not need target layers"
        return _cam("FullGrad")(model, x, t)


# ----------------------------------------------------------------------------- SRD ---------------
_EXPLAINERS: "weakref.WeakKeyDictionary[nn.Module, Dict]" = weakref.WeakKeyDictionary()


def get_explainer(model: nn.Module, x: torch.Tensor):
    """The SRD explainer of ``model`` for inputs shaped like ``x`` (compiled once, cached)."""
    import srd_fx
    per_model = _EXPLAINERS.setdefault(model, {})
    key = (tuple(x.shape[1:]), x.dtype)
    if key not in per_model:
        per_model[key] = srd_fx.compile(model, layers=("input", "low", "high"), example_input=x[:1])
    return per_model[key]


def _srd(which: str):
    def fn(model, x, t):
        out = get_explainer(model, x)(x, target=t)
        return out.saliency if which == "input" else out.relevance[which]
    return fn


# ----------------------------------------------------------------------------- registry ----------
#: the baselines: the registered methods that explain (srd_fx.methods.registry; a live table, so a
#: method registered later with ``register`` is listed, scored and offered by the CLI too)
METHODS = REGISTRY.view("explain")
register, unregister = METHODS.register, METHODS.unregister
for _m in [
    Method("Saliency", _saliency, "input", "captum"),
    Method("GuidedBackprop", _guided_backprop, "input", "captum"),
    Method("InputXGradient", _input_x_gradient, "input", "captum", aliases=("gradinput", "inputxgradient")),
    Method("IntegratedGradients", _integrated_gradients, "input", "captum", aliases=("integrad", "ig")),
    Method("LRP-z+", _lrp_zplus, "input", "zennit", aliases=("lrp", "lrpz+")),
    Method("SmoothGrad", _smoothgrad, "input", "captum"),
    Method("FullGrad", _fullgrad, "input", "pytorch-grad-cam"),
    Method("GradCAM", _cam("GradCAM"), "low", "pytorch-grad-cam"),
    Method("GradCAM++", _cam("GradCAMPlusPlus"), "low", "pytorch-grad-cam", aliases=("gradcampp",)),
    Method("ScoreCAM", _cam("ScoreCAM", batch_size=64), "low", "pytorch-grad-cam"),
    Method("AblationCAM", _cam("AblationCAM", batch_size=64), "low", "pytorch-grad-cam"),
    Method("XGradCAM", _cam("XGradCAM"), "low", "pytorch-grad-cam"),
    Method("LayerCAM-low", _cam("LayerCAM", "low"), "low", "pytorch-grad-cam", aliases=("layercam",)),
    Method("LayerCAM-high", _cam("LayerCAM", "high"), "high", "pytorch-grad-cam"),
    Method("SRD-low", _srd("low"), "low", "srd_fx"),
    Method("SRD-high", _srd("high"), "high", "srd_fx"),
    Method("SRD-input", _srd("input"), "input", "srd_fx", aliases=("srd",)),
]:
    register(_m, replace=True)  # replace: a reload of this module re-registers the same methods


def get_method(name: str) -> Method:
    """The baseline called ``name`` (case-insensitive; a few aliases such as "IG", "LRP", "SRD");
    ``UnknownMethodError`` (a ``KeyError``) lists the available ones otherwise."""
    return METHODS.lookup(name)
