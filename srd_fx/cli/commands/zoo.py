"""``srd-fx zoo``: compile timm CNNs and check their explainers (the model-zoo sweep)."""
from __future__ import annotations

NAME = "zoo"
HELP = ("Compile timm CNN architectures with srd_fx and check each explainer in float64 (logits, "
        "conservation, finiteness, batch independence); writes model_zoo_checks/REPORT.md.")


def add_arguments(parser) -> None:
    from model_zoo_checks.cli import add_arguments as add
    add(parser)


def run(args) -> int:
    from model_zoo_checks.cli import run as run_zoo
    return run_zoo(args)
