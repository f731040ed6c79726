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
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field, fields
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
from ..detection.validation import check_report_matches
from ..distributed import finetune_loop, resolve, steps_per_epoch
from ..errors import HubBackdoorError, OptionError
from ..options import PurifyOptions
from ..sources.reference import ReferenceData, make_loader
from . import metrics
from .guard import GuardedModel, guarded_logits

__all__ = [
    "PurifyMetrics", "PurifyResult", "auto_epochs", "head_parameters", "last_stage_prefixes",
    "purification_loss", "purify", "shift_flip", "trainable_parameters", "warmup_factor",
]


@dataclass(kw_only=True)
class PurifyMetrics(Mapping[str, "float | int"]):
    """The held-out numbers of a purification, before (the original model) and after (the
    purified one); ``guarded``: the guarded model (:mod:`hub_backdoor.purification.guard`). Read them as
    attributes or as a mapping (``metrics["acc_after"]``): the mapping holds the numbers that were
    measured, in field order (the purification record's ``metrics``).

    ``acc_*``: clean accuracy; ``acc_target_*``: on the images of the target class itself (absent
    when the held-out part has none); ``latent_trigger_*``: share of non-target images that adding
    s_t to the embedding sends to the target; ``asr_*`` / ``ra_*``: attack success rate and robust
    accuracy of a known trigger (absent without one); ``acc_drop`` (``_guarded``): clean accuracy
    lost; ``n_finetune`` / ``n_holdout``: the images fine-tuned on and held out.
    """

    acc_before: float
    acc_target_before: float | None = None
    latent_trigger_before: float
    asr_before: float | None = None
    ra_before: float | None = None
    acc_after: float
    acc_target_after: float | None = None
    latent_trigger_after: float
    acc_guarded_after: float
    acc_target_guarded_after: float | None = None
    asr_after: float | None = None
    ra_after: float | None = None
    asr_guarded_after: float | None = None
    ra_guarded_after: float | None = None
    acc_drop: float
    acc_drop_guarded: float
    n_finetune: int
    n_holdout: int

    @classmethod
    def measured(cls, before: Mapping[str, float], after: Mapping[str, float], n_finetune: int,
                 n_holdout: int) -> PurifyMetrics:
        """From :func:`_evaluate`'s numbers before (without the guarded model) and after (with it)."""
        values = {f"{k}_before": v for k, v in before.items()} | {f"{k}_after": v for k, v in after.items()}
        return cls(**values, acc_drop=before["acc"] - after["acc"],
                   acc_drop_guarded=before["acc"] - after["acc_guarded"],
                   n_finetune=n_finetune, n_holdout=n_holdout)

    def __getitem__(self, key: str) -> float | int:
        value = getattr(self, key, None) if key in _METRIC_NAMES else None
        if value is None:
            raise KeyError(key)
        return value

    def __iter__(self) -> Iterator[str]:
        return (name for name in _METRIC_NAMES if getattr(self, name) is not None)

    def __len__(self) -> int:
        return sum(1 for _ in self)


_METRIC_NAMES = tuple(f.name for f in fields(PurifyMetrics))


@dataclass
class PurifyResult:
    """The purified classifier (same kind as the input), metrics before/after, and s_t.

    ``metrics``: :class:`PurifyMetrics` (held-out clean accuracy, on the target class itself, the
    latent trigger's success and, when a trigger was given, its ASR / RA, before and after).
    ``max_accuracy_drop``: the caller's accuracy budget; :attr:`within_budget` says whether the
    purification kept to it.
    """

    classifier: Classifier
    target: int
    perturbation: np.ndarray
    metrics: PurifyMetrics
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


_DEFAULT = PurifyOptions()


def purify(
    source: Any,
    dataset: Any,
    *,
    report: AuditReport | None = None,
    target: int | None = None,
    trigger: Any = None,
    beta: float = _DEFAULT.beta,
    scale: float = _DEFAULT.scale,
    epochs: int | None = _DEFAULT.epochs,
    lr: float = _DEFAULT.lr,
    batch_size: int = 64,
    train: str | list[str] = _DEFAULT.train,
    holdout: float = _DEFAULT.holdout,
    resolve_every: int | None = _DEFAULT.resolve_every,
    freeze_norm: bool = _DEFAULT.freeze_norm,
    distill: float = _DEFAULT.distill,
    keep: float = _DEFAULT.keep,
    warmup: float = _DEFAULT.warmup,
    target_weight: float = _DEFAULT.target_weight,
    seed: int = 0,
    transform: Any = None,
    image_column: str | None = None,
    label_column: str | None = None,
    device: str | torch.device | None = None,
    accelerator: Any = None,
    progress: bool = True,
    audit_kw: dict[str, Any] | None = None,
    max_samples: int | None = None,
    max_accuracy_drop: float = _DEFAULT.max_accuracy_drop,
    threads: int = _DEFAULT.threads,
    augment: bool = _DEFAULT.augment,
    sam_rho: float = _DEFAULT.sam_rho,
    sam_adaptive: bool = _DEFAULT.sam_adaptive,
    **load_kw: Any,
) -> PurifyResult:
    """Fine-tune a copy of the model so the reconstructed trigger no longer flips its predictions.

    ``source``: anything :func:`load_classifier` accepts (never modified). ``dataset``: clean
    labelled data; ``holdout`` of it (stratified, seeded) measures accuracy / ASR before and after,
    the rest serves the audit (run when ``report`` is None) and the fine-tuning. ``target``: the
    class to purify (default: the report's; required when it flagged nothing). ``trigger``: a
    callable on one raw image whose ASR / RA is measured. The fine-tuning options are documented in
    :class:`hub_backdoor.options.PurifyOptions`, the others in :class:`hub_backdoor.options.AuditOptions`
    and :func:`hub_backdoor.audit` (``max_samples`` bounds all the data used); ``audit_kw``: more
    keywords of the audit.

    Raises:
        OptionError: an option is out of range (before anything is loaded); ReportError: ``report``
            is the audit of another model or of the wrong shape (before any training).
    """
    t_start = time.perf_counter()
    opts = PurifyOptions(
        epochs=epochs, beta=beta, scale=scale, distill=distill, keep=keep, target_weight=target_weight,
        lr=lr, warmup=warmup, holdout=holdout, train=train, sam_rho=sam_rho, sam_adaptive=sam_adaptive,
        augment=augment, max_accuracy_drop=max_accuracy_drop, threads=threads, resolve_every=resolve_every,
        freeze_norm=freeze_norm,
    )
    opts.check(batch_size=batch_size, seed=seed, max_samples=max_samples, device=device)
    torch.manual_seed(seed)
    original, clf, dist = _load(source, report, target, load_kw, device, accelerator)
    fit, held = _split(dataset, image_column, label_column, max_samples, seed, holdout)
    tf = transform or clf.preprocess
    report = report if report is not None else _audit(clf, fit, transform, seed, progress, dist, audit_kw)
    target = _chosen_target(report, target)
    s_t = _target_shift(clf, fit, tf, report, target, batch_size)
    run_threads, determinism = _threads_on(clf, threads)
    with _fixed_threads(run_threads):  # the set-up between the steps computes nothing the count changes
        before = _evaluate(clf, held, tf, trigger, target, batch_size, s_t)
        run = _FineTune(clf, fit, tf, target, s_t, report.params.get("margin", 0.0), opts, batch_size, seed,
                        dist)
        history = run.train(original, progress)
        after = _evaluate(clf, held, tf, trigger, target, batch_size, s_t, original=run.teacher)
    clf.source = {**original.source, "purified_from": original.name}
    params = _params(opts, run, batch_size=batch_size, seed=seed, threads=run_threads,
                     determinism=determinism, processes=dist.world)
    return PurifyResult(
        classifier=clf, target=int(target), perturbation=np.asarray(s_t), report=report, history=history,
        metrics=PurifyMetrics.measured(before, after, len(fit), len(held)), params=params, original=original,
        seconds=time.perf_counter() - t_start, max_accuracy_drop=float(max_accuracy_drop))


def _load(source: Any, report: AuditReport | None, target: Any, load_kw: dict[str, Any], device: Any,
          accelerator: Any) -> tuple[Classifier, Classifier, Any]:
    """The classifier of ``source`` (checked against ``report`` and ``target``), the copy that
    is fine-tuned (:func:`_working_copy`) and the resolved accelerator."""
    original = load_classifier(source, **load_kw)
    if report is not None:
        check_report_matches(report, original, original.name)
    _check_class(target, original)
    return original, *_working_copy(original, device, accelerator)


def _check_class(target: Any, clf: Classifier) -> None:
    """Refuse a ``target`` that is not one of the ``C`` classes of ``clf`` (None: the audit's)."""
    C = clf.num_classes
    if target is not None and not (isinstance(target, (int, np.integer)) and 0 <= target < C):
        raise OptionError(f"--target / target= {target!r} is not a class of {clf.name} (0..{C - 1})")


def _working_copy(original: Classifier, device: Any, accelerator: Any) -> tuple[Classifier, Any]:
    """A copy of ``original`` on ``device`` (None: the accelerator's, else where it is), and the
    resolved accelerator."""
    clf = original.copy()
    dist = resolve(accelerator)
    device = device if device is not None else dist.device
    if device is not None:
        clf.model.to(device)
    return clf, dist


def _split(dataset: Any, image_column: str | None, label_column: str | None, max_samples: int | None,
           seed: int, holdout: float) -> tuple[ReferenceData, ReferenceData]:
    """``(fit, held)``: the seeded subset of at most ``max_samples`` images of ``dataset``, split
    (stratified) into the part fine-tuned on and the ``holdout`` share measured on (0: both all)."""
    data = ReferenceData(dataset, image_column=image_column, label_column=label_column)
    data = data.subset(max_samples, seed)
    return data.split(holdout, seed) if holdout > 0 else (data, data)


def _audit(clf: Classifier, fit: ReferenceData, transform: Any, seed: int, progress: bool, dist: Any,
           audit_kw: dict[str, Any] | None) -> AuditReport:
    """The audit of ``clf`` on the part of the data it is fine-tuned on."""
    return run_audit(clf, fit, transform=transform, seed=seed, progress=progress, accelerator=dist,
                     **(audit_kw or {}))


def _chosen_target(report: AuditReport, target: int | None) -> int:
    """``target``, else the class ``report`` flagged (an inconclusive or clean audit: an error)."""
    if target is not None:
        return target
    if report.inconclusive:
        raise HubBackdoorError(
            f"the audit is inconclusive ({report.reason}); fix the reference data, or pass target= to "
            "purify a chosen class anyway"
        )
    if report.target is None:
        raise HubBackdoorError(
            "the audit flagged no class; pass target= to purify against a chosen class anyway"
        )
    return report.target


def _target_shift(clf: Classifier, fit: ReferenceData, tf: Any, report: AuditReport, target: int,
                  batch_size: int) -> np.ndarray:
    """s_t ``(d,)``: the report's, else solved again on ``fit`` (also where no universal latent
    change reaches ``target``: the report then holds none)."""
    if not np.isfinite(report.classes[target].norm):  # no universal latent change reaches t
        return _solve_target(clf, fit, tf, target, batch_size, report.params.get("margin", 0.0))
    if report.perturbations is not None:
        return np.asarray(report.perturbations[target])
    if report.target == target and report.target_perturbation is not None:
        return np.asarray(report.target_perturbation)
    return _solve_target(clf, fit, tf, target, batch_size, report.params.get("margin", 0.0))


def _threads_on(clf: Classifier, threads: int) -> tuple[int, str]:
    """The torch thread count the fine-tuning runs at (``threads`` on a CPU; a GPU's kernels ignore
    it) and the determinism it gives."""
    on_cpu = torch.device(clf.device).type == "cpu"
    run_threads = threads if on_cpu else torch.get_num_threads()
    determinism = "cpu-fixed-threads" if on_cpu else f"{torch.device(clf.device).type}-default"
    return run_threads, determinism


def _teacher(original: Classifier, clf: Classifier) -> Classifier:
    """A copy of ``original`` on ``clf``'s device in eval mode: the caller's model itself is never
    moved or switched to eval mode."""
    teacher = original.copy()
    teacher.model.to(clf.device).eval()
    return teacher


class _FineTune:
    """One fine-tuning run of ``clf`` on ``fit`` against class ``target``: the trainable
    parameters (the rest frozen), SGD with a one-cycle schedule, the shuffled loader and the
    number of epochs (``opts.epochs``, or :func:`auto_epochs`)."""

    def __init__(self, clf: Classifier, fit: ReferenceData, tf: Any, target: int, s_t: np.ndarray,
                 margin: float, opts: PurifyOptions, batch_size: int, seed: int, dist: Any) -> None:
        self.clf, self.fit, self.tf, self.target, self.margin = clf, fit, tf, target, margin
        self.opts, self.batch_size, self.seed, self.dist = opts, batch_size, seed, dist
        self.params = trainable_parameters(clf, opts.train)
        for p in clf.model.parameters():
            p.requires_grad_(False)
        for p in self.params:
            p.requires_grad_(True)
        self.opt = torch.optim.SGD(self.params, lr=opts.lr, momentum=0.9, weight_decay=5e-4)
        loader = make_loader(fit, tf, batch_size=batch_size, shuffle=True, seed=seed)
        # a last batch of a handful of samples destabilises BatchNorm and SGD (benchmarks saw it)
        self.loader = torch.utils.data.DataLoader(
            loader.dataset, batch_size=batch_size, shuffle=True, generator=loader.generator,
            drop_last=len(fit) > batch_size, collate_fn=loader.collate_fn,
        )
        self.teacher: Classifier | None = None
        self.s_now = torch.as_tensor(s_t, dtype=torch.float32, device=clf.device)
        self.s = self.s_now  # scale * s_t (warmed up) this epoch, (d,)

    def train(self, original: Classifier, progress: bool) -> list[dict[str, float]]:
        """Fine-tune (``original``: the teacher of the KL terms); returns the per-epoch history
        without the total loss, the model left in eval mode with every parameter trainable and
        :attr:`teacher` a copy of ``original`` on its device, in eval mode."""
        clf, opts = self.clf, self.opts
        # a copy: the caller's model stays as it was
        self.teacher = _teacher(original, clf) if opts.distill > 0 or opts.keep > 0 else None
        # several processes (torchrun / accelerate launch): each takes its share of every epoch and
        # gradients are averaged (DDP semantics); one process: the loader as it is
        steps = steps_per_epoch(self.loader, self.dist)
        self.auto = opts.epochs is None
        self.epochs = auto_epochs(steps) if opts.epochs is None else opts.epochs
        sched = torch.optim.lr_scheduler.OneCycleLR(self.opt, max_lr=opts.lr,
                                                    total_steps=max(1, self.epochs * steps))
        augment_fn: Callable[[torch.Tensor], torch.Tensor] | None = None
        if opts.augment:
            augment_fn = partial(shift_flip, generator=torch.Generator().manual_seed(self.seed))
        history = finetune_loop(
            self.step, self.loader, self.opt, params=self.params, epochs=self.epochs, dist=self.dist,
            scheduler=sched, device=clf.device, seed=self.seed, before_epoch=self.before_epoch,
            progress=progress, model=clf.model, batch_transform=augment_fn, sam_rho=opts.sam_rho,
            sam_adaptive=opts.sam_adaptive,
        )
        for h in history:
            h.pop("loss", None)
        for p in clf.model.parameters():
            p.requires_grad_(True)
        clf.model.eval()
        if self.teacher is None:  # the guarded model's numbers need the original beside it
            self.teacher = _teacher(original, clf)
        return history

    def before_epoch(self, epoch: int) -> None:
        """Re-solve s_t when due, set this epoch's ``scale * s_t`` (warmed up), train mode."""
        clf, opts = self.clf, self.opts
        if opts.resolve_every and epoch > 0 and epoch % opts.resolve_every == 0:
            s_new = _solve_target(clf, self.fit, self.tf, self.target, self.batch_size, self.margin)
            self.s_now = torch.as_tensor(s_new, dtype=torch.float32, device=clf.device)
        self.s = warmup_factor(epoch, self.epochs, opts.warmup) * opts.scale * self.s_now
        clf.model.train()
        if opts.freeze_norm:
            _freeze_batchnorm(clf.model)

    def step(self, x: torch.Tensor, y: torch.Tensor) -> dict[str, torch.Tensor]:
        """The losses of one batch ``x (B, ...)``, ``y (B,)``."""
        opts, t_logits = self.opts, None
        if self.teacher is not None:
            with torch.no_grad():
                t_logits = self.teacher.forward(x)[0]
        loss, loss_clean, loss_trig = purification_loss(
            self.clf, x, y, self.s, beta=opts.beta, teacher_logits=t_logits, distill=opts.distill,
            keep=opts.keep, target=self.target, target_weight=opts.target_weight,
        )
        return {"loss": loss, "loss_clean": loss_clean, "loss_trigger": loss_trig}


def _params(opts: PurifyOptions, run: _FineTune, **runtime: Any) -> dict[str, Any]:
    """The purification's ``params`` (the record's): the options as given, the epochs run, and
    ``runtime`` (``batch_size``, ``seed``, ``threads``, ``determinism``, ``processes``)."""
    return {
        "beta": opts.beta, "scale": opts.scale, "epochs": run.epochs, "epochs_auto": run.auto, "lr": opts.lr,
        "batch_size": runtime["batch_size"], "train": opts.train, "holdout": opts.holdout,
        "resolve_every": opts.resolve_every, "freeze_norm": opts.freeze_norm, "distill": opts.distill,
        "keep": opts.keep, "warmup": opts.warmup, "target_weight": opts.target_weight,
        "seed": runtime["seed"], "max_accuracy_drop": opts.max_accuracy_drop, "augment": opts.augment,
        "sam_rho": opts.sam_rho, "sam_adaptive": opts.sam_adaptive, "threads": runtime["threads"],
        "determinism": runtime["determinism"], "processes": runtime["processes"],
    }


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
