"""``hub-backdoor audit``: audit a model for a backdoor; exit 1 when one is found."""

from __future__ import annotations

import argparse
from typing import Any

from ..errors import exit_codes_text
from ..options import AuditOptions
from . import common
from .options import data_options, detection_options, model_options, runtime_options
from .ui import UI

__all__ = ["register", "run"]


def register(subparsers: Any) -> argparse.ArgumentParser:
    """Add the ``audit`` command to ``subparsers``."""
    p = subparsers.add_parser(
        "audit",
        parents=[model_options(), data_options(), detection_options(), runtime_options()],
        help="audit a model for a backdoor (exit 1 when one is found)",
        description="Audit a model for a single-target backdoor. Exit codes: "
        f"{exit_codes_text()}.",
    )
    g = p.add_argument_group("reports")
    g.add_argument(
        "--json", metavar="PATH", help="write the JSON report (schema: docs/formats.md); - for stdout"
    )
    g.add_argument("--sarif", metavar="PATH", help="write a SARIF 2.1.0 log for code scanning; - for stdout")
    g.add_argument(
        "--card",
        metavar="PATH",
        help="write a security model card (Markdown) and its chart (.png); - for the card on stdout",
    )
    p.set_defaults(func=run)
    return p


def run(args: argparse.Namespace, ui: UI) -> int:
    """Audit ``args.source``; returns 0 (clean), 1 (backdoor) or 4 (inconclusive)."""
    from ..jobs import AuditOutputs, audit_source

    outputs = AuditOutputs(json=args.json, sarif=args.sarif, card=args.card)
    if outputs.to_stdout:
        ui.stdout_is_data = True
    outcome = audit_source(
        args.source, dataset=args.dataset, split=args.split, options=AuditOptions.from_args(args),
        outputs=outputs, allow_pickle=args.allow_pickle, trust_remote_code=args.trust_remote_code,
        messages=ui,
    )
    return common.audit_exit(outcome.report, ui)
