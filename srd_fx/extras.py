"""The optional extras of srd_fx: which libraries each needs and a check that names the missing ones."""
from __future__ import annotations

import importlib.util
import sys

from .errors import MissingDependencyError

#: import name -> distribution name, for every library of the ``eval`` extra
EVAL_LIBRARIES = {
    "timm": "timm", "torchvision": "torchvision", "PIL": "pillow", "matplotlib": "matplotlib",
    "tqdm": "tqdm", "skimage": "scikit-image", "sklearn": "scikit-learn", "scipy": "scipy",
    "captum": "captum", "zennit": "zennit", "pytorch_grad_cam": "grad-cam", "quantus": "quantus",
}


def _installed(module: str) -> bool:
    if module in sys.modules:  # imported already, or blocked (None)
        return sys.modules[module] is not None
    return importlib.util.find_spec(module) is not None


def missing_libraries() -> list[str]:
    """Distribution names of the ``eval`` extra's libraries that are not installed."""
    return [dist for mod, dist in EVAL_LIBRARIES.items() if not _installed(mod)]


def require_eval(what: str = "the evaluation harness (srd_fx.eval)") -> None:
    """Raise :class:`~srd_fx.errors.MissingDependencyError` if a library of the ``eval`` extra is
    missing.

    Parameters
    ----------
    what
        What needs the libraries, for the message.

    Raises
    ------
    MissingDependencyError
        Naming the missing distributions and the command that installs them.
    """
    missing = missing_libraries()
    if missing:
        raise MissingDependencyError(
            f"{what} needs the optional libraries of srd_fx's 'eval' extra; not installed: "
            f"{', '.join(missing)}. Install them with: pip install \"srd_fx[eval]\"")



def require(module: str, what: str, extra: str = "lxt") -> None:
    """Raise :class:`~srd_fx.errors.MissingDependencyError` if ``module`` (a library outside the
    ``eval`` extra, e.g. ``lxt``) is not installed.

    Parameters
    ----------
    module
        Import name of the library.
    what
        What needs it, for the message.
    extra
        The srd_fx extra that installs it.

    Raises
    ------
    MissingDependencyError
        Naming the library and the command that installs it.
    """
    if not _installed(module):
        raise MissingDependencyError(
            f"{what} needs the library {module!r} (srd_fx's '{extra}' extra), which is not installed. "
            f"Install it with: pip install \"srd_fx[{extra}]\"")
