"""The token models' training recipe (srd_fx.eval.train): feature distillation from the ResNet,
fresh scenes per epoch, the warm-up + cosine schedule, and their place in the cache key."""
import pytest
import torch
import torch.nn.functional as F

from srd_fx.eval import train as T
from srd_fx.eval.models import small_mixer, small_resnet, small_vit

DATA = dict(n_train=16, n_test=8)


@pytest.mark.parametrize("arch", ["vit", "mixer"])
def test_recipe_options_are_in_the_cache_key_only_when_on(arch):
    assert T.settings("resnet", "relu", 32, distill=0, warmup_steps=0, fresh_scenes=0) == T.settings("resnet", "relu", 32)
    tok = T.settings(arch, "gelu", 32, **DATA)
    assert tok["distill"] > 0 and tok["warmup_steps"] > 0 and tok["fresh_scenes"] == 1
    # the teacher is the ReLU ResNet on the same scenes, and a different teacher is a different key
    assert tok["distill_from"] == T.cache_key(T.settings("resnet", "relu", 32, **DATA, seed=0))
    assert T.settings(arch, "gelu", 32, **DATA, seed=1)["distill_from"] != tok["distill_from"]
    off = T.settings(arch, "gelu", 32, **DATA, distill=0)
    assert "distill" not in off and "distill_from" not in off
    with pytest.raises(ValueError, match="token models"):
        T.settings("resnet", "relu", 32, distill=1)


@pytest.mark.parametrize("make_student", [small_vit, small_mixer], ids=["vit", "mixer"])
def test_feature_distillation_loss_equals_timm_intermediates(make_student):
    """The loss read from forward hooks equals the same loss computed from timm's own
    ``forward_intermediates`` of student (blocks 1 and 3, patch tokens as a grid: the ViT's without
    its class token, all of the Mixer's) and teacher (its layer2 and layer4 outputs)."""
    torch.manual_seed(0)
    student, teacher = make_student(size=32).eval(), small_resnet().eval()
    x = torch.randn(3, 3, 32, 32)
    fd = T.FeatureDistillation(student, teacher, student.embed_dim)
    with torch.no_grad():
        student(x)
        got = fd(x)
    fd.remove()
    with torch.no_grad():
        s_maps = student.forward_intermediates(x, indices=[1, 3], intermediates_only=True)
        t_all = teacher.forward_intermediates(x, intermediates_only=True)  # stem, layer1..layer4
        want = 0.0
        for proj, s, t in zip(fd.proj, s_maps, (t_all[2], t_all[4])):
            s = F.adaptive_avg_pool2d(s, t.shape[-2:])
            pred = torch.einsum("bchw,oc->bhwo", s, proj.weight) + proj.bias
            t = t.permute(0, 2, 3, 1)
            t = (t - t.mean((0, 1, 2))) / (t.std((0, 1, 2)) + 1e-5)
            want = want + ((pred - t) ** 2).mean()
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    assert got > 0
    # the hooks are gone: another forward pass does not touch the stored maps
    before = dict(fd._seen)
    student(torch.randn(1, 3, 32, 32))
    assert all(fd._seen[k] is before[k] for k in before)


def test_fresh_scenes_change_only_the_epochs_after_the_first(tmp_path):
    kw = dict(size=32, progress=False, cache_dir=str(tmp_path), distill=0, warmup_steps=0, batch_size=8, **DATA)
    one_fresh, _ = T.train("vit", "gelu", epochs=1, fresh_scenes=1, **kw)
    one_same, _ = T.train("vit", "gelu", epochs=1, fresh_scenes=0, **kw)
    for a, b in zip(one_fresh.state_dict().values(), one_same.state_dict().values()):
        assert torch.equal(a, b)
    two_fresh, _ = T.train("vit", "gelu", epochs=2, fresh_scenes=1, **kw)
    two_same, _ = T.train("vit", "gelu", epochs=2, fresh_scenes=0, **kw)
    assert not torch.equal(two_fresh.head.weight, two_same.head.weight)


def test_warmup_cosine_schedule():
    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.AdamW([p], lr=1.0)
    sched = T._schedule(opt, dict(warmup_steps=4, lr=1.0), total=20)
    lrs = []
    for _ in range(20):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    import math
    want = [min(1, (i + 1) / 4) * 0.5 * (1 + math.cos(math.pi * i / 20)) for i in range(20)]
    assert lrs == pytest.approx(want)
