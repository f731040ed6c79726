"""Which parameters purification trains (fast; efficacy is in test_efficacy.py)."""

from __future__ import annotations

import dist_worker as w
import pytest
import timm
import torch

from hub_backdoor import purify
from hub_backdoor.adapters import TorchClassifier, load_classifier
from hub_backdoor.errors import HubBackdoorError
from hub_backdoor.purification import head_parameters, trainable_parameters


def _run(train):
    X, y = w.make_data()
    clf = TorchClassifier(w.make_model(), head="6")
    res = purify(clf, (X, y), target=3, epochs=2, batch_size=16, train=train, progress=False)
    before = dict(clf.model.named_parameters())
    return {n: not torch.equal(p, before[n]) for n, p in res.model.named_parameters()}


def test_default_freezes_the_linear_head():
    changed = _run("backbone")
    assert not changed["6.weight"] and not changed["6.bias"]
    assert changed["0.weight"] and changed["4.weight"]  # the backbone moved
    assert all(_run("all").values())


def test_head_parameters_follow_the_head_not_the_names():
    # timm deit distilled: the head is the mean of two Linear heads; a BN+Linear head is folded
    clf = load_classifier(timm.create_model("deit_tiny_distilled_patch16_224", pretrained=False,
                                            num_classes=5, img_size=32, patch_size=8))
    names = {n for n, p in clf.model.named_parameters() if any(p is q for q in head_parameters(clf))}
    assert names == {"head.weight", "head.bias", "head_dist.weight", "head_dist.bias"}
    rest = trainable_parameters(clf, "backbone")
    assert len(rest) + len(names) == len(list(clf.model.parameters()))
    with pytest.raises(HubBackdoorError, match="matches no parameter"):
        trainable_parameters(clf, ["no_such_layer"])
