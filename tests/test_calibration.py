"""Conformal p-values against the clean calibration models (hub_backdoor.detection.calibration)."""

from __future__ import annotations

import json
import math

import numpy as np

from hub_backdoor.detection.calibration import CALIBRATION_DIR, Calibration, load_calibration
from hub_backdoor.detection.rules import AUDIT_RULES, REGISTRY


def test_conformal_p_values_count_the_clean_models_at_least_as_extreme():
    cal = Calibration(rule="r", clean_max=(0.1, 0.5, 0.5, 2.0), families=("a", "b"), source="test")
    p = cal.p_values(np.array([3.0, 2.0, 0.5, -1.0, np.nan]))
    assert p[0] == 1 / 5  # beyond every clean model: the smallest p the calibration can give
    assert p[1] == 2 / 5 and p[2] == 4 / 5 and p[3] == 1.0
    assert math.isnan(p[4])


def test_shipped_calibration_covers_the_audit_rules_and_sets_the_input_thresholds():
    for rule in AUDIT_RULES:
        cal = load_calibration(rule)
        # the zoo's four 10-class families and its 100-class one
        assert cal is not None and cal.n >= 40 and len(cal.families) == 5, rule
    # the input-space rules flag just above the highest clean score of the calibration zoo
    for rule in ("input-ratio", "mask-ratio", "mask+input"):
        cal = load_calibration(rule)
        assert cal is not None
        assert max(cal.clean_max) < REGISTRY[rule].threshold <= max(cal.clean_max) + 0.02, rule
        assert cal.p_values(np.array([REGISTRY[rule].threshold]))[0] == 1 / (cal.n + 1)


def test_shipped_calibration_pools_every_training_of_the_zoo():
    trainings = json.loads((CALIBRATION_DIR / "standard.json").read_text())["trainings"]
    assert len(trainings) >= 2 and len({t["key"] for t in trainings}) == len(trainings)
    for rule in AUDIT_RULES:
        cal = load_calibration(rule)
        assert cal is not None
        pooled = sorted(v for t in trainings for v in t["rules"][rule]["clean_max"])
        assert list(cal.clean_max) == pooled
        assert cal.n == sum(len(t["rules"][rule]["clean_max"]) for t in trainings)


def test_the_shipped_miss_rate_is_the_benchmark_table_s():
    # the figure a clean verdict carries is the one the detection table reports, per rule
    from hub_backdoor.detection.rules import DEFAULT_RULE

    table = json.loads((CALIBRATION_DIR.parents[2] / "benchmarks" / "results" / "standard.json").read_text())
    rows = table["summary"]["detection_standard"]["rules"]
    for rule in AUDIT_RULES:
        det = load_calibration(rule).detection
        assert det is not None and det["threshold"] == REGISTRY[rule].threshold
        assert (det["found"], det["working"]) == (rows[rule]["tp"], rows[rule]["n_working"]), rule
        assert sum(f for f, _ in det["by_attack"].values()) == det["found"]
    default = load_calibration(DEFAULT_RULE).detection
    assert default["found"] < default["working"]


def test_a_clean_card_says_how_often_the_audit_misses():
    from types import SimpleNamespace

    from hub_backdoor.outputs.card import _miss_rate

    det = load_calibration("latent-or-input").detection
    report = SimpleNamespace(evidence={"calibration": {"detection": det}},
                             params={"threshold": det["threshold"]})
    text = _miss_rate(report)
    assert f"{det['found']} of {det['working']}" in text and "not proof" in text
    worst = min(det["by_attack"], key=lambda a: det["by_attack"][a][0] / det["by_attack"][a][1])
    assert worst in text
    report.params["threshold"] = det["threshold"] + 1  # another setting: no borrowed figure
    assert "has not been measured" in _miss_rate(report)
