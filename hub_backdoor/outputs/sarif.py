"""SARIF 2.1.0 output of an audit, for code scanning (e.g. GitHub's ``upload-sarif`` action).

One rule, ``HBD001`` (backdoor target class): each flagged class is one ``error`` result located at
the model's ``config.json`` (the weights are binary; code scanning needs a text artifact). A clean
audit has no results, which closes earlier alerts. An inconclusive audit (reference data that cannot
support a verdict) is one ``warning`` result of rule ``HBD002`` instead. Audit notes become tool
notifications.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from .. import __version__
from ..detection.report import AuditReport, atomic_write_text, jsonable

__all__ = [
    "INCONCLUSIVE_RULE_ID",
    "RULE_ID",
    "SARIF_SCHEMA",
    "SARIF_VERSION",
    "default_artifact_uri",
    "to_sarif",
    "write_sarif",
]

SARIF_VERSION = "2.1.0"
SARIF_SCHEMA = "https://json.schemastore.org/sarif-2.1.0.json"
RULE_ID = "HBD001"
INCONCLUSIVE_RULE_ID = "HBD002"

_RULE = {
    "id": RULE_ID,
    "name": "BackdoorTargetClass",
    "shortDescription": {"text": "Image classifier class reachable by an abnormally small latent change"},
    "fullDescription": {
        "text": (
            "For each class, hub-backdoor computes the smallest change of the penultimate embedding that "
            "makes the model predict that class for every clean reference image. A class that needs a "
            "much smaller change than the others (anomaly index above the threshold) is the likely "
            "target of a backdoor: inputs carrying the trigger are classified as that class."
        )
    },
    "help": {
        "text": (
            "Do not deploy the model as is. Purify it with `hub-backdoor purify`, or obtain a model "
            "trained on data you trust."
        ),
        "markdown": (
            "Do not deploy the model as is. Purify it with `hub-backdoor purify MODEL --dataset DATA "
            "--out DIR`, or obtain a model trained on data you trust."
        ),
    },
    "defaultConfiguration": {"level": "error"},
    "properties": {
        "tags": ["security", "backdoor", "machine-learning"],
        "precision": "medium",
        "security-severity": "8.0",
    },
}


_INCONCLUSIVE_RULE = {
    "id": INCONCLUSIVE_RULE_ID,
    "name": "AuditInconclusive",
    "shortDescription": {"text": "The reference data cannot support a backdoor verdict"},
    "fullDescription": {
        "text": (
            "The model classifies too few of the reference images right, or some classes have too few "
            "reference images, so the audit cannot tell a clean model from a backdoored one."
        )
    },
    "help": {
        "text": "Audit again with clean, labelled images of every class, like the model's training data.",
        "markdown": "Audit again with clean, labelled images of every class, like the model's training data.",
    },
    "defaultConfiguration": {"level": "warning"},
    "properties": {"tags": ["security", "backdoor", "machine-learning"], "precision": "high"},
}


def to_sarif(report: AuditReport, *, artifact_uri: str | None = None) -> dict[str, Any]:
    """The audit as a SARIF 2.1.0 log (a dict ready for ``json.dumps``).

    Args:
        report: the audit.
        artifact_uri: where results point; default: the model's ``config.json`` (relative to the
            current folder for a local model, a Hub URL for a Hub model).
    """
    uri = artifact_uri or default_artifact_uri(report)
    name = str(report.model.get("name", "model"))
    results = []
    if report.verdict == "inconclusive":  # one warning, so the run does not read as a clean audit
        results.append(_inconclusive_result(report, name, uri))
    for k in ([] if report.verdict == "inconclusive" else report.flagged):
        results.append(_target_result(report, k, name, uri))
    notifications = [{"level": "note", "message": {"text": note}} for note in report.notes]
    return jsonable(
        {
            "$schema": SARIF_SCHEMA,
            "version": SARIF_VERSION,
            "runs": [
                {
                    "tool": {
                        "driver": {
                            "name": "hub-backdoor",
                            "semanticVersion": __version__,
                            "version": __version__,
                            "rules": [_RULE, _INCONCLUSIVE_RULE],
                        }
                    },
                    "invocations": [
                        {
                            "executionSuccessful": True,
                            "toolExecutionNotifications": notifications,
                        }
                    ],
                    "results": results,
                    "properties": {
                        "verdict": report.verdict,
                        "reason": report.reason,
                        "model": report.model,
                        "data_fingerprint": report.data.get("fingerprint"),
                        "report_schema_version": report.schema_version,
                    },
                }
            ],
        }
    )


def _inconclusive_result(report: AuditReport, name: str, uri: str) -> dict[str, Any]:
    """The warning result of an inconclusive audit of model ``name`` (pointing at ``uri``)."""
    return {
        "ruleId": INCONCLUSIVE_RULE_ID,
        "ruleIndex": 1,
        "level": "warning",
        "message": {"text": f"{name}: the audit is inconclusive: {report.reason}."},
        "locations": [
            {"physicalLocation": {"artifactLocation": {"uri": uri}, "region": {"startLine": 1}}}
        ],
        "partialFingerprints": {"hubBackdoorInconclusive/v1": name},
        "properties": {"accuracy": report.data.get("accuracy"), "reason": report.reason},
    }


def _target_result(report: AuditReport, k: int, name: str, uri: str) -> dict[str, Any]:
    """The error result of flagged class ``k`` of model ``name`` (pointing at ``uri``)."""
    row = report.classes[k]
    return {
        "ruleId": RULE_ID,
        "ruleIndex": 0,
        "level": "error",
        "message": {
            "text": (
                f"{name}: class {row.index} ({row.name}) is a suspected backdoor target: its minimal "
                f"latent perturbation has norm {row.norm:.4g}, anomaly index {row.anomaly_index:.2f} "
                f"> threshold {report.params.get('threshold')}."
            )
        },
        "locations": [
            {
                "physicalLocation": {"artifactLocation": {"uri": uri}, "region": {"startLine": 1}},
                "logicalLocations": [
                    {
                        "name": f"class {row.index}",
                        "fullyQualifiedName": f"{name}#class={row.index}",
                        "kind": "member",
                    }
                ],
            }
        ],
        "partialFingerprints": {"hubBackdoorTarget/v1": f"{name}:{row.index}"},
        "properties": {
            "class_index": row.index,
            "class_name": row.name,
            "norm": row.norm,
            "anomaly_index": row.anomaly_index,
            "threshold": report.params.get("threshold"),
        },
    }


def default_artifact_uri(report: AuditReport) -> str:
    src = report.model.get("source") or {}
    if src.get("type") == "hub" and src.get("repo_id"):
        from huggingface_hub import constants

        rev = src.get("sha") or src.get("revision") or "main"
        return f"{constants.ENDPOINT}/{src['repo_id']}/blob/{rev}/config.json"
    folder = src.get("folder")
    if folder:
        path = Path(folder) / "config.json"
        try:
            return Path(os.path.relpath(path)).as_posix()
        except ValueError:  # another drive on Windows
            return path.as_posix()
    return "config.json"


def write_sarif(report: AuditReport, path: str | os.PathLike[str], **kw: Any) -> Path:
    """Write the SARIF log atomically."""
    import json

    path = Path(path)
    atomic_write_text(path, json.dumps(to_sarif(report, **kw), indent=2, allow_nan=False) + "\n")
    return path
