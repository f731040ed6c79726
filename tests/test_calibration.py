"""Conformal p-values against the clean calibration models (hub_backdoor.calibration)."""

from __future__ import annotations

import json
import math

import numpy as np

from hub_backdoor.calibration import _DIR, Calibration, load_calibration
from hub_backdoor.detection import AUDIT_RULES, REGISTRY


def test_conformal_p_values_count_the_clean_models_at_least_as_extreme():
    cal = Calibration(rule="r", clean_max=(0.1, 0.5, 0.5, 2.0), families=("a", "b"), source="test")
    p = cal.p_values(np.array([3.0, 2.0, 0.5, -1.0, np.nan]))
    assert p[0] == 1 / 5  # beyond every clean model: the smallest p the calibration can give
    assert p[1] == 2 / 5 and p[2] == 4 / 5 and p[3] == 1.0
    assert math.isnan(p[4])


def test_shipped_calibration_covers_the_audit_rules_and_sets_the_input_thresholds():
    for rule in AUDIT_RULES:
        cal = load_calibration(rule)
        assert cal is not None and cal.n >= 40 and len(cal.families) == 4, rule
    # the input-space rules flag just above the highest clean score of the calibration zoo
    for rule in ("input-ratio", "mask-ratio", "mask+input"):
        cal = load_calibration(rule)
        assert cal is not None
        assert max(cal.clean_max) < REGISTRY[rule].threshold <= max(cal.clean_max) + 0.02, rule
        assert cal.p_values(np.array([REGISTRY[rule].threshold]))[0] == 1 / (cal.n + 1)


def test_shipped_calibration_pools_every_training_of_the_zoo():
    trainings = json.loads((_DIR / "standard.json").read_text())["trainings"]
    assert len(trainings) >= 2 and len({t["key"] for t in trainings}) == len(trainings)
    for rule in AUDIT_RULES:
        cal = load_calibration(rule)
        assert cal is not None
        pooled = sorted(v for t in trainings for v in t["rules"][rule]["clean_max"])
        assert list(cal.clean_max) == pooled
        assert cal.n == sum(len(t["rules"][rule]["clean_max"]) for t in trainings)
