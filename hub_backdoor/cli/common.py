"""Steps the commands share: load the model and the data, protect the inputs, print and write reports."""

from __future__ import annotations

import argparse
import shlex
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import ExitCode
from .ui import UI, one_line

if TYPE_CHECKING:
    from ..loading import LoadedModel

__all__ = [
    "annotate",
    "audit_exit",
    "card_outputs",
    "inputs",
    "load_data",
    "load_source",
    "note_lines",
    "reproduce",
    "reproduce_report",
    "write_card_or_print",
]


def load_source(args: argparse.Namespace, ui: UI) -> LoadedModel:
    """The model ``SOURCE`` (:func:`hub_backdoor.loading.load_model`), saying when it downloads."""
    from ..loading import load_model

    return load_model(
        args.source,
        allow_pickle=args.allow_pickle,
        trust_remote_code=args.trust_remote_code,
        on_download=lambda source: ui.info(f"downloading {source} ..."),
    )


def load_data(args: argparse.Namespace, model: LoadedModel, ui: UI) -> Any:
    """The reference data (``--dataset`` or the model card's), with its columns checked."""
    from ..data import find_columns
    from ..datasets_io import load_reference_dataset
    from ..errors import DatasetError

    loaded = load_reference_dataset(
        args.dataset, split=args.split, card_metadata=model.card_metadata, model_label=model.label
    )
    what = "from the model card" if loaded.from_card else ""
    split = f", split {loaded.split}" if loaded.split else ""
    ui.info(f"reference data {what + ' ' if what else ''}{loaded.name}{split}: {len(loaded.dataset)} images")
    try:
        find_columns(loaded.dataset, image_column=args.image_column, label_column=args.label_column)
    except DatasetError as e:
        raise type(e)(f"dataset {loaded.name}: {e}") from e
    return loaded


def annotate(report: Any, loaded: Any) -> None:
    """Record where the reference data came from in the report (``data.source``)."""
    report.data["source"] = {
        "name": loaded.name,
        "kind": loaded.kind,
        "split": loaded.split,
        "revision": loaded.revision,
    }


def inputs(model: LoadedModel, loaded: Any = None, dataset: str | None = None) -> list[tuple[Any, str]]:
    """What an output may not overwrite: the model folder (with its README) and a local dataset."""
    out: list[tuple[Any, str]] = [(model.folder, "the model folder")]
    readme = model.folder / "README.md"
    if readme.exists():  # a symlink into the HF cache: protect what it points to as well
        out.append((readme.resolve(), "the model's README"))
    spec = loaded.name if loaded is not None and not loaded.is_hub else dataset
    if spec and Path(spec).expanduser().exists():
        out.append((Path(spec).expanduser(), "the reference dataset folder"))
    return out


def card_outputs(path: str | None, flag: str) -> list[tuple[Any, str]]:
    """A card and its chart (same name, ``.png``), as outputs to check."""
    if path is None or path == "-":
        return [(path, flag)]
    from ..card import chart_path_for

    return [(path, flag), (chart_path_for(path), f"{flag} (its chart)")]


def note_lines(report: Any, ui: UI) -> None:
    for note in report.notes:
        ui.info(f"note: {note}")


def audit_exit(report: Any, ui: UI | None = None) -> int:
    """The exit code of a verdict: 0 clean, 1 backdoor, 4 inconclusive (said even with ``--quiet``)."""
    if report.inconclusive:
        if ui is not None:  # like an error, said even with --quiet: this is not a clean result
            print(f"inconclusive: {one_line(report.reason or '')}", file=ui.err, flush=True)
        return ExitCode.INCONCLUSIVE
    return ExitCode.BACKDOOR if report.backdoor_found else ExitCode.OK


def reproduce(
    command: str, model: LoadedModel, loaded: Any, args: argparse.Namespace, extra: list[str]
) -> str:
    """The command line that reproduces this run, pinned to the loaded commit."""
    parts = [
        "hub-backdoor",
        command,
        model.pinned,
        "--dataset",
        loaded.name + (f"@{loaded.revision}" if loaded.revision else ""),
    ]
    if loaded.split:
        parts += ["--split", loaded.split]
    for flag, value in (
        ("--image-column", args.image_column),
        ("--label-column", args.label_column),
        ("--max-samples", args.max_samples),
        ("--soft-margin", args.soft_margin),
        ("--min-reference-accuracy", args.min_reference_accuracy),
    ):
        if value is not None:
            parts += [flag, str(value)]
    parts += ["--seed", str(args.seed), "--rule", args.rule]
    if args.threshold is not None:  # None: the rule's own, recorded in the report
        parts += ["--threshold", str(args.threshold)]
    parts += list(extra)
    return " ".join(shlex.quote(p) for p in parts)


def reproduce_report(report: Any, source: str) -> str:
    """The audit command line that reproduces a saved report."""
    src = report.model.get("source") or {}
    pinned = f"{src['repo_id']}@{src['sha']}" if src.get("type") == "hub" and src.get("sha") else source
    ds = report.data.get("source") or {}
    parts = ["hub-backdoor", "audit", pinned]
    if ds.get("name"):
        parts += ["--dataset", ds["name"] + (f"@{ds['revision']}" if ds.get("revision") else "")]
    if ds.get("split"):
        parts += ["--split", ds["split"]]
    p = report.params
    for flag, key in (("--max-samples", "max_samples"), ("--soft-margin", "soft_margin")):
        if p.get(key) is not None:
            parts += [flag, str(p[key])]
    parts += ["--seed", str(report.seed), "--rule", str(p.get("rule"))]
    parts += ["--threshold", str(p.get("threshold"))]
    return " ".join(shlex.quote(x) for x in parts)


def write_card_or_print(report: Any, ctx: Any, path: str, ui: UI) -> None:
    """Write the card and its chart, or print the card alone on stdout for ``-`` (no chart)."""
    from ..card import build_card, write_card

    if path == "-":
        text = str(build_card(report, ctx, chart_file=""))
        ui.data(text.rstrip("\n"))
        return
    card_path, chart = write_card(report, ctx, path)
    ui.result(f"wrote card {card_path} (chart {chart})")
