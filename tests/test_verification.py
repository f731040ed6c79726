"""The input-space verifications leave the model as they found it and return one result per class."""

from __future__ import annotations

import numpy as np
import torch

from hub_backdoor.adapters import TorchClassifier
from hub_backdoor.verification import bound_ratio_scores, verify_input_space, verify_mask


def _tiny() -> TorchClassifier:
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.ReLU(),
                              torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(8, 10))
    return TorchClassifier(net, head="4")


def test_searches_restore_the_model_and_cover_every_class():
    clf = _tiny()
    x, y = torch.randn(60, 3, 16, 16), torch.arange(60) % 10
    clf.model.train()
    before = {k: v.clone() for k, v in clf.model.state_dict().items()}
    add = verify_input_space(clf, x, y, n_images=20, steps=4)
    mask = verify_mask(clf, x, y, steps=3, batch=4)
    assert clf.model.training and all(p.requires_grad for p in clf.model.parameters())
    assert all(torch.equal(v, before[k]) for k, v in clf.model.state_dict().items())
    assert add.bounds.shape == mask.mask_l1.shape == (10,) and mask.pixels == 256
    assert np.all((mask.mask_l1 >= 0) & (mask.mask_l1 <= 256))
    assert np.all(add.bounds[~add.reached] == 2 * add.eps[-1])  # censored: "more than the largest bound"


def test_log_ratio_scores_are_scale_free():
    b = np.array([1.0, 2.0, 2.0, 4.0])
    s = bound_ratio_scores(b)
    assert np.allclose(bound_ratio_scores(10 * b), s)
    assert s[0] == np.log(2.0) and int(np.argmax(s)) == 0
