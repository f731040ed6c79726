"""The input-space verifications leave the model as they found it and return one result per class."""

from __future__ import annotations

import numpy as np
import torch

from hub_backdoor.adapters import TorchClassifier
from hub_backdoor.detection.rules import bound_ratio_scores, separation_scores
from hub_backdoor.detection.verification import verify_input_space, verify_mask


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


def test_gap_scores_the_class_that_stands_apart_and_nothing_else():
    b = np.array([4.0, 1.0, 5.0, 4.5, 6.0])
    s = separation_scores(b)
    assert np.isclose(s[1], np.log(4.0)) and np.count_nonzero(s) == 1
    assert np.allclose(separation_scores(7 * b), s)  # scale-free, as the bounds' units vary
    # two targets set apart together both score the gap above them; the runner-up inside the pair
    # does not lower it
    two = separation_scores(np.array([1.0, 1.2, 6.0, 7.0, 8.0]))
    assert np.isclose(two[0], np.log(5.0)) and np.isclose(two[1], np.log(5.0)) and two[2:].max() == 0
    # inside the set the shorter cut ranks first, whatever its index
    pair = separation_scores(np.array([20.0, 3.0, 25.0, 2.5, 30.0]))
    assert np.argmax(pair) == 3 and pair[3] > pair[1] > 0 and np.isclose(pair[1], np.log(20.0 / 3.0))
    # a clean-looking model: every gap is small
    assert separation_scores(np.array([4.0, 4.2, 4.4, 4.1])).max() < 0.1
    # classes that were not verified neither score nor count as the runner-up
    part = separation_scores(np.array([np.nan, 1.0, 3.0, np.nan]))
    assert np.isneginf(part[[0, 3]]).all() and np.isclose(part[1], np.log(3.0))
    assert np.isneginf(separation_scores(np.array([np.nan, 2.0]))).all()


def test_latent_or_input_flags_what_either_part_flags():
    from hub_backdoor.detection.rules import REGISTRY, DetectionInput, detect

    rng = np.random.default_rng(0)
    norms = np.array([10.0, 10.5, 9.8, 10.2, 10.1, 9.9, 10.3, 10.4, 9.7, 10.0])
    perts = rng.normal(size=(10, 16))
    h_std = np.ones(16)
    bounds = np.full(10, 4.0) + rng.uniform(0, 0.3, 10)
    bounds[6] = 1.0  # input space: class 6 is a short cut; the latent norms single nothing out
    inp = DetectionInput(norms=norms, perturbations=perts, h_std=h_std, input_bounds=bounds)
    det = detect(inp, rule="latent-or-input")
    assert det.flagged == [6]
    assert np.isclose(det.scores[6], np.log(bounds[bounds != 1.0].min()) / REGISTRY["input-gap"].threshold)
    assert detect(inp, rule="agree-mad").flagged == []
    # and with no short cut in input space, nothing is flagged
    inp.input_bounds = np.full(10, 4.0) + rng.uniform(0, 0.3, 10)
    assert detect(inp, rule="latent-or-input").flagged == []


def test_many_classes_search_only_the_latent_screens_candidates():
    from hub_backdoor import audit
    from hub_backdoor.detection.audit import VERIFY_ALL_UP_TO, VERIFY_TOP, screened_classes

    rng = np.random.default_rng(0)
    assert screened_classes(rng.uniform(5, 6, 10), rng.normal(size=(10, 8)), np.ones(8)) is None
    norms = rng.uniform(5, 6, 50)
    norms[[7, 31]] = 1.0  # the two classes the latent screen must keep
    picked = screened_classes(norms, rng.normal(size=(50, 8)), np.ones(8))
    assert picked is not None and len(picked) == VERIFY_TOP and {7, 31} <= set(picked)
    # the audit searches exactly those in input space; the others have no input-space evidence
    C = VERIFY_ALL_UP_TO + 8
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 64, 3, padding=1), torch.nn.ReLU(),
                              torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(64, C))
    x, y = torch.rand(8 * C, 3, 8, 8), torch.arange(8 * C) % C
    report = audit(TorchClassifier(net, head="4"), (x, y), rule="input-gap", progress=False,
                   min_reference_accuracy=0.0)
    searched = [r.index for r in report.classes if r.input_bound is not None]
    assert len(searched) == VERIFY_TOP and len(report.classes) == C
    # the search's images are the option's count, not one per class: its cost must not grow with C
    small = audit(TorchClassifier(net, head="4"), (x, y), rule="input-gap", progress=False,
                  min_reference_accuracy=0.0, verify_images=12)
    stage = next(st for st in small.evidence["stages"] if st["stage"] == "additive verification")
    assert stage["images"] == 12


def test_the_search_leaves_a_conv_models_parameters_as_they_were():
    # the search runs convolutions channels-last on a CPU; the model's own layout comes back
    torch.manual_seed(0)
    # a 1x1 kernel is "contiguous" in both layouts: its strides must come back too
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.Conv2d(8, 8, 1), torch.nn.ReLU(),
                              torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(8, 4))
    before = [p.detach().clone() for p in net.parameters()]
    strides = [p.stride() for p in net.parameters()]
    clf = TorchClassifier(net, head="5")
    ver = verify_input_space(clf, torch.randn(40, 3, 8, 8), torch.arange(40) % 4, n_images=20)
    assert len(ver.bounds) == 4
    assert all(torch.equal(a, b) for a, b in zip(before, net.parameters()))
    assert [p.stride() for p in net.parameters()] == strides
