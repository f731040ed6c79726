"""``hub-backdoor audit``: audit a model for a backdoor; exit 1 when one is found."""

from __future__ import annotations

import argparse
import json
from typing import Any

from . import common
from .options import (
    audit_kwargs,
    check_audit_args,
    data_options,
    detection_options,
    model_options,
    runtime_options,
)
from .ui import UI, print_table

__all__ = ["register", "run"]


def register(subparsers: Any) -> argparse.ArgumentParser:
    """Add the ``audit`` command to ``subparsers``."""
    p = subparsers.add_parser(
        "audit",
        parents=[model_options(), data_options(), detection_options(), runtime_options()],
        help="audit a model for a backdoor (exit 1 when one is found)",
        description="Audit a model for a single-target backdoor. Exit code 0: no backdoor "
        "found; 1: backdoor found; 2: bad input; 3: internal error; 4: inconclusive (the reference "
        "data cannot support a verdict); 5: the Hub or the network failed, try again.",
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
    from ..audit import audit
    from ..distributed import is_main_process
    from ..validation import check_outputs

    # every option and output is checked before the download and the reference pass
    check_audit_args(args)
    outputs = [(args.json, "--json"), (args.sarif, "--sarif"), *common.card_outputs(args.card, "--card")]
    check_outputs(outputs)
    if "-" in (args.json, args.sarif, args.card):
        ui.stdout_is_data = True
    model = common.load_source(args, ui)
    check_outputs(outputs, common.inputs(model, dataset=args.dataset))
    loaded = common.load_data(args, model, ui)
    check_outputs(outputs, common.inputs(model, loaded))
    report = audit(model.clf, loaded.dataset, **audit_kwargs(args, ui))
    if not is_main_process():  # every rank holds the same report; rank 0 alone prints and writes
        return common.audit_exit(report)
    common.annotate(report, loaded)
    print_table(report, ui)
    common.note_lines(report, ui)
    _write_reports(report, args, ui)
    if args.card:
        from ..publish import card_context

        ctx = card_context(
            model,
            loaded,
            model_name=model.repo_id or model.label,
            reproduce=common.reproduce("audit", model, loaded, args, []),
        )
        common.write_card_or_print(report, ctx, args.card, ui)
    return common.audit_exit(report, ui)


def _write_reports(report: Any, args: argparse.Namespace, ui: UI) -> None:
    """``--json`` and ``--sarif``, to files or (``-``) stdout."""
    from ..sarif import to_sarif, write_sarif

    if args.json == "-":
        ui.data(report.to_json())
    elif args.json:
        report.to_json(args.json)
        ui.result(f"wrote report {args.json}")
    if args.sarif == "-":
        ui.data(json.dumps(to_sarif(report), indent=2, allow_nan=False))
    elif args.sarif:
        write_sarif(report, args.sarif)
        ui.result(f"wrote SARIF {args.sarif}")
