"""Reference data: Hugging Face ``datasets`` or tensors -> batches of (model input, label).

Column discovery follows the dataset's own features: the image column is the one ``Image``
feature, the label column the one ``ClassLabel``; well-known names are the fallback. Anything
ambiguous is an error naming the candidates, never a guess.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from .errors import ChannelMismatchError, ColumnError, DatasetError, EmptyDatasetError, LabelRangeError

_IMAGE_NAMES = ("image", "img", "images", "pixel_values", "picture")
_LABEL_NAMES = ("label", "labels", "target", "class", "fine_label")


@dataclass
class Columns:
    """The image and label columns found (or named) in a ``datasets`` dataset."""

    image: str
    label: str


def find_columns(
    dataset: Any, *, image_column: str | None = None, label_column: str | None = None
) -> Columns:
    """Find the image and label columns of a ``datasets.Dataset`` / ``IterableDataset``."""
    import datasets

    feats = dataset.features
    if feats is None:
        raise ColumnError("the dataset has no known features; name image_column= and label_column=")
    names = list(feats)
    for given, what in ((image_column, "image"), (label_column, "label")):
        if given is not None and given not in feats:
            raise ColumnError(f"no {what} column {given!r} in the dataset; columns are {names}")

    def pick(given: str | None, ftype: type, fallbacks: tuple[str, ...], what: str, flag: str) -> str:
        if given is not None:
            return given
        typed = [n for n, f in feats.items() if isinstance(f, ftype)]
        if len(typed) == 1:
            return typed[0]
        if len(typed) > 1:
            raise ColumnError(f"ambiguous {what} column: {typed} are all {ftype.__name__}; pass {flag}")
        named = [n for n in names if n.lower() in fallbacks]
        if len(named) == 1:
            return named[0]
        if len(named) > 1:
            raise ColumnError(f"ambiguous {what} column: {named}; pass {flag}")
        raise ColumnError(f"no {what} column found among {names}; pass {flag}")

    image = pick(image_column, datasets.Image, _IMAGE_NAMES, "image", "image_column=/--image-column")
    label = pick(label_column, datasets.ClassLabel, _LABEL_NAMES, "label", "label_column=/--label-column")
    return Columns(image=image, label=label)


def class_names(dataset: Any, columns: Columns | None) -> list[str] | None:
    """Names from a ``ClassLabel`` label column, if there is one."""
    if columns is None or getattr(dataset, "features", None) is None:
        return None
    f = dataset.features.get(columns.label)
    return list(f.names) if hasattr(f, "names") else None


class ReferenceData:
    """An indexable view of reference examples as ``(raw image, label)`` pairs.

    Wraps a ``datasets.Dataset``, a ``(images, labels)`` tensor/array pair, or a torch map-style
    dataset yielding ``(image, label)``. ``subset`` and ``split`` give seeded index views.
    """

    def __init__(
        self,
        source: Any,
        *,
        image_column: str | None = None,
        label_column: str | None = None,
        indices: np.ndarray | None = None,
    ) -> None:
        import datasets

        self.columns: Columns | None = None
        self.description: dict[str, Any] = {}
        if isinstance(source, ReferenceData):
            self._get, self._n = source._get, source._n
            self.columns, self.description = source.columns, dict(source.description)
            self.class_names = source.class_names
        elif isinstance(source, datasets.DatasetDict):
            raise DatasetError(
                f"got a DatasetDict with splits {list(source)}; pass one split (e.g. ds['test'])"
            )
        elif isinstance(source, datasets.IterableDataset):
            raise DatasetError("streaming datasets are not indexable; use iter_batches() directly")
        elif isinstance(source, datasets.Dataset):
            self.columns = find_columns(source, image_column=image_column, label_column=label_column)
            ds = source.select_columns([self.columns.image, self.columns.label])
            cols = self.columns
            self._get = lambda i: (ds[int(i)][cols.image], ds[int(i)][cols.label])
            self._n = len(ds)
            self.class_names = class_names(source, self.columns)
            self.description = {
                "type": "datasets",
                "fingerprint": getattr(source, "_fingerprint", None),
                "columns": [cols.image, cols.label],
                "num_rows": len(source),
            }
        elif isinstance(source, (tuple, list)) and len(source) == 2:
            X, y = source
            X = torch.as_tensor(np.asarray(X)) if not torch.is_tensor(X) else X
            y = torch.as_tensor(np.asarray(y)) if not torch.is_tensor(y) else y
            if len(X) != len(y):
                raise DatasetError(f"{len(X)} images but {len(y)} labels")
            self._get = lambda i: (X[int(i)], int(y[int(i)]))
            self._n = len(X)
            self.class_names = None
            self.description = {"type": "tensors", "shape": list(X.shape)}
        elif hasattr(source, "__getitem__") and hasattr(source, "__len__"):
            self._get = lambda i: source[int(i)]
            self._n = len(source)
            self.class_names = None
            self.description = {"type": type(source).__name__}
        else:
            raise DatasetError(
                f"cannot use a {type(source).__name__} as reference data; pass a datasets.Dataset "
                "or an (images, labels) pair"
            )
        if not hasattr(self, "class_names"):
            self.class_names = None
        self.indices = np.arange(self._n) if indices is None else np.asarray(indices)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> tuple[Any, int]:
        img, label = self._get(self.indices[i])
        return img, int(label)

    def view(self, indices: np.ndarray) -> ReferenceData:
        out = ReferenceData(self)
        out.indices = self.indices[np.asarray(indices, dtype=np.int64)]
        return out

    def subset(self, max_samples: int | None, seed: int) -> ReferenceData:
        """A seeded random subset of at most ``max_samples`` examples (in original order)."""
        if max_samples is None or max_samples >= len(self):
            return self
        rng = np.random.default_rng(seed)
        return self.view(np.sort(rng.choice(len(self), size=max_samples, replace=False)))

    def split(self, holdout: float, seed: int) -> tuple[ReferenceData, ReferenceData]:
        """Seeded split into (train, holdout) views, stratified by label."""
        labels = np.array([self[i][1] for i in range(len(self))])
        rng = np.random.default_rng(seed)
        hold: list[int] = []
        for c in np.unique(labels):
            idx = rng.permutation(np.flatnonzero(labels == c))
            hold.extend(idx[: int(round(holdout * len(idx)))].tolist())
        mask = np.zeros(len(self), dtype=bool)
        mask[hold] = True
        return self.view(np.flatnonzero(~mask)), self.view(np.flatnonzero(mask))


class _Mapped(torch.utils.data.Dataset):
    def __init__(self, data: ReferenceData, transform: Callable[[Any], torch.Tensor] | None) -> None:
        self.data, self.transform = data, transform

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        img, label = self.data[i]
        x = self.transform(img) if self.transform is not None else torch.as_tensor(img)
        return x.float(), label


def make_loader(
    data: ReferenceData,
    transform: Callable[[Any], torch.Tensor] | None,
    *,
    batch_size: int = 64,
    shuffle: bool = False,
    seed: int = 0,
) -> torch.utils.data.DataLoader:
    """A DataLoader of ``(x (B, channels, H, W), y (B,))`` batches."""
    g = torch.Generator().manual_seed(seed)
    return torch.utils.data.DataLoader(
        _Mapped(data, transform), batch_size=batch_size, shuffle=shuffle, generator=g, num_workers=0
    )


def check_batch(x: torch.Tensor, y: torch.Tensor, *, num_classes: int, channels: int | None) -> None:
    """Raise on wrong channels or labels outside [0, C)."""
    if x.dim() == 3:
        raise ChannelMismatchError(
            f"images have shape {tuple(x.shape[1:])} with no channel axis; expected ({channels}, H, W)"
        )
    if channels is not None and x.shape[1] != channels:
        raise ChannelMismatchError(
            f"images have {x.shape[1]} channels but the model expects {channels}; pass a transform= "
            "that converts them"
        )
    if y.numel() and (int(y.min()) < 0 or int(y.max()) >= num_classes):
        bad = y[(y < 0) | (y >= num_classes)][0].item()
        raise LabelRangeError(f"label {bad} is outside [0, {num_classes}) for this {num_classes}-class model")


class Fingerprint:
    """A running SHA-256 over the exact model inputs and labels used (order-sensitive)."""

    def __init__(self) -> None:
        self._h = hashlib.sha256()

    def update(self, x: torch.Tensor, y: torch.Tensor) -> None:
        self._h.update(x.detach().to(torch.float32).cpu().contiguous().numpy().tobytes())
        self._h.update(y.detach().to(torch.int64).cpu().numpy().tobytes())

    def hexdigest(self) -> str:
        return self._h.hexdigest()


def iter_batches(
    loader: torch.utils.data.DataLoader, *, progress: bool, desc: str
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    if not progress:
        yield from loader
        return
    from tqdm.auto import tqdm

    yield from tqdm(loader, desc=desc, unit="batch", leave=False)


def require_nonempty(data: ReferenceData) -> None:
    if len(data) == 0:
        raise EmptyDatasetError("the reference dataset is empty; pass a split with labelled images")
