"""Token models in the evaluation harness: the ViT / Mixer specs, their baselines (LXT against
LXT's own documented ViT usage), SRD's token maps on the patch grid, and `srd-fx evaluate` end to
end on a tiny ViT."""
import contextlib
import json
import os

import pytest
import torch

import srd_fx
from srd_fx.eval import baselines as B
from srd_fx.eval import lxt_patches
from srd_fx.eval.models import build, is_token_model, token_layers
from srd_fx.eval.train import settings, train

pytest.importorskip("lxt")

SMALL = 32  # 4x4 patch grid


def _tiny(arch, size=SMALL, seed=0):
    torch.manual_seed(seed)
    model = build(arch, "gelu", size=size).eval()
    torch.nn.init.normal_(model.head.weight, std=0.2)  # timm zero-initialises heads: every map would be 0
    return model


@pytest.mark.parametrize("arch", ["vit", "mixer"])
def test_token_spec_builds_and_trains_a_step(arch, tmp_path):
    s = settings(arch, "gelu", size=SMALL)
    assert s["arch"] == arch and s["train_threads"] == 1
    model = build(arch, "gelu", size=SMALL)
    assert is_token_model(model) and not is_token_model(build("resnet", "relu"))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    trained, rec = train(arch, "gelu", size=SMALL, progress=False, epochs=1, n_train=8, n_test=4, batch_size=8)
    assert 0.0 <= rec["test_accuracy"] <= 1.0 and rec["settings"]["epochs"] == 1
    changed = [k for k, v in trained.state_dict().items() if not torch.equal(v, before[k])]
    assert changed, "one optimiser step changed no weight"
    # the same seed gives the same weights (the seeded recipe)
    again, _ = train(arch, "gelu", size=SMALL, progress=False, epochs=1, n_train=8, n_test=4, batch_size=8)
    for k, v in trained.state_dict().items():
        assert torch.equal(v, again.state_dict()[k]), k


@pytest.mark.parametrize("arch", ["vit", "mixer"])
def test_every_token_method_gives_a_finite_grid_sized_map(arch):
    model = _tiny(arch)
    x, t = torch.randn(2, 3, SMALL, SMALL, generator=torch.Generator().manual_seed(1)), torch.tensor([1, 3])
    before = model(x).detach()
    for name in B.default_methods(model):
        a = B.get_method(name)(model, x, t)
        assert a.shape == (2, SMALL, SMALL), name
        assert torch.isfinite(a).all() and a.abs().sum() > 0, name
    # no method leaves a patch, hook or changed layer behind
    assert torch.equal(model(x).detach(), before)
    import torch.nn.functional as F
    assert F.scaled_dot_product_attention.__module__.startswith("torch")
    assert not hasattr(torch.nn.GELU, "original_forward")


def test_token_default_methods_and_layers():
    vit, mixer = _tiny("vit"), _tiny("mixer")
    assert B.default_methods(vit) == B.TOKEN_METHODS
    assert "AttnLRP" not in B.default_methods(build("resnet", "relu"))
    assert token_layers(vit) == ("blocks.3.norm1", "blocks.0.mlp.act")
    assert token_layers(mixer) == ("blocks.3", "blocks.0.mlp_channels.act")


@pytest.mark.parametrize("arch", ["vit", "mixer"])
def test_srd_token_maps_are_the_token_relevance_on_the_grid(arch):
    """SRD-low / -high: the (B, N) token relevance of L and of the first block's MLP activation,
    prefix tokens dropped, on the patch grid, upsampled bilinearly (so the grid sums match)."""
    model = _tiny(arch)
    x, t = torch.randn(2, 3, SMALL, SMALL), torch.tensor([0, 2])
    low_name, high_name = token_layers(model)
    explainer = srd_fx.compile(model, layers=("input", "low", high_name), example_input=x[:1])
    out = explainer(x, target=t)
    prefix = getattr(model, "num_prefix_tokens", 0)
    for which, key in (("low", "low"), ("high", high_name)):
        tokens = out.relevance[key]
        assert tokens.shape == (2, 16 + prefix)
        grid = tokens[:, prefix:].reshape(2, 4, 4)
        ref = torch.nn.functional.interpolate(grid[:, None], size=(SMALL, SMALL), mode="bilinear",
                                              align_corners=False)[:, 0]
        got = B.get_method(f"SRD-{which}")(model, x, t)
        torch.testing.assert_close(got, ref.float(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(B.get_method("SRD-input")(model, x, t), out.saliency.float())


def _torchvision_twin(vit):
    """torchvision's VisionTransformer with the weights of a timm ViT (same function)."""
    from torchvision.models.vision_transformer import VisionTransformer
    D = vit.embed_dim
    tv = VisionTransformer(image_size=SMALL, patch_size=8, num_layers=len(vit.blocks), num_heads=vit.blocks[0].attn.num_heads,
                           hidden_dim=D, mlp_dim=vit.blocks[0].mlp.fc1.out_features, num_classes=vit.num_classes).eval()
    with torch.no_grad():
        tv.conv_proj.load_state_dict(vit.patch_embed.proj.state_dict())
        tv.class_token.copy_(vit.cls_token)
        tv.encoder.pos_embedding.copy_(vit.pos_embed)
        for blk, lay in zip(vit.blocks, tv.encoder.layers):
            lay.ln_1.load_state_dict(blk.norm1.state_dict())
            lay.ln_2.load_state_dict(blk.norm2.state_dict())
            lay.self_attention.in_proj_weight.copy_(blk.attn.qkv.weight)
            lay.self_attention.in_proj_bias.copy_(blk.attn.qkv.bias)
            lay.self_attention.out_proj.load_state_dict(blk.attn.proj.state_dict())
            lay.mlp[0].load_state_dict(blk.mlp.fc1.state_dict())
            lay.mlp[3].load_state_dict(blk.mlp.fc2.state_dict())
        tv.encoder.ln.load_state_dict(vit.norm.state_dict())
        tv.heads.head.load_state_dict(vit.head.state_dict())
    return tv


@contextlib.contextmanager
def _lxt_documented_vit(attention=None):
    """LXT's documented ViT usage (its examples/vit_torch.py): ``monkey_patch(vision_transformer)``,
    i.e. the patch map ``lxt.efficient.models.vit_torch.cp_LRP``, and ``monkey_patch_zennit()``;
    undone on exit.  ``attention`` instead of the map's CP-LRP attention patch: LXT's
    ``wrap_attention_forward`` (AttnLRP) around the ``F.scaled_dot_product_attention`` that
    ``nn.MultiheadAttention`` calls."""
    import importlib
    import torch.nn.functional as F
    from zennit.core import BasicHook
    patches, zennit_patches = lxt_patches.lxt_efficient()
    vit_torch = importlib.import_module("lxt.efficient.models.vit_torch")
    pmap = dict(vit_torch.cp_LRP)
    sdpa = F.scaled_dot_product_attention
    if attention is not None:
        del pmap[torch.nn.MultiheadAttention]
    with lxt_patches.restored(*vit_torch.cp_LRP, BasicHook):
        try:
            for cls, patch in pmap.items():  # what lxt.efficient.monkey_patch does with the map
                assert patch(cls)
            if attention is not None:
                wrapped = attention(lambda module, q, k, v, *a, **kw: sdpa(q, k, v, *a, **kw))
                F.scaled_dot_product_attention = lambda q, k, v, *a, **kw: wrapped(None, q, k, v, *a, **kw)
            zennit_patches.monkey_patch_zennit()
            yield
        finally:
            F.scaled_dot_product_attention = sdpa


def _documented_map(tv, x, t):
    """The heatmap step of LXT's ViT example: Gamma(0.25) on Conv2d, Gamma(0.05) on Linear,
    frozen parameters, gradient x input."""
    import zennit.rules as z_rules
    from zennit.composites import LayerMapComposite
    for p in tv.parameters():
        p.requires_grad = False
    comp = LayerMapComposite([(torch.nn.Conv2d, z_rules.Gamma(0.25)), (torch.nn.Linear, z_rules.Gamma(0.05))])
    comp.register(tv)
    try:
        xr = x.clone().requires_grad_()
        y = tv(xr)
        y[torch.arange(len(x)), t].sum().backward()
    finally:
        comp.remove()
    return (xr * xr.grad).sum(1)


@pytest.mark.parametrize("variant", ["cplrp", "attnlrp"])
def test_lxt_on_timm_vit_matches_lxts_documented_torchvision_vit(variant):
    """CP-LRP: the timm ViT under srd_fx's LXT patch map gives the map LXT's documented ViT usage
    gives on a torchvision ViT with the same weights.  AttnLRP (LXT documents no vision map for it):
    the same, with LXT's AttnLRP attention wrapper in place of the map's CP-LRP attention patch."""
    vit = _tiny("vit").double()
    vit.blocks[0].attn.fused_attn = True
    tv = _torchvision_twin(vit).double()
    x = torch.randn(3, 3, SMALL, SMALL, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        torch.testing.assert_close(tv(x), vit(x))
    t = torch.tensor([0, 4, 7])
    ours = B.get_method("CP-LRP" if variant == "cplrp" else "AttnLRP").fn(vit, x, t).sum(1)
    patches, _ = lxt_patches.lxt_efficient()
    with _lxt_documented_vit(None if variant == "cplrp" else patches.wrap_attention_forward):
        ref = _documented_map(tv, x, t)
    assert ref.abs().sum() > 0
    torch.testing.assert_close(ours, ref, rtol=1e-7, atol=1e-10)
    # and the two variants differ (AttnLRP passes relevance through q and k)
    other = B.get_method("AttnLRP" if variant == "cplrp" else "CP-LRP").fn(vit, x, t).sum(1)
    assert (other - ours).abs().max() > 1e-6 * ours.abs().max()


def test_evaluate_end_to_end_on_a_tiny_vit(tmp_path, monkeypatch):
    """`srd-fx evaluate --models vit:gelu` on four scenes: a trained (one epoch, tiny) ViT, every
    token method, every metric, the table written; with --merge-table2 next to the columns of an
    earlier run's CSV (a CNN's), which keep their values."""
    from srd_fx.cli import main
    from srd_fx.eval import evaluation as E
    monkeypatch.setenv("SRD_FX_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "out"
    out.mkdir()
    earlier = {"ResNet (ReLU)": {"GradCAM": {k: [0.25, 0.75] for k in ("Pointing", "Attribution", "Sparseness",
                                                                          "Fidelity", "Stability")}}}
    (out / "table2.csv").write_text(E.results_csv(earlier, {"ResNet (ReLU)": 0.877}))
    rc = main(["evaluate", "--merge-table2", "--models", "vit:gelu", "--table4-models", "none", "--n-images", "4",
               "--batch-size", "4", "--size", str(SMALL), "--fidelity-runs", "3", "--stability-samples", "2",
               "--figure-images", "2", "--no-progress", "--out", str(out),
               "--train-setting", "epochs=1", "--train-setting", "n_train=16", "--train-setting", "n_test=8"])
    assert rc == 0
    table = (out / "table2.md").read_text()
    for name in B.TOKEN_METHODS:
        assert B.get_method(name).name in table or name in table, name
    csv = (out / "table2.csv").read_text().splitlines()
    assert sum("AttnLRP" in line for line in csv) >= 1
    assert (out / "fig_maps.png").exists()
    run = json.loads((out / "run.json").read_text())
    assert run["table2"]["tables"]["table2"]["models"] == ["vit:gelu"]
    assert run["table2"]["tables"]["table2"]["merged_models"] == ["ResNet (ReLU)"]
    assert table.splitlines()[0].startswith("| Method | ResNet (ReLU) Poi.↑")
    kept = [r for r in csv if r.startswith("ResNet (ReLU),0.8770,GradCAM,")]
    assert len(kept) == 5 and all(",0.500000," in r for r in kept)


def test_attack_runs_on_a_tiny_vit_for_srd_attnlrp_and_input_x_gradient():
    """The Sec. 4.3 attack's second derivatives exist on a ViT (fused attention through the SDPA
    math kernel), the attack moves the input within eps and lowers its loss, and the reported
    AttnLRP map is LXT's (with the Gamma rules)."""
    from srd_fx.methods import robustness as R
    model = _tiny("vit")
    g = torch.Generator().manual_seed(3)
    x, xt = torch.rand(2, 3, SMALL, SMALL, generator=g) * 4 - 2, torch.rand(2, 3, SMALL, SMALL, generator=g) * 4 - 2
    for name in ("srd", "attnlrp", "input_x_gradient"):
        res = R.manipulate(model, name, x, xt, max_steps=3, clamp=(-2.0, 2.0), eps=0.05)
        assert (res.linf <= 0.05 + 1e-6).all() and (res.linf > 0).all(), name
        assert (res.loss[-1] < res.loss[0]).all(), name
        assert all(torch.isfinite(m).all() for m in res.maps.values()), name
    t = model(x).argmax(1)
    ref = lxt_patches.relevance(model, x, t, "attnlrp").abs().sum(1)
    torch.testing.assert_close(R.make_method("attnlrp", model, x).report(x, t), ref)
