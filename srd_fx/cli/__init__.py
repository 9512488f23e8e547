"""The ``srd-fx`` command line.  Each subcommand lives in ``srd_fx/cli/commands/<name>.py`` and exposes
``NAME``, ``HELP``, ``add_arguments(parser)`` and ``run(args) -> int``."""
from __future__ import annotations

import argparse
import importlib
import pkgutil
import sys

from .. import __version__


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
    p = argparse.ArgumentParser(prog="srd-fx", description="SRD (Sharing Ratio Decomposition) explanations "
                                "for PyTorch CNNs, compiled with torch.fx.")
    p.add_argument("--version", action="version", version=f"srd_fx {__version__}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    for mod in _commands():
        sp = sub.add_parser(mod.NAME, help=mod.HELP, description=mod.HELP)
        mod.add_arguments(sp)
        sp.set_defaults(_run=mod.run)
    return p


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "_run", None):
        parser.print_help()
        return 1
    return int(args._run(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
