"""The ``hub-backdoor`` command line: ``audit``, ``purify``, ``card`` and ``demo``.

Exit codes (README "Exit codes"):

  0  audit: no backdoor found; purify / card / demo: done
  1  audit: backdoor found; purify: no backdoor found, nothing purified; demo: the planted backdoor
     was missed
  2  bad input or usage (unknown repo or revision, unusable data or model, bad options)
  3  internal error (a bug; rerun with ``--debug`` for the traceback)
  4  audit / purify: inconclusive, the reference data cannot support a verdict (the model's accuracy
     on it is below the floor, or classes lack images); the message says what to fix
  5  the Hub or the network failed in a way that may pass on a retry (HTTP 5xx or 429, no connection)
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shlex
import shutil
import signal
import sys
import tempfile
import traceback
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

from .errors import CorruptWeightsError, ExitCode, HubBackdoorError, UnsupportedModelError

EXIT_OK = int(ExitCode.OK)
EXIT_BACKDOOR = int(ExitCode.BACKDOOR)
EXIT_USAGE = int(ExitCode.USAGE)
EXIT_INTERNAL = int(ExitCode.INTERNAL)
EXIT_INCONCLUSIVE = int(ExitCode.INCONCLUSIVE)

#: Files written next to the weights of a purified model.
AUDIT_FILE = "backdoor_audit.json"
PURIFICATION_FILE = "backdoor_purification.json"
PURIFICATION_SCHEMA_VERSION = "1"


# -- output ---------------------------------------------------------------------------------------------
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

    def console(self) -> Any:
        from rich.console import Console

        return Console(file=self.out, highlight=False, soft_wrap=False)


def _one_line(text: str) -> str:
    return " ".join(str(text).split()) or "(no message)"


# -- models ---------------------------------------------------------------------------------------------
@dataclass
class LoadedModel:
    """A classifier and where it came from.

    ``label`` names it in messages (Hub id or folder as given); ``repo_id``, ``revision`` and ``sha`` are
    set for Hub models; ``folder`` holds its files (the HF cache snapshot for Hub models);
    ``card_metadata`` / ``card_body`` are its README's YAML and text.
    """

    clf: Any
    label: str
    folder: Path
    repo_id: str | None = None
    revision: str | None = None
    sha: str | None = None
    card_metadata: dict[str, Any] = field(default_factory=dict)
    card_body: str = ""

    @property
    def is_hub(self) -> bool:
        return self.repo_id is not None

    @property
    def pinned(self) -> str:
        """The source as a command-line argument pinned to the audited commit."""
        if self.repo_id:
            return f"{self.repo_id}@{self.sha}" if self.sha else self.repo_id
        return self.label


def _looks_like_path(spec: str) -> bool:
    from .datasets_io import looks_like_path

    return looks_like_path(spec)


def _refuse_remote_code(folder: Path, label: str, trust_remote_code: bool) -> None:
    """Refuse a model that needs its own code (``auto_map``) unless ``--trust-remote-code``."""
    if trust_remote_code:
        return
    try:
        cfg = json.loads((folder / "config.json").read_text())
    except (OSError, ValueError):
        return  # the loader reports a missing or broken config
    if isinstance(cfg, dict) and cfg.get("auto_map"):
        raise UnsupportedModelError(
            f"{label} needs its own model code (auto_map in config.json), which is never run without "
            "--trust-remote-code; pass it only if you trust the repo"
        )


def load_model(source: str, *, allow_pickle: bool, trust_remote_code: bool, ui: UI) -> LoadedModel:
    """Load a model folder or a Hub model (``org/name[@revision]``)."""
    from .adapters import load_folder
    from .card import split_card

    path = Path(source).expanduser()
    repo_id = revision = sha = None
    if path.is_dir():
        folder = path
        label = source
    elif path.exists():
        raise UnsupportedModelError(f"{source} is a file; pass a model folder or a Hub id (org/name)")
    elif _looks_like_path(source):
        raise UnsupportedModelError(f"model folder {source} does not exist")
    else:
        from .hub import download_model

        ui.info(f"downloading {source} ...")
        folder, info = download_model(source, allow_pickle=allow_pickle)
        repo_id, revision, sha = info["repo_id"], info.get("revision"), info.get("sha")
        label = repo_id if revision is None else f"{repo_id}@{revision}"
    _refuse_remote_code(Path(folder), label, trust_remote_code)
    try:
        clf = load_folder(folder, allow_pickle=allow_pickle, trust_remote_code=trust_remote_code)
    except HubBackdoorError as e:
        if repo_id is not None and str(folder) in str(e):  # name the repo, not the cache folder
            raise type(e)(str(e).replace(str(folder), label)) from None
        raise
    except Exception as e:
        if type(e).__name__ == "SafetensorError":
            raise CorruptWeightsError(
                f"the safetensors weights of {label} are corrupted or truncated ({_one_line(str(e))})"
            ) from None
        raise
    if repo_id is not None:
        clf.source = {**clf.source, "type": "hub", "repo_id": repo_id, "revision": revision, "sha": sha}
        clf.name = repo_id
    readme = Path(folder) / "README.md"
    meta: dict[str, Any] = {}
    body = ""
    if readme.is_file():
        meta, body = split_card(readme.read_text(encoding="utf-8", errors="replace"))
    return LoadedModel(clf, label, Path(folder), repo_id, revision, sha, meta, body)


# -- data -----------------------------------------------------------------------------------------------
def load_data(args: argparse.Namespace, model: LoadedModel, ui: UI) -> Any:
    from .data import find_columns
    from .datasets_io import load_reference_dataset
    from .errors import DatasetError

    loaded = load_reference_dataset(
        args.dataset, split=args.split, card_metadata=model.card_metadata, model_label=model.label
    )
    what = "from the model card" if loaded.from_card else ""
    split = f", split {loaded.split}" if loaded.split else ""
    ui.info(f"reference data {what + ' ' if what else ''}{loaded.name}{split}: {len(loaded.dataset)} images")
    try:
        find_columns(loaded.dataset, image_column=args.image_column, label_column=args.label_column)
    except DatasetError as e:
        raise type(e)(f"dataset {loaded.name}: {e}") from None
    return loaded


def _annotate(report: Any, loaded: Any) -> None:
    """Record where the reference data came from in the report (``data.source``)."""
    report.data["source"] = {
        "name": loaded.name,
        "kind": loaded.kind,
        "split": loaded.split,
        "revision": loaded.revision,
    }


# -- printing -------------------------------------------------------------------------------------------
def print_table(report: Any, ui: UI, *, title: str | None = None, max_rows: int = 40) -> None:
    """The per-class norms as a table, flagged rows marked."""
    if ui.quiet:
        return
    import numpy as np
    from rich.table import Table

    C = len(report.classes)
    if C <= max_rows:
        shown = list(range(C))
    else:
        top = np.argsort(-report.anomaly_indices, kind="stable")[: max_rows // 2]
        shown = sorted({int(k) for k in top} | set(report.flagged))
    table = Table(
        title=title or f"{report.model.get('name', 'model')}: minimal latent perturbation per class",
        title_justify="left",
    )
    for name, kw in (
        ("class", {"justify": "right"}),
        ("name", {}),
        ("norm", {"justify": "right"}),
        ("anomaly index", {"justify": "right"}),
        ("ref. samples", {"justify": "right"}),
        ("", {}),
    ):
        table.add_column(name, **kw)
    for k in shown:
        r = report.classes[k]
        mark = "<< BACKDOOR TARGET" if k == report.target else ("<< flagged" if r.flagged else "")
        table.add_row(
            str(r.index),
            r.name,
            f"{r.norm:.4f}",
            f"{r.anomaly_index:.2f}",
            str(r.n_reference),
            mark,
            style="bold red" if r.flagged else None,
        )
    console = ui.console()
    console.print(table)
    if len(shown) < C:
        console.print(f"({C - len(shown)} more classes, none flagged, in the JSON report)")
    console.print(report.summary())


# -- audit ----------------------------------------------------------------------------------------------
def _audit_kw(args: argparse.Namespace, ui: UI) -> dict[str, Any]:
    return dict(
        image_column=args.image_column,
        label_column=args.label_column,
        max_samples=args.max_samples,
        seed=args.seed,
        threshold=args.threshold,
        rule=args.rule,
        soft_margin=args.soft_margin,
        batch_size=args.batch_size,
        device=args.device,
        min_reference_accuracy=args.min_reference_accuracy,
        min_class_samples=args.min_class_samples,
        progress=not ui.quiet,
    )


def _check_audit_args(args: argparse.Namespace) -> None:
    """The audit options, checked before the model is even downloaded."""
    from .validation import check_audit_options

    check_audit_options(
        threshold=args.threshold, soft_margin=args.soft_margin, seed=args.seed, max_samples=args.max_samples,
        batch_size=args.batch_size, device=args.device, min_reference_accuracy=args.min_reference_accuracy,
        min_class_samples=args.min_class_samples,
    )


def _inputs(model: LoadedModel, loaded: Any = None, dataset: str | None = None) -> list[tuple[Any, str]]:
    """What an output may not overwrite: the model folder (with its README) and a local dataset."""
    out: list[tuple[Any, str]] = [(model.folder, "the model folder")]
    readme = model.folder / "README.md"
    if readme.exists():  # a symlink into the HF cache: protect what it points to as well
        out.append((readme.resolve(), "the model's README"))
    spec = loaded.name if loaded is not None and not loaded.is_hub else dataset
    if spec and Path(spec).expanduser().exists():
        out.append((Path(spec).expanduser(), "the reference dataset folder"))
    return out


def _card_outputs(path: str | None, flag: str) -> list[tuple[Any, str]]:
    """A card and its chart (same name, ``.png``), as outputs to check."""
    if path is None or path == "-":
        return [(path, flag)]
    from .card import chart_path_for

    return [(path, flag), (chart_path_for(path), f"{flag} (its chart)")]


def _note_lines(report: Any, ui: UI) -> None:
    for note in report.notes:
        ui.info(f"note: {note}")


def _reproduce(
    command: str, model: LoadedModel, loaded: Any, args: argparse.Namespace, extra: list[str]
) -> str:
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
    parts += ["--seed", str(args.seed), "--rule", args.rule, "--threshold", str(args.threshold), *extra]
    return " ".join(shlex.quote(p) for p in parts)


def _reproduce_report(report: Any, source: str) -> str:
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
    parts += [
        "--seed",
        str(report.seed),
        "--rule",
        str(p.get("rule")),
        "--threshold",
        str(p.get("threshold")),
    ]
    return " ".join(shlex.quote(x) for x in parts)


#: Metadata of the audited model's card that its security card keeps.
CARRIED_METADATA = ("license", "license_name", "license_link", "language", "datasets", "tags")


def card_context(model: LoadedModel, loaded: Any, **kw: Any) -> Any:
    from .card import CardContext

    return CardContext(
        model_label=model.repo_id or Path(model.label).name or model.label,
        audited_repo=model.repo_id,
        audited_sha=model.sha,
        dataset=loaded.name,
        dataset_is_hub=loaded.is_hub,
        split=loaded.split,
        extra_metadata={k: v for k, v in model.card_metadata.items() if k in CARRIED_METADATA},
        **kw,
    )


def cmd_audit(args: argparse.Namespace, ui: UI) -> int:
    from .audit import audit
    from .distributed import is_main_process
    from .sarif import to_sarif, write_sarif
    from .validation import check_outputs

    # every option and output is checked before the download and the reference pass
    _check_audit_args(args)
    outputs = [(args.json, "--json"), (args.sarif, "--sarif"), *_card_outputs(args.card, "--card")]
    check_outputs(outputs)
    if "-" in (args.json, args.sarif, args.card):
        ui.stdout_is_data = True
    model = load_model(
        args.source, allow_pickle=args.allow_pickle, trust_remote_code=args.trust_remote_code, ui=ui
    )
    check_outputs(outputs, _inputs(model, dataset=args.dataset))
    loaded = load_data(args, model, ui)
    check_outputs(outputs, _inputs(model, loaded))
    report = audit(model.clf, loaded.dataset, **_audit_kw(args, ui))
    if not is_main_process():  # every rank holds the same report; rank 0 alone prints and writes
        return _audit_exit(report)
    _annotate(report, loaded)
    print_table(report, ui)
    _note_lines(report, ui)
    if args.json == "-":
        print(report.to_json(), file=sys.stdout, flush=True)
    elif args.json:
        report.to_json(args.json)
        ui.result(f"wrote report {args.json}")
    if args.sarif == "-":
        print(json.dumps(to_sarif(report), indent=2, allow_nan=False), file=sys.stdout, flush=True)
    elif args.sarif:
        write_sarif(report, args.sarif)
        ui.result(f"wrote SARIF {args.sarif}")
    if args.card:
        ctx = card_context(
            model,
            loaded,
            model_name=model.repo_id or model.label,
            reproduce=_reproduce("audit", model, loaded, args, []),
        )
        _write_card_or_print(report, ctx, args.card, ui)
    return _audit_exit(report, ui)


def _audit_exit(report: Any, ui: UI | None = None) -> int:
    if report.inconclusive:
        if ui is not None:  # like an error, said even with --quiet: this is not a clean result
            print(f"inconclusive: {_one_line(report.reason or '')}", file=ui.err, flush=True)
        return EXIT_INCONCLUSIVE
    return EXIT_BACKDOOR if report.backdoor_found else EXIT_OK


def _write_card_or_print(report: Any, ctx: Any, path: str, ui: UI) -> None:
    """Write the card and its chart, or print the card alone on stdout for ``-`` (no chart)."""
    from .card import build_card, write_card

    if path == "-":
        text = str(build_card(report, ctx, chart_file=""))
        print(text.rstrip("\n"), file=sys.stdout, flush=True)
        return
    card_path, chart = write_card(report, ctx, path)
    ui.result(f"wrote card {card_path} (chart {chart})")


# -- purify ---------------------------------------------------------------------------------------------
def _check_out(out: Path, model: LoadedModel, overwrite: bool) -> None:
    o, src = out.resolve(), model.folder.resolve()
    if o == src or src in o.parents or o in src.parents:
        raise HubBackdoorError(
            f"--out {out} would overwrite or write into the model folder {model.folder}; "
            "choose another folder"
        )
    if out.exists() and not out.is_dir():
        raise HubBackdoorError(f"--out {out} exists and is not a folder")
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise HubBackdoorError(
            f"--out {out} exists and is not empty; choose another folder or pass --overwrite"
        )


def _publish_folder(tmp: Path, out: Path) -> None:
    """Move the finished folder ``tmp`` to ``out`` (replacing it), so ``out`` is never half written."""
    out.parent.mkdir(parents=True, exist_ok=True)
    old = None
    if out.exists():
        old = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.old-"))
        os.replace(out, old / "x")
    os.replace(tmp, out)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def purification_record(
    result: Any, after: Any, *, model: LoadedModel, loaded: Any, trigger: str | None, output: dict[str, Any]
) -> dict[str, Any]:
    """The JSON record of one purification (``backdoor_purification.json``; README "Purification record")."""
    import datetime as dt

    from .report import _jsonable, library_versions

    target = int(result.target)
    return _jsonable(
        {
            "schema_version": PURIFICATION_SCHEMA_VERSION,
            "kind": "hub-backdoor-purification",
            "target": target,
            "target_name": result.report.classes[target].name,
            "trigger": trigger,
            "metrics": dict(result.metrics),
            "params": dict(result.params),
            "seconds": result.seconds,
            "history": list(result.history),
            "audited_model": {
                "label": model.label,
                "repo_id": model.repo_id,
                "revision": model.revision,
                "sha": model.sha,
            },
            "dataset": {
                "name": loaded.name,
                "kind": loaded.kind,
                "split": loaded.split,
                "revision": loaded.revision,
            },
            "output": output,
            "versions": library_versions(),
            "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
            "audit_before": result.report.to_dict(),
            "audit_after": after.to_dict() if after is not None else None,
        }
    )


def _load_hint(kind: str, where: str, *, local: bool = False, revision: str | None = None) -> str:
    """One line telling how to load the purified model (``where``: Hub id or folder)."""
    if kind == "timm":
        ref = f"local-dir:{where}" if local else f"hf-hub:{where}" + (f"@{revision}" if revision else "")
        return f'`timm.create_model("{ref}", pretrained=True)`'
    rev = f', revision="{revision}"' if revision else ""
    return (
        f'`AutoModelForImageClassification.from_pretrained("{where}"{rev})` with '
        f'`AutoImageProcessor.from_pretrained("{where}"{rev})`'
    )


def cmd_purify(args: argparse.Namespace, ui: UI) -> int:
    from . import zoo
    from .audit import audit
    from .card import write_card
    from .data import ReferenceData
    from .distributed import is_main_process
    from .hub import _check_repo_id, push_folder
    from .purification import purify
    from .report import AuditReport, current_umask
    from .validation import (
        check_not_protected,
        check_outputs,
        check_purify_options,
        check_report_matches,
        check_writable,
    )

    if not (args.out or args.push_to or args.open_pr):
        raise HubBackdoorError("nothing to write: give --out DIR, --push-to org/name or --open-pr")
    if args.push_to:
        _check_repo_id(args.push_to)
    if args.holdout < 0 or args.holdout >= 1:
        raise HubBackdoorError(f"--holdout {args.holdout} must be in [0, 1)")
    # every option and output is checked before the download, the audit and the fine-tuning
    _check_audit_args(args)
    check_purify_options(
        beta=args.beta, scale=args.scale, distill=args.distill, lr=args.lr, epochs=args.epochs,
        holdout=args.holdout, batch_size=args.batch_size, seed=args.seed, max_samples=args.max_samples,
        device=args.device,
    )
    named_inputs = [(args.report, "the --report file")] if args.report else []
    outputs = [(args.json, "--json")]
    check_outputs(outputs, named_inputs)
    out = Path(args.out).expanduser() if args.out else None
    if out is not None:
        check_not_protected(out, "--out", named_inputs)
        check_writable(out, "--out", folder=True)
    if args.json == "-":
        ui.stdout_is_data = True
    model = load_model(
        args.source, allow_pickle=args.allow_pickle, trust_remote_code=args.trust_remote_code, ui=ui
    )
    if args.open_pr and not model.is_hub:
        raise HubBackdoorError(f"--open-pr needs a Hub model (org/name); {args.source} is a local folder")
    if args.push_to and model.repo_id and args.push_to.lower() == model.repo_id.lower():
        raise HubBackdoorError(
            f"--push-to {args.push_to} is the audited repo, which only gets pull requests; use --open-pr "
            "or push to another repo"
        )
    if out is not None:
        _check_out(out, model, args.overwrite)
        check_not_protected(out, "--out", _inputs(model, dataset=args.dataset))
    check_outputs(outputs, [*named_inputs, *_inputs(model, dataset=args.dataset)])
    if not hasattr(model.clf, "save_pretrained"):
        raise UnsupportedModelError(
            f"cannot save a purified {model.clf.kind} model; only timm and transformers"
        )
    report = None
    if args.report:  # a report of another model is refused before any data is read
        report = AuditReport.from_json(args.report)
        check_report_matches(report, model.clf, model.label, f"--report {args.report}")
    if args.target is not None and not 0 <= args.target < model.clf.num_classes:
        raise HubBackdoorError(
            f"--target {args.target} is not a class of {model.label} (0..{model.clf.num_classes - 1})"
        )
    loaded = load_data(args, model, ui)
    if out is not None:
        check_not_protected(out, "--out", _inputs(model, loaded))
    check_outputs(outputs, [*named_inputs, *_inputs(model, loaded)])
    data = ReferenceData(loaded.dataset, image_column=args.image_column, label_column=args.label_column)
    data = data.subset(args.max_samples, args.seed)  # --max-samples bounds the fine-tuning too
    fit = data.split(args.holdout, args.seed)[0] if args.holdout > 0 else data
    if report is not None:
        ui.info(f"using the audit in {args.report}")
    else:
        ui.info("auditing ...")
        kw = _audit_kw(args, ui)
        kw.pop("image_column"), kw.pop("label_column")
        report = audit(model.clf, fit, **kw)
        _annotate(report, loaded)
    print_table(report, ui)
    _note_lines(report, ui)
    if report.inconclusive and args.target is None:
        ui.result(
            f"the audit of {model.label} is inconclusive: {report.reason}; nothing purified (pass --target K "
            "to purify class K anyway)"
        )
        return EXIT_INCONCLUSIVE
    target = args.target if args.target is not None else report.target
    if target is None:
        ui.result(
            f"no backdoor found in {model.label}; nothing purified (pass --target K to purify class K anyway)"
        )
        return EXIT_BACKDOOR
    if not 0 <= target < model.clf.num_classes:
        raise HubBackdoorError(
            f"--target {target} is not a class of {model.label} (0..{model.clf.num_classes - 1})"
        )
    trigger = zoo.ATTACKS[args.eval_trigger]() if args.eval_trigger else None
    ui.info(f"purifying class {target} ({args.epochs or 'auto'} epochs) ...")
    result = purify(
        model.clf,
        data,
        report=report,
        target=target,
        trigger=trigger,
        beta=args.beta,
        scale=args.scale,
        distill=args.distill,
        epochs=args.epochs,
        lr=args.lr,
        train=args.train,
        batch_size=args.batch_size,
        holdout=args.holdout,
        seed=args.seed,
        image_column=args.image_column,
        label_column=args.label_column,
        device=args.device,
        progress=not ui.quiet,
    )
    result.classifier.model.to("cpu")
    ui.info("auditing the purified model ...")
    kw = _audit_kw(args, ui)
    kw.pop("image_column"), kw.pop("label_column")
    after = audit(result.classifier, fit, **kw)
    _annotate(after, loaded)

    kind = model.clf.kind
    if args.push_to:
        name, base, hint = args.push_to, model.repo_id, _load_hint(kind, args.push_to)
    elif args.open_pr:
        name, base = model.repo_id, None
        hint = _load_hint(kind, model.repo_id, revision="refs/pr/N") + " before the merge"
    else:
        name = out.name if out is not None else model.label
        base, hint = model.repo_id, _load_hint(kind, str(out), local=True)
    record = purification_record(
        result,
        after,
        model=model,
        loaded=loaded,
        trigger=args.eval_trigger,
        output={
            "name": name,
            "push_to": args.push_to,
            "open_pr": bool(args.open_pr),
            "out": str(out) if out else None,
            "kind": kind,
        },
    )
    extra = ["--out", str(out)] if out else []
    extra += ["--push-to", args.push_to] if args.push_to else []
    extra += ["--open-pr"] if args.open_pr else []
    extra += ["--epochs", str(result.params["epochs"]), "--beta", str(args.beta)]
    extra += ["--eval-trigger", args.eval_trigger] if args.eval_trigger else []
    reproduce = _reproduce("purify", model, loaded, args, extra)
    record["card"] = {
        "model_name": name,
        "base_model": base,
        "load_hint": hint,
        "extra_metadata": {k: v for k, v in model.card_metadata.items() if k in CARRIED_METADATA},
        "reproduce": reproduce,
    }
    ctx = card_context(
        model,
        loaded,
        model_name=name,
        purification=record,
        report_after=after,
        reproduce=reproduce,
        original_card=model.card_body if args.open_pr else None,
        load_hint=record["card"]["load_hint"],
        base_model=base,
    )
    if not is_main_process():  # the other ranks trained the same weights (DDP); rank 0 publishes
        return EXIT_OK
    parent = out.parent if out is not None else Path(tempfile.gettempdir())
    parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=parent, prefix=f".{(out.name if out else 'purified')}.tmp-"))
    os.chmod(tmp, 0o777 & ~current_umask())  # mkdtemp makes 0700; the folder is published as is
    try:
        result.classifier.save_pretrained(tmp)
        report.to_json(tmp / AUDIT_FILE)
        from .report import atomic_write_text

        atomic_write_text(tmp / PURIFICATION_FILE, json.dumps(record, indent=2, allow_nan=False) + "\n")
        write_card(report, ctx, tmp / "README.md")
        if out is not None:
            _publish_folder(tmp, out)
            folder = out
            ui.result(f"wrote purified model {out}")
        else:
            folder = tmp
        if args.push_to:
            url = push_folder(
                folder,
                args.push_to,
                commit_message=f"Purified {model.label} (backdoor class {target})",
                private=args.private,
                protected_repo=model.repo_id,
            )
            ui.result(f"pushed to {args.push_to}: {url}")
        if args.open_pr:
            url = push_folder(
                folder,
                model.repo_id,
                commit_message=f"Remove backdoor of class {target} (hub-backdoor)",
                create_pr=True,
                protected_repo=model.repo_id,
            )
            ui.result(f"opened pull request on {model.repo_id}: {url}")
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    ui.result(result.summary())
    if args.json == "-":
        print(json.dumps(record, indent=2, allow_nan=False), file=sys.stdout, flush=True)
    elif args.json:
        from .report import atomic_write_text

        atomic_write_text(Path(args.json), json.dumps(record, indent=2, allow_nan=False) + "\n")
        ui.result(f"wrote purification record {args.json}")
    if after.backdoor_found:
        ui.result(f"warning: the purified model is still flagged (class {after.target}); see the card")
    return EXIT_OK


# -- card -----------------------------------------------------------------------------------------------
def cmd_card(args: argparse.Namespace, ui: UI) -> int:
    from .card import CardContext
    from .hub import parse_repo_ref
    from .report import AuditReport
    from .validation import check_outputs

    named_inputs = [(args.report, "the --report file"), (args.purification, "the --purification record")]
    check_outputs(_card_outputs(args.out, "--out"), named_inputs)
    report = AuditReport.from_json(args.report)
    record = None
    after = None
    if args.purification:
        try:
            record = json.loads(Path(args.purification).read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise HubBackdoorError(
                f"cannot read --purification {args.purification} ({_one_line(str(e))})"
            ) from None
        if not isinstance(record, dict) or str(record.get("schema_version")) != PURIFICATION_SCHEMA_VERSION:
            raise HubBackdoorError(
                f"--purification {args.purification} is not a purification record of schema "
                f"{PURIFICATION_SCHEMA_VERSION}"
            )
        _check_record(record, report, args.purification)
        if record.get("audit_after"):
            after = AuditReport.from_dict(record["audit_after"])
    source = args.source
    src = report.model.get("source") or {}
    repo_id = None
    if not Path(source).expanduser().exists() and not _looks_like_path(source):
        repo_id = parse_repo_ref(source)[0]
    if src.get("repo_id") and repo_id and src["repo_id"].lower() != repo_id.lower():
        ui.info(f"warning: the report is for {src['repo_id']}, not {repo_id}")
    ds = report.data.get("source") or {}
    saved = (record or {}).get("card") or {}
    extra = saved.get("extra_metadata") or {}
    name = args.name or saved.get("model_name") or (repo_id or source)
    ctx = CardContext(
        model_label=repo_id or Path(source).name or source,
        audited_repo=repo_id,
        audited_sha=src.get("sha") if repo_id else None,
        model_name=name,
        dataset=ds.get("name"),
        dataset_is_hub=ds.get("kind") == "hub",
        split=ds.get("split"),
        purification=record,
        report_after=after,
        reproduce=saved.get("reproduce") or _reproduce_report(report, source),
        load_hint=saved.get("load_hint")
        or (_load_hint(str(report.model.get("kind")), name) if record else ""),
        base_model=(repo_id or saved.get("base_model")) if record else None,
        extra_metadata=dict(extra),
    )
    if args.out == "-":
        ui.stdout_is_data = True
    _write_card_or_print(report, ctx, args.out, ui)
    return EXIT_OK


def _check_record(record: dict[str, Any], report: Any, path: str) -> None:
    """Refuse a purification record of another model than ``report``, or one with malformed fields."""
    from .report import AuditReport

    C = len(report.classes)
    target = record.get("target")
    if not isinstance(target, int) or isinstance(target, bool) or not 0 <= target < C:
        raise HubBackdoorError(f"--purification {path}: 'target' must be a class index in 0..{C - 1}")
    metrics = record.get("metrics", {})
    if not isinstance(metrics, dict) or not all(
        v is None or (isinstance(v, (int, float)) and not isinstance(v, bool)) for v in metrics.values()
    ):
        raise HubBackdoorError(f"--purification {path}: 'metrics' must map names to numbers")
    for key in ("params", "card"):
        if not isinstance(record.get(key, {}), dict):
            raise HubBackdoorError(f"--purification {path}: {key!r} must be an object")
    before = record.get("audit_before")
    if isinstance(before, dict):
        b = AuditReport.from_dict(before)
        mine, theirs = report.model.get("head_sha256"), b.model.get("head_sha256")
        if len(b.classes) != C or (mine and theirs and mine != theirs):
            raise HubBackdoorError(
                f"--purification {path} belongs to another model than the --report (its audit has another "
                "head fingerprint or class count); pass the record written with this report"
            )


# -- demo -----------------------------------------------------------------------------------------------
def cmd_demo(args: argparse.Namespace, ui: UI) -> int:
    from .demo import run_demo

    return run_demo(
        args.out,
        arch=args.arch,
        epochs=args.epochs,
        seed=args.seed,
        purify_epochs=args.purify_epochs,
        quiet=ui.quiet,
    )


# -- parser ---------------------------------------------------------------------------------------------
class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors (``error: ...``) and exit code 2."""

    def error(self, message: str) -> Any:  # noqa: D102
        self.print_usage(sys.stderr)
        print(f"error: {_one_line(message)}", file=sys.stderr)
        raise SystemExit(EXIT_USAGE)


def _positive_int(text: str) -> int:
    value = int(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def build_parser() -> argparse.ArgumentParser:
    from . import __version__
    from .demo import DEMO_ARCH, DEMO_EPOCHS, DEMO_SEED
    from .detection import DEFAULT_RULE, RULES
    from .zoo import ATTACKS, MODELS

    common = argparse.ArgumentParser(add_help=False)
    g = common.add_argument_group("output and runtime")
    g.add_argument(
        "-q", "--quiet", action="store_true", help="no progress bars, tables or messages; errors only"
    )
    g.add_argument("--debug", action="store_true", help="print the traceback of internal errors")
    g.add_argument(
        "--threads",
        type=_positive_int,
        default=None,
        metavar="N",
        help="CPU threads for torch (default: torch's choice)",
    )

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
        type=_positive_int,
        default=None,
        metavar="N",
        help="use a seeded random subset of at most N images",
    )
    g.add_argument("--seed", type=int, default=0, help="seed for subsets, splits and training (default 0)")
    g.add_argument("--batch-size", type=_positive_int, default=64, metavar="N", help="default 64")

    detect = argparse.ArgumentParser(add_help=False)
    g = detect.add_argument_group("detection")
    g.add_argument(
        "--threshold",
        type=float,
        default=2.0,
        help="flag classes whose anomaly index exceeds this (default 2.0)",
    )
    g.add_argument(
        "--rule",
        choices=sorted(RULES),
        default=DEFAULT_RULE,
        metavar="RULE",
        help=f"detection rule: {', '.join(sorted(RULES))} (default {DEFAULT_RULE}; see the README)",
    )
    g.add_argument(
        "--soft-margin",
        type=float,
        default=None,
        metavar="PENALTY",
        help="solve the soft-margin problem when the exact one is infeasible (C - 1 >= d)",
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

    parser = _Parser(
        prog="hub-backdoor",
        description="Find and remove backdoors in Hugging Face Hub image classifiers.",
        epilog="exit codes: 0 no backdoor found / done, 1 backdoor found (audit), 2 bad input or usage, "
        "3 internal error, 4 inconclusive (reference data unusable)",
    )
    parser.add_argument("--version", action="version", version=f"hub-backdoor {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)

    p = sub.add_parser(
        "audit",
        parents=[model, data, detect, common],
        help="audit a model for a backdoor (exit 1 when one is found)",
        description="Audit a model for a single-target backdoor. Exit code 0: no backdoor "
        "found; 1: backdoor found; 2: bad input; 3: internal error; 4: inconclusive (the reference "
        "data cannot support a verdict).",
    )
    g = p.add_argument_group("reports")
    g.add_argument(
        "--json", metavar="PATH", help="write the JSON report (schema in the README); - for stdout"
    )
    g.add_argument("--sarif", metavar="PATH", help="write a SARIF 2.1.0 log for code scanning; - for stdout")
    g.add_argument(
        "--card",
        metavar="PATH",
        help="write a security model card (Markdown) and its chart (.png); - for the card on stdout",
    )
    p.set_defaults(func=cmd_audit)

    p = sub.add_parser(
        "purify",
        parents=[model, data, detect, common],
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
    g = p.add_argument_group("purification")
    g.add_argument("--report", metavar="PATH", help="use this saved audit instead of auditing again")
    g.add_argument(
        "--target",
        type=int,
        default=None,
        metavar="K",
        help="purify class K (default: the flagged class; needed when none is flagged)",
    )
    from .defaults import PURIFY as d  # the library's defaults, so the two cannot drift apart

    g.add_argument("--epochs", type=_positive_int, default=None,
                   help=f"fine-tuning epochs (default {d['epochs']}, or more on a small clean set so "
                        f"that training takes at least {d['min_steps']} optimizer steps)")
    g.add_argument("--beta", type=float, default=d["beta"],
                   help=f"weight of the latent-trigger loss (default {d['beta']})")
    g.add_argument("--scale", type=float, default=d["scale"],
                   help=f"multiplier of s_t in the loss (default {d['scale']}; 1 = the paper)")
    g.add_argument("--distill", type=float, default=d["distill"],
                   help=f"weight of a KL term to the original model (default {d['distill']}; 0 = paper)")
    g.add_argument("--lr", type=float, default=d["lr"], help=f"peak learning rate (default {d['lr']})")
    g.add_argument("--train", choices=["backbone", "all"], default=d["train"],
                   help=f"parameters that change: the backbone (head frozen) or all (default {d['train']})")
    g.add_argument(
        "--holdout",
        type=float,
        default=0.2,
        help="fraction of the data held out to measure accuracy before/after (default 0.2)",
    )
    g.add_argument(
        "--eval-trigger",
        choices=sorted(ATTACKS),
        default=None,
        help="measure the attack success rate of this known trigger before/after",
    )
    p.set_defaults(func=cmd_purify)

    p = sub.add_parser(
        "card",
        parents=[common],
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
    p.set_defaults(func=cmd_card)

    p = sub.add_parser(
        "demo",
        parents=[common],
        help="make a small backdoored model from bundled data, audit and purify it",
        description="Offline end-to-end demo: trains a small model with a BadNets backdoor on "
        "bundled MNIST digits, audits it, purifies it and writes reports and cards next to it.",
    )
    p.add_argument(
        "--arch",
        choices=sorted(MODELS),
        default=DEMO_ARCH,
        help=f"model to backdoor (default {DEMO_ARCH}; transformers-resnet for transformers)",
    )
    p.add_argument(
        "--out",
        default="hub-backdoor-demo",
        metavar="DIR",
        help="output folder (default hub-backdoor-demo; rebuilt on every run)",
    )
    p.add_argument(
        "--epochs",
        type=_positive_int,
        default=DEMO_EPOCHS,
        help=f"training epochs of the backdoored model (default {DEMO_EPOCHS})",
    )
    p.add_argument("--purify-epochs", type=_positive_int, default=None,
                   help="fine-tuning epochs (default: as purify's --epochs)")
    p.add_argument(
        "--seed", type=int, default=DEMO_SEED, help=f"data and training seed (default {DEMO_SEED})"
    )
    p.set_defaults(func=cmd_demo, threads_default=1)
    return parser


def _configure(args: argparse.Namespace) -> None:
    import torch

    threads = args.threads or getattr(args, "threads_default", None)
    if threads:
        torch.set_num_threads(threads)
    for name in ("timm", "transformers", "datasets", "huggingface_hub"):
        logging.getLogger(name).setLevel(logging.WARNING if args.debug else logging.ERROR)
    # float(loss) on a tensor that requires grad: harmless, and not the user's business
    warnings.filterwarnings("ignore", message="Converting a tensor with requires_grad=True")
    if args.quiet:
        warnings.simplefilter("ignore")
        from huggingface_hub.utils import disable_progress_bars

        disable_progress_bars()
        try:
            import datasets

            datasets.disable_progress_bars()
        except ImportError:  # pragma: no cover
            pass
    else:
        from huggingface_hub.utils import enable_progress_bars

        enable_progress_bars()
        try:
            import datasets

            datasets.enable_progress_bars()
        except ImportError:  # pragma: no cover
            pass
    try:
        import transformers

        transformers.logging.set_verbosity_error()
        if args.quiet:
            transformers.utils.logging.disable_progress_bar()
        else:
            transformers.utils.logging.enable_progress_bar()
    except ImportError:  # pragma: no cover
        pass


def main(argv: list[str] | None = None) -> int:
    """Run the CLI; returns the exit code (see the module docstring)."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # --help / --version (0) or a usage error (2)
        return e.code if isinstance(e.code, int) else (0 if e.code is None else EXIT_USAGE)
    if args.command is None:
        parser.print_help(sys.stderr)
        return EXIT_USAGE
    ui = UI(quiet=args.quiet)
    previous = _on_sigterm_interrupt()
    try:
        _configure(args)
        return int(args.func(args, ui))
    except HubBackdoorError as e:
        if args.debug:
            traceback.print_exc()
        ui.error(_one_line(str(e)))
        return int(e.exit_code)
    except KeyboardInterrupt:
        ui.error("interrupted")
        return 130
    except Exception as e:
        if args.debug:
            traceback.print_exc()
        ui.error(
            f"internal error: {type(e).__name__}: {_one_line(str(e))[:300]} "
            "(rerun with --debug for the traceback, and please report it)"
        )
        return EXIT_INTERNAL
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def _interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt


def _on_sigterm_interrupt() -> Any:
    """SIGTERM (``kill``, CI cancellation) unwinds like Ctrl-C, so temporary folders are removed.

    Returns the previous handler, or None where none can be set (not the main thread)."""
    try:
        return signal.signal(signal.SIGTERM, _interrupt)
    except ValueError:  # signals can only be set from the main thread
        return None


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
