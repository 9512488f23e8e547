"""Models for the evaluation harness.

* Small digit-scene classifiers, built with timm so that they run through the same code paths as a
  user's timm model: :func:`small_resnet` (a timm ``ResNet`` with basic blocks, one block per stage,
  narrow channels and output stride 16, so that a 64x64 input gives a 4x4 encoder output) and
  :func:`small_vgg` (a VGG in torchvision's layout: ``features`` made by
  ``torchvision.models.vgg.make_layers``, ReLU and max-pooling, then a flatten + MLP classifier).
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
ARCHS = ("resnet", "vgg")


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


def build(arch: str, act: str = "relu", num_classes: int = 10, size: int = 64) -> nn.Module:
    """A fresh (untrained) small model: ``arch`` in {"resnet", "vgg"}."""
    if arch == "resnet":
        return small_resnet(act, num_classes)
    if arch == "vgg":
        return small_vgg(act, num_classes, size)
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
