"""Publish a purified model, from library objects: a folder, a Hub repo, or a pull request.

:func:`publish` writes what a purified model ships with (:func:`write_purified_folder`): its weights
(``save_pretrained``), the audit it was purified against (:data:`AUDIT_FILE`), the
:class:`PurificationRecord` (:data:`PURIFICATION_FILE`, docs/formats.md) and a security
card (``README.md`` and its chart), then moves the folder to ``out`` (atomically), pushes it to
``push_to`` and/or opens a pull request (``refs/pr/N``) on the audited repo with
:func:`hub_backdoor.sources.hub.push_folder`; the audited repo's main branch is never written.
:func:`open_purification_pr` is the pull-request case for callers that hold a repo id and a commit
rather than a :class:`~hub_backdoor.adapters.loading.LoadedModel` (the webhook service). ``hub-backdoor
purify`` calls :func:`publish`, so the command line and the services write one layout.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import shlex
import shutil
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..adapters import load_classifier
from ..adapters.loading import LoadedModel, load_model
from ..detection.report import AuditReport, atomic_write_text, current_umask, jsonable, library_versions
from ..errors import (
    AccuracyBudgetError,
    HubBackdoorError,
    OutputPathError,
    ReportError,
    UnsupportedModelError,
)
from ..layout import AUDIT_FILE, PURIFICATION_FILE
from ..options import PurifyOptions
from ..purification.guard import GuardedModel
from ..purification.purify import PurifyResult
from ..sources.datasets import LoadedDataset
from ..sources.hub import check_repo_id, push_folder
from . import card
from .card import CardContext

__all__ = [
    "AUDIT_FILE",
    "CARRIED_METADATA",
    "PURIFICATION_FILE",
    "PURIFICATION_KIND",
    "PURIFICATION_SCHEMA_VERSION",
    "Published",
    "PurificationRecord",
    "card_context",
    "check_destinations",
    "load_guarded",
    "load_hint",
    "open_purification_pr",
    "publish",
    "purification_record",
    "purify_flags",
    "write_purified_folder",
]

PURIFICATION_SCHEMA_VERSION = "1"
PURIFICATION_KIND = "hub-backdoor-purification"
#: Metadata of the audited model's card that its security card keeps.
CARRIED_METADATA = ("license", "license_name", "license_link", "language", "datasets", "tags")


@dataclass
class PurificationRecord:
    """The record of one purification (``backdoor_purification.json``, ``purify --json``).

    :meth:`to_dict` gives the JSON object of schema :data:`PURIFICATION_SCHEMA_VERSION` (docs/formats.md,
    "Purification record"); :meth:`from_dict` reads one back and checks its schema and field types.
    ``audit_before`` / ``audit_after`` are full JSON reports; ``card`` is what ``hub-backdoor card``
    needs to rebuild the same card (model name, base model, load hint, kept metadata, command line).
    """

    target: int
    target_name: str
    trigger: str | None
    metrics: dict[str, float | int | None]
    params: dict[str, Any]
    seconds: float | None
    history: list[Any]
    audited_model: dict[str, str | None]
    dataset: dict[str, str | None]
    output: dict[str, Any]
    versions: dict[str, str]
    created: str
    audit_before: dict[str, Any] | None
    audit_after: dict[str, Any] | None
    card: dict[str, Any] = field(default_factory=dict)
    schema_version: str = PURIFICATION_SCHEMA_VERSION
    kind: str = PURIFICATION_KIND

    @classmethod
    def build(
        cls,
        result: PurifyResult,
        *,
        report_after: AuditReport | None,
        audited_model: Mapping[str, str | None],
        dataset: LoadedDataset,
        output: Mapping[str, Any],
        trigger: str | None = None,
    ) -> PurificationRecord:
        """The record of ``result``; ``audited_model`` has ``label``, ``repo_id``, ``revision``, ``sha``."""
        target = int(result.target)
        return cls(
            target=target,
            target_name=result.report.classes[target].name,
            trigger=trigger,
            metrics=dict(result.metrics),
            params=dict(result.params),
            seconds=result.seconds,
            history=list(result.history),
            audited_model={k: audited_model.get(k) for k in ("label", "repo_id", "revision", "sha")},
            dataset={
                "name": dataset.name,
                "kind": dataset.kind,
                "split": dataset.split,
                "revision": dataset.revision,
            },
            output=dict(output),
            versions=library_versions(),
            created=dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
            audit_before=result.report.to_dict(),
            audit_after=report_after.to_dict() if report_after is not None else None,
        )

    def to_dict(self) -> dict[str, Any]:
        """The JSON object (finite numbers and plain types only), keys in the documented order."""
        out = {
            "schema_version": self.schema_version,
            "kind": self.kind,
            "target": self.target,
            "target_name": self.target_name,
            "trigger": self.trigger,
            "metrics": self.metrics,
            "params": self.params,
            "seconds": self.seconds,
            "history": self.history,
            "audited_model": self.audited_model,
            "dataset": self.dataset,
            "output": self.output,
            "versions": self.versions,
            "created": self.created,
            "audit_before": self.audit_before,
            "audit_after": self.audit_after,
        }
        if self.card:
            out["card"] = self.card
        return jsonable(out)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, allow_nan=False) + "\n"

    @classmethod
    def from_dict(cls, data: Any) -> PurificationRecord:
        """Read a record; :class:`~hub_backdoor.errors.ReportError` for another schema or bad fields."""
        if not isinstance(data, dict) or str(data.get("schema_version")) != PURIFICATION_SCHEMA_VERSION:
            raise ReportError(f"not a purification record of schema {PURIFICATION_SCHEMA_VERSION}")
        target = data.get("target")
        if not isinstance(target, int) or isinstance(target, bool):
            raise ReportError("'target' must be a class index")
        metrics = data.get("metrics", {})
        if not isinstance(metrics, dict) or not all(
            v is None or (isinstance(v, (int, float)) and not isinstance(v, bool)) for v in metrics.values()
        ):
            raise ReportError("'metrics' must map names to numbers")
        for key in ("params", "card", "audited_model", "dataset", "output"):
            if not isinstance(data.get(key) or {}, dict):
                raise ReportError(f"{key!r} must be an object")
        return cls(
            target=target,
            target_name=str(data.get("target_name", target)),
            trigger=data.get("trigger"),
            metrics=dict(metrics),
            params=dict(data.get("params") or {}),
            seconds=data.get("seconds"),
            history=list(data.get("history") or []),
            audited_model=dict(data.get("audited_model") or {}),
            dataset=dict(data.get("dataset") or {}),
            output=dict(data.get("output") or {}),
            versions=dict(data.get("versions") or {}),
            created=str(data.get("created", "")),
            audit_before=data.get("audit_before"),
            audit_after=data.get("audit_after"),
            card=dict(data.get("card") or {}),
            schema_version=str(data["schema_version"]),
            kind=str(data.get("kind", PURIFICATION_KIND)),
        )


@dataclass
class Published:
    """Where :func:`publish` put a purified model: ``folder`` (``out``, or ``None`` when it was only
    pushed), ``url`` (the commit on ``push_to``), ``pr_url`` (the pull request), and its ``record``."""

    folder: Path | None
    url: str | None
    pr_url: str | None
    record: PurificationRecord


def load_guarded(purified: Any, *, original: Any = None, target: int | None = None, **load_kw: Any
                 ) -> GuardedModel:
    """The guarded model (:mod:`hub_backdoor.purification.guard`) of a purified copy and the model it
    came from.

    ``purified``: a folder or Hub repo (``org/name@refs/pr/N`` too) written by :func:`publish`; or
    anything :func:`hub_backdoor.load_classifier` accepts, with ``original`` and ``target`` given.
    ``original``: the audited model; ``None`` loads the one the purification record names, pinned
    to the audited commit. ``target``: the purified class; ``None`` takes the record's.
    ``load_kw`` goes to both loads (``allow_pickle=``, ``token=``, ...). Returned in eval mode.
    """
    record: PurificationRecord | None = None
    if isinstance(purified, (str, Path)):
        loaded = load_model(str(purified), **load_kw)
        pur = loaded.clf
        path = loaded.folder / PURIFICATION_FILE
        if target is None or original is None:
            if not path.is_file():
                raise HubBackdoorError(
                    f"{loaded.label} has no {PURIFICATION_FILE}: pass original= and target=, or point at a "
                    "model written by `hub-backdoor purify`")
            try:
                record = PurificationRecord.from_dict(json.loads(path.read_text()))
            except (ValueError, RecursionError, ReportError) as e:  # bad or too deep JSON, bad fields
                raise ReportError(f"{loaded.label}/{PURIFICATION_FILE}: {e}") from e
    else:
        pur = load_classifier(purified, **load_kw)
        if target is None or original is None:
            raise HubBackdoorError("original= and target= are required when the purified model is not a "
                                   "folder or a Hub repo written by `hub-backdoor purify`")
    if original is None:
        assert record is not None
        repo, sha = record.audited_model.get("repo_id"), record.audited_model.get("sha")
        original = f"{repo}@{sha}" if repo and sha else repo or record.audited_model.get("label")
        if not original:
            raise HubBackdoorError(f"{PURIFICATION_FILE} names no audited model; pass original=")
    if target is None:
        assert record is not None
        target = record.target
    return GuardedModel(load_classifier(original, **load_kw), pur, int(target)).eval()


def load_hint(kind: str, where: str, *, local: bool = False, revision: str | None = None) -> str:
    """One Markdown line telling how to load the purified model (``where``: Hub id or folder)."""
    if kind == "timm":
        ref = f"local-dir:{where}" if local else f"hf-hub:{where}" + (f"@{revision}" if revision else "")
        return f'`timm.create_model("{ref}", pretrained=True)`'
    rev = f', revision="{revision}"' if revision else ""
    return (
        f'`AutoModelForImageClassification.from_pretrained("{where}"{rev})` with '
        f'`AutoImageProcessor.from_pretrained("{where}"{rev})`'
    )


def purification_record(
    result: PurifyResult,
    *,
    report_after: AuditReport | None,
    repo_id: str | None,
    sha: str | None,
    dataset: LoadedDataset,
    output: dict[str, Any],
    label: str | None = None,
    revision: str | None = None,
    trigger: str | None = None,
) -> dict[str, Any]:
    """The JSON record of one purification (:meth:`PurificationRecord.build`, as a dict)."""
    audited = {"label": label or repo_id, "repo_id": repo_id, "revision": revision, "sha": sha}
    return PurificationRecord.build(
        result, report_after=report_after, audited_model=audited, dataset=dataset, output=output,
        trigger=trigger,
    ).to_dict()


def card_context(model: LoadedModel, dataset: LoadedDataset, **kw: Any) -> CardContext:
    """The card context of ``model`` audited on ``dataset``; ``kw``: the other
    :class:`~hub_backdoor.outputs.card.CardContext` fields (model name, reproduce, purification, ...)."""
    return CardContext(
        model_label=model.repo_id or Path(model.label).name or model.label,
        audited_repo=model.repo_id,
        audited_sha=model.sha,
        dataset=dataset.name,
        dataset_is_hub=dataset.is_hub,
        split=dataset.split,
        extra_metadata={k: v for k, v in model.card_metadata.items() if k in CARRIED_METADATA},
        **kw,
    )


def check_destinations(
    model: LoadedModel,
    *,
    out: str | Path | None = None,
    push_to: str | None = None,
    open_pr: bool = False,
    overwrite: bool = False,
) -> None:
    """Refuse what :func:`publish` would refuse, before any fine-tuning: no destination, a pull request
    on a local model, a push to the audited repo (it only gets pull requests), an ``out`` inside the
    model folder, or a non-empty ``out`` without ``overwrite``."""
    if not (out or push_to or open_pr):
        raise HubBackdoorError("nothing to write: give --out DIR, --push-to org/name or --open-pr")
    if push_to:
        check_repo_id(push_to)
    if open_pr and not model.is_hub:
        raise HubBackdoorError(f"--open-pr needs a Hub model (org/name); {model.label} is a local folder")
    if push_to and model.repo_id and push_to.lower() == model.repo_id.lower():
        raise HubBackdoorError(
            f"--push-to {push_to} is the audited repo, which only gets pull requests; use --open-pr "
            "or push to another repo"
        )
    if out is not None:
        _check_out(Path(out), model, overwrite)


def _check_out(out: Path, model: LoadedModel, overwrite: bool) -> None:
    o, src = out.resolve(), model.folder.resolve()
    if o == src or src in o.parents or o in src.parents:
        raise OutputPathError(
            f"--out {out} would overwrite or write into the model folder {model.folder}; "
            "choose another folder"
        )
    if out.exists() and not out.is_dir():
        raise OutputPathError(f"--out {out} exists and is not a folder")
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise OutputPathError(
            f"--out {out} exists and is not empty; choose another folder or pass --overwrite"
        )


def _destination(
    model: LoadedModel, *, out: Path | None, push_to: str | None, open_pr: bool
) -> tuple[str, str | None, str]:
    """The purified model's name, its card's ``base_model`` and how to load it, by destination."""
    kind = model.format
    if push_to:
        return push_to, model.repo_id, load_hint(kind, push_to)
    if open_pr:
        assert model.repo_id is not None  # check_destinations refused a local model
        return model.repo_id, None, load_hint(kind, model.repo_id, revision="refs/pr/N") + " before the merge"
    name = out.name if out is not None else model.label
    return name, model.repo_id, load_hint(kind, str(out), local=True)


def purify_flags(result: PurifyResult) -> list[str]:
    """The ``hub-backdoor purify`` options that give ``result`` again: ``--epochs`` and every
    purification option (:class:`~hub_backdoor.options.PurifyOptions`) that differs from the
    command's default, ``--threads`` among them when the CPU fine-tuning ran at another count than
    the default (the weights depend on it)."""
    p = result.params
    out = ["--epochs", str(p.get("epochs"))]
    if result.report.target != result.target:  # the audit flagged another class, or none
        out += ["--target", str(result.target)]
    opts = _options_of(p)
    names = tuple(n for n in PurifyOptions.names() if n != "epochs")
    cut = names.index("holdout") + 1  # the batch size follows the hold-out share
    out += opts.to_flags(names[:cut])
    if "batch_size" in p and p["batch_size"] != 64:
        out += ["--batch-size", str(p["batch_size"])]
    return out + opts.to_flags(names[cut:])


def _options_of(params: Mapping[str, Any]) -> PurifyOptions:
    """The :class:`~hub_backdoor.options.PurifyOptions` a purification's ``params`` record, as far
    as a command line can give them: a list of ``train`` prefixes, ``--sam-adaptive`` without
    ``--sam-rho`` and the thread count of a GPU run are left at their defaults."""
    known = {k: v for k, v in params.items() if k in PurifyOptions.names()}
    default = PurifyOptions()
    if not isinstance(known.get("train"), str):
        known.pop("train", None)
    if not known.get("sam_rho"):
        known.pop("sam_adaptive", None)
    if not str(params.get("determinism", "")).startswith("cpu"):
        known["threads"] = default.threads
    return PurifyOptions.from_mapping(known, where="purification params")


def _default_reproduce(
    model: LoadedModel, dataset: LoadedDataset, result: PurifyResult, flags: list[str]
) -> str:
    data_arg = dataset.name + (f"@{dataset.revision}" if dataset.revision else "")
    parts = ["hub-backdoor", "purify", model.pinned, "--dataset", data_arg]
    parts += ["--split", dataset.split] if dataset.split else []
    parts += [*flags, *purify_flags(result)]
    return " ".join(shlex.quote(p) for p in parts)


def _move_into_place(tmp: Path, out: Path) -> None:
    """Move the finished folder ``tmp`` to ``out`` (replacing it), so ``out`` is never half written."""
    out.parent.mkdir(parents=True, exist_ok=True)
    old = None
    if out.exists():
        old = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.old-"))
        os.replace(out, old / "x")
    os.replace(tmp, out)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def publish(
    result: PurifyResult,
    *,
    model: LoadedModel,
    dataset: LoadedDataset,
    report_after: AuditReport | None = None,
    out: str | Path | None = None,
    push_to: str | None = None,
    open_pr: bool = False,
    overwrite: bool = False,
    private: bool = False,
    trigger: str | None = None,
    reproduce: str | None = None,
    commit_message: str | None = None,
    token: str | bool | None = None,
    allow_over_budget: bool = False,
) -> Published:
    """Write the purified model to ``out``, push it to ``push_to`` and/or open a pull request on the
    audited repo (``open_pr``); returns where it went.

    Args:
        result: what :func:`hub_backdoor.purify` returned for ``model``.
        model: the audited model (:func:`hub_backdoor.adapters.loading.load_model`); names it in the
            record and the card, whose license, language, datasets and tags are kept (and, for a pull request,
            its text appended).
        dataset: the reference data the model was audited and purified with.
        report_after: the audit of the purified model, shown next to the original in the card.
        out: folder to write (replaced atomically; a non-empty one needs ``overwrite``).
        push_to: another Hub repo to create or update (``private`` when created).
        open_pr: open a pull request on the audited repo (its main branch is never written).
        trigger: name of the trigger the metrics' attack success rate was measured with, if any.
        reproduce: the command line shown in the card; default: a ``hub-backdoor purify`` one.
        allow_over_budget: publish even when the purification lost more accuracy than its
            ``max_accuracy_drop`` (otherwise :class:`~hub_backdoor.errors.AccuracyBudgetError`).
        commit_message: the commit (or pull request) title; default: names the purified class.
        token: Hub token with write access (``None``: huggingface_hub's usual places).

    Raises :class:`~hub_backdoor.errors.HubBackdoorError` (see :func:`check_destinations` and
    :mod:`hub_backdoor.sources.hub`) and :class:`~hub_backdoor.errors.UnsupportedModelError` for a model that
    cannot be saved. A temporary folder is removed whatever happens.
    """
    out = Path(out).expanduser() if out is not None else None
    check_destinations(model, out=out, push_to=push_to, open_pr=open_pr, overwrite=overwrite)
    _check_publishable(result, allow_over_budget)
    record, context = _record_and_card(
        result, model=model, dataset=dataset, report_after=report_after, out=out, push_to=push_to,
        open_pr=open_pr, trigger=trigger, reproduce=reproduce,
    )
    target = int(result.target)
    parent = out.parent if out is not None else Path(tempfile.gettempdir())
    parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=parent, prefix=f".{(out.name if out else 'purified')}.tmp-"))
    os.chmod(tmp, 0o777 & ~current_umask())  # mkdtemp makes 0700; the folder is published as is
    url = pr_url = None
    try:
        write_purified_folder(tmp, result=result, record=record, context=context)
        folder = tmp
        if out is not None:
            _move_into_place(tmp, out)
            folder = out
        if push_to:
            message = commit_message or f"Purified {model.label} (backdoor class {target})"
            url = push_folder(
                folder, push_to, commit_message=message, private=private, protected_repo=model.repo_id,
                token=token,
            )
        if open_pr and model.repo_id is not None:  # check_destinations refused a local model
            message = commit_message or f"Remove backdoor of class {target} (hub-backdoor)"
            pr_url = push_folder(
                folder, model.repo_id, commit_message=message, create_pr=True, protected_repo=model.repo_id,
                token=token,
            )
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return Published(folder=out, url=url, pr_url=pr_url, record=record)


def _check_publishable(result: PurifyResult, allow_over_budget: bool) -> None:
    """Refuse a purification over its accuracy budget (unless ``allow_over_budget``) or a model
    that cannot be saved."""
    if not result.within_budget and not allow_over_budget:
        m = result.metrics
        raise AccuracyBudgetError(
            f"purification lost {100 * float(m['acc_drop']):.1f} points of held-out clean accuracy "
            f"({float(m['acc_before']):.3f} -> {float(m['acc_after']):.3f}), more than the budget of "
            f"{100 * result.max_accuracy_drop:g} points; nothing was published (raise "
            "--max-accuracy-drop, or purify with more clean data)"
        )
    clf = result.classifier
    if not hasattr(clf, "save_pretrained"):
        raise UnsupportedModelError(f"cannot save a purified {clf.kind} model; only timm and transformers")


def _record_and_card(
    result: PurifyResult,
    *,
    model: LoadedModel,
    dataset: LoadedDataset,
    report_after: AuditReport | None,
    out: Path | None,
    push_to: str | None,
    open_pr: bool,
    trigger: str | None,
    reproduce: str | None,
) -> tuple[PurificationRecord, CardContext]:
    """The purification record of ``result`` and the context of the purified model's card."""
    name, base, hint = _destination(model, out=out, push_to=push_to, open_pr=open_pr)
    flags = ["--out", str(out)] if out else []
    flags += ["--push-to", push_to] if push_to else []
    flags += ["--open-pr"] if open_pr else []
    reproduce = reproduce or _default_reproduce(model, dataset, result, flags)
    audited = {"label": model.label, "repo_id": model.repo_id, "revision": model.revision, "sha": model.sha}
    output = {
        "name": name,
        "push_to": push_to,
        "open_pr": bool(open_pr),
        "out": str(out) if out else None,
        "kind": model.format,
    }
    record = PurificationRecord.build(
        result, report_after=report_after, audited_model=audited, dataset=dataset, output=output,
        trigger=trigger,
    )
    record.card = {
        "model_name": name,
        "base_model": base,
        "load_hint": hint,
        "extra_metadata": {k: v for k, v in model.card_metadata.items() if k in CARRIED_METADATA},
        "reproduce": reproduce,
    }
    context = card_context(
        model, dataset, model_name=name, purification=record.to_dict(), report_after=report_after,
        reproduce=reproduce, original_card=model.card_body if open_pr else None, load_hint=hint,
        base_model=base,
    )
    return record, context


def write_purified_folder(
    folder: str | Path,
    *,
    result: PurifyResult,
    record: PurificationRecord | dict[str, Any],
    context: CardContext,
) -> Path:
    """Write the purified weights, :data:`AUDIT_FILE`, :data:`PURIFICATION_FILE` and the security card
    (``README.md`` + chart, from ``context``) into ``folder`` (created); returns it."""
    clf = result.classifier
    if not hasattr(clf, "save_pretrained"):
        raise UnsupportedModelError(f"cannot save a purified {clf.kind} model; only timm and transformers")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    clf.model.to("cpu")
    clf.save_pretrained(folder)
    result.report.to_json(folder / AUDIT_FILE)
    data = record.to_dict() if isinstance(record, PurificationRecord) else record
    atomic_write_text(folder / PURIFICATION_FILE, json.dumps(data, indent=2, allow_nan=False) + "\n")
    card.write_card(result.report, context, folder / "README.md")  # card.: patchable in tests
    return folder


def open_purification_pr(
    result: PurifyResult,
    *,
    repo_id: str,
    sha: str,
    dataset: LoadedDataset,
    report_after: AuditReport | None = None,
    card_metadata: dict[str, Any] | None = None,
    card_body: str = "",
    reproduce: str | None = None,
    trigger: str | None = None,
    commit_message: str | None = None,
    token: str | bool | None = None,
) -> str:
    """Open a pull request on ``repo_id`` with the purified model (:func:`publish` with ``open_pr``);
    returns the PR's URL.

    Args:
        result: what :func:`hub_backdoor.purify` returned for ``repo_id`` at commit ``sha``.
        repo_id: the audited model repo; it only gets a pull request (never a commit to main).
        sha: the audited commit, named in the record and the card.
        dataset: the reference data the model was audited and purified with.
        report_after: the audit of the purified model, shown next to the original in the card.
        card_metadata, card_body: the audited model's card (its YAML and text); license, language,
            datasets and tags are kept and the original text is appended to the security card.
        reproduce: the command line shown in the card; default: the ``hub-backdoor purify`` one.
        trigger: name of the trigger the metrics' ASR was measured with, if any.
        token: Hub token with write access (``None``: huggingface_hub's usual places).
    """
    if not sha:
        raise HubBackdoorError(f"no audited commit for {repo_id}; pass the sha the model came from")
    model = LoadedModel(
        clf=result.classifier,
        label=repo_id,
        folder=Path(tempfile.gettempdir()) / "hub-backdoor-no-folder",  # never read: result has the weights
        repo_id=repo_id,
        sha=sha,
        card_metadata=dict(card_metadata or {}),
        card_body=card_body,
    )
    published = publish(
        result, model=model, dataset=dataset, report_after=report_after, open_pr=True, trigger=trigger,
        reproduce=reproduce, commit_message=commit_message, token=token,
    )
    assert published.pr_url is not None
    return published.pr_url
