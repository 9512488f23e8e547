"""The options of an SRD explainer, in one validated object.

``srd_fx.compile(model, **options)``, ``srd_fx.Explainer``, the integrations and the CLI all
build an :class:`Options`; a bad value is refused here, before any tracing, with an
:class:`~srd_fx.errors.OptionError` that says what is accepted.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Callable, Optional, Tuple, Union

from ..errors import OptionError

Head = Union[str, Callable]


@dataclass(frozen=True)
class Options:
    """What an explainer computes (all optional; the defaults are SRD as published).

    Frozen and validated on construction; ``srd_fx.compile(model, **fields)`` builds one.

    Attributes
    ----------
    head
        The initial relevance at L: ``"gradcam"`` (Eq. 4, default), ``"ones"`` (Sec. 4.3) or a
        callable ``f(A, logits, target) -> R``.
    layers
        Relevance maps to return: ``"input"``, ``"low"`` (L), ``"high"`` (4x L's resolution),
        activation module/node names, or ``"all"``.
    encoder_output
        Module or node name of L (default: timm's ``forward_features``, else the input of the global
        pooling).
    eps
        Positions with ``||v||^2 <= eps`` pass no relevance (it is reported in ``lost``).
    value
        ``"pre"`` (SRD) or ``"post"`` (ablation: share by ``<v_hat, act(v)>``).
    unit
        ``"pfv"`` (SRD) or ``"neuron"`` (ablation: scalar neurons, LRP-0 with bias sharing per neuron).
    check
        Validate inputs and outputs (finite values, ranks, training mode).
    chunk_size
        Explain large batches this many samples at a time (bounds memory).
    output_selector
        For models returning a tuple/dict: a callable, key or index giving the logits.

    Raises
    ------
    srd_fx.OptionError
        For a value that is not accepted (the message says what is).
    """
    head: Head = "gradcam"
    layers: Union[str, Tuple[str, ...]] = ("input",)
    encoder_output: Optional[str] = None
    eps: float = 1e-12
    value: str = "pre"
    unit: str = "pfv"
    check: bool = True
    chunk_size: Optional[int] = None
    output_selector: Any = None

    def __post_init__(self):
        fix = lambda name, v: object.__setattr__(self, name, v)  # noqa: E731 (frozen: normalise once)
        if not (callable(self.head) or self.head in ("gradcam", "ones")):
            raise OptionError(f"head must be 'gradcam', 'ones' or a callable (A, logits, target) -> R, "
                              f"got {self.head!r}")
        if self.layers != "all":
            layers = (self.layers,) if isinstance(self.layers, str) else self.layers
            try:
                layers = tuple(layers)
            except TypeError:
                raise OptionError(f"layers must be 'all' or a sequence of layer names, got {self.layers!r}") from None
            if not all(isinstance(k, str) for k in layers):
                raise OptionError(f"layers must be layer names (str), got {layers!r}")
            fix("layers", layers)
        if self.encoder_output is not None and not isinstance(self.encoder_output, str):
            raise OptionError(f"encoder_output must be a module or node name (str), got {self.encoder_output!r}")
        if isinstance(self.eps, bool) or not isinstance(self.eps, (int, float)) or not math.isfinite(self.eps) \
                or self.eps < 0:
            raise OptionError(f"eps must be a finite number >= 0, got {self.eps!r}")
        if self.value not in ("pre", "post"):
            raise OptionError(f"value must be 'pre' (SRD) or 'post' (ablation, SPEC §5), got {self.value!r}")
        if self.unit not in ("pfv", "neuron"):
            raise OptionError(f"unit must be 'pfv' (SRD) or 'neuron' (ablation, SPEC §5), got {self.unit!r}")
        if not isinstance(self.check, bool):
            raise OptionError(f"check must be True or False, got {self.check!r}")
        if self.chunk_size is not None and (isinstance(self.chunk_size, bool) or not isinstance(self.chunk_size, int)
                                            or self.chunk_size < 1):
            raise OptionError(f"chunk_size must be a positive number of samples (or None), got {self.chunk_size!r}")

    @classmethod
    def names(cls) -> Tuple[str, ...]:
        """The option names, in order."""
        return tuple(f.name for f in dataclasses.fields(cls))

    @classmethod
    def make(cls, options: Optional["Options"] = None, **overrides: Any) -> "Options":
        """``options`` with ``overrides`` applied, validated.

        Parameters
        ----------
        options
            The starting options (default: the defaults).
        **overrides
            Fields to replace, by name.

        Returns
        -------
        Options
            The new options.

        Raises
        ------
        srd_fx.OptionError
            If ``options`` is not an ``Options``, for an unknown field, or a value that is not accepted.
        """
        if options is not None and not isinstance(options, Options):
            raise OptionError(f"options must be an srd_fx.Options, got {type(options).__name__}")
        bad = sorted(set(overrides) - set(cls.names()))
        if bad:
            raise OptionError(f"unknown SRD option(s) {bad}; accepted: {', '.join(cls.names())}")
        return dataclasses.replace(options or cls(), **overrides)
