"""Tensor-level training of the zoo, evaluation and the audit (timed by stage); the purification
runs through :func:`hub_backdoor.purify`. Data live on the run's device as float tensors
(uint8 -> [-1, 1]); on CUDA training and evaluation run under bf16 autocast, the audit's reference
pass in float32 (the QP needs exact logits)."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from hub_backdoor.adapters.base import Classifier
from hub_backdoor.detection.reconstruction import ConstraintState, reconstruct
from hub_backdoor.detection.rules import NEEDS_NONNEG, DetectionInput, dormant_share
from hub_backdoor.purification.guard import guarded_logits


def to_tensor(x: np.ndarray, device: torch.device) -> torch.Tensor:
    t = torch.as_tensor(x, device=device).float().div_(127.5).sub_(1.0)
    return t[:, None] if t.dim() == 3 else t.permute(0, 3, 1, 2).contiguous()


def autocast(device: torch.device, enabled: bool = True) -> Any:
    if enabled and device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def batches(perm: torch.Tensor, bs: int) -> list[torch.Tensor]:
    """Split a permutation into batches of ``bs``; the remainder joins the last batch (a batch of
    a few samples destabilises fine-tuning on a small clean set)."""
    steps = max(1, len(perm) // bs)
    return [perm[i * bs : (i + 1) * bs if i < steps - 1 else len(perm)] for i in range(steps)]


def n_steps(n: int, bs: int) -> int:
    return max(1, n // bs)


def train_model(clf: Classifier, X: torch.Tensor, Y: torch.Tensor, *, epochs: int, lr: float, bs: int,
                seed: int, optimizer: str = "sgd") -> list[float]:
    """SGD (Nesterov, momentum 0.9, wd 5e-4) with a one-cycle schedule, as ``zoo.train``;
    ``optimizer="adamw"`` (wd 0.05) for the families that train poorly with SGD (ViT, ConvNeXt)."""
    dev = X.device
    torch.manual_seed(seed)
    model = clf.model
    if optimizer == "adamw":
        opt: torch.optim.Optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.05)
    else:
        opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, weight_decay=5e-4, nesterov=True)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=epochs * n_steps(len(X), bs))
    g = torch.Generator(device="cpu").manual_seed(seed)
    losses = []
    model.train()
    for _ in range(epochs):
        perm = torch.randperm(len(X), generator=g).to(dev)
        tot = torch.zeros((), device=dev)
        for idx in batches(perm, bs):
            with autocast(dev):
                loss = F.cross_entropy(model(X[idx]), Y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            tot += loss.detach() * len(idx)
        losses.append(float(tot) / len(X))
    model.eval()
    return losses


@torch.no_grad()
def predict(model: torch.nn.Module, X: torch.Tensor, bs: int = 512) -> torch.Tensor:
    model.eval()
    out = []
    for i in range(0, len(X), bs):
        with autocast(X.device):
            out.append(model(X[i : i + bs]).argmax(1))
    return torch.cat(out)


def guarded_predict(original: torch.nn.Module, purified: torch.nn.Module, target: int, bs: int = 512
                    ) -> Callable[[torch.Tensor], torch.Tensor]:
    """``predict_fn`` of the guarded model (:mod:`hub_backdoor.purification.guard`): ``original``'s class
    unless it is ``target``, there ``purified``'s."""
    def fn(X: torch.Tensor) -> torch.Tensor:
        original.eval()
        purified.eval()
        out = []
        with torch.no_grad():
            for i in range(0, len(X), bs):
                xb = X[i : i + bs]
                with autocast(X.device):
                    out.append(guarded_logits(original(xb), purified(xb), target).argmax(1))
        return torch.cat(out)

    return fn


def evaluate(model: torch.nn.Module, Xte: torch.Tensor, Yte: torch.Tensor, Xtr: torch.Tensor | None,
             Ytr: torch.Tensor | None, target: int | None) -> dict[str, float]:
    """ACC on the clean test set; ASR and RA on the triggered non-target test set ``Xtr``."""
    return metrics(lambda X: predict(model, X), Xte, Yte, Xtr, Ytr, target)


def metrics(predict_fn: Callable[[torch.Tensor], torch.Tensor], Xte: torch.Tensor, Yte: torch.Tensor,
            Xtr: torch.Tensor | None, Ytr: torch.Tensor | None, target: int | None) -> dict[str, float]:
    """:func:`evaluate` from ``predict_fn(X (N, ...)) -> labels (N,)``; with a target also
    ``acc_target``, the accuracy on the target class's own clean images (where the latent loss
    takes its accuracy from)."""
    pred = predict_fn(Xte)
    out = {"acc": float((pred == Yte).float().mean())}
    if target is not None and bool((Yte == target).any()):
        out["acc_target"] = float((pred[Yte == target] == target).float().mean())
    if Xtr is not None and target is not None:
        p = predict_fn(Xtr)
        out["asr"] = float((p == target).float().mean())
        out["ra"] = float((p == Ytr).float().mean())
    return out


# -- the audit ----------------------------------------------------------------------------------
@dataclass
class AuditResult:
    inp: DetectionInput
    perturbations: np.ndarray
    timings: dict[str, float]
    logits: np.ndarray


def quantile_worst(Z: np.ndarray, y: np.ndarray, q: float) -> np.ndarray:
    """``worst`` of :class:`ConstraintState` with the max over samples replaced by a quantile."""
    C = Z.shape[1]
    worst = np.full((C, C), -np.inf)
    for k in range(C):
        rows = Z[y != k]
        if len(rows):
            worst[k] = np.quantile(rows - rows[:, k : k + 1], q, axis=0)
        worst[k, k] = 0.0
    return worst


@torch.no_grad()
def audit(clf: Classifier, X: torch.Tensor, Y: torch.Tensor, *, bs: int = 256, quantile: float = 0.95
          ) -> AuditResult:
    """The library's stage 1 on tensors, timed by stage: reference pass (logits folded into the
    library's :class:`ConstraintState`, embedding mean/std), the QP (the library's
    :func:`reconstruct`), and the extra statistics of the detection study (s >= 0 QP, quantile QP,
    dormant share). Also times one plain inference pass over the same data for the ratio."""
    dev = X.device
    model = clf.model.eval()
    C, d = clf.num_classes, clf.embed_dim
    # plain inference (warm-up first so neither pass pays for it)
    model(X[: min(bs, len(X))])
    sync(dev)
    t0 = time.perf_counter()
    for i in range(0, len(X), bs):
        model(X[i : i + bs])
    sync(dev)
    t_plain = time.perf_counter() - t0

    t0 = time.perf_counter()
    state = ConstraintState.empty(C)
    worst = torch.as_tensor(state.worst, device=dev)
    s1 = torch.zeros(d, dtype=torch.float64, device=dev)
    s2 = torch.zeros(d, dtype=torch.float64, device=dev)
    zs = []
    from hub_backdoor.detection.reconstruction import fold_worst

    for i in range(0, len(X), bs):
        logits, h = clf.forward(X[i : i + bs])
        fold_worst(worst, logits, Y[i : i + bs])
        h = h.double()
        s1 += h.sum(0)
        s2 += (h * h).sum(0)
        zs.append(logits.double())
    Z = torch.cat(zs).cpu().numpy()
    state.worst = worst.cpu().numpy()
    yn = Y.cpu().numpy()
    state.counts = np.bincount(yn, minlength=C)[:C].astype(np.int64)
    n = len(X)
    mean = (s1 / n).cpu().numpy()
    h_std = np.sqrt(np.maximum((s2 / n).cpu().numpy() - mean**2, 0.0))
    t_ref = time.perf_counter() - t0

    W, b = clf.head_numpy()
    t0 = time.perf_counter()
    rec = reconstruct(W, b, state)
    t_qp = time.perf_counter() - t0
    t0 = time.perf_counter()
    rec_nn = reconstruct(W, b, state, nonneg=True)
    t_nn = time.perf_counter() - t0
    t0 = time.perf_counter()
    rec_q = reconstruct(W, b, ConstraintState(quantile_worst(Z, yn, quantile), state.counts))
    t_q = time.perf_counter() - t0
    inp = DetectionInput(norms=rec.norms, perturbations=rec.perturbations, h_std=h_std,
                         nonneg_norms=rec_nn.norms, quantile_norms=rec_q.norms)
    from hub_backdoor.detection.rules import DEFAULT_RULE, LATENT_RULE, NEEDS_INPUT, detect

    t0 = time.perf_counter()
    # a rule that runs the model again is timed by its verification stage; here its latent part
    detect(inp, rule=LATENT_RULE if DEFAULT_RULE in NEEDS_INPUT else DEFAULT_RULE)
    t_det = time.perf_counter() - t0
    if DEFAULT_RULE in NEEDS_NONNEG:  # the library's audit solves the s >= 0 QP for this rule
        t_det += t_nn
    return AuditResult(inp=inp, perturbations=rec.perturbations, logits=Z, timings={
        "reference_pass": t_ref, "qp": t_qp, "detection": t_det, "audit": t_ref + t_qp + t_det,
        "plain_inference": t_plain, "qp_nonneg": t_nn, "qp_quantile": t_q,
    })


def audit_stats(inp: DetectionInput) -> dict[str, list[float]]:
    """The per-class statistics every rule is computed from (stored, so rules can be re-scored)."""
    return {
        "norms": inp.norms.tolist(),
        "nonneg_norms": inp.nonneg_norms.tolist(),
        "quantile_norms": inp.quantile_norms.tolist(),
        "dormant_share": dormant_share(inp.perturbations, inp.h_std).tolist(),
    }
