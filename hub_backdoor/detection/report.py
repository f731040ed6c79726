"""The audit report: a versioned, JSON-serialisable record of one audit.

Schema (``schema_version`` "3"; documented in docs/formats.md; "1" and "2" reports still load):
  verdict            "backdoor" | "clean" | "inconclusive" (the reference data cannot support a verdict)
  reason             why the verdict is inconclusive (what to fix), else null
  target             flagged class with the largest anomaly index, or null
  flagged            all flagged classes, most anomalous first
  classes            per class: index, name, norm, anomaly_index (the rule's score, larger = more
                     suspicious), flagged, n_reference, p_value (against clean calibration models,
                     or null), input_bound and mask_l1 (input-space evidence, or null)
  evidence           rule, its summary, stages (what ran and its seconds), calibration
  model              name, kind, source, num_classes, embed_dim, head_sha256 (fingerprint of W, b)
  params             detection rule, threshold, margin, solver, soft_margin, max_samples, batch_size
  data               n, accuracy, fingerprint (SHA-256 of the exact inputs), description; the CLI
                     adds source: {name, kind ("hub" | "disk" | "imagefolder"), split, revision}
  timings            seconds: reference_pass, qp, detection, total
  versions           python, hub_backdoor and the libraries that shape the result
  seed, created, notes
  target_perturbation  s_t (d floats) for purification, or null
"""

from __future__ import annotations

import dataclasses
import json
import os
import platform
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, get_args

import numpy as np

from ..errors import ReportError

__all__ = [
    "AuditReport", "ClassRow", "READABLE_VERSIONS", "SCHEMA_VERSION", "VERDICTS", "Verdict",
    "atomic_write_text", "current_umask", "jsonable", "library_versions",
]

SCHEMA_VERSION = "3"
#: Versions :meth:`AuditReport.from_dict` reads ("1": no inconclusive verdict, no head fingerprint).
READABLE_VERSIONS = ("1", "2", "3")
Verdict = Literal["backdoor", "clean", "inconclusive"]
VERDICTS: tuple[Verdict, ...] = get_args(Verdict)


def library_versions() -> dict[str, str]:
    """Versions of Python, hub_backdoor and every library that can change a result."""
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": platform.python_version()}
    for pkg in (
        "hub-backdoor", "torch", "timm", "transformers", "huggingface-hub", "datasets",
        "accelerate", "cvxpy", "daqp", "numpy",
    ):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            pass
    return out


@dataclass
class ClassRow:
    """One class's line in the report."""

    index: int
    name: str
    norm: float
    anomaly_index: float
    flagged: bool
    n_reference: int
    #: conformal p-value of the score against the clean calibration models (None: no calibration)
    p_value: float | None = None
    #: input-space evidence, when the rule ran it: the smallest universal L2 input change that
    #: sends 90 % of the images to this class, and the smallest stamped mask (pixels) that does
    input_bound: float | None = None
    mask_l1: float | None = None


@dataclass
class AuditReport:
    """The result of :func:`hub_backdoor.audit`. See the module docstring for the schema."""

    verdict: Verdict
    target: int | None
    flagged: list[int]
    classes: list[ClassRow]
    model: dict[str, Any]
    params: dict[str, Any]
    data: dict[str, Any]
    timings: dict[str, float]
    versions: dict[str, str]
    seed: int
    created: str
    notes: list[str] = field(default_factory=list)
    target_perturbation: list[float] | None = None
    reason: str | None = None
    #: what the verdict rests on: the rule, its stages with their cost, the calibration
    evidence: dict[str, Any] = field(default_factory=dict)
    schema_version: str = SCHEMA_VERSION
    #: in-memory only: the full (C, d) perturbation matrix of this audit
    perturbations: np.ndarray | None = field(default=None, repr=False, compare=False)

    @property
    def backdoor_found(self) -> bool:
        return self.verdict == "backdoor"

    @property
    def inconclusive(self) -> bool:
        return self.verdict == "inconclusive"

    @property
    def norms(self) -> np.ndarray:
        return np.array([r.norm for r in self.classes])

    @property
    def anomaly_indices(self) -> np.ndarray:
        return np.array([r.anomaly_index for r in self.classes])

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d.pop("perturbations")
        return jsonable(d)

    def to_json(self, path: str | os.PathLike | None = None, *, indent: int = 2) -> str:
        """The report as JSON; also written atomically to ``path`` when given."""
        text = json.dumps(self.to_dict(), indent=indent, allow_nan=False)
        if path is not None:
            atomic_write_text(Path(path), text + "\n")
        return text

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> AuditReport:
        if not isinstance(d, dict):
            raise ReportError(f"report is a JSON {type(d).__name__}, not an object")
        version = str(d.get("schema_version", ""))
        if version not in READABLE_VERSIONS:
            raise ReportError(
                f"report schema version {version or 'missing'} is not supported (expected "
                f"{' or '.join(READABLE_VERSIONS)})"
            )
        try:
            d = dict(d)
            if not isinstance(d.get("classes"), list) or not all(isinstance(r, dict) for r in d["classes"]):
                raise ReportError("report field 'classes' must be a list of objects")
            d["classes"] = [ClassRow(**r) for r in d["classes"]]
            names = {f.name for f in dataclasses.fields(cls)} - {"perturbations"}
            missing = {f.name for f in dataclasses.fields(cls) if f.default is dataclasses.MISSING
                       and f.default_factory is dataclasses.MISSING} - set(d)
            if missing:
                raise ReportError(f"report is missing fields {sorted(missing)}")
            report = cls(**{k: v for k, v in d.items() if k in names})
        except (TypeError, KeyError) as e:
            raise ReportError(f"report does not match schema {version}: {e}") from None
        _check_fields(report)
        return report

    @classmethod
    def from_json(cls, text_or_path: str | os.PathLike) -> AuditReport:
        """Load from a JSON string or a file path."""
        s = str(text_or_path)
        if not s.lstrip().startswith("{"):
            try:
                s = Path(s).read_text()
            except OSError as e:
                raise ReportError(f"cannot read report {text_or_path}: {e.strerror}") from None
        try:
            return cls.from_dict(json.loads(s))
        except json.JSONDecodeError as e:
            raise ReportError(f"report is not valid JSON ({e.msg} at line {e.lineno})") from None
        except RecursionError:
            raise ReportError("report is not a report: its JSON is nested too deeply") from None

    def _p_text(self, row: ClassRow) -> str:
        cal = self.evidence.get("calibration") or {}
        if row.p_value is None or not cal.get("n_clean_models"):
            return ""
        return f"; p = {row.p_value:.2g} against {cal['n_clean_models']} clean calibration models"

    def summary(self) -> str:
        """A few plain lines for people."""
        name = self.model.get("name", "model")
        if self.inconclusive:
            head = f"{name}: INCONCLUSIVE, no verdict: {self.reason or 'the reference data is unusable'}"
        elif self.backdoor_found and self.target is not None:
            row = self.classes[self.target]
            head = (
                f"{name}: BACKDOOR suspected, target class {row.index} ({row.name}); "
                f"score {row.anomaly_index:.2f} > {self.params['threshold']}{self._p_text(row)}"
            )
        else:
            top = int(np.argmax(self.anomaly_indices))
            head = (
                f"{name}: no backdoor found (highest score {self.anomaly_indices[top]:.2f}, "
                f"class {top}; threshold {self.params['threshold']}{self._p_text(self.classes[top])})"
            )
        return head + f"\n  reference: {self.data['n']} samples, accuracy {self.data['accuracy']:.3f}"


def _number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def _check_fields(r: AuditReport) -> None:
    """Refuse a report whose fields have the wrong types, so that nothing fails later on them."""

    def bad(field_name: str, want: str) -> ReportError:
        return ReportError(f"report field {field_name!r} must be {want}")

    C = len(r.classes)
    if r.verdict not in VERDICTS:
        raise bad("verdict", " or ".join(repr(v) for v in VERDICTS))
    for k, row in enumerate(r.classes):
        if not isinstance(row.index, int) or isinstance(row.index, bool) or row.index != k:
            raise bad(f"classes[{k}].index", f"the integer {k}")
        if not isinstance(row.name, str):
            raise bad(f"classes[{k}].name", "a string")
        for attr in ("norm", "anomaly_index"):
            value = getattr(row, attr)
            if value is None:  # non-finite values are written as null
                setattr(row, attr, float("nan"))
            elif not _number(value):
                raise bad(f"classes[{k}].{attr}", "a number")
        if not isinstance(row.flagged, bool):
            raise bad(f"classes[{k}].flagged", "true or false")
        if not isinstance(row.n_reference, int) or isinstance(row.n_reference, bool) or row.n_reference < 0:
            raise bad(f"classes[{k}].n_reference", "a count")
    if r.target is not None and (not isinstance(r.target, int) or isinstance(r.target, bool)
                                 or not 0 <= r.target < C):
        raise bad("target", f"null or a class index in 0..{C - 1}")
    if not isinstance(r.flagged, list) or not all(
        isinstance(k, int) and not isinstance(k, bool) and 0 <= k < C for k in r.flagged
    ):
        raise bad("flagged", f"a list of class indices in 0..{C - 1}")
    for name in ("model", "params", "data", "timings", "versions"):
        if not isinstance(getattr(r, name), dict):
            raise bad(name, "an object")
    if not isinstance(r.seed, int) or isinstance(r.seed, bool):
        raise bad("seed", "an integer")
    if not isinstance(r.notes, list) or not all(isinstance(n, str) for n in r.notes):
        raise bad("notes", "a list of strings")
    if r.reason is not None and not isinstance(r.reason, str):
        raise bad("reason", "null or a string")
    tp = r.target_perturbation
    if tp is not None and (not isinstance(tp, list) or not all(_number(v) for v in tp)):
        raise bad("target_perturbation", "null or a list of numbers")
    th = r.params.get("threshold")
    if th is not None and not _number(th):
        raise bad("params.threshold", "a number")
    acc = r.data.get("accuracy")
    if acc is not None and not _number(acc):
        raise bad("data.accuracy", "a number")


def jsonable(x: Any) -> Any:
    if isinstance(x, dict):
        return {str(k): jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [jsonable(v) for v in x]
    if isinstance(x, np.ndarray):
        return jsonable(x.tolist())
    if isinstance(x, np.generic):
        return x.item()
    if isinstance(x, float) and not np.isfinite(x):
        return None
    if isinstance(x, Path):
        return str(x)
    return x


def current_umask() -> int:
    """The process umask (read by setting and restoring it)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def atomic_write_text(path: Path, text: str) -> None:
    """Write via a temporary file in the same folder and rename, so readers never see half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.chmod(tmp, 0o666 & ~current_umask())  # mkstemp makes 0600; give the usual permissions
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
