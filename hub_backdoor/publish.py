"""Publish a purified model as a pull request on the audited Hub repo, from library objects.

:func:`write_purified_folder` lays out what a purified model ships with: its weights
(``save_pretrained``), the audit it was purified against (:data:`AUDIT_FILE`), the purification
record (:data:`PURIFICATION_FILE`, README "Purification record") and a security card (``README.md``
and its chart). :func:`open_purification_pr` writes that folder to a temporary place and pushes it
as one pull request (``refs/pr/N``) with :func:`hub_backdoor.hub.push_folder`; the audited repo's
main branch is never written. Both take a :class:`~hub_backdoor.purification.PurifyResult` and the
:class:`~hub_backdoor.datasets_io.LoadedDataset` it was purified with, so a service can publish
without going through the command line. The layout is the one ``hub-backdoor purify --open-pr``
writes.
"""

from __future__ import annotations

import datetime as dt
import json
import shlex
import tempfile
from pathlib import Path
from typing import Any

from .card import CardContext, write_card
from .datasets_io import LoadedDataset
from .errors import HubBackdoorError, UnsupportedModelError
from .hub import push_folder
from .purification import PurifyResult
from .report import AuditReport, _jsonable, atomic_write_text, library_versions

__all__ = [
    "AUDIT_FILE",
    "CARRIED_METADATA",
    "PURIFICATION_FILE",
    "PURIFICATION_SCHEMA_VERSION",
    "load_hint",
    "open_purification_pr",
    "purification_record",
    "write_purified_folder",
]

#: Files written next to the weights of a purified model (the names the command line uses).
AUDIT_FILE = "backdoor_audit.json"
PURIFICATION_FILE = "backdoor_purification.json"
PURIFICATION_SCHEMA_VERSION = "1"
#: Metadata of the audited model's card that its security card keeps.
CARRIED_METADATA = ("license", "license_name", "license_link", "language", "datasets", "tags")


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
    """The JSON record of one purification (schema :data:`PURIFICATION_SCHEMA_VERSION`)."""
    target = int(result.target)
    return _jsonable(
        {
            "schema_version": PURIFICATION_SCHEMA_VERSION,
            "kind": "hub-backdoor-purification",
            "target": target,
            "target_name": result.report.classes[target].name,
            "trigger": trigger,
            "metrics": dict(result.metrics),
            "params": dict(result.params),
            "seconds": result.seconds,
            "history": list(result.history),
            "audited_model": {
                "label": label or repo_id,
                "repo_id": repo_id,
                "revision": revision,
                "sha": sha,
            },
            "dataset": {
                "name": dataset.name,
                "kind": dataset.kind,
                "split": dataset.split,
                "revision": dataset.revision,
            },
            "output": output,
            "versions": library_versions(),
            "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
            "audit_before": result.report.to_dict(),
            "audit_after": report_after.to_dict() if report_after is not None else None,
        }
    )


def write_purified_folder(
    folder: str | Path,
    *,
    result: PurifyResult,
    record: dict[str, Any],
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
    atomic_write_text(folder / PURIFICATION_FILE, json.dumps(record, indent=2, allow_nan=False) + "\n")
    write_card(result.report, context, folder / "README.md")
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
    """Open a pull request on ``repo_id`` with the purified model; returns the PR's URL.

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

    Raises :class:`~hub_backdoor.errors.HubBackdoorError` for Hub errors (see :mod:`hub_backdoor.hub`)
    and :class:`~hub_backdoor.errors.UnsupportedModelError` for a model that cannot be saved.
    """
    if not sha:
        raise HubBackdoorError(f"no audited commit for {repo_id}; pass the sha the model came from")
    target = int(result.target)
    kind = str(result.classifier.kind)
    hint = load_hint(kind, repo_id, revision="refs/pr/N") + " before the merge"
    carried = {k: v for k, v in (card_metadata or {}).items() if k in CARRIED_METADATA}
    data_arg = dataset.name + (f"@{dataset.revision}" if dataset.revision else "")
    if reproduce is None:
        parts = ["hub-backdoor", "purify", f"{repo_id}@{sha}", "--dataset", data_arg]
        parts += ["--split", dataset.split] if dataset.split else []
        parts += ["--open-pr", "--epochs", str(result.params.get("epochs"))]
        reproduce = " ".join(shlex.quote(p) for p in parts)
    record = purification_record(
        result,
        report_after=report_after,
        repo_id=repo_id,
        sha=sha,
        dataset=dataset,
        trigger=trigger,
        output={"name": repo_id, "push_to": None, "open_pr": True, "out": None, "kind": kind},
    )
    record["card"] = {
        "model_name": repo_id,
        "base_model": None,
        "load_hint": hint,
        "extra_metadata": carried,
        "reproduce": reproduce,
    }
    context = CardContext(
        model_label=repo_id,
        audited_repo=repo_id,
        audited_sha=sha,
        model_name=repo_id,
        dataset=dataset.name,
        dataset_is_hub=dataset.is_hub,
        split=dataset.split,
        purification=record,
        report_after=report_after,
        reproduce=reproduce,
        original_card=card_body,
        load_hint=hint,
        extra_metadata=carried,
    )
    with tempfile.TemporaryDirectory(prefix="hub-backdoor-pr-") as tmp:
        folder = write_purified_folder(Path(tmp) / "purified", result=result, record=record, context=context)
        return push_folder(
            folder,
            repo_id,
            commit_message=commit_message or f"Remove backdoor of class {target} (hub-backdoor)",
            create_pr=True,
            protected_repo=repo_id,
            token=token,
        )
