"""One description of an attribution method and the one registry every method is listed in.

A :class:`Method` says who it is (``name``, ``label``, the ``source`` library), how it explains and
how the explanation-manipulation attack drives it:

* ``explain(model, x, target) -> map``: a stateless map maker. Calling the method validates the
  input, resolves the target and returns a (B, H, W) float32 map at the input size (channels
  summed, lower-resolution maps upsampled bilinearly; ``resolution`` names the native one);
* ``attack(model, example, beta) -> hooks``: builds, once per model, an object with
  ``attack(x, target) -> (map, logits)`` (differentiable in ``x``) and ``report(x, target) -> map``
  (:class:`AttackHooks`).

The evaluation's baselines (``srd_fx.eval.baselines``) are the registered methods with ``explain``,
the attack's methods (``srd_fx.methods.robustness``) those with ``attack``; a name is unique among
the methods of each use. Adding a method is one call::

    from srd_fx.methods.registry import Method, register
    register(Method("MyMethod", my_fn, "input", "mylib"))   # my_fn(model, x, target) -> map

after which ``srd-fx evaluate --methods MyMethod`` scores it like any built-in baseline.
"""
from __future__ import annotations

from typing import Callable, Dict, Iterator, List, Mapping, Optional, Protocol, Tuple

import torch
import torch.nn.functional as F

from ..errors import InputError, NonFiniteError, SRDError, UnknownMethodError

__all__ = ["Method", "AttackHooks", "Registry", "REGISTRY", "register", "unregister", "UnknownMethodError",
           "RESOLUTIONS"]

RESOLUTIONS = ("input", "low", "high")


class AttackHooks(Protocol):
    """What ``Method.attack(model, example, beta)`` builds for the manipulation attack."""

    name: str
    label: str

    def attack(self, x: torch.Tensor, target: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """The (B, H, W) map to attack and the logits, both differentiable in ``x``."""

    def report(self, x: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """The library's (B, H, W) map on the original network."""


class Method:
    """An attribution method (see the module docstring): ``Method(name, explain, resolution, source,
    label=..., attack=..., aliases=...)``; ``method(model, x, target)`` gives the checked map."""

    def __init__(self, name: str, explain: Optional[Callable] = None, resolution: str = "input",
                 source: str = "", *, label: Optional[str] = None, attack: Optional[Callable] = None,
                 aliases: Tuple[str, ...] = ()):
        if resolution not in RESOLUTIONS:
            raise InputError(f"{name}: resolution must be one of {RESOLUTIONS}, got {resolution!r}")
        if explain is None and attack is None:
            raise InputError(f"{name}: a method needs explain(model, x, target) or an attack factory")
        self.name, self.explain, self.resolution, self.source = name, explain, resolution, source
        self.label = label or name
        self.attack = attack
        self.aliases = tuple(aliases)

    @property
    def fn(self) -> Optional[Callable]:
        """``explain`` under its earlier name: the raw map, before the checks of ``__call__``."""
        return self.explain

    def __repr__(self):
        return f"Method({self.name!r}, resolution={self.resolution!r}, from {self.source})"

    def __call__(self, model: torch.nn.Module, x: torch.Tensor, target=None) -> torch.Tensor:
        if self.explain is None:
            raise InputError(f"{self.name} is an attack method; build it with "
                             "srd_fx.methods.robustness.make_method")
        if not isinstance(x, torch.Tensor) or x.dim() != 4:
            raise InputError(f"{self.name}: x must be a (B, C, H, W) tensor, got "
                             f"{type(x).__name__} {tuple(getattr(x, 'shape', ()))}")
        if any(m.training for m in model.modules()):
            raise InputError(f"{self.name}: the model is in training mode; call model.eval() first")
        target = _targets(model, x, target)
        out = self.explain(model, x.detach(), target)
        out = torch.as_tensor(out).detach().to(torch.float32)
        if out.dim() == 4:  # (B, C, h, w): sum the channels
            out = out.sum(1)
        if out.shape[-2:] != x.shape[-2:]:
            out = F.interpolate(out[:, None], size=x.shape[-2:], mode="bilinear", align_corners=False)[:, 0]
        if out.shape != (x.shape[0],) + tuple(x.shape[-2:]):
            raise SRDError(f"{self.name} returned shape {tuple(out.shape)} for input {tuple(x.shape)}")
        if not torch.isfinite(out).all():
            raise NonFiniteError(f"{self.name} produced non-finite values")
        return out


def _targets(model, x, target) -> torch.Tensor:
    """``target`` as a LongTensor (B,): an int for the whole batch, None for the predicted class."""
    B = x.shape[0]
    if target is None:
        with torch.no_grad():
            return model(x).argmax(1)
    t = torch.as_tensor(target, dtype=torch.long).reshape(-1)
    if t.numel() == 1 and B > 1:
        t = t.expand(B)
    if t.numel() != B:
        raise InputError(f"target has {t.numel()} entries for a batch of {B}")
    return t.clone()


def _key(name: str) -> str:
    return str(name).lower().replace("_", "-")


class Registry(Mapping):
    """Registered methods by name, in registration order; ``view(use)`` is the live table of the
    methods with ``explain`` (``"explain"``) or with ``attack`` (``"attack"``)."""

    USES = ("explain", "attack")

    def __init__(self, use: Optional[str] = None, methods: Optional[List[Method]] = None):
        self.use = use
        self._methods = [] if methods is None else methods

    def _members(self) -> List[Method]:
        return [m for m in self._methods if self.use is None or getattr(m, self.use) is not None]

    def view(self, use: str) -> "Registry":
        if use not in self.USES:
            raise InputError(f"use must be one of {self.USES}, got {use!r}")
        return Registry(use, self._methods)

    def register(self, method: Method, *, replace: bool = False) -> Method:
        """Add ``method``; its name and aliases must be new among the methods of its uses (a method
        of the same name is replaced with ``replace=True``)."""
        if not isinstance(method, Method):
            raise InputError(f"register expects a srd_fx Method, got {type(method).__name__}")
        keys = {_key(method.name)} | {_key(a).replace("-", "") for a in method.aliases}
        for other in list(self._methods):
            if not any(getattr(other, u) is not None and getattr(method, u) is not None for u in self.USES):
                continue
            if _key(other.name) == _key(method.name) and replace:
                self._methods.remove(other)
                continue
            taken = {_key(other.name)} | {_key(a).replace("-", "") for a in other.aliases}
            if keys & taken:
                raise InputError(f"a method named {method.name!r} (or one of its aliases) is already "
                                 f"registered: {other!r}; pass replace=True to replace it")
        self._methods.append(method)
        return method

    def unregister(self, name: str) -> Method:
        """Remove the method called exactly ``name`` from the registry (from every use) and return it."""
        method = self[name]
        self._methods.remove(method)
        return method

    def lookup(self, name) -> Method:
        """The method called ``name``: case-insensitive, ``_`` and ``-`` alike, or an alias
        (``UnknownMethodError``, a ``KeyError``, when none is)."""
        if isinstance(name, Method):
            return name
        key = _key(name)
        members = self._members()
        for m in members:
            if _key(m.name) == key:
                return m
        for m in members:
            if key.replace("-", "") in {_key(a).replace("-", "") for a in m.aliases}:
                return m
        raise UnknownMethodError(f"unknown method {name!r}; available: {', '.join(self)}")

    def __getitem__(self, name: str) -> Method:
        for m in self._members():
            if m.name == name:
                return m
        raise UnknownMethodError(f"unknown method {name!r}; available: {', '.join(self)}")

    def __iter__(self) -> Iterator[str]:
        return iter([m.name for m in self._members()])

    def __len__(self) -> int:
        return len(self._members())

    def __repr__(self):
        return f"Registry({self.use or 'all'}: {', '.join(self)})"


#: every method srd_fx knows, baselines and attack methods alike
REGISTRY = Registry()
register, unregister = REGISTRY.register, REGISTRY.unregister
