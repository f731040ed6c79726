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
    """What a rule may look at.

    Attributes:
        norms: ``(C,)`` ||s_k|| of the paper's QP.
        perturbations: ``(C, d)`` the s_k themselves.
        h_std: ``(d,)`` per-dimension std of h(x) over the clean reference set.
        nonneg_norms: ``(C,)`` ||s_k|| of the QP with ``s >= 0`` (None when not solved).
        quantile_norms: ``(C,)`` ||s_k|| when the collapse takes a quantile over the samples
            instead of the max (needs per-sample logits; the benchmark computes it; None otherwise).
        input_bounds: ``(C,)`` the input-space verification's smallest universal L2 change that
            sends most reference images to k (:mod:`hub_backdoor.verification`; ``nan`` for a
            class not verified; None when not run).
    """

    norms: np.ndarray
    perturbations: np.ndarray | None = None
    h_std: np.ndarray | None = None
    nonneg_norms: np.ndarray | None = None
    quantile_norms: np.ndarray | None = None
    input_bounds: np.ndarray | None = None


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


def dormant_share(perturbations: np.ndarray, h_std: np.ndarray) -> np.ndarray:
    """``sum(|s| / sigma) / sum(|s|)`` per class: how much of s_k lies on dimensions clean data
    barely uses. ``perturbations (C, d)``, ``h_std (d,)`` -> ``(C,)``.

    sigma is floored at 1e-3 of its median so dead units do not divide by zero.
    """
    a = np.abs(perturbations)
    sigma = np.maximum(h_std, 1e-3 * max(float(np.median(h_std)), 1e-12))
    return (a / sigma).sum(1) / np.maximum(a.sum(1), 1e-300)


def _mad(inp: DetectionInput) -> np.ndarray:
    return anomaly_index(inp.norms)


def _mad_nonneg(inp: DetectionInput) -> np.ndarray:
    if inp.nonneg_norms is None:
        raise ValueError("rule 'mad-nonneg' needs the s >= 0 reconstruction (nonneg_norms)")
    return anomaly_index(inp.nonneg_norms)


def _dormant(inp: DetectionInput) -> np.ndarray:
    if inp.perturbations is None or inp.h_std is None:
        raise ValueError("rule 'dormant' needs the perturbations and the clean per-dimension std")
    return -anomaly_index(dormant_share(inp.perturbations, inp.h_std))  # high share is suspicious


def _agree(inp: DetectionInput) -> np.ndarray:
    # min of two anomaly indices: a class passes the threshold only when both statistics flag it
    return np.minimum(_mad_nonneg(inp), _dormant(inp))


def loo_anomaly_index(x: np.ndarray) -> np.ndarray:
    """Leave-one-out anomaly index: entry k against the median and MAD of the *other* entries,
    so one outlier does not widen the spread it is measured against."""
    x = np.asarray(x, dtype=np.float64)
    out = np.zeros_like(x)
    for k in range(len(x)):
        rest = np.delete(x, k)
        med = np.median(rest)
        mad = MAD_SCALE * np.median(np.abs(rest - med))
        out[k] = (med - x[k]) / mad if mad > 0 else 0.0
    return out


def _mad_log(inp: DetectionInput) -> np.ndarray:
    return anomaly_index(np.log(np.maximum(np.asarray(inp.norms, dtype=np.float64), 1e-12)))


def _mad_loo(inp: DetectionInput) -> np.ndarray:
    return loo_anomaly_index(inp.norms)


def _min_gap(inp: DetectionInput) -> np.ndarray:
    """Only the smallest norm can be flagged: its gap to the second smallest, in robust standard
    deviations (an extreme-value test on the arg-min class)."""
    x = np.asarray(inp.norms, dtype=np.float64)
    out = np.zeros_like(x)
    if len(x) < 3:
        return out
    order = np.argsort(x)
    mad = MAD_SCALE * np.median(np.abs(x - np.median(x)))
    if mad > 0:
        out[order[0]] = (x[order[1]] - x[order[0]]) / mad
    return out


def _mad_quantile(inp: DetectionInput) -> np.ndarray:
    if inp.quantile_norms is None:
        raise ValueError("rule 'mad-quantile' needs the quantile reconstruction (quantile_norms)")
    return anomaly_index(inp.quantile_norms)


def _agree_mad(inp: DetectionInput) -> np.ndarray:
    return np.minimum(_mad(inp), _dormant(inp))


def _agree_loo(inp: DetectionInput) -> np.ndarray:
    return np.minimum(_mad_loo(inp), _dormant(inp))


def _input_ratio(inp: DetectionInput) -> np.ndarray:
    if inp.input_bounds is None:
        raise ValueError("rule 'input-ratio' needs the input-space verification (input_bounds)")
    from .verification import bound_ratio_scores

    return bound_ratio_scores(inp.input_bounds)


#: Detection rules: name -> fn(DetectionInput) -> scores (C,).
#:   "mad"         the paper (arXiv v1): MAD anomaly index of ||s_k||
#:   "mad-nonneg"  MAD anomaly index of ||s_k|| with s >= 0 (a trigger switches features on)
#:   "dormant"     MAD anomaly index (high side) of the dormant share of s_k
#:   "agree"       both "mad-nonneg" and "dormant" flag the class (method.md: 6/6 found, 0/3
#:                 clean models flagged on digits, where "mad" flagged 2 of 3 clean models)
RULES: dict[str, Callable[[DetectionInput], np.ndarray]] = {
    "mad": _mad,
    "mad-nonneg": _mad_nonneg,
    "dormant": _dormant,
    "agree": _agree,
    # candidates of the benchmark's detection study (docs/benchmarks.md)
    "mad-log": _mad_log,  # MAD on log ||s_k|| (norms are positive and skewed)
    "mad-loo": _mad_loo,  # leave-one-out MAD: the outlier does not inflate its own yardstick
    "min-gap": _min_gap,  # extreme-value test on the smallest norm only
    "mad-quantile": _mad_quantile,  # 95 % quantile instead of the max in the collapse
    "agree-mad": _agree_mad,  # "mad" and "dormant" flag the same class
    "agree-loo": _agree_loo,  # "mad-loo" and "dormant" flag the same class
    # input space: log(median bound of the other classes / bound of k); needs the verification
    "input-ratio": _input_ratio,
}

#: Each rule's default threshold on its score (anomaly indices: 2, as Neural Cleanse).
RULE_THRESHOLDS: dict[str, float] = {name: 2.0 for name in RULES}

#: Rules that need the input-space verification (they run the model again).
NEEDS_INPUT = frozenset({"input-ratio"})

#: Rules that need the extra s >= 0 reconstruction.
NEEDS_NONNEG = frozenset({"mad-nonneg", "agree"})

DEFAULT_RULE = "agree"


def detect(inp: DetectionInput, *, rule: str = DEFAULT_RULE, threshold: float = 2.0) -> Detection:
    """Score every class with ``rule`` and flag those above ``threshold``."""
    if rule not in RULES:
        raise ValueError(f"unknown detection rule {rule!r}; choose one of {sorted(RULES)}")
    scores = np.asarray(RULES[rule](inp), dtype=np.float64)
    order = np.argsort(-scores, kind="stable")
    flagged = [int(k) for k in order if scores[k] > threshold]
    return Detection(rule=rule, threshold=threshold, scores=scores, flagged=flagged)
