"""Every option of an audit and of a purification, declared once: its default, its check, its
command-line flag and help.

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

from .defaults import PURIFY, VERIFY
from .detection import rules as detection
from .detection.validation import check_audit_options, check_purify_options
from .errors import OptionError

__all__ = [
    "AUDIT_GROUPS", "AuditOptions", "PurifyOptions", "add_audit_flags", "add_purify_flags", "positive_int",
]

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
    (``soft_margin``).

    Attributes:
        image_column, label_column: override the automatic column discovery.
        max_samples: use a seeded random subset of at most this many samples (a stream: its
            first ``max_samples`` examples).
        seed: seeds the subset and torch; recorded in the report.
        batch_size: images per forward pass.
        threshold: score above which a class is flagged (default: the rule's own, see
            ``hub_backdoor.detection.REGISTRY``).
        rule: detection rule name (one of ``hub_backdoor.detection.AUDIT_RULES``; default
            ``hub_backdoor.detection.DEFAULT_RULE``, ``latent-or-input``). Rules that
            need the input-space verification (``needs={"input"}``) also run
            :func:`hub_backdoor.detection.verification.verify_input_space` on a stratified sample of the
            reference data (``verify_images`` images), on every class up to
            ``VERIFY_ALL_UP_TO`` classes and on the latent screen's ``verify_top`` most
            suspicious ones above (:func:`hub_backdoor.detection.audit.screened_classes`).
        soft_margin: solve the soft-margin QP with this penalty for every class. ``None`` (the
            default) solves the exact problem; where Theorem 1 fails (``C - 1 >= d``, e.g. a
            1000-class head on a 512-wide embedding) each class is solved on its own and a class
            no universal latent change reaches carries no latent evidence
            (:mod:`hub_backdoor.detection.reconstruction`); the input-space search still runs.
        margin: logit margin m of the QP (0 in the paper).
        solver: ``"daqp"`` (fast) or ``"cvxpy"`` (reference).
        verify_top: above ``VERIFY_ALL_UP_TO`` classes, how many classes the input-space search
            covers (those the latent rule ranks most suspicious; its cost grows with this, not C).
        verify_images: reference images of the input-space verification.
        min_reference_accuracy: the verdict is ``"inconclusive"`` (never ``"clean"``) when the
            model's accuracy on the reference data is below this; default
            ``max(2 / C, 0.5)`` (:func:`hub_backdoor.detection.validation.default_min_accuracy`).
        min_class_samples: the verdict is ``"inconclusive"`` when a class has fewer reference
            images than this (default 1; 0 turns the check off).
        device: the torch device of the model (default: where it is, or the accelerator's).
        streaming: read the reference data as a stream, one batch in memory at a time (how the
            command line and the workflow load the data; not a keyword of :func:`hub_backdoor.audit`,
            which takes a stream as its ``dataset``).
    """

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
        return cls(**_keywords(cls, values, where=where, kind="audit"))

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


def _keywords(cls: Any, values: Mapping[str, Any], *, where: str, kind: str) -> dict[str, Any]:
    """The keywords of the options dataclass ``cls`` from ``{name: value}`` (``-`` and ``_`` alike;
    ``None`` values left out; switches read by :func:`_switch`); an unknown name is an
    :class:`~hub_backdoor.errors.OptionError` that names the ``kind`` of option and the known ones."""
    types = {f.name: f.metadata["type"] for f in dataclasses.fields(cls)}
    kw: dict[str, Any] = {}
    for raw, value in values.items():
        name = raw.replace("-", "_")
        if name not in types:
            raise OptionError(f"{where}: unknown {kind} option {raw!r}; known: {', '.join(sorted(types))}")
        if value is not None:
            kw[name] = _switch(value, raw) if types[name] is bool else value
    return kw


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


# -- purification ---------------------------------------------------------------------------------------
def _popt(default: Any, help: str, *, type: Any = float, metavar: str | None = None, flag: bool = True,
          points: bool = False, choices: tuple[str, ...] | None = None) -> Any:
    """A :class:`PurifyOptions` field: argparse ``type`` (``bool``: a switch), ``metavar``, ``help``
    (``{default}`` is filled in with the flag's default), ``choices``; ``flag``: whether
    :func:`add_purify_flags` adds it (``threads`` is the runtime flag every command has);
    ``points``: the value is a share, its flag is in points (x 100)."""
    meta = {"help": help, "type": type, "metavar": metavar, "flag": flag, "points": points,
            "choices": choices}
    return field(default=default, metadata=meta)


@dataclass(frozen=True)
class PurifyOptions:
    """The fine-tuning options of :func:`hub_backdoor.purify` (the model, the data, the audit and
    the options it shares with the audit aside: ``batch_size``, ``seed``, ``max_samples``,
    ``device`` and the columns are :class:`AuditOptions`). The field order is the order of the
    flags in ``--help`` and on the card's Reproduce line (``--epochs`` first, always named there).
    Defaults: :data:`hub_backdoor.defaults.PURIFY`.

    Attributes:
        epochs: passes over the fine-tuning data; None: ``PURIFY["epochs"]`` (10), or more on a small
            clean set so that training takes at least ``PURIFY["min_steps"]`` (100) optimizer steps
            (:func:`hub_backdoor.purification.auto_epochs`).
        beta: weight of the latent-trigger loss ``CE(head(h(x) + scale * s_t), y)``.
        scale: s_t is multiplied by this in the loss (1: the paper).
        distill: weight of a KL term to the original model's clean predictions, which keeps clean
            behaviour when the clean set is small (0: the paper's loss).
        keep: weight of a second KL term to the original predictions over every class but the
            target, so the other classes keep their order while the target's logit is lowered (0:
            the earlier loss; docs/purification.md has what it changed).
        target_weight: weight of the clean CE of the target class's own samples against 1 for the
            others (1: the paper). The latent term lowers the target's logit along s_t, and the
            target's own clean images lie along it too: they lose most (docs/purification.md).
        lr: peak learning rate of SGD with a one-cycle schedule.
        warmup: share of the epochs over which the latent shift grows linearly from 0 to
            ``scale * s_t`` (0: full size from the first step, the paper's setting). At full size
            the first steps face a loss of tens of nats and wreck the features at once.
        holdout: share of the data held out (stratified, seeded) to measure accuracy / ASR before
            and after.
        train: which parameters change: ``"backbone"`` (everything but the linear head),
            ``"last-stage"`` (the backbone's last stage and the layers after it), ``"all"``, or
            (Python only) parameter-name prefixes; the rest is frozen. With the head trainable the
            latent loss is met by making the head blind to s_t's direction, and a real trigger,
            whose latent change is only partly along s_t, keeps working.
        sam_rho: > 0: sharpness-aware minimisation (the optimiser of FT-SAM, Zhu et al., ICCV
            2023): each step takes the gradient at the weights moved by ``sam_rho`` along the
            normalised gradient (a second forward and backward pass per step); 0: plain SGD.
        sam_adaptive: with ``sam_rho`` > 0, adaptive SAM (ASAM, Kwon et al., 2021), the variant
            FT-SAM runs: each weight's move is scaled by its magnitude, so ``sam_rho`` is relative
            (FT-SAM's published setting is 2.0; plain SAM's usual one is 0.05).
        augment: shift each fine-tuning image by up to 2 pixels (zero padding) and flip it left to
            right with probability 1/2, drawn from the seed: a few hundred clean images are
            otherwise memorised.
        max_accuracy_drop: the accuracy budget, a share (0.01 = one point of held-out clean
            accuracy; the command line's ``--max-accuracy-drop`` is in points); the result says
            whether it was kept (:attr:`hub_backdoor.purification.PurifyResult.within_budget`) and
            the command publishes nothing beyond it.
        threads: on a CPU, the fine-tuning and the held-out measurements run at this many torch
            threads (torch's setting is put back afterwards), so the purified weights do not
            depend on the machine's core count: the same seed, data, options and ``threads`` give
            identical weights on a CPU of the same kind. Recorded in the result's ``params``
            (``threads``, with ``determinism``); not used on a GPU. The command line's
            ``--threads``, which every command has.
        resolve_every: re-solve s_t on the current model every this many epochs (None: never).
        freeze_norm: keep BatchNorm statistics fixed; a few hundred clean samples estimate them
            worse than the original training set did.
    """

    epochs: int | None = _popt(
        None,
        f"fine-tuning epochs (default {PURIFY['epochs']}, or more on a small clean set so that training "
        f"takes at least {PURIFY['min_steps']} optimizer steps)",
        type=positive_int,
    )
    beta: float = _popt(float(PURIFY["beta"]), "weight of the latent-trigger loss (default {default})")
    scale: float = _popt(
        float(PURIFY["scale"]), "multiplier of s_t in the loss (default {default}; 1 = the paper)"
    )
    distill: float = _popt(
        float(PURIFY["distill"]), "weight of a KL term to the original model (default {default}; 0 = paper)"
    )
    keep: float = _popt(
        float(PURIFY["keep"]),
        "weight of a KL term to the original model over the non-target classes only (default {default}; "
        "0 = the loss without it)",
    )
    target_weight: float = _popt(
        float(PURIFY["target_weight"]),
        "weight of the clean loss on the target class's own samples against 1 for the others (default "
        "{default}; 1 = the paper)",
    )
    lr: float = _popt(float(PURIFY["lr"]), "peak learning rate (default {default})")
    warmup: float = _popt(
        float(PURIFY["warmup"]),
        "share of the epochs over which the latent shift grows from 0 (default {default}; 0 = the paper)",
    )
    holdout: float = _popt(
        0.2, "fraction of the data held out to measure accuracy before/after (default {default})"
    )
    train: str | list[str] = _popt(
        str(PURIFY["train"]),
        "parameters that change: the backbone (head frozen), only its last stage, or all (default {default})",
        type=str,
        choices=("backbone", "last-stage", "all"),
    )
    sam_rho: float = _popt(
        float(PURIFY["sam_rho"]),
        "sharpness-aware minimisation with this radius, the optimiser of FT-SAM (default {default}: off)",
        metavar="RHO",
    )
    sam_adaptive: bool = _popt(
        bool(PURIFY["sam_adaptive"]),
        "with --sam-rho: adaptive SAM, the variant FT-SAM runs (RHO is then relative)",
        type=bool,
    )
    augment: bool = _popt(
        bool(PURIFY["augment"]),
        "shift each fine-tuning image by up to 2 pixels and flip it (default off)",
        type=bool,
    )
    max_accuracy_drop: float = _popt(
        0.01,
        "accuracy budget in points of held-out clean accuracy (default {default}): a purification that "
        "loses more publishes nothing and exits 6",
        metavar="POINTS",
        points=True,
    )
    threads: int = _popt(int(PURIFY["threads"]), "", type=positive_int, metavar="N", flag=False)
    resolve_every: int | None = _popt(
        None, "re-solve s_t on the current model every N epochs (default: never)", type=positive_int,
        metavar="N",
    )
    freeze_norm: bool = _popt(
        False, "keep the BatchNorm statistics fixed during the fine-tuning (default off)", type=bool
    )
    def check(self, *, batch_size: Any = 64, seed: Any = 0, max_samples: Any = None, device: Any = None
              ) -> None:
        """Every value in range, with the options shared with the audit
        (:class:`~hub_backdoor.errors.OptionError` naming the option)."""
        check_purify_options(
            beta=self.beta, scale=self.scale, distill=self.distill, lr=self.lr, epochs=self.epochs,
            holdout=self.holdout, batch_size=batch_size, seed=seed, max_samples=max_samples,
            resolve_every=self.resolve_every, device=device, warmup=self.warmup, keep=self.keep,
            target_weight=self.target_weight, max_accuracy_drop=self.max_accuracy_drop, threads=self.threads,
            sam_rho=self.sam_rho,
        )

    def kwargs(self) -> dict[str, Any]:
        """Keywords of :func:`hub_backdoor.purify`."""
        return {name: getattr(self, name) for name in self.names()}

    @classmethod
    def names(cls) -> tuple[str, ...]:
        return tuple(f.name for f in dataclasses.fields(cls))

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any], *, where: str = "options") -> PurifyOptions:
        """From ``{name: value}`` (``-`` and ``_`` alike; ``None`` values keep the default, but for
        ``epochs`` and ``resolve_every``, whose default is None); an unknown name is an
        :class:`~hub_backdoor.errors.OptionError`."""
        return cls(**_keywords(cls, values, where=where, kind="purification"))

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> PurifyOptions:
        """From parsed ``hub-backdoor purify`` flags (:func:`add_purify_flags`; ``--threads`` unset:
        the default; ``--max-accuracy-drop`` is in points)."""
        kw = {name: getattr(args, name) for name in cls.names()}
        for f in dataclasses.fields(cls):
            if f.metadata["points"]:
                kw[f.name] = kw[f.name] / 100.0
        if kw["threads"] is None:
            kw.pop("threads")
        return cls(**kw)

    def to_flags(self, names: tuple[str, ...] | None = None) -> list[str]:
        """The ``hub-backdoor purify`` flags that set every option (of ``names``, in that order;
        default: all) that differs from its default."""
        fields = {f.name: f for f in dataclasses.fields(self)}
        out: list[str] = []
        for name in names if names is not None else self.names():
            f, value = fields[name], getattr(self, name)
            if value == f.default:
                continue
            if f.metadata["type"] is bool:
                out.append(flag(name))
            else:
                out += [flag(name), f"{100 * float(value):g}" if f.metadata["points"] else str(value)]
        return out


def add_purify_flags(group: Any) -> None:
    """Add the flags of the :class:`PurifyOptions` fields to ``group`` (``--threads`` aside)."""

    for f in dataclasses.fields(PurifyOptions):
        meta = f.metadata
        if not meta["flag"]:
            continue
        default: Any = f.default
        default = 100 * default if meta["points"] else default
        shown = f"{default:g}" if meta["points"] else str(default)
        kw: dict[str, Any] = {"default": default, "type": meta["type"]}
        if meta["type"] is bool:
            kw = {"action": "store_true"}
        if meta["metavar"]:
            kw["metavar"] = meta["metavar"]
        if meta["choices"]:
            kw["choices"] = list(meta["choices"])
        kw["help"] = meta["help"].replace("%", "%%").replace("{default}", shown)
        group.add_argument(flag(f.name), **kw)
