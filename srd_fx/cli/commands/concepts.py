"""srd-fx concepts: what a PFV of a digit-scene model encodes and what it is made of (Fig. 5)."""
import json
import os

import torch

NAME = "concepts"
HELP = ("Global explanation (paper Appendix A, Fig. 5) for a digit-scenes model: a PFV's nearest PFVs "
        "in other images and its sub-concepts, each shown by its ERF; writes a PNG.")

#: default layer per architecture: an 8x8 layer of a 64x64 input, whose block reads another
#: 8x8 layer (VGG) or an 8x8 and a 16x16 layer (ResNet: residual branch and skip)
DEFAULT_LAYER = {"vgg": "features.14", "resnet": "layer2.0.act2"}


def _position(s):
    try:
        return tuple(int(v) for v in s.replace(" ", "").split(","))
    except ValueError:
        raise SystemExit(f"--position must look like 3,4 (row,column on the layer's grid), got {s!r}")


def add_arguments(p):
    p.add_argument("--arch", choices=("vgg", "resnet"), default="vgg",
                   help="digit-scenes model architecture (default: vgg)")
    p.add_argument("--act", default="relu", help="activation of the model (default: relu)")
    p.add_argument("--size", type=int, default=64, help="image side in pixels (default: 64)")
    p.add_argument("--layer", default=None,
                   help="layer of the query PFV: an activation module/node name, 'low' or 'high' "
                        f"(default: {DEFAULT_LAYER['vgg']} for vgg, {DEFAULT_LAYER['resnet']} for resnet)")
    p.add_argument("--image", type=int, default=0, help="index of the query image in the test split (default: 0)")
    p.add_argument("--position", default=None,
                   help="row,column of the query PFV on the layer's grid (default: the PFV with the largest "
                        "SRD relevance for the explained class)")
    p.add_argument("--target", type=int, default=None, help="class to explain (default: the predicted class)")
    p.add_argument("-k", "--neighbours", type=int, default=3, help="nearest PFVs to show (default: 3)")
    p.add_argument("--n-sub", type=int, default=4, help="sub-concepts (largest sharing ratios) to show (default: 4)")
    p.add_argument("--n-index", type=int, default=300,
                   help="test images whose PFVs are searched (default: 300)")
    p.add_argument("--value", choices=("pre", "post"), default="pre",
                   help="index pre-activation PFVs (the vectors SRD decomposes; default) or post-activation ones")
    p.add_argument("--repeat-images", action="store_true",
                   help="allow several neighbours from one image (default: the best PFV of each image)")
    p.add_argument("--crop-mass", type=float, default=0.9,
                   help="an ERF crop is the box of the fewest pixels holding this fraction of the positive "
                        "ERF mass (default: 0.9)")
    p.add_argument("--min-crop", type=int, default=12,
                   help="smallest side of an ERF crop in pixels, grown around the ERF (default: 12)")
    p.add_argument("--chunk-size", type=int, default=65536,
                   help="PFVs compared at a time during the search, bounding its memory (default: 65536)")
    p.add_argument("--batch-size", type=int, default=64, help="images per forward pass when indexing (default: 64)")
    p.add_argument("--device", default="cpu", help="torch device for the model and the index (default: cpu)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--cache-dir", default=None,
                   help="where trained models are cached (default: $SRD_FX_CACHE or ~/.cache/srd_fx)")
    p.add_argument("--epochs", type=int, default=None,
                   help="training epochs if the model is not cached yet (default: the training recipe's)")
    p.add_argument("--n-train", type=int, default=None,
                   help="training scenes if the model is not cached yet (default: the training recipe's)")
    p.add_argument("--n-test", type=int, default=None,
                   help="test scenes for the recorded accuracy if the model is trained now (default: the recipe's)")
    p.add_argument("--lr", type=float, default=None,
                   help="training learning rate if the model is not cached yet (default: the recipe's)")
    p.add_argument("--out", default=None, help="output PNG (default: srd_fx_results/concepts_<arch>.png)")
    p.add_argument("--json", default=None, help="also write the numbers of the figure to this JSON file")


def run(args) -> int:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    import srd_fx
    from srd_fx.eval import data as D
    from srd_fx.methods.concepts import PFVIndex, explain_pfv, plot_concepts
    from srd_fx.eval.train import get_trained

    if args.threads:
        torch.set_num_threads(args.threads)
    for name in ("neighbours", "n_sub", "n_index", "chunk_size", "batch_size"):
        if getattr(args, name) < 1:
            raise SystemExit(f"--{name.replace('_', '-')} must be at least 1")
    if not 0 < args.crop_mass <= 1:
        raise SystemExit(f"--crop-mass must be in (0, 1], got {args.crop_mass}")
    if args.min_crop < 1:
        raise SystemExit("--min-crop must be at least 1 pixel")
    if not 0 <= args.image < args.n_index:
        raise SystemExit(f"--image must be in [0, --n-index={args.n_index}), got {args.image}")
    layer = args.layer or DEFAULT_LAYER[args.arch]
    out_png = args.out or os.path.join("srd_fx_results", f"concepts_{args.arch}.png")
    train_kw = {k: v for k, v in (("epochs", args.epochs), ("n_train", args.n_train), ("n_test", args.n_test),
                                  ("lr", args.lr)) if v is not None}

    model, acc = get_trained(arch=args.arch, act=args.act, size=args.size, cache_dir=args.cache_dir, **train_kw)
    model = model.to(args.device).eval()
    print(f"model: {args.arch}/{args.act} {args.size}x{args.size}, test accuracy {acc:.3f}")
    images, labels, _ = D.DigitScenes("test", size=args.size, n=args.n_index).tensors()
    normalize = lambda t: D.normalize(t)  # noqa: E731  (images in [0, 1] -> model input)
    explainer = srd_fx.compile(model, layers=(layer,), example_input=normalize(images[:1].to(args.device)))
    index = PFVIndex.build(explainer, images, layer, value=args.value, transform=normalize,
                           batch_size=args.batch_size, device=args.device, labels=labels)
    print(f"indexed {len(index)} PFVs of {layer} ({index.n_images} images, grid {index.spatial}, "
          f"{index.vectors.shape[1]} channels)")
    res = explain_pfv(explainer, index, images, args.image,
                      None if args.position is None else _position(args.position),
                      k=args.neighbours, n_sub=args.n_sub, target=args.target, transform=normalize,
                      distinct_images=not args.repeat_images, mass=args.crop_mass, min_size=args.min_crop)
    q = res.query
    print(f"query: image {q.image} (label {q.label}, predicted {int(res.logits.argmax())}), {layer} {q.position}: "
          f"{100 * q.score:.1f}% of the relevance for class {res.target} at this layer")
    for i, nb in enumerate(res.neighbours, 1):
        print(f"  neighbour {i}: image {nb.image} (label {nb.label}) {nb.position}, cosine {nb.score:.4f}")
    for kk, s in res.shares.items():
        print(f"  sharing ratios to {res.layer_names.get(kk, kk)}: sum {float(s.sum()):.4f}")
    for sc in res.sub_concepts:
        print(f"  sub-concept {res.layer_names.get(sc.layer, sc.layer)} {sc.position}: mu = {sc.score:.4f}")

    fig = plot_concepts(res, images, title=f"{args.arch}/{args.act}: what {layer} {q.position} of test image "
                        f"{q.image} encodes (top: nearest PFVs of other images) and is made of (bottom)")
    os.makedirs(os.path.dirname(os.path.abspath(out_png)), exist_ok=True)
    fig.savefig(out_png, dpi=120)
    plt.close(fig)
    print(f"wrote {out_png}")
    if args.json:
        rec = dict(arch=args.arch, act=args.act, size=args.size, layer=layer, value=args.value,
                   test_accuracy=acc, n_index=index.n_images, target=res.target,
                   query=dict(image=q.image, position=q.position, label=q.label, share=q.score,
                              erf_sum=float(q.erf.sum()), box=q.box),
                   neighbours=[dict(image=n.image, position=n.position, label=n.label, cosine=n.score,
                                    erf_sum=float(n.erf.sum()), box=n.box) for n in res.neighbours],
                   sub_concepts=[dict(layer=res.layer_names.get(s.layer, s.layer), position=s.position,
                                      mu=s.score, box=s.box) for s in res.sub_concepts],
                   share_sums={res.layer_names.get(k, k): float(v.sum()) for k, v in res.shares.items()})
        with open(args.json, "w") as f:
            json.dump(rec, f, indent=1)
        print(f"wrote {args.json}")
    return 0
