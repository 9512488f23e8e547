"""Digit scenes and the image-folder-with-masks loader."""
import numpy as np
import pytest
import torch
from PIL import Image

from srd_fx.eval import data as D


def test_scene_item_types_shapes_ranges():
    ds = D.DigitScenes("test", size=64, n=5, seed=3)
    assert len(ds) == 5
    image, label, mask = ds[0]
    assert image.dtype == torch.float32 and image.shape == (3, 64, 64)
    assert 0.0 <= float(image.min()) and float(image.max()) <= 1.0
    assert isinstance(label, int) and 0 <= label <= 9
    assert mask.dtype == torch.bool and mask.shape == (64, 64)
    assert mask.any() and not mask.all()


def test_size_parameter():
    image, _, mask = D.DigitScenes("train", size=32, n=1)[0]
    assert image.shape == (3, 32, 32) and mask.shape == (32, 32)


def test_deterministic_from_seed():
    a = D.DigitScenes("train", n=3, seed=7).tensors()
    b = D.DigitScenes("train", n=3, seed=7).tensors()
    c = D.DigitScenes("train", n=3, seed=8).tensors()
    for u, v in zip(a, b):
        assert torch.equal(u, v)
    assert not torch.equal(a[0], c[0])


def test_label_is_the_source_digit_and_mask_is_its_ink():
    from sklearn.datasets import load_digits
    d = load_digits()
    ds = D.DigitScenes("test", n=20, seed=1)
    for i in range(20):
        image, label, mask = ds[i]
        src = ds.source_index(i)
        assert label == int(d.target[src])
        # the digit is painted in one colour: the pixels under the mask (ink > 0.5) are closer to
        # each other than the whole image is
        inside = image[:, mask]
        assert inside.std(1).mean() < image.flatten(1).std(1).mean()


def test_train_and_test_share_no_digit_image():
    tr = set(D._split_indices("train").tolist())
    te = set(D._split_indices("test").tolist())
    assert not tr & te
    assert len(tr) + len(te) == 1797
    # scenes draw only from their split, whatever the seed
    for seed in (0, 5):
        assert {D.DigitScenes("test", n=50, seed=seed).source_index(i) for i in range(50)} <= te
        assert {D.DigitScenes("train", n=50, seed=seed).source_index(i) for i in range(50)} <= tr


def test_bad_arguments_are_explained():
    with pytest.raises(ValueError, match="split"):
        D.DigitScenes("val")
    with pytest.raises(ValueError, match="size"):
        D.DigitScenes(size=8)
    with pytest.raises(ValueError, match="positive"):
        D.DigitScenes(n=0)
    with pytest.raises(IndexError):
        D.DigitScenes(n=2)[2]


def test_normalize_roundtrip():
    x = torch.rand(2, 3, 8, 8)
    z = D.normalize(x)
    assert torch.allclose(z[:, 0], (x[:, 0] - 0.5) / 0.25)
    assert torch.allclose(D.denormalize(z), x, atol=1e-6)


def _make_folder(root, n_per_class=2, size=40):
    """A tiny ImageNet-S-style folder: images and RGB masks coding class id as R + 256 G."""
    rng = np.random.default_rng(0)
    img_root, mask_root = root / "images", root / "masks"
    expected = {}
    for ci, cls in enumerate(["n01", "n02"]):
        (img_root / cls).mkdir(parents=True)
        (mask_root / cls).mkdir(parents=True)
        for j in range(n_per_class):
            Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)).save(img_root / cls / f"im{j}.JPEG")
            code = np.zeros((size, size), np.int64)
            code[5:20, 10:30] = 1 + ci            # the object
            code[30:35, 0:5] = 1000               # "ignore" region: not foreground
            rgb = np.stack([code % 256, code // 256, np.zeros_like(code)], -1).astype(np.uint8)
            Image.fromarray(rgb).save(mask_root / cls / f"im{j}.png")
            expected[(cls, j)] = (code != 0) & (code != 1000)
    # an image without a mask is skipped
    Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)).save(img_root / "n01" / "nomask.jpg")
    return img_root, mask_root, expected


def test_image_folder_with_masks(tmp_path):
    img_root, mask_root, expected = _make_folder(tmp_path)
    ds = D.ImageFolderWithMasks(str(img_root), str(mask_root), size=40)
    assert len(ds) == 4 and ds.skipped == 1
    image, label, mask = ds[0]
    assert image.shape == (3, 40, 40) and 0 <= float(image.min()) and float(image.max()) <= 1
    assert label == 0 and ds[2][1] == 1
    assert np.array_equal(mask.numpy(), expected[("n01", 0)])
    # the mask is resized with the image (nearest neighbour)
    small = D.ImageFolderWithMasks(str(img_root), str(mask_root), size=20)
    assert small[0][2].shape == (20, 20) and small[0][2].sum() == expected[("n01", 0)][1::2, 1::2].sum()  # PIL samples pixel centres
    # class folders mapped to model outputs (e.g. ImageNet-S50 wnid -> ImageNet-1k index)
    mapped = D.ImageFolderWithMasks(str(img_root), str(mask_root), size=40, class_index={"n01": 7, "n02": 3})
    assert [mapped[i][1] for i in range(4)] == [7, 7, 3, 3]


def test_image_folder_errors(tmp_path):
    img_root, mask_root, _ = _make_folder(tmp_path)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        D.ImageFolderWithMasks(str(tmp_path / "nope"), str(mask_root))
    with pytest.raises(ValueError, match="no entry"):
        D.ImageFolderWithMasks(str(img_root), str(mask_root), class_index={"n01": 0})
    empty = tmp_path / "empty_masks"
    empty.mkdir()
    with pytest.raises(ValueError, match="has a mask"):
        D.ImageFolderWithMasks(str(img_root), str(empty))
