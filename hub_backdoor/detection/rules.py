"""Stage 1b: decide which class (if any) is the backdoor target from the per-class perturbations.

Rules live in a registry (:data:`RULES`); each maps a :class:`DetectionInput` to one anomaly
score per class (larger = more suspicious) and flags classes whose score exceeds the threshold.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

__all__ = [
    "AUDIT_RULES", "DEFAULT_RULE", "Detection", "DetectionInput", "NEEDS_INPUT", "NEEDS_NONNEG",
    "REGISTRY", "RULES", "RULE_THRESHOLDS", "Rule", "anomaly_index", "bound_ratio_scores", "detect",
    "dormant_share", "loo_anomaly_index", "separation_scores",
]

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
            sends most reference images to k (:mod:`hub_backdoor.detection.verification`; ``nan`` for a
            class not verified; None when not run).
        mask_l1: ``(C,)`` the mask verification's smallest stamped mask that sends the reference
            images to k (:func:`hub_backdoor.detection.verification.verify_mask`; None when not run).
    """

    norms: np.ndarray
    perturbations: np.ndarray | None = None
    h_std: np.ndarray | None = None
    nonneg_norms: np.ndarray | None = None
    quantile_norms: np.ndarray | None = None
    input_bounds: np.ndarray | None = None
    mask_l1: np.ndarray | None = None


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


def _median_mad(x: np.ndarray) -> tuple[float, float]:
    """Median and scaled MAD of ``x``. An infinite norm (a class no universal change reaches)
    ranks as a very large one; only where that leaves the median or MAD infinite are they taken
    over the finite entries alone."""
    with np.errstate(invalid="ignore"):
        med = float(np.median(x))
        mad = MAD_SCALE * float(np.median(np.abs(x - med)))
    if not (np.isfinite(med) and np.isfinite(mad)):
        fin = x[np.isfinite(x)]
        med = float(np.median(fin))
        mad = MAD_SCALE * float(np.median(np.abs(fin - med)))
    return med, mad


def anomaly_index(x: np.ndarray, ok: np.ndarray | None = None) -> np.ndarray:
    """Neural Cleanse's low-side anomaly index ``(median - x) / (1.4826 * MAD)`` for each entry.

    Only the entries in ``ok`` (default: all) are scored and enter the median and MAD; the
    others, and non-finite entries, score ``-inf``: a class no universal change reaches (norm
    ``inf``) carries no evidence. A degenerate MAD (all values equal) gives 0 rather than
    dividing by zero.
    """
    x = np.asarray(x, dtype=np.float64)
    pool = x if ok is None else x[ok]
    use = np.isfinite(x) if ok is None else np.isfinite(x) & ok
    out = np.full_like(x, -np.inf)
    if not use.any():
        return out
    med, mad = _median_mad(pool[~np.isnan(pool)])
    out[use] = (med - x[use]) / mad if mad > 0 else 0.0
    return out


def _reachable(inp: DetectionInput) -> np.ndarray:
    """``(C,)`` bool: classes some universal latent change reaches (finite norm)."""
    return np.isfinite(np.asarray(inp.norms, dtype=np.float64))


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
    ok = _reachable(inp)
    share = dormant_share(inp.perturbations, inp.h_std)
    # a high share is suspicious: the low-side index of the negated share
    return anomaly_index(-share, ok)


def _agree(inp: DetectionInput) -> np.ndarray:
    # min of two anomaly indices: a class passes the threshold only when both statistics flag it
    return np.minimum(_mad_nonneg(inp), _dormant(inp))


def loo_anomaly_index(x: np.ndarray) -> np.ndarray:
    """Leave-one-out anomaly index: entry k against the median and MAD of the *other* entries,
    so one outlier does not widen the spread it is measured against."""
    x = np.asarray(x, dtype=np.float64)
    out = np.full_like(x, -np.inf)  # a non-finite norm: no evidence
    for k in np.flatnonzero(np.isfinite(x)):
        rest = np.delete(x, k)
        med, mad = _median_mad(rest[~np.isnan(rest)])
        out[k] = (med - x[k]) / mad if mad > 0 else 0.0
    return out


def _mad_log(inp: DetectionInput) -> np.ndarray:
    with np.errstate(invalid="ignore"):
        return anomaly_index(np.log(np.maximum(np.asarray(inp.norms, dtype=np.float64), 1e-12)))


def _mad_loo(inp: DetectionInput) -> np.ndarray:
    return loo_anomaly_index(inp.norms)


def _min_gap(inp: DetectionInput) -> np.ndarray:
    """Only the smallest norm can be flagged: its gap to the second smallest, in robust standard
    deviations (an extreme-value test on the arg-min class)."""
    x = np.asarray(inp.norms, dtype=np.float64)
    out = np.where(np.isfinite(x), 0.0, -np.inf)
    fin = x[np.isfinite(x)]
    if len(fin) < 3:
        return out
    order = np.argsort(np.where(np.isfinite(x), x, np.inf), kind="stable")
    mad = MAD_SCALE * np.median(np.abs(fin - np.median(fin)))
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


def _searched(inp: DetectionInput, field: str, rule: str) -> np.ndarray:
    """The input-space search result ``rule`` reads, or a clear error when the audit did not run it."""
    value = getattr(inp, field)
    if value is None:
        what = "input-space verification" if field == "input_bounds" else "mask verification"
        raise ValueError(f"rule {rule!r} needs the {what} ({field})")
    return np.asarray(value, dtype=np.float64)


def bound_ratio_scores(bounds: np.ndarray) -> np.ndarray:
    """``log(median of the other classes' bounds / bound_k)`` per class: larger = a shorter cut
    to k than to a typical class. ``bounds (C,)``; ``nan`` entries (not verified) score ``-inf``
    and are left out of the other classes' median."""
    b = np.asarray(bounds, dtype=np.float64)
    out = np.full(len(b), -np.inf)
    ok = np.flatnonzero(np.isfinite(b))
    for k in ok:
        rest = b[[j for j in ok if j != k]]
        if len(rest):
            out[k] = math.log(float(np.median(rest)) / max(b[k], 1e-12))
    return out


_TIE = 1e-9  # orders the classes of a set that share one gap; far below any threshold's precision


def separation_scores(bounds: np.ndarray, *, max_set: int = 2) -> np.ndarray:
    """How far the most reachable classes stand apart from the rest, in log units.

    Sort ``log bound`` upwards and take, among the gaps after the ``max_set`` smallest entries,
    the largest one; every class below that gap scores its size, the others 0. One planted
    target gives ``log(bound of the runner-up / bound of the target)``; two targets set apart
    together both score the gap above them, the shorter cut a hair (1e-9 per place) ahead, so
    that the class an audit names first is the more reachable one rather than the lower index.
    An extreme-value statistic on the two order statistics that matter, rather than an index
    scaled by the spread of the other classes (whose width differs between model families).
    ``bounds (C,)``; ``nan`` entries (not verified) score ``-inf``."""
    b = np.asarray(bounds, dtype=np.float64)
    out = np.full(len(b), -np.inf)
    ok = np.flatnonzero(np.isfinite(b))
    if len(ok) < 2:
        return out
    out[ok] = 0.0
    order = ok[np.argsort(b[ok], kind="stable")]
    logs = np.log(np.maximum(b[order], 1e-12))
    m = min(max_set, len(order) - 1)
    gaps = np.diff(logs[: m + 1])
    j = int(np.argmax(gaps))
    out[order[: j + 1]] = gaps[j] - _TIE * np.arange(j + 1)
    return out


def _input_ratio(inp: DetectionInput) -> np.ndarray:
    return bound_ratio_scores(_searched(inp, "input_bounds", "input-ratio"))


def _mask_ratio(inp: DetectionInput) -> np.ndarray:
    return bound_ratio_scores(_searched(inp, "mask_l1", "mask-ratio"))


def _mask_input(inp: DetectionInput) -> np.ndarray:
    return _mask_ratio(inp) + _input_ratio(inp)


def _input_gap(inp: DetectionInput) -> np.ndarray:
    return separation_scores(_searched(inp, "input_bounds", "input-gap"))


def _mask_gap(inp: DetectionInput) -> np.ndarray:
    return separation_scores(_searched(inp, "mask_l1", "mask-gap"))


#: The latent part of the default: what the audit can say without running the model again (the
#: input-space searches' class screen, and suites or tests that run no search, use it).
LATENT_RULE = "agree-mad"


def _latent_or_input(inp: DetectionInput) -> np.ndarray:
    # each kind of evidence in units of its own threshold: a class is flagged (score > 1) when the
    # latent rule or the input-space rule flags it
    return np.maximum(RULES[LATENT_RULE](inp) / REGISTRY[LATENT_RULE].threshold,
                      _input_gap(inp) / REGISTRY["input-gap"].threshold)


#: Just above the highest score of the standard zoo's clean models over three trainings (144 models,
#: hub_backdoor/detection/calibration/standard.json; 0.53, 0.49 and 0.55 per training), as for the other
#: input-space rules.
INPUT_GAP_THRESHOLD = 0.55
MASK_GAP_THRESHOLD = 1.10


@dataclass(frozen=True)
class Rule:
    """A detection rule: ``fn(DetectionInput) -> scores (C,)`` (larger = more suspicious).

    Attributes:
        needs: what the rule reads beyond the paper's QP: ``"nonneg"`` (the ``s >= 0`` QP),
            ``"quantile"`` (per-sample logits; the benchmarks only) or ``"input"`` (the
            input-space verification, which runs the model again).
        threshold: the default threshold on its score.
        summary: one line for the CLI's help and the docs.
    """

    name: str
    fn: Callable[[DetectionInput], np.ndarray]
    needs: frozenset[str] = frozenset()
    threshold: float = 2.0
    summary: str = ""


#: What :func:`hub_backdoor.audit` computes when the chosen rule needs it.
AUDIT_COMPUTES = frozenset({"nonneg", "input", "mask"})

_RULES = [
    Rule("mad", _mad, summary="the paper (arXiv v1): MAD anomaly index of ||s_k||"),
    Rule("mad-nonneg", _mad_nonneg, frozenset({"nonneg"}),
         summary="MAD anomaly index of ||s_k|| with s >= 0 (a trigger switches features on)"),
    Rule("dormant", _dormant, summary="MAD index (high side) of the share of s_k on dimensions clean data "
         "barely uses"),
    Rule("agree", _agree, frozenset({"nonneg"}), summary="both 'mad-nonneg' and 'dormant' flag the class"),
    # candidates of the benchmark's detection study (docs/benchmarks.md)
    Rule("mad-log", _mad_log, summary="MAD on log ||s_k|| (norms are positive and skewed)"),
    Rule("mad-loo", _mad_loo, summary="leave-one-out MAD: the outlier does not inflate its own yardstick"),
    Rule("min-gap", _min_gap, summary="extreme-value test on the smallest norm only"),
    Rule("mad-quantile", _mad_quantile, frozenset({"quantile"}),
         summary="95 % quantile instead of the max in the collapse (benchmarks only)"),
    Rule("agree-mad", _agree_mad, summary="'mad' and 'dormant' flag the same class"),
    Rule("agree-loo", _agree_loo, summary="'mad-loo' and 'dormant' flag the same class"),
    # the input-space rules' thresholds: just above the highest score of the 144 clean models of the
    # standard zoo's three trainings (hub_backdoor/detection/calibration/standard.json; p-values come from the
    # same models)
    Rule("input-ratio", _input_ratio, frozenset({"input"}), threshold=3.18,
         summary="input space: log(median bound of the other classes / bound of k), the bound being the "
         "smallest universal input change that sends 90 % of the reference images to k"),
    Rule("mask-ratio", _mask_ratio, frozenset({"mask"}), threshold=1.31,
         summary="input space: log(median mask of the other classes / mask of k), the mask being the "
         "smallest stamped patch or blend (Neural Cleanse's objective) that sends the images to k"),
    Rule("mask+input", _mask_input, frozenset({"mask", "input"}), threshold=4.12,
         summary="the sum of the 'mask-ratio' and 'input-ratio' scores: a short cut in both searches"),
    Rule("input-gap", _input_gap, frozenset({"input"}), threshold=INPUT_GAP_THRESHOLD,
         summary="input space: log(bound of the runner-up / bound of k) for the class (or two) whose "
         "smallest universal input change stands apart from every other class's"),
    Rule("mask-gap", _mask_gap, frozenset({"mask"}), threshold=MASK_GAP_THRESHOLD,
         summary="as 'input-gap' on the smallest stamped mask (Neural Cleanse's objective)"),
    Rule("latent-or-input", _latent_or_input, frozenset({"input"}), threshold=1.0,
         summary="'agree-mad' or 'input-gap' flags the class: the larger of their scores, each divided "
         "by its threshold"),
]

#: The rule registry: name -> :class:`Rule`.
REGISTRY: dict[str, Rule] = {r.name: r for r in _RULES}

#: name -> fn(DetectionInput) -> scores (C,), for every registered rule.
RULES: dict[str, Callable[[DetectionInput], np.ndarray]] = {n: r.fn for n, r in REGISTRY.items()}

#: Each rule's default threshold on its score.
RULE_THRESHOLDS: dict[str, float] = {n: r.threshold for n, r in REGISTRY.items()}

#: Rules :func:`hub_backdoor.audit` can compute (the CLI offers exactly these).
AUDIT_RULES: tuple[str, ...] = tuple(n for n, r in REGISTRY.items() if r.needs <= AUDIT_COMPUTES)

#: Rules that run the model again (an input-space verification).
NEEDS_INPUT = frozenset(n for n, r in REGISTRY.items() if r.needs & {"input", "mask"})

#: Rules that need the extra s >= 0 reconstruction.
NEEDS_NONNEG = frozenset(n for n, r in REGISTRY.items() if "nonneg" in r.needs)

#: The default, from the standard zoo's leave-one-family-out table (docs/benchmarks.md): the latent
#: rule alone ("agree-mad") finds 15 of 44 working backdoors out of sample, the additive input-space
#: search alone ("input-gap") 20, either of them 28 (3 false alarms in 48 clean models; Neural
#: Cleanse 7), at about Neural Cleanse's cost; at the library thresholds it finds 27 with none.
#: The mask search ("mask-gap") adds hits on the zoo but raised a false alarm on a clean MNIST
#: model of the efficacy tests, so it is not part of it.
#: No rule reaches the goal yet (see the table).
DEFAULT_RULE = "latent-or-input"


def detect(inp: DetectionInput, *, rule: str = DEFAULT_RULE, threshold: float | None = None) -> Detection:
    """Score every class with ``rule`` and flag those above ``threshold`` (default: the rule's)."""
    if rule not in RULES:
        raise ValueError(f"unknown detection rule {rule!r}; choose one of {sorted(RULES)}")
    if threshold is None:
        threshold = RULE_THRESHOLDS[rule]
    scores = np.asarray(RULES[rule](inp), dtype=np.float64)
    order = np.argsort(-scores, kind="stable")
    flagged = [int(k) for k in order if scores[k] > threshold]
    return Detection(rule=rule, threshold=threshold, scores=scores, flagged=flagged)
