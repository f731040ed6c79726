"""Library side of the integrations in ``integrations/`` (docs/integrations.md).

- :func:`summary_markdown`: the verdict and per-class table of a report as Markdown (GitHub job
  summary, Hub discussion comments). ``python -m hub_backdoor.integrations summary REPORT.json``
  prints it.
- :func:`action_audit`: the GitHub Action's audit (``integrations/github-action/run.sh`` runs it as
  ``python -m hub_backdoor.integrations audit --report R --markdown M --result OUTCOME.json -- SOURCE
  [audit options]``): the library's audit, the reports, and the outcome as JSON for the script.
- :func:`read_config`: the ``[tool.hub-backdoor]`` table of a ``pyproject.toml``.
- :func:`pre_commit_main`: the pre-commit / pre-push hook (console script ``hub-backdoor-pre-commit``,
  hooks in ``.pre-commit-hooks.yaml``): audits the model folders of the changed weight files.
- :func:`hf_main`: the console script ``hf-backdoor``, so that ``hf backdoor audit ...`` runs
  ``hub-backdoor audit ...`` (the ``hf`` CLI's extension convention); ``hf-backdoor
  --register-extension`` registers it with ``hf``.
"""

from __future__ import annotations

import argparse
import json
import os
import stat
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from . import cli
from .cli.options import data_options, detection_options, model_options, runtime_options
from .cli.ui import UI, print_table
from .config import CONFIG_KEYS, read_config
from .detection.report import AuditReport
from .errors import VERDICT_EXIT, ExitCode, HubBackdoorError, OptionError
from .options import AuditOptions

__all__ = [
    "CONFIG_KEYS",
    "VERDICT_EXIT",
    "action_audit",
    "audit_folder",
    "hf_main",
    "pre_commit_main",
    "read_config",
    "register_hf_extension",
    "summary_markdown",
    "verdict_exit_code",
]

EXIT_OK, EXIT_BACKDOOR, EXIT_USAGE = int(ExitCode.OK), int(ExitCode.BACKDOOR), int(ExitCode.USAGE)
EXIT_INTERNAL, EXIT_INCONCLUSIVE = int(ExitCode.INTERNAL), int(ExitCode.INCONCLUSIVE)

#: Files whose change makes the pre-commit hook audit their model folder.
MODEL_FILE_SUFFIXES = (".safetensors", ".bin", ".pth", ".pt", ".ckpt")
MODEL_CONFIG_FILES = ("config.json", "preprocessor_config.json")


# -- Markdown summary ----------------------------------------------------------------------------------
def _cell(text: Any) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def _num(x: Any, digits: int) -> str:
    try:
        v = float(x)
    except (TypeError, ValueError):
        return "n/a"
    return f"{v:.{digits}f}" if v == v and abs(v) != float("inf") else "n/a"


def _class_label(report: Any, k: int) -> str:
    name = report.classes[k].name
    return f"{k}" if name == str(k) else f'{k} ("{name}")'


def verdict_line(report: Any) -> str:
    """One Markdown sentence: the verdict, the flagged class and the threshold."""
    th = report.params.get("threshold")
    if report.verdict == "inconclusive":
        reason = getattr(report, "reason", None) or "the reference data is unusable"
        return (
            f"**Inconclusive: no verdict.** {reason}. This is not a clean result: audit again with "
            "reference data the model was made for."
        )
    if report.backdoor_found:
        k = report.target
        row = report.classes[k]
        others = [f for f in report.flagged if f != k]
        more = f" (also flagged: {', '.join(_class_label(report, f) for f in others)})" if others else ""
        return (
            f"**Backdoor suspected: target class {_class_label(report, k)}**{more}. Its minimal latent "
            f"change is abnormally small (anomaly index {_num(row.anomaly_index, 2)} > threshold {th}): "
            "inputs carrying a trigger are likely classified as this class. Do not publish or deploy the "
            "model as is; purify it with `hub-backdoor purify` or retrain it on data you trust."
        )
    if not report.classes:
        return "**No backdoor found.**"
    top = max(range(len(report.classes)), key=lambda i: report.classes[i].anomaly_index)
    return (
        f"**No backdoor found** (largest anomaly index {_num(report.classes[top].anomaly_index, 2)}, "
        f"class {_class_label(report, top)}; threshold {th})."
    )


def summary_markdown(
    report: Any,
    *,
    title: str | None = None,
    max_rows: int = 40,
    reproduce: str | None = None,
) -> str:
    """The audit as Markdown: a heading, the verdict, the per-class table (flagged rows in bold) and
    the reference data. More than ``max_rows`` classes: the flagged and most anomalous ones only."""
    C = len(report.classes)
    if C <= max_rows:
        shown = list(range(C))
    else:
        order = sorted(range(C), key=lambda i: -report.classes[i].anomaly_index)[: max_rows // 2]
        shown = sorted(set(order) | set(report.flagged))
    name = report.model.get("name", "model")
    badge = "backdoor suspected" if report.backdoor_found else "no backdoor found"
    icon = ":rotating_light:" if report.backdoor_found else ":white_check_mark:"
    if report.verdict == "inconclusive":
        badge, icon = "inconclusive", ":grey_question:"
    lines = [f"### {icon} {_cell(title or f'hub-backdoor audit of `{name}`')}: {badge}", ""]
    lines += [verdict_line(report), ""]
    lines += [
        "| class | name | norm | anomaly index | ref. samples | flagged |",
        "|---:|---|---:|---:|---:|:---:|",
    ]
    for k in shown:
        r = report.classes[k]
        cells = [str(r.index), _cell(r.name), _num(r.norm, 4), _num(r.anomaly_index, 2), str(r.n_reference)]
        if r.flagged:
            cells = [f"**{c}**" for c in cells] + ["**target**" if k == report.target else "**yes**"]
        else:
            cells.append("")
        lines.append("| " + " | ".join(cells) + " |")
    if len(shown) < C:
        lines += ["", f"({C - len(shown)} more classes, none flagged, in the JSON report.)"]
    data = report.data or {}
    src = data.get("source") or {}
    where = ""
    if src.get("name"):
        where = f" from `{src['name']}`" + (f", split `{src['split']}`" if src.get("split") else "")
    p = report.params or {}
    lines += [
        "",
        f"Reference data{where}: {data.get('n', '?')} images, "
        f"model accuracy {_num(data.get('accuracy'), 3)}. "
        f"Rule `{p.get('rule')}`, threshold {p.get('threshold')}, seed {report.seed}.",
    ]
    msrc = report.model.get("source") or {}
    if msrc.get("type") == "hub" and msrc.get("sha"):
        lines.append(f"Audited commit: `{msrc.get('repo_id')}@{msrc['sha']}`.")
    if reproduce:
        lines += ["", f"Reproduce: `{reproduce}`"]
    return "\n".join(lines) + "\n"


# -- [tool.hub-backdoor] --------------------------------------------------------------------------------
def audit_options(options: dict[str, Any]) -> list[str]:
    """``hub-backdoor audit`` flags for config / hook options (:data:`CONFIG_KEYS`)."""
    argv: list[str] = []
    for key, value in options.items():
        flag, kind = CONFIG_KEYS[key]
        if flag is None or value is None:
            continue
        if kind is bool:
            argv += [flag] if value else []
        else:
            argv += [flag, str(value)]
    return argv


# -- pre-commit hook --------------------------------------------------------------------------------------
def _hook_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="hub-backdoor-pre-commit",
        description="pre-commit / pre-push hook: audit the model folder of every changed weight or config "
        "file for a backdoor; fails (exit 1) when one is found, 2 on bad input. Options not given here "
        "come from [tool.hub-backdoor] in pyproject.toml.",
    )
    p.add_argument("filenames", nargs="*", help="changed files (passed by pre-commit)")
    p.add_argument(
        "--model",
        dest="models",
        action="append",
        metavar="DIR",
        help="audit this model folder whenever a matching file changed (repeatable; default: the folder "
        "of each changed file that holds a config.json, or the nearest one above it)",
    )
    p.add_argument(
        "--config", metavar="FILE", help="TOML file with [tool.hub-backdoor] (default: pyproject.toml)"
    )
    p.add_argument("-q", "--quiet", action="store_true", help="only errors and the verdict lines")
    for key, (flag, kind) in CONFIG_KEYS.items():
        if flag is None:
            continue
        dest = key.replace("-", "_")
        if kind is bool:
            p.add_argument(flag, dest=dest, action="store_true", default=None)
        else:
            p.add_argument(flag, dest=dest, type=kind, default=None)
    return p


def _model_folder(file: Path, root: Path) -> Path | None:
    """The folder of ``file`` that holds a ``config.json``, looking upwards but not above ``root``."""
    folder = file.parent.resolve()
    root = root.resolve()
    while True:
        if (folder / "config.json").is_file():
            return folder
        if folder == root or root not in folder.parents:
            return None
        folder = folder.parent


def _is_model_file(name: str) -> bool:
    return name.endswith(MODEL_FILE_SUFFIXES) or Path(name).name in MODEL_CONFIG_FILES


def _display(folder: Path) -> str:
    try:
        rel = os.path.relpath(folder)
    except ValueError:  # pragma: no cover - another drive on Windows
        return str(folder)
    if rel == ".":
        return folder.name or str(folder)
    return rel if not rel.startswith("..") else str(folder)


def audit_folder(folder: str | os.PathLike[str], options: dict[str, Any]) -> tuple[int, Any]:
    """Audit one model folder with hook / config options (:data:`CONFIG_KEYS`); returns the exit code
    (:class:`~hub_backdoor.errors.ExitCode`) and the report, or ``None`` when the audit could not run
    (the error is printed on stderr as ``error: ...``, as the command line does)."""
    from .jobs import audit_loaded, load_inputs

    names = set(AuditOptions.names())
    try:
        audit_options = AuditOptions.from_mapping(
            {k: v for k, v in options.items() if k.replace("-", "_") in names}
        )
        audit_options.check()
        model, data = load_inputs(
            str(folder), dataset=options.get("dataset"), split=options.get("split"), options=audit_options,
            allow_pickle=bool(options.get("allow-pickle")),
            trust_remote_code=bool(options.get("trust-remote-code")),
        )
        report = audit_loaded(model, data, audit_options)
    except HubBackdoorError as e:
        print(f"error: {' '.join(str(e).split())}", file=sys.stderr, flush=True)
        return int(e.exit_code), None
    except Exception as e:  # a bug: say so in one line, as the command line does
        print(f"error: internal error: {type(e).__name__}: {' '.join(str(e).split())[:300]}", file=sys.stderr)
        return EXIT_INTERNAL, None
    return int(VERDICT_EXIT[report.verdict]), report


def _print_table(report: Any) -> None:
    print_table(report, UI())


def pre_commit_main(argv: Sequence[str] | None = None) -> int:
    """The pre-commit hook; returns 0 (clean or nothing to audit), 1 (backdoor) or 2/3/4/5 (error,
    inconclusive, Hub failure: :class:`~hub_backdoor.errors.ExitCode`)."""
    args = _hook_parser().parse_args(argv)
    try:
        config = read_config(args.config)
    except HubBackdoorError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_USAGE
    options = {k: v for k, v in config.items() if k not in ("models", "purify")}
    for key in CONFIG_KEYS:
        value = getattr(args, key.replace("-", "_"), None)
        if value is not None and CONFIG_KEYS[key][0] is not None:
            options[key] = value
    root = Path.cwd()
    changed = [Path(f) for f in args.filenames if _is_model_file(f)]
    if args.models or config.get("models"):
        folders = [Path(m).resolve() for m in (args.models or config["models"])]
        if args.filenames and not changed:
            folders = []  # files were passed, none of them a model file
    else:
        folders = []
        for f in changed:
            folder = _model_folder(f, root)
            if folder is None:
                print(f"hub-backdoor: skipping {f}: no config.json in its folder or above", file=sys.stderr)
            elif folder not in folders:
                folders.append(folder)
    if not folders:
        return EXIT_OK
    codes = []
    for folder in folders:
        shown = _display(folder)
        code, report = audit_folder(folder, options)
        codes.append(code)
        if report is None:
            print(f"hub-backdoor: could not audit {shown} (exit {code}; see the error above)", flush=True)
            continue
        report.model["name"] = shown
        if not args.quiet:
            _print_table(report)
        if report.inconclusive:
            print(f"hub-backdoor: the audit of {shown} is inconclusive ({report.reason}); blocked")
        elif report.backdoor_found:
            print(
                f"hub-backdoor: BACKDOOR suspected in {shown} (target class {report.target}); "
                "blocked. Purify it (hub-backdoor purify) or retrain it on data you trust.",
                flush=True,
            )
        else:
            print(f"hub-backdoor: no backdoor found in {shown}", flush=True)
    errors = [c for c in codes if c not in (EXIT_OK, EXIT_BACKDOOR)]
    if errors:
        return max(errors)
    return EXIT_BACKDOOR if EXIT_BACKDOOR in codes else EXIT_OK


# -- hf backdoor ------------------------------------------------------------------------------------------
HF_EXTENSION_NAME = "backdoor"


def _extensions_root() -> Path:
    try:
        from huggingface_hub.cli import extensions

        return Path(extensions.EXTENSIONS_ROOT).expanduser()
    except Exception:  # older huggingface_hub: the documented default
        return Path("~/.local/share/hf/extensions").expanduser()


def register_hf_extension(python: str | None = None) -> Path:
    """Register ``hf-backdoor`` with the ``hf`` CLI, so ``hf backdoor ...`` runs it; returns its folder.

    Writes ``<hf extensions>/hf-backdoor/``: an ``hf-backdoor`` launcher that runs this interpreter's
    hub-backdoor, and the ``manifest.json`` that ``hf`` reads (``hf extensions list`` shows it, ``hf
    extensions remove backdoor`` removes it).
    """
    import datetime as dt

    python = python or sys.executable
    folder = _extensions_root() / f"hf-{HF_EXTENSION_NAME}"
    folder.mkdir(parents=True, exist_ok=True)
    launcher = folder / f"hf-{HF_EXTENSION_NAME}"
    launcher.write_text(f'#!/bin/sh\nexec "{python}" -m hub_backdoor.integrations hf "$@"\n')
    launcher.chmod(launcher.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
    fields: dict[str, Any] = {
        "owner": "local",
        "repo": f"hf-{HF_EXTENSION_NAME}",
        "repo_id": f"local/hf-{HF_EXTENSION_NAME}",
        "short_name": HF_EXTENSION_NAME,
        "executable_path": str(launcher),
        "type": "binary",
        "description": "Audit Hub image classifiers for backdoors (hub-backdoor)",
        "commit_sha": None,
    }
    try:  # the hf CLI's own manifest class, when this huggingface_hub has one
        from huggingface_hub.cli.extensions import ExtensionManifest

        ExtensionManifest(**fields, installed_at=dt.datetime.now(dt.timezone.utc)).save(folder)
    except Exception:
        data = {**fields, "installed_at": dt.datetime.now(dt.timezone.utc).isoformat()}
        (folder / "manifest.json").write_text(json.dumps(data, indent=2, sort_keys=True))
    return folder


def hf_main(argv: Sequence[str] | None = None) -> int:
    """``hf-backdoor ARGS`` is ``hub-backdoor ARGS``; ``hf-backdoor --register-extension`` registers
    it with the ``hf`` CLI."""
    args = list(sys.argv[1:] if argv is None else argv)
    if args[:1] == ["--register-extension"]:
        folder = register_hf_extension()
        print(f"registered 'hf backdoor' ({folder}); try: hf backdoor audit --help")
        return EXIT_OK
    return cli.main(args, prog="hf backdoor")


# -- GitHub Action ----------------------------------------------------------------------------------------
def verdict_exit_code(report: Any) -> int:
    """The exit code of a report's verdict (:data:`hub_backdoor.errors.VERDICT_EXIT`)."""
    return int(VERDICT_EXIT[report.verdict])


def _one_line(text: Any) -> str:
    return " ".join(str(text).split()) or "(no message)"


class _OptionParser(argparse.ArgumentParser):
    """argparse that raises :class:`~hub_backdoor.errors.OptionError` instead of exiting, so that a bad
    option ends up in the outcome like any other bad input."""

    def error(self, message: str) -> Any:  # noqa: D102
        raise OptionError(message)


def _audit_parser() -> argparse.ArgumentParser:
    """The options of ``hub-backdoor audit`` (the same option groups, so ``args:`` of the Action takes
    exactly what the command line takes)."""
    p = _OptionParser(
        prog="hub-backdoor audit", add_help=False,
        parents=[model_options(), data_options(), detection_options(), runtime_options()],
    )
    p.add_argument("--json", default=None)
    p.add_argument("--sarif", default=None)
    p.add_argument("--card", default=None)
    return p


def _quiet_libraries() -> None:
    """No progress bars from the Hub or datasets (a CI log is not a terminal)."""
    from huggingface_hub.utils import disable_progress_bars

    disable_progress_bars()
    try:
        import datasets

        datasets.disable_progress_bars()
    except ImportError:  # pragma: no cover
        pass


class _StderrMessages:
    """The Action's messages: progress on stderr (a CI log), data on stdout."""

    def __init__(self, quiet: bool) -> None:
        self.quiet = quiet

    def info(self, msg: str) -> None:
        if not self.quiet:
            print(msg, file=sys.stderr, flush=True)

    def result(self, msg: str) -> None:
        pass

    def data(self, text: str) -> None:
        print(text, flush=True)

    def show(self, report: Any) -> None:
        pass


def _run_audit(argv: Sequence[str], report_path: str, markdown: str | None, title: str | None) -> Any:
    """Parse ``argv`` (audit options), audit through :func:`hub_backdoor.jobs.audit_source` (the
    report to ``report_path``), and write the Markdown summary."""
    from .jobs import AuditOutputs, audit_source

    args = _audit_parser().parse_args(list(argv))
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    if args.quiet:
        _quiet_libraries()
    outcome = audit_source(
        args.source, dataset=args.dataset, split=args.split, options=AuditOptions.from_args(args),
        # the Action's report file wins over a --json in its args
        outputs=AuditOutputs(json=report_path, sarif=args.sarif, card=args.card),
        allow_pickle=args.allow_pickle, trust_remote_code=args.trust_remote_code,
        messages=_StderrMessages(args.quiet),
    )
    if markdown:
        Path(markdown).write_text(summary_markdown(outcome.report, title=title))
    return outcome.report


def action_audit(
    argv: Sequence[str],
    *,
    report: str | os.PathLike[str],
    markdown: str | os.PathLike[str] | None = None,
    title: str | None = None,
) -> dict[str, Any]:
    """The GitHub Action's audit: ``argv`` are ``hub-backdoor audit`` arguments (``SOURCE [options]``);
    writes the JSON report to ``report`` (and ``--sarif`` / ``--card`` where given, the Markdown summary
    to ``markdown``), and returns the outcome: ``exit_code`` (:class:`~hub_backdoor.errors.ExitCode`),
    ``verdict`` (``backdoor``, ``clean``, ``inconclusive`` or ``error``), ``target`` (the flagged class
    or ``None``) and ``error`` (the one-line message when the audit could not run, else ``None``).

    Errors are printed on stderr as ``error: ...``, the way the command line prints them."""
    report_path = str(report)
    Path(report_path).unlink(missing_ok=True)
    outcome: dict[str, Any] = {"exit_code": EXIT_INTERNAL, "verdict": "error", "target": None, "error": None}
    try:
        result = _run_audit(argv, report_path, None if markdown is None else str(markdown), title)
    except HubBackdoorError as e:
        outcome.update(exit_code=int(e.exit_code), error=_one_line(e))
    except KeyboardInterrupt:
        outcome.update(exit_code=int(ExitCode.INTERRUPTED), error="interrupted")
    except Exception as e:  # a bug: one line, as the command line says it
        outcome.update(error=f"internal error: {type(e).__name__}: {_one_line(e)[:300]}")
    else:
        outcome.update(exit_code=verdict_exit_code(result), verdict=result.verdict, target=result.target)
        if result.inconclusive:  # said like an error: this is not a clean result
            print(f"inconclusive: {_one_line(result.reason or '')}", file=sys.stderr, flush=True)
        return outcome
    print(f"error: {outcome['error']}", file=sys.stderr, flush=True)
    return outcome


# -- python -m hub_backdoor.integrations -------------------------------------------------------------------
def main(argv: Sequence[str] | None = None) -> int:
    """``summary REPORT.json [--title T]``: print the Markdown summary; ``pre-commit ...``: the hook;
    ``hf ...``: ``hf-backdoor``."""
    args = list(sys.argv[1:] if argv is None else argv)
    if args[:1] == ["pre-commit"]:
        return pre_commit_main(args[1:])
    if args[:1] == ["hf"]:
        return hf_main(args[1:])
    p = argparse.ArgumentParser(prog="python -m hub_backdoor.integrations")
    sub = p.add_subparsers(dest="command", required=True)
    s = sub.add_parser("summary", help="print the Markdown summary of a JSON report")
    s.add_argument("report")
    s.add_argument("--title", default=None)
    s.add_argument("--reproduce", default=None)
    a = sub.add_parser(
        "audit",
        help="the GitHub Action's audit: hub-backdoor audit's options, the JSON report in --report, the "
        "Markdown summary in --markdown and the outcome in --result (one process)",
    )
    a.add_argument("--report", required=True, help="write the JSON report here")
    a.add_argument(
        "--markdown", required=True, help="write the Markdown summary here (when there is a report)"
    )
    a.add_argument("--title", default=None)
    a.add_argument(
        "--result", default=None, metavar="PATH",
        help="write the outcome here as JSON: exit_code, verdict (or error), target, error (one line)",
    )
    a.add_argument("audit_args", nargs=argparse.REMAINDER, help="-- SOURCE [audit options]")
    sub.add_parser("pre-commit", help="the pre-commit hook (hub-backdoor-pre-commit)")
    sub.add_parser("hf", help="hf-backdoor")
    ns = p.parse_args(args)
    if ns.command == "audit":
        rest = ns.audit_args[1:] if ns.audit_args[:1] == ["--"] else ns.audit_args
        outcome = action_audit(rest, report=ns.report, markdown=ns.markdown, title=ns.title)
        if ns.result:
            Path(ns.result).write_text(json.dumps(outcome, indent=2) + "\n")
        return int(outcome["exit_code"])
    try:
        report = AuditReport.from_json(ns.report)
    except HubBackdoorError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_USAGE
    sys.stdout.write(summary_markdown(report, title=ns.title, reproduce=ns.reproduce))
    return EXIT_OK


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
