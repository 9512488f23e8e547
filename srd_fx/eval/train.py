"""Training the small digit-scene models, cached on disk.

``get_trained(arch, act)`` returns a trained model (eval mode) and its test accuracy.  The first call
trains it (a few minutes on 2 CPU cores, with a tqdm progress bar) and stores the weights and a JSON
record under the cache directory, in a file named by a hash of every setting; later calls load them.
The cache directory is, in order: the ``cache_dir`` argument, ``$SRD_FX_CACHE``, ``~/.cache/srd_fx``.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import time
from typing import Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import data as D
from .models import ARCHS, _act, build

#: bump when the training recipe changes, so old cache entries are not reused
RECIPE_VERSION = 1
#: torch threads used for training, whatever the caller's setting: the reduction order of the
#: convolutions' backward depends on the thread count, so the same seed gives different weights
#: with another count (the default ResNet reaches test accuracy 0.871 on one thread).
#: Fixing it makes training byte-identical on any machine; it is part of the cache key.
TRAIN_THREADS = 1
DEFAULTS = dict(epochs=8, n_train=6000, n_test=1000, batch_size=64, lr=5e-3, weight_decay=5e-4, seed=0)
#: settings that are off by default and, when off, not part of the cache key (so older entries stay
#: valid): ``init_size=N`` starts training from the weights of the same model trained at N px (same
#: data settings n_train, n_test, batch_size, seed; that size's own epochs, lr and weight decay) instead
#: of a random initialisation -- fine-tuning, e.g. a 224-px ResNet from the 64-px one;
#: ``warmup_steps=N`` replaces the one-cycle schedule by N steps of linear warm-up then a cosine decay
#: to 0 (Adam's betas fixed); ``distill=W`` adds W x a feature-distillation loss from the ReLU ResNet
#: trained at the same size on the same scenes (:class:`FeatureDistillation`; token models only);
#: ``fresh_scenes=1`` trains every epoch after the first on n_train new scenes (scene seed
#: ``seed + FRESH_SEED_STEP * epoch``; the test scenes and the train accuracy stay the seed's)
OPTIONAL = dict(init_size=0, warmup_steps=0, distill=0.0, fresh_scenes=0)
FRESH_SEED_STEP = 1_000_003
#: what ``init_size`` copies from the parent, per architecture: the whole ResNet (global pooling makes
#: every weight size-independent); the VGG's ``features`` only, since its classifier's first linear
#: sees the flattened last feature map, whose length depends on the input size, so the classifier
#: starts from its seeded random initialisation
INIT_PARTS = {"resnet": "", "vgg": "features."}
#: the settings a parent model (``init_size``) shares with the model fine-tuned from it
DATA_SETTINGS = ("n_train", "n_test", "batch_size", "seed")


def parse_train_settings(items) -> dict:
    """``--train-setting KEY=VALUE`` options (KEY from ``DEFAULTS``) as keyword arguments.

    Raises
    ------
    OptionError
        A setting that is not ``KEY=VALUE`` with a known KEY, or whose VALUE is not a number.
    """
    from ..errors import OptionError
    kw = {}
    known = {**DEFAULTS, **OPTIONAL}
    for it in items or ():
        k, sep, v = it.partition("=")
        if not sep or k not in known:
            raise OptionError(f"--train-setting expects KEY=VALUE with KEY in {sorted(known)}, got {it!r}")
        try:
            kw[k] = int(float(v)) if isinstance(known[k], int) else float(v)
        except ValueError:
            raise OptionError(f"--train-setting {it!r}: {v!r} is not a number") from None
    return kw


def resolve_cache_dir(path: Optional[str] = None) -> str:
    """The cache directory: ``path``, else ``$SRD_FX_CACHE``, else ``~/.cache/srd_fx``."""
    return os.path.expanduser(path or os.environ.get("SRD_FX_CACHE") or os.path.join("~", ".cache", "srd_fx"))


#: per-model changes to DEFAULTS: the plain (batch-norm-free) VGG and the Tanh ResNet sit longer on
#: the initial loss plateau of this task, so they get more epochs
MODEL_DEFAULTS = {("vgg", "relu"): dict(epochs=12, lr=3e-3), ("resnet", "tanh"): dict(epochs=16)}
#: the token models' recipe: smaller batches (more updates), more epochs and the usual transformer
#: weight decay than the CNNs.  Trained on the labels alone neither the ViT nor the Mixer leaves the
#: initial plateau on these scenes (the logits stop depending on the input; docs/evaluation.md), so
#: both also regress the ResNet's feature maps from their tokens during training (``distill``), with
#: a short warm-up and new scenes every epoch
TOKEN_RECIPE = dict(epochs=12, lr=1e-3, batch_size=32, weight_decay=0.05, warmup_steps=100, distill=1.0,
                    fresh_scenes=1)
#: per-architecture changes to DEFAULTS, before MODEL_DEFAULTS
ARCH_DEFAULTS = {"vit": TOKEN_RECIPE, "mixer": TOKEN_RECIPE}


def settings(arch: str = "resnet", act: str = "relu", size: int = 64, **train_kw) -> dict:
    """The full, validated settings of a training run (what the cache key is made from)."""
    if arch not in ARCHS:
        raise ValueError(f"unknown arch {arch!r}; choose one of {ARCHS}")
    act, _ = _act(act)
    unknown = set(train_kw) - set(DEFAULTS) - set(OPTIONAL)
    if unknown:
        raise TypeError(f"unknown training settings {sorted(unknown)}; known: {sorted({**DEFAULTS, **OPTIONAL})}")
    init_size = int(train_kw.pop("init_size", 0) or 0)
    s = dict(DEFAULTS)
    s.update(ARCH_DEFAULTS.get(arch, {}))
    s.update(MODEL_DEFAULTS.get((arch, act), {}))
    s.update(train_kw)
    for k in ("warmup_steps", "distill", "fresh_scenes"):  # off (0): not part of the cache key
        if not s.get(k, 0):
            s.pop(k, None)
    if s.get("distill"):
        from .models import TOKEN_ARCHS
        if arch not in TOKEN_ARCHS:
            raise ValueError(f"distill is for the token models {TOKEN_ARCHS}, not {arch!r}")
        s["distill_from"] = cache_key(teacher_settings(int(size), s))
    if init_size:
        if init_size == int(size):
            raise ValueError(f"init_size={init_size} is the model's own size: fine-tune from another size")
        if arch not in INIT_PARTS:
            raise ValueError(f"init_size needs a model whose convolutional weights do not depend on the input "
                             f"size (the ResNet, or the VGG's features); the {arch}'s do (the token models' "
                             f"position embeddings), so train it from scratch")
        # the parent's cache key, so that a retrained parent means a new fine-tuned model
        s["init_size"] = init_size
        s["init_from"] = cache_key(parent_settings(arch, act, init_size, s))
    if arch == "vgg":
        s["init"] = "he"  # the VGG's convolutions are He-initialised (models.SmallVGG); older caches were not
    for k in ("epochs", "n_train", "n_test", "batch_size"):
        if int(s[k]) <= 0:
            raise ValueError(f"{k} must be positive, got {s[k]}")
    return dict(arch=arch, act=act, size=int(size), recipe=RECIPE_VERSION, train_threads=TRAIN_THREADS, **s)


def parent_settings(arch: str, act: str, init_size: int, s: dict) -> dict:
    """The settings of the model a fine-tuning run with settings ``s`` starts from: trained at
    ``init_size`` px on the same data settings (:data:`DATA_SETTINGS`), with that size's own recipe."""
    return settings(arch, act, init_size, **{k: s[k] for k in DATA_SETTINGS})


def teacher_settings(size: int, s: dict) -> dict:
    """The settings of the teacher of a distilled model with settings ``s``: the ReLU ResNet at the
    same size, on the same scenes (n_train, n_test, seed), with its own recipe."""
    return settings("resnet", "relu", size, **{k: s[k] for k in ("n_train", "n_test", "seed")})


def cache_key(s: dict) -> str:
    blob = json.dumps(s, sort_keys=True).encode()
    return f"{s['arch']}-{s['act']}-{s['size']}-" + hashlib.sha256(blob).hexdigest()[:12]


@torch.no_grad()
def accuracy(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, mean=D.DIGITS_MEAN,
             std=D.DIGITS_STD, batch_size: int = 256) -> float:
    """Top-1 accuracy of ``model`` on [0, 1] ``images`` (normalised here)."""
    model.eval()
    correct = 0
    for i in range(0, len(images), batch_size):
        x = D.normalize(images[i:i + batch_size], mean, std)
        correct += (model(x).argmax(1) == labels[i:i + batch_size]).sum().item()
    return correct / len(images)


def train(arch: str = "resnet", act: str = "relu", size: int = 64, progress: bool = True,
          cache_dir: Optional[str] = None, **train_kw) -> Tuple[nn.Module, dict]:
    """Train a model on digit scenes (from a random initialisation, or with ``init_size`` from the
    cached -- or now trained -- model of another size, looked up in ``cache_dir``); returns (model in
    eval mode, record dict).  Runs with :data:`TRAIN_THREADS` torch threads (restored afterwards), so
    that the result does not depend on the machine or the caller's thread setting."""
    s = settings(arch, act, size, **train_kw)
    parent = teacher = None
    if s.get("init_size"):
        ps = parent_settings(arch, act, s["init_size"], s)
        parent, _ = get_trained(arch, act, s["init_size"], cache_dir=cache_dir, progress=progress,
                                **{k: ps[k] for k in DEFAULTS})
    if s.get("distill"):
        ts = teacher_settings(s["size"], s)
        teacher, _ = get_trained("resnet", "relu", s["size"], cache_dir=cache_dir, progress=progress,
                                 **{k: ts[k] for k in DEFAULTS})
    before = torch.get_num_threads()
    torch.set_num_threads(s["train_threads"])
    try:
        return _train(s, progress, parent, teacher)
    finally:
        torch.set_num_threads(before)


def _uint8_scenes(ds: "D.DigitScenes", progress: bool):
    """All scenes of ``ds`` as uint8 images (4x less memory than float; the scenes are 8-bit images
    anyway) and their labels, converted one at a time, so that 6000 scenes at 224 px take 0.9 GB
    instead of 7 GB at the peak."""
    images = torch.empty((len(ds), 3, ds.size, ds.size), dtype=torch.uint8)
    labels = torch.empty(len(ds), dtype=torch.long)
    from tqdm.auto import tqdm
    for i in tqdm(range(len(ds)), desc=f"digit scenes ({ds.split})", leave=False, disable=not progress):
        image, labels[i], _ = ds[i]
        images[i] = (image * 255).round().to(torch.uint8)
    return images, labels


class FeatureDistillation(nn.Module):
    """Feature distillation of a token model from a ResNet teacher: the student's patch tokens (a
    timm ViT's or MLP-Mixer's ``blocks``; a ViT's class and register tokens are left out) after
    its second block and after its last block, each average-pooled to the teacher map's grid and
    mapped by a linear layer (trained along, then dropped), regress the teacher's ``layer2`` and
    ``layer4`` maps, each standardised per channel over the batch; the loss is the sum of the two
    mean squared errors.  The teacher's maps are computed without gradient."""

    def __init__(self, student: nn.Module, teacher: nn.Module, width: int):
        super().__init__()
        from .models import _patch_embed
        self.student, self.teacher = student, teacher.eval().requires_grad_(False)
        self.grid = tuple(_patch_embed(student).grid_size)
        self._seen = {}
        pairs = (("s2", student.blocks[1]), ("s4", student.blocks[-1]), ("t2", teacher.layer2), ("t4", teacher.layer4))
        self._hooks = [m.register_forward_hook(lambda mod, i, o, k=k: self._seen.__setitem__(k, o)) for k, m in pairs]
        self.proj = nn.ModuleList(nn.Linear(width, t[-1].conv2.out_channels) for t in (teacher.layer2, teacher.layer4))

    def remove(self):
        for h in self._hooks:
            h.remove()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The distillation loss of the student's last forward pass (its hooked tokens) on ``x``."""
        with torch.no_grad():
            self.teacher(x)
        n = self.grid[0] * self.grid[1]
        loss = 0.0
        for proj, s_key, t_key in zip(self.proj, ("s2", "s4"), ("t2", "t4")):
            t = self._seen[t_key]
            tok = self._seen[s_key][:, -n:]  # the patch tokens (prefix tokens, if any, first in timm)
            grid = tok.transpose(1, 2).reshape(len(x), tok.shape[-1], *self.grid)
            pred = proj(F.adaptive_avg_pool2d(grid, t.shape[-2:]).flatten(2).transpose(1, 2))
            t = t.flatten(2).transpose(1, 2)
            t = (t - t.mean((0, 1))) / (t.std((0, 1)) + 1e-5)
            loss = loss + F.mse_loss(pred, t)
        return loss


def _schedule(opt, s: dict, total: int):
    if s.get("warmup_steps"):
        w = int(s["warmup_steps"])
        return torch.optim.lr_scheduler.LambdaLR(
            opt, lambda i: min(1.0, (i + 1) / w) * 0.5 * (1 + math.cos(math.pi * min(i, total) / total)))
    return torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=s["lr"], total_steps=total, pct_start=0.2)


def _train(s: dict, progress: bool, parent: Optional[nn.Module] = None,
           teacher: Optional[nn.Module] = None) -> Tuple[nn.Module, dict]:
    torch.manual_seed(s["seed"])
    t0 = time.time()
    xtr, ytr = _uint8_scenes(D.DigitScenes("train", size=s["size"], n=s["n_train"], seed=s["seed"]), progress)
    xte, yte, _ = D.DigitScenes("test", size=s["size"], n=s["n_test"], seed=s["seed"]).tensors(progress=progress)
    model = build(s["arch"], s["act"], num_classes=10, size=s["size"])
    if parent is not None:
        prefix = INIT_PARTS[s["arch"]]
        copied = {k: v for k, v in parent.state_dict().items() if k.startswith(prefix)}
        missing, unexpected = model.load_state_dict(copied, strict=False)
        assert not unexpected and all(not k.startswith(prefix) for k in missing), (missing, unexpected)
    distill = FeatureDistillation(model, teacher, model.embed_dim) if teacher is not None else None
    params = list(model.parameters()) + (list(distill.proj.parameters()) if distill is not None else [])
    opt = torch.optim.AdamW(params, lr=s["lr"], weight_decay=s["weight_decay"])
    steps_per_epoch = math.ceil(len(xtr) / s["batch_size"])
    sched = _schedule(opt, s, s["epochs"] * steps_per_epoch)
    g = torch.Generator().manual_seed(s["seed"])
    from tqdm.auto import tqdm
    bar = tqdm(total=s["epochs"] * steps_per_epoch, desc=f"train {s['arch']}/{s['act']}", disable=not progress)
    x0, y0 = xtr, ytr
    for epoch in range(s["epochs"]):
        if s.get("fresh_scenes") and epoch:
            xtr, ytr = _uint8_scenes(D.DigitScenes("train", size=s["size"], n=s["n_train"],
                                                   seed=s["seed"] + FRESH_SEED_STEP * epoch), progress)
        model.train()
        perm = torch.randperm(len(xtr), generator=g)
        for i in range(0, len(xtr), s["batch_size"]):
            idx = perm[i:i + s["batch_size"]]
            x = D.normalize(xtr[idx].float() / 255)
            loss = F.cross_entropy(model(x), ytr[idx])
            if distill is not None:
                loss = loss + s["distill"] * distill(x)
            if not torch.isfinite(loss):
                raise FloatingPointError(f"training {s['arch']}/{s['act']} diverged (loss {loss.item()}); "
                                         f"try a smaller lr")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            bar.update(1)
            bar.set_postfix(epoch=epoch + 1, loss=f"{loss.item():.3f}")
    bar.close()
    if distill is not None:
        distill.remove()
    model.eval()
    record = dict(settings=s, test_accuracy=accuracy(model, xte, yte), train_accuracy=accuracy(model, x0[:2000].float() / 255, y0[:2000]),
                  train_seconds=round(time.time() - t0, 1), torch_threads=torch.get_num_threads())
    return model, record


def get_trained(arch: str = "resnet", act: str = "relu", size: int = 64, cache_dir: Optional[str] = None,
                progress: bool = True, **train_kw) -> Tuple[nn.Module, float]:
    """A trained digit-scene model and its test accuracy, from the cache or trained now.

    arch: "resnet" | "vgg" | "vit" | "mixer"; act: "relu" | "elu" | "leakyrelu" | "silu" | "gelu" | "tanh"; size: input
    side; train_kw: any of :data:`DEFAULTS` (epochs, n_train, n_test, batch_size, lr, weight_decay,
    seed; defaults per architecture in :data:`ARCH_DEFAULTS` and per model in :data:`MODEL_DEFAULTS`)
    or :data:`OPTIONAL` (init_size: fine-tune from the model of another size).  Returns ``(model in
    eval mode, test accuracy)``."""
    s = settings(arch, act, size, **train_kw)
    root = resolve_cache_dir(cache_dir)
    key = cache_key(s)
    wpath, jpath = os.path.join(root, key + ".pt"), os.path.join(root, key + ".json")
    if os.path.exists(wpath) and os.path.exists(jpath):
        model = build(s["arch"], s["act"], num_classes=10, size=s["size"])
        model.load_state_dict(torch.load(wpath, map_location="cpu", weights_only=True))
        with open(jpath) as f:
            record = json.load(f)
        return model.eval(), float(record["test_accuracy"])
    model, record = train(s["arch"], s["act"], s["size"], progress=progress, cache_dir=cache_dir,
                          **{k: s[k] for k in (*DEFAULTS, *OPTIONAL) if k in s})
    os.makedirs(root, exist_ok=True)
    tmp = wpath + f".tmp{os.getpid()}"
    torch.save(model.state_dict(), tmp)
    os.replace(tmp, wpath)
    with open(jpath + f".tmp{os.getpid()}", "w") as f:
        json.dump(record, f, indent=1)
    os.replace(jpath + f".tmp{os.getpid()}", jpath)
    return model, float(record["test_accuracy"])


def cached_record(arch: str = "resnet", act: str = "relu", size: int = 64, cache_dir: Optional[str] = None,
                  **train_kw) -> Optional[dict]:
    """The JSON record of a cached training run (settings, accuracies, time), or None."""
    s = settings(arch, act, size, **train_kw)
    jpath = os.path.join(resolve_cache_dir(cache_dir), cache_key(s) + ".json")
    if not os.path.exists(jpath):
        return None
    with open(jpath) as f:
        return json.load(f)
