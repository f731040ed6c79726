"""The reference pass: one inference pass over clean data that keeps what later stages need.

Stage 1 needs only the logits, folded into the O(C^2) :class:`ConstraintState` as they stream by;
per-dimension embedding statistics (mean, std) are kept for diagnostics; the embeddings
themselves only when asked (``keep_embeddings=True``). Memory is bounded by one batch and the
``(C, C)`` state (plus ``(n, d)`` when embeddings are kept), whatever the number of samples; the
same pass runs sharded over several processes (:mod:`hub_backdoor.distributed`).
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from ..adapters.base import Classifier
from ..distributed import resolve, shard_reference_loader
from ..errors import EmptyDatasetError, NonFiniteLogitsError, OneClassDatasetError
from ..sources.reference import (
    Fingerprint,
    ReferenceData,
    StreamingReference,
    check_batch,
    iter_batches,
    make_loader,
    make_stream_loader,
    require_nonempty,
)
from .reconstruction import ConstraintState, fold_worst

__all__ = ["ReferencePass", "reference_pass"]


@dataclass
class ReferencePass:
    """What one pass over the clean reference data produced.

    Attributes:
        state: the collapsed QP constraints (``(C, C)`` running max) and per-class counts.
        n: number of samples. correct: how many the model classified right.
        fingerprint: order-free hash of the exact inputs and labels used (see
            :class:`~hub_backdoor.sources.reference.Fingerprint`): the same for any batch size and number of
            processes.
        h_mean, h_std: ``(d,)`` per-dimension mean / std of h(x) over the reference set.
        embeddings: ``(n, d)`` float32 when kept, else None. labels: ``(n,)`` when kept.
        exactness: relative error of ``W h + b`` vs logits on the first batch.
        seconds: wall time of the pass.
    """

    state: ConstraintState
    n: int
    correct: int
    fingerprint: str
    h_mean: np.ndarray
    h_std: np.ndarray
    exactness: float
    seconds: float
    embeddings: np.ndarray | None = None
    labels: np.ndarray | None = None
    description: dict[str, Any] = field(default_factory=dict)
    #: distinct raw sizes (width, height) of the images this process read, at most a few
    input_sizes: list[tuple[int, ...]] = field(default_factory=list)

    @property
    def accuracy(self) -> float:
        return self.correct / max(self.n, 1)


@contextlib.contextmanager
def channels_last(model: torch.nn.Module, enabled: bool) -> Iterator[None]:
    """On a CPU, convolutions run about 1.3-1.5x faster forward and backward in the channels-last
    layout (oneDNN; a 224-px ResNet-18 measured here): the model is converted for the block and
    its parameters put back in their own layout after."""
    if not enabled:
        yield
        return
    # the very tensors are put back (a stride test misses 1x1 kernels, which are "contiguous" in
    # both layouts but take other kernels in the channels-last one)
    tensors = [t.data for t in (*model.parameters(), *model.buffers())]
    model.to(memory_format=torch.channels_last)
    try:
        yield
    finally:
        for t, original in zip((*model.parameters(), *model.buffers()), tensors):
            t.data = original


@torch.no_grad()
def reference_pass(
    clf: Classifier,
    data: ReferenceData | StreamingReference,
    *,
    transform: Any = None,
    batch_size: int = 64,
    keep_embeddings: bool = False,
    progress: bool = True,
    device: torch.device | str | None = None,
    accelerator: Any = None,
) -> ReferencePass:
    """Run the model over ``data`` once; see :class:`ReferencePass`.

    ``data`` may be a :class:`ReferenceData` or a :class:`StreamingReference` (memory bounded by
    one batch and the ``(C, C)`` state). ``accelerator``: see :func:`hub_backdoor.distributed.resolve`;
    with several processes each one runs its shard and every process returns the merged result
    (``keep_embeddings`` then gathers the embeddings in sample order). ``device`` defaults to the
    accelerator's device, else the model's.
    """
    dist = resolve(accelerator)
    if not isinstance(data, StreamingReference):
        require_nonempty(data)
    t0 = time.perf_counter()
    if device is None:
        device = dist.device if dist.device is not None else clf.device
    device = torch.device(device)
    clf.model.to(device).eval()
    tf = _SizeRecorder(transform or clf.preprocess)
    loader = _loader(data, tf, batch_size, keep_embeddings, dist)
    C, d = clf.num_classes, clf.embed_dim
    acc = _Accumulator(C, d, device)
    fp = Fingerprint()
    kept: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []
    # channels-last on a CPU: the forward pass of a 224-px ResNet-18 takes 2/3 of the time
    fast = device.type == "cpu" and isinstance(clf.model, torch.nn.Module)
    with channels_last(clf.model, fast):
        dist.run(_local_pass, clf, loader, acc, fp, kept if keep_embeddings else None, device=device,
                 fast=fast, dist=dist, progress=progress)
    state, n, correct, s1, s2, exactness = acc.finish(dist)
    merged = dist.all_reduce(torch.as_tensor(fp.vector.astype(np.int64)), "sum").numpy()
    fp.vector = (merged % 65536).astype(np.uint16)  # LtHash: shards add modulo 2^16
    fp.n = n
    _check_classes(state, n)
    emb, lab = _gather(kept, dist, d) if keep_embeddings else (None, None)
    mean = s1 / n
    var = np.maximum(s2 / n - mean**2, 0.0)
    description = dict(data.description)
    if dist.active:
        description["num_processes"] = dist.world
    return ReferencePass(
        state=state,
        n=n,
        correct=correct,
        fingerprint=fp.hexdigest(),
        h_mean=mean,
        h_std=np.sqrt(var),
        exactness=exactness,
        seconds=time.perf_counter() - t0,
        embeddings=emb,
        labels=lab,
        description=description,
        input_sizes=sorted(tf.sizes),
    )


def _loader(data: ReferenceData | StreamingReference, tf: Any, batch_size: int, keep_embeddings: bool,
            dist: Any) -> Any:
    """This process's batches of ``data``: ``(x (B, channels, H, W), y (B,))``, with the sample
    indices ``(B,)`` third when sharded embeddings are kept (to put them back in order)."""
    if isinstance(data, StreamingReference):
        return make_stream_loader(data, tf, batch_size=batch_size, rank=dist.rank, world=dist.world)
    loader = make_loader(_Indexed(data) if keep_embeddings and dist.active else data, tf,
                         batch_size=batch_size)
    return shard_reference_loader(loader, dist)


def _local_pass(clf: Classifier, loader: Any, acc: _Accumulator, fp: Fingerprint,
                kept: list[tuple[np.ndarray, np.ndarray, np.ndarray]] | None, *, device: torch.device,
                fast: bool, dist: Any, progress: bool) -> None:
    """This process's share of the pass: each batch checked, fingerprinted and folded into
    ``acc``; with ``kept``, ``(indices (B,), h (B, d), y (B,))`` of each batch appended to it."""
    C = clf.num_classes
    start = 0
    for batch in iter_batches(loader, progress=progress and dist.is_main, desc="reference pass"):
        x, y = batch[0], batch[1]
        check_batch(x, y, num_classes=C, channels=clf.input_channels)
        fp.update(x, y)
        x = x.to(device)
        logits, h = clf.forward(x.contiguous(memory_format=torch.channels_last) if fast and x.dim() == 4
                                else x)
        if acc.n == 0:
            acc.exactness = _exactness(clf, logits, h)
        if not torch.isfinite(logits).all():
            raise NonFiniteLogitsError(
                f"{type(clf.model).__name__} produced non-finite logits on a batch of "
                f"{len(y)} reference samples (process {dist.rank}, its samples {start}.."
                f"{start + len(y) - 1}); check the inputs and the weights"
            )
        acc.update(logits, h, y.to(device))
        if kept is not None:
            idx = batch[2].numpy() if len(batch) > 2 else np.arange(start, start + len(y))
            kept.append((idx, h.detach().float().cpu().numpy(), y.numpy()))
        start += len(y)


def _check_classes(state: ConstraintState, n: int) -> None:
    """Refuse a pass of no samples, or of samples of one class only (``state.counts (C,)``)."""
    present = np.flatnonzero(state.counts)
    if n == 0:
        raise EmptyDatasetError("the reference dataset is empty; pass a split with labelled images")
    if len(present) < 2:
        raise OneClassDatasetError(
            f"all {n} reference samples have label {int(present[0])}; the audit needs samples of "
            "at least two classes (ideally all)"
        )


def _gather(kept: list[tuple[np.ndarray, np.ndarray, np.ndarray]], dist: Any, d: int
            ) -> tuple[np.ndarray, np.ndarray]:
    """The kept embeddings ``(n, d)`` and labels ``(n,)`` of every process, in sample order."""
    parts = dist.all_gather_object(kept) if dist.active else [kept]
    flat = [t for part in parts for t in part]
    if not flat:
        return np.zeros((0, d), np.float32), np.zeros(0, np.int64)
    idx = np.concatenate([t[0] for t in flat])
    order = np.argsort(idx, kind="stable")
    return np.concatenate([t[1] for t in flat])[order], np.concatenate([t[2] for t in flat])[order]


class _SizeRecorder:
    """The transform, remembering the raw sizes of the images it sees (mixed sizes get a note)."""

    MAX = 8

    def __init__(self, transform: Any) -> None:
        self.transform = transform
        self.sizes: set[tuple[int, ...]] = set()

    def __call__(self, img: Any) -> Any:
        if len(self.sizes) < self.MAX:
            size = getattr(img, "size", None)  # PIL: (width, height)
            if isinstance(size, tuple):
                self.sizes.add(tuple(int(v) for v in size))
        return self.transform(img) if self.transform is not None else torch.as_tensor(img)

    def __repr__(self) -> str:
        return repr(self.transform)


class _Indexed(torch.utils.data.Dataset):
    """``(image, label, index)``: lets sharded processes put kept embeddings back in order."""

    def __init__(self, data: ReferenceData) -> None:
        self.data = data

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, i: int) -> tuple[Any, int, int]:
        img, label = self.data[i]
        return img, label, i


class _Accumulator:
    """The per-process reduction of the pass, kept on the model's device between batches."""

    def __init__(self, C: int, d: int, device: torch.device) -> None:
        self.worst = torch.full((C, C), -torch.inf, dtype=torch.float64, device=device)
        self.worst.fill_diagonal_(0.0)
        self.counts = torch.zeros(C, dtype=torch.int64, device=device)
        self.s1 = torch.zeros(d, dtype=torch.float64, device=device)
        self.s2 = torch.zeros(d, dtype=torch.float64, device=device)
        self.correct = torch.zeros((), dtype=torch.int64, device=device)
        self.n = 0
        self.exactness = float("nan")

    def update(self, logits: torch.Tensor, h: torch.Tensor, y: torch.Tensor) -> None:
        z = logits.detach().double()
        h = h.detach().double()
        fold_worst(self.worst, z, y)
        self.counts += torch.bincount(y, minlength=self.counts.numel())[: self.counts.numel()]
        self.s1 += h.sum(0)
        self.s2 += (h * h).sum(0)
        self.correct += (z.argmax(1) == y).sum()
        self.n += len(y)

    def finish(self, dist: Any) -> tuple[ConstraintState, int, int, np.ndarray, np.ndarray, float]:
        worst = dist.all_reduce(self.worst, "max").cpu().numpy()
        ints = dist.all_reduce(torch.cat([self.counts, self.correct.reshape(1)]), "sum").cpu().numpy()
        sums = dist.all_reduce(torch.stack([self.s1, self.s2]), "sum").cpu().numpy()
        ex = self.exactness if np.isfinite(self.exactness) else -1.0
        ex = float(dist.all_reduce(torch.tensor([ex], dtype=torch.float64), "max")[0])
        counts = ints[:-1].astype(np.int64)
        state = ConstraintState(worst=worst, counts=counts)
        return state, int(counts.sum()), int(ints[-1]), sums[0], sums[1], ex if ex >= 0 else float("nan")


def _exactness(clf: Classifier, logits: torch.Tensor, h: torch.Tensor) -> float:
    """:meth:`Classifier.verify`'s checks on outputs the pass already computed (no second forward)."""
    return clf.check_outputs(logits, h)
