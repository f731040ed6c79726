"""Many trainings as one: models of one architecture stacked with ``torch.func`` and stepped
together by one vmapped forward / backward.

Why: at 32x32 with batches of 64-256 a training step on a GPU is launch-bound (the GPU runs
~0.5 ms of work per kernel it is handed), so the zoo's ~400 trainings and fine-tunes cost kernel
launches, not FLOPs. Stacked, G members cost the launches of one (the convolutions become grouped
convolutions, the linear layers batched matmuls), and the work per launch grows G-fold.

Used for the zoo's training and for the baselines that fine-tune with losses of their own (Neural
Cleanse's unlearning, FST); this project's purification runs through :func:`hub_backdoor.purify`
alone, one model at a time. Each member is mathematically the run :func:`benchmarks.core.train_model`
/ :func:`benchmarks.baselines.unlearn_train` / :func:`benchmarks.baselines.fst_train` would do alone,
up to float rounding (``tests/test_benchmarks.py`` checks it): its own initial weights, data order
(generator seeded with its ``seed``), learning rate and, for Neural Cleanse's unlearning, its own
trigger stamped on a share of each batch. What members must share: the architecture, the number of
steps, the batch size, BatchNorm's mode and the schedule's shape (SGD with momentum, one-cycle; a
member's learning rate scales it).
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.func import functional_call, stack_module_state, vmap

from hub_backdoor.adapters.base import Classifier

from . import core
from .core import autocast, batches, metrics, n_steps


@dataclass
class Member:
    """One training of a group. ``clf`` is trained in place (its weights are written back)."""

    clf: Classifier
    lr: float
    seed: int = 0
    stamp: tuple[torch.Tensor, torch.Tensor, float] | None = None  # (mask, pattern, share): NC unlearning
    X: torch.Tensor | None = None  # (N, ch, H, W) own data (zoo training); None: the group's shared set
    Y: torch.Tensor | None = None
    # FST: (W_0 (C, d), alpha): adds alpha <W, W_0> for the linear head's weight W and scales W
    # back to ||W_0|| after every step (the head is re-initialised before: baselines.fst_member)
    anchor: tuple[torch.Tensor, float] | None = None
    optimizer: str = "sgd"  # the zoo's training only: "sgd" or "adamw" (not stacked)


class _Loss(torch.nn.Module):
    """Cross-entropy (plus FST's anchor term) as a module, so ``functional_call`` can swap in a
    member's weights."""

    def __init__(self, clf: Classifier, head: str | None) -> None:
        super().__init__()
        self.model = clf.model
        self.head = head  # the linear head's module path (FST's anchor term)

    def forward(self, x: torch.Tensor, y: torch.Tensor, anchor: torch.Tensor | None,
                alpha: torch.Tensor | None) -> torch.Tensor:
        loss = F.cross_entropy(self.model(x), y)
        if anchor is not None:
            loss = loss + alpha * (self.model.get_submodule(self.head).weight * anchor).sum()
        return loss


class _Logits(torch.nn.Module):
    def __init__(self, clf: Classifier) -> None:
        super().__init__()
        self.model = clf.model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)


def _stack(models: Sequence[torch.nn.Module]) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    params, bufs = stack_module_state(list(models))
    return {f"model.{k}": v for k, v in params.items()}, {f"model.{k}": v for k, v in bufs.items()}


def fit(members: Sequence[Member], X: torch.Tensor | None, Y: torch.Tensor | None, *, epochs: int, bs: int,
        nesterov: bool = False, stacked: bool = True) -> list[list[float]]:
    """Train every member for ``epochs`` over its data in batches of ``bs`` (remainder joined to
    the last batch, as :func:`benchmarks.core.batches`); SGD (momentum 0.9, Nesterov for the zoo's
    training), one-cycle schedule peaking at each member's ``lr``, weight decay 5e-4; every layer
    trains. ``X (N, ch, H, W)``, ``Y (N,)``: the shared data of members without their own.
    Returns each member's mean loss per epoch (for fine-tunes run unstacked: empty lists).

    ``stacked=False`` runs each member alone with the reference loops (what a stacked run must
    equal; also the way out where ``vmap`` fails on a machine).
    """
    if not stacked or any(m.optimizer != "sgd" for m in members):
        return [_alone(m, X, Y, epochs=epochs, bs=bs, nesterov=nesterov) for m in members]
    momentum, weight_decay = 0.9, 5e-4
    G = len(members)
    data = [(m.X, m.Y) if m.X is not None else (X, Y) for m in members]
    N = len(data[0][0])
    if any(len(x) != N for x, _ in data):
        raise ValueError("members of a group need data of the same size")
    dev = data[0][0].device
    names = [n for n, _ in members[0].clf.model.named_parameters()]
    for m in members[1:]:
        if [n for n, _ in m.clf.model.named_parameters()] != names:
            raise ValueError("members of a group need the same architecture")

    base = _unfused(copy.deepcopy(members[0].clf))  # the structure; its own weights are never used
    anchored = torch.tensor([m.anchor is not None for m in members], device=dev)
    head = head_name(members[0].clf) if bool(anchored.any()) else None
    loss_mod = _Loss(base, head).train()
    params, bufs = _stack([m.clf.model for m in members])
    pkeys = list(params)
    # a member's learning rate as a gradient scale: plain SGD is linear in the gradient, so
    # scaling (g + wd p) by lr_i is SGD at lr_i
    scales = []
    for key in pkeys:
        col = torch.tensor([m.lr for m in members], device=dev)
        scales.append(col.view(G, *([1] * (params[key].dim() - 1))).expand_as(params[key]).contiguous())
    opt = torch.optim.SGD(params.values(), lr=1.0, momentum=momentum, nesterov=nesterov)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=1.0, total_steps=epochs * n_steps(N, bs))

    anchor = alpha = None
    if head is not None:
        w = params[f"model.{head}.weight"]
        anchor = torch.stack([torch.zeros_like(w[0]) if m.anchor is None else m.anchor[0].to(w)
                              for m in members])
        alpha = torch.tensor([0.0 if m.anchor is None else m.anchor[1] for m in members], device=dev)
        norm0 = torch.stack([w[i].detach().norm() if m.anchor is None else m.anchor[0].norm().to(w)
                             for i, m in enumerate(members)])

    def step_loss(p, b, x, y, anchor, alpha):  # noqa: ANN001, ANN202
        return functional_call(loss_mod, (p, b), (x, y, anchor, alpha))

    opt_in = [0 if t is not None else None for t in (anchor, alpha)]
    v_loss = vmap(step_loss, in_dims=(0, 0, 0, 0, *opt_in), randomness="different")
    own_data = any(m.X is not None for m in members)
    seeds = {m.seed for m in members}
    gens = [torch.Generator(device="cpu").manual_seed(m.seed) for m in members]
    torch.manual_seed(members[0].seed)  # as the lone loops do (nothing random in the zoo's models)
    Xs = torch.stack([x for x, _ in data]) if own_data else None  # (G, N, ...)
    Ys = torch.stack([y for _, y in data]) if own_data else None
    ar = torch.arange(G, device=dev)[:, None]
    losses: list[list[float]] = [[] for _ in members]
    for _ in range(epochs):
        if len(seeds) == 1:  # one data order for all (and one gather)
            perm = torch.randperm(N, generator=gens[0]).to(dev)
            for g in gens[1:]:
                torch.randperm(N, generator=g)
            perms = perm.expand(G, N)
        else:
            perms = torch.stack([torch.randperm(N, generator=g) for g in gens]).to(dev)
        tot = torch.zeros(G, device=dev)
        for cols in batches(torch.arange(N), bs):
            idx = perms[:, cols.to(dev)]  # (G, B)
            xb, yb = (Xs[ar, idx], Ys[ar, idx]) if own_data else (X[idx], Y[idx])  # (G, B, ...)
            xb = _stamped(members, xb)
            with autocast(dev):
                loss = v_loss(params, bufs, xb, yb, anchor, alpha)
            opt.zero_grad(set_to_none=True)
            loss.sum().backward()
            grads = [params[k].grad for k in pkeys]
            torch._foreach_add_(grads, [params[k].detach() for k in pkeys], alpha=weight_decay)
            torch._foreach_mul_(grads, scales)
            opt.step()
            sched.step()
            if head is not None:  # FST: the head's norm back to ||W_0|| (others: unchanged)
                with torch.no_grad():
                    w = params[f"model.{head}.weight"]
                    w.mul_(torch.where(anchored, norm0 / w.flatten(1).norm(dim=1), 1.0).view(-1, 1, 1))
            tot += loss.detach().float() * len(cols)
        for i, v in enumerate((tot / N).tolist()):
            losses[i].append(v)
    _write_back(members, params, bufs)
    return losses


def head_name(clf: Classifier) -> str:
    """Module path of the classifier's last ``nn.Linear`` with ``num_classes`` outputs (the head)."""
    names = [n for n, mod in clf.model.named_modules()
             if isinstance(mod, torch.nn.Linear) and mod.out_features == clf.num_classes]
    if not names:
        raise ValueError(f"{type(clf.model).__name__} has no nn.Linear with {clf.num_classes} outputs")
    return names[-1]


def _alone(m: Member, X: torch.Tensor | None, Y: torch.Tensor | None, *, epochs: int, bs: int,
           nesterov: bool) -> list[float]:
    x, y = (m.X, m.Y) if m.X is not None else (X, Y)
    if nesterov:  # the zoo's training
        return core.train_model(m.clf, x, y, epochs=epochs, lr=m.lr, bs=bs, seed=m.seed,
                                optimizer=m.optimizer)
    if m.anchor is not None:
        from .baselines import fst_train

        fst_train(m.clf, x, y, epochs=epochs, lr=m.lr, bs=bs, seed=m.seed, w0=m.anchor[0], alpha=m.anchor[1])
        return []
    from .baselines import unlearn_train

    unlearn_train(m.clf, x, y, epochs=epochs, lr=m.lr, bs=bs, seed=m.seed, stamp=m.stamp)
    return []


def _unfused(clf: Classifier) -> Classifier:
    """timm attention as explicit matmuls: fused SDPA kernels have no vmap batching rule (vmap
    would loop over the members)."""
    for mod in clf.model.modules():
        if hasattr(mod, "fused_attn"):
            mod.fused_attn = False
    return clf


def _stamp(xb: torch.Tensor, mask: torch.Tensor, pattern: torch.Tensor, share: float) -> torch.Tensor:
    """Neural Cleanse unlearning: the reversed trigger on the first ``share`` of ``xb (B, ...)``."""
    k = int(round(share * len(xb)))
    xb = xb.clone()
    xb[:k] = (1 - mask) * xb[:k] + mask * pattern
    return xb


def _stamped(members: Sequence[Member], xb: torch.Tensor) -> torch.Tensor:
    """:func:`_stamp` on each NC member's share of the stacked batch ``xb (G, B, ...)``."""
    if not any(m.stamp for m in members):
        return xb
    return torch.stack([xb[i] if m.stamp is None else _stamp(xb[i], *m.stamp) for i, m in enumerate(members)])


def frozen(clfs: Sequence[Classifier]) -> tuple[Callable[..., torch.Tensor], dict[str, torch.Tensor],
                                                 dict[str, torch.Tensor]]:
    """``(f, params, bufs)`` for the models in eval mode, weights stacked and detached:
    ``f(p, b, x)`` is the logits of the model with weights ``(p, b)``; vmap it over the weights."""
    mod = _Logits(_unfused(copy.deepcopy(clfs[0]))).eval()
    params, bufs = _stack([c.model for c in clfs])
    params = {k: v.detach() for k, v in params.items()}

    def f(p: dict[str, torch.Tensor], b: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
        return functional_call(mod, (p, b), (x,))

    return f, params, bufs


@torch.no_grad()
def predict(clfs: Sequence[Classifier], X: torch.Tensor, bs: int = 512) -> torch.Tensor:
    """Labels of every model for ``X (N, ...)`` in one vmapped pass per batch: ``(G, N)``."""
    f, params, bufs = frozen(clfs)
    fn = vmap(f, in_dims=(0, 0, None))
    out = []
    for i in range(0, len(X), bs):
        with autocast(X.device):
            out.append(fn(params, bufs, X[i : i + bs]).argmax(-1))
    return torch.cat(out, 1)


def evaluate(clfs: Sequence[Classifier], Xte: torch.Tensor, Yte: torch.Tensor, Xtr: torch.Tensor | None,
             Ytr: torch.Tensor | None, target: int | None, stacked: bool = True) -> list[dict[str, float]]:
    """:func:`benchmarks.core.evaluate` of every model, predicted together (``stacked``)."""
    if not stacked:
        return [core.evaluate(c.model, Xte, Yte, Xtr, Ytr, target) for c in clfs]
    preds = {id(X): predict(clfs, X) for X in (Xte, Xtr) if X is not None}
    return [metrics(lambda X, i=i: preds[id(X)][i], Xte, Yte, Xtr, Ytr, target) for i in range(len(clfs))]


@torch.no_grad()
def _write_back(members: Sequence[Member], params: dict[str, torch.Tensor],
                bufs: dict[str, torch.Tensor]) -> None:
    for i, m in enumerate(members):
        model = m.clf.model
        for key, t in params.items():
            model.get_parameter(key[len("model."):]).copy_(t[i])
        for key, t in bufs.items():
            model.get_buffer(key[len("model."):]).copy_(t[i])
        model.eval()
