"""Data for the evaluation harness.

**Digit scenes** (:class:`DigitScenes`): a small localisation benchmark with ground-truth masks built
from real data that ships with scikit-learn and scikit-image, so nothing is downloaded.  Each scene
is one handwritten digit from ``sklearn.datasets.load_digits`` (8x8, upscaled with Pillow), pasted
at a random position, size and colour onto a random crop of a real texture or photograph from
``skimage.data`` (brick, grass, gravel, tinted with two random colours; coffee, chelsea, astronaut,
rocket), its contrast reduced by a random factor in [0.3, 0.8].  The label is the digit and the mask is the digit's pixels (upscaled ink above half
intensity).  Scenes are a pure function of ``(seed, split, index)``; the train and test splits draw
from disjoint sets of source digits (80 % / 20 % of the 1797 images), so no digit image appears in
both.

**Normalisation convention.**  Datasets return images in [0, 1].  Models see
``normalize(image, mean, std) = (image - mean) / std`` per channel: for digit scenes
``DIGITS_MEAN = (0.5, 0.5, 0.5)`` and ``DIGITS_STD = (0.25, 0.25, 0.25)`` (so 0 in model space is
mid-grey, as 0 is the mean colour for ImageNet-normalised inputs); for image folders the ImageNet
constants ``IMAGENET_MEAN`` / ``IMAGENET_STD``.  Explanations, metrics and perturbations (Fidelity's "set to 0", Stability's
Gaussian noise with sigma 0.1) all act on the normalised model input, as in the paper.

**ImageFolder with masks** (:class:`ImageFolderWithMasks`): the ImageNet-S50 layout, i.e.
``root/<class>/<name>.<jpg|JPEG|png>`` and ``masks/<class>/<name>.png``; a mask's foreground is
every pixel whose ImageNet-S code ``R + 256 G`` is neither 0 (background) nor 1000 (ignored).
"""
from __future__ import annotations

import functools
import json
import os
from typing import List, Optional, Tuple

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

DIGITS_MEAN = (0.5, 0.5, 0.5)
DIGITS_STD = (0.25, 0.25, 0.25)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

GRAY_TEXTURES = ("brick", "grass", "gravel")
COLOUR_IMAGES = ("coffee", "chelsea", "astronaut", "rocket")
_SPLIT_ID = {"train": 0, "test": 1}
TEST_FRACTION = 0.2


def normalize(images: torch.Tensor, mean=DIGITS_MEAN, std=DIGITS_STD) -> torch.Tensor:
    """``(images - mean) / std`` per channel, for a (B, 3, H, W) or (3, H, W) tensor in [0, 1]."""
    m = torch.as_tensor(mean, dtype=images.dtype, device=images.device).view(-1, 1, 1)
    s = torch.as_tensor(std, dtype=images.dtype, device=images.device).view(-1, 1, 1)
    return (images - m) / s


def denormalize(x: torch.Tensor, mean=DIGITS_MEAN, std=DIGITS_STD) -> torch.Tensor:
    """Inverse of :func:`normalize` (for display)."""
    m = torch.as_tensor(mean, dtype=x.dtype, device=x.device).view(-1, 1, 1)
    s = torch.as_tensor(std, dtype=x.dtype, device=x.device).view(-1, 1, 1)
    return x * s + m


@functools.lru_cache(maxsize=None)
def _digits():
    from sklearn.datasets import load_digits
    d = load_digits()
    return d.images.astype(np.float32) / 16.0, d.target.astype(np.int64)


@functools.lru_cache(maxsize=None)
def _split_indices(split: str) -> np.ndarray:
    """Source-digit indices of a split: a fixed permutation (independent of the scene seed), so that
    train and test never share a digit image whatever seeds are used."""
    _, y = _digits()
    perm = np.random.default_rng(20240507).permutation(len(y))
    n_test = int(round(TEST_FRACTION * len(y)))
    idx = perm[:n_test] if split == "test" else perm[n_test:]
    return np.sort(idx)


@functools.lru_cache(maxsize=None)
def _backgrounds() -> List[Image.Image]:
    """The background sources as Pillow images: greyscale textures ("L") and colour photos ("RGB")."""
    import skimage.data
    out = [Image.fromarray(getattr(skimage.data, name)()) for name in GRAY_TEXTURES]
    out += [Image.fromarray(getattr(skimage.data, name)()[..., :3]) for name in COLOUR_IMAGES]
    return out


def _resize(a: np.ndarray, size: Tuple[int, int], resample=Image.BILINEAR) -> np.ndarray:
    """Resize a float (H, W) array with Pillow."""
    return np.asarray(Image.fromarray(a, mode="F").resize((size[1], size[0]), resample), dtype=np.float32)


def _background(rng: np.random.Generator, size: int) -> np.ndarray:
    bgs = _backgrounds()
    src = bgs[int(rng.integers(len(bgs)))]
    W, H = src.size
    crop = int(rng.integers(min(size, H, W), min(H, W, 4 * size) + 1))
    top, left = int(rng.integers(0, H - crop + 1)), int(rng.integers(0, W - crop + 1))
    patch = src.resize((size, size), Image.BILINEAR, box=(left, top, left + crop, top + crop))
    patch = np.asarray(patch, dtype=np.float32) / 255.0
    if patch.ndim == 2:  # tint a grey texture between two random colours
        c0, c1 = rng.uniform(0, 1, 3).astype(np.float32), rng.uniform(0, 1, 3).astype(np.float32)
        patch = c0 + patch[..., None] * (c1 - c0)
    if rng.random() < 0.5:
        patch = patch[:, ::-1]
    contrast = rng.uniform(0.3, 0.8)  # tone the clutter down so that the digit is the salient object
    m = patch.mean((0, 1), keepdims=True)
    return np.clip(m + contrast * (patch - m), 0, 1)


def make_scene(digit: np.ndarray, rng: np.random.Generator, size: int) -> Tuple[np.ndarray, np.ndarray]:
    """Paste ``digit`` (8x8 in [0, 1]) onto a random background: returns (image (H, W, 3) in [0, 1],
    mask (H, W) bool)."""
    bg = _background(rng, size)
    s = int(rng.integers(int(0.35 * size), int(0.65 * size) + 1))
    ink = np.clip(_resize(digit, (s, s), Image.BICUBIC), 0, 1)
    top, left = int(rng.integers(0, size - s + 1)), int(rng.integers(0, size - s + 1))
    alpha = np.zeros((size, size), np.float32)
    alpha[top:top + s, left:left + s] = ink
    under = bg[alpha > 0.5].mean(0) if (alpha > 0.5).any() else bg.reshape(-1, 3).mean(0)
    for _ in range(20):  # a colour that stands out from what it covers
        colour = rng.uniform(0, 1, 3).astype(np.float32)
        if np.linalg.norm(colour - under) > 0.6:
            break
    image = bg * (1 - alpha[..., None]) + colour * alpha[..., None]
    return np.clip(image, 0, 1).astype(np.float32), alpha > 0.5


class DigitScenes(Dataset):
    """Digit scenes (see the module docstring).

    split: "train" or "test" (disjoint source digits); size: image side in pixels; n: number of
    scenes (default 10000 for train, 1000 for test); seed: scene seed.  Items are
    ``(image FloatTensor (3, size, size) in [0, 1], label int, mask BoolTensor (size, size))``."""

    num_classes = 10
    mean, std = DIGITS_MEAN, DIGITS_STD

    def __init__(self, split: str = "train", size: int = 64, n: Optional[int] = None, seed: int = 0):
        if split not in _SPLIT_ID:
            raise ValueError(f"split must be 'train' or 'test', got {split!r}")
        if not isinstance(size, int) or size < 16:
            raise ValueError(f"size must be an int >= 16 (pixels), got {size!r}")
        self.split, self.size, self.seed = split, size, int(seed)
        self.n = int(n) if n is not None else (10000 if split == "train" else 1000)
        if self.n <= 0:
            raise ValueError(f"n must be positive, got {n}")
        self.sources = _split_indices(split)

    def __len__(self) -> int:
        return self.n

    def source_index(self, i: int) -> int:
        """Index into ``load_digits()`` of the digit drawn in scene ``i``."""
        rng = np.random.default_rng([self.seed, _SPLIT_ID[self.split], i, 0])
        return int(self.sources[rng.integers(len(self.sources))])

    def __getitem__(self, i: int):
        if not 0 <= i < self.n:
            raise IndexError(f"scene {i} out of range for {self.n} scenes")
        images, labels = _digits()
        src = self.source_index(i)
        rng = np.random.default_rng([self.seed, _SPLIT_ID[self.split], i, 1])
        image, mask = make_scene(images[src], rng, self.size)
        return (torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1))), int(labels[src]),
                torch.from_numpy(mask))

    def tensors(self, n: Optional[int] = None, progress: bool = False):
        """The first ``n`` scenes stacked: (images (n, 3, H, W), labels (n,), masks (n, H, W))."""
        n = self.n if n is None else min(int(n), self.n)
        it = range(n)
        if progress:
            from tqdm.auto import tqdm
            it = tqdm(it, desc=f"digit scenes ({self.split})", leave=False)
        items = [self[i] for i in it]
        return (torch.stack([a for a, _, _ in items]), torch.tensor([b for _, b, _ in items]),
                torch.stack([c for _, _, c in items]))


# ----------------------------------------------------------------------------- image folders ------
IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".bmp", ".webp")


def read_mask(path: str, size: Optional[Tuple[int, int]] = None) -> np.ndarray:
    """Foreground of a mask file: ImageNet-S codes (R + 256 G) other than 0 and 1000 for an RGB png;
    non-zero pixels for a greyscale one."""
    im = Image.open(path)
    if size is not None:
        im = im.resize((size[1], size[0]), Image.NEAREST)
    a = np.asarray(im)
    if a.ndim == 3:
        code = a[..., 0].astype(np.int64) + 256 * a[..., 1].astype(np.int64)
        return (code != 0) & (code != 1000)
    return a != 0


class ImageFolderWithMasks(Dataset):
    """Images in ``root/<class>/<file>`` with masks in ``masks/<class>/<stem>.png`` (the ImageNet-S50
    layout).  Images and masks are resized to ``size`` x ``size`` (bilinear / nearest).  Labels are
    the sorted class-folder index, or ``class_index[folder]`` when a mapping (a dict or a JSON file,
    e.g. ImageNet-S50 wnid -> ImageNet-1k index) is given.  Images without a mask file are skipped;
    ``mean``/``std`` are the model's normalisation (ImageNet by default)."""

    def __init__(self, root: str, masks: str, size: int = 224, class_index=None,
                 mean=IMAGENET_MEAN, std=IMAGENET_STD):
        if not os.path.isdir(root):
            raise FileNotFoundError(f"image folder {root!r} does not exist")
        if not os.path.isdir(masks):
            raise FileNotFoundError(f"mask folder {masks!r} does not exist")
        self.root, self.masks, self.size, self.mean, self.std = root, masks, int(size), mean, std
        classes = sorted(d for d in os.listdir(root) if os.path.isdir(os.path.join(root, d)))
        if not classes:
            raise ValueError(f"{root!r} has no class sub-folders (expected root/<class>/<image>)")
        if isinstance(class_index, str):
            with open(class_index) as f:
                class_index = json.load(f)
        if class_index is None:
            class_index = {c: i for i, c in enumerate(classes)}
        missing = [c for c in classes if c not in class_index]
        if missing:
            raise ValueError(f"class_index has no entry for folders {missing[:5]}")
        self.classes, self.class_index = classes, {c: int(class_index[c]) for c in classes}
        self.samples: List[Tuple[str, str, int]] = []
        skipped = 0
        for c in classes:
            for fn in sorted(os.listdir(os.path.join(root, c))):
                stem, ext = os.path.splitext(fn)
                if ext.lower() not in IMAGE_EXTS:
                    continue
                mp = os.path.join(masks, c, stem + ".png")
                if not os.path.exists(mp):
                    skipped += 1
                    continue
                self.samples.append((os.path.join(root, c, fn), mp, self.class_index[c]))
        if not self.samples:
            raise ValueError(f"no image in {root!r} has a mask in {masks!r} (expected "
                             f"masks/<class>/<image stem>.png)")
        self.skipped = skipped
        self.num_classes = max(self.class_index.values()) + 1

    def __len__(self):
        return len(self.samples)

    def __getitem__(self, i):
        ip, mp, label = self.samples[i]
        im = Image.open(ip).convert("RGB").resize((self.size, self.size), Image.BILINEAR)
        image = torch.from_numpy(np.asarray(im, dtype=np.float32).transpose(2, 0, 1) / 255.0)
        mask = torch.from_numpy(read_mask(mp, (self.size, self.size)))
        return image, label, mask

    def tensors(self, n: Optional[int] = None, progress: bool = False):
        n = len(self) if n is None else min(int(n), len(self))
        items = [self[i] for i in range(n)]
        return (torch.stack([a for a, _, _ in items]), torch.tensor([b for _, b, _ in items]),
                torch.stack([c for _, _, c in items]))
