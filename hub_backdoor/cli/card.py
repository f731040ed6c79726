"""``hub-backdoor card``: regenerate a security card from a saved report (and purification record)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from ..errors import ExitCode, HubBackdoorError
from . import common
from .options import runtime_options
from .ui import UI, one_line

__all__ = ["register", "run"]


def register(subparsers: Any) -> argparse.ArgumentParser:
    """Add the ``card`` command to ``subparsers``."""
    from ..layout import PURIFICATION_FILE

    p = subparsers.add_parser(
        "card",
        parents=[runtime_options()],
        help="regenerate a security card from a saved report",
        description="Write a security model card (and its chart) from a saved JSON report.",
    )
    p.add_argument(
        "source", metavar="SOURCE", help="the audited model: Hub id or folder (names it in the card)"
    )
    p.add_argument("--report", required=True, metavar="PATH", help="the JSON report (audit --json)")
    p.add_argument(
        "--purification",
        metavar="PATH",
        help=f"a purification record ({PURIFICATION_FILE}) for a purified model's card",
    )
    p.add_argument(
        "--out",
        default="card.md",
        metavar="PATH",
        help="card file (default card.md); the chart goes next to it as .png; - for stdout (no chart)",
    )
    p.add_argument("--name", default=None, help="model name in the card's model-index")
    p.set_defaults(func=run)
    return p


def _read_record(path: str, report: Any) -> Any:
    """The purification record at ``path``, checked against ``report``."""
    from ..errors import ReportError
    from ..publish import PurificationRecord

    try:
        data = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError, RecursionError) as e:  # RecursionError: nested too deeply
        raise HubBackdoorError(f"cannot read --purification {path} ({one_line(str(e))})") from e
    try:
        record = PurificationRecord.from_dict(data)
    except ReportError as e:
        joint = " is" if str(e).startswith("not ") else ":"
        raise ReportError(f"--purification {path}{joint} {e}") from e
    _check_record(record, report, path)
    return record


def _check_record(record: Any, report: Any, path: str) -> None:
    """Refuse a purification record of another model than ``report``."""
    from ..report import AuditReport

    C = len(report.classes)
    if not 0 <= record.target < C:
        raise HubBackdoorError(f"--purification {path}: 'target' must be a class index in 0..{C - 1}")
    if isinstance(record.audit_before, dict):
        b = AuditReport.from_dict(record.audit_before)
        mine, theirs = report.model.get("head_sha256"), b.model.get("head_sha256")
        if len(b.classes) != C or (mine and theirs and mine != theirs):
            raise HubBackdoorError(
                f"--purification {path} belongs to another model than the --report (its audit has another "
                "head fingerprint or class count); pass the record written with this report"
            )


def _repo_id(source: str) -> str | None:
    """The Hub id ``source`` names, or ``None`` for a folder."""
    from ..datasets_io import looks_like_path
    from ..hub import parse_repo_ref

    if Path(source).expanduser().exists() or looks_like_path(source):
        return None
    return parse_repo_ref(source)[0]


def run(args: argparse.Namespace, ui: UI) -> int:
    """Write the card of ``--report`` (and ``--purification``) to ``--out``."""
    from ..card import CardContext
    from ..publish import load_hint
    from ..report import AuditReport
    from ..validation import check_outputs

    named_inputs = [(args.report, "the --report file"), (args.purification, "the --purification record")]
    if Path(args.source).expanduser().exists():  # a local model folder: its own card and files stay
        named_inputs.append((args.source, "the model folder"))
    check_outputs(common.card_outputs(args.out, "--out"), named_inputs)
    report = AuditReport.from_json(args.report)
    record = _read_record(args.purification, report) if args.purification else None
    after = AuditReport.from_dict(record.audit_after) if record and record.audit_after else None
    source = args.source
    src = report.model.get("source") or {}
    repo_id = _repo_id(source)
    if src.get("repo_id") and repo_id and src["repo_id"].lower() != repo_id.lower():
        ui.info(f"warning: the report is for {src['repo_id']}, not {repo_id}")
    ds = report.data.get("source") or {}
    saved = record.card if record else {}
    name = args.name or saved.get("model_name") or (repo_id or source)
    hint = saved.get("load_hint") or (load_hint(str(report.model.get("kind")), name) if record else "")
    ctx = CardContext(
        model_label=repo_id or Path(source).name or source,
        audited_repo=repo_id,
        audited_sha=src.get("sha") if repo_id else None,
        model_name=name,
        dataset=ds.get("name"),
        dataset_is_hub=ds.get("kind") == "hub",
        split=ds.get("split"),
        purification=record.to_dict() if record else None,
        report_after=after,
        reproduce=saved.get("reproduce") or common.reproduce_report(report, source),
        load_hint=hint,
        base_model=(repo_id or saved.get("base_model")) if record else None,
        extra_metadata=dict(saved.get("extra_metadata") or {}),
    )
    if args.out == "-":
        ui.stdout_is_data = True
    common.write_card_or_print(report, ctx, args.out, ui)
    return ExitCode.OK
