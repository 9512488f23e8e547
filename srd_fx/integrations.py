"""SRD inside the tools researchers already use: Quantus, Captum and pytorch-grad-cam.

Quantus (an ``explain_func``, so every Quantus metric computes SRD maps itself)::

    import quantus
    from srd_fx.integrations import explain_func
    metric = quantus.MaxSensitivity(nr_samples=10)
    scores = metric(model=model, x_batch=x, y_batch=y, a_batch=None, device="cpu",
                    explain_func=explain_func, explain_func_kwargs={"layer": "input"})

Captum (an ``Attribution``: ``attribute(inputs, target)``, usable with ``NoiseTunnel`` and
``captum.metrics``)::

    from srd_fx.integrations import SRDAttribution
    attr = SRDAttribution(model).attribute(x, target=y)          # (B, 1, H, W)

pytorch-grad-cam (the ``cam(input_tensor=..., targets=[...])`` call, maps in [0, 1])::

    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget
    from srd_fx.integrations import SRDCAM
    with SRDCAM(model, layer="high") as cam:
        grayscale = cam(input_tensor=x, targets=[ClassifierOutputTarget(281)])   # (B, H, W)

All three compile the model once per (layer, options, input shape, dtype, device) and reuse the
explainer (it reads the model's current weights on every call, so in-place weight changes are
seen).  The model must be in eval mode.
"""
from __future__ import annotations

import functools
import weakref
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
import torch.nn as nn

from .compiler.options import Options
from .errors import OptionError
from .eval.io import upsample

__all__ = ["explainer_for", "srd_maps", "explain_func", "quantus_explain_func", "SRDAttribution",
           "SRDCAM", "srd_cam"]

TargetLike = Union[None, int, Sequence[int], np.ndarray, torch.Tensor]
#: compile options that may be passed through the wrappers (``layers`` is their ``layer``)
COMPILE_OPTIONS = tuple(n for n in Options.names() if n != "layers")


def _check_options(compile_kwargs: Dict[str, Any]) -> None:
    """Refuse an unknown option name before anything is compiled."""
    bad = set(compile_kwargs) - set(COMPILE_OPTIONS)
    if bad:
        raise OptionError(f"unknown SRD option(s) {sorted(bad)}; accepted: layer, {', '.join(COMPILE_OPTIONS)}")

_EXPLAINERS: "weakref.WeakKeyDictionary[nn.Module, Dict[tuple, Any]]" = weakref.WeakKeyDictionary()


def _hashable(v: Any) -> Any:
    try:
        hash(v)
        return v
    except TypeError:
        return ("id", id(v))


def explainer_for(model: nn.Module, x: torch.Tensor, layer: str = "input", **compile_kwargs: Any) -> Any:
    """The SRD explainer of ``model`` reading ``layer``, for inputs shaped like ``x``.

    Compiled on the first request, then cached per model, layer, options, input shape, dtype and
    device (the cache holds the model weakly).

    Parameters
    ----------
    model
        The model, in eval mode.
    x
        An input batch (B, C, H, W); only its shape, dtype and device matter.
    layer
        Where the relevance is read: "input", "low", "high" or an activation module/node name.
    **compile_kwargs
        Options of :func:`srd_fx.compile` (``head``, ``encoder_output``, ``eps``, ``value``, ``unit``,
        ``chunk_size``, ``output_selector``).

    Returns
    -------
    srd_fx.Explainer
        The compiled explainer.

    Raises
    ------
    srd_fx.OptionError
        For an option :func:`srd_fx.compile` does not take, or a bad option value.
    srd_fx.SRDError
        From :func:`srd_fx.compile` when the model cannot be compiled.
    """
    _check_options(compile_kwargs)
    import srd_fx
    per_model = _EXPLAINERS.setdefault(model, {})
    key = (layer, tuple(sorted((k, _hashable(v)) for k, v in compile_kwargs.items())),
           tuple(x.shape[1:]), x.dtype, x.device)
    if key not in per_model:
        per_model[key] = srd_fx.compile(model, layers=(layer,), example_input=x[:1].detach(), **compile_kwargs)
    return per_model[key]


def _as_targets(target: TargetLike, batch: int, device) -> Optional[torch.Tensor]:
    """None, an int, or one class index per sample -> None or LongTensor (B,)."""
    if target is None:
        return None
    if isinstance(target, tuple):
        raise TypeError("SRD explains one class logit of a (B, K) output: give the target as an int or one "
                        "int per sample, not a tuple")
    t = torch.as_tensor(np.asarray(target) if not isinstance(target, torch.Tensor) else target)
    if t.is_floating_point():
        if not torch.equal(t, t.round()):
            raise ValueError(f"targets must be class indices (integers), got {t.tolist()}")
    t = t.long().reshape(-1).to(device)
    if t.numel() == 1:
        return t.expand(batch).clone()
    if t.numel() != batch:
        raise ValueError(f"got {t.numel()} targets for a batch of {batch} inputs")
    return t


def srd_maps(model: nn.Module, x: torch.Tensor, target: TargetLike = None, layer: str = "input",
             to_input_size: bool = True, **compile_kwargs: Any) -> torch.Tensor:
    """SRD relevance maps of ``layer`` for ``target``.

    Not normalised: relevance is conserved, ``maps.sum() == R_L.sum() - lost`` for ``layer="input"``.

    Parameters
    ----------
    model
        The model, in eval mode.
    x
        The inputs (B, C, H, W).
    target
        None (the predicted class), an int, or one class index per sample.
    layer
        Where the relevance is read: "input", "low", "high" or an activation module/node name.
    to_input_size
        Resize the maps of coarser layers bilinearly to the input's size.
    **compile_kwargs
        Options of :func:`srd_fx.compile`.

    Returns
    -------
    torch.Tensor
        (B, H, W) maps (or the layer's own (B, h, w) without ``to_input_size``).

    Raises
    ------
    ValueError
        If ``x`` is not a 4-d tensor, or the targets are not class indices, one or one per sample.
    TypeError
        For a tuple target.
    srd_fx.OptionError
        For an unknown compile option.
    srd_fx.SRDError
        When the model cannot be compiled or explained.
    """
    if not isinstance(x, torch.Tensor) or x.dim() != 4:
        raise ValueError(f"inputs must be a (B, C, H, W) tensor, got {type(x).__name__} "
                         f"{tuple(getattr(x, 'shape', ()))}")
    explainer = explainer_for(model, x, layer, **compile_kwargs)
    t = _as_targets(target, x.shape[0], x.device)
    with torch.no_grad():
        out = explainer(x.detach(), t)
    maps = out.relevance[layer]
    return upsample(maps, x.shape[-2:]).to(maps.dtype) if to_input_size else maps


# ----------------------------------------------------------------------------- Quantus ------------
def explain_func(model: Any, inputs: Union[np.ndarray, torch.Tensor], targets: TargetLike,
                 layer: str = "input", device: Optional[Union[str, torch.device]] = None,
                 **kwargs: Any) -> np.ndarray:
    """A Quantus ``explain_func``: SRD maps (B, 1, H, W) float32 at the input size.

    ``layer`` and the compile options come from Quantus' ``explain_func_kwargs``.  Maps are not
    normalised here (Quantus does that when ``normalise=True``).

    Parameters
    ----------
    model
        An ``nn.Module`` in eval mode, or a Quantus ``ModelInterface`` wrapping one.
    inputs
        The inputs (B, C, H, W), a NumPy array or a tensor.
    targets
        One class index per sample (or one for all).
    layer
        Where the relevance is read: "input", "low", "high" or an activation module/node name.
    device
        Quantus' device; it must be the model's.
    **kwargs
        Options of :func:`srd_fx.compile` (``head``, ``eps``, ...); Quantus' ``method`` key is ignored.

    Returns
    -------
    numpy.ndarray
        (B, 1, H, W) float32 maps.

    Raises
    ------
    TypeError
        If the model is not an ``nn.Module``.
    srd_fx.OptionError
        For an unknown compile option.
    ValueError
        If the model is not on ``device``, or the targets do not fit the batch.
    srd_fx.SRDError
        When the model cannot be compiled or explained.
    """
    kwargs.pop("method", None)  # quantus.evaluate adds the method's name
    if hasattr(model, "get_model") and not isinstance(model, nn.Module):
        model = model.get_model()  # a Quantus ModelInterface
    if not isinstance(model, nn.Module):
        raise TypeError(f"SRD needs a torch.nn.Module, got {type(model).__name__}")
    p = next((q for q in model.parameters() if q.is_floating_point()), None)
    dtype = p.dtype if p is not None else torch.float32
    dev = torch.device(device) if device is not None else (p.device if p is not None else torch.device("cpu"))
    if p is not None and p.device != dev:
        raise ValueError(f"the model is on {p.device} but Quantus asked for device={device!r}: move the model "
                         "or pass the matching device")
    x = torch.as_tensor(np.asarray(inputs) if not isinstance(inputs, torch.Tensor) else inputs)
    x = x.to(device=dev, dtype=dtype)
    maps = srd_maps(model, x, targets, layer=layer, **kwargs)
    return maps.detach().float().cpu().numpy()[:, None]


#: the same function under a descriptive name
quantus_explain_func = explain_func


# ----------------------------------------------------------------------------- Captum -------------
try:  # subclass captum's Attribution when captum is installed (NoiseTunnel checks for it)
    from captum.attr import Attribution as _CaptumAttribution
except ImportError:  # pragma: no cover - captum is optional
    class _CaptumAttribution:  # type: ignore[no-redef]
        def __init__(self, forward_func: Callable) -> None:
            self.forward_func = forward_func


def _keeps_wrapped(fn: Callable) -> Callable:
    """Give ``fn`` a ``__wrapped__`` like captum's logged ``attribute`` methods (NoiseTunnel calls
    ``attribute.__wrapped__``)."""
    @functools.wraps(fn)
    def inner(*args, **kwargs):
        return fn(*args, **kwargs)
    return inner


class SRDAttribution(_CaptumAttribution):
    """SRD as a captum ``Attribution``.

    ``SRDAttribution(model, layer="input").attribute(inputs, target)`` returns a (B, 1, H, W)
    tensor (one relevance per position, broadcastable against the inputs as captum's layer
    methods are).

    Parameters
    ----------
    model
        The model, in eval mode.
    layer
        Where the relevance is read: "input", "low", "high" or an activation module/node name.
    **compile_kwargs
        Options of :func:`srd_fx.compile` (``head``, ``eps``, ``encoder_output``, ...).

    Raises
    ------
    srd_fx.OptionError
        For an option :func:`srd_fx.compile` does not take.
    """

    def __init__(self, model: nn.Module, layer: str = "input", **compile_kwargs: Any) -> None:
        super().__init__(model)
        self.model, self.layer, self.compile_kwargs = model, layer, compile_kwargs
        _check_options(compile_kwargs)

    @_keeps_wrapped
    def attribute(self, inputs: Union[torch.Tensor, Tuple[torch.Tensor]], target: TargetLike = None,
                  additional_forward_args: Any = None, upsample: bool = True
                  ) -> Union[torch.Tensor, Tuple[torch.Tensor]]:
        """SRD maps of ``inputs`` for ``target``, captum's ``attribute``.

        Parameters
        ----------
        inputs
            The inputs (B, C, H, W), or a 1-tuple holding them.
        target
            None (the predicted class), an int, or one class index per sample.
        additional_forward_args
            Must be None: SRD explains models with a single tensor input.
        upsample
            Resize a coarse layer's map to the input size (False keeps its own resolution).

        Returns
        -------
        torch.Tensor or tuple of torch.Tensor
            (B, 1, H, W) maps in the inputs' dtype; a 1-tuple when ``inputs`` was one.

        Raises
        ------
        ValueError
            For ``additional_forward_args`` or more than one input.
        srd_fx.SRDError
            When the model cannot be compiled or explained.
        """
        if additional_forward_args is not None:
            raise ValueError("SRD explains models with a single tensor input; additional_forward_args "
                             "is not supported")
        is_tuple = isinstance(inputs, tuple)
        if is_tuple:
            if len(inputs) != 1:
                raise ValueError(f"SRD explains models with a single tensor input, got {len(inputs)} inputs")
            inputs = inputs[0]
        maps = srd_maps(self.model, inputs, target, layer=self.layer, to_input_size=upsample,
                        **self.compile_kwargs)[:, None].to(inputs.dtype)
        return (maps,) if is_tuple else maps

    def has_convergence_delta(self) -> bool:
        """False: SRD returns no convergence delta (its lost relevance is ``SRDOutput.lost``)."""
        return False

    @property
    def multiplies_by_inputs(self) -> bool:
        """False, in captum's sense: the map is not a gradient multiplied by the inputs."""
        return False


# ----------------------------------------------------------------------------- pytorch-grad-cam ---
def _layer_name(model: nn.Module, layer: Any) -> str:
    if isinstance(layer, str):
        return layer
    if isinstance(layer, nn.Module):
        for name, m in model.named_modules():
            if m is layer and name:
                return name
        raise ValueError("the target layer module is not a submodule of the model")
    raise TypeError(f"a layer is a name (input, low, high, a module name) or a submodule, got {type(layer).__name__}")


#: pytorch-grad-cam targets that name one class (SRD always starts from that class's logit, Eq. 4)
CLASSIFIER_TARGETS = ("ClassifierOutputTarget", "ClassifierOutputSoftmaxTarget", "ClassifierOutputReST")


def _cam_targets(targets: Optional[Sequence[Any]], batch: int) -> Optional[List[int]]:
    if targets is None:
        return None
    try:
        from pytorch_grad_cam.utils import model_targets as mt
        classifier = tuple(getattr(mt, n) for n in CLASSIFIER_TARGETS if hasattr(mt, n))
    except ImportError:  # pragma: no cover - grad-cam is optional
        classifier = ()
    out = []
    for t in targets:
        if isinstance(t, (int, np.integer)):
            out.append(int(t))
        elif classifier and isinstance(t, classifier):
            out.append(int(t.category))
        else:
            raise TypeError(f"SRD explains one class of a classifier: give {' / '.join(CLASSIFIER_TARGETS)}(k) "
                            f"or plain ints, got {type(t).__name__}")
    if len(out) not in (1, batch):
        raise ValueError(f"got {len(out)} targets for a batch of {batch} images")
    return out


class SRDCAM:
    """SRD with pytorch-grad-cam's calling convention.

    ``SRDCAM(model, layer="input")(input_tensor=x, targets=[ClassifierOutputTarget(k), ...])``
    returns a float32 NumPy array (B, H, W) at the input size, each map clipped at 0 and min-max
    scaled to [0, 1] as the library's CAMs are, ready for
    ``pytorch_grad_cam.utils.image.show_cam_on_image`` and ``pytorch_grad_cam.metrics``.
    ``layer`` (or grad-cam's ``target_layers=[module]``) picks where SRD reads its relevance:
    "input" (SRD-input), "low" (encoder output), "high", or a module.  Targets are class indices
    (``ClassifierOutputTarget`` and its softmax / ReST variants, or ints); SRD's head always starts
    from the class logit (Eq. 4).  Also a context manager, like the library's CAMs.

    Parameters
    ----------
    model
        The model, in eval mode.
    layer
        "input", "low", "high", a module name or a submodule of ``model``.
    target_layers
        grad-cam's way of naming the layer: a list of one submodule (overrides ``layer``).
    **compile_kwargs
        Options of :func:`srd_fx.compile`.

    Raises
    ------
    ValueError
        If ``target_layers`` holds more than one module, or a module that is not in ``model``.
    TypeError
        If ``layer`` is neither a name nor a module.
    """

    def __init__(self, model: nn.Module, layer: Any = "input", target_layers: Optional[Sequence[Any]] = None,
                 **compile_kwargs: Any) -> None:
        if target_layers is not None:
            if len(target_layers) != 1:
                raise ValueError("SRD reads one layer: give target_layers=[module] with one module")
            layer = target_layers[0]
        self.model = model
        self.layer = _layer_name(model, layer)
        self.compile_kwargs = compile_kwargs

    def __call__(self, input_tensor: torch.Tensor, targets: Optional[Sequence[Any]] = None) -> np.ndarray:
        """(B, H, W) float32 maps in [0, 1] of ``input_tensor`` (B, C, H, W) for ``targets`` (a list of
        ``ClassifierOutputTarget`` or ints; None: the predicted classes)."""
        ts = _cam_targets(targets, input_tensor.shape[0])
        maps = srd_maps(self.model, input_tensor, ts, layer=self.layer, to_input_size=False, **self.compile_kwargs)
        # the library's order: clip at 0, min-max scale per image, then resize bilinearly
        m = maps.detach().float().clamp_min(0)
        m = m - m.amin((1, 2), keepdim=True)
        m = m / (1e-7 + m.amax((1, 2), keepdim=True))
        return upsample(m, input_tensor.shape[-2:]).cpu().numpy().astype(np.float32)

    def __enter__(self) -> "SRDCAM":
        return self

    def __exit__(self, *exc: Any) -> None:
        return None


def srd_cam(model: nn.Module, input_tensor: torch.Tensor, targets: Optional[Sequence[Any]] = None,
            layer: Any = "input", **compile_kwargs: Any) -> np.ndarray:
    """SRD as a grad-cam-style one-liner: ``srd_cam(model, x, [ClassifierOutputTarget(k)])``.

    Parameters
    ----------
    model
        The model, in eval mode.
    input_tensor
        The inputs (B, C, H, W).
    targets
        ``ClassifierOutputTarget`` objects or ints, one or one per sample (None: the predicted classes).
    layer
        "input", "low", "high", a module name or a submodule.
    **compile_kwargs
        Options of :func:`srd_fx.compile`.

    Returns
    -------
    numpy.ndarray
        (B, H, W) float32 maps, clipped at 0 and min-max scaled to [0, 1] per image.

    Raises
    ------
    TypeError
        For a target that does not name one class.
    ValueError
        If the number of targets fits neither one nor the batch.
    """
    return SRDCAM(model, layer, **compile_kwargs)(input_tensor, targets)
