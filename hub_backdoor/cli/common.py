"""Steps the commands share beyond the workflow layer (:mod:`hub_backdoor.jobs`): exit codes, cards."""

from __future__ import annotations

import shlex
from typing import Any

from ..errors import VERDICT_EXIT, ExitCode
from .ui import UI, one_line

__all__ = ["audit_exit", "card_outputs", "reproduce_report", "write_card_or_print"]


def card_outputs(path: str | None, flag: str) -> list[tuple[Any, str]]:
    """A card and its chart (same name, ``.png``), as outputs to check."""
    if path is None or path == "-":
        return [(path, flag)]
    from ..card import chart_path_for

    return [(path, flag), (chart_path_for(path), f"{flag} (its chart)")]


def audit_exit(report: Any, ui: UI | None = None) -> int:
    """The exit code of a verdict (:func:`hub_backdoor.jobs.exit_code`), an inconclusive one said
    even with ``--quiet``."""
    code = VERDICT_EXIT[report.verdict]
    if code == ExitCode.INCONCLUSIVE and ui is not None:  # like an error: this is not a clean result
        print(f"inconclusive: {one_line(report.reason or '')}", file=ui.err, flush=True)
    return code


def reproduce_report(report: Any, source: str) -> str:
    """The audit command line that reproduces a saved report."""
    src = report.model.get("source") or {}
    pinned = f"{src['repo_id']}@{src['sha']}" if src.get("type") == "hub" and src.get("sha") else source
    ds = report.data.get("source") or {}
    parts = ["hub-backdoor", "audit", pinned]
    if ds.get("name"):
        parts += ["--dataset", ds["name"] + (f"@{ds['revision']}" if ds.get("revision") else "")]
    if ds.get("split"):
        parts += ["--split", ds["split"]]
    p = report.params
    for flag, key in (("--max-samples", "max_samples"), ("--soft-margin", "soft_margin")):
        if p.get(key) is not None:
            parts += [flag, str(p[key])]
    parts += ["--seed", str(report.seed), "--rule", str(p.get("rule"))]
    parts += ["--threshold", str(p.get("threshold"))]
    return " ".join(shlex.quote(x) for x in parts)


def write_card_or_print(report: Any, ctx: Any, path: str, ui: UI) -> None:
    """Write the card and its chart, or print the card alone on stdout for ``-`` (no chart)."""
    from ..card import build_card, write_card

    if path == "-":
        text = str(build_card(report, ctx, chart_file=""))
        ui.data(text.rstrip("\n"))
        return
    card_path, chart = write_card(report, ctx, path)
    ui.result(f"wrote card {card_path} (chart {chart})")
