"""Every option of an audit, declared once: its default, its check, its command-line flag and help.

:class:`AuditOptions` is what :func:`hub_backdoor.jobs.audit_source` takes. The ``hub-backdoor``
flags (:func:`add_audit_flags`), the ``[tool.hub-backdoor]`` config keys and the pre-commit hook
flags (:mod:`hub_backdoor.integrations`), the GitHub Action's ``args`` and the webhook's
``audit_options`` are built from or read through it, and ``tests/test_options.py`` checks that every
field reaches each of them with the default of :func:`hub_backdoor.audit`.

This module is light (no torch), so that ``--help`` stays fast.
"""

from __future__ import annotations

import argparse
import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from .defaults import VERIFY
from .detection import rules as detection
from .detection.validation import check_audit_options
from .errors import OptionError

__all__ = ["AUDIT_GROUPS", "AuditOptions", "add_audit_flags", "positive_int"]

#: The defaults of :func:`hub_backdoor.audit` that the options repeat (the test checks they agree).
MIN_CLASS_SAMPLES = 1


def positive_int(text: str) -> int:
    """An argparse type: an integer > 0."""
    value = int(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def _opt(
    default: Any, group: str, help: str, *, type: Any = str, metavar: str | None = None, audit: bool = True
) -> Any:
    """A field with what its flag needs: argparse ``type`` (``bool``: a switch), ``metavar``,
    ``help`` (``{default}`` is filled in) and the help group (``model``, ``data`` or
    ``detection``); ``audit``: whether it is a keyword of :func:`hub_backdoor.audit` (else it
    says how the data is loaded)."""
    return field(
        default=default,
        metadata={"group": group, "help": help, "type": type, "metavar": metavar, "audit": audit},
    )


def _rules_help() -> str:
    rules = ", ".join(detection.AUDIT_RULES)
    return f"detection rule: {rules} (default {detection.DEFAULT_RULE}; see docs/cli.md)"


def _threshold_help() -> str:
    return (
        f"flag classes whose score exceeds this (default: the rule's own; {detection.DEFAULT_RULE}: "
        f"{detection.REGISTRY[detection.DEFAULT_RULE].threshold:g})"
    )


@dataclass(frozen=True)
class AuditOptions:
    """The options of one audit (:func:`hub_backdoor.audit`'s keywords, the data and model aside).

    ``None`` means "found" (columns), "all" (``max_samples``), "the rule's own" (``threshold``),
    "the library default" (``rule``, ``min_reference_accuracy``) or "the exact problem"
    (``soft_margin``)."""

    image_column: str | None = _opt(None, "data", "image column (default: found)", metavar="NAME")
    label_column: str | None = _opt(None, "data", "label column (default: found)", metavar="NAME")
    max_samples: int | None = _opt(
        None, "data", "use a seeded random subset of at most N images", type=positive_int, metavar="N"
    )
    seed: int = _opt(0, "data", "seed for subsets, splits and training (default {default})", type=int)
    batch_size: int = _opt(64, "data", "default {default}", type=positive_int, metavar="N")
    threshold: float | None = _opt(None, "detection", "", type=float)
    rule: str | None = _opt(None, "detection", "", metavar="RULE")
    soft_margin: float | None = _opt(
        None,
        "detection",
        "solve the soft-margin problem with this penalty for every class (default: the exact problem; "
        "where C - 1 >= d a class no universal latent change reaches carries no latent evidence)",
        type=float,
        metavar="PENALTY",
    )
    margin: float = _opt(
        0.0,
        "detection",
        "logit margin of the latent problem (default {default}, as the paper)",
        type=float,
        metavar="M",
    )
    solver: str = _opt(
        "daqp", "detection", "QP solver: daqp (fast) or cvxpy (reference; default {default})", metavar="NAME"
    )
    verify_top: int = _opt(
        VERIFY["top"],
        "detection",
        f"above {VERIFY['all_up_to']} classes, search the input space of the K classes the latent rule ranks "
        "most suspicious (default {default}; the search costs K x N images a step)",
        type=positive_int,
        metavar="K",
    )
    verify_images: int = _opt(
        VERIFY["images"],
        "detection",
        "reference images of the input-space search (default {default}, as calibrated)",
        type=positive_int,
        metavar="N",
    )
    min_reference_accuracy: float | None = _opt(
        None,
        "detection",
        "below this accuracy of the model on the reference data the verdict is "
        "inconclusive (exit 4), never clean (default max(2/C, 0.5))",
        type=float,
        metavar="A",
    )
    min_class_samples: int = _opt(
        MIN_CLASS_SAMPLES,
        "detection",
        "a class with fewer reference images makes the verdict inconclusive (default {default}; 0: off)",
        type=int,
        metavar="N",
    )
    device: str | None = _opt(None, "model", "torch device, e.g. cuda (default: cpu)")
    streaming: bool = _opt(
        False,
        "data",
        "read the reference data as a stream, one batch in memory at a time (audit only; --max-samples "
        "keeps the first N images, and a Hub split takes absolute slices only, e.g. test[:5000])",
        type=bool,
        audit=False,
    )

    def check(self) -> None:
        """Every value in range (:class:`~hub_backdoor.errors.OptionError` naming the option)."""

        if self.rule is not None and self.rule not in detection.AUDIT_RULES:
            rules = ", ".join(detection.AUDIT_RULES)
            raise OptionError(f"--rule {self.rule}: unknown rule; choose one of {rules}")
        if self.solver not in ("daqp", "cvxpy"):
            raise OptionError(f"--solver {self.solver}: choose daqp or cvxpy")
        check_audit_options(
            threshold=self.threshold,
            soft_margin=self.soft_margin,
            margin=self.margin,
            seed=self.seed,
            max_samples=self.max_samples,
            batch_size=self.batch_size,
            device=self.device,
            min_reference_accuracy=self.min_reference_accuracy,
            min_class_samples=self.min_class_samples,
            verify_top=self.verify_top,
            verify_images=self.verify_images,
        )

    def kwargs(self, *, columns: bool = True) -> dict[str, Any]:
        """Keywords of :func:`hub_backdoor.audit` (``columns``: with the image and label columns,
        which a :class:`~hub_backdoor.sources.reference.ReferenceData` already knows)."""
        kw = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.metadata["audit"]}
        if not columns:
            kw.pop("image_column")
            kw.pop("label_column")
        return kw

    @classmethod
    def names(cls) -> tuple[str, ...]:
        return tuple(f.name for f in dataclasses.fields(cls))

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any], *, where: str = "options") -> AuditOptions:
        """From ``{name: value}`` (``-`` and ``_`` alike; ``None`` values keep the default); an
        unknown name is an :class:`~hub_backdoor.errors.OptionError`."""
        names = set(cls.names())
        types = {f.name: f.metadata["type"] for f in dataclasses.fields(cls)}
        kw: dict[str, Any] = {}
        for raw, value in values.items():
            name = raw.replace("-", "_")
            if name not in names:
                raise OptionError(f"{where}: unknown audit option {raw!r}; known: {', '.join(sorted(names))}")
            if value is not None:
                kw[name] = _switch(value, raw) if types[name] is bool else value
        return cls(**kw)

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> AuditOptions:
        """From parsed ``hub-backdoor`` flags (:func:`add_audit_flags`)."""
        return cls(**{name: getattr(args, name) for name in cls.names()})

    def to_flags(self, *, skip: tuple[str, ...] = ()) -> list[str]:
        """The ``hub-backdoor audit`` flags that set every option that differs from its default."""
        out: list[str] = []
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.name in skip or value == f.default:
                continue
            out += [flag(f.name)] if f.metadata["type"] is bool else [flag(f.name), str(value)]
        return out


def _switch(value: Any, name: str) -> bool:
    """A switch from a config or ``KEY=VALUE`` text: a bool, or true / false, yes / no, 1 / 0."""
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("true", "yes", "1", "on"):
        return True
    if text in ("false", "no", "0", "off"):
        return False
    raise OptionError(f"{name} = {value!r}: expected true or false")


#: The help groups of the flags, in the order ``--help`` shows them.
AUDIT_GROUPS = {"model": "model", "data": "reference data", "detection": "detection"}


def flag(name: str) -> str:
    """The command-line flag of an option: ``verify_top`` -> ``--verify-top``."""
    return "--" + name.replace("_", "-")


def add_audit_flags(group: Any, which: str) -> None:
    """Add the flags of the :class:`AuditOptions` fields of help group ``which`` to ``group``."""

    for f in dataclasses.fields(AuditOptions):
        meta = f.metadata
        if meta["group"] != which:
            continue
        kw: dict[str, Any] = {"default": f.default, "type": meta["type"], "help": meta["help"]}
        if meta["type"] is bool:
            kw = {"action": "store_true", "help": meta["help"]}
        if meta["metavar"]:
            kw["metavar"] = meta["metavar"]
        if f.name == "rule":
            kw.update(default=detection.DEFAULT_RULE, choices=list(detection.AUDIT_RULES), help=_rules_help())
        elif f.name == "threshold":
            kw["help"] = _threshold_help()
        elif f.name == "solver":
            kw["choices"] = ["daqp", "cvxpy"]
        kw["help"] = kw["help"].replace("%", "%%").replace("{default}", str(f.default))
        group.add_argument(flag(f.name), **kw)
