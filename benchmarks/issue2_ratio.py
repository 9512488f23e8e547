"""Issue 2's figure: time of explainer(x) over input x gradient on torchvision ResNet50, batch 4,
224x224, CPU (median of several runs in one process).  Peak memory: see benchmarks/bench.py.

    python benchmarks/issue2_ratio.py [--repeats 5] [--batch 4] [--threads 2]
"""
import argparse
import statistics
import time

import torch
import torchvision

import srd_fx


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=5, help="timed calls per method (median reported)")
    ap.add_argument("--batch", type=int, default=4, help="batch size of the input")
    ap.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = torchvision.models.resnet50().eval()
    for p in model.parameters():
        p.requires_grad_(False)
    x = torch.randn(args.batch, 3, 224, 224)
    with torch.no_grad():
        target = model(x).argmax(1)
    explainer = srd_fx.compile(model, example_input=x)

    def input_x_gradient():
        xx = x.clone().requires_grad_()
        model(xx).gather(1, target[:, None]).sum().backward()
        return xx.grad * xx

    def srd():
        with torch.no_grad():
            return explainer(x, target).saliency

    times = {}
    for name, fn in (("input_x_gradient", input_x_gradient), ("srd", srd)):
        fn()
        ts = []
        for _ in range(args.repeats):
            t = time.perf_counter()
            fn()
            ts.append(time.perf_counter() - t)
        times[name] = statistics.median(ts)
    print(f"ResNet50, batch {args.batch}, 224x224, CPU, {args.threads} threads, median of {args.repeats}:")
    for k, v in times.items():
        print(f"  {k}: {v:.3f} s")
    print(f"  ratio SRD / input x gradient: {times['srd'] / times['input_x_gradient']:.2f}")


if __name__ == "__main__":
    main()
