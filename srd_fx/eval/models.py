"""Models for the evaluation harness.

* Small digit-scene classifiers, built with timm so that they run through the same code paths as a
  user's timm model: :func:`small_resnet` (a timm ``ResNet`` with basic blocks, one block per stage,
  narrow channels and output stride 16, so that a 64x64 input gives a 4x4 encoder output) and
  :func:`small_vgg` (a VGG in torchvision's layout: ``features`` made by
  ``torchvision.models.vgg.make_layers``, ReLU and max-pooling, then a flatten + MLP classifier).
* Small token models for the same scenes, also timm's own classes: :func:`small_vit` (a
  ``VisionTransformer`` with 8x8 patches, so a 64x64 input is an 8x8 grid of tokens plus a class
  token, depth 4, width 128) and :func:`small_mixer` (an ``MlpMixer`` with the same patches, depth 4,
  width 128, token-mixing MLP width 64).
* (torchvision/timm models by name, with weights from a file or the library's: :func:`srd_fx.eval.io.load_model`.)
* :func:`cam_layers`: the modules whose outputs are the low (encoder output) and high resolution
  layers, for the CAM baselines.
"""
from __future__ import annotations

from functools import partial
from typing import Dict, Optional, Tuple

import torch
import torch.nn as nn

#: activation name -> module class; the six activations of the paper's Table 4.
ACTIVATIONS = {
    "relu": nn.ReLU,
    "elu": nn.ELU,
    "leakyrelu": partial(nn.LeakyReLU, 0.01),
    "silu": nn.SiLU,
    "gelu": nn.GELU,
    "tanh": nn.Tanh,
}
#: activation name -> timm's name for it (timm's ResNet builds them with ``inplace=True``)
TIMM_ACTIVATIONS = {"relu": "relu", "elu": "elu", "leakyrelu": "leaky_relu", "silu": "silu", "gelu": "gelu",
                    "tanh": "tanh"}
ARCHS = ("resnet", "vgg", "vit", "mixer")
#: the token-model architectures among ARCHS (their layers read out as (B, N) tokens)
TOKEN_ARCHS = ("vit", "mixer")


def _act(act: str):
    key = str(act).lower().replace("_", "").replace("-", "")
    key = {"swish": "silu", "leaky": "leakyrelu"}.get(key, key)
    if key not in ACTIVATIONS:
        raise ValueError(f"unknown activation {act!r}; choose one of {sorted(ACTIVATIONS)}")
    return key, ACTIVATIONS[key]


def small_resnet(act: str = "relu", num_classes: int = 10, channels=(16, 32, 64, 128),
                 output_stride: int = 16) -> nn.Module:
    """A narrow timm ResNet (basic blocks, one per stage, a "deep" stem of three 3x3 convolutions as in
    ResNet-C/D) with activation ``act``.

    With output stride 16 a 64x64 input gives a 4x4 encoder output (``forward_features``) and the
    16x16 ``layer1`` output is the layer with 4x its resolution, as 7x7 and 28x28 are for ResNet50 at
    224x224 in the paper."""
    from timm.models.resnet import BasicBlock, ResNet
    key, _ = _act(act)
    act_layer = TIMM_ACTIVATIONS[key]
    model = ResNet(block=BasicBlock, layers=(1, 1, 1, 1), channels=tuple(channels), num_classes=num_classes,
                   stem_type="deep", stem_width=max(4, channels[0] // 2), output_stride=output_stride,
                   act_layer=act_layer)
    return model


class SmallVGG(nn.Module):
    """VGG in torchvision's layout (``features``, ``avgpool``, ``classifier``), narrow and for small
    inputs: four conv stages (the VGG11 pattern at 1/8 width, 8-16-32-64 channels) each ending in a
    2x2 max-pool, then flatten and a two-layer classifier.  A 64x64 input gives a 4x4 encoder output
    (the last max-pool, as 7x7 for VGG16 at 224x224) and 16x16 maps in the second stage."""

    def __init__(self, num_classes: int = 10, cfg=(8, "M", 16, "M", 32, 32, "M", 64, 64, "M"),
                 hidden: int = 64, size: int = 64, act: str = "relu"):
        super().__init__()
        from torchvision.models.vgg import make_layers
        key, act_layer = _act(act)
        self.features = make_layers(list(cfg), batch_norm=False)
        if key != "relu":  # make_layers builds ReLUs; swap them for the requested activation
            for i, m in enumerate(self.features):
                if isinstance(m, nn.ReLU):
                    self.features[i] = act_layer()
        n_pool = sum(1 for c in cfg if c == "M")
        side = size // (2 ** n_pool)
        last = [c for c in cfg if c != "M"][-1]
        self.avgpool = nn.Identity()
        self.classifier = nn.Sequential(
            nn.Flatten(1), nn.Linear(last * side * side, hidden), act_layer(), nn.Dropout(0.3),
            nn.Linear(hidden, num_classes))

        # He initialisation of the convolutions, as torchvision's VGG (the plain, batch-norm-free stack
        # hardly trains from PyTorch's default); the narrow classifier keeps PyTorch's default
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                nn.init.zeros_(m.bias)

    def forward(self, x):
        return self.classifier(self.avgpool(self.features(x)))


def small_vgg(act: str = "relu", num_classes: int = 10, size: int = 64) -> nn.Module:
    """A small VGG (ReLU and max-pooling by default) for ``size`` x ``size`` inputs."""
    if size % 16:
        raise ValueError(f"the small VGG needs an input size divisible by 16, got {size}")
    return SmallVGG(num_classes=num_classes, size=size, act=act)


def _patches(size: int, patch: int) -> None:
    if size % patch:
        raise ValueError(f"the small token models need an input size divisible by {patch}, got {size}")


def small_vit(act: str = "gelu", num_classes: int = 10, size: int = 64, patch: int = 8, width: int = 128,
              depth: int = 4, heads: int = 4) -> nn.Module:
    """A small timm ``VisionTransformer``: ``patch`` x ``patch`` patches (8x8 tokens at 64x64), a class
    token read by the head (``global_pool="token"``), ``depth`` pre-norm blocks of width ``width`` with
    ``heads`` heads and an MLP of 2x the width, activation ``act``."""
    from timm.models.vision_transformer import VisionTransformer
    _patches(size, patch)
    _, act_layer = _act(act)
    return VisionTransformer(img_size=size, patch_size=patch, num_classes=num_classes, embed_dim=width, depth=depth,
                             num_heads=heads, mlp_ratio=2.0, class_token=True, global_pool="token",
                             act_layer=act_layer)


def small_mixer(act: str = "gelu", num_classes: int = 10, size: int = 64, patch: int = 8, width: int = 128,
                depth: int = 4) -> nn.Module:
    """A small timm ``MlpMixer``: ``patch`` x ``patch`` patches, ``depth`` blocks of width ``width``
    (token-mixing MLP 64 wide, channel-mixing MLP 256 wide), activation ``act``, global average pooling
    of the tokens."""
    from timm.models.mlp_mixer import MlpMixer
    _patches(size, patch)
    _, act_layer = _act(act)
    return MlpMixer(num_classes=num_classes, img_size=size, patch_size=patch, num_blocks=depth, embed_dim=width,
                    mlp_ratio=(0.5, 2.0), act_layer=act_layer)


def build(arch: str, act: str = "relu", num_classes: int = 10, size: int = 64) -> nn.Module:
    """A fresh (untrained) small model: ``arch`` in {"resnet", "vgg", "vit", "mixer"}."""
    if arch == "resnet":
        return small_resnet(act, num_classes)
    if arch == "vgg":
        return small_vgg(act, num_classes, size)
    if arch == "vit":
        return small_vit(act, num_classes, size)
    if arch == "mixer":
        return small_mixer(act, num_classes, size)
    raise ValueError(f"unknown arch {arch!r}; choose one of {ARCHS}")


# ----------------------------------------------------------------------------- real models --------
def num_outputs(model: nn.Module, size: int = 64) -> int:
    p = next(model.parameters())
    with torch.no_grad():
        return model(torch.zeros(1, 3, size, size, dtype=p.dtype)).shape[-1]


# ----------------------------------------------------------------------------- CAM layers ---------
def cam_layers(model: nn.Module, x: torch.Tensor) -> Tuple[str, str]:
    """Names of the modules whose outputs are the encoder output ("low") and the last layer with 4x
    its resolution ("high"), found by one forward pass on ``x``.

    "low" is the last module (outermost of those sharing its output) with a 4-D output before the
    global pooling / flatten (for timm models: the last one inside ``forward_features``); "high" is
    the last module whose 4-D output has 4x (or, if there is none, the nearest larger) resolution.
    These are the layers SRD-low / SRD-high read out, and the target layers of the CAM baselines."""
    calls = []
    hooks = []
    for name, m in model.named_modules():
        if name == "" or isinstance(m, nn.Identity):
            continue
        hooks.append(m.register_forward_hook(
            lambda mod, inp, out, name=name: calls.append((name, tuple(out.shape)))
            if isinstance(out, torch.Tensor) else None))
    try:
        with torch.no_grad():
            if hasattr(model, "forward_features") and hasattr(model, "forward_head"):
                model.forward_features(x[:1])
            else:
                model(x[:1])
    finally:
        for h in hooks:
            h.remove()
    four_d = [(i, n, s) for i, (n, s) in enumerate(calls) if len(s) == 4]
    if not four_d:
        raise ValueError("the model has no 4-D (B, C, H, W) intermediate output: it is not a CNN")
    # the encoder output: everything after the last 4-D output is head (pooling, flatten, linear)
    if not (hasattr(model, "forward_features") and hasattr(model, "forward_head")):
        # stop at the first global reduction: a 4-D output with 1x1 space or a 2-D output
        cut = next((i for i, (n, s) in enumerate(calls) if len(s) == 2 or (len(s) == 4 and s[2] * s[3] == 1)),
                   len(calls))
        four_d = [t for t in four_d if t[0] < cut]
    low_name, low_shape = four_d[-1][1], four_d[-1][2]
    h_l, w_l = low_shape[2], low_shape[3]
    sizes = sorted({(s[2], s[3]) for _, _, s in four_d if s[2] >= 4 * h_l and s[3] >= 4 * w_l})
    want = (4 * h_l, 4 * w_l) if (4 * h_l, 4 * w_l) in sizes else (sizes[0] if sizes else (h_l, w_l))
    high_name = [n for _, n, s in four_d if (s[2], s[3]) == want][-1]
    return low_name, high_name


def get_module(model: nn.Module, name: str) -> nn.Module:
    try:
        return model.get_submodule(name)
    except AttributeError:
        raise ValueError(f"the model has no module {name!r}") from None


# ----------------------------------------------------------------------------- token models -------
def is_token_model(model: nn.Module) -> bool:
    """Whether ``model`` is a timm token model of one grid (ViT, DeiT, MLP-Mixer: a patch embedding
    that flattens the patches into tokens): its layers read out as (B, N) tokens."""
    pe = _patch_embed(model)
    return pe is not None and getattr(pe, "grid_size", None) is not None and bool(getattr(pe, "flatten", False))


def _patch_embed(model: nn.Module) -> Optional[nn.Module]:
    """timm's patch embedding: ``patch_embed`` (ViT) or ``stem`` (MLP-Mixer)."""
    for name in ("patch_embed", "stem"):
        pe = getattr(model, name, None)
        if isinstance(pe, nn.Module) and hasattr(pe, "patch_size"):
            return pe
    return None


def token_grid_size(model: nn.Module, x: torch.Tensor) -> Tuple[int, int]:
    """The (rows, columns) patch grid of a timm token model for inputs shaped like ``x``."""
    ph, pw = _patch_embed(model).patch_size
    return x.shape[-2] // ph, x.shape[-1] // pw


def token_layers(model: nn.Module) -> Tuple[str, str]:
    """For a timm token model of one grid (ViT, DeiT, MLP-Mixer): the module names of (low, high).

    *low* is the Grad-CAM target layer of pytorch-grad-cam's ViT example: the last block's first
    norm (``blocks[-1].norm1``) when a class token is read out (the last block's patch tokens do not
    reach the class token, so their gradient is 0), else the last block (Mixer: the tokens before
    the final norm and the mean).  *high* is SRD-high's layer: the activation of the first block's
    channel MLP (``blocks.0.mlp.act`` / ``blocks.0.mlp_channels.act``), the first activation layer
    whose positions are the patch grid, one block of four into the network as the CNNs' high layer
    is one stage of four (see docs/evaluation.md)."""
    blocks = getattr(model, "blocks", None)
    if not isinstance(blocks, nn.Sequential) or len(blocks) == 0:
        raise ValueError("token_layers expects a timm ViT-like or Mixer-like model with a `blocks` Sequential")
    last = len(blocks) - 1
    prefix = getattr(model, "num_prefix_tokens", 0)
    low = f"blocks.{last}.norm1" if prefix and getattr(model, "global_pool", "") == "token" \
        and hasattr(blocks[last], "norm1") else f"blocks.{last}"
    for high in ("blocks.0.mlp.act", "blocks.0.mlp_channels.act"):
        try:
            model.get_submodule(high)
            return low, high
        except AttributeError:
            continue
    raise ValueError("no channel-MLP activation in the first block (blocks.0.mlp.act / blocks.0.mlp_channels.act)")
