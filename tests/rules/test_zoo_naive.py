"""Real timm architectures of five families against the pair-by-pair SRD reference (tests/naive_srd.py).

Each model is a genuine timm class built at a tiny size through its constructor arguments (random
weights, random batch-norm statistics, float64, 20 to 32 px inputs).  Its affine blocks are
described to the naive reference by hand, from the module structure: the block functions call the timm
submodules (convolutions, linear layers) and their parameters directly, with the data-dependent
constants (max-pool indices, squeeze-excite gates, LayerNorm statistics) recorded on the real
forward.  ``srd_fx.compile(model, layers="all")`` must then give, from the same initial relevance
R^L, the same relevance at every activation layer and at the input (to 1e-8 of max|R^L|), and
exactly the model's logits.

    resnet        timm ResNet, BasicBlock, deep 3-conv stem, stem max-pool, 1x1-conv shortcuts,
                  output_stride=8 (dilated 3x3 convolutions in layer3/layer4)
    efficientnet  timm EfficientNet: depthwise-separable and inverted-residual blocks, SiLU,
                  squeeze-excite sigmoid gates, fused BatchNormAct2d, identity skips
    densenet      timm DenseNet: channel concatenation of every earlier feature map,
                  pre-activation BatchNormAct2d, stem max-pool, average-pool transition
    vgg           timm VGG: conv/ReLU stack with 2x2 max-pools, the last one ending the encoder
                  (L is a virtual identity layer); ConvMlp head
    convnext      timm ConvNeXt: LayerNorm2d and channels-last LayerNorm, permutes, 7x7
                  depthwise convolutions (dilated in the last stage), Linear MLP with GELU,
                  layer scale, a residual stream that is no activation (every block reads every
                  earlier activation and the input), a 'same'-padded Conv2dSame downsample
"""
import pytest
import torch
import torch.nn.functional as F
from timm.models import convnext, densenet, efficientnet, resnet, vgg
from timm.models._efficientnet_builder import decode_arch_def

import naive_srd as N
import srd_fx
from conftest import assert_close_to, fixed_head, layer_by_layer
from naive_srd import Block, Net, chain, identity, pad, window

TOL = 1e-8


def bn(mod, x):
    """The affine (eval) part of a BatchNorm2d / timm BatchNormAct2d, without its activation."""
    return F.batch_norm(x, mod.running_mean, mod.running_var, mod.weight, mod.bias, False, 0.0, mod.eps)


def _randomize(model):
    """Random BN statistics and affine parameters; random LayerNorm affine parameters and
    ConvNeXt layer scales (timm initialises them to 1e-6, which would make the residual
    branches invisible)."""
    g = torch.Generator().manual_seed(1)
    N.randomize_bn(model, g)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("gamma"):
                p.copy_(0.5 + torch.rand(p.shape, generator=g))
        for mod in model.modules():
            if isinstance(mod, torch.nn.LayerNorm):
                mod.weight.copy_(0.5 + torch.rand(mod.weight.shape, generator=g))
                mod.bias.copy_(0.3 * torch.randn(mod.bias.shape, generator=g))
    return model.double().eval()


# ---------------------------------------------------------------------------------------------
# ResNet
# ---------------------------------------------------------------------------------------------

def resnet_tiny():
    m = _randomize(resnet.ResNet(block=resnet.BasicBlock, layers=[1, 1, 1, 1], channels=(4, 6, 8, 8),
                                 stem_type="deep", stem_width=4, output_stride=8, num_classes=5))
    s = m.conv1  # deep stem: conv-bn-relu, conv-bn-relu, conv; then m.bn1, m.act1, m.maxpool
    l1, l2, l3, l4 = m.layer1[0], m.layer2[0], m.layer3[0], m.layer4[0]
    assert l4.downsample is None
    mp = lambda c, a: N.maxpool_fixed(c, "maxpool", a, 3, 2, 1)
    blocks = [
        Block("conv1_2", ["input"], lambda c, x: bn(s[1], s[0](x)), [[window(3, 2, 1)]], F.relu),
        Block("conv1_5", ["conv1_2"], lambda c, a: bn(s[4], s[3](a)), [[window(3, 1, 1)]], F.relu),
        Block("act1", ["conv1_5"], lambda c, a: bn(m.bn1, s[6](a)), [[window(3, 1, 1)]], F.relu),
        Block("layer1_0_act1", ["act1"], lambda c, a: bn(l1.bn1, l1.conv1(mp(c, a))),
              [[chain(window(3, 2, 1), window(3, 1, 1))]], F.relu),
        Block("layer1_0_act2", ["layer1_0_act1", "act1"],
              lambda c, y, a: bn(l1.bn2, l1.conv2(y)) + bn(l1.downsample[1], l1.downsample[0](mp(c, a))),
              [[window(3, 1, 1)], [chain(window(3, 2, 1), window(1))]], F.relu),
        Block("layer2_0_act1", ["layer1_0_act2"], lambda c, a: bn(l2.bn1, l2.conv1(a)),
              [[window(3, 2, 1)]], F.relu),
        Block("layer2_0_act2", ["layer2_0_act1", "layer1_0_act2"],
              lambda c, y, a: bn(l2.bn2, l2.conv2(y)) + bn(l2.downsample[1], l2.downsample[0](a)),
              [[window(3, 1, 1)], [window(1, 2)]], F.relu),
        Block("layer3_0_act1", ["layer2_0_act2"], lambda c, a: bn(l3.bn1, l3.conv1(a)),
              [[window(3, 1, 1)]], F.relu),
        Block("layer3_0_act2", ["layer3_0_act1", "layer2_0_act2"],
              lambda c, y, a: bn(l3.bn2, l3.conv2(y)) + bn(l3.downsample[1], l3.downsample[0](a)),
              [[window(3, 1, 2, 2)], [window(1)]], F.relu),
        Block("layer4_0_act1", ["layer3_0_act2"], lambda c, a: bn(l4.bn1, l4.conv1(a)),
              [[window(3, 1, 2, 2)]], F.relu),
        Block("layer4_0_act2", ["layer4_0_act1", "layer3_0_act2"],
              lambda c, y, a: bn(l4.bn2, l4.conv2(y)) + a,
              [[window(3, 1, 4, 4)], [identity()]], F.relu),
    ]
    return m, Net(blocks, head=m.forward_head)


# ---------------------------------------------------------------------------------------------
# EfficientNet
# ---------------------------------------------------------------------------------------------

def _se(c, key, se, a):
    """timm SqueezeExcite: a * sigmoid(expand(act(reduce(mean(a))))), the gate recorded."""
    return N.gate_fixed(c, key, a, lambda t: se.gate(se.conv_expand(se.act1(se.conv_reduce(
        t.mean((2, 3), keepdim=True))))))


def efficientnet_tiny():
    arch = decode_arch_def([["ds_r1_k3_s1_e1_c8_se0.25"], ["ir_r2_k3_s2_e2_c8_se0.25"],
                            ["ir_r1_k5_s2_e2_c16_se0.25"]])
    m = _randomize(efficientnet.EfficientNet(arch, num_classes=5, num_features=16, stem_size=8,
                                             act_layer=torch.nn.SiLU))
    d0, i10, i11, i20 = m.blocks[0][0], m.blocks[1][0], m.blocks[1][1], m.blocks[2][0]
    assert d0.has_skip and not i10.has_skip and i11.has_skip and not i20.has_skip

    def out_d0(c, a_dw, a_stem):      # output of the depthwise-separable block (identity skip)
        return bn(d0.bn2, d0.conv_pw(_se(c, "se0", d0.se, a_dw))) + a_stem

    def out_ir(c, key, blk, a_dw):    # inverted residual after its depthwise activation, no skip
        return bn(blk.bn3, blk.conv_pwl(_se(c, key, blk.se, a_dw)))

    blocks = [
        Block("bn1_act", ["input"], lambda c, x: bn(m.bn1, m.conv_stem(x)), [[window(3, 2, 1)]], F.silu),
        Block("blocks_0_0_bn1_act", ["bn1_act"], lambda c, a: bn(d0.bn1, d0.conv_dw(a)),
              [[window(3, 1, 1)]], F.silu),
        Block("blocks_1_0_bn1_act", ["blocks_0_0_bn1_act", "bn1_act"],
              lambda c, a_dw, a_stem: bn(i10.bn1, i10.conv_pw(out_d0(c, a_dw, a_stem))),
              [[chain(window(1), window(1))], [window(1)]], F.silu),
        Block("blocks_1_0_bn2_act", ["blocks_1_0_bn1_act"], lambda c, a: bn(i10.bn2, i10.conv_dw(a)),
              [[window(3, 2, 1)]], F.silu),
        Block("blocks_1_1_bn1_act", ["blocks_1_0_bn2_act"],
              lambda c, a: bn(i11.bn1, i11.conv_pw(out_ir(c, "se10", i10, a))),
              [[chain(window(1), window(1))]], F.silu),
        Block("blocks_1_1_bn2_act", ["blocks_1_1_bn1_act"], lambda c, a: bn(i11.bn2, i11.conv_dw(a)),
              [[window(3, 1, 1)]], F.silu),
        Block("blocks_2_0_bn1_act", ["blocks_1_1_bn2_act", "blocks_1_0_bn2_act"],
              lambda c, a, a10: bn(i20.bn1, i20.conv_pw(out_ir(c, "se11", i11, a)
                                                        + out_ir(c, "se10", i10, a10))),
              [[chain(window(1), window(1))], [chain(window(1), window(1))]], F.silu),
        Block("blocks_2_0_bn2_act", ["blocks_2_0_bn1_act"], lambda c, a: bn(i20.bn2, i20.conv_dw(a)),
              [[window(5, 2, 2)]], F.silu),
        Block("bn2_act", ["blocks_2_0_bn2_act"],
              lambda c, a: bn(m.bn2, m.conv_head(out_ir(c, "se20", i20, a))),
              [[chain(window(1), window(1))]], F.silu),
    ]
    return m, Net(blocks, head=m.forward_head)


# ---------------------------------------------------------------------------------------------
# DenseNet
# ---------------------------------------------------------------------------------------------

def densenet_tiny():
    m = _randomize(densenet.DenseNet(growth_rate=4, block_config=(1, 2), bn_size=2, num_classes=5))
    f = m.features
    b1l1, tr = f.denseblock1.denselayer1, f.transition1
    b2l1, b2l2 = f.denseblock2.denselayer1, f.denseblock2.denselayer2
    pool0 = lambda c, a: N.maxpool_fixed(c, "pool0", a, 3, 2, 1)
    trans = lambda a: F.avg_pool2d(tr.conv(a), 2)          # transition after its activation
    P0, TR = window(3, 2, 1), chain(window(1), window(2, 2))
    blocks = [
        Block("features_norm0_act", ["input"], lambda c, x: bn(f.norm0, f.conv0(x)),
              [[window(7, 2, 3)]], F.relu),
        Block("features_denseblock1_denselayer1_norm1_act", ["features_norm0_act"],
              lambda c, a: bn(b1l1.norm1, pool0(c, a)), [[P0]], F.relu),
        Block("features_denseblock1_denselayer1_norm2_act", ["features_denseblock1_denselayer1_norm1_act"],
              lambda c, a: bn(b1l1.norm2, b1l1.conv1(a)), [[window(1)]], F.relu),
        Block("features_transition1_norm_act",
              ["features_norm0_act", "features_denseblock1_denselayer1_norm2_act"],
              lambda c, a0, a1: bn(tr.norm, torch.cat([pool0(c, a0), b1l1.conv2(a1)], 1)),
              [[P0], [window(3, 1, 1)]], F.relu),
        Block("features_denseblock2_denselayer1_norm1_act", ["features_transition1_norm_act"],
              lambda c, a: bn(b2l1.norm1, trans(a)), [[TR]], F.relu),
        Block("features_denseblock2_denselayer1_norm2_act", ["features_denseblock2_denselayer1_norm1_act"],
              lambda c, a: bn(b2l1.norm2, b2l1.conv1(a)), [[window(1)]], F.relu),
        Block("features_denseblock2_denselayer2_norm1_act",
              ["features_transition1_norm_act", "features_denseblock2_denselayer1_norm2_act"],
              lambda c, at, a1: bn(b2l2.norm1, torch.cat([trans(at), b2l1.conv2(a1)], 1)),
              [[TR], [window(3, 1, 1)]], F.relu),
        Block("features_denseblock2_denselayer2_norm2_act", ["features_denseblock2_denselayer2_norm1_act"],
              lambda c, a: bn(b2l2.norm2, b2l2.conv1(a)), [[window(1)]], F.relu),
        Block("features_norm5_act",
              ["features_transition1_norm_act", "features_denseblock2_denselayer1_norm2_act",
               "features_denseblock2_denselayer2_norm2_act"],
              lambda c, at, a1, a2: bn(f.norm5, torch.cat([trans(at), b2l1.conv2(a1), b2l2.conv2(a2)], 1)),
              [[TR], [window(3, 1, 1)], [window(3, 1, 1)]], F.relu),
    ]
    return m, Net(blocks, head=m.forward_head)


# ---------------------------------------------------------------------------------------------
# VGG
# ---------------------------------------------------------------------------------------------

def vgg_tiny():
    # mlp_ratio shrinks the ConvMlp head (4096 * mlp_ratio hidden channels)
    m = _randomize(vgg.VGG([4, "M", 8, 8, "M", 8, "M"], num_classes=5, mlp_ratio=1 / 512))
    f = m.features
    P2 = window(2, 2)
    blocks = [
        Block("features_1", ["input"], lambda c, x: f[0](x), [[window(3, 1, 1)]], F.relu),
        Block("features_4", ["features_1"], lambda c, a: f[3](N.maxpool_fixed(c, "p2", a, 2)),
              [[chain(P2, window(3, 1, 1))]], F.relu),
        Block("features_6", ["features_4"], lambda c, a: f[5](a), [[window(3, 1, 1)]], F.relu),
        Block("features_9", ["features_6"], lambda c, a: f[8](N.maxpool_fixed(c, "p7", a, 2)),
              [[chain(P2, window(3, 1, 1))]], F.relu),
        # the encoder ends with a max-pool: a virtual identity layer
        Block("features_10", ["features_9"], lambda c, a: N.maxpool_fixed(c, "p10", a, 2), [[P2]], None),
    ]
    return m, Net(blocks, head=m.forward_head)


# ---------------------------------------------------------------------------------------------
# ConvNeXt
# ---------------------------------------------------------------------------------------------

def convnext_tiny(center="recorded"):
    """``center="linear"`` is the alternative SPEC §2 rejects (only the variance of LayerNorm
    recorded, the mean subtraction kept as part of the linear map): used to show the comparison
    resolves that choice."""
    m = _randomize(convnext.ConvNeXt(depths=(1, 1, 1, 1), dims=(4, 8, 8, 8), patch_size=2,
                                     output_stride=16, num_classes=5))
    st = m.stages
    assert all(len(s.blocks) == 1 for s in st) and isinstance(m.norm_pre, torch.nn.Identity)
    assert type(st[3].downsample[1]).__name__ == "Conv2dSame"   # 2x2, stride 1, padded right/bottom

    def ln2d(c, key, mod, t):        # LayerNorm2d / channels-last LayerNorm: over the channels
        if center == "linear":
            t = t - t.mean(1, keepdim=True)
        return N.norm_fixed(c, key, t, (1,), mod.weight, mod.bias, mod.eps)

    def down(c, k, s):               # stem (k = -1) or stage k's downsample of the stream s
        if k < 0:
            return ln2d(c, "stem", m.stem[1], m.stem[0](s))
        ds = st[k].downsample
        t = ln2d(c, f"ds{k}", ds[0], s)
        if k == 3:                   # Conv2dSame: explicit 'same' padding, then the plain conv
            t = F.pad(t, (0, 1, 0, 1))
            return F.conv2d(t, ds[1].weight, ds[1].bias, 1, 0, 1)
        return ds[1](t)

    def pre_act(c, k, d):            # stage k's block up to its GELU, on the downsampled stream d
        blk = st[k].blocks[0]
        t = ln2d(c, f"ln{k}", blk.norm, blk.conv_dw(d))
        return blk.mlp.fc1(t.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)   # Linear over channels

    def branch(k, a):                # stage k's block after its GELU: fc2, layer scale
        blk = st[k].blocks[0]
        return blk.mlp.fc2(a.permute(0, 2, 3, 1)).permute(0, 3, 1, 2) * blk.gamma.reshape(1, -1, 1, 1)

    def stream_in(c, k, x, acts):    # the downsampled stream entering stage k: d_k
        d = down(c, 0, down(c, -1, x))
        for j in range(k):
            d = down(c, j + 1, d + branch(j, acts[j]))
        return d

    # structural receptive fields
    STEM, DS, DS3 = window(2, 2), window(2, 2), chain(pad(0, 1, 0, 1), window(2))
    DW, DW3 = window(7, 1, 3), window(7, 1, 6, 2)
    into = [[STEM, DS], [DS], [DS], [DS3]]      # ops from stream k-1 (input for k=0) to d_k
    dw = [DW, DW, DW, DW3]

    def path(src, k):                # ops from activation src (-1: input) to d_k
        return [op for j in range(src + 1, k + 1) for op in into[j]]

    names = [f"stages_{k}_blocks_0_mlp_act" for k in range(4)]
    blocks = []
    for k in range(4):
        ins = list(reversed(range(-1, k)))      # earlier activations (newest first), then input
        blocks.append(Block(
            names[k], [names[j] if j >= 0 else "input" for j in ins],
            (lambda k, ins: lambda c, *xs: pre_act(c, k, stream_in(
                c, k, xs[-1], [xs[ins.index(j)] for j in range(k)])))(k, ins),
            [[chain(*path(j, k), dw[k])] for j in ins], F.gelu))
    ins = [3, 2, 1, 0, -1]

    def encoder_out(c, *xs):         # L: the stream after the last block (norm_pre is Identity)
        acts = [xs[ins.index(j)] for j in range(4)]
        return stream_in(c, 3, xs[-1], acts) + branch(3, acts[3])
    blocks.append(Block("norm_pre", [names[j] if j >= 0 else "input" for j in ins], encoder_out,
                        [[chain(*path(j, 3))] if j < 3 else [identity()] for j in ins], None))
    return m, Net(blocks, head=m.forward_head)


# name -> (factory, input size). Sizes keep the dense Jacobians of the reference small; VGG's
# 20 px give a 5x5 map whose last row and column no 2x2 max-pool window covers.
ZOO = {
    "resnet": (resnet_tiny, 32),
    "efficientnet": (efficientnet_tiny, 24),
    "densenet": (densenet_tiny, 24),
    "vgg": (vgg_tiny, 20),
    "convnext": (convnext_tiny, 32),
}
MODELS = list(ZOO)


def _build(name, batch=2, **kw):
    factory, size = ZOO[name]
    m, net = factory(**kw)
    x = torch.randn(batch, 3, size, size, dtype=torch.float64)
    return m, net, x


@pytest.mark.parametrize("name", MODELS)
def test_description_matches_model(name):
    """The hand-written block description reproduces the timm model: its encoder output is
    ``forward_features`` and the logits follow (else the agreement test would be meaningless)."""
    m, net, x = _build(name)
    with torch.no_grad():
        L = N.encoder_output(net, x)
        torch.testing.assert_close(L, m.forward_features(x), rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(net.head(L), m(x), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("name", MODELS)
def test_layer_by_layer_agreement(name):
    m, net, x = _build(name)
    with torch.no_grad():
        L = m.forward_features(x)
        logits = m(x)
    # the same activation layers (gate branches and head activations excluded), the same L
    layer_by_layer(m, net, x, L, logits, TOL, name)


def test_layernorm_statistics_are_recorded_constants():
    """The ConvNeXt comparison is sharp enough to tell SPEC §2's choice (LayerNorm mean and
    variance both recorded constants, so the mean goes into the block bias) from the alternative
    that keeps the mean subtraction in the linear part: the latter's reference disagrees with
    srd_fx by far more than TOL (the description itself is the same function)."""
    torch.manual_seed(0)
    m, _, x = _build("convnext", batch=1)
    torch.manual_seed(0)              # the same weights and input
    m_alt, alt, x_alt = _build("convnext", batch=1, center="linear")
    assert torch.equal(x, x_alt)
    assert all(torch.equal(p, q) for p, q in zip(m.parameters(), m_alt.parameters()))
    with torch.no_grad():
        torch.testing.assert_close(N.encoder_output(alt, x), m.forward_features(x), rtol=1e-12, atol=1e-12)
    R_L = torch.rand(1, *m.forward_features(x).shape[-2:], dtype=torch.float64) + 0.1
    out = srd_fx.compile(m, head=fixed_head(R_L))(x)
    ref = N.propagate(alt, x, R_L)
    assert (out.saliency - ref["input"]).abs().max().item() > 1e3 * TOL * R_L.max().item()
