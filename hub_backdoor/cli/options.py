"""Option groups shared by the commands (runtime, model, reference data, detection), in one place."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from ..errors import ExitCode
from .ui import UI, one_line

__all__ = [
    "Parser",
    "audit_kwargs",
    "check_audit_args",
    "data_options",
    "detection_options",
    "model_options",
    "positive_int",
    "runtime_options",
]


class Parser(argparse.ArgumentParser):
    """argparse with one-line errors (``error: ...``) and exit code 2."""

    def error(self, message: str) -> Any:  # noqa: D102
        self.print_usage(sys.stderr)
        print(f"error: {one_line(message)}", file=sys.stderr)
        raise SystemExit(int(ExitCode.USAGE))


def positive_int(text: str) -> int:
    """An argparse type: an integer > 0."""
    value = int(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def runtime_options() -> argparse.ArgumentParser:
    """``-q/--quiet``, ``--debug``, ``--threads``: every command has them."""
    common = argparse.ArgumentParser(add_help=False)
    g = common.add_argument_group("output and runtime")
    g.add_argument(
        "-q", "--quiet", action="store_true", help="no progress bars, tables or messages; errors only"
    )
    g.add_argument("--debug", action="store_true", help="print the traceback of internal errors")
    g.add_argument(
        "--threads",
        type=positive_int,
        default=None,
        metavar="N",
        help="CPU threads for torch (default: torch's choice; purify fine-tunes at N threads, "
        "default 1, so that its weights do not depend on the core count)",
    )
    return common


def model_options() -> argparse.ArgumentParser:
    """``SOURCE`` and how it may be loaded."""
    model = argparse.ArgumentParser(add_help=False)
    g = model.add_argument_group("model")
    g.add_argument(
        "source",
        metavar="SOURCE",
        help="Hub model id (org/name or org/name@revision) or a local model folder",
    )
    g.add_argument(
        "--allow-pickle",
        action="store_true",
        help="also load .bin/.pth weights (pickle: can run code); default: safetensors only",
    )
    g.add_argument(
        "--trust-remote-code",
        action="store_true",
        help="let transformers run model code from the repo (default: never)",
    )
    g.add_argument("--device", default=None, help="torch device, e.g. cuda (default: cpu)")
    return model


def data_options() -> argparse.ArgumentParser:
    """The reference data: dataset, split, columns, subset, seed, batch size."""
    data = argparse.ArgumentParser(add_help=False)
    g = data.add_argument_group("reference data")
    g.add_argument(
        "--dataset",
        default=None,
        metavar="DATA",
        help="Hub dataset id (org/name[@revision]), a save_to_disk folder or an image folder "
        "(default: the first dataset in the model card's datasets: metadata)",
    )
    g.add_argument(
        "--split",
        default=None,
        help="split, slices allowed: test, test[:5%%], train[100:600] (default: test, validation "
        "or train, the first that exists)",
    )
    g.add_argument("--image-column", default=None, metavar="NAME", help="image column (default: found)")
    g.add_argument("--label-column", default=None, metavar="NAME", help="label column (default: found)")
    g.add_argument(
        "--max-samples",
        type=positive_int,
        default=None,
        metavar="N",
        help="use a seeded random subset of at most N images",
    )
    g.add_argument("--seed", type=int, default=0, help="seed for subsets, splits and training (default 0)")
    g.add_argument("--batch-size", type=positive_int, default=64, metavar="N", help="default 64")
    return data


def detection_options() -> argparse.ArgumentParser:
    """Threshold, rule (the library's registry, read at run time), soft margin, inconclusive floors."""
    from ..defaults import VERIFY
    from ..detection import AUDIT_RULES, DEFAULT_RULE, REGISTRY

    detect = argparse.ArgumentParser(add_help=False)
    g = detect.add_argument_group("detection")
    g.add_argument(
        "--threshold",
        type=float,
        default=None,
        help=f"flag classes whose score exceeds this (default: the rule's own; {DEFAULT_RULE}: "
        f"{REGISTRY[DEFAULT_RULE].threshold:g})",
    )
    g.add_argument(
        "--rule",
        choices=list(AUDIT_RULES),  # only what audit() computes
        default=DEFAULT_RULE,
        metavar="RULE",
        help=f"detection rule: {', '.join(AUDIT_RULES)} (default {DEFAULT_RULE}; see docs/cli.md)",
    )
    g.add_argument(
        "--soft-margin",
        type=float,
        default=None,
        metavar="PENALTY",
        help="solve the soft-margin problem with this penalty for every class (default: the exact "
        "problem; where C - 1 >= d a class no universal latent change reaches carries no latent evidence)",
    )
    g.add_argument(
        "--verify-top",
        type=positive_int,
        default=VERIFY["top"],
        metavar="K",
        help=f"above {VERIFY['all_up_to']} classes, search the input space of the K classes the latent "
        f"rule ranks most suspicious (default {VERIFY['top']}; the search costs K x N images a step)",
    )
    g.add_argument(
        "--verify-images",
        type=positive_int,
        default=VERIFY["images"],
        metavar="N",
        help=f"reference images of the input-space search (default {VERIFY['images']}, as calibrated)",
    )
    g.add_argument(
        "--min-reference-accuracy",
        type=float,
        default=None,
        metavar="A",
        help="below this accuracy of the model on the reference data the verdict is inconclusive "
        "(exit 4), never clean (default max(2/C, 0.5))",
    )
    g.add_argument(
        "--min-class-samples",
        type=int,
        default=1,
        metavar="N",
        help="a class with fewer reference images makes the verdict inconclusive (default 1; 0: off)",
    )
    return detect


def audit_kwargs(args: argparse.Namespace, ui: UI, *, columns: bool = True) -> dict[str, Any]:
    """Keyword arguments of :func:`hub_backdoor.audit` from the options (``columns``: with the image
    and label columns, which a :class:`~hub_backdoor.data.ReferenceData` already knows)."""
    kw: dict[str, Any] = dict(
        max_samples=args.max_samples,
        seed=args.seed,
        threshold=args.threshold,
        rule=args.rule,
        soft_margin=args.soft_margin,
        batch_size=args.batch_size,
        device=args.device,
        min_reference_accuracy=args.min_reference_accuracy,
        min_class_samples=args.min_class_samples,
        verify_top=args.verify_top,
        verify_images=args.verify_images,
        progress=not ui.quiet,
    )
    if columns:
        kw = {"image_column": args.image_column, "label_column": args.label_column, **kw}
    return kw


def check_audit_args(args: argparse.Namespace) -> None:
    """The audit options, checked before the model is even downloaded."""
    from ..validation import check_audit_options

    check_audit_options(
        threshold=args.threshold, soft_margin=args.soft_margin, seed=args.seed, max_samples=args.max_samples,
        batch_size=args.batch_size, device=args.device, min_reference_accuracy=args.min_reference_accuracy,
        min_class_samples=args.min_class_samples, verify_top=args.verify_top,
        verify_images=args.verify_images,
    )
