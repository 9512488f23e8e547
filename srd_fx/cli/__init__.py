"""The ``srd-fx`` command line.  Each subcommand lives in ``srd_fx/cli/commands/<name>.py`` and exposes
``NAME``, ``HELP``, ``add_arguments(parser)`` and ``run(args) -> int``.

Most subcommands need the ``eval`` extra (``pip install "srd_fx[eval]"``); without it ``srd-fx --help``
still lists them and running one prints which libraries are missing and how to install them."""
from __future__ import annotations

import argparse
import importlib
import pkgutil
import sys

from .. import __version__
from ..errors import MissingDependencyError, SRDError
from ..extras import EVAL_LIBRARIES


def _commands():
    from . import commands
    out = []
    for info in sorted(pkgutil.iter_modules(commands.__path__), key=lambda i: i.name):
        if info.name.startswith("_"):
            continue
        mod = importlib.import_module(f"{commands.__name__}.{info.name}")
        if hasattr(mod, "run"):
            out.append(mod)
    return out


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``srd-fx`` with one subparser per module of ``srd_fx.cli.commands``."""
    p = argparse.ArgumentParser(prog="srd-fx", description="SRD (Sharing Ratio Decomposition) explanations "
                                "for PyTorch CNNs, compiled with torch.fx.")
    p.add_argument("--version", action="version", version=f"srd_fx {__version__}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    for mod in _commands():
        sp = sub.add_parser(mod.NAME, help=mod.HELP, description=mod.HELP)
        try:
            mod.add_arguments(sp)
        except (MissingDependencyError, ModuleNotFoundError) as e:  # its options need the eval extra
            sp.description = f"{mod.HELP}\n\nUnavailable here: {_missing_message(e)}"
            sp.set_defaults(_run=_unavailable(e))
            continue
        sp.add_argument("--debug", action="store_true",
                        help="Show the full traceback of an error instead of its one-paragraph message.")
        sp.set_defaults(_run=mod.run)
    return p


def _missing_message(e: ImportError) -> str:
    if isinstance(e, MissingDependencyError):
        return str(e)
    return (f"the library {e.name!r} is not installed; this command needs srd_fx's 'eval' extra: "
            f"pip install \"srd_fx[eval]\"")


def _unavailable(e: ImportError):
    def run(args) -> int:
        print(f"srd-fx {args.command}: error: {_missing_message(e)}", file=sys.stderr)
        return 2
    run.unavailable = True
    return run


def main(argv: list[str] | None = None) -> int:
    """Run the ``srd-fx`` command line.

    Parameters
    ----------
    argv
        The arguments after the program name (default: ``sys.argv[1:]``).

    Returns
    -------
    int
        The exit status: 0 on success, 1 without a subcommand, 2 on an error reported on stderr
        (bad arguments, a missing optional library).
    """
    parser = build_parser()
    args, rest = parser.parse_known_args(argv)
    if rest and not getattr(getattr(args, "_run", None), "unavailable", False):
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    if not getattr(args, "_run", None):
        parser.print_help()
        return 1
    try:
        return int(args._run(args) or 0)
    except (MissingDependencyError, ModuleNotFoundError) as e:
        if isinstance(e, ModuleNotFoundError) and (e.name or "").split(".")[0] not in EVAL_LIBRARIES:
            raise
        print(f"srd-fx {args.command}: error: {_missing_message(e)}", file=sys.stderr)
        return 2
    except SRDError as e:
        if getattr(args, "debug", False):
            raise
        print(f"srd-fx {args.command}: error: {e}\n(--debug shows the traceback)", file=sys.stderr)
        return 2

