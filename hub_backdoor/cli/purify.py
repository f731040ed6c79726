"""``hub-backdoor purify``: audit (or read a saved audit), fine-tune the backdoor away, audit again,
and publish the purified model (:func:`hub_backdoor.outputs.publish.publish`) to a folder, a Hub repo or a
pull request on the audited repo."""

from __future__ import annotations

import argparse
from typing import Any

from ..defaults import PURIFY, ZOO_ATTACKS
from ..options import AuditOptions
from .options import data_options, detection_options, model_options, positive_int, runtime_options
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
    d, ATTACKS = PURIFY, ZOO_ATTACKS  # the library's defaults, so the two cannot drift apart

    g = p.add_argument_group("purification")
    g.add_argument("--report", metavar="PATH", help="use this saved audit instead of auditing again")
    g.add_argument(
        "--target",
        type=int,
        default=None,
        metavar="K",
        help="purify class K (default: the flagged class; needed when none is flagged)",
    )
    g.add_argument("--epochs", type=positive_int, default=None,
                   help=f"fine-tuning epochs (default {d['epochs']}, or more on a small clean set so "
                        f"that training takes at least {d['min_steps']} optimizer steps)")
    g.add_argument("--beta", type=float, default=d["beta"],
                   help=f"weight of the latent-trigger loss (default {d['beta']})")
    g.add_argument("--scale", type=float, default=d["scale"],
                   help=f"multiplier of s_t in the loss (default {d['scale']}; 1 = the paper)")
    g.add_argument("--distill", type=float, default=d["distill"],
                   help=f"weight of a KL term to the original model (default {d['distill']}; 0 = paper)")
    g.add_argument("--keep", type=float, default=d["keep"],
                   help=f"weight of a KL term to the original model over the non-target classes only "
                        f"(default {d['keep']}; 0 = the loss without it)")
    g.add_argument("--target-weight", type=float, default=d["target_weight"],
                   help=f"weight of the clean loss on the target class's own samples against 1 for the "
                        f"others (default {d['target_weight']}; 1 = the paper)")
    g.add_argument("--lr", type=float, default=d["lr"], help=f"peak learning rate (default {d['lr']})")
    g.add_argument("--warmup", type=float, default=d["warmup"],
                   help=f"share of the epochs over which the latent shift grows from 0 (default "
                        f"{d['warmup']}; 0 = the paper)")
    g.add_argument("--train", choices=["backbone", "last-stage", "all"], default=d["train"],
                   help=f"parameters that change: the backbone (head frozen), only its last stage, or "
                        f"all (default {d['train']})")
    g.add_argument("--augment", action="store_true",
                   help="shift each fine-tuning image by up to 2 pixels and flip it (default off)")
    g.add_argument("--sam-rho", type=float, default=d["sam_rho"], metavar="RHO",
                   help=f"sharpness-aware minimisation with this radius, the optimiser of FT-SAM (default "
                        f"{d['sam_rho']}: off)")
    g.add_argument("--sam-adaptive", action="store_true",
                   help="with --sam-rho: adaptive SAM, the variant FT-SAM runs (RHO is then relative)")
    g.add_argument(
        "--holdout",
        type=float,
        default=0.2,
        help="fraction of the data held out to measure accuracy before/after (default 0.2)",
    )
    g.add_argument(
        "--max-accuracy-drop",
        type=float,
        default=1.0,
        metavar="POINTS",
        help="accuracy budget in points of held-out clean accuracy (default 1): a purification that "
        "loses more publishes nothing and exits 6",
    )
    g.add_argument(
        "--eval-trigger",
        choices=sorted(ATTACKS),
        default=None,
        help="measure the attack success rate of this known trigger before/after",
    )


#: The purify flags that are keywords of :func:`hub_backdoor.purify`.
_PURIFY_KEYS = ("beta", "scale", "distill", "keep", "warmup", "epochs", "lr", "target_weight", "train",
                "holdout", "threads", "augment", "sam_rho", "sam_adaptive")


def run(args: argparse.Namespace, ui: UI) -> int:
    """Purify ``args.source``; returns 0 (published), 1 (nothing flagged) or 4 (inconclusive audit)."""
    from ..jobs import Destination, purify_source

    if args.json == "-":
        ui.stdout_is_data = True
    outcome = purify_source(
        args.source, dataset=args.dataset, split=args.split, options=AuditOptions.from_args(args),
        purify={k: getattr(args, k) for k in _PURIFY_KEYS}, target=args.target, report=args.report,
        destination=Destination(out=args.out, push_to=args.push_to, open_pr=args.open_pr,
                                overwrite=args.overwrite, private=args.private),
        json_out=args.json, eval_trigger=args.eval_trigger, max_accuracy_drop=args.max_accuracy_drop,
        allow_pickle=args.allow_pickle, trust_remote_code=args.trust_remote_code, messages=ui,
    )
    return int(outcome.exit_code)
