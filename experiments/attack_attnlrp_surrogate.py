"""How close the AttnLRP map the attack optimises is to the AttnLRP map it reports.

``srd-fx attack --methods attnlrp`` reports LXT's AttnLRP map with LXT's zennit Gamma rules but
attacks the map without them (the Gamma rules cannot be differentiated again; see docs/attack.md).
For the first test scenes and a trained token model, this prints the Pearson correlation between
the two maps (absolute, channel-summed, as the attack compares them), per image and on average.

    python experiments/attack_attnlrp_surrogate.py [--arch vit] [--images 16]
"""
import argparse

import numpy as np
import torch

from srd_fx.eval import data as D
from srd_fx.eval.train import get_trained
from srd_fx.methods import robustness as R


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--arch", default="vit", help="trained digit-scene token model (vit or mixer)")
    p.add_argument("--images", type=int, default=16, help="number of test images (the first ones)")
    a = p.parse_args()
    torch.set_num_threads(1)
    model, acc = get_trained(a.arch, "gelu", 64, progress=False)
    images, _, _ = D.DigitScenes("test", size=64, n=a.images).tensors(progress=False)
    x = D.normalize(images)
    with torch.no_grad():
        target = model(x).argmax(1)
    method = R.make_method("attnlrp", model, x[:1], None)
    attacked, _ = method.attack(x, target)
    reported = method.report(x, target)
    att, rep = attacked.detach().flatten(1).numpy(), reported.detach().flatten(1).numpy()
    pcc = np.array([np.corrcoef(u, v)[0, 1] for u, v in zip(att, rep)])
    print(f"{a.arch} (test accuracy {acc:.3f}), {len(x)} test scenes, target = predicted class")
    print("PCC(attacked AttnLRP map without Gamma, reported map with Gamma) per image:",
          " ".join(f"{v:.3f}" for v in pcc))
    print(f"mean {pcc.mean():.3f}, min {pcc.min():.3f}, max {pcc.max():.3f}")


if __name__ == "__main__":
    main()
