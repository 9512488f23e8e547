"""experiments/token_training_probe.py: its attention diagnostic is the entropy of the class token's
attention weights as timm's own (unfused) attention computes them."""
import math

import pytest
import torch
from conftest import experiment_module


@pytest.fixture(scope="module")
def probe():
    return experiment_module("token_training_probe")


def timm_cls_entropy(model, x):
    """The class token's attention entropy / ln N in the last block, read from the softmax weights
    that timm's unfused attention path passes to its attention dropout."""
    attn = model.blocks[-1].attn
    seen = {}
    attn.fused_attn = False
    h = attn.attn_drop.register_forward_hook(lambda m, i, o: seen.__setitem__("w", o))
    try:
        with torch.no_grad():
            model(x)
    finally:
        h.remove()
        attn.fused_attn = True
    w = seen["w"][:, :, 0]  # (B, heads, N): the class token's row
    return (-torch.special.xlogy(w, w).sum(-1).mean() / math.log(w.shape[-1])).item()


def test_cls_attention_uniformity_matches_timm_weights(probe):
    from timm.models.vision_transformer import VisionTransformer
    torch.manual_seed(0)
    model = VisionTransformer(img_size=32, patch_size=8, num_classes=10, embed_dim=32, depth=2, num_heads=4,
                              mlp_ratio=2.0).eval()
    with torch.no_grad():
        model.blocks[-1].attn.qkv.weight.mul_(40)  # far from uniform attention
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        got = probe.cls_attention_uniformity(model, x)
    want = timm_cls_entropy(model, x)
    assert got == pytest.approx(want, abs=1e-5)
    assert got < 0.9  # the scaled weights did make it non-uniform: the comparison is not 1 == 1
