"""Option groups shared by the commands (runtime, model, reference data, detection), in one place."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from ..errors import ExitCode
from ..options import AuditOptions, add_audit_flags, positive_int
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
    add_audit_flags(g, "model")
    return model


def data_options() -> argparse.ArgumentParser:
    """The reference data: dataset, split, columns, subset, seed, batch size; and ``--config``."""
    data = argparse.ArgumentParser(add_help=False)
    g = data.add_argument_group("reference data")
    g.add_argument(
        "--config",
        metavar="FILE",
        help="TOML file whose [tool.hub-backdoor] table (and, for purify, its purify sub-table) sets "
        "the defaults of these options; flags given here win (docs/cli.md#config-file)",
    )
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
    add_audit_flags(g, "data")
    return data


def detection_options() -> argparse.ArgumentParser:
    """Threshold, rule (the library's registry, read at run time), soft margin, inconclusive floors."""
    detect = argparse.ArgumentParser(add_help=False)
    add_audit_flags(detect.add_argument_group("detection"), "detection")
    return detect


def audit_kwargs(args: argparse.Namespace, ui: UI, *, columns: bool = True) -> dict[str, Any]:
    """Keyword arguments of :func:`hub_backdoor.audit` from the options (``columns``: with the image
    and label columns, which a :class:`~hub_backdoor.sources.reference.ReferenceData` already knows)."""
    return {**AuditOptions.from_args(args).kwargs(columns=columns), "progress": not ui.quiet}


def check_audit_args(args: argparse.Namespace) -> None:
    """The audit options, checked before the model is even downloaded."""
    AuditOptions.from_args(args).check()
