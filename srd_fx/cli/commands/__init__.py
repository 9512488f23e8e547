"""Subcommands of ``srd-fx`` (one module each, discovered by srd_fx.cli)."""
