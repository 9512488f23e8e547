"""``srd-fx train``: train (or load from the cache) the small digit-scene models of the evaluation."""
from __future__ import annotations

NAME = "train"
HELP = ("Train the small digit-scene models used by 'srd-fx evaluate' (cached on disk) and print their "
        "test accuracy.")


def add_arguments(p):
    p.add_argument("models", nargs="*", metavar="ARCH:ACT",
                   help="Models to train, e.g. resnet:relu vgg:relu vit:gelu mixer:gelu (a bare ARCH: relu for "
                        "resnet/vgg, gelu for the token models vit/mixer; default: the six ResNets and the ReLU VGG).")
    p.add_argument("--size", type=int, default=64, help="Input side in pixels (default 64).")
    p.add_argument("--cache-dir", default=None,
                   help="Cache directory (default: $SRD_FX_CACHE or ~/.cache/srd_fx).")
    p.add_argument("--train-setting", action="append", default=[], metavar="KEY=VALUE",
                   help="Override a training setting (epochs, n_train, n_test, batch_size, lr, weight_decay, seed); repeatable.")
    p.add_argument("--threads", type=int, default=None,
                   help="torch.set_num_threads for data generation and scoring (default: torch's choice); training "
                        "itself always runs on one thread, so that the weights do not depend on the machine.")
    p.add_argument("--no-progress", action="store_true", help="Hide the progress bar.")


def run(args) -> int:
    import sys

    import torch

    from srd_fx.eval.models import ACTIVATIONS
    from srd_fx.eval.train import cached_record, get_trained, parse_train_settings
    if args.threads:
        torch.set_num_threads(args.threads)
    specs = args.models or [f"resnet:{a}" for a in ACTIVATIONS] + ["vgg:relu"]
    kw = parse_train_settings(args.train_setting)
    for spec in specs:
        arch, _, act = spec.partition(":")
        act = act or ("gelu" if arch in ("vit", "mixer") else "relu")
        try:
            _, acc = get_trained(arch, act, size=args.size, cache_dir=args.cache_dir,
                                 progress=not args.no_progress, **kw)
        except (ValueError, TypeError) as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        rec = cached_record(arch, act, size=args.size, cache_dir=args.cache_dir, **kw)
        print(f"{spec}: test accuracy {acc:.3f} (trained in {rec['train_seconds']:.0f} s with "
              f"{rec['torch_threads']} threads)")
    return 0
