"""The guarded model: the original's answer unless it is the target, then the purified model's."""

import pytest
import torch
from torch import nn

from hub_backdoor import GuardedModel, HubBackdoorError, load_classifier, load_guarded
from hub_backdoor.purification.guard import guarded_logits


def test_rows_come_from_the_purified_model_only_where_the_original_predicts_the_target():
    orig = torch.tensor([[0.0, 5.0, 1.0], [3.0, 0.0, 1.0], [0.0, 1.0, 4.0]])
    pur = torch.tensor([[2.0, 0.0, 1.0], [0.0, 9.0, 1.0], [1.0, 0.0, 0.0]])
    out = guarded_logits(orig, pur, target=1)
    assert torch.equal(out[0], pur[0])  # the original said 1: the purified model decides
    assert torch.equal(out[1:], orig[1:])  # elsewhere the original's answer stands, even where
    # the purified model would have said the target itself
    with pytest.raises(ValueError, match="different shapes"):
        guarded_logits(orig, pur[:, :2], target=1)


def _linear(weight: torch.Tensor) -> nn.Module:
    m = nn.Sequential(nn.Flatten(), nn.Linear(weight.shape[1], weight.shape[0]))
    with torch.no_grad():
        m[1].weight.copy_(weight)
        m[1].bias.zero_()
    return m


def test_guarded_model_runs_both_networks_and_checks_what_it_is_given(tmp_path):
    torch.manual_seed(0)
    a, b = _linear(torch.randn(4, 6)), _linear(torch.randn(4, 6))
    orig, pur = load_classifier(a, head="1"), load_classifier(b, head="1")
    g = GuardedModel(orig, pur, target=2)
    x = torch.randn(50, 6)
    with torch.no_grad():
        pa, pb = a(x).argmax(1), b(x).argmax(1)
    assert (pa == 2).any() and (pa != 2).any()
    assert torch.equal(g.predict(x), torch.where(pa == 2, pb, pa))
    assert {id(p) for p in g.parameters()} == {id(p) for p in [*a.parameters(), *b.parameters()]}
    with pytest.raises(HubBackdoorError, match="not a class"):
        GuardedModel(orig, pur, target=4)
    with pytest.raises(HubBackdoorError, match="3 classes and the original 4"):
        GuardedModel(orig, load_classifier(_linear(torch.randn(3, 6)), head="1"), target=0)
    with pytest.raises(HubBackdoorError, match="original= and target= are required"):
        load_guarded(pur)
