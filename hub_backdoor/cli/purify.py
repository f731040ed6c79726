"""``hub-backdoor purify``: audit (or read a saved audit), fine-tune the backdoor away, audit again,
and publish the purified model (:func:`hub_backdoor.outputs.publish.publish`) to a folder, a Hub repo or a
pull request on the audited repo."""

from __future__ import annotations

import argparse
from typing import Any

from ..defaults import ZOO_ATTACKS
from ..options import AuditOptions, PurifyOptions, add_purify_flags
from .options import data_options, detection_options, model_options, runtime_options
from .ui import UI

__all__ = ["register", "run"]


def register(subparsers: Any) -> argparse.ArgumentParser:
    """Add the ``purify`` command to ``subparsers``."""
    p = subparsers.add_parser(
        "purify",
        parents=[model_options(), data_options(), detection_options(), runtime_options()],
        help="remove a backdoor by fine-tuning; write, push or open a pull request",
        description="Audit, then fine-tune the model so the reconstructed trigger no longer "
        "works. The result keeps the input's format (timm or transformers folder) and its "
        "security card. Never commits to the audited repo's main branch.",
    )
    g = p.add_argument_group("where the purified model goes (at least one)")
    g.add_argument("--out", metavar="DIR", help="write the purified model folder here")
    g.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    dest = g.add_mutually_exclusive_group()
    dest.add_argument("--push-to", metavar="ORG/NAME", help="create (or update) this Hub repo with the model")
    dest.add_argument("--open-pr", action="store_true", help="open a pull request on the audited Hub repo")
    g.add_argument("--private", action="store_true", help="create the --push-to repo as private")
    g.add_argument(
        "--json", metavar="PATH", help="also write the purification record (JSON) here; - for stdout"
    )
    _purification_options(p)
    p.set_defaults(func=run)
    return p


def _purification_options(p: argparse.ArgumentParser) -> None:
    """The purification group: the saved audit, the target, every :class:`PurifyOptions` flag (the
    library's defaults, so the two cannot drift apart) and the known trigger to measure."""
    g = p.add_argument_group("purification")
    g.add_argument("--report", metavar="PATH", help="use this saved audit instead of auditing again")
    g.add_argument(
        "--target",
        type=int,
        default=None,
        metavar="K",
        help="purify class K (default: the flagged class; needed when none is flagged)",
    )
    add_purify_flags(g)
    g.add_argument(
        "--eval-trigger",
        choices=sorted(ZOO_ATTACKS),
        default=None,
        help="measure the attack success rate of this known trigger before/after",
    )


def run(args: argparse.Namespace, ui: UI) -> int:
    """Purify ``args.source``; returns 0 (published), 1 (nothing flagged) or 4 (inconclusive audit)."""
    from ..jobs import Destination, purify_source

    if args.json == "-":
        ui.stdout_is_data = True
    outcome = purify_source(
        args.source, dataset=args.dataset, split=args.split, options=AuditOptions.from_args(args),
        purify=PurifyOptions.from_args(args), target=args.target, report=args.report,
        destination=Destination(out=args.out, push_to=args.push_to, open_pr=args.open_pr,
                                overwrite=args.overwrite, private=args.private),
        json_out=args.json, eval_trigger=args.eval_trigger, max_accuracy_drop=args.max_accuracy_drop,
        allow_pickle=args.allow_pickle, trust_remote_code=args.trust_remote_code, messages=ui,
    )
    return int(outcome.exit_code)
