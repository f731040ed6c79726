"""``audit()``: adapters -> reference pass -> QP reconstruction -> detection -> report."""

from __future__ import annotations

import datetime as _dt
import time
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
        image_column, label_column: override the automatic column discovery.
        max_samples: use a seeded random subset of at most this many samples (a stream: its
            first ``max_samples`` examples).
        seed: seeds the subset and torch; recorded in the report.
        threshold: score above which a class is flagged (default: the rule's own, see
            ``hub_backdoor.detection.rules.REGISTRY``).
        rule: detection rule name (one of ``hub_backdoor.detection.rules.AUDIT_RULES``; default
            ``hub_backdoor.detection.rules.DEFAULT_RULE``, ``latent-or-input``). Rules that
            need the input-space verification (``needs={"input"}``) also run
            :func:`hub_backdoor.detection.verification.verify_input_space` on a stratified sample of the
            reference data (``verify_images`` images), on every class up to
            ``VERIFY_ALL_UP_TO`` classes and on the latent screen's ``VERIFY_TOP`` most
            suspicious ones above (:func:`screened_classes`).
        verify_images: reference images of the input-space verification.
        verify_top: above ``VERIFY_ALL_UP_TO`` classes, how many classes the input-space search
            covers (those the latent rule ranks most suspicious; its cost grows with this, not C).
        margin: logit margin m of the QP (0 in the paper).
        solver: ``"daqp"`` (fast) or ``"cvxpy"`` (reference).
        soft_margin: solve the soft-margin QP with this penalty for every class. ``None`` (the
            default) solves the exact problem; where Theorem 1 fails (``C - 1 >= d``, e.g. a
            1000-class head on a 512-wide embedding) each class is solved on its own and a class
            no universal latent change reaches carries no latent evidence
            (:mod:`hub_backdoor.detection.reconstruction`); the input-space search still runs.
        accelerator: run over several processes / on a GPU with ``accelerate``: ``None`` (auto:
            an ``Accelerator`` under ``torchrun`` / ``accelerate launch``, else one plain
            process), ``True``, ``False`` or an ``accelerate.Accelerator``. The reference pass
            and the per-class QPs are split over the processes; detection and the report are
            computed on the main process and the same report is returned on every process (see
            :mod:`hub_backdoor.distributed`).
        min_reference_accuracy: the verdict is ``"inconclusive"`` (never ``"clean"``) when the
            model's accuracy on the reference data is below this; default
            ``max(2 / C, 0.5)`` (:func:`hub_backdoor.detection.validation.default_min_accuracy`).
        min_class_samples: the verdict is ``"inconclusive"`` when a class has fewer reference
            images than this (default 1; 0 turns the check off).
        **load_kw: passed to :func:`load_classifier` (``revision=``, ``head=``, ...).

    Returns:
        An :class:`AuditReport`; ``report.perturbations`` holds all ``(C, d)`` perturbations.

    Raises:
        OptionError: an option is out of range (e.g. a threshold that is not a number > 0), before
            anything is loaded; other :class:`~hub_backdoor.errors.HubBackdoorError` subclasses for
            unusable models and data.
    """
    t_start = time.perf_counter()
    if rule is None:
        rule = detection.DEFAULT_RULE
    if rule not in AUDIT_RULES:
        raise OptionError(f"--rule / rule={rule!r} is not a rule the audit computes; choose one of "
                          f"{', '.join(AUDIT_RULES)}")
    if threshold is None:
        threshold = REGISTRY[rule].threshold
    needs = REGISTRY[rule].needs
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
    ref = reference_pass(
        clf, data, transform=transform, batch_size=batch_size, progress=progress, device=device,
        accelerator=dist,
    )
    W, b = clf.head_numpy()
    qp: dict[str, Any] = dict(margin=margin, solver=solver, soft_margin=soft_margin,
                              progress=progress and dist.is_main)
    rec = reconstruct_distributed(W, b, ref.state, dist, **qp)
    nonneg = (
        reconstruct_distributed(W, b, ref.state, dist, nonneg=True, **qp) if "nonneg" in needs else None
    )

    # the cheap data gates first: when the reference data cannot support a verdict, the
    # input-space searches (minutes on a large model) could not change that
    reason = reference_gate(
        accuracy=ref.accuracy, counts=ref.state.counts, min_reference_accuracy=min_reference_accuracy,
        min_class_samples=min_class_samples,
    )

    def finish() -> AuditReport | None:
        if not dist.is_main:  # detection and the report happen on the main process only
            return None
        ver = mask = None
        if needs & {"input", "mask"} and reason is None:  # the model runs again: a bounded sample
            x, y = reference_inputs(data, transform or clf.preprocess, n_images=verify_images, seed=seed,
                                    device=clf.device)
            classes = screened_classes(rec.norms, rec.perturbations, ref.h_std, top=verify_top)
            if "input" in needs:
                ver = verify_input_space(clf, x, y, classes=classes, n_images=verify_images, seed=seed,
                                         progress=progress)
            if "mask" in needs:
                mask = verify_mask(clf, x, y, classes=classes, seed=seed, progress=progress)
        C = clf.num_classes
        unsearched = np.full(C, np.nan)
        t0 = time.perf_counter()
        det = detect(
            DetectionInput(
                norms=rec.norms, perturbations=rec.perturbations, h_std=ref.h_std,
                nonneg_norms=None if nonneg is None else nonneg.norms,
                # a search skipped by the data gate: no class searched, no input-space evidence
                input_bounds=(ver.full_bounds(C) if ver is not None
                              else unsearched if "input" in needs else None),
                mask_l1=mask.full_l1(C) if mask is not None else unsearched if "mask" in needs else None,
            ),
            rule=rule,
            threshold=threshold,
        )
        t_detect = time.perf_counter() - t0
        return build_report(
            clf, ref, rec, det, data=data, seed=seed, reason=reason, verification=ver, mask=mask,
            params={
                "rule": rule, "threshold": threshold, "margin": margin, "solver": solver,
                "soft_margin": soft_margin, "max_samples": max_samples, "batch_size": batch_size,
                "transform": None if transform is None else repr(transform),
                "num_processes": dist.world, "streaming": isinstance(data, StreamingReference),
                "min_reference_accuracy": (
                    default_min_accuracy(clf.num_classes) if min_reference_accuracy is None
                    else float(min_reference_accuracy)
                ),
                "min_class_samples": min_class_samples,
                **({"verify_images": verify_images, "verify_top": verify_top}
                   if needs & {"input", "mask"} else {}),
            },
            timings={
                "reference_pass": ref.seconds,
                "qp": rec.seconds + (nonneg.seconds if nonneg is not None else 0.0),
                **({"input_verification": ver.seconds} if ver is not None else {}),
                **({"mask_verification": mask.seconds} if mask is not None else {}),
                "detection": t_detect,
                "total": time.perf_counter() - t_start,
            },
        )

    report = dist.run(finish)
    if dist.active:  # every process returns the main process's report
        if report is not None:
            report.perturbations = None
        report = dist.broadcast_object(report)
        report.perturbations = np.asarray(rec.perturbations)
    return report


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

    def opt(a: np.ndarray | None, k: int) -> float | None:
        return None if a is None or not np.isfinite(a[k]) else float(a[k])

    rows = [
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
    evidence = _evidence(det.rule, timings, verification, mask, cal, rec=rec, covered=covered,
                         searched_all=verification is None or len(verification.classes) == C)
    notes = list(rec.notes)
    missing = [k for k in range(clf.num_classes) if ref.state.counts[k] == 0]
    if missing:
        notes.append(f"no reference samples of classes {missing[:20]}{'...' if len(missing) > 20 else ''}")
    if len(ref.input_sizes) > 1:
        shown = ", ".join(f"{s[0]}x{s[1]}" for s in ref.input_sizes[:4] if len(s) == 2)
        notes.append(
            f"the reference images come in {len(ref.input_sizes)}{'+' if len(ref.input_sizes) >= 8 else ''} "
            f"sizes ({shown}, ...); the model's preprocessing resized them all to its input size, and "
            "images unlike the model's training data weaken the audit: prefer images of its input size"
        )
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
