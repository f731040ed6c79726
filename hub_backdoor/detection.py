"""Stage 1b: decide which class (if any) is the backdoor target from the per-class perturbations.

Rules live in a registry (:data:`RULES`); each maps a :class:`DetectionInput` to one anomaly
score per class (larger = more suspicious) and flags classes whose score exceeds the threshold.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

#: Consistency constant that makes the MAD a standard-deviation estimate under normality.
MAD_SCALE = 1.4826


@dataclass
class DetectionInput:
    """What a rule may look at: ``norms (C,)``, ``perturbations (C, d)``, ``h_std (d,)``."""

    norms: np.ndarray
    perturbations: np.ndarray | None = None
    h_std: np.ndarray | None = None


@dataclass
class Detection:
    """A rule's verdict: ``scores (C,)`` anomaly indices and the flagged classes (most anomalous first)."""

    rule: str
    threshold: float
    scores: np.ndarray
    flagged: list[int]

    @property
    def target(self) -> int | None:
        return self.flagged[0] if self.flagged else None


def anomaly_index(x: np.ndarray) -> np.ndarray:
    """Neural Cleanse's low-side anomaly index ``(median - x) / (1.4826 * MAD)`` for each entry.

    A degenerate MAD (all values equal) gives 0 everywhere rather than dividing by zero.
    """
    x = np.asarray(x, dtype=np.float64)
    med = np.median(x)
    mad = MAD_SCALE * np.median(np.abs(x - med))
    if not mad > 0:
        return np.zeros_like(x)
    return (med - x) / mad


def _mad(inp: DetectionInput) -> np.ndarray:
    return anomaly_index(inp.norms)


#: Detection rules: name -> fn(DetectionInput) -> scores (C,). ``"mad"`` is the paper's rule.
RULES: dict[str, Callable[[DetectionInput], np.ndarray]] = {"mad": _mad}

DEFAULT_RULE = "mad"


def detect(inp: DetectionInput, *, rule: str = DEFAULT_RULE, threshold: float = 2.0) -> Detection:
    """Score every class with ``rule`` and flag those above ``threshold``."""
    if rule not in RULES:
        raise ValueError(f"unknown detection rule {rule!r}; choose one of {sorted(RULES)}")
    scores = np.asarray(RULES[rule](inp), dtype=np.float64)
    order = np.argsort(-scores, kind="stable")
    flagged = [int(k) for k in order if scores[k] > threshold]
    return Detection(rule=rule, threshold=threshold, scores=scores, flagged=flagged)
