"""Train (or load from the cache) the seven digit-scene models of the evaluation: the ResNet with each
of the six activations of the paper's Table 4, and the VGG with ReLU.

    python experiments/train_models.py [--threads 1] [--cache-dir DIR]

Prints one line per model: its test accuracy and training time (from the cache record)."""
import argparse
import time

import torch

from srd_fx.eval.models import ACTIVATIONS
from srd_fx.eval.train import cached_record, get_trained

MODELS = [("resnet", a) for a in ACTIVATIONS] + [("vgg", "relu")]

if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads (default 1: on a shared 2-core machine one thread per job is faster)")
    p.add_argument("--cache-dir", default=None, help="cache directory (default $SRD_FX_CACHE or ~/.cache/srd_fx)")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    for arch, act in MODELS:
        t0 = time.time()
        _, acc = get_trained(arch, act, cache_dir=args.cache_dir)
        rec = cached_record(arch, act, cache_dir=args.cache_dir)
        print(f"{arch:6s} {act:9s} test accuracy {acc:.3f}  train accuracy {rec['train_accuracy']:.3f}  "
              f"trained in {rec['train_seconds']:.0f} s ({rec['torch_threads']} threads); this call {time.time() - t0:.0f} s",
              flush=True)
