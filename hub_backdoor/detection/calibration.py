"""Calibrated per-class p-values: a rule's score against clean reference models.

A score alone ("log-ratio 1.4") means little to a reader. What it means is how often a *clean*
model reaches it. The benchmark's standard zoo holds clean models of several families (plain
torch, timm ViT and MobileNetV3, a transformers ConvNeXt fine-tuned from a shared backbone); for
each rule, the highest class score of each clean model is shipped in ``calibration/<name>.json``
(written by ``python -m benchmarks.rescore --write-calibration``), one entry per training of the
zoo; the null pools them, so it holds the variation between trainings as well as between seeds.
The conformal p-value of a class score s is

    p = (1 + #{clean models whose highest score >= s}) / (n + 1),

the chance that a clean model of the calibration zoo has a class at least this extreme. It is
valid for a new model to the extent that the zoo's clean models are exchangeable with it; the
benchmark checks that it holds on a family the calibration never saw (leave-one-family-out). A
model with a class count no calibration model has is outside it (:meth:`Calibration.covers`): the
score's null depends on how many classes compete (the largest of C anomaly indices grows with C),
so its p-values are not reported and an audit that flags nothing is inconclusive, not clean.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np

__all__ = ["CALIBRATION_DIR", "Calibration", "load_calibration", "p_values"]

#: The folder of the shipped calibration files (``<name>.json``).
CALIBRATION_DIR = Path(__file__).resolve().parent / "calibration"
DEFAULT = "standard"


@dataclass(frozen=True)
class Calibration:
    """The clean-model null of one rule.

    Attributes:
        rule: the detection rule.
        clean_max: each clean calibration model's highest class score, sorted.
        families: the model families the clean models come from.
        source: where the numbers come from (the zoo and its data).
        num_classes: the class counts of the clean models (empty: not recorded).
        detection: how often the rule, at its own threshold, names the class of the zoo's working
            backdoors: ``{"found", "working", "by_attack": {attack: [found, working]}, "source"}``
            (None: not measured). A clean verdict misses the rest.
    """

    rule: str
    clean_max: tuple[float, ...]
    families: tuple[str, ...]
    source: str
    num_classes: tuple[int, ...] = ()
    detection: dict | None = None

    @property
    def n(self) -> int:
        return len(self.clean_max)

    def covers(self, num_classes: int) -> bool:
        """Whether a model with this many classes lies within the calibration: between the
        fewest and the most classes of its clean models."""
        return bool(self.num_classes) and min(self.num_classes) <= num_classes <= max(self.num_classes)

    def coverage(self) -> str:
        """What the calibration covers, in words."""
        lo, hi = (min(self.num_classes), max(self.num_classes)) if self.num_classes else (0, 0)
        counts = f"{lo}" if lo == hi else f"{lo}-{hi}"
        return f"{self.n} clean models of {counts} classes ({', '.join(self.families)})"

    def p_values(self, scores: np.ndarray) -> np.ndarray:
        """``(C,)`` conformal p-values of ``scores (C,)`` (``nan`` scores give ``nan``)."""
        null = np.asarray(self.clean_max, dtype=np.float64)
        s = np.asarray(scores, dtype=np.float64)
        out = np.full(s.shape, np.nan)
        ok = np.isfinite(s) | np.isneginf(s)
        out[ok] = (1 + (null[None, :] >= s[ok, None]).sum(1)) / (len(null) + 1)
        return out


@lru_cache(maxsize=8)
def _read(name: str) -> dict:
    path = CALIBRATION_DIR / f"{name}.json"
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def load_calibration(rule: str, name: str = DEFAULT) -> Calibration | None:
    """The shipped calibration of ``rule``, pooled over the trainings the file holds (None when
    the rule has none)."""
    d = _read(name)
    held = [t for t in d.get("trainings", []) if rule in t.get("rules", {})]
    parts = [t["rules"][rule] for t in held]
    if not parts:
        return None
    return Calibration(rule=rule, clean_max=tuple(sorted(float(v) for p in parts for v in p["clean_max"])),
                       families=tuple(sorted({f for p in parts for f in p.get("families", ())})),
                       source=str(d.get("source", name)),
                       num_classes=tuple(sorted({int(c) for t in held for c in t.get("num_classes", ())})),
                       detection=_detection(d, rule))


def _detection(d: dict, rule: str) -> dict | None:
    measured = (d.get("detection") or {}).get("rules", {}).get(rule)
    if not measured or not measured.get("working"):
        return None
    return {**measured, "source": d["detection"].get("source", "")}


def p_values(rule: str, scores: np.ndarray, name: str = DEFAULT) -> np.ndarray | None:
    """Per-class conformal p-values of ``scores`` under ``rule``'s calibration, or None."""
    cal = load_calibration(rule, name)
    return None if cal is None else cal.p_values(scores)
