"""Checks of options and paths, run before any work so that bad input costs nothing.

Every check raises a :class:`~hub_backdoor.errors.HubBackdoorError` subclass (exit code 2) whose one
line names the option both ways (``--threshold / threshold=``), so the CLI and the Python API say
the same thing. The reference-set gate (:func:`reference_gate`) decides when the data cannot support
a verdict; :func:`head_fingerprint` ties a report to the head it was computed from.
"""

from __future__ import annotations

import hashlib
import math
import os
import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import OptionError, OutputPathError, ReportError

__all__ = [
    "MIN_CLASS_SAMPLES",
    "MIN_REFERENCE_ACCURACY",
    "SEED_MAX",
    "check_audit_options",
    "check_device",
    "check_int",
    "check_not_protected",
    "check_number",
    "check_outputs",
    "check_purify_options",
    "check_report_matches",
    "check_seed",
    "check_writable",
    "default_min_accuracy",
    "head_fingerprint",
    "reference_gate",
]

#: Seeds must fit numpy's legacy generator and torch.manual_seed: 0 .. 2**32 - 1.
SEED_MAX = 2**32 - 1
#: Default floor of the model's accuracy on the reference data, besides twice chance (2 / C).
MIN_REFERENCE_ACCURACY = 0.5
#: Default minimum number of reference images of every class for a "clean" verdict.
MIN_CLASS_SAMPLES = 1


def _name(option: str) -> str:
    """``threshold`` -> ``--threshold / threshold=``: the CLI flag and the keyword argument."""
    return f"--{option.replace('_', '-')} / {option}="


def check_number(
    value: Any,
    option: str,
    *,
    gt: float | None = None,
    ge: float | None = None,
    lt: float | None = None,
    le: float | None = None,
) -> float:
    """``value`` as a finite float within the given bounds, else :class:`OptionError`."""
    bounds = " and ".join(
        f"{op} {b:g}" for op, b in ((">", gt), (">=", ge), ("<", lt), ("<=", le)) if b is not None
    )
    want = f"a finite number{' ' + bounds if bounds else ''}"
    if isinstance(value, bool):
        raise OptionError(f"{_name(option)} must be {want}, got {value!r}")
    try:
        x = float(value)
    except (TypeError, ValueError):
        raise OptionError(f"{_name(option)} must be {want}, got {value!r}") from None
    if (
        not math.isfinite(x)
        or (gt is not None and not x > gt)
        or (ge is not None and not x >= ge)
        or (lt is not None and not x < lt)
        or (le is not None and not x <= le)
    ):
        raise OptionError(f"{_name(option)} must be {want}, got {value!r}")
    return x


def check_int(value: Any, option: str, *, minimum: int = 1, maximum: int | None = None) -> int:
    """``value`` as an int within ``[minimum, maximum]``, else :class:`OptionError`."""
    ok = isinstance(value, (int, np.integer)) and not isinstance(value, bool)
    if not ok or value < minimum or (maximum is not None and value > maximum):
        span = f">= {minimum}" if maximum is None else f"in {minimum}..{maximum}"
        raise OptionError(f"{_name(option)} must be an integer {span}, got {value!r}")
    return int(value)


def check_seed(seed: Any) -> int:
    """Seeds are used by numpy and torch, which both take 0 .. 2**32 - 1."""
    return check_int(seed, "seed", minimum=0, maximum=SEED_MAX)


def check_device(device: Any) -> None:
    """Refuse a device torch does not know or this machine does not have (``None``: the default)."""
    if device is None:
        return
    import torch

    try:
        dev = device if isinstance(device, torch.device) else torch.device(str(device))
    except (RuntimeError, ValueError, TypeError):
        raise OptionError(
            f"{_name('device')} {device!r} is not a torch device; use e.g. cpu, cuda, cuda:1 or mps"
        ) from None
    if dev.type == "cpu":
        return
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise OptionError(f"{_name('device')} {device}: no CUDA GPU is available here; use cpu")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise OptionError(
                f"{_name('device')} {device}: this machine has {torch.cuda.device_count()} CUDA device(s)"
            )
        return
    if dev.type == "mps" and not torch.backends.mps.is_available():
        raise OptionError(f"{_name('device')} {device}: MPS is not available here; use cpu")
    try:  # any other backend: it exists only if a tensor can be made on it
        torch.empty(0, device=dev)
    except Exception:  # noqa: BLE001 - backends fail in their own ways
        raise OptionError(f"{_name('device')} {device}: this device is not available here") from None


def default_min_accuracy(num_classes: int) -> float:
    """The default accuracy floor: at least half the reference images right, and twice chance."""
    return max(2.0 / max(num_classes, 1), MIN_REFERENCE_ACCURACY)


def check_audit_options(
    *,
    threshold: Any,
    soft_margin: Any = None,
    margin: Any = 0.0,
    seed: Any = 0,
    max_samples: Any = None,
    batch_size: Any = 64,
    device: Any = None,
    min_reference_accuracy: Any = None,
    min_class_samples: Any = MIN_CLASS_SAMPLES,
    verify_top: Any = 1,
    verify_images: Any = 1,
) -> None:
    """The options of :func:`hub_backdoor.audit` (and ``hub-backdoor audit``)."""
    if threshold is not None:  # None: the rule's own threshold
        check_number(threshold, "threshold", gt=0)
    if soft_margin is not None:
        check_number(soft_margin, "soft_margin", gt=0)
    check_number(margin, "margin", ge=0)
    check_seed(seed)
    if max_samples is not None:
        check_int(max_samples, "max_samples")
    check_int(batch_size, "batch_size")
    if min_reference_accuracy is not None:
        check_number(min_reference_accuracy, "min_reference_accuracy", ge=0, le=1)
    check_int(min_class_samples, "min_class_samples", minimum=0)
    check_int(verify_top, "verify_top")
    check_int(verify_images, "verify_images")
    check_device(device)


def check_purify_options(
    *,
    beta: Any,
    scale: Any,
    distill: Any,
    lr: Any,
    epochs: Any = None,
    holdout: Any = 0.2,
    batch_size: Any = 64,
    seed: Any = 0,
    max_samples: Any = None,
    resolve_every: Any = None,
    device: Any = None,
    warmup: Any = 0.0,
    keep: Any = 0.0,
    target_weight: Any = 1.0,
    max_accuracy_drop: Any = 0.01,
    threads: Any = 1,
    sam_rho: Any = 0.0,
) -> None:
    """The options of :func:`hub_backdoor.purify` (and ``hub-backdoor purify``); the accuracy
    budget ``max_accuracy_drop`` is a share (the CLI's ``--max-accuracy-drop`` is in points)."""
    check_number(warmup, "warmup", ge=0, le=1)
    check_number(beta, "beta", ge=0)
    check_number(scale, "scale", gt=0)
    check_number(distill, "distill", ge=0)
    check_number(keep, "keep", ge=0)
    check_number(target_weight, "target_weight", gt=0)
    check_number(sam_rho, "sam_rho", ge=0)
    check_number(max_accuracy_drop, "max_accuracy_drop", ge=0, le=1)
    check_number(lr, "lr", gt=0)
    if epochs is not None:
        check_int(epochs, "epochs")
    check_number(holdout, "holdout", ge=0, lt=1)
    check_int(batch_size, "batch_size")
    check_seed(seed)
    if max_samples is not None:
        check_int(max_samples, "max_samples")
    if resolve_every is not None:
        check_int(resolve_every, "resolve_every")
    check_device(device)
    check_int(threads, "threads")


# -- paths ------------------------------------------------------------------------------------------------
def _overlap(a: Path, b: Path) -> bool:
    """``a`` is ``b``, contains it, or lies inside it (paths already resolved)."""
    return a == b or a in b.parents or b in a.parents


#: Files of an input folder whose symlinks are followed to protect what they point to (a Hub
#: cache snapshot links every file to a blob elsewhere).
_LINKS_SCANNED = 10_000


def _real_paths(path: Path) -> set[Path]:
    """``path`` as given and resolved, and the resolved targets of the symlinks inside it (a
    folder's files, up to ``_LINKS_SCANNED``): writing to any of them would change the input."""
    out = {path.absolute(), path.resolve()}
    if path.is_dir():
        for i, f in enumerate(path.rglob("*")):
            if i >= _LINKS_SCANNED:
                break
            if f.is_symlink():
                out.add(f.resolve())
    return out


def check_not_protected(
    path: str | os.PathLike[str], flag: str, protected: Sequence[tuple[Any, str]]
) -> None:
    """Refuse an output that is, contains or lies inside one of the ``(path, what)`` inputs, or
    any file a symlink inside them points to."""
    out = Path(path).expanduser()
    mine = {out.absolute(), out.resolve()}
    for p, what in protected:
        if p is None:
            continue
        theirs = _real_paths(Path(p).expanduser())
        if any(_overlap(a, b) for a in mine for b in theirs):
            raise OutputPathError(
                f"{flag} {path} would overwrite or write into {what} {p}; choose another path"
            )


#: Free space an output's folder needs before any work starts (a report, a card, a chart).
MIN_FREE_BYTES = 1 << 20


def _check_names(path: Path, flag: str) -> None:
    """Refuse a path with a component longer than a file name may be (checked before any stat,
    which would fail on it)."""
    for part in path.absolute().parts[1:]:
        if len(os.fsencode(part)) > _NAME_MAX:
            raise OutputPathError(f"{flag}: the name {part[:40]}... is longer than the {_NAME_MAX} bytes a "
                                  "file name may have; choose a shorter one")


#: Longest file name (bytes) of the usual file systems (ext4, APFS, NTFS).
_NAME_MAX = 255


def check_writable(path: str | os.PathLike[str], flag: str, *, folder: bool = False) -> None:
    """Refuse an output path that is a directory (for a file) or whose folder cannot be written.

    The nearest existing ancestor must be a folder in which a file can be created: a probe file is
    made there and removed at once, so an unwritable place fails now, not after the audit.
    """
    p = Path(path).expanduser()
    _check_names(p, flag)
    if not folder and p.is_dir():
        raise OutputPathError(f"{flag} {path} is a directory; give a file path")
    if folder and p.exists() and not p.is_dir():
        raise OutputPathError(f"{flag} {path} exists and is not a folder")
    anc = p.absolute().parent
    while not anc.exists() and anc != anc.parent:
        anc = anc.parent
    if not anc.is_dir():
        raise OutputPathError(f"{flag} {path}: {anc} is not a folder")
    free = shutil.disk_usage(anc).free
    if free < MIN_FREE_BYTES:
        raise OutputPathError(f"{flag} {path}: only {free} bytes free in {anc}; free some space first")
    try:
        fd, probe = tempfile.mkstemp(dir=anc, prefix=".hub-backdoor-probe-")
    except OSError as e:
        raise OutputPathError(f"{flag} {path}: cannot write in {anc} ({e.strerror or e})") from None
    os.close(fd)
    os.unlink(probe)


def check_outputs(
    outputs: Sequence[tuple[Any, str]],
    protected: Sequence[tuple[Any, str]] = (),
) -> None:
    """``outputs``: ``(path or None, flag)``; ``-`` is stdout, allowed for at most one of them."""
    dashes = [flag for p, flag in outputs if p is not None and str(p) == "-"]
    if len(dashes) > 1:
        raise OutputPathError(f"{' and '.join(dashes)} are all '-' (stdout); at most one report can go there")
    for p, flag in outputs:
        if p is not None and str(p) != "-":
            _check_names(Path(p).expanduser(), flag)
    files = [(Path(p).expanduser().resolve(), str(p), flag) for p, flag in outputs
             if p is not None and str(p) != "-"]
    for i, (real, given, flag) in enumerate(files):
        for real2, given2, flag2 in files[:i]:
            if real == real2:
                raise OutputPathError(f"{flag2} {given2} and {flag} {given} are the same file; give each "
                                      "output its own path")
    for p, flag in outputs:
        if p is None or str(p) == "-":
            continue
        if Path(p).expanduser().is_dir():
            raise OutputPathError(f"{flag} {p} is a directory; give a file path")
        check_not_protected(p, flag, protected)  # before the probe, so nothing is made inside an input
        check_writable(p, flag)


# -- reports and models -------------------------------------------------------------------------------
def head_fingerprint(W: np.ndarray, b: np.ndarray) -> str:
    """SHA-256 of the head ``(W (C, d), b (C,))`` as float64, C-contiguous, and its shape."""
    W = np.ascontiguousarray(W, dtype="<f8")
    b = np.ascontiguousarray(b, dtype="<f8")
    h = hashlib.sha256(b"hub-backdoor/head/v1")
    h.update(np.asarray(W.shape, dtype="<i8").tobytes())
    h.update(W.tobytes())
    h.update(b.tobytes())
    return h.hexdigest()


def reference_gate(
    *,
    accuracy: float,
    counts: np.ndarray,
    min_reference_accuracy: float | None,
    min_class_samples: int,
) -> str | None:
    """Why the reference data cannot support a verdict, or None when it can.

    The floor is ``min_reference_accuracy`` (default :func:`default_min_accuracy`); every class needs
    at least ``min_class_samples`` reference images (0 turns that check off).
    """
    counts = np.asarray(counts)
    C = len(counts)
    floor = default_min_accuracy(C) if min_reference_accuracy is None else float(min_reference_accuracy)
    reasons = []
    if accuracy < floor:
        reasons.append(
            f"the model classifies only {accuracy:.1%} of the reference images right (floor {floor:.1%}): "
            "the data does not match the model (wrong images, sizes, labels or class order); "
            "use the data the model was made for, or lower --min-reference-accuracy if it is right"
        )
    few = [int(k) for k in np.flatnonzero(counts < min_class_samples)]
    if few:
        shown = ", ".join(map(str, few[:20])) + (", ..." if len(few) > 20 else "")
        reasons.append(
            f"{len(few)} of {C} classes have fewer than {min_class_samples} reference image(s) "
            f"(classes {shown}); add images of every class, or lower --min-class-samples"
        )
    return "; ".join(reasons) or None


def check_report_matches(report: Any, clf: Any, label: str, flag: str = "--report / report=") -> None:
    """Refuse an audit report of another model: other class count, embedding size or head.

    Reports of schema "1" carry no head fingerprint; their shape is still checked.
    """
    C, d = clf.num_classes, clf.embed_dim
    if len(report.classes) != C:
        raise ReportError(f"{flag} is for a {len(report.classes)}-class model; {label} has {C} classes")
    rd = report.model.get("embed_dim")
    if rd is not None and rd != d:
        raise ReportError(f"{flag} is for a model with embedding size {rd}; {label} has {d}")
    tp = report.target_perturbation
    if tp is not None and len(tp) != d:
        raise ReportError(
            f"{flag} holds a perturbation of dimension {len(tp)}; {label} has embedding size {d}"
        )
    if report.perturbations is not None and np.shape(report.perturbations) != (C, d):
        raise ReportError(
            f"{flag} holds perturbations of shape {np.shape(report.perturbations)}; {label} needs ({C}, {d})"
        )
    fp = report.model.get("head_sha256")
    if fp is not None:
        W, b = clf.head_numpy()
        if fp != head_fingerprint(W, b):
            raise ReportError(
                f"{flag} is the audit of another model (its head fingerprint differs from {label}'s); "
                "audit this model, or pass its own report"
            )
