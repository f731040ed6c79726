"""Baseline defenses on the same models and clean data: plain fine-tuning (FT), Neural Cleanse
(trigger reverse engineering + MAD, then unlearning), FST (feature shift tuning) and CLP (data-free
channel Lipschitz pruning).

* FT: :func:`hub_backdoor.purify` with no latent and no KL term and every layer trained
  (``benchmarks.run.FT``): plain fine-tuning through the same loop, schedule and data order.
* Neural Cleanse (Wang et al., S&P 2019): per class a mask m and pattern p minimising
  ``CE(f((1 - m) x + m p), k) + lambda |m|_1`` (Adam, all classes optimised jointly in one batch);
  lambda is fixed (``2 / (H W)``: a full-image mask costs 2 nats) instead of NC's adaptive schedule.
  The class whose mask L1 norm has MAD anomaly index > 2 (low side) is flagged; unlearning
  fine-tunes on the clean data with 20 % of each batch stamped with the reversed trigger, true
  labels kept. Nothing flagged: the model is returned unchanged (as BackdoorBench does).
* FST (Min et al., NeurIPS 2023, feature shift tuning): the linear head is re-initialised with the
  original weights' norm, and all layers are fine-tuned with ``CE + alpha <W, W_0>`` (alpha = 0.2),
  the head's norm projected back to ``|W_0|`` after each step, so the features must move away from
  the ones the original head read.
* CLP (Zheng et al., ECCV 2022): for every Conv2d followed by a BatchNorm2d (module order, as the
  official code pairs them) the upper bound of each channel's Lipschitz constant is the spectral
  norm of its kernel scaled by |gamma / sigma|; channels above mean + u * std within the layer
  (u = 3) get their BN weight and bias zeroed. Models without conv-BN pairs (ViT): not applicable.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch.func import vmap

from hub_backdoor.adapters.base import Classifier
from hub_backdoor.detection.rules import anomaly_index

from .group import Member, _stamp, frozen, head_name


def nc_reverse(clf: Classifier, X: torch.Tensor, *, steps: int, bs: int, seed: int,
               lr: float = 0.1) -> dict[str, Any]:
    """Reverse-engineer one trigger per class; returns masks, patterns, L1 norms, scores, flag."""
    dev = X.device
    model = clf.model.eval()
    C = clf.num_classes
    ch, H, W = X.shape[1:]
    g = torch.Generator(device="cpu").manual_seed(seed)
    m_raw = torch.zeros(C, 1, H, W, device=dev, requires_grad=True)
    p_raw = (torch.randn(C, ch, H, W, generator=g) * 0.1).to(dev).requires_grad_(True)
    opt = torch.optim.Adam([m_raw, p_raw], lr=lr, betas=(0.5, 0.9))
    for p in model.parameters():
        p.requires_grad_(False)
    for _ in range(steps):
        idx = torch.randint(0, len(X), (bs,), generator=g).to(dev)
        loss = _nc_loss(model, X[idx], m_raw, p_raw)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    for p in model.parameters():
        p.requires_grad_(True)
    return _nc_result(m_raw, p_raw)


def nc_reverse_many(clfs: list[Classifier], X: torch.Tensor, *, steps: int, bs: int, seeds: list[int],
                    lr: float = 0.1, stacked: bool = True) -> list[dict[str, Any]]:
    """:func:`nc_reverse` of models of one architecture, stacked (one vmapped step for all; each
    model keeps its own seed, so its batches and initial patterns are those it would draw alone)."""
    if not stacked or len(clfs) == 1:
        return [nc_reverse(c, X, steps=steps, bs=bs, seed=s, lr=lr) for c, s in zip(clfs, seeds)]
    dev = X.device
    C = clfs[0].num_classes
    ch, H, W = X.shape[1:]
    gens = [torch.Generator(device="cpu").manual_seed(s) for s in seeds]
    m_raw = torch.zeros(len(clfs), C, 1, H, W, device=dev, requires_grad=True)
    p_raw = torch.stack([torch.randn(C, ch, H, W, generator=g) * 0.1 for g in gens]).to(dev)
    p_raw.requires_grad_(True)
    opt = torch.optim.Adam([m_raw, p_raw], lr=lr, betas=(0.5, 0.9))  # elementwise: each model its own
    f, params, bufs = frozen(clfs)

    def loss(p: dict, b: dict, xb: torch.Tensor, m_raw: torch.Tensor, p_raw: torch.Tensor) -> torch.Tensor:
        return _nc_loss(lambda x: f(p, b, x), xb, m_raw, p_raw)

    v_loss = vmap(loss)
    for _ in range(steps):
        idx = torch.stack([torch.randint(0, len(X), (bs,), generator=g) for g in gens]).to(dev)
        total = v_loss(params, bufs, X[idx], m_raw, p_raw).sum()
        opt.zero_grad(set_to_none=True)
        total.backward()
        opt.step()
    return [_nc_result(m_raw[i], p_raw[i]) for i in range(len(clfs))]


def _nc_loss(model: Any, xb: torch.Tensor, m_raw: torch.Tensor, p_raw: torch.Tensor) -> torch.Tensor:
    """Sum over classes of ``CE(f((1 - m) x + m p), k) + lambda |m|_1``; ``xb (B, ch, H, W)``,
    ``m_raw (C, 1, H, W)``, ``p_raw (C, ch, H, W)`` (before sigmoid / tanh)."""
    C, ch, H, W = p_raw.shape
    m, p = torch.sigmoid(m_raw), torch.tanh(p_raw)
    xt = (1 - m[:, None]) * xb[None] + m[:, None] * p[:, None]
    logits = model(xt.reshape(C * len(xb), ch, H, W)).float()
    labels = torch.arange(C, device=xb.device).repeat_interleave(len(xb))
    ce = F.cross_entropy(logits, labels, reduction="none").view(C, len(xb)).mean(1)
    return (ce + 2.0 / (H * W) * m.flatten(1).sum(1)).sum()


@torch.no_grad()
def _nc_result(m_raw: torch.Tensor, p_raw: torch.Tensor) -> dict[str, Any]:
    m, p = torch.sigmoid(m_raw), torch.tanh(p_raw)
    l1 = m.flatten(1).sum(1).cpu().numpy().astype(np.float64)
    scores = anomaly_index(l1)
    k = int(np.argmax(scores))
    return {"masks": m.detach(), "patterns": p.detach(), "l1": l1.tolist(), "scores": scores.tolist(),
            "flagged": k if scores[k] > 2.0 else None}


def nc_unlearn(clf: Classifier, rev: dict[str, Any], *, lr: float, share: float = 0.2) -> Member | None:
    """Neural Cleanse's unlearning as a fine-tune of a :mod:`benchmarks.group`: the reversed
    trigger of the flagged class on the first ``share`` of each batch, labels kept (None when NC
    flagged nothing: the model stays as it is)."""
    t = rev["flagged"]
    if t is None:
        return None
    return Member(clf=clf, lr=lr, stamp=(rev["masks"][t], rev["patterns"][t], share))


def unlearn_train(clf: Classifier, X: torch.Tensor, Y: torch.Tensor, *, epochs: int, lr: float, bs: int,
                  seed: int, stamp: tuple[torch.Tensor, torch.Tensor, float] | None = None) -> Classifier:
    """Neural Cleanse's unlearning alone (the reference loop of a :func:`nc_unlearn` member):
    cross-entropy on the clean data with ``stamp = (mask, pattern, share)`` on the first ``share``
    of each batch, labels kept; SGD (momentum 0.9, wd 5e-4), one-cycle; every layer trains."""
    from .core import autocast, batches, n_steps

    dev = X.device
    torch.manual_seed(seed)
    model = clf.model
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, weight_decay=5e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=epochs * n_steps(len(X), bs))
    g = torch.Generator(device="cpu").manual_seed(seed)
    for _ in range(epochs):
        model.train()
        for idx in batches(torch.randperm(len(X), generator=g).to(dev), bs):
            xb = X[idx] if stamp is None else _stamp(X[idx], *stamp)
            with autocast(dev):
                loss = F.cross_entropy(model(xb), Y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
    model.eval()
    return clf


def fst_member(clf: Classifier, *, lr: float, alpha: float = 0.2, seed: int = 0) -> Member:
    """FST as a fine-tune of a :mod:`benchmarks.group`: re-initialises ``clf``'s linear head in
    place at the original weight's norm and returns the member that trains every layer with
    ``CE + alpha <W, W_0>``, the head's norm projected back after each step."""
    head = clf.model.get_submodule(head_name(clf))
    w0 = head.weight.detach().clone()
    torch.manual_seed(seed)
    with torch.no_grad():
        head.reset_parameters()
        head.weight.mul_(w0.norm() / head.weight.norm())
    return Member(clf=clf, lr=lr, seed=seed, anchor=(w0, alpha))


def fst_train(clf: Classifier, X: torch.Tensor, Y: torch.Tensor, *, epochs: int, lr: float, bs: int,
              seed: int, w0: torch.Tensor, alpha: float) -> Classifier:
    """FST's fine-tune of a head re-initialised by :func:`fst_member`, alone (the reference loop)."""
    from .core import autocast, batches, n_steps

    dev = X.device
    torch.manual_seed(seed)
    model = clf.model
    head = model.get_submodule(head_name(clf))
    w0 = w0.to(dev)
    norm0 = w0.norm()
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, weight_decay=5e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=epochs * n_steps(len(X), bs))
    g = torch.Generator(device="cpu").manual_seed(seed)
    for _ in range(epochs):
        model.train()
        for idx in batches(torch.randperm(len(X), generator=g).to(dev), bs):
            with autocast(dev):
                loss = F.cross_entropy(model(X[idx]), Y[idx])
            loss = loss + alpha * (head.weight * w0).sum()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            with torch.no_grad():
                head.weight.mul_(norm0 / head.weight.norm())
    model.eval()
    return clf


@torch.no_grad()
def clp(clf: Classifier, u: float = 3.0) -> tuple[Classifier, int]:
    """Prune in place; returns (classifier, number of channels pruned); 0 pairs -> (clf, -1)."""
    conv = None
    pruned = pairs = 0
    for m in clf.model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            if conv is None or conv.out_channels != m.num_features or m.running_var is None:
                continue
            pairs += 1
            scale = (m.weight if m.weight is not None else torch.ones_like(m.running_var)).abs()
            scale = scale / m.running_var.add(m.eps).sqrt()
            w = conv.weight.flatten(2) * scale[:, None, None]  # (out, in, kh*kw)
            lips = torch.linalg.matrix_norm(w.float(), ord=2)
            idx = lips > lips.mean() + u * lips.std()
            if m.weight is not None:
                m.weight[idx] = 0.0
            if m.bias is not None:
                m.bias[idx] = 0.0
            pruned += int(idx.sum())
        elif isinstance(m, torch.nn.Conv2d):
            conv = m
    return clf, pruned if pairs else -1


@torch.no_grad()
def erase_direction(clf: Classifier, s_t: np.ndarray, X: torch.Tensor) -> Classifier:
    """A reference point, not a defense: the linear head made blind to the direction u of s_t
    (``W <- W (I - u u^T)``, the bias taking ``W u (u . mean h)`` so the clean mean's logits stay),
    no training. It shows how much of a backdoor, and of clean accuracy, lives along u alone."""
    lin = clf.model.get_submodule(head_name(clf))
    u = torch.as_tensor(s_t, dtype=torch.float32, device=X.device)
    u = u / u.norm().clamp_min(1e-12)
    mu = torch.cat([clf.forward(X[i : i + 256])[1].float() for i in range(0, len(X), 256)]).mean(0)
    Wu = lin.weight @ u  # (C,)
    lin.weight.sub_(torch.outer(Wu, u))
    lin.bias.add_(Wu * (u @ mu))
    return clf
