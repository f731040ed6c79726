"""Neuron-noise evidence on a real backdoor: a tiny timm ResNet trained here on scikit-learn's
digits with a BadNets patch sends the first errors under adversarial neuron noise to its target
more than to any other class, and a clean twin's most suspicious class scores lower."""

import numpy as np
import pytest
import torch

from hub_backdoor import zoo
from hub_backdoor.detection.neuron import neuron_layers, neuron_scores
from hub_backdoor.detection.verification import reference_inputs
from hub_backdoor.sources.reference import ReferenceData

TARGET = 3
SIZE = 16


@pytest.fixture(scope="module")
def trained():
    torch.set_num_threads(1)
    ds = zoo.digits(size=SIZE)
    poisoned = zoo.poison(ds["train"], zoo.BadNets(), target=TARGET, rate=0.1, seed=0)
    out = {}
    for kind, train_set in (("backdoored", poisoned), ("clean", ds["train"])):
        clf = zoo.timm_model("test_resnet", size=SIZE, seed=0)
        zoo.train(clf, train_set, epochs=6, lr=0.05, seed=0)
        out[kind] = clf
    x, y = reference_inputs(ReferenceData(ds["test"]), out["clean"].preprocess, n_images=100, seed=0,
                            device=torch.device("cpu"))
    asr, _ = zoo.attack_success(out["backdoored"], ds["test"], zoo.BadNets(), target=TARGET)
    return out, x, y, asr


def test_layers_exclude_the_head(trained):
    models, *_ = trained
    clf = models["clean"]
    names = [n for n, _, _ in neuron_layers(clf)]
    assert names and not any(n.startswith(clf.head_paths[0]) for n in names)


def test_first_errors_go_to_the_target(trained):
    models, x, y, asr = trained
    assert asr > 0.8  # otherwise the test proves nothing
    bd = neuron_scores(models["backdoored"], x, y)
    clean = neuron_scores(models["clean"], x, y)
    assert int(np.argmax(bd.scores)) == TARGET, bd.scores
    assert float(clean.scores.max()) < float(bd.scores[TARGET]), (clean.scores, bd.scores)
    assert bd.layers > 0 and bd.seconds > 0 and abs(bd.scores.sum() - 1) < 1e-9


def test_targeted_search_runs_every_class(trained):
    models, x, y, _ = trained
    r = neuron_scores(models["backdoored"], x, y, targeted=True, n_targeted=10, steps=4, inner=1)
    assert r.flip_curve.shape == (10, 4) and np.isfinite(r.bounds).all()
