"""srd-fx explain: SRD saliency maps of images for a torchvision / timm / user model."""
import os

import numpy as np
import torch
import torch.nn.functional as F

NAME = "explain"
HELP = "Explain images with SRD and write heatmap overlays (PNG) and raw maps (.npy)."


def add_arguments(p):
    p.add_argument("images", nargs="?", default="chelsea",
                   help="an image file, a folder, a glob, or a bundled photo name (chelsea, coffee, "
                        "astronaut, rocket); default: chelsea")
    p.add_argument("--model", default="resnet50",
                   help="torchvision or timm model name, or package.module:factory (default: resnet50)")
    p.add_argument("--weights", default=None, help="state-dict file to load into the model")
    p.add_argument("--pretrained", action="store_true",
                   help="download the library's pretrained weights (needs network access)")
    p.add_argument("--num-classes", type=int, default=None, help="number of classes of the model (for --weights)")
    p.add_argument("--target", type=int, default=None, help="class to explain (default: the predicted class)")
    p.add_argument("--layer", default="input",
                   help="where to read relevance: input (SRD-input), low (encoder output), high, or an "
                        "activation module/node name; maps are resized to the image (default: input)")
    p.add_argument("--size", type=int, default=224, help="input resolution after resize/centre-crop (default: 224)")
    p.add_argument("--out", default="srd.png",
                   help="output PNG (one image) or folder (several images); default: srd.png")
    p.add_argument("--alpha", type=float, default=0.5, help="heatmap opacity in the overlay (default: 0.5)")
    p.add_argument("--cmap", default="jet", help="matplotlib colormap of the heatmap (default: jet)")
    p.add_argument("--no-npy", action="store_true", help="do not write the raw map next to the PNG")


def run(args) -> int:
    import srd_fx
    from srd_fx.io import find_images, load_model, overlay, preprocess, read_image

    files = find_images(args.images)
    model = load_model(args.model, args.weights, args.pretrained, args.num_classes)
    if not (args.weights or args.pretrained):
        print(f"note: {args.model} has random weights (no --weights/--pretrained): the map explains an "
              "untrained network")
    explainer = srd_fx.compile(model, layers=(args.layer,))
    many = len(files) > 1 or (args.out and not args.out.lower().endswith(".png"))
    if many:
        os.makedirs(args.out, exist_ok=True)
    for f in files:
        x, rgb = preprocess(read_image(f), args.size)
        with torch.no_grad():
            out = explainer(x, args.target)
        r = out.relevance[args.layer]
        if r.shape[-2:] != x.shape[-2:]:
            r = F.interpolate((r / r.abs().amax((1, 2), keepdim=True).clamp_min(1e-12))[:, None],
                              size=x.shape[-2:], mode="bilinear", align_corners=False)[:, 0]
        sal = r[0].double().numpy()
        cls = int(out.logits.argmax(1)) if args.target is None else args.target
        stem = os.path.splitext(os.path.basename(f))[0]
        png = os.path.join(args.out, stem + "_srd.png") if many else args.out
        overlay(rgb, sal, png, title=f"SRD-{args.layer}, class {cls}", cmap=args.cmap, alpha=args.alpha)
        if not args.no_npy:
            np.save(os.path.splitext(png)[0] + ".npy", sal)
        print(f"{f}: class {cls}, wrote {png}")
    return 0
