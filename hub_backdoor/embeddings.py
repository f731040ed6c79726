"""The reference pass: one inference pass over clean data that keeps what later stages need.

Stage 1 needs only the logits, folded into the O(C^2) :class:`ConstraintState` as they stream by;
per-dimension embedding statistics (mean, std) are kept for diagnostics; the embeddings
themselves only when asked (``keep_embeddings=True``).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from .adapters.base import Classifier
from .data import Fingerprint, ReferenceData, check_batch, iter_batches, make_loader, require_nonempty
from .errors import NonFiniteLogitsError, OneClassDatasetError
from .reconstruction import ConstraintState


@dataclass
class ReferencePass:
    """What one pass over the clean reference data produced.

    Attributes:
        state: the collapsed QP constraints (``(C, C)`` running max) and per-class counts.
        n: number of samples. correct: how many the model classified right.
        fingerprint: SHA-256 of the exact inputs and labels used.
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

    @property
    def accuracy(self) -> float:
        return self.correct / max(self.n, 1)


@torch.no_grad()
def reference_pass(
    clf: Classifier,
    data: ReferenceData,
    *,
    transform: Any = None,
    batch_size: int = 64,
    keep_embeddings: bool = False,
    progress: bool = True,
    device: torch.device | str | None = None,
) -> ReferencePass:
    """Run the model over ``data`` once; see :class:`ReferencePass`."""
    require_nonempty(data)
    t0 = time.perf_counter()
    device = torch.device(device) if device is not None else clf.device
    clf.model.to(device).eval()
    loader = make_loader(data, transform or clf.preprocess, batch_size=batch_size)
    state = ConstraintState.empty(clf.num_classes)
    fp = Fingerprint()
    d = clf.embed_dim
    s1, s2 = torch.zeros(d, dtype=torch.float64), torch.zeros(d, dtype=torch.float64)
    kept_h: list[np.ndarray] = []
    kept_y: list[np.ndarray] = []
    n = correct = 0
    exactness = float("nan")
    for x, y in iter_batches(loader, progress=progress, desc="reference pass"):
        check_batch(x, y, num_classes=clf.num_classes, channels=clf.input_channels)
        fp.update(x, y)
        x = x.to(device)
        if n == 0:
            exactness = clf.verify(x)
        logits, h = clf.forward(x)
        logits, h = logits.double().cpu(), h.double().cpu()
        if not torch.isfinite(logits).all():
            raise NonFiniteLogitsError(
                f"{type(clf.model).__name__} produced non-finite logits on reference samples "
                f"{n}..{n + len(y) - 1}; check the inputs and the weights"
            )
        state.update(logits, y)
        s1 += h.sum(0)
        s2 += (h * h).sum(0)
        correct += int((logits.argmax(1) == y).sum())
        n += len(y)
        if keep_embeddings:
            kept_h.append(h.float().numpy())
            kept_y.append(y.numpy())
    present = np.flatnonzero(state.counts)
    if len(present) < 2:
        raise OneClassDatasetError(
            f"all {n} reference samples have label {int(present[0])}; the audit needs samples of "
            "at least two classes (ideally all)"
        )
    mean = (s1 / n).numpy()
    var = np.maximum((s2 / n).numpy() - mean**2, 0.0)
    return ReferencePass(
        state=state,
        n=n,
        correct=correct,
        fingerprint=fp.hexdigest(),
        h_mean=mean,
        h_std=np.sqrt(var),
        exactness=exactness,
        seconds=time.perf_counter() - t0,
        embeddings=np.concatenate(kept_h) if keep_embeddings else None,
        labels=np.concatenate(kept_y) if keep_embeddings else None,
        description=dict(data.description),
    )
