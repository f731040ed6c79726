"""Reference data: Hugging Face ``datasets`` or tensors -> batches of (model input, label).

Column discovery follows the dataset's own features: the image column is the one ``Image``
feature, the label column the one ``ClassLabel``; well-known names are the fallback. Anything
ambiguous is an error naming the candidates, never a guess.
"""

from __future__ import annotations

import hashlib
import itertools
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import torch
from PIL import Image as _PILImage

from ..errors import ChannelMismatchError, ColumnError, DatasetError, EmptyDatasetError, LabelRangeError

__all__ = [
    "Columns",
    "Examples",
    "Fingerprint",
    "ReferenceData",
    "StreamingReference",
    "check_batch",
    "class_names",
    "collate",
    "find_columns",
    "iter_batches",
    "make_loader",
    "make_stream_loader",
    "reference_data",
    "require_nonempty",
]

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
    _check_column_types(feats, image, label)
    return Columns(image=image, label=label)


def _check_column_types(feats: Any, image: str, label: str) -> None:
    """Refuse columns whose feature type cannot be what they are used as (before any image is read)."""
    import datasets

    def kind(f: Any) -> str:
        if isinstance(f, datasets.Image):
            return "images"
        if isinstance(f, datasets.ClassLabel):
            return "class labels"
        if isinstance(f, datasets.Value):
            return f"{f.dtype} values"
        return type(f).__name__

    fi, fl = feats[image], feats[label]
    if isinstance(fi, (datasets.ClassLabel, datasets.Value)):
        raise ColumnError(
            f"image column {image!r} holds {kind(fi)}, not images; pass the image column with "
            "image_column=/--image-column"
        )
    integer = isinstance(fl, datasets.Value) and (fl.dtype.startswith(("int", "uint")) or fl.dtype == "bool")
    if not (isinstance(fl, datasets.ClassLabel) or integer):
        raise ColumnError(
            f"label column {label!r} holds {kind(fl)}; the audit needs integer class indices of the model "
            "(a ClassLabel or integer column, in the model's class order)"
        )
    if image == label:
        raise ColumnError(f"column {image!r} cannot be both the image and the label column")


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
        self.class_names: list[str] | None = None
        self._get: Callable[[int], Any]
        self._n: int
        self.indices: np.ndarray
        if isinstance(source, ReferenceData):
            self._get, self._n = source._get, source._n
            self.columns, self.description = source.columns, dict(source.description)
            self.class_names = source.class_names
            if indices is None:  # wrapping a view keeps the view
                indices = source.indices
        elif isinstance(source, datasets.Dataset):
            self.columns = find_columns(source, image_column=image_column, label_column=label_column)
            self._get, self._n, self.description = _dataset_view(source, self.columns)
            self.class_names = class_names(source, self.columns)
        else:
            self._get, self._n, self.description = _plain_view(source)
        self.indices = np.arange(self._n) if indices is None else np.asarray(indices)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> tuple[Any, int]:
        j = int(self.indices[i])
        try:
            item = self._get(j)  # a datasets row decodes its image here
        except _UNREADABLE as e:
            raise DatasetError(f"reference sample {j}: cannot read its image ({_first(e)}); fix or remove "
                               "that file") from None
        try:
            img, label = item
        except (TypeError, ValueError):
            raise DatasetError(
                f"reference sample {j} is a {type(item).__name__}, not an (image, label) pair"
            ) from None
        return img, _as_label(label, j)

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


class StreamingReference:
    """Reference examples read once, in order, from a stream (``load_dataset(..., streaming=True)``).

    Memory stays bounded by one batch whatever the number of samples: nothing is indexed or
    cached. ``max_samples`` keeps the first N examples of the stream (a stream has no random
    access; shuffle it first with ``ds.shuffle(seed=..., buffer_size=...)`` for a random sample).

    Accepts a ``datasets.IterableDataset`` (columns found as for :class:`ReferenceData`) or any
    re-iterable source of ``(image, label)`` pairs (e.g. a ``torch.utils.data.IterableDataset``).

    Sharding over N processes (:meth:`examples`): process r keeps the examples at stream
    positions i with i % N == r, so the shards partition exactly the examples a single process
    reads (``datasets.distributed.split_dataset_by_node`` splits by file shards when it can, which
    does not commute with ``take(max_samples)``). Every process reads the raw stream; images are
    decoded only by the process that keeps them.
    """

    streaming = True

    def __init__(
        self,
        source: Any,
        *,
        image_column: str | None = None,
        label_column: str | None = None,
        max_samples: int | None = None,
    ) -> None:
        import datasets

        self.columns: Columns | None = None
        self.class_names: list[str] | None = None
        self.max_samples = max_samples
        self._image_feature: Any = None
        self._source: Any
        self.description: dict[str, Any]
        if isinstance(source, StreamingReference):
            self._source, self.columns = source._source, source.columns
            self.class_names, self._image_feature = source.class_names, source._image_feature
            self.description = dict(source.description)
            return
        if isinstance(source, datasets.IterableDataset):
            if source.features is None and image_column is not None and label_column is not None:
                self.columns = Columns(image=image_column, label=label_column)
            else:
                self.columns = find_columns(source, image_column=image_column, label_column=label_column)
                self.class_names = class_names(source, self.columns)
                feat = source.features[self.columns.image]
                self._image_feature = feat if isinstance(feat, datasets.Image) else None
            self._source = source.select_columns([self.columns.image, self.columns.label])
            info = getattr(source, "info", None)
            self.description = {
                "type": "datasets-streaming",
                "dataset": getattr(info, "dataset_name", None) or getattr(info, "builder_name", None),
                "config": getattr(info, "config_name", None),
                "split": str(source.split) if getattr(source, "split", None) is not None else None,
                "columns": [self.columns.image, self.columns.label],
            }
        elif isinstance(source, (datasets.Dataset, datasets.DatasetDict)) or not hasattr(source, "__iter__"):
            raise DatasetError(
                f"cannot stream a {type(source).__name__}; pass a datasets.IterableDataset "
                "(load_dataset(..., streaming=True)) or an iterable of (image, label) pairs"
            )
        else:
            self._source = source
            self.description = {"type": f"{type(source).__name__} (stream)"}

    def subset(self, max_samples: int | None, seed: int) -> StreamingReference:
        """The first ``max_samples`` examples of the stream (``seed`` is unused: no random access)."""
        del seed
        if max_samples is None:
            return self
        out = StreamingReference(self)
        out.max_samples = max_samples if self.max_samples is None else min(max_samples, self.max_samples)
        out.description["max_samples"] = out.max_samples
        return out

    def examples(self, rank: int = 0, world: int = 1) -> Iterator[tuple[int, Any, int]]:
        """``(stream position, raw image, label)`` of the examples process ``rank`` of ``world`` keeps."""
        ds = self._source
        decode = None
        if self.columns is not None:  # a datasets.IterableDataset
            if self.max_samples is not None:
                ds = ds.take(self.max_samples)
            if world > 1 and self._image_feature is not None and self._image_feature.decode:
                ds, decode = ds.decode(False), self._image_feature.decode_example
            cols = self.columns
            rows: Iterator[tuple[Any, Any]] = ((ex[cols.image], ex[cols.label]) for ex in ds)
        else:
            rows = iter(ds)
            if self.max_samples is not None:
                rows = itertools.islice(rows, self.max_samples)
        for i, row in enumerate(rows):
            if i % world != rank:
                continue
            try:
                img, label = row
            except (TypeError, ValueError):
                raise DatasetError(
                    f"stream element {i} is a {type(row).__name__}, not an (image, label) pair"
                ) from None
            if decode is not None and isinstance(img, dict):
                try:
                    img = decode(img)
                except _UNREADABLE as e:
                    raise DatasetError(f"stream element {i}: cannot read its image ({_first(e)})") from None
            if label is None:
                raise DatasetError(f"stream element {i} has no label; the audit needs labelled images")
            yield i, img, _as_label(label, i)


def reference_data(
    dataset: Any, *, image_column: str | None = None, label_column: str | None = None
) -> ReferenceData | StreamingReference:
    """:class:`StreamingReference` for a ``datasets.IterableDataset`` (``streaming=True``) or a
    :class:`StreamingReference`, else :class:`ReferenceData`."""
    import datasets

    if isinstance(dataset, StreamingReference):
        return dataset
    if isinstance(dataset, datasets.IterableDataset) or isinstance(dataset, torch.utils.data.IterableDataset):
        return StreamingReference(dataset, image_column=image_column, label_column=label_column)
    return ReferenceData(dataset, image_column=image_column, label_column=label_column)


#: What decoding a corrupt, truncated, empty or oversized image file raises (PIL's
#: ``UnidentifiedImageError`` is an ``OSError``; a decompression bomb is its own error).
_UNREADABLE: tuple[type[BaseException], ...] = (OSError, SyntaxError, _PILImage.DecompressionBombError)


def _first(e: BaseException) -> str:
    text = str(e).strip()
    return (text.splitlines()[0] if text else type(e).__name__)[:200]


def _as_label(label: Any, i: int) -> int:
    """An integer class index, or a :class:`DatasetError` naming the sample."""
    if isinstance(label, (bool, np.bool_)) or isinstance(label, (float, np.floating)) and label != int(label):
        raise DatasetError(f"reference sample {i} has label {label!r}; labels must be integer class indices")
    try:
        return int(label)
    except (TypeError, ValueError):
        raise DatasetError(
            f"reference sample {i} has label {label!r}; labels must be integer class indices of the model"
        ) from None


def _transformed(transform: Callable[[Any], torch.Tensor] | None, img: Any, i: Any) -> torch.Tensor:
    """``transform(img)`` as a float tensor; a value that is not an image is the data's fault."""
    try:
        x = transform(img) if transform is not None else torch.as_tensor(img)
    except (TypeError, AttributeError) as e:
        raise DatasetError(
            f"reference sample {i}: cannot preprocess a {type(img).__name__} as an image ({_first(e)}); "
            "check --image-column / image_column="
        ) from None
    except _UNREADABLE as e:  # PIL decodes lazily: a truncated file fails here
        raise DatasetError(f"reference sample {i}: cannot read its image ({_first(e)}); fix or remove "
                           "that file") from None
    return x.float()


def collate(batch: list[tuple[Any, ...]]) -> Any:
    """The default collate, with a one-line :class:`DatasetError` when inputs differ in shape."""
    try:
        return torch.utils.data.default_collate(batch)
    except RuntimeError:
        shapes = sorted({tuple(item[0].shape) for item in batch if torch.is_tensor(item[0])})
        if len(shapes) > 1:
            raise DatasetError(
                f"the preprocessed reference images have different shapes {shapes[:4]}; the transform "
                "must resize them to the model's input size (the model's own preprocessing does)"
            ) from None
        raise


class _Streamed(torch.utils.data.IterableDataset):
    def __init__(
        self,
        data: StreamingReference,
        transform: Callable[[Any], torch.Tensor] | None,
        rank: int,
        world: int,
    ) -> None:
        self.data, self.transform, self.rank, self.world = data, transform, rank, world

    def __iter__(self) -> Iterator[tuple[torch.Tensor, int, int]]:
        for i, img, label in self.data.examples(self.rank, self.world):
            yield _transformed(self.transform, img, i), label, i


def make_stream_loader(
    data: StreamingReference,
    transform: Callable[[Any], torch.Tensor] | None,
    *,
    batch_size: int = 64,
    rank: int = 0,
    world: int = 1,
) -> torch.utils.data.DataLoader:
    """A DataLoader of ``(x, y, stream position)`` batches over process ``rank``'s share of a stream."""
    return torch.utils.data.DataLoader(
        _Streamed(data, transform, rank, world), batch_size=batch_size, num_workers=0, collate_fn=collate
    )


class Examples(Protocol):
    """What :func:`make_loader` reads: ``len()`` and ``(image, label, *extra)`` tuples by position."""

    def __len__(self) -> int: ...

    def __getitem__(self, i: int) -> tuple[Any, ...]: ...


class _Mapped(torch.utils.data.Dataset):
    def __init__(self, data: Examples, transform: Callable[[Any], torch.Tensor] | None) -> None:
        self.data, self.transform = data, transform

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, i: int) -> tuple[Any, ...]:
        extra: list[Any]
        img, label, *extra = self.data[i]  # extra: e.g. the sample index (distributed pass)
        return (_transformed(self.transform, img, i), label, *extra)


def make_loader(
    data: Examples,
    transform: Callable[[Any], torch.Tensor] | None,
    *,
    batch_size: int = 64,
    shuffle: bool = False,
    seed: int = 0,
) -> torch.utils.data.DataLoader:
    """A DataLoader of ``(x (B, channels, H, W), y (B,))`` batches."""
    g = torch.Generator().manual_seed(seed)
    return torch.utils.data.DataLoader(
        _Mapped(data, transform), batch_size=batch_size, shuffle=shuffle, generator=g, num_workers=0,
        collate_fn=collate,
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
    """A fingerprint of the exact model inputs and labels used, independent of order and sharding.

    Each sample's digest is ``SHA-256(shape as int64 | input as little-endian float32 | label as
    int64)``; digests are combined as a multiset with LtHash16 (Lewi et al., 2019): each digest is
    expanded by SHAKE-256 to 1024 16-bit words and the vectors are added modulo 2^16. The sum does
    not depend on the order of samples, on the batch size, or on how the samples were split over
    processes (shards merge by adding their vectors), so a 1-process and an N-process audit of the
    same data print the same fingerprint; memory is constant. :meth:`hexdigest` is
    ``SHA-256("hub-backdoor/lthash16/v1" | vector | number of samples)``.
    """

    WORDS = 1024

    def __init__(self) -> None:
        self.vector = np.zeros(self.WORDS, dtype=np.uint16)
        self.n = 0

    @staticmethod
    def sample_words(x: np.ndarray, y: int) -> np.ndarray:
        """The 1024 LtHash words of one sample (``x`` one model input, float32)."""
        h = hashlib.sha256(np.asarray(x.shape, dtype="<i8").tobytes())
        h.update(np.ascontiguousarray(x, dtype="<f4").data)
        h.update(np.asarray([y], dtype="<i8").tobytes())
        return np.frombuffer(hashlib.shake_256(h.digest()).digest(2 * Fingerprint.WORDS), dtype="<u2")

    def update(self, x: torch.Tensor, y: torch.Tensor) -> None:
        xs = np.ascontiguousarray(x.detach().to(torch.float32).cpu().numpy(), dtype="<f4")
        ys = y.detach().to(torch.int64).cpu().numpy()
        if len(ys) == 0:
            return
        acc = np.zeros(self.WORDS, dtype=np.uint64)
        for xi, yi in zip(xs, ys):
            acc += self.sample_words(xi, int(yi))
        self.vector += (acc % 65536).astype(np.uint16)  # uint16 arithmetic wraps modulo 2^16
        self.n += len(ys)

    def merge(self, other: Fingerprint) -> Fingerprint:
        out = Fingerprint()
        out.vector = self.vector + other.vector
        out.n = self.n + other.n
        return out

    def hexdigest(self) -> str:
        h = hashlib.sha256(b"hub-backdoor/lthash16/v1")
        h.update(self.vector.astype("<u2").tobytes())
        h.update(np.asarray([self.n], dtype="<i8").tobytes())
        return h.hexdigest()


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


def _dataset_view(source: Any, cols: Columns) -> tuple[Callable[[int], Any], int, dict[str, Any]]:
    """``(get, n, description)`` of a ``datasets.Dataset``: ``get(i)`` reads row ``i``'s image and
    label (the image decoded)."""
    ds = source.select_columns([cols.image, cols.label])
    description = {
        "type": "datasets",
        "fingerprint": getattr(source, "_fingerprint", None),
        "columns": [cols.image, cols.label],
        "num_rows": len(source),
    }
    return (lambda i: (ds[int(i)][cols.image], ds[int(i)][cols.label])), len(ds), description


def _plain_view(source: Any) -> tuple[Callable[[int], Any], int, dict[str, Any]]:
    """``(get, n, description)`` of reference data that is not a ``datasets.Dataset``: an
    ``(images (N, ...), labels (N,))`` pair or a map-style dataset of ``(image, label)``; anything
    else is a :class:`~hub_backdoor.errors.DatasetError` that says what to pass."""
    import datasets

    if isinstance(source, datasets.DatasetDict):
        raise DatasetError(
            f"got a DatasetDict with splits {list(source)}; pass one split (e.g. ds['test'])"
        )
    if isinstance(source, (datasets.IterableDataset, StreamingReference)):
        raise DatasetError(
            "streaming datasets are not indexable; wrap them in StreamingReference (audit() "
            "does this for a datasets.IterableDataset)"
        )
    if isinstance(source, (str, bytes, os.PathLike)):
        raise DatasetError(
            f"reference data {source!r} is a path; load it first (datasets.load_from_disk, "
            "datasets.load_dataset) or pass an (images, labels) pair"
        )
    if isinstance(source, np.ndarray) or torch.is_tensor(source):
        raise DatasetError(
            f"reference data is one array of shape {tuple(source.shape)}, without labels; pass an "
            "(images, labels) pair"
        )
    if isinstance(source, (tuple, list)) and source and all(isinstance(r, dict) for r in source):
        raise DatasetError(
            f"reference data is a list of {len(source)} dicts; pass datasets.Dataset.from_list(rows) "
            "(with an image and a label column) or an (images, labels) pair"
        )
    if isinstance(source, (tuple, list)) and len(source) == 2:
        return _pair_view(*source)
    if hasattr(source, "__getitem__") and hasattr(source, "__len__"):
        if isinstance(source, (tuple, list)):
            raise DatasetError(
                f"reference data is a {type(source).__name__} of {len(source)} items; pass an "
                "(images, labels) pair or a datasets.Dataset"
            )
        return (lambda i: source[int(i)]), len(source), {"type": type(source).__name__}
    raise DatasetError(
        f"cannot use a {type(source).__name__} as reference data; pass a datasets.Dataset "
        "or an (images, labels) pair"
    )


def _pair_view(X: Any, y: Any) -> tuple[Callable[[int], Any], int, dict[str, Any]]:
    """``(get, n, description)`` of an ``(images (N, ...), labels (N,))`` pair of arrays or tensors
    (integer labels, one per image)."""
    try:
        X = torch.as_tensor(np.asarray(X)) if not torch.is_tensor(X) else X
        y = torch.as_tensor(np.asarray(y)) if not torch.is_tensor(y) else y
    except (TypeError, ValueError, RuntimeError) as e:
        raise DatasetError(
            "an (images, labels) pair needs a numeric image array and integer labels "
            f"({_first(e)})"
        ) from None
    if y.dim() != 1 or y.dtype.is_floating_point or y.dtype == torch.bool or y.is_complex():
        raise DatasetError(
            f"labels of an (images, labels) pair must be integer class indices, one per image; "
            f"got {y.dtype} of shape {tuple(y.shape)}"
        )
    if X.dim() == 0 or len(X) != len(y):
        raise DatasetError(f"{len(X)} images but {len(y)} labels")
    return (lambda i: (X[int(i)], int(y[int(i)]))), len(X), {"type": "tensors", "shape": list(X.shape)}
