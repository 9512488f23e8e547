"""Why LRP z+ is also attacked on the ReLU network (method ``lrp_zplus_relu``).

For a few digit-scene test images and the trained ResNet, compare the LRP z+ map of the softplus
copy (what ``lrp_zplus`` attacks) with the ReLU network's map (PCC), and the size and smoothness
of the map's input gradient: the norm of d<w, map>/dx and the directional derivative of
<w, map> along one random direction from autograd and from central differences with steps h.

    python experiments/attack_lrp_surrogate.py [--arch resnet] [--beta 10] [--images 3]
"""
import argparse

import numpy as np
import torch

from srd_fx.eval import data as D
from srd_fx.methods import robustness as R
from srd_fx.eval.train import get_trained


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--arch", default="resnet", help="trained digit-scene model (resnet or vgg)")
    p.add_argument("--beta", type=float, default=10.0, help="softplus beta of the surrogate")
    p.add_argument("--images", type=int, default=3, help="number of test images")
    a = p.parse_args()
    torch.set_num_threads(1)
    model, acc = get_trained(a.arch, "relu", 64, progress=False)
    model = model.double()
    ds = D.DigitScenes("test", size=64, n=a.images)
    print(f"{a.arch} (test accuracy {acc:.3f}), float64, softplus beta {a.beta}")
    for i in range(a.images):
        x = D.normalize(ds[i][0][None]).double()
        t = model(x).argmax(1)
        w = torch.rand(1, 64, 64, dtype=torch.float64, generator=torch.Generator().manual_seed(i))
        d = torch.randn(x.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(100 + i))
        maps = {}
        for label, beta in (("softplus", a.beta), ("relu", None)):
            meth = R.make_method("lrp_zplus", model, x, beta=beta)
            fn = lambda z: (meth.attack(z, t)[0] * w).sum()  # noqa: E731
            xr = x.clone().requires_grad_(True)
            val = fn(xr)
            (g,) = torch.autograd.grad(val, xr)
            maps[label] = meth.attack(x.clone().requires_grad_(True), t)[0].detach()
            fds = []
            for h in (1e-3, 1e-4, 1e-5, 1e-6):
                fds.append(float((fn(x + h * d) - fn(x - h * d)).detach() / (2 * h)))
            print(f"image {i} {label:8s}: |grad| {float(g.norm()):.3g}; directional derivative autograd "
                  f"{float((g * d).sum()):.4g}, central differences h=1e-3..1e-6: "
                  + ", ".join(f"{v:.4g}" for v in fds))
        pcc = R.similarity(maps["softplus"], maps["relu"])["pcc"][0]
        print(f"image {i}: PCC(softplus LRP map, ReLU LRP map) = {pcc:.3f}")


if __name__ == "__main__":
    main()
