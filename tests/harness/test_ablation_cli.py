"""``srd-fx ablation`` (Appendix F): the three variants, the Fig.-7-like grid, the metrics table."""
import pytest
import torch
import torch.nn as nn

from srd_fx.eval import data as D
from srd_fx.cli.commands import ablation as A


def _tiny():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                         nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 16, 3, padding=1), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 10)).eval()


def test_variants_conserve_the_same_total_and_differ():
    """Every variant starts from the same Grad-CAM R^L and conserves it down to the input
    (SPEC §2), but distributes it differently."""
    model = _tiny()
    x = D.normalize(D.DigitScenes("test", size=32, n=3).tensors()[0])
    ex = A.explainers(model, list(A.VARIANTS), x[:1])
    maps = {v: A.saliency(e, x, batch_size=2) for v, e in ex.items()}
    R_L = ex["srd"](x).R_L.sum((1, 2))
    assert (R_L > 0).all()
    for v, m in maps.items():
        assert m.shape == (3, 32, 32)
        torch.testing.assert_close(m.sum((1, 2)), R_L, rtol=1e-4, atol=1e-8)
    assert not torch.allclose(maps["srd"], maps["post"])
    assert not torch.allclose(maps["srd"], maps["neuron"])


def test_maps_figure(tmp_path):
    model = _tiny()
    images, labels, _ = D.DigitScenes("test", size=32, n=2).tensors()
    x = D.normalize(images)
    ex = A.explainers(model, ["neuron", "srd"], x[:1])
    panel = (images, labels, model(x).argmax(1), {v: A.saliency(e, x, 2) for v, e in ex.items()})
    path = A.draw_maps({"resnet/relu": panel}, str(tmp_path / "maps.png"))
    from PIL import Image
    w, h = Image.open(path).size
    assert w > h > 50          # one row per image, image + 2 maps per row


@pytest.mark.slow
def test_cli_end_to_end_on_trained_models(tmp_path):
    """Trains (or loads from the cache) the digit-scene ResNet, then the full command."""
    import csv

    from srd_fx.cli import main
    rc = main(["ablation", "--arch", "resnet", "--n", "10", "--batch-size", "10", "--images", "2",
               "--out", str(tmp_path), "--no-progress"])
    assert rc == 0
    rows = list(csv.DictReader(open(tmp_path / "table.csv")))
    assert [r["Variant"] for r in rows] == ["neuron", "post", "srd"]
    for r in rows:
        assert -1 <= float(r["Fidelity"]) <= 1 and 0 <= float(r["Sparseness"]) <= 1
    assert (tmp_path / "maps.png").read_bytes()[:4] == b"\x89PNG"
