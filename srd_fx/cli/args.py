"""Options that several ``srd-fx`` subcommands share, each defined once."""
import argparse

CACHE_HELP = "Cache directory of the trained models (default: $SRD_FX_CACHE or ~/.cache/srd_fx)."


ACT_HELP = "Activation of the trained models (relu, elu, leakyrelu, silu, gelu, tanh)."


def add_digit_models(p, arch_default, arch_help: str, size_help: str, *, archs=("resnet", "vgg"),
                     act_default="relu", act_help: str = ACT_HELP) -> None:
    """``--arch``, ``--act``, ``--size``: the trained digit-scene models a command runs on."""
    p.add_argument("--arch", nargs="+", default=list(arch_default), choices=list(archs), help=arch_help)
    p.add_argument("--act", default=act_default, help=act_help)
    p.add_argument("--size", type=int, default=64, help=size_help)


def add_cache_dir(p, help: str = CACHE_HELP) -> None:
    """``--cache-dir``: where trained digit-scene models are cached."""
    p.add_argument("--cache-dir", default=None, help=help)


def add_train_settings(p, help: str) -> None:
    """``--train-setting KEY=VALUE`` (repeatable), parsed by ``srd_fx.eval.train.parse_train_settings``."""
    p.add_argument("--train-setting", action="append", default=[], metavar="KEY=VALUE", help=help)


def add_dist_timeout(p: argparse.ArgumentParser) -> None:
    """``--dist-timeout``: the rendezvous timeout of a run under torchrun."""
    p.add_argument("--dist-timeout", type=float, default=60.0, metavar="SECONDS",
                   help="Under torchrun: seconds to wait for the rendezvous before giving up (default: 60).")
