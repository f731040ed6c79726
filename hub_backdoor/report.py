"""The audit report: a versioned, JSON-serialisable record of one audit.

Schema (``schema_version`` "1"; documented in README "JSON report"):
  verdict            "backdoor" | "clean"
  target             flagged class with the largest anomaly index, or null
  flagged            all flagged classes, most anomalous first
  classes            per class: index, name, norm, anomaly_index, flagged, n_reference
  model              name, kind, source, num_classes, embed_dim
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
from typing import Any

import numpy as np

from .errors import ReportError

SCHEMA_VERSION = "1"


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


@dataclass
class AuditReport:
    """The result of :func:`hub_backdoor.audit`. See the module docstring for the schema."""

    verdict: str
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
    schema_version: str = SCHEMA_VERSION
    #: in-memory only: the full (C, d) perturbation matrix of this audit
    perturbations: np.ndarray | None = field(default=None, repr=False, compare=False)

    @property
    def backdoor_found(self) -> bool:
        return self.verdict == "backdoor"

    @property
    def norms(self) -> np.ndarray:
        return np.array([r.norm for r in self.classes])

    @property
    def anomaly_indices(self) -> np.ndarray:
        return np.array([r.anomaly_index for r in self.classes])

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d.pop("perturbations")
        return _jsonable(d)

    def to_json(self, path: str | os.PathLike | None = None, *, indent: int = 2) -> str:
        """The report as JSON; also written atomically to ``path`` when given."""
        text = json.dumps(self.to_dict(), indent=indent, allow_nan=False)
        if path is not None:
            atomic_write_text(Path(path), text + "\n")
        return text

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> AuditReport:
        version = str(d.get("schema_version", ""))
        if version != SCHEMA_VERSION:
            raise ReportError(
                f"report schema version {version or 'missing'} is not supported (expected {SCHEMA_VERSION})"
            )
        try:
            d = dict(d)
            d["classes"] = [ClassRow(**r) for r in d["classes"]]
            names = {f.name for f in dataclasses.fields(cls)} - {"perturbations"}
            missing = {f.name for f in dataclasses.fields(cls) if f.default is dataclasses.MISSING
                       and f.default_factory is dataclasses.MISSING} - set(d)
            if missing:
                raise ReportError(f"report is missing fields {sorted(missing)}")
            return cls(**{k: v for k, v in d.items() if k in names})
        except (TypeError, KeyError) as e:
            raise ReportError(f"report does not match schema {SCHEMA_VERSION}: {e}") from None

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

    def summary(self) -> str:
        """A few plain lines for people."""
        name = self.model.get("name", "model")
        if self.backdoor_found:
            row = self.classes[self.target]
            head = (
                f"{name}: BACKDOOR suspected, target class {row.index} ({row.name}); "
                f"anomaly index {row.anomaly_index:.2f} > {self.params['threshold']}"
            )
        else:
            top = int(np.argmax(self.anomaly_indices))
            head = (
                f"{name}: no backdoor found (largest anomaly index {self.anomaly_indices[top]:.2f}, "
                f"class {top}; threshold {self.params['threshold']})"
            )
        return head + f"\n  reference: {self.data['n']} samples, accuracy {self.data['accuracy']:.3f}"


def _jsonable(x: Any) -> Any:
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, np.ndarray):
        return _jsonable(x.tolist())
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
