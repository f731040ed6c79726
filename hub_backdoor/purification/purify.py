"""Stage 2: remove the backdoor by fine-tuning with the reconstructed latent trigger s_t.

    L = CE(f(x), y) + beta * CE(head(h(x) + scale * s_t), y) + distill * KL(f_0(x) || f(x))
        + keep * KL over the non-target classes (f_0(x) || f(x))

The model must keep the true label even when the reconstructed trigger-activated change is
added in latent space; plain fine-tuning (beta = 0) does not remove backdoors (docs/method.md).

Two additions to the paper's loss, both measured on MNIST timm / transformers models with 600
clean samples (docs/purification.md): ``scale`` > 1, because s_t is the *smallest*
change that reaches class t for the hardest sample while a real trigger drives inputs deep into
t (with scale 1 a transformers ResNet kept 26-40 % ASR); and ``distill``, a KL term to the
original model's clean predictions, which held the accuracy drop to ~2 points where plain CE on
a small clean set lost 4. By default only the backbone trains (``train="backbone"``): with the
head trainable the loss is met by blinding the head to s_t's direction, and a real trigger, whose
latent change is only partly along s_t, kept 12-20 % ASR on two of three seeds.
``keep`` adds a KL over the non-target classes: the latent term pulls every sample away from t,
and holding the other classes' order cost 3.4 points less accuracy on the standard zoo.
``scale=1, distill=0, keep=0, train="all"`` is the paper's setting.

On a CPU the fine-tuning (and the held-out measurements around it) runs at a fixed number of
threads, ``threads`` (default 1), whatever torch's own setting: the backward pass sums weight
gradients in an order that depends on the thread count, and on a model at the edge that rounding
alone moved the ASR by ten points. The same seed, data, options and ``threads`` then give the same
weights bit for bit on a CPU of the same kind (docs/purification.md, "Reproducibility").
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from ..adapters import Classifier, load_classifier
from ..defaults import PURIFY
from ..detection.audit import audit as run_audit
from ..detection.embeddings import reference_pass
from ..detection.reconstruction import target_perturbation
from ..detection.report import AuditReport
from ..detection.validation import check_purify_options, check_report_matches
from ..distributed import finetune_loop, resolve, steps_per_epoch
from ..errors import HubBackdoorError, OptionError
from ..sources.reference import ReferenceData, make_loader
from . import metrics
from .guard import GuardedModel, guarded_logits

__all__ = [
    "PurifyResult", "auto_epochs", "head_parameters", "last_stage_prefixes", "purification_loss",
    "purify", "shift_flip", "trainable_parameters", "warmup_factor",
]


@dataclass
class PurifyResult:
    """The purified classifier (same kind as the input), metrics before/after, and s_t.

    ``metrics`` keys: ``acc_before``, ``acc_after``, ``acc_drop`` (held-out clean accuracy),
    ``acc_target_before`` / ``_after`` (on the held-out images of the target class itself),
    ``latent_trigger_before`` / ``_after`` (share of held-out non-target images that adding s_t to
    the embedding sends to the target) and, when a trigger was given, ``asr_before``,
    ``asr_after``, ``ra_before``, ``ra_after``. ``max_accuracy_drop``: the caller's accuracy
    budget; :attr:`within_budget` says whether the purification kept to it.
    """

    classifier: Classifier
    target: int
    perturbation: np.ndarray
    metrics: dict[str, float | int]
    params: dict[str, Any]
    report: AuditReport
    history: list[dict[str, float]] = field(default_factory=list)
    seconds: float = 0.0
    max_accuracy_drop: float = 0.01
    original: Classifier | None = field(default=None, repr=False)

    def guarded(self) -> GuardedModel:
        """The guarded model: :attr:`original`'s predictions unless it predicts :attr:`target`,
        there the purified model's (:mod:`hub_backdoor.purification.guard`; ``acc_guarded_after`` and
        ``asr_guarded_after`` in :attr:`metrics` are its held-out numbers)."""
        if self.original is None:
            raise HubBackdoorError(
                "this result does not hold the original model; use hub_backdoor.load_guarded")
        return GuardedModel(self.original, self.classifier, self.target).eval()

    @property
    def within_budget(self) -> bool:
        """The held-out clean accuracy fell by at most :attr:`max_accuracy_drop`."""
        return float(self.metrics.get("acc_drop", 0.0)) <= self.max_accuracy_drop + 1e-12

    @property
    def model(self) -> torch.nn.Module:
        return self.classifier.model

    def summary(self) -> str:
        m = self.metrics
        out = (
            f"purified target class {self.target}: clean accuracy "
            f"{m['acc_before']:.3f} -> {m['acc_after']:.3f}"
        )
        if "acc_target_before" in m:
            out += (f" (on class {self.target} itself {m['acc_target_before']:.3f} -> "
                    f"{m['acc_target_after']:.3f})")
        if "latent_trigger_before" in m:
            out += f"; latent trigger {m['latent_trigger_before']:.3f} -> {m['latent_trigger_after']:.3f}"
        if "asr_before" in m:
            out += f"; attack success rate {m['asr_before']:.3f} -> {m['asr_after']:.3f}"
        if "acc_guarded_after" in m:
            out += (f"; guarded (the original unless it predicts {self.target}): clean accuracy "
                    f"{m['acc_guarded_after']:.3f}")
            if "asr_guarded_after" in m:
                out += f", attack success rate {m['asr_guarded_after']:.3f}"
        if not self.within_budget:
            out += (f"; OVER the accuracy budget (lost {100 * float(m['acc_drop']):.1f} points, "
                    f"allowed {100 * self.max_accuracy_drop:.1f})")
        return out


def auto_epochs(steps_per_epoch: int) -> int:
    """The default number of epochs: ``PURIFY["epochs"]``, or more so that training takes at least
    ``PURIFY["min_steps"]`` optimizer steps (a clean set of 175 images gives 2 steps per epoch;
    with 20 steps the features barely moved and ASR stayed at 57 % on the quick benchmark suite,
    with 100 it fell to 9 %)."""
    return max(int(PURIFY["epochs"]), -(-int(PURIFY["min_steps"]) // max(1, steps_per_epoch)))


def warmup_factor(epoch: int, epochs: int, warmup: float) -> float:
    """The share of ``scale * s_t`` used in epoch ``epoch`` (0-based) of ``epochs``: it grows
    linearly over the first ``warmup`` of them and is 1 from there on."""
    if warmup <= 0:
        return 1.0
    return min(1.0, (epoch + 1) / max(1.0, warmup * epochs))


def head_parameters(clf: Classifier) -> list[torch.nn.Parameter]:
    """The parameters the linear head ``(W, b)`` is built from (a Linear's weight and bias, and a
    folded BatchNorm's too), found by differentiating :meth:`Classifier.head_affine`."""
    params = list(clf.model.parameters())
    flags = [p.requires_grad for p in params]
    try:  # frozen parameters too: differentiate with every flag on, then put them back
        for p in params:
            p.requires_grad_(True)
        W, b = clf.head_affine()
        grads = torch.autograd.grad(W.sum() + b.sum(), params, allow_unused=True)
    finally:
        for p, f in zip(params, flags):
            p.requires_grad_(f)
    return [p for p, g in zip(params, grads) if g is not None]


def last_stage_prefixes(clf: Classifier) -> list[str]:
    """Parameter-name prefixes of the backbone's last stage and of the layers after it (a final
    norm, a 1x1 projection), the head excluded, found from the module tree whatever the library.
    Among a module's children that are themselves blocks of layers, the last one holding at least
    a tenth of their parameters is the last stage; the search goes down into it when it holds
    nearly all of them (a wrapper) or is a list of three or more blocks (a ViT's blocks, a list of
    stages). PreAct-ResNet: ``layer4``, ``bn``; timm ViT:
    ``blocks.<last>``, ``norm``; timm MobileNetV3-small: ``blocks.4.2``, ``blocks.5``, ``conv_head``
    (the last stage is a single small block);
    transformers ConvNeXt: ``convnext.encoder.stages.<last>``, ``convnext.layernorm``."""
    head = {id(p) for p in head_parameters(clf)}

    def size(m: torch.nn.Module) -> int:
        return sum(p.numel() for p in m.parameters() if id(p) not in head)

    def is_block(m: torch.nn.Module) -> bool:
        return any(size(c) > 0 for c in m.children())

    prefix, module, out = "", clf.model, []
    while True:
        kids = [(n, c) for n, c in module.named_children() if size(c) > 0]
        blocks = [j for j, (_, c) in enumerate(kids) if is_block(c)]
        if not blocks:
            out += [prefix + n for n, _ in kids]
            break
        total = sum(size(kids[j][1]) for j in blocks)
        i = max(j for j in blocks if size(kids[j][1]) >= 0.1 * total)
        name, child = kids[i]
        out += [prefix + n for n, _ in kids[i + 1 :]]
        listed = isinstance(child, (torch.nn.Sequential, torch.nn.ModuleList)) and sum(
            is_block(c) for c in child.children()) >= 3
        if size(child) <= 0.9 * total and not listed:
            out.append(prefix + name)
            break
        prefix, module = prefix + name + ".", child
    return out


def trainable_parameters(clf: Classifier, train: str | list[str]) -> list[torch.nn.Parameter]:
    """``"last-stage"``: the backbone's last stage (:func:`last_stage_prefixes`), the head kept;
    ``"backbone"``: everything but the head; ``"all"``; or parameter-name prefixes."""
    model = clf.model
    if train == "all":
        return list(model.parameters())
    if train in ("backbone", "last-stage"):
        head = {id(p) for p in head_parameters(clf)}
        if train == "last-stage":
            pre = tuple(f"{q}." for q in last_stage_prefixes(clf))
            params = [p for n, p in model.named_parameters() if n.startswith(pre) and id(p) not in head]
        else:
            params = [p for p in model.parameters() if id(p) not in head]
        if not params:
            raise HubBackdoorError(f"{type(model).__name__} has no parameters outside its head")
        return params
    prefixes = [train] if isinstance(train, str) else list(train)
    params = [p for n, p in model.named_parameters() if any(n.startswith(pre) for pre in prefixes)]
    if not params:
        raise HubBackdoorError(f"train={train!r} matches no parameter names of {type(model).__name__}")
    return params


@torch.no_grad()
def _evaluate(clf: Classifier, data: ReferenceData, transform: Any, trigger: Any, target: int,
              batch_size: int, s_t: np.ndarray, original: Classifier | None = None) -> dict[str, float]:
    """Held-out clean accuracy; the latent-trigger success (share of non-target images that
    ``head(h(x) + s_t)`` sends to the target: what the purification trains away); ASR / RA of a
    known trigger. With ``original`` (the model ``clf`` was purified from) also the same numbers
    for the guarded model (:mod:`hub_backdoor.purification.guard`), as ``acc_guarded``,
    ``asr_guarded``, ..."""
    clf.model.eval()
    if original is not None:
        original.model.eval()
    out: dict[str, float] = {}
    right = n = lat_hits = lat_n = 0
    right_t = n_t = right_g = right_gt = 0
    s = torch.as_tensor(s_t, dtype=torch.float32, device=clf.device)
    for x, y in make_loader(data, transform, batch_size=batch_size):
        logits, h = clf.forward(x.to(clf.device))
        pred = logits.argmax(1).cpu()
        right += int((pred == y).sum())
        n += len(y)
        right_t += int((pred[y == target] == target).sum())
        n_t += int((y == target).sum())
        if original is not None:
            g = guarded_logits(original.forward(x.to(original.device))[0].to(logits.device), logits, target)
            pg = g.argmax(1).cpu()
            right_g += int((pg == y).sum())
            right_gt += int((pg[y == target] == target).sum())
        keep = (y != target).to(clf.device)
        lat_hits += int((clf.head_logits(h[keep] + s.to(h.dtype)).argmax(1) == target).sum())
        lat_n += int(keep.sum())
    out["acc"] = right / max(n, 1)
    if n_t:  # the latent loss takes its accuracy from the target class first (docs/purification.md)
        out["acc_target"] = right_t / n_t
    out["latent_trigger"] = lat_hits / max(lat_n, 1)
    if original is not None:
        out["acc_guarded"] = right_g / max(n, 1)
        if n_t:
            out["acc_target_guarded"] = right_gt / n_t
    if trigger is not None:
        def tf(img: Any) -> torch.Tensor:
            return transform(trigger(img))

        preds: list[np.ndarray] = []
        preds_g: list[np.ndarray] = []
        refs: list[np.ndarray] = []
        for x, y in make_loader(data, tf, batch_size=batch_size):
            keep = y != target  # target-class images are no attack; only they are skipped, as the metrics do
            if not keep.any():
                continue
            logits = clf.forward(x[keep].to(clf.device))[0]
            preds.append(logits.argmax(1).cpu().numpy())
            if original is not None:
                lo = original.forward(x[keep].to(original.device))[0].to(logits.device)
                preds_g.append(guarded_logits(lo, logits, target).argmax(1).cpu().numpy())
            refs.append(y[keep].numpy())
        r = np.concatenate(refs) if refs else np.zeros(0, dtype=np.int64)
        for suffix, got in (("", preds), ("_guarded", preds_g)):
            if suffix and original is None:
                continue
            p = np.concatenate(got) if got else np.zeros(0, dtype=np.int64)
            out[f"asr{suffix}"] = _metric("attack_success_rate", p, r, target)
            out[f"ra{suffix}"] = _metric("robust_accuracy", p, r, target)
    return out


def _metric(name: str, predictions: np.ndarray, references: np.ndarray, target: int) -> float:
    """Metric ``name`` of :mod:`hub_backdoor.purification.metrics` (an ``evaluate`` module, loaded by
    path)."""
    # in memory: a purification leaves no metric cache files behind
    module = metrics.load(name, keep_in_memory=True)
    result = module.compute(predictions=predictions, references=references, target=int(target))
    return float(result[name])


def purify(
    source: Any,
    dataset: Any,
    *,
    report: AuditReport | None = None,
    target: int | None = None,
    trigger: Any = None,
    beta: float = float(PURIFY["beta"]),
    scale: float = float(PURIFY["scale"]),
    epochs: int | None = None,
    lr: float = float(PURIFY["lr"]),
    batch_size: int = 64,
    train: str | list[str] = str(PURIFY["train"]),
    holdout: float = 0.2,
    resolve_every: int | None = None,
    freeze_norm: bool = False,
    distill: float = float(PURIFY["distill"]),
    keep: float = float(PURIFY["keep"]),
    warmup: float = float(PURIFY["warmup"]),
    target_weight: float = float(PURIFY["target_weight"]),
    seed: int = 0,
    transform: Any = None,
    image_column: str | None = None,
    label_column: str | None = None,
    device: str | torch.device | None = None,
    accelerator: Any = None,
    progress: bool = True,
    audit_kw: dict[str, Any] | None = None,
    max_samples: int | None = None,
    max_accuracy_drop: float = 0.01,
    threads: int = int(PURIFY["threads"]),
    augment: bool = bool(PURIFY["augment"]),
    sam_rho: float = float(PURIFY["sam_rho"]),
    sam_adaptive: bool = bool(PURIFY["sam_adaptive"]),
    **load_kw: Any,
) -> PurifyResult:
    """Fine-tune a copy of the model so the reconstructed trigger no longer flips its predictions.

    Args:
        source: anything :func:`load_classifier` accepts; it is never modified.
        dataset: clean labelled data (the defender's); ``holdout`` of it (stratified, seeded)
            measures accuracy/ASR before and after, the rest is used for the audit and fine-tuning.
        report: an audit of this model; when None the audit runs on the training part.
        target: the class to purify; default: the report's target. Required when the audit
            flagged nothing (purifying a clean-looking model is then an explicit choice).
        trigger: optional callable applied to one raw image; measures ASR/RA before and after.
        beta: weight of the latent-trigger loss. scale: s_t is multiplied by this in the loss.
        epochs: passes over the fine-tuning data; None (default): 10, or more on a small clean set
            so that training takes at least 100 optimizer steps (:func:`auto_epochs`).
        lr: peak learning rate of SGD with a one-cycle schedule.
        train: which parameters change: ``"backbone"`` (everything but the linear head, the
            default), ``"all"``, or parameter-name prefixes (the rest is frozen). With the head
            trainable the latent loss is met by making the head blind to s_t's direction, and a
            real trigger, whose latent change is only partly along s_t, keeps working.
        resolve_every: re-solve s_t on the current model every this many epochs (None: never).
        distill: weight of a KL term to the original model's clean predictions, which keeps
            clean behaviour when the clean set is small (0: the paper's loss).
        keep: weight of a second KL term to the original predictions over every class but the
            target, so the other classes keep their order while the target's logit is lowered
            (0: the earlier loss; docs/purification.md has what it changed).
        warmup: share of the epochs over which the latent shift grows linearly from 0 to
            ``scale * s_t`` (0: full size from the first step, the paper's setting). At full size
            the first steps face a loss of tens of nats and wreck the features at once.
        target_weight: weight of the clean CE of the target class's own samples against 1 for the
            others (1: the paper). The latent term lowers the target's logit along s_t, and the
            target's own clean images lie along it too: they lose most (docs/purification.md).
        freeze_norm: keep BatchNorm statistics fixed; a few hundred clean samples estimate them
            worse than the original training set did.
        accelerator: as for :func:`hub_backdoor.audit` (``None``: several processes when launched
            with ``torchrun`` / ``accelerate launch``). Each process then trains on its share of
            every epoch (``batch_size`` per process) and gradients are averaged, as in DDP.
        max_samples: use a seeded random subset of at most this many samples of ``dataset`` for
            everything: the audit, fine-tuning and the held-out metrics.
        max_accuracy_drop: the accuracy budget (0.01 = one point of held-out clean accuracy);
            the result says whether it was kept (:attr:`PurifyResult.within_budget`) and the CLI
            publishes nothing beyond it.
        threads: on a CPU, the fine-tuning and the held-out measurements run at this many torch
            threads (torch's setting is put back afterwards), so the purified weights do not depend
            on the machine's core count or on ``torch.set_num_threads``: the same seed, data,
            options and ``threads`` give identical weights on a CPU of the same kind. More threads
            can be faster on an idle many-core machine; the count is recorded in :attr:`params`
            (``threads``, with ``determinism``). Not used on a GPU (``determinism`` then says so).
        augment: shift each fine-tuning image by up to 2 pixels (zero padding) and flip it left to
            right with probability 1/2, drawn from ``seed``: a few hundred clean images are
            otherwise memorised.
        sam_rho: > 0: sharpness-aware minimisation (the optimiser of FT-SAM, Zhu et al., ICCV
            2023): each step takes the gradient at the weights moved by ``sam_rho`` along the
            normalised gradient (a second forward and backward pass per step); 0: plain SGD.
        sam_adaptive: with ``sam_rho`` > 0, adaptive SAM (ASAM, Kwon et al., 2021), the variant
            FT-SAM runs: each weight's move is scaled by its magnitude, so ``sam_rho`` is relative
            (FT-SAM's published setting is 2.0; plain SAM's usual one is 0.05).

    Raises:
        OptionError: an option is out of range (before anything is loaded); ReportError:
            ``report`` is the audit of another model or of the wrong shape (before any training).
    """
    t_start = time.perf_counter()
    check_purify_options(
        beta=beta, scale=scale, distill=distill, lr=lr, epochs=epochs, holdout=holdout,
        batch_size=batch_size, seed=seed, max_samples=max_samples, resolve_every=resolve_every,
        device=device, warmup=warmup, keep=keep, target_weight=target_weight,
        max_accuracy_drop=max_accuracy_drop, threads=threads, sam_rho=sam_rho,
    )
    torch.manual_seed(seed)
    original = load_classifier(source, **load_kw)
    if report is not None:
        check_report_matches(report, original, original.name)
    C = original.num_classes
    if target is not None and not (isinstance(target, (int, np.integer)) and 0 <= target < C):
        raise OptionError(f"--target / target= {target!r} is not a class of {original.name} (0..{C - 1})")
    clf = original.copy()
    dist = resolve(accelerator)
    device = device if device is not None else dist.device
    if device is not None:
        clf.model.to(device)
    data = ReferenceData(dataset, image_column=image_column, label_column=label_column)
    data = data.subset(max_samples, seed)
    fit, held = data.split(holdout, seed) if holdout > 0 else (data, data)
    tf = transform or clf.preprocess
    if report is None:
        report = run_audit(clf, fit, transform=transform, seed=seed, progress=progress, accelerator=dist,
                           **(audit_kw or {}))
    if target is None:
        if report.inconclusive:
            raise HubBackdoorError(
                f"the audit is inconclusive ({report.reason}); fix the reference data, or pass target= to "
                "purify a chosen class anyway"
            )
        if report.target is None:
            raise HubBackdoorError(
                "the audit flagged no class; pass target= to purify against a chosen class anyway"
            )
        target = report.target
    if not np.isfinite(report.classes[target].norm):  # no universal latent change reaches t
        s_t = _solve_target(clf, fit, tf, target, batch_size, report.params.get("margin", 0.0))
    elif report.perturbations is not None:
        s_t = np.asarray(report.perturbations[target])
    elif report.target == target and report.target_perturbation is not None:
        s_t = np.asarray(report.target_perturbation)
    else:
        s_t = _solve_target(clf, fit, tf, target, batch_size, report.params.get("margin", 0.0))

    on_cpu = torch.device(clf.device).type == "cpu"
    run_threads = threads if on_cpu else torch.get_num_threads()  # a GPU's kernels ignore it
    determinism = "cpu-fixed-threads" if on_cpu else f"{torch.device(clf.device).type}-default"
    with _fixed_threads(run_threads):
        before = _evaluate(clf, held, tf, trigger, target, batch_size, s_t)
    params = trainable_parameters(clf, train)
    for p in clf.model.parameters():
        p.requires_grad_(False)
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.SGD(params, lr=lr, momentum=0.9, weight_decay=5e-4)
    loader = make_loader(fit, tf, batch_size=batch_size, shuffle=True, seed=seed)
    # a last batch of a handful of samples destabilises BatchNorm and SGD (benchmarks saw it)
    loader = torch.utils.data.DataLoader(
        loader.dataset, batch_size=batch_size, shuffle=True, generator=loader.generator,
        drop_last=len(fit) > batch_size, collate_fn=loader.collate_fn,
    )
    # a copy: the caller's model stays as it was
    teacher = original.copy() if distill > 0 or keep > 0 else None
    if teacher is not None:
        teacher.model.to(clf.device).eval()
    # several processes (torchrun / accelerate launch): each takes its share of every epoch and
    # gradients are averaged (DDP semantics); one process: the loader as it is
    steps = steps_per_epoch(loader, dist)
    auto = epochs is None
    epochs = auto_epochs(steps) if epochs is None else epochs
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=max(1, epochs * steps))
    margin = report.params.get("margin", 0.0)
    s_now = torch.as_tensor(s_t, dtype=torch.float32, device=clf.device)
    s = s_now

    def before_epoch(epoch: int) -> None:
        nonlocal s, s_now
        if resolve_every and epoch > 0 and epoch % resolve_every == 0:
            s_new = _solve_target(clf, fit, tf, target, batch_size, margin)
            s_now = torch.as_tensor(s_new, dtype=torch.float32, device=clf.device)
        s = warmup_factor(epoch, epochs, warmup) * scale * s_now
        clf.model.train()
        if freeze_norm:
            _freeze_batchnorm(clf.model)

    def step(x: torch.Tensor, y: torch.Tensor) -> dict[str, torch.Tensor]:
        t_logits = None
        if teacher is not None:
            with torch.no_grad():
                t_logits = teacher.forward(x)[0]
        loss, loss_clean, loss_trig = purification_loss(
            clf, x, y, s, beta=beta, teacher_logits=t_logits, distill=distill, keep=keep, target=target,
            target_weight=target_weight,
        )
        return {"loss": loss, "loss_clean": loss_clean, "loss_trigger": loss_trig}

    augment_fn: Callable[[torch.Tensor], torch.Tensor] | None = None
    if augment:
        augment_fn = partial(shift_flip, generator=torch.Generator().manual_seed(seed))

    with _fixed_threads(run_threads):
        history = finetune_loop(
            step, loader, opt, params=params, epochs=epochs, dist=dist, scheduler=sched,
            device=clf.device, seed=seed, before_epoch=before_epoch, progress=progress, model=clf.model,
            batch_transform=augment_fn, sam_rho=sam_rho, sam_adaptive=sam_adaptive,
        )
    for h in history:
        h.pop("loss", None)
    for p in clf.model.parameters():
        p.requires_grad_(True)
    clf.model.eval()
    # the guarded model's numbers need the original beside it: the teacher is its copy on the
    # device; the caller's model itself is never moved or switched to eval mode
    if teacher is None:
        teacher = original.copy()
        teacher.model.to(clf.device).eval()
    with _fixed_threads(run_threads):
        after = _evaluate(clf, held, tf, trigger, target, batch_size, s_t, original=teacher)
    metrics = {f"{k}_before": v for k, v in before.items()} | {f"{k}_after": v for k, v in after.items()}
    metrics["acc_drop"] = before["acc"] - after["acc"]
    metrics["acc_drop_guarded"] = before["acc"] - after["acc_guarded"]
    metrics["n_finetune"], metrics["n_holdout"] = len(fit), len(held)  # counts stay integers
    clf.source = {**original.source, "purified_from": original.name}
    return PurifyResult(
        classifier=clf,
        target=int(target),
        perturbation=np.asarray(s_t),
        metrics=metrics,
        params={
            "beta": beta, "scale": scale, "epochs": epochs, "epochs_auto": auto, "lr": lr,
            "batch_size": batch_size,
            "train": train,
            "holdout": holdout, "resolve_every": resolve_every, "freeze_norm": freeze_norm,
            "distill": distill, "keep": keep, "warmup": warmup, "target_weight": target_weight,
            "seed": seed, "max_accuracy_drop": max_accuracy_drop,
            "augment": augment, "sam_rho": sam_rho, "sam_adaptive": sam_adaptive,
            "threads": run_threads, "determinism": determinism, "processes": dist.world,
        },
        report=report,
        history=history,
        seconds=time.perf_counter() - t_start,
        max_accuracy_drop=float(max_accuracy_drop),
        original=original,
    )


def shift_flip(x: torch.Tensor, generator: torch.Generator, pad: int = 2) -> torch.Tensor:
    """Each image of ``x (B, channels, H, W)`` shifted by up to ``pad`` pixels (zero padding) and
    flipped left to right with probability 1/2, drawn from ``generator`` (a CPU generator)."""
    B, _, H, W = x.shape
    xp = F.pad(x, (pad, pad, pad, pad))
    dy = torch.randint(0, 2 * pad + 1, (B,), generator=generator).tolist()
    dx = torch.randint(0, 2 * pad + 1, (B,), generator=generator).tolist()
    flip = torch.rand(B, generator=generator) < 0.5
    out = torch.stack([xp[i, :, dy[i] : dy[i] + H, dx[i] : dx[i] + W] for i in range(B)])
    return torch.where(flip.to(x.device)[:, None, None, None], out.flip(3), out)


@contextmanager
def _fixed_threads(n: int) -> Iterator[None]:
    """Run the block at ``n`` torch threads and put the caller's setting back afterwards."""
    before = torch.get_num_threads()
    if n != before:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        if torch.get_num_threads() != before:
            torch.set_num_threads(before)


def purification_loss(
    clf: Classifier,
    x: torch.Tensor,
    y: torch.Tensor,
    s: torch.Tensor,
    *,
    beta: float | torch.Tensor,
    teacher_logits: torch.Tensor | None = None,
    distill: float | torch.Tensor = 0.0,
    keep: float | torch.Tensor = 0.0,
    target: int | torch.Tensor | None = None,
    target_weight: float | torch.Tensor = 1.0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The stage-2 loss on one batch ``x (B, ...)``, ``y (B,)``; ``s (d,)`` is ``scale * s_t``.

    Returns ``(loss, CE(f(x), y), CE(head(h(x) + s), y))``; the KL terms are added only when
    ``teacher_logits (B, C)`` (the original model's, no grad) are given: ``distill`` weighs the
    KL over all classes, ``keep`` the KL over every class but ``target`` (:func:`_kl`). The
    benchmarks train with this same function, so the table measures the library's loss.
    ``target_weight``: weight of the clean CE of the samples of ``target`` against 1 for the
    others (a weighted mean): the latent term lowers the target's logit along s_t, which its own
    clean images share.
    """
    logits, h = clf.forward(x)
    if target is None:
        loss_clean = F.cross_entropy(logits, y)
    else:  # written out, not CE's weight=: per-model weights under vmap (benchmarks/group.py)
        w = 1.0 + (target_weight - 1.0) * (y == target).to(logits.dtype)
        loss_clean = (F.cross_entropy(logits, y, reduction="none") * w).sum() / w.sum()
    loss_trig = F.cross_entropy(clf.head_logits(h + s.to(h.dtype)), y)
    loss = loss_clean + beta * loss_trig
    if teacher_logits is not None:  # no test on the weights: tensors of per-model weights under vmap
        loss = loss + distill * _kl(teacher_logits, logits)
        if target is not None:  # keep = 0 adds exactly 0
            others = torch.arange(logits.shape[1], device=logits.device) != target
            loss = loss + keep * _kl(teacher_logits, logits, others)
    return loss, loss_clean, loss_trig


def _kl(teacher_logits: torch.Tensor, logits: torch.Tensor, classes: torch.Tensor | None = None
        ) -> torch.Tensor:
    """Mean KL(f_0 || f) over the batch, of the softmax over ``classes (C,)`` (bool; all: None).

    Over the non-target classes it holds their order as the original had it while the latent term
    lowers the target's logit: the latent term's pull is the same direction, away from the target,
    for every sample, and with the plain KL alone it dragged clean images of every class into the
    class opposite the target (docs/purification.md). Written out: torch's kl_div has no vmap
    batching rule (benchmarks/group.py).
    """
    t, s = teacher_logits.float(), logits.float()
    if classes is not None:  # a class left out gets probability 0 in both: it adds nothing
        t, s = torch.where(classes, t, -1e9), torch.where(classes, s, -1e9)
    log_t, log_s = F.log_softmax(t, 1), F.log_softmax(s, 1)
    return (log_t.exp() * (log_t - log_s)).sum() / len(logits)


def _freeze_batchnorm(model: torch.nn.Module) -> None:
    for m in model.modules():
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
            m.eval()


def _solve_target(clf: Classifier, data: ReferenceData, tf: Any, target: int, batch_size: int,
                  margin: float) -> np.ndarray:
    was = clf.model.training
    ref = reference_pass(clf, data, transform=tf, batch_size=batch_size, progress=False)
    clf.model.train(was)
    W, b = clf.head_numpy()
    return target_perturbation(W, b, ref.state.worst, target, margin=margin)
