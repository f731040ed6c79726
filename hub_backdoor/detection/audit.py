"""``audit()``: adapters -> reference pass -> QP reconstruction -> detection -> report."""

from __future__ import annotations

import datetime as _dt
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from ..adapters import Classifier, load_classifier
from ..defaults import VERIFY
from ..distributed import resolve
from ..errors import OptionError
from ..sources.reference import ReferenceData, StreamingReference, reference_data
from . import rules as detection
from .calibration import load_calibration
from .embeddings import ReferencePass, reference_pass
from .reconstruction import Reconstruction, reconstruct_distributed
from .report import AuditReport, ClassRow, Verdict, library_versions
from .rules import AUDIT_RULES, REGISTRY, DetectionInput, detect
from .validation import (
    MIN_CLASS_SAMPLES,
    check_audit_options,
    default_min_accuracy,
    head_fingerprint,
    reference_gate,
)
from .verification import (
    InputVerification,
    MaskVerification,
    reference_inputs,
    verify_input_space,
    verify_mask,
)

__all__ = ["audit", "build_report"]


#: The input-space search's defaults (:data:`hub_backdoor.defaults.VERIFY`).
VERIFY_ALL_UP_TO = VERIFY["all_up_to"]
VERIFY_TOP = VERIFY["top"]
VERIFY_IMAGES = VERIFY["images"]


def screened_classes(norms: np.ndarray, perturbations: np.ndarray, h_std: np.ndarray, *,
                     top: int = VERIFY_TOP) -> list[int] | None:
    """The classes the input-space searches run on: all (``None``) for ``C <= VERIFY_ALL_UP_TO``,
    else the ``top`` classes the latent rule (``detection.LATENT_RULE``) scores highest (ties: smaller
    norm first). ``norms (C,)``, ``perturbations (C, d)``, ``h_std (d,)``."""
    C = len(norms)
    if C <= VERIFY_ALL_UP_TO:
        return None
    latent = DetectionInput(norms=norms, perturbations=perturbations, h_std=h_std)
    score = detection.RULES[detection.LATENT_RULE](latent)
    order = np.lexsort((np.asarray(norms), -np.asarray(score)))
    return sorted(int(k) for k in order[:top])


def audit(
    source: Any,
    dataset: Any,
    *,
    transform: Any = None,
    image_column: str | None = None,
    label_column: str | None = None,
    max_samples: int | None = None,
    seed: int = 0,
    threshold: float | None = None,
    rule: str | None = None,
    margin: float = 0.0,
    solver: str = "daqp",
    soft_margin: float | None = None,
    batch_size: int = 64,
    device: str | torch.device | None = None,
    progress: bool = True,
    accelerator: Any = None,
    min_reference_accuracy: float | None = None,
    min_class_samples: int = MIN_CLASS_SAMPLES,
    verify_images: int = VERIFY_IMAGES,
    verify_top: int = VERIFY_TOP,
    **load_kw: Any,
) -> AuditReport:
    """Audit a classifier for a single-target backdoor.

    Args:
        source: anything :func:`load_classifier` accepts (model, folder, Hub id, Classifier).
        dataset: clean labelled reference data: a ``datasets.Dataset`` (one split), an
            ``(images, labels)`` pair, or a stream (``datasets.IterableDataset`` from
            ``load_dataset(..., streaming=True)``; memory then stays bounded by one batch).
        transform: maps one raw image to a model input tensor; default: the model's own
            preprocessing.
        image_column, label_column, max_samples, seed, threshold, rule, margin, solver, soft_margin,
            batch_size, device, min_reference_accuracy, min_class_samples, verify_images,
            verify_top: the audit's options, each documented (with its default) in
            :class:`hub_backdoor.options.AuditOptions`.
        progress: show progress bars.
        accelerator: several processes / a GPU with ``accelerate``: ``None`` (auto: an ``Accelerator``
            under ``torchrun`` / ``accelerate launch``), ``True``, ``False`` or an ``Accelerator``. The
            reference pass and the QPs are split over the processes, detection runs on the main one,
            and every process returns its report (:mod:`hub_backdoor.distributed`).
        **load_kw: passed to :func:`load_classifier` (``revision=``, ``head=``, ...).

    Returns:
        An :class:`AuditReport`; ``report.perturbations`` holds all ``(C, d)`` perturbations.

    Raises:
        OptionError: an option is out of range (e.g. a threshold that is not a number > 0), before
            anything is loaded; other ``HubBackdoorError`` subclasses for unusable models and data.
    """
    t_start = time.perf_counter()
    rule, threshold = _rule_and_threshold(rule, threshold)
    check_audit_options(
        threshold=threshold, soft_margin=soft_margin, margin=margin, seed=seed, max_samples=max_samples,
        batch_size=batch_size, device=device, min_reference_accuracy=min_reference_accuracy,
        min_class_samples=min_class_samples, verify_top=verify_top, verify_images=verify_images,
    )
    torch.manual_seed(seed)
    dist = resolve(accelerator)
    clf = load_classifier(source, **load_kw)
    data = reference_data(dataset, image_column=image_column, label_column=label_column)
    data = data.subset(max_samples, seed)
    ref = reference_pass(clf, data, transform=transform, batch_size=batch_size, progress=progress,
                         device=device, accelerator=dist)
    qp: dict[str, Any] = dict(margin=margin, solver=solver, soft_margin=soft_margin,
                              progress=progress and dist.is_main)
    run = _Computed(clf, data, ref, *_reconstruct(clf, ref, dist, REGISTRY[rule].needs, qp), dist)
    # the cheap data gates first: when the reference data cannot support a verdict, the
    # input-space searches (minutes on a large model) could not change that
    run.reason = reference_gate(accuracy=ref.accuracy, counts=ref.state.counts,
                                min_reference_accuracy=min_reference_accuracy,
                                min_class_samples=min_class_samples)
    settings = _Settings(rule, threshold, margin, solver, soft_margin, max_samples, batch_size, transform,
                         seed, progress, min_reference_accuracy, min_class_samples, verify_images,
                         verify_top)
    report = dist.run(lambda: _detect_and_report(run, settings, t_start) if dist.is_main else None)
    return _shared(report, run) if dist.active else report


def _shared(report: AuditReport | None, run: _Computed) -> AuditReport:
    """The main process's report on every process, each with the ``(C, d)`` perturbations (they
    are not sent)."""
    if report is not None:
        report.perturbations = None
    shared: AuditReport = run.dist.broadcast_object(report)
    shared.perturbations = np.asarray(run.rec.perturbations)
    return shared


def _rule_and_threshold(rule: str | None, threshold: float | None) -> tuple[str, float]:
    """The rule (None: the library default) and its threshold (None: the rule's own); an unknown
    rule is an :class:`~hub_backdoor.errors.OptionError`."""
    if rule is None:
        rule = detection.DEFAULT_RULE
    if rule not in AUDIT_RULES:
        raise OptionError(f"--rule / rule={rule!r} is not a rule the audit computes; choose one of "
                          f"{', '.join(AUDIT_RULES)}")
    if threshold is None:
        threshold = REGISTRY[rule].threshold
    return rule, threshold


def _reconstruct(clf: Classifier, ref: ReferencePass, dist: Any, needs: Any, qp: dict[str, Any]
                 ) -> tuple[Reconstruction, Reconstruction | None, Any]:
    """The latent reconstruction of every class (``perturbations (C, d)``), the non-negative one
    when the rule ``needs`` it (else None), and ``needs``."""
    W, b = clf.head_numpy()
    rec = reconstruct_distributed(W, b, ref.state, dist, **qp)
    nonneg = (
        reconstruct_distributed(W, b, ref.state, dist, nonneg=True, **qp) if "nonneg" in needs else None
    )
    return rec, nonneg, needs


@dataclass
class _Computed:
    """What an audit computed before detection: the reference pass, the latent reconstruction
    (``rec``; ``nonneg``: the non-negative one or None), the rule's ``needs`` and the data gate's
    ``reason`` (None: the data supports a verdict)."""

    clf: Classifier
    data: ReferenceData | StreamingReference
    ref: ReferencePass
    rec: Reconstruction
    nonneg: Reconstruction | None
    needs: Any
    dist: Any
    reason: str | None = None


@dataclass
class _Settings:
    """The options of one audit, as :func:`audit` resolved them."""

    rule: str
    threshold: float
    margin: float
    solver: str
    soft_margin: float | None
    max_samples: int | None
    batch_size: int
    transform: Any
    seed: int
    progress: bool
    min_reference_accuracy: float | None
    min_class_samples: int
    verify_images: int
    verify_top: int


def _detect_and_report(run: _Computed, o: _Settings, t_start: float) -> AuditReport:
    """The input-space searches the rule needs (skipped when the data gate failed), detection, and
    the report (on the main process)."""
    clf = run.clf
    ver, mask = _verify(run, o)
    C = clf.num_classes
    unsearched = np.full(C, np.nan)
    t0 = time.perf_counter()
    det = detect(
        DetectionInput(
            norms=run.rec.norms, perturbations=run.rec.perturbations, h_std=run.ref.h_std,
            nonneg_norms=None if run.nonneg is None else run.nonneg.norms,
            # a search skipped by the data gate: no class searched, no input-space evidence
            input_bounds=(ver.full_bounds(C) if ver is not None
                          else unsearched if "input" in run.needs else None),
            mask_l1=mask.full_l1(C) if mask is not None else unsearched if "mask" in run.needs else None,
        ),
        rule=o.rule,
        threshold=o.threshold,
    )
    t_detect = time.perf_counter() - t0
    return build_report(
        clf, run.ref, run.rec, det, data=run.data, seed=o.seed, reason=run.reason, verification=ver,
        mask=mask, params=_report_params(run, o),
        timings={
            "reference_pass": run.ref.seconds,
            "qp": run.rec.seconds + (run.nonneg.seconds if run.nonneg is not None else 0.0),
            **({"input_verification": ver.seconds} if ver is not None else {}),
            **({"mask_verification": mask.seconds} if mask is not None else {}),
            "detection": t_detect,
            "total": time.perf_counter() - t_start,
        },
    )


def _verify(run: _Computed, o: _Settings) -> tuple[InputVerification | None, MaskVerification | None]:
    """The input-space searches the rule needs, on a bounded sample of the reference data (the
    model runs again), or ``(None, None)`` (none needed, or the data gate failed)."""
    ver = mask = None
    clf, needs = run.clf, run.needs
    if needs & {"input", "mask"} and run.reason is None:
        x, y = reference_inputs(run.data, o.transform or clf.preprocess, n_images=o.verify_images,
                                seed=o.seed, device=clf.device)
        classes = screened_classes(run.rec.norms, run.rec.perturbations, run.ref.h_std, top=o.verify_top)
        if "input" in needs:
            ver = verify_input_space(clf, x, y, classes=classes, n_images=o.verify_images, seed=o.seed,
                                     progress=o.progress)
        if "mask" in needs:
            mask = verify_mask(clf, x, y, classes=classes, seed=o.seed, progress=o.progress)
    return ver, mask


def _report_params(run: _Computed, o: _Settings) -> dict[str, Any]:
    """The report's ``params``: the options as the audit ran them."""
    return {
        "rule": o.rule, "threshold": o.threshold, "margin": o.margin, "solver": o.solver,
        "soft_margin": o.soft_margin, "max_samples": o.max_samples, "batch_size": o.batch_size,
        "transform": None if o.transform is None else repr(o.transform),
        "num_processes": run.dist.world, "streaming": isinstance(run.data, StreamingReference),
        "min_reference_accuracy": (
            default_min_accuracy(run.clf.num_classes) if o.min_reference_accuracy is None
            else float(o.min_reference_accuracy)
        ),
        "min_class_samples": o.min_class_samples,
        **({"verify_images": o.verify_images, "verify_top": o.verify_top}
           if run.needs & {"input", "mask"} else {}),
    }


def build_report(
    clf: Classifier,
    ref: ReferencePass,
    rec: Reconstruction,
    det: Any,
    *,
    data: ReferenceData | StreamingReference,
    seed: int,
    params: dict[str, Any],
    timings: dict[str, float],
    reason: str | None = None,
    verification: InputVerification | None = None,
    mask: MaskVerification | None = None,
) -> AuditReport:
    """The report of one audit; ``reason`` (from :func:`~hub_backdoor.detection.validation.reference_gate`)
    makes the verdict ``"inconclusive"`` whatever was flagged."""
    names = data.class_names or getattr(clf, "class_names", None) or [str(k) for k in range(clf.num_classes)]
    C = clf.num_classes
    cal = load_calibration(det.rule)
    covered = cal is not None and cal.covers(C)
    # p-values borrowed from models of another class count would mislead: none are given
    pv = cal.p_values(det.scores) if covered and cal is not None else None
    bounds = None if verification is None else verification.full_bounds(C)
    l1 = None if mask is None else mask.full_l1(C)
    rows = _class_rows(C, names, ref, rec, det, pv, bounds, l1)
    evidence = _evidence(det.rule, timings, verification, mask, cal, rec=rec, covered=covered,
                         searched_all=verification is None or len(verification.classes) == C)
    notes = _data_notes(ref, rec, clf.num_classes)
    target = det.target
    W, b = clf.head_numpy()
    verdict: Verdict
    if reason is None and not det.flagged and not covered:
        reason = outside_calibration(C, cal)
    if cal is not None and not covered:
        notes.append(f"outside calibration: {C} classes, while the thresholds and p-values rest on "
                     f"{cal.coverage()}; a flagged class is evidence, no p-value is given")
    if reason is not None:
        verdict = "inconclusive"
    else:
        verdict = "backdoor" if det.flagged else "clean"
    return AuditReport(
        verdict=verdict,
        reason=reason,
        evidence=evidence,
        target=target,
        flagged=list(det.flagged),
        classes=rows,
        model={
            "name": clf.name, "kind": clf.kind, "class": type(clf.model).__name__,
            "source": clf.source, "num_classes": clf.num_classes, "embed_dim": clf.embed_dim,
            "head_sha256": head_fingerprint(W, b),
        },
        params=params,
        data={
            "n": ref.n, "accuracy": ref.accuracy, "fingerprint": ref.fingerprint,
            "exactness": ref.exactness, "description": ref.description,
        },
        timings=timings,
        versions=library_versions(),
        seed=seed,
        created=_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        notes=notes,
        target_perturbation=None if target is None else rec.perturbations[target].tolist(),
        perturbations=np.asarray(rec.perturbations),
    )


def _class_rows(C: int, names: Any, ref: ReferencePass, rec: Reconstruction, det: Any, pv: np.ndarray | None,
                bounds: np.ndarray | None, l1: np.ndarray | None) -> list[ClassRow]:
    """One row per class of the ``C``: its norm ``rec.norms (C,)``, score ``det.scores (C,)``,
    reference count, and (where given and finite) its p-value, input bound and mask L1, each ``(C,)``."""

    def opt(a: np.ndarray | None, k: int) -> float | None:
        return None if a is None or not np.isfinite(a[k]) else float(a[k])

    return [
        ClassRow(
            index=k,
            name=str(names[k]) if k < len(names) else str(k),
            norm=float(rec.norms[k]),
            anomaly_index=float(det.scores[k]),
            flagged=k in det.flagged,
            n_reference=int(ref.state.counts[k]),
            p_value=opt(pv, k),
            input_bound=opt(bounds, k),
            mask_l1=opt(l1, k),
        )
        for k in range(C)
    ]


def _data_notes(ref: ReferencePass, rec: Reconstruction, num_classes: int) -> list[str]:
    """The reconstruction's notes, then the reference data's: classes without samples, mixed
    image sizes."""
    notes = list(rec.notes)
    missing = [k for k in range(num_classes) if ref.state.counts[k] == 0]
    if missing:
        notes.append(f"no reference samples of classes {missing[:20]}{'...' if len(missing) > 20 else ''}")
    if len(ref.input_sizes) > 1:
        shown = ", ".join(f"{s[0]}x{s[1]}" for s in ref.input_sizes[:4] if len(s) == 2)
        notes.append(
            f"the reference images come in {len(ref.input_sizes)}{'+' if len(ref.input_sizes) >= 8 else ''} "
            f"sizes ({shown}, ...); the model's preprocessing resized them all to its input size, and "
            "images unlike the model's training data weaken the audit: prefer images of its input size"
        )
    return notes


def outside_calibration(num_classes: int, cal: Any) -> str:
    """The reason an audit that flags nothing is not a clean verdict: no clean calibration model
    is like this one (``cal``: its :class:`~hub_backdoor.detection.calibration.Calibration`, or None)."""
    base = "none" if cal is None else cal.coverage()
    return (f"outside calibration: no class stood out, but the thresholds rest on {base}, not on "
            f"{num_classes}-class models, so a miss rate cannot be given; read the scores, or "
            "calibrate on clean models like this one")


def _evidence(rule: str, timings: dict[str, float], verification: InputVerification | None,
              mask: MaskVerification | None, cal: Any, *, rec: Reconstruction, covered: bool,
              searched_all: bool) -> dict[str, Any]:
    """What the verdict rests on, stage by stage, with each stage's cost in seconds."""
    C = len(rec.norms)
    unreachable = int(np.isinf(rec.norms).sum())
    latent: dict[str, Any] = {
        "stage": "latent reconstruction", "what": "the smallest change s_k of the penultimate embedding "
        "that sends every reference image to class k (one QP per class)",
        "seconds": float(timings.get("reference_pass", 0.0) + timings.get("qp", 0.0)),
    }
    if unreachable:
        latent["unreachable_classes"] = unreachable
        latent["why"] = (f"{unreachable} of {C} classes: no universal latent change reaches them "
                         "(C - 1 >= d or affinely dependent class weights), so they carry no latent evidence")
    stages: list[dict[str, Any]] = [latent]
    if mask is not None:
        stages.append({"stage": "mask verification", "what": "per class, the smallest stamped mask "
                       "(patch or blend) that sends the reference images to k", "seconds": mask.seconds,
                       "steps": mask.steps, "images_per_step": mask.batch, "pixels": mask.pixels})
    if verification is not None:
        add: dict[str, Any] = {
            "stage": "additive verification", "what": "per class, the smallest universal L2 "
            f"input change that sends {verification.flip:.0%} of the reference images to k",
            "seconds": verification.seconds, "images": verification.n_images,
            "classes": len(verification.classes)}
        if not searched_all:
            add["why"] = (f"{len(verification.classes)} of {C} classes searched: those the latent rule "
                          f"ranks most suspicious (more than {VERIFY_ALL_UP_TO} classes)")
        stages.append(add)
    if verification is None and mask is None and REGISTRY[rule].needs & {"input", "mask"}:
        stages.append({"stage": "input-space searches", "seconds": 0.0,
                       "why": "skipped: the reference data cannot support a verdict"})
    return {
        "rule": rule, "summary": REGISTRY[rule].summary, "stages": stages,
        "calibration": None if cal is None else {"source": cal.source, "n_clean_models": cal.n,
                                                 "families": list(cal.families),
                                                 "num_classes": list(cal.num_classes),
                                                 "covers_this_model": covered,
                                                 "detection": cal.detection},
    }
