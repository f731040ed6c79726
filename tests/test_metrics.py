"""The backdoor metrics of :mod:`hub_backdoor.purification.metrics`: ``evaluate`` modules loaded by
path, offline."""

from __future__ import annotations

import socket

import numpy as np
import pytest

from hub_backdoor.purification import metrics
from hub_backdoor.purification.purify import _metric


@pytest.fixture(scope="module")
def asr():
    return metrics.load("attack_success_rate", keep_in_memory=True)


@pytest.fixture(scope="module")
def ra():
    return metrics.load("robust_accuracy", keep_in_memory=True)


@pytest.fixture(scope="module")
def der():
    return metrics.load("defense_effectiveness_rating", keep_in_memory=True)


def test_attack_success_rate_on_known_arrays(asr):
    # references 0, 1, 1 are outside the target 3; predictions 3, 3, 1: two of three hit the target
    out = asr.compute(predictions=[3, 3, 1, 3], references=[0, 1, 1, 3], target=3)
    assert out == {"attack_success_rate": 2 / 3}
    # target-class images never count, whatever they are predicted as
    assert asr.compute(predictions=[0, 0], references=[3, 1], target=3)["attack_success_rate"] == 0.0
    assert asr.compute(predictions=[2, 2, 2], references=[0, 1, 4], target=2)["attack_success_rate"] == 1.0
    # no reference outside the target: 0.0, as purification has always reported it
    assert asr.compute(predictions=[1, 1], references=[1, 1], target=1)["attack_success_rate"] == 0.0


def test_robust_accuracy_on_known_arrays(ra):
    out = ra.compute(predictions=[3, 3, 1, 3], references=[0, 1, 1, 3], target=3)
    assert out == {"robust_accuracy": 1 / 3}
    assert ra.compute(predictions=[0, 1, 5], references=[0, 1, 5], target=9)["robust_accuracy"] == 1.0
    assert ra.compute(predictions=[2, 2], references=[2, 2], target=2)["robust_accuracy"] == 0.0


def test_defense_effectiveness_rating_on_known_values(der):
    def one(a0: float, a1: float, c0: float, c1: float) -> float:
        out = der.compute(asr_before=[a0], asr_after=[a1], acc_before=[c0], acc_after=[c1])
        return out["defense_effectiveness_rating"]

    assert one(1.0, 0.0, 0.9, 0.9) == 1.0  # attack removed at no cost
    assert one(0.5, 0.5, 0.9, 0.9) == 0.5  # nothing changed
    assert one(1.0, 0.0, 0.9, 0.7) == pytest.approx(0.9)  # (1 - 0.2 + 1) / 2
    assert one(0.2, 0.6, 0.8, 0.9) == 0.5  # a higher ASR or accuracy after is clipped at 0
    assert one(0.0, 0.0, 1.0, 0.0) == 0.0  # all accuracy lost, nothing gained
    rows = der.compute(
        asr_before=[1.0, 0.5], asr_after=[0.0, 0.5], acc_before=[0.9, 0.9], acc_after=[0.9, 0.9]
    )
    assert rows["defense_effectiveness_rating"] == 0.75  # the mean over defended models


def test_metrics_equal_the_direct_computation():
    """Purification's ASR / RA through the metrics are the numbers it computed by hand before."""
    rng = np.random.default_rng(0)
    for trial in range(20):
        n, classes = int(rng.integers(0, 200)), int(rng.integers(2, 12))
        y, p = rng.integers(0, classes, n), rng.integers(0, classes, n)
        target = int(rng.integers(0, classes))
        keep = y != target
        m = int(keep.sum())
        hits, right = int((p[keep] == target).sum()), int((p[keep] == y[keep]).sum())
        assert _metric("attack_success_rate", p, y, target) == hits / max(m, 1), trial
        assert _metric("robust_accuracy", p, y, target) == right / max(m, 1), trial


def test_load_is_offline_and_by_path(monkeypatch):
    """``load`` reads the module file inside the package: no Hub lookup, no socket opened."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    tried: list[object] = []

    def refuse(*args: object, **kwargs: object) -> None:
        tried.append(args)
        raise OSError("network access in an offline test")

    monkeypatch.setattr(socket.socket, "connect", lambda self, addr: refuse(addr))
    monkeypatch.setattr(socket, "create_connection", refuse)
    for name in metrics.METRICS:
        path = metrics.module_path(name)
        assert path.is_file() and path.parent.parent == metrics.module_path(metrics.METRICS[0]).parent.parent
        module = metrics.load(name, keep_in_memory=True)
        assert module.name == name and "BackdoorBench" in module.citation and module.description
    assert tried == []
    with pytest.raises(ValueError, match="unknown metric"):
        metrics.module_path("accuracy")
