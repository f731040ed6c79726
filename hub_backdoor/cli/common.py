"""Steps the commands share beyond the workflow layer (:mod:`hub_backdoor.jobs`): exit codes, card paths."""

from __future__ import annotations

from typing import Any

from ..errors import VERDICT_EXIT, ExitCode
from ..layout import chart_path_for
from .ui import UI, one_line

__all__ = ["audit_exit", "card_outputs"]


def card_outputs(path: str | None, flag: str) -> list[tuple[Any, str]]:
    """A card and its chart (same name, ``.png``), as outputs to check."""
    if path is None or path == "-":
        return [(path, flag)]
    return [(path, flag), (chart_path_for(path), f"{flag} (its chart)")]


def audit_exit(report: Any, ui: UI | None = None) -> int:
    """The exit code of a verdict (:func:`hub_backdoor.jobs.exit_code`), an inconclusive one said
    even with ``--quiet``."""
    code = VERDICT_EXIT[report.verdict]
    if code == ExitCode.INCONCLUSIVE and ui is not None:  # like an error: this is not a clean result
        print(f"inconclusive: {one_line(report.reason or '')}", file=ui.err, flush=True)
    return code
