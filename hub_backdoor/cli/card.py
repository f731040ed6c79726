"""``hub-backdoor card``: regenerate a security card from a saved report (and purification record)."""

from __future__ import annotations

import argparse
from typing import Any

from ..errors import ExitCode
from ..layout import PURIFICATION_FILE
from .options import runtime_options
from .ui import UI

__all__ = ["register", "run"]


def register(subparsers: Any) -> argparse.ArgumentParser:
    """Add the ``card`` command to ``subparsers``."""
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


def run(args: argparse.Namespace, ui: UI) -> int:
    """Write the card of ``--report`` (and ``--purification``) to ``--out``."""
    from ..jobs import card_from_saved

    if args.out == "-":
        ui.stdout_is_data = True
    card_from_saved(args.source, report=args.report, purification=args.purification, out=args.out,
                    name=args.name, messages=ui)
    return ExitCode.OK
