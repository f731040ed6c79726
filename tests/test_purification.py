"""Which parameters purification trains (fast; efficacy is in test_efficacy.py)."""

from __future__ import annotations

import dist_worker as w
import pytest
import timm
import torch

from hub_backdoor import purify
from hub_backdoor.adapters import TorchClassifier, load_classifier
from hub_backdoor.errors import HubBackdoorError
from hub_backdoor.purification.purify import head_parameters, trainable_parameters


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


@pytest.mark.parametrize(("arch", "kw", "want"), [
    ("vit_tiny_patch16_224", {"img_size": 32, "patch_size": 8, "depth": 3, "embed_dim": 32, "num_heads": 2},
     {"blocks.2", "norm"}),
    ("mobilenetv3_small_050", {}, {"blocks.4.2", "blocks.5", "conv_head"}),
    ("resnet10t", {}, {"layer4"}),
])
def test_last_stage_is_found_from_the_module_tree(arch, kw, want):
    from hub_backdoor.purification.purify import last_stage_prefixes

    clf = load_classifier(timm.create_model(arch, pretrained=False, num_classes=5, **kw))
    found = set(last_stage_prefixes(clf))
    assert want == found, found
    params = trainable_parameters(clf, "last-stage")
    head = {id(p) for p in head_parameters(clf)}
    backbone = trainable_parameters(clf, "backbone")
    assert params and not head & {id(p) for p in params}
    assert sum(p.numel() for p in params) < sum(p.numel() for p in backbone)


def test_last_stage_of_a_transformers_convnext():
    from transformers import ConvNextConfig, ConvNextForImageClassification

    from hub_backdoor.purification.purify import last_stage_prefixes

    cfg = ConvNextConfig(num_channels=3, hidden_sizes=[8, 16, 32, 64], depths=[1, 1, 2, 1], num_labels=4,
                         image_size=32)
    clf = load_classifier(ConvNextForImageClassification(cfg).eval())
    assert set(last_stage_prefixes(clf)) == {"convnext.encoder.stages.3", "convnext.layernorm"}


def test_warmup_grows_the_latent_shift_then_holds_it():
    from hub_backdoor.purification.purify import warmup_factor

    assert [warmup_factor(e, 10, 0.0) for e in range(3)] == [1.0, 1.0, 1.0]
    grown = [warmup_factor(e, 10, 0.5) for e in range(10)]
    assert grown[:5] == pytest.approx([0.2, 0.4, 0.6, 0.8, 1.0]) and grown[5:] == [1.0] * 5
    with pytest.raises(Exception, match="warmup"):
        purify(TorchClassifier(w.make_model(), head="6"), w.make_data(), target=1, warmup=1.5,
               progress=False)


def test_keep_term_ignores_the_target_logit_and_holds_the_others():
    """``keep`` is a KL to the original over the non-target classes: moving only the target's
    logit costs nothing, reordering the others costs, and ``distill`` sees both."""
    from hub_backdoor.purification.purify import purification_loss

    clf = TorchClassifier(w.make_model(), head="6")
    X, y = w.make_data()
    x, y = X[:16], y[:16]
    with torch.no_grad():
        logits = clf.forward(x)[0]
    s = torch.zeros(clf.embed_dim)

    def extra(teacher: torch.Tensor, **kw: float) -> float:
        base = purification_loss(clf, x, y, s, beta=0.0)[0].detach()
        got = purification_loss(clf, x, y, s, beta=0.0, teacher_logits=teacher, target=3, **kw)[0]
        return float(got.detach() - base)

    lowered = logits.clone()
    lowered[:, 3] -= 5.0  # what the latent term does: the target's logit goes down
    swapped = logits[:, [1, 0, 2, 3, 4, 5, 6, 7, 8, 9]]  # two other classes trade places
    assert abs(extra(lowered, keep=10.0)) < 1e-4
    assert extra(lowered, distill=1.0) > 1e-3
    assert extra(swapped, keep=10.0) > 1e-3
    assert abs(extra(logits, keep=10.0, distill=3.0)) < 1e-4  # the original itself: no cost
    with pytest.raises(Exception, match="keep"):
        purify(clf, (X, y), target=1, keep=-1.0, progress=False)


def test_target_weight_is_a_weighted_mean_of_the_clean_loss():
    """``target_weight`` w weighs the clean CE of the target's own samples w against 1 (a weighted
    mean: w = 1 is the plain mean)."""
    import torch.nn.functional as F

    from hub_backdoor.purification.purify import purification_loss

    clf = TorchClassifier(w.make_model(), head="6")
    X, y = w.make_data()
    x, y = X[:32], y[:32]
    t = int(y[0])
    s = torch.zeros(clf.embed_dim)
    with torch.no_grad():
        ce = F.cross_entropy(clf.forward(x)[0], y, reduction="none")
        plain = purification_loss(clf, x, y, s, beta=0.0, target=t)[1]
        heavy = purification_loss(clf, x, y, s, beta=0.0, target=t, target_weight=4.0)
    on_t = y == t
    assert 0 < int(on_t.sum()) < len(y)
    assert torch.allclose(plain, ce.mean(), atol=1e-6)
    want = (4.0 * ce[on_t].sum() + ce[~on_t].sum()) / (4.0 * on_t.sum() + (~on_t).sum())
    assert torch.allclose(heavy[1], want, atol=1e-6)
    with pytest.raises(Exception, match="target_weight"):
        purify(clf, (X, y), target=1, target_weight=0.0, progress=False)


def _purified(torch_threads: int, **kw):
    """Purify the tiny model with torch set to ``torch_threads``; its weights and params."""
    X, y = w.make_data()
    clf = TorchClassifier(w.make_model(), head="6")
    old = torch.get_num_threads()
    torch.set_num_threads(torch_threads)
    try:
        res = purify(clf, (X, y), target=3, epochs=2, batch_size=16, progress=False, **kw)
        assert torch.get_num_threads() == torch_threads  # the caller's setting is put back
    finally:
        torch.set_num_threads(old)
    return res, res.model.state_dict()


def test_same_seed_and_data_give_identical_weights_at_1_and_2_threads():
    """A CPU backward pass sums weight gradients in an order that depends on the thread count
    (this model's weights differed at 1 and 2 threads before the fine-tuning ran at a fixed count)."""
    from hub_backdoor.outputs.card import _reproduce_note
    from hub_backdoor.outputs.publish import purify_flags

    res1, one = _purified(1)
    res2, two = _purified(2)
    assert one.keys() == two.keys()
    assert all(torch.equal(one[k], two[k]) for k in one), [k for k in one if not torch.equal(one[k], two[k])]
    assert res1.params["threads"] == res2.params["threads"] == 1
    assert res1.params["determinism"] == "cpu-fixed-threads" and res1.params["processes"] == 1
    assert "--threads" not in purify_flags(res1)  # the default count: the command need not name it
    assert "1 thread;" in str(_reproduce_note(res1.params))

    # another count is as repeatable, whatever torch's setting, and the command names it
    res_a, a = _purified(1, threads=2)
    _, b = _purified(2, threads=2)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert res_a.params["threads"] == 2
    flags = purify_flags(res_a)
    assert flags[flags.index("--threads") + 1] == "2"
    with pytest.raises(Exception, match="threads"):
        purify(TorchClassifier(w.make_model(), head="6"), w.make_data(), target=1, threads=0, progress=False)


@pytest.mark.parametrize("adaptive", [False, True])
def test_sam_rho_takes_the_gradient_at_the_perturbed_weights(adaptive):
    """finetune_loop's sharpness-aware step: the update is SGD's with the gradient taken at
    ``w + rho g / ||g||`` (adaptive: ``w + rho |w|^2 g / || |w| g ||``), and the weights are not
    left at the perturbed point."""
    from hub_backdoor.distributed import finetune_loop

    torch.manual_seed(0)
    x, y = torch.randn(8, 3), torch.randint(0, 2, (8,))
    lin = torch.nn.Linear(3, 2)
    w0 = [p.detach().clone() for p in lin.parameters()]
    rho, lr = 0.5, 0.1

    def loss_at(params):
        return torch.nn.functional.cross_entropy(torch.nn.functional.linear(x, *params), y)

    p0 = [t.clone().requires_grad_() for t in w0]
    g = torch.autograd.grad(loss_at(p0), p0)
    T = [t.abs() if adaptive else torch.ones_like(t) for t in w0]
    norm = torch.sqrt(sum(((ti * gi) ** 2).sum() for ti, gi in zip(T, g)))
    p1 = [(t + rho * ti * ti * gi / norm).requires_grad_() for t, ti, gi in zip(w0, T, g)]
    g_sam = torch.autograd.grad(loss_at(p1), p1)
    want = [t - lr * gi for t, gi in zip(w0, g_sam)]

    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=8)
    opt = torch.optim.SGD(lin.parameters(), lr=lr)
    finetune_loop(lambda xb, yb: {"loss": torch.nn.functional.cross_entropy(lin(xb), yb)}, loader, opt,
                  params=list(lin.parameters()), epochs=1, sam_rho=rho, sam_adaptive=adaptive)
    for p, t in zip(lin.parameters(), want):
        torch.testing.assert_close(p.detach(), t, rtol=1e-5, atol=1e-6)
    plain = [t - lr * gi for t, gi in zip(w0, g)]
    assert any(float((p.detach() - t).abs().max()) > 1e-4 for p, t in zip(lin.parameters(), plain))


def test_sam_and_augment_are_options_that_change_the_weights_only_when_set():
    """``sam_rho=0`` and ``augment=False`` are purify's plain loop (the same weights as without the
    options); set, they change the weights, repeatably, and the record names them."""
    res, plain = _purified(1)
    _, off = _purified(1, sam_rho=0.0, augment=False)
    assert all(torch.equal(plain[k], off[k]) for k in plain)
    assert res.params["sam_rho"] == 0.0 and res.params["augment"] is False
    for kw in ({"sam_rho": 0.05}, {"sam_rho": 0.5, "sam_adaptive": True}, {"augment": True}):
        res_on, on = _purified(1, **kw)
        _, again = _purified(1, **kw)
        assert any(not torch.equal(plain[k], on[k]) for k in plain), kw
        assert all(torch.equal(on[k], again[k]) for k in on), kw
        assert all(res_on.params[k] == v for k, v in kw.items())
    with pytest.raises(Exception, match="sam_rho"):
        purify(TorchClassifier(w.make_model(), head="6"), w.make_data(), target=1, sam_rho=-1.0,
               progress=False)


def test_shift_flip_moves_pixels_within_the_padding():
    from hub_backdoor.purification.purify import shift_flip

    x = torch.arange(2 * 1 * 6 * 6, dtype=torch.float32).view(2, 1, 6, 6) + 1
    g = torch.Generator().manual_seed(0)
    outs = [shift_flip(x, g) for _ in range(8)]
    assert all(o.shape == x.shape for o in outs)
    assert any(not torch.equal(o, x) for o in outs)
    for o in outs:  # every pixel kept comes from the same image, 2 pixels away at most (or mirrored)
        for i in range(2):
            kept = o[i][o[i] > 0]
            assert set(kept.tolist()) <= set(x[i].flatten().tolist())
    torch.testing.assert_close(shift_flip(x, torch.Generator().manual_seed(3)),
                               shift_flip(x, torch.Generator().manual_seed(3)))
