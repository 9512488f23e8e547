"""Which timm models the zoo sweep covers, and which family each belongs to.

How the default list is derived (this is the whole rule, in code below):

1. Every module of ``timm.models`` is classified by hand, once, in either :data:`CNN_MODULES`
   (the architecture family is a convolutional network: convolutions, normalisation,
   element-wise activations, pooling, and channel/spatial gates) or :data:`NON_CNN_MODULES`
   (transformers, conv-attention hybrids, MLP mixers, state-space models; each with a reason).
   :func:`unclassified_modules` lists timm modules in neither table, so a timm upgrade that adds
   a module is noticed (``tests/rules/test_zoo_subset.py`` checks it) instead of silently ignored.
2. The default list is ``timm.list_models(module=m)`` for every ``m`` in ``CNN_MODULES``.
   ``timm.list_models()`` without ``pretrained=True`` returns architecture names, without the
   ``.tag`` of pretrained weights, so each architecture appears once.
3. Names matching :data:`EXCLUDED_NAMES` are dropped: timm's own unit-test configurations and the
   few attention variants that live inside CNN modules (CLIP ResNets with an attention-pool head,
   MobileNetV4 hybrids, bilinear/non-local attention ResNeXt).

The family of a model (used for per-family pass rates) is the first matching pattern of
:data:`FAMILY_PATTERNS`, else its timm module name.

Every other timm architecture (the token models) belongs to one of the groups of
:data:`TOKEN_GROUPS`, by its timm module (:data:`MODULE_GROUP`); its family is its timm module.
Together the groups cover ``timm.list_models()`` exactly once (:func:`group_of`, :func:`models_of`):

* ``cnn``: the default list above;
* ``transformer``: attention on tokens throughout (ViT, DeiT, BEiT, EVA, CaiT, Swin, PVT, XCiT, ...);
* ``hybrid``: convolution stages or stems combined with attention (CoAtNet/MaxViT, LeViT, MobileViT,
  EfficientFormer, FastViT, BoTNet/HaloNet, ...), including the attention variants that live in CNN
  modules (CLIP ResNets with an attention pool, MobileNetV4 hybrids, ``bat_*``);
* ``mlp``: token-mixing MLPs (MLP-Mixer, ResMLP, gMLP);
* ``other``: the remaining token mixers (MetaFormer's pooling/separable-conv/attention mixers, focal
  modulation, LSTMs, state-space blocks, DCT) and timm's unit-test configurations (``test_*``).
"""
from __future__ import annotations

import re
from typing import Dict, List, Optional, Sequence

#: timm modules whose architectures are CNNs (module -> what it holds).
CNN_MODULES: Dict[str, str] = {
    "resnet": "ResNet, ResNet-C/D/S/T, ResNeXt, SE-/ECA-ResNet(X), Wide ResNet, ResNet-RS, anti-aliased/blur ResNets",
    "resnetv2": "pre-activation ResNet v2 and BiT",
    "senet": "SENet-154 and SE-ResNet(X) (legacy Cadene ports)",
    "sknet": "Selective-Kernel ResNets (softmax gate over kernel branches)",
    "resnest": "ResNeSt (split attention = softmax/sigmoid channel gate over radix groups)",
    "res2net": "Res2Net / Res2NeXt",
    "regnet": "RegNetX/Y/V/Z (pycls designs)",
    "efficientnet": "EfficientNet(V2), MobileNetV1/V2, MNASNet, FBNet-C, MixNet, TinyNet, EdgeTPU, SPNASNet",
    "mobilenetv3": "MobileNetV3, MobileNetV4 (conv), FBNetV3, LCNet",
    "hardcorenas": "HardCoRe-NAS (MobileNetV3 blocks)",
    "ghostnet": "GhostNet v1/v2/v3",
    "repghost": "RepGhostNet",
    "rexnet": "ReXNet",
    "densenet": "DenseNet",
    "dpn": "Dual Path Networks",
    "inception_v3": "Inception-v3",
    "inception_v4": "Inception-v4",
    "inception_resnet_v2": "Inception-ResNet-v2",
    "xception": "Xception (legacy)",
    "xception_aligned": "Aligned Xception",
    "nasnet": "NASNet-A Large",
    "pnasnet": "PNASNet-5 Large",
    "selecsls": "SelecSLS",
    "vovnet": "VoVNet / ESE-VoVNet",
    "dla": "Deep Layer Aggregation",
    "hrnet": "HRNet classification",
    "cspnet": "CSPResNet(X), CSPDarkNet, DarkNet, CS3 nets",
    "cspnext": "CSPNeXt (RTMDet backbone)",
    "byobnet": "RepVGG, GENet, MobileOne, RegNetZ, ResNet-ts, GC/ECA/SE ResNets (bring-your-own-blocks)",
    "vgg": "VGG (timm's ConvMlp pre-logits)",
    "tresnet": "TResNet",
    "nfnet": "normaliser-free ResNets/RegNets and NFNet-F",
    "convnext": "ConvNeXt v1/v2",
    "hgnet": "PP-HGNet v1/v2",
    "lcnetv2": "PP-LCNetV2",
    "rdnet": "RDNet (DenseNets reloaded)",
    "fasternet": "FasterNet (partial convolutions)",
    "repvit": "RepViT (a mobile CNN, despite the name)",
    "inception_next": "InceptionNeXt (MetaNeXt with inception depthwise convs)",
    "convmixer": "ConvMixer",
    "starnet": "StarNet (element-wise product of two conv branches)",
    "mambaout": "MambaOut (gated CNN blocks, no state-space model)",
}

#: timm modules left out of the default list, with the reason.
NON_CNN_MODULES: Dict[str, str] = {
    "beit": "vision transformer", "cait": "vision transformer", "coat": "conv-attention transformer",
    "convit": "vision transformer", "crossvit": "vision transformer", "deit": "vision transformer",
    "deepseek_vit": "vision transformer", "eva": "vision transformer", "gemma4_vit": "vision transformer",
    "naflexvit": "vision transformer", "qwen3_vit": "vision transformer", "pit": "vision transformer",
    "tnt": "vision transformer", "volo": "vision transformer (outlook attention)",
    "vision_transformer": "vision transformer", "vision_transformer_relpos": "vision transformer",
    "vision_transformer_sam": "vision transformer", "vision_transformer_hybrid": "CNN stem + transformer",
    "xcit": "cross-covariance transformer", "swin_transformer": "window-attention transformer",
    "swin_transformer_v2": "window-attention transformer", "swin_transformer_v2_cr": "window-attention transformer",
    "twins": "transformer", "nest": "transformer", "pvt_v2": "transformer", "mvitv2": "transformer",
    "hiera": "transformer", "hieradet_sam2": "transformer", "davit": "transformer",
    "gcvit": "transformer", "focalnet": "focal modulation (query-dependent aggregation)",
    "maxxvit": "conv + window/grid attention hybrid (CoAtNet, MaxViT)",
    "levit": "conv-attention hybrid", "visformer": "conv-attention hybrid",
    "mobilevit": "conv-attention hybrid", "efficientformer": "conv-attention hybrid",
    "efficientformer_v2": "conv-attention hybrid", "edgenext": "conv + transposed-attention hybrid",
    "efficientvit_mit": "conv + linear-attention hybrid", "efficientvit_msra": "cascaded-attention hybrid",
    "fastvit": "RepMixer + attention hybrid family (SA/MCi variants use attention)",
    "tiny_vit": "conv-attention hybrid", "swiftformer": "additive-attention hybrid",
    "iformer": "inception-attention hybrid", "nextvit": "conv-attention hybrid",
    "shvit": "single-head attention hybrid", "lowformer": "low-resolution attention hybrid",
    "vitamin": "conv + transformer hybrid", "cpubone": "conv + self-attention hybrid",
    "csatv2": "DCT frequency model with spatial attention", "mobilenetv5": "conv + mobile multi-query attention hybrid",
    "byoanet": "ResNets with self-attention blocks (BoTNet, HaloNet, LambdaNet)",
    "metaformer": "MetaFormer token-mixer framework (CAFormer variants use attention)",
    "mlp_mixer": "MLP-Mixer / ResMLP / gMLP token mixing", "sequencer": "LSTM token mixing",
    "efficientvim": "state-space (Mamba) hybrid",
}

#: group of every module of NON_CNN_MODULES (the token models; see the module docstring).
MODULE_GROUP: Dict[str, str] = {
    **{m: "transformer" for m in (
        "beit", "cait", "convit", "crossvit", "deit", "deepseek_vit", "eva", "gemma4_vit", "naflexvit",
        "qwen3_vit", "pit", "tnt", "volo", "vision_transformer", "vision_transformer_relpos",
        "vision_transformer_sam", "xcit", "swin_transformer", "swin_transformer_v2", "swin_transformer_v2_cr",
        "twins", "nest", "pvt_v2", "mvitv2", "hiera", "hieradet_sam2", "davit", "gcvit")},
    **{m: "hybrid" for m in (
        "coat", "vision_transformer_hybrid", "maxxvit", "levit", "visformer", "mobilevit", "efficientformer",
        "efficientformer_v2", "edgenext", "efficientvit_mit", "efficientvit_msra", "fastvit", "tiny_vit",
        "swiftformer", "iformer", "nextvit", "shvit", "lowformer", "vitamin", "cpubone", "mobilenetv5",
        "byoanet")},
    "mlp_mixer": "mlp",
    **{m: "other" for m in ("metaformer", "focalnet", "sequencer", "efficientvim", "csatv2")},
}

#: the groups of the sweep, in report order ("cnn" is the default list).
GROUPS = ("cnn", "transformer", "hybrid", "mlp", "other")
TOKEN_GROUPS = GROUPS[1:]
GROUP_HELP: Dict[str, str] = {
    "cnn": "timm's CNN architectures (the default list)",
    "transformer": "vision transformers: attention on tokens throughout",
    "hybrid": "convolution stages or stems combined with attention",
    "mlp": "token-mixing MLPs (MLP-Mixer, ResMLP, gMLP)",
    "other": "other token mixers (pooling/conv MetaFormers, focal modulation, LSTM, state space, DCT) "
             "and timm's unit-test configurations",
}
TEST_CONFIG_FAMILY = "timm unit-test configs"

#: names dropped from CNN modules (pattern -> reason).
EXCLUDED_NAMES: Dict[str, str] = {
    r"^test_": "timm's unit-test configurations, not published architectures",
    r"_clip$": "CLIP ResNet with an attention-pool head (multi-head self-attention)",
    r"^resnet50_mlp$": "CLIP-style ResNet with an MLP-projection attention head",
    r"^mobilenetv4_hybrid_": "MobileNetV4 hybrid: mobile multi-query attention blocks",
    r"^bat_": "bilinear attention transform (non-local attention) blocks",
}

#: (pattern, family) - first match wins; unmatched names use their timm module.
FAMILY_PATTERNS: Sequence = (
    (r"^vgg", "VGG"),
    (r"^(eca_|se)?resne(t|xt)\d+ts$|^resnet\d+q$", "ResNet-ts/q (BYOB)"),
    (r"_clip_gap$", "CLIP ResNet (GAP head)"),
    (r"^legacy_senet|^senet", "SENet"),
    (r"^legacy_seresne|^seresne", "SE-ResNet(X)"),
    (r"^ecaresne", "ECA-ResNet(X)"),
    (r"^wide_resnet", "Wide ResNet"),
    (r"^resnetrs", "ResNet-RS"),
    (r"^resnetblur|^resnetaa", "ResNet-AA/Blur"),
    (r"^resnext\d+d", "ResNeXt-D"),
    (r"^resnext\d", "ResNeXt"),
    (r"^resnet\d+$", "ResNet"),
    (r"^resnet\d+(c|d|s|t)$|^resnet50_gn$", "ResNet-C/D/S/T"),
    (r"^resnetv2_\d+x\d+_bit", "BiT"),
    (r"^resnetv2", "ResNetV2 (pre-act)"),
    (r"^skresne", "SKNet"),
    (r"^resnest", "ResNeSt"),
    (r"^res2ne", "Res2Net"),
    (r"^regnetx", "RegNetX"),
    (r"^regnety|^regnetv", "RegNetY/V"),
    (r"^regnetz", "RegNetZ"),
    (r"^(tf_)?efficientnetv2|^gc_efficientnetv2", "EfficientNetV2"),
    (r"^(tf_)?efficientnet_lite", "EfficientNet-Lite"),
    (r"^(tf_)?efficientnet_cc", "CondConv EfficientNet"),
    (r"^(tf_)?efficientnet_e[slm]", "EfficientNet-EdgeTPU"),
    (r"^mobilenet_edgetpu", "MobileNet-EdgeTPU"),
    (r"^(tf_)?efficientnet", "EfficientNet"),
    (r"^tinynet", "TinyNet"),
    (r"^(tf_)?mixnet", "MixNet"),
    (r"^(se|sp)?mnasnet|^semnasnet|^spnasnet", "MNASNet"),
    (r"^fbnetv3", "FBNetV3"),
    (r"^fbnet", "FBNet"),
    (r"^mobilenetv1", "MobileNetV1"),
    (r"^mobilenetv2", "MobileNetV2"),
    (r"^(tf_)?mobilenetv3", "MobileNetV3"),
    (r"^mobilenetv4", "MobileNetV4"),
    (r"^lcnetv2", "LCNetV2"),
    (r"^lcnet", "LCNet"),
    (r"^hardcorenas", "HardCoRe-NAS"),
    (r"^ghostnet", "GhostNet"),
    (r"^repghost", "RepGhostNet"),
    (r"^rexnet", "ReXNet"),
    (r"^densenet", "DenseNet"),
    (r"^dpn", "DPN"),
    (r"^inception_resnet", "Inception-ResNet"),
    (r"^inception_next", "InceptionNeXt"),
    (r"^inception", "Inception"),
    (r"xception", "Xception"),
    (r"^(nasnet|pnasnet)", "NASNet/PNASNet"),
    (r"^selecsls", "SelecSLS"),
    (r"vovnet", "VoVNet"),
    (r"^dla", "DLA"),
    (r"^hrnet", "HRNet"),
    (r"^cspresne|^cspdarknet", "CSPNet"),
    (r"^cs3", "CS3Net"),
    (r"darknet", "DarkNet"),
    (r"^cspnext", "CSPNeXt"),
    (r"^repvgg", "RepVGG"),
    (r"^gernet", "GENet"),
    (r"^mobileone", "MobileOne"),
    (r"^gcresne", "GC-ResNet(X)"),
    (r"^tresnet", "TResNet"),
    (r"^(dm_)?nfnet|^eca_nfnet", "NFNet"),
    (r"^nf_", "NF-ResNet/RegNet"),
    (r"^convnextv2", "ConvNeXtV2"),
    (r"^convnext", "ConvNeXt"),
    (r"^hgnet", "HGNet"),
    (r"^rdnet", "RDNet"),
    (r"^fasternet", "FasterNet"),
    (r"^repvit", "RepViT"),
    (r"^convmixer", "ConvMixer"),
    (r"^starnet", "StarNet"),
    (r"^mambaout", "MambaOut"),
)

#: The seed architectures the issue requires among the passes.
SEED_MODELS = ("vgg13", "vgg16", "vgg19", "resnet18", "resnet34", "resnet50", "resnet101", "resnet152")


def family_of(name: str, module: Optional[str] = None) -> str:
    if name.startswith("test_"):
        return TEST_CONFIG_FAMILY
    if module in MODULE_GROUP:          # token models: the family is the timm module
        return module
    if module in CNN_MODULES and excluded_reason(name):
        return f"{module} (attention variants)"
    for pat, fam in FAMILY_PATTERNS:
        if re.search(pat, name):
            return fam
    return module or "other"


def excluded_reason(name: str) -> Optional[str]:
    for pat, why in EXCLUDED_NAMES.items():
        if re.search(pat, name):
            return why
    return None


def module_of(name: str) -> str:
    """The timm module that defines ``name`` ("?" when timm does not know it)."""
    return _module_index().get(name, "?")


_MODULE_INDEX: Dict[str, str] = {}


def _module_index() -> Dict[str, str]:
    if not _MODULE_INDEX:
        import timm
        for m in timm.list_modules():
            for n in timm.list_models(module=m):
                _MODULE_INDEX.setdefault(n, m)
    return _MODULE_INDEX


def default_models() -> List[str]:
    """The default sweep: every CNN architecture of timm (see the module docstring)."""
    import timm
    out = []
    for m in sorted(CNN_MODULES):
        for name in timm.list_models(module=m):
            if excluded_reason(name) is None:
                out.append(name)
    return sorted(set(out))


def group_of(name: str) -> str:
    """The sweep group of a timm architecture (see the module docstring)."""
    if name.startswith("test_"):
        return "other"
    module = module_of(name)
    if module in CNN_MODULES:
        return "hybrid" if excluded_reason(name) else "cnn"
    return MODULE_GROUP.get(module, "other")


def models_of(groups: Sequence[str]) -> List[str]:
    """Every timm architecture of the given groups, sorted ("cnn" is :func:`default_models`)."""
    import timm
    bad = set(groups) - set(GROUPS)
    if bad:
        raise ValueError(f"unknown group(s) {sorted(bad)}; the groups are {', '.join(GROUPS)}")
    want = set(groups)
    return sorted(n for n in timm.list_models() if group_of(n) in want)


def unclassified_modules() -> List[str]:
    """timm modules in neither CNN_MODULES nor NON_CNN_MODULES (new in a timm upgrade)."""
    import timm
    return sorted((set(timm.list_modules()) - set(CNN_MODULES) - set(NON_CNN_MODULES))
                  | (set(NON_CNN_MODULES) - set(MODULE_GROUP)))


def excluded_names() -> Dict[str, str]:
    """Names of CNN modules that the default list drops, with the reason."""
    import timm
    out = {}
    for m in sorted(CNN_MODULES):
        for name in timm.list_models(module=m):
            why = excluded_reason(name)
            if why:
                out[name] = why
    return out


def select(models: Sequence[str], patterns: Sequence[str]) -> List[str]:
    """Names of ``models`` matching any of the fnmatch ``patterns`` (all when none given)."""
    import fnmatch
    if not patterns:
        return list(models)
    return [m for m in models if any(fnmatch.fnmatchcase(m, p) for p in patterns)]


def read_list(path) -> List[str]:
    """Model names from a text file: one per line, '#' starts a comment."""
    names = []
    with open(path) as f:
        for line in f:
            line = line.split("#", 1)[0].strip()
            if line:
                names.append(line)
    return names


def parse_entry(line: str):
    """``"name key=value ..."`` (a line of a CI list) -> (name, kwargs for ``timm.create_model``);
    values are read as Python literals (``img_size=64``, ``window_size=2``)."""
    import ast
    name, *rest = line.split()
    kwargs = {}
    for item in rest:
        k, _, v = item.partition("=")
        try:
            kwargs[k] = ast.literal_eval(v)
        except (ValueError, SyntaxError):
            kwargs[k] = v
    return name, kwargs

