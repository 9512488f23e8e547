"""``srd-fx explain``: SRD saliency maps of images for a torchvision / timm / user model."""
from __future__ import annotations

import argparse
import os
import sys

from ..args import add_dist_timeout

NAME = "explain"
HELP = "Explain images with SRD and write heatmap overlays (PNG) and raw maps (.npy)."


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("images", nargs="?", default="chelsea",
                   help="An image file, a folder, a quoted glob ('photos/*.jpg'), or a bundled photo name "
                        "(chelsea, coffee, astronaut, rocket); default: chelsea.")
    p.add_argument("--model", default="resnet50",
                   help="A torchvision or timm model name (resnet50, efficientnet_b0; torchvision:NAME / "
                        "timm:NAME to pick the library), or your own package.module:factory or "
                        "path/to/file.py:factory returning an nn.Module; default: resnet50.")
    p.add_argument("--weights", default=None, metavar="FILE",
                   help="A state-dict file (torch.save(model.state_dict(), FILE)) to load into the model; "
                        "it must match the architecture exactly.")
    p.add_argument("--pretrained", action="store_true",
                   help="Use the library's pretrained weights (needs network access or a filled cache).")
    p.add_argument("--num-classes", type=int, default=None, metavar="K",
                   help="Number of classes of the model, passed to the library or the factory (to match --weights).")
    p.add_argument("--target", type=int, default=None, metavar="CLASS",
                   help="Class index to explain (default: each image's predicted class).")
    p.add_argument("--layer", default="input",
                   help="Where to read the relevance: input (SRD-input), low (encoder output, SRD-low), high "
                        "(4x its resolution, SRD-high), or an activation module/node name such as "
                        "layer1.0.act2; overlays are resized to the image (default: input).")
    p.add_argument("--size", type=int, default=None, metavar="PIXELS",
                   help="Input side after resizing the shorter side and centre-cropping (default: the timm "
                        "model's input size, else 224).")
    p.add_argument("--mean", type=float, nargs=3, default=None, metavar=("R", "G", "B"),
                   help="Per-channel mean of the model's input normalisation (default: the timm model's, else ImageNet's).")
    p.add_argument("--std", type=float, nargs=3, default=None, metavar=("R", "G", "B"),
                   help="Per-channel standard deviation of the input normalisation (default: the timm model's, else ImageNet's).")
    p.add_argument("--device", default=None,
                   help="Torch device to run on, e.g. cpu or cuda (default: cpu; under torchrun cuda:LOCAL_RANK "
                        "when there are GPUs).")
    p.add_argument("--threads", type=int, default=None, metavar="N",
                   help="torch.set_num_threads (default: torch's choice; torchrun sets 1 per process).")
    p.add_argument("--out", default="srd.png",
                   help="Output PNG for one image, or a folder for several (then NAME_srd.png per image); "
                        "default: srd.png.")
    p.add_argument("--alpha", type=float, default=0.7,
                   help="Opacity of the heatmap where the relevance is largest, in [0, 1]; it falls to 0 "
                        "(the photo unchanged) where the relevance is zero (default: 0.7).")
    p.add_argument("--cmap", default="bwr",
                   help="Matplotlib colormap of the heatmap, drawn on [-1, 1] centred on zero: a diverging map "
                        "such as bwr, RdBu_r, coolwarm (default: bwr, positive red, negative blue).")
    p.add_argument("--no-npy", action="store_true",
                   help="Do not write the raw map (.npy, float32 at the layer's own resolution, not normalised) "
                        "next to each PNG.")
    p.add_argument("--fresh", action="store_true",
                   help="Redo every image of a folder run, even those an earlier run of the same settings "
                        "finished (by default a rerun skips them: it resumes).")
    add_dist_timeout(p)


def _fail(msg: str) -> int:
    print(f"srd-fx explain: error: {msg}", file=sys.stderr)
    return 2


def _settings(args) -> dict:
    """What the maps depend on (a folder's earlier outputs are reused only under the same)."""
    import srd_fx
    w = args.weights
    return dict(model=args.model, weights=None if not w else [os.path.abspath(w), os.path.getsize(w) if os.path.isfile(w) else None],
                pretrained=args.pretrained, num_classes=args.num_classes, target=args.target, layer=args.layer,
                size=args.size, mean=args.mean, std=args.std, alpha=args.alpha, cmap=args.cmap, npy=not args.no_npy,
                srd_fx=srd_fx.__version__)


def run(args: argparse.Namespace) -> int:
    import srd_fx
    from srd_fx.eval import distributed

    try:
        world = distributed.init(args.device, args.dist_timeout)
    except srd_fx.SRDError as e:
        return _fail(str(e))
    try:
        return _run(args, world)
    finally:
        world.close()


def _run(args: argparse.Namespace, world) -> int:
    import numpy as np
    import torch

    import srd_fx
    from srd_fx.eval.distributed import RunState, atomic_path, check_collisions
    from srd_fx.eval.io import (ModelLoadError, find_images, load_model, model_preprocessing, overlay,
                           preprocess, read_image, upsample)

    who = f"{world.label}: " if world.distributed else ""
    if not 0.0 <= args.alpha <= 1.0:
        return _fail(f"--alpha must be in [0, 1], got {args.alpha}")
    try:
        import matplotlib
        matplotlib.colormaps[args.cmap]
    except KeyError:
        return _fail(f"unknown matplotlib colormap {args.cmap!r} (see matplotlib.colormaps)")
    if args.threads:
        torch.set_num_threads(args.threads)
    device = world.device
    try:
        torch.empty(0, device=device)
    except (RuntimeError, AssertionError) as e:
        return _fail(f"device {str(device)!r} is not usable here ({str(e).splitlines()[0]})")
    try:
        files = find_images(args.images)
        with world.main_first():  # a pretrained download happens once, on rank 0
            torch.manual_seed(0)  # random weights (no --weights/--pretrained) are the same in every process
            model = load_model(args.model, args.weights, args.pretrained, args.num_classes).to(device)
    except (FileNotFoundError, ModelLoadError) as e:
        return _fail(str(e))
    if not (args.weights or args.pretrained) and world.is_main:
        print(f"note: {args.model} has random weights (no --weights/--pretrained): the maps explain an "
              "untrained network (initialised with torch.manual_seed(0))", file=sys.stderr)
    size, mean, std = model_preprocessing(model, args.size, args.mean, args.std)

    many = len(files) > 1 or not args.out.lower().endswith(".png")

    def outputs(f):
        stem = os.path.splitext(os.path.basename(f))[0]
        png = os.path.join(args.out, stem + "_srd.png") if many else args.out
        return [png] + ([] if args.no_npy else [os.path.splitext(png)[0] + ".npy"])

    try:
        check_collisions(files, [outputs(f) for f in files])
    except srd_fx.SRDError as e:
        return _fail(str(e))
    state, done = None, {}
    if many:
        # a folder run is resumable: finished images are logged in OUT/.srd_fx/ and skipped by a rerun
        state = RunState(args.out, "explain", _settings(args), world)
        try:
            state.check(fresh=args.fresh)
        except srd_fx.SRDError as e:
            return _fail(f"{who}{e}")
        world.barrier()
        if world.is_main:
            os.makedirs(args.out, exist_ok=True)
            state.begin(fresh=args.fresh)
        world.barrier()
        done = {} if args.fresh else state.done()
    elif os.path.dirname(args.out):
        os.makedirs(os.path.dirname(args.out), exist_ok=True)
    try:
        explainer = srd_fx.compile(model, layers=(args.layer,))
    except srd_fx.SRDError as e:
        return _fail(f"{args.model} cannot be compiled: {e}")
    skipped, unreadable = 0, []
    mine = [files[i] for i in world.share(len(files))]
    for f in mine:
        outs = outputs(f)
        if state is not None and RunState.complete(done.get(os.path.abspath(f)), outs):
            skipped += 1
            continue
        where = f"{who}{f}: "
        resume = (" The finished images are kept: rerun the same command to resume." if many else "")
        try:
            x, rgb = preprocess(read_image(f), size, mean, std)
        except ValueError as e:
            if len(files) == 1:
                return _fail(f"{who}{e}")
            print(f"srd-fx explain: warning: {who}{e}; skipped", file=sys.stderr)  # a batch goes on
            unreadable.append(f)
            continue
        x = x.to(device)
        try:
            with torch.no_grad():
                if args.target is not None:
                    k = model(x).shape[-1]
                    if not 0 <= args.target < k:
                        return _fail(f"--target {args.target} is outside the model's {k} classes (0..{k - 1})")
                out = explainer(x, args.target)
        except srd_fx.SRDError as e:
            return _fail(f"{where}{e}{resume}")
        rel = out.relevance[args.layer]
        note = ""
        if rel.dim() == 2:          # a token layer (B, N): the patch grid, prefix tokens beside it
            rel, prefix = explainer.token_grid(rel)
            if prefix.shape[1]:
                total = float(out.relevance[args.layer][0].sum())
                note = f"; prefix tokens hold {float(prefix[0].sum()):.3g} of {total:.3g}"
        raw = rel[0].detach().float().cpu()
        sal = upsample(raw[None], x.shape[-2:])[0].double().numpy()
        cls = int(out.logits.argmax(1)) if args.target is None else args.target
        png = outs[0]
        msg = f"{where}class {cls}{note}, wrote {png}"
        if not args.no_npy:
            with atomic_path(outs[1]) as tmp:
                np.save(tmp, raw.numpy().astype(np.float32))
            msg += f" and {outs[1]} {tuple(raw.shape)}"
        with atomic_path(png) as tmp:
            overlay(rgb, sal, tmp, title=f"SRD-{args.layer}, class {cls}", cmap=args.cmap, alpha=args.alpha)
        if state is not None:
            state.log(os.path.abspath(f), outs, target=cls)
        print(msg)
    if skipped:
        print(f"{who}skipped {skipped} image(s) an earlier run finished (--fresh redoes them)")
    if state is not None:
        # (all_gather is also the barrier) a run that skipped unreadable images stays unfinished:
        # its rerun retries them, with the same settings and number of processes
        skipped_any = any(world.all_gather(len(unreadable)))
        if world.is_main and not skipped_any:
            state.finish()
            if world.distributed:
                print(f"{len(files)} image(s) explained by {world.size} processes into {args.out}")
    if unreadable:
        return _fail(f"{who}{len(unreadable)} of {len(mine)} images could not be read and were skipped: "
                     + ", ".join(unreadable[:5]) + (" ..." if len(unreadable) > 5 else ""))
    return 0
