"""Short training probes of the digit-scene token models (issue 21): why the small ViT and MLP-Mixer
stay at chance with the CNNs' data and optimiser.

Trains one model for ``--steps`` AdamW steps on the cached recipe's training scenes (the same
6000 scenes, seed and normalisation as ``srd_fx.eval.train``) and prints, every ``--every`` steps:

* the running training loss (ln 10 = 2.303 is chance),
* the gradient norm of the patch embedding and of the classifier head,
* how much the logits depend on the input: their standard deviation across 64 fixed test scenes
  (a model that has learnt to ignore its input goes to 0),
* for a ViT, how uniform the class token's attention is in the last block: the entropy of its
  attention over the tokens divided by ln(number of tokens) (1.0 = uniform, the initial state),

then the test accuracy on 500 test scenes and the accuracy on 500 training scenes.  Variations
(each a flag): learning rate, batch, warm-up, cosine decay, weight decay, label smoothing, average
pooling instead of the class token, a zero-initialised head, a convolutional stem in place of the
linear patch embedding (stride 8: the same 8x8 token grid), and feature distillation from the
cached ResNet (its stride-8 ``layer2`` map regressed from the ViT's second block, its ``layer4``
map from the last block, each through a linear map that is trained along).

    PYTHONPATH=. python experiments/token_training_probe.py --arch vit --steps 300 [--lr 1e-3] ...

One torch thread, seeded: two runs with the same flags print the same numbers.  The measured
probes are listed in docs/evaluation.md ("Token models: what was measured")."""
import argparse
import math
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

from srd_fx.eval import data as D
from srd_fx.eval.models import small_mixer, small_vit
from srd_fx.eval.train import DEFAULTS, _uint8_scenes, get_trained


def conv_stem(width: int) -> nn.Sequential:
    """Three 3x3 stride-2 convolutions (BN + ReLU after the first two): an 8x8 grid at 64 px."""
    def cbr(i, o):
        return [nn.Conv2d(i, o, 3, 2, 1, bias=False), nn.BatchNorm2d(o), nn.ReLU()]
    return nn.Sequential(*cbr(3, 32), *cbr(32, 64), nn.Conv2d(64, width, 3, 2, 1))


def build(args) -> nn.Module:
    if args.arch == "vit":
        from timm.models.vision_transformer import VisionTransformer
        model = VisionTransformer(img_size=64, patch_size=8, num_classes=10, embed_dim=128, depth=4, num_heads=4,
                                  mlp_ratio=2.0, class_token=True, global_pool=args.pool, act_layer=nn.GELU)
        embed = model.patch_embed
    else:
        model = small_mixer()
        embed = model.stem
    if args.conv_stem:
        embed.proj = conv_stem(128)
    if args.zero_head:
        nn.init.zeros_(model.head.weight)
        nn.init.zeros_(model.head.bias)
    return model


def cls_attention_uniformity(model: nn.Module, x: torch.Tensor) -> float:
    """Entropy of the class token's attention in the last block / ln(tokens), from the block's
    qkv projection (timm's fused attention does not expose the weights)."""
    blk = model.blocks[-1]
    seen = {}
    h = blk.attn.qkv.register_forward_hook(lambda m, i, o: seen.__setitem__("qkv", o))
    try:
        model(x)
    finally:
        h.remove()
    B, N, _ = seen["qkv"].shape
    H = blk.attn.num_heads
    q, k, _ = seen["qkv"].reshape(B, N, 3, H, -1).permute(2, 0, 3, 1, 4)
    att = torch.softmax(q[:, :, :1] @ k.transpose(-1, -2) * blk.attn.scale, -1)  # (B, H, 1, N)
    ent = -(att * att.clamp_min(1e-12).log()).sum(-1)
    return (ent.mean() / math.log(N)).item()


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arch", choices=("vit", "mixer"), default="vit")
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--every", type=int, default=50)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--warmup", type=int, default=0, help="linear warm-up steps")
    p.add_argument("--cosine", action="store_true", help="cosine decay to 0 over --steps")
    p.add_argument("--wd", type=float, default=0.05)
    p.add_argument("--label-smoothing", type=float, default=0.0)
    p.add_argument("--pool", choices=("token", "avg"), default="token", help="ViT: class token or mean of tokens")
    p.add_argument("--zero-head", action="store_true")
    p.add_argument("--conv-stem", action="store_true")
    p.add_argument("--distill", type=float, default=0.0,
                   help="weight of the feature-distillation losses from the cached ResNet (ViT only)")
    p.add_argument("--cache-dir", default=None, help="where the ResNet teacher is cached (as srd_fx.eval.train)")
    args = p.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    s = DEFAULTS
    xtr, ytr = _uint8_scenes(D.DigitScenes("train", size=64, n=s["n_train"], seed=s["seed"]), False)
    xte, yte = _uint8_scenes(D.DigitScenes("test", size=64, n=500, seed=s["seed"]), False)
    model = build(args)
    params = list(model.parameters())
    feats, losses = {}, []
    if args.distill:
        if args.arch != "vit":
            p.error("--distill is for the ViT")
        teacher, _ = get_trained("resnet", "relu", 64, cache_dir=args.cache_dir, progress=False)
        teacher.eval().requires_grad_(False)
        for name, mod in (("t2", teacher.layer2), ("t4", teacher.layer4), ("s2", model.blocks[1]),
                          ("s4", model.blocks[-1])):
            mod.register_forward_hook(lambda m, i, o, name=name: feats.__setitem__(name, o))
        proj2 = nn.Linear(128, teacher.layer2[-1].conv2.out_channels)
        proj4 = nn.Linear(128, teacher.layer4[-1].conv2.out_channels)
        params += list(proj2.parameters()) + list(proj4.parameters())
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=args.wd)

    def lr_at(step):
        w = min(1.0, (step + 1) / args.warmup) if args.warmup else 1.0
        return args.lr * w * (0.5 * (1 + math.cos(math.pi * step / args.steps)) if args.cosine else 1.0)

    def standardise(t):  # (B, C, H, W) -> (B, HW, C), zero mean and unit variance per channel
        t = t.flatten(2).transpose(1, 2)
        return (t - t.mean((0, 1))) / (t.std((0, 1)) + 1e-5)

    g = torch.Generator().manual_seed(0)
    perm, pos = torch.randperm(len(xtr), generator=g), 0
    probe_x = D.normalize(xte[:64].float() / 255)
    t0, running = time.time(), None
    for step in range(args.steps):
        for group in opt.param_groups:
            group["lr"] = lr_at(step)
        if pos + args.batch > len(perm):
            perm, pos = torch.randperm(len(xtr), generator=g), 0
        idx = perm[pos:pos + args.batch]
        pos += args.batch
        model.train()
        x = D.normalize(xtr[idx].float() / 255)
        ce = F.cross_entropy(model(x), ytr[idx], label_smoothing=args.label_smoothing)
        loss = ce
        if args.distill:
            with torch.no_grad():
                teacher(x)
            n = model.patch_embed.num_patches
            s2 = feats["s2"][:, -n:]
            s4 = feats["s4"][:, -n:].transpose(1, 2).reshape(len(x), 128, 8, 8)
            s4 = F.avg_pool2d(s4, 2).flatten(2).transpose(1, 2)  # the teacher's layer4 is 4x4
            loss = loss + args.distill * (F.mse_loss(proj2(s2), standardise(feats["t2"]))
                                          + F.mse_loss(proj4(s4), standardise(feats["t4"])))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        running = ce.item() if running is None else 0.9 * running + 0.1 * ce.item()
        if step % args.every == 0 or step == args.steps - 1:
            embed = model.patch_embed if args.arch == "vit" else model.stem
            g_embed = torch.cat([q.grad.flatten() for q in embed.parameters()]).norm().item()
            g_head = torch.cat([q.grad.flatten() for q in model.head.parameters()]).norm().item()
            model.eval()
            with torch.no_grad():
                spread = model(probe_x).std(0).mean().item()
                unif = cls_attention_uniformity(model, probe_x) if args.arch == "vit" and args.pool == "token" else float("nan")
            print(f"step {step:5d}  ce {running:.3f}  |grad| embed {g_embed:.3f} head {g_head:.3f}  "
                  f"logit spread {spread:.3f}  cls-attention uniformity {unif:.3f}  {time.time() - t0:.0f} s", flush=True)
        opt.step()
    model.eval()
    with torch.no_grad():
        acc = lambda xs, ys: (model(D.normalize(xs.float() / 255)).argmax(1) == ys).float().mean().item()
        print(f"test accuracy {acc(xte, yte):.3f}  train accuracy {acc(xtr[:500], ytr[:500]):.3f}  "
              f"({time.time() - t0:.0f} s)")


if __name__ == "__main__":
    main()
