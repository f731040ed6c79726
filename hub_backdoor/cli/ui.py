"""Where the command line's messages go, and the per-class table it prints."""

from __future__ import annotations

import sys
from typing import Any, TextIO

__all__ = ["UI", "one_line", "print_table"]


def one_line(text: str) -> str:
    """``text`` on one line (errors are one line each), or a placeholder for an empty message."""
    return " ".join(str(text).split()) or "(no message)"


class UI:
    """Where messages go: results on stdout, progress and errors on stderr; ``quiet`` keeps errors only."""

    def __init__(self, quiet: bool = False, stdout: TextIO | None = None, stderr: TextIO | None = None):
        self.quiet = quiet
        self._out = stdout
        self._err = stderr
        self.stdout_is_data = False  # --json -: stdout carries the JSON only

    @property
    def out(self) -> TextIO:
        if self.stdout_is_data:
            return self.err
        return self._out or sys.stdout

    @property
    def err(self) -> TextIO:
        return self._err or sys.stderr

    def info(self, msg: str) -> None:
        if not self.quiet:
            print(msg, file=self.err, flush=True)

    def result(self, msg: str) -> None:
        if not self.quiet:
            print(msg, file=self.out, flush=True)

    def error(self, msg: str) -> None:
        print(f"error: {msg}", file=self.err, flush=True)

    def data(self, text: str) -> None:
        """Machine-readable output (a report for ``-``): always on the real stdout, even with ``quiet``."""
        print(text, file=self._out or sys.stdout, flush=True)

    def show(self, report: Any) -> None:
        """A finished report: its per-class table and its notes."""
        print_table(report, self)
        for note in report.notes:
            self.info(f"note: {note}")

    def console(self) -> Any:
        from rich.console import Console

        return Console(file=self.out, highlight=False, soft_wrap=False)


def _shown_classes(report: Any, max_rows: int) -> list[int]:
    """Every class, or (more than ``max_rows``) the flagged and most anomalous ones."""
    import numpy as np

    C = len(report.classes)
    if C <= max_rows:
        return list(range(C))
    top = np.argsort(-report.anomaly_indices, kind="stable")[: max_rows // 2]
    return sorted({int(k) for k in top} | set(report.flagged))


def print_table(report: Any, ui: UI, *, title: str | None = None, max_rows: int = 40) -> None:
    """The per-class norms as a table, flagged rows marked."""
    if ui.quiet:
        return
    from rich.table import Table

    shown = _shown_classes(report, max_rows)
    table = Table(
        title=title or f"{report.model.get('name', 'model')}: minimal latent perturbation per class",
        title_justify="left",
    )
    columns: tuple[tuple[str, dict[str, Any]], ...] = (
        ("class", {"justify": "right"}),
        ("name", {}),
        ("norm", {"justify": "right"}),
        ("score", {"justify": "right"}),
        ("p", {"justify": "right"}),  # against the clean calibration models
        ("ref. samples", {"justify": "right"}),
        ("", {"no_wrap": True, "min_width": 18}),  # the mark must survive an 80-column pipe
    )
    for name, kw in columns:
        table.add_column(name, **kw)
    for k in shown:
        r = report.classes[k]
        mark = "<< BACKDOOR TARGET" if k == report.target else ("<< flagged" if r.flagged else "")
        table.add_row(
            str(r.index),
            r.name,
            f"{r.norm:.4f}",
            f"{r.anomaly_index:.2f}",
            "–" if r.p_value is None else f"{r.p_value:.2g}",
            str(r.n_reference),
            mark,
            style="bold red" if r.flagged else None,
        )
    console = ui.console()
    console.print(table)
    if len(shown) < len(report.classes):
        console.print(f"({len(report.classes) - len(shown)} more classes, none flagged, in the JSON report)")
    console.print(report.summary())
