"""APOP (Appendix D, SPEC §4): hand-computed examples, exact reproduction on the recorded input,
agreement with an independent hook-based implementation of the paper's Algorithm 1."""
import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision

import srd_fx
from srd_fx.methods.apop import apop, binarize


# ------------------------------------------------------------------ hand-computed examples ----
def _mlp(act):
    """y = W2 act(W1 x + b1) + b2 with W1 = [[1,-1],[2,1]], b1 = [.5,-1], W2 = [[1,3]], b2 = .25."""
    l1, l2 = nn.Linear(2, 2), nn.Linear(2, 1)
    with torch.no_grad():
        l1.weight.copy_(torch.tensor([[1., -1.], [2., 1.]]))
        l1.bias.copy_(torch.tensor([0.5, -1.]))
        l2.weight.copy_(torch.tensor([[1., 3.]]))
        l2.bias.copy_(torch.tensor([0.25]))
    return nn.Sequential(l1, act, l2).eval()


X_REC = torch.tensor([[1., 2.]])          # v = [-0.5, 3]  -> pattern [0, 1]


def test_two_layer_relu_by_hand():
    a = apop(_mlp(nn.ReLU()))
    assert a.layers == ["_1"] and a.pools == []
    assert a.record(X_REC).item() == 9.25                           # 3 * 3 + .25
    assert a.patterns["_1"].tolist() == [[False, True]]
    zeros, ones = torch.zeros(1, 2), torch.ones(1, 2)
    assert a.run(zeros).item() == -2.75                            # v = b1 = [.5, -1] -> [0, -1]
    assert a.run(zeros, mode="apop_relu").item() == 0.25           # relu([0, -1]) = 0
    assert a.run(ones).item() == 6.25                              # v = [.5, 2] -> [0, 2]
    assert a.run(ones, mode="apop_relu").item() == 6.25
    assert a.binarize(X_REC, "_1").item() == 3.25                  # [0, 1] -> 3 + .25
    assert a.record(ones).item() == 0.5 + 6 + 0.25                 # a new record replaces the old
    assert a.run(zeros).item() == 0.5 - 3 + 0.25                   # pattern [1, 1]


def test_two_layer_gelu_uses_pre_activation_pattern():
    model = _mlp(nn.GELU())
    a = apop(model)
    y = a.record(X_REC)
    assert torch.equal(y, model(X_REC))                            # record is the model itself
    assert a.patterns["_1"].tolist() == [[False, True]]           # pre-activation > 0
    assert a.run(torch.zeros(1, 2)).item() == -2.75                # same pattern as the ReLU net
    assert a.run(torch.zeros(1, 2), mode="apop_relu").item() == 0.25
    assert a.binarize(X_REC, "_1").item() == 3.25


class _Pools(nn.Module):
    def __init__(self):
        super().__init__()
        self.pool = nn.MaxPool2d(2)

    def forward(self, x):                       # module, functional and adaptive max-pools
        return torch.cat([self.pool(x).flatten(1), F.max_pool2d(x, 2, 2).flatten(1),
                          F.adaptive_max_pool2d(x, 1).flatten(1)], 1)


def test_max_pool_gathers_at_recorded_indices_by_hand():
    a = apop(_Pools().eval())
    assert a.pools == ["pool", "max_pool2d", "adaptive_max_pool2d"]
    x_rec = torch.tensor([[[[1., 4.], [3., 2.]]]])                # arg-max: position (0, 1)
    assert a.record(x_rec).tolist() == [[4., 4., 4.]]
    x_other = torch.tensor([[[[5., 6.], [7., 8.]]]])
    assert a.run(x_other).tolist() == [[6., 6., 6.]]              # not the max (8)
    assert a.run(-x_other, mode="apop_relu").tolist() == [[-6., -6., -6.]]   # no activation to relu


# ------------------------------------------------------------------ real networks -------------
@pytest.fixture(scope="module")
def resnet():
    """A torchvision ResNet with one BasicBlock per stage (its ReLU module is called twice)."""
    torch.manual_seed(0)
    from torchvision.models.resnet import BasicBlock, ResNet
    return ResNet(BasicBlock, [1, 1, 1, 1], num_classes=10).eval()


class _VGGish(nn.Module):
    """Functional, tensor-method and in-place activations, module and functional max-pools."""

    def __init__(self):
        super().__init__()
        self.c1, self.c2, self.c3 = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 8, 3, padding=1), \
            nn.Conv2d(8, 16, 3, padding=1)
        self.act = nn.ReLU(inplace=True)
        self.pool = nn.MaxPool2d(2)
        self.fc1, self.fc2 = nn.Linear(16 * 4 * 4, 32), nn.Linear(32, 5)

    def forward(self, x):
        x = self.pool(F.relu(self.c1(x)))
        x = F.max_pool2d(self.c2(x).relu(), 2)
        x = self.pool(self.act(self.c3(x)))
        return self.fc2(F.relu_(self.fc1(x.flatten(1))))


@pytest.mark.parametrize("mode", ["apop", "apop_relu"])
def test_same_input_reproduces_logits_exactly(resnet, mode):
    torch.manual_seed(1)
    for model, shape in ((resnet, (2, 3, 16, 16)), (_VGGish().eval(), (2, 3, 32, 32))):
        x = torch.randn(shape)
        a = srd_fx.apop(model)          # the package-level entry point (issue 6: `srd_fx.apop(model)`)
        with torch.no_grad():
            y = model(x)
            assert torch.equal(a.record(x), y)
            assert torch.equal(a.run(x.clone(), mode=mode), y)


def test_vggish_sites():
    a = apop(_VGGish().eval())
    assert a.layers == ["relu", "relu_1", "act", "relu_"]
    assert a.pools == ["pool", "max_pool2d", "pool_1"]
    assert a.module_of == {"relu": None, "relu_1": None, "act": "act", "relu_": None}


class _Algorithm1:
    """The paper's Algorithm 1 with module hooks (no fx): ReLU modules store their masks (one
    per call, ``sign(output)``), max-pools their indices; the replay multiplies / gathers."""

    def __init__(self, model):
        self.model = copy.deepcopy(model)
        for m in self.model.modules():
            if isinstance(m, nn.ReLU):
                m.inplace = False
            if isinstance(m, nn.ReLU):
                m.register_forward_hook(self._relu)
            elif isinstance(m, nn.MaxPool2d):
                m.register_forward_hook(self._pool)
        self.store, self.mode, self.count, self.relu_after = {}, "record", {}, False

    def _relu(self, mod, inp, out):
        if self.mode == "record":
            self.store.setdefault(mod, []).append(torch.sign(out))
            return None
        k = self.count.get(mod, 0)
        self.count[mod] = k + 1
        out = inp[0] * self.store[mod][k]
        return F.relu(out) if self.relu_after else out

    def _pool(self, mod, inp, out):
        if self.mode == "record":
            self.store[mod] = F.max_pool2d(inp[0], mod.kernel_size, mod.stride, mod.padding, mod.dilation,
                                           ceil_mode=mod.ceil_mode, return_indices=True)[1]
            return None
        idx = self.store[mod]
        return inp[0].flatten(2).gather(2, idx.flatten(2)).view(idx.shape)

    @torch.no_grad()
    def record(self, x):
        self.store, self.mode = {}, "record"
        return self.model(x)

    @torch.no_grad()
    def replay(self, x, relu_after=False):
        self.mode, self.count, self.relu_after = "replay", {}, relu_after
        return self.model(x)


def test_agrees_with_hook_implementation_of_algorithm1(resnet):
    model = copy.deepcopy(resnet).double()
    x = torch.randn(2, 3, 16, 16, dtype=torch.float64)
    a, ref = apop(model), _Algorithm1(model)
    with torch.no_grad():
        torch.testing.assert_close(a.record(x), ref.record(x), rtol=0, atol=0)
        for other in (torch.zeros_like(x), torch.ones_like(x), torch.randn_like(x)):
            for mode in ("apop", "apop_relu"):
                torch.testing.assert_close(a.run(other, mode=mode),
                                           ref.replay(other, relu_after=mode == "apop_relu"),
                                           rtol=1e-12, atol=1e-12)


def test_apop_is_affine_in_the_new_input(resnet):
    """With the pattern fixed the network is affine: f(t u + (1-t) w) = t f(u) + (1-t) f(w)."""
    model = copy.deepcopy(resnet).double()
    x = torch.randn(2, 3, 16, 16, dtype=torch.float64)
    u, w = torch.randn_like(x), torch.randn_like(x)
    a = apop(model)
    with torch.no_grad():
        a.record(x)
        t = 0.3
        lhs = a.run(t * u + (1 - t) * w)
        rhs = t * a.run(u) + (1 - t) * a.run(w)
        torch.testing.assert_close(lhs, rhs, rtol=1e-10, atol=1e-10)
        # ... while the network itself is not affine (its ReLUs switch between u and w)
        assert not torch.allclose(model(t * u + (1 - t) * w), t * model(u) + (1 - t) * model(w))


def test_binarize_matches_forward_hook(resnet):
    x = torch.randn(2, 3, 16, 16)
    a = apop(resnet)
    relu_mod = resnet.layer1[0].relu                     # called twice in a BasicBlock
    calls = {"n": 0}

    def second_call_binary(mod, inp, out):
        calls["n"] += 1
        if calls["n"] == 2:
            return (out > 0).to(out.dtype)

    h = relu_mod.register_forward_hook(second_call_binary)
    try:
        with torch.no_grad():
            ref = resnet(x)
    finally:
        h.remove()
    with torch.no_grad():
        assert torch.equal(a.binarize(x, "layer1_0_relu_1"), ref)
        assert torch.equal(a.binarize(x, "layer1.0.relu"), ref)      # module name -> last call
        assert torch.equal(binarize(resnet, "layer1.0.relu")(x), ref)
        assert not torch.equal(a.binarize(x, "layer1_0_relu"), ref)   # the first call differs
        assert torch.equal(a(x), resnet(x))                           # normal mode is untouched


def test_gates_are_not_activation_layers():
    class SE(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3)
            self.fc = nn.Conv2d(4, 4, 1)

        def forward(self, x):
            h = F.silu(self.conv(x))
            g = torch.sigmoid(self.fc(h.mean((2, 3), keepdim=True)))
            return torch.tanh(h * g).mean((2, 3))

    a = apop(SE().eval())
    assert a.layers == ["silu", "tanh"]          # the sigmoid gate is recomputed, not frozen


def test_bad_use_is_refused(resnet):
    a = apop(resnet)
    x = torch.randn(1, 3, 16, 16)
    with pytest.raises(RuntimeError, match="record"):
        a.run(x)
    a.record(x)
    with pytest.raises(srd_fx.InputError, match="same shape"):
        a.run(torch.zeros(2, 3, 16, 16))
    with pytest.raises(ValueError, match="mode"):
        a.run(x, mode="relu")
    with pytest.raises(srd_fx.NonFiniteError):
        a.run(torch.full_like(x, float("nan")))
    with pytest.raises(KeyError, match="layer1_0_relu"):
        a.binarize(x, "nope")
    with pytest.raises(srd_fx.TrainingModeError):
        apop(torchvision.models.resnet18(num_classes=3))   # left in training mode


# ------------------------------------------------------------------ the command line ----------
def _image_folder(root, n_per_class=3):
    """A two-class ImageFolder of real photographs (scikit-image) saved with Pillow."""
    import numpy as np
    import skimage.data
    from PIL import Image
    for cls, img in (("cat", skimage.data.chelsea()), ("coffee", skimage.data.coffee())):
        (root / cls).mkdir(parents=True)
        for i in range(n_per_class):
            crop = img[20 * i:20 * i + 120, 30 * i:30 * i + 120]
            Image.fromarray(np.ascontiguousarray(crop)).save(root / cls / f"{i}.png")


def test_cli_on_user_model_and_imagefolder(tmp_path):
    import csv
    import json

    import torchvision.transforms as T
    from torchvision.datasets import ImageFolder

    from srd_fx.cli import main
    _image_folder(tmp_path / "data")
    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=2).eval()
    torch.save(model.state_dict(), tmp_path / "w.pt")
    out = tmp_path / "out"
    rc = main(["apop", "--model", "torchvision:resnet18", "--weights", str(tmp_path / "w.pt"),
               "--imagefolder", str(tmp_path / "data"), "--image-size", "32", "--binarize",
               "--out", str(out), "--no-progress", "--threads", "1"])
    assert rc == 0
    res = json.loads((out / "apop.json").read_text())["results"]["torchvision:resnet18"]
    # the "Ori." column is the model's own accuracy on the same images, computed here directly
    ds = ImageFolder(str(tmp_path / "data"), T.Compose([T.Resize(37), T.CenterCrop(32), T.ToTensor(),
                                                       T.Normalize((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))]))
    x = torch.stack([ds[i][0] for i in range(len(ds))])
    y = torch.tensor([ds[i][1] for i in range(len(ds))])
    with torch.no_grad():
        direct = (model(x).argmax(1) == y).float().mean().item()
    assert res["n"] == 6 and res["accuracy"]["original"]["top1"] == pytest.approx(direct)
    assert res["accuracy"]["original"]["top5"] == 1.0 and res["chance"] == {"top1": 0.5, "top5": 1.0}
    rows = list(csv.DictReader(open(out / "table.csv")))
    assert [r["Input"] for r in rows] == ["zeros", "ones", "normal"]
    assert all(0 <= float(v) <= 1 for r in rows for k, v in r.items() if k.startswith("Top"))
    layers = [r["Layer"] for r in csv.DictReader(open(out / "binarize.csv"))]
    assert layers == apop(model).layers and len(layers) == 17
    assert (out / "binarize.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "| torchvision:resnet18 | zeros |" in (out / "table.md").read_text()


def test_cli_refuses_model_without_weights(tmp_path):
    from srd_fx.cli import main
    with pytest.raises(SystemExit, match="--weights"):
        main(["apop", "--model", "torchvision:resnet18", "--out", str(tmp_path)])
    _image_folder(tmp_path / "data", n_per_class=1)
    torch.save(torchvision.models.resnet18(num_classes=1).state_dict(), tmp_path / "w1.pt")
    with pytest.raises(SystemExit, match="2 class folders but torchvision:resnet18 has 1 outputs"):
        main(["apop", "--model", "torchvision:resnet18", "--weights", str(tmp_path / "w1.pt"),
              "--imagefolder", str(tmp_path / "data"), "--image-size", "32", "--out", str(tmp_path)])
