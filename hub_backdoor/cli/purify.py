"""``hub-backdoor purify``: audit (or read a saved audit), fine-tune the backdoor away, audit again,
and publish the purified model (:func:`hub_backdoor.publish.publish`) to a folder, a Hub repo or a
pull request on the audited repo."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from ..errors import ExitCode, HubBackdoorError, OptionError, OutputPathError, UnsupportedModelError
from . import common
from .options import (
    audit_kwargs,
    check_audit_args,
    data_options,
    detection_options,
    model_options,
    positive_int,
    runtime_options,
)
from .ui import UI, print_table

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
    from ..defaults import PURIFY as d  # the library's defaults, so the two cannot drift apart
    from ..zoo import ATTACKS

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


def _check_args(args: argparse.Namespace) -> list[tuple[Any, str]]:
    """Every option and output, checked before the download; returns the named inputs (--report)."""
    from ..hub import check_repo_id
    from ..validation import check_not_protected, check_outputs, check_purify_options, check_writable

    if not (args.out or args.push_to or args.open_pr):
        raise HubBackdoorError("nothing to write: give --out DIR, --push-to org/name or --open-pr")
    if args.push_to:
        check_repo_id(args.push_to)
    if args.holdout < 0 or args.holdout >= 1:
        raise HubBackdoorError(f"--holdout {args.holdout} must be in [0, 1)")
    check_audit_args(args)
    check_purify_options(
        beta=args.beta, scale=args.scale, distill=args.distill, lr=args.lr, epochs=args.epochs,
        holdout=args.holdout, batch_size=args.batch_size, seed=args.seed, max_samples=args.max_samples,
        device=args.device, warmup=args.warmup, keep=args.keep, target_weight=args.target_weight,
    )
    if not 0 <= args.max_accuracy_drop <= 100:  # also refuses nan
        raise OptionError(f"--max-accuracy-drop {args.max_accuracy_drop} must be a number of points "
                          "in 0..100")
    named = [(args.report, "the --report file")] if args.report else []
    check_outputs([(args.json, "--json")], named)
    if args.out:
        out = Path(args.out).expanduser()
        check_writable(out, "--out", folder=True)  # first: a name too long fails any other look
        check_not_protected(out, "--out", named)
        here = Path.cwd().resolve()
        if out.exists() and (out.resolve() == here or out.resolve() in here.parents):
            raise OutputPathError(f"--out {args.out} is or holds the current folder, which cannot be "
                                  "replaced while in use; give another folder")
    return named


def _protect(
    args: argparse.Namespace, named: list[tuple[Any, str]], protected: list[tuple[Any, str]]
) -> None:
    """Neither ``--out`` nor ``--json`` may overwrite an input."""
    from ..validation import check_not_protected, check_outputs

    if args.out:
        check_not_protected(Path(args.out).expanduser(), "--out", protected)
    check_outputs([(args.json, "--json")], [*named, *protected])


def _load(args: argparse.Namespace, ui: UI, named: list[tuple[Any, str]]) -> tuple[Any, Any, Any]:
    """The model, its saved audit (``--report``, else ``None``) and the reference data, each checked
    against the others and the destinations before any long work."""
    from ..publish import check_destinations
    from ..report import AuditReport
    from ..validation import check_report_matches

    model = common.load_source(args, ui)
    check_destinations(
        model, out=Path(args.out).expanduser() if args.out else None, push_to=args.push_to,
        open_pr=args.open_pr, overwrite=args.overwrite,
    )
    _protect(args, named, common.inputs(model, dataset=args.dataset))
    if not hasattr(model.clf, "save_pretrained"):
        raise UnsupportedModelError(
            f"cannot save a purified {model.clf.kind} model; only timm and transformers"
        )
    report = None
    if args.report:  # a report of another model is refused before any data is read
        report = AuditReport.from_json(args.report)
        check_report_matches(report, model.clf, model.label, f"--report {args.report}")
    _check_target(args.target, model)
    loaded = common.load_data(args, model, ui)
    _protect(args, named, common.inputs(model, loaded))
    return model, report, loaded


def _check_target(target: int | None, model: Any) -> None:
    if target is not None and not 0 <= target < model.clf.num_classes:
        raise HubBackdoorError(
            f"--target {target} is not a class of {model.label} (0..{model.clf.num_classes - 1})"
        )


def _choose_target(args: argparse.Namespace, report: Any, model: Any, ui: UI) -> int | ExitCode:
    """The class to purify, or the exit code when there is none (1: nothing flagged, 4: inconclusive)."""
    if report.inconclusive and args.target is None:
        ui.result(
            f"the audit of {model.label} is inconclusive: {report.reason}; nothing purified (pass --target K "
            "to purify class K anyway)"
        )
        return ExitCode.INCONCLUSIVE
    target = args.target if args.target is not None else report.target
    if target is None:
        ui.result(
            f"no backdoor found in {model.label}; nothing purified (pass --target K to purify class K anyway)"
        )
        return ExitCode.BACKDOOR
    _check_target(target, model)
    return int(target)


def _fine_tune(args: argparse.Namespace, ui: UI, *, model: Any, data: Any, report: Any, target: int) -> Any:
    from .. import purification, zoo
    from ..defaults import PURIFY

    trigger = zoo.ATTACKS[args.eval_trigger]() if args.eval_trigger else None
    ui.info(f"purifying class {target} ({args.epochs or 'auto'} epochs) ...")
    result = purification.purify(
        model.clf, data, report=report, target=target, trigger=trigger, beta=args.beta, scale=args.scale,
        distill=args.distill, keep=args.keep, warmup=args.warmup, epochs=args.epochs, lr=args.lr,
        target_weight=args.target_weight,
        train=args.train, batch_size=args.batch_size,
        holdout=args.holdout, seed=args.seed, image_column=args.image_column, label_column=args.label_column,
        device=args.device, progress=not ui.quiet, max_accuracy_drop=args.max_accuracy_drop / 100.0,
        threads=args.threads or int(PURIFY["threads"]),
    )
    result.classifier.model.to("cpu")
    return result


def run(args: argparse.Namespace, ui: UI) -> int:
    """Purify ``args.source``; returns 0 (published), 1 (nothing flagged) or 4 (inconclusive audit)."""
    from ..audit import audit
    from ..data import ReferenceData
    from ..distributed import is_main_process

    named = _check_args(args)
    if args.json == "-":
        ui.stdout_is_data = True
    model, report, loaded = _load(args, ui, named)
    data = ReferenceData(loaded.dataset, image_column=args.image_column, label_column=args.label_column)
    data = data.subset(args.max_samples, args.seed)  # --max-samples bounds the fine-tuning too
    fit = data.split(args.holdout, args.seed)[0] if args.holdout > 0 else data
    if report is not None:
        ui.info(f"using the audit in {args.report}")
    else:
        ui.info("auditing ...")
        report = audit(model.clf, fit, **audit_kwargs(args, ui, columns=False))
        common.annotate(report, loaded)
    print_table(report, ui)
    common.note_lines(report, ui)
    target = _choose_target(args, report, model, ui)
    if isinstance(target, ExitCode):
        return target
    result = _fine_tune(args, ui, model=model, data=data, report=report, target=target)
    ui.info("auditing the purified model ...")
    after = audit(result.classifier, fit, **audit_kwargs(args, ui, columns=False))
    common.annotate(after, loaded)
    if not is_main_process():  # the other ranks trained the same weights (DDP); rank 0 publishes
        return ExitCode.OK
    _publish(args, ui, model=model, loaded=loaded, result=result, after=after)
    return ExitCode.OK


def _publish(args: argparse.Namespace, ui: UI, *, model: Any, loaded: Any, result: Any, after: Any) -> None:
    """Write, push or open the pull request, then say where it went and write ``--json``."""
    from ..publish import publish, purify_flags
    from ..report import atomic_write_text

    extra = ["--out", str(Path(args.out).expanduser())] if args.out else []
    extra += ["--push-to", args.push_to] if args.push_to else []
    extra += ["--open-pr"] if args.open_pr else []
    extra += purify_flags(result)
    extra += ["--eval-trigger", args.eval_trigger] if args.eval_trigger else []
    published = publish(
        result, model=model, dataset=loaded, report_after=after, out=args.out, push_to=args.push_to,
        open_pr=args.open_pr, overwrite=args.overwrite, private=args.private, trigger=args.eval_trigger,
        reproduce=common.reproduce("purify", model, loaded, args, extra),
    )
    if published.folder is not None:
        ui.result(f"wrote purified model {published.folder}")
    if published.url:
        ui.result(f"pushed to {args.push_to}: {published.url}")
    if published.pr_url:
        ui.result(f"opened pull request on {model.repo_id}: {published.pr_url}")
    ui.result(result.summary())
    text = published.record.to_json()
    if args.json == "-":
        ui.data(text.rstrip("\n"))
    elif args.json:
        atomic_write_text(Path(args.json), text)
        ui.result(f"wrote purification record {args.json}")
    if after.backdoor_found:
        ui.result(f"warning: the purified model is still flagged (class {after.target}); see the card")
