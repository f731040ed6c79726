"""The workflow every front end runs: load a model and its reference data, audit (or purify), record
where the data came from, write the outputs, and give the outcome's exit code.

The ``hub-backdoor`` command line, the demo, the pre-commit hook, the GitHub Action, the ``hf``
extension and the webhook service are shells over :func:`audit_source` and :func:`purify_source`;
what they add is only how they take options and where messages go (a :class:`Messages`).
"""

from __future__ import annotations

import dataclasses
import json
import shlex
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from . import zoo
from .adapters.loading import LoadedModel, load_model
from .detection.audit import audit
from .detection.report import AuditReport, atomic_write_text
from .detection.validation import (
    check_not_protected,
    check_outputs,
    check_report_matches,
    check_writable,
)
from .distributed import is_main_process
from .errors import (
    VERDICT_EXIT,
    DatasetError,
    ExitCode,
    HubBackdoorError,
    OptionError,
    OutputPathError,
    ReportError,
    UnsupportedModelError,
)
from .layout import chart_path_for
from .options import AuditOptions, PurifyOptions
from .outputs.card import CardContext, build_card, write_card
from .outputs.publish import (
    PurificationRecord,
    card_context,
    check_destinations,
    load_hint,
    publish,
    purify_flags,
)
from .outputs.sarif import to_sarif, write_sarif
from .purification.purify import purify as purify_model
from .sources.datasets import LoadedDataset, load_reference_dataset, looks_like_path
from .sources.hub import check_repo_id, parse_repo_ref
from .sources.reference import ReferenceData, find_columns

__all__ = [
    "AuditOutcome",
    "AuditOutputs",
    "Messages",
    "Silent",
    "audit_loaded",
    "audit_source",
    "card_from_saved",
    "exit_code",
    "load_inputs",
    "protected_inputs",
    "record_source",
    "reproduce_command",
]


_DEFAULT_OPTIONS = AuditOptions()


class Messages(Protocol):
    """Where a job's messages go: ``info`` (progress), ``result`` (what was done), ``data``
    (machine-readable output for a ``-`` destination), ``show`` (a finished report); ``quiet``
    turns progress bars off."""

    quiet: bool

    def info(self, msg: str) -> None: ...
    def result(self, msg: str) -> None: ...
    def data(self, text: str) -> None: ...
    def show(self, report: AuditReport) -> None: ...


class Silent:
    """Messages that go nowhere (``data`` to stdout: a ``-`` output asked for it)."""

    quiet = True

    def info(self, msg: str) -> None:
        pass

    def result(self, msg: str) -> None:
        pass

    def data(self, text: str) -> None:
        print(text, flush=True)

    def show(self, report: AuditReport) -> None:
        pass


# -- facts every front end shares ----------------------------------------------------------------------
def exit_code(report: AuditReport) -> ExitCode:
    """The exit code of a report's verdict: 0 clean, 1 backdoor, 4 inconclusive."""
    return VERDICT_EXIT[report.verdict]


def record_source(report: AuditReport, data: LoadedDataset) -> None:
    """Record where the reference data came from in the report (``data.source``)."""
    report.data["source"] = {
        "name": data.name,
        "kind": data.kind,
        "split": data.split,
        "revision": data.revision,
    }


def protected_inputs(
    model: LoadedModel, data: LoadedDataset | None = None, dataset: str | None = None
) -> list[tuple[Any, str]]:
    """What an output may not overwrite: the model folder (with its README) and a local dataset."""
    out: list[tuple[Any, str]] = [(model.folder, "the model folder")]
    readme = model.folder / "README.md"
    if readme.exists():  # a symlink into the HF cache: protect what it points to as well
        out.append((readme.resolve(), "the model's README"))
    spec = data.name if data is not None and not data.is_hub else dataset
    if spec and Path(spec).expanduser().exists():
        out.append((Path(spec).expanduser(), "the reference dataset folder"))
    return out


def reproduce_command(
    command: str, model: LoadedModel, data: LoadedDataset, options: AuditOptions, extra: Sequence[str] = ()
) -> str:
    """The command line that redoes this run, pinned to the loaded commit (``device`` left out: where
    it ran, not what it found)."""
    parts = [
        "hub-backdoor",
        command,
        model.pinned,
        "--dataset",
        data.name + (f"@{data.revision}" if data.revision else ""),
    ]
    if data.split:
        parts += ["--split", data.split]
    # purify's own flags name its batch size (it sets the fine-tuning's as well)
    skip = ("device", "seed", "rule") + (("batch_size",) if command == "purify" else ())
    parts += options.to_flags(skip=skip)
    parts += ["--seed", str(options.seed)]
    if options.rule is not None:
        parts += ["--rule", options.rule]
    parts += list(extra)
    return " ".join(shlex.quote(p) for p in parts)


# -- loading --------------------------------------------------------------------------------------------
def load_inputs(
    source: str,
    *,
    dataset: str | None = None,
    split: str | None = None,
    revision: str | None = None,
    options: AuditOptions = _DEFAULT_OPTIONS,
    allow_pickle: bool = False,
    trust_remote_code: bool = False,
    messages: Messages | None = None,
    check: Callable[[LoadedModel, LoadedDataset | None], None] | None = None,
) -> tuple[LoadedModel, LoadedDataset]:
    """The model ``source`` and its reference data (``dataset``, else the model card's), with the
    data's columns found. ``check(model, data)`` runs after the model loads (``data`` None) and
    again after the data does, so that an output that would overwrite an input is refused before
    any long work."""

    say = messages or Silent()
    model = load_model(
        source,
        revision=revision,
        allow_pickle=allow_pickle,
        trust_remote_code=trust_remote_code,
        on_download=lambda src: say.info(f"downloading {src} ..."),
    )
    if check is not None:
        check(model, None)
    data = load_reference_dataset(
        dataset, split=split, card_metadata=model.card_metadata, model_label=model.label,
        streaming=options.streaming,
    )
    where = "from the model card " if data.from_card else ""
    part = f", split {data.split}" if data.split else ""
    size = "streamed" if options.streaming else f"{len(data.dataset)} images"
    say.info(f"reference data {where}{data.name}{part}: {size}")
    try:
        find_columns(data.dataset, image_column=options.image_column, label_column=options.label_column)
    except DatasetError as e:
        raise type(e)(f"dataset {data.name}: {e}") from e
    if check is not None:
        check(model, data)
    return model, data


# -- audit ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class AuditOutputs:
    """Where an audit's reports go: a path, ``-`` for stdout, or ``None`` for none. ``card`` also
    writes its chart beside it (same name, ``.png``)."""

    json: str | None = None
    sarif: str | None = None
    card: str | None = None

    def named(self) -> list[tuple[Any, str]]:
        """Every destination with the option that names it (the card's chart too)."""

        out: list[tuple[Any, str]] = [(self.json, "--json"), (self.sarif, "--sarif"), (self.card, "--card")]
        if self.card not in (None, "-"):
            out.append((chart_path_for(self.card), "--card (its chart)"))
        return out

    @property
    def to_stdout(self) -> bool:
        return "-" in (self.json, self.sarif, self.card)


@dataclass
class AuditOutcome:
    """What :func:`audit_source` did: the report, the model and data it audited, the exit code,
    and the files it wrote (``(what, path)``)."""

    report: AuditReport
    model: LoadedModel
    data: LoadedDataset
    exit_code: ExitCode
    written: list[tuple[str, str]] = field(default_factory=list)


def audit_loaded(
    model: LoadedModel,
    data: LoadedDataset,
    options: AuditOptions,
    *,
    dataset: Any = None,
    classifier: Any = None,
    progress: bool = False,
) -> AuditReport:
    """Audit a loaded model (or ``classifier``, e.g. its purified copy) on its reference data
    (``dataset``: a subset of it, e.g. the part a purification was tuned on), with the data's
    source recorded."""

    report = audit(
        model.clf if classifier is None else classifier,
        data.dataset if dataset is None else dataset,
        **options.kwargs(columns=dataset is None),
        progress=progress,
    )
    record_source(report, data)
    return report


def audit_source(
    source: str,
    *,
    dataset: str | None = None,
    split: str | None = None,
    revision: str | None = None,
    options: AuditOptions = _DEFAULT_OPTIONS,
    outputs: AuditOutputs | None = None,
    allow_pickle: bool = False,
    trust_remote_code: bool = False,
    messages: Messages | None = None,
) -> AuditOutcome:
    """Audit the model ``source`` on its reference data and write ``outputs``.

    Every option and destination is checked before the download, and every destination again
    against the model folder and a local dataset before the reference pass (an output never
    overwrites an input). Under ``torchrun`` every process returns the same report and only the
    main one writes.

    Raises :class:`~hub_backdoor.errors.HubBackdoorError` (with its exit code) when the audit
    cannot run."""

    say = messages or Silent()
    outputs = outputs or AuditOutputs()
    options.check()
    named = outputs.named()
    check_outputs(named)

    def protect(model: LoadedModel, data: LoadedDataset | None) -> None:
        check_outputs(named, protected_inputs(model, data, dataset))

    model, data = load_inputs(
        source,
        dataset=dataset,
        split=split,
        revision=revision,
        options=options,
        allow_pickle=allow_pickle,
        trust_remote_code=trust_remote_code,
        messages=say,
        check=protect,
    )
    report = audit_loaded(model, data, options, progress=not say.quiet)
    outcome = AuditOutcome(report, model, data, exit_code(report))
    if not is_main_process():  # every rank holds the same report; rank 0 alone prints and writes
        return outcome
    say.show(report)
    outcome.written = _write_audit(outcome, options, outputs, say)
    return outcome


def _write_audit(
    outcome: AuditOutcome, options: AuditOptions, outputs: AuditOutputs, say: Messages
) -> list[tuple[str, str]]:
    """``--json``, ``--sarif`` and ``--card``, to files or (``-``) stdout."""


    report, written = outcome.report, []
    if outputs.json == "-":
        say.data(report.to_json())
    elif outputs.json:
        report.to_json(outputs.json)
        written.append(("report", outputs.json))
    if outputs.sarif == "-":
        say.data(json.dumps(to_sarif(report), indent=2, allow_nan=False))
    elif outputs.sarif:
        write_sarif(report, outputs.sarif)
        written.append(("SARIF", outputs.sarif))
    if outputs.card:
        ctx = card_context(
            outcome.model,
            outcome.data,
            model_name=outcome.model.repo_id or outcome.model.label,
            reproduce=reproduce_command("audit", outcome.model, outcome.data, options),
        )
        if outputs.card == "-":
            say.data(str(build_card(report, ctx, chart_file="")).rstrip("\n"))
        else:
            card_path, chart = write_card(report, ctx, outputs.card)
            written.append(("card", f"{card_path} (chart {chart})"))
    for what, path in written:
        say.result(f"wrote {what} {path}")
    return written


# -- purify ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Destination:
    """Where a purified model goes (at least one): a folder ``out`` (``overwrite``: replace it), a
    Hub repo ``push_to`` (``private``), or a pull request on the audited repo (``open_pr``)."""

    out: str | None = None
    push_to: str | None = None
    open_pr: bool = False
    overwrite: bool = False
    private: bool = False

    def flags(self) -> list[str]:
        """The command-line flags that name this destination."""
        out = ["--out", str(Path(self.out).expanduser())] if self.out else []
        out += ["--push-to", self.push_to] if self.push_to else []
        return out + (["--open-pr"] if self.open_pr else [])


@dataclass
class PurifyOutcome:
    """What :func:`purify_source` did: the exit code, the audit it purified against, and (when it
    purified) the :class:`~hub_backdoor.purification.purify.PurifyResult`, the audit of the purified model
    and what :func:`~hub_backdoor.outputs.publish.publish` wrote."""

    exit_code: ExitCode
    report: AuditReport
    result: Any = None
    after: AuditReport | None = None
    published: Any = None


def _check_purify(
    options: AuditOptions,
    purify: PurifyOptions,
    destination: Destination,
    *,
    max_accuracy_drop: float,
    report: str | None,
    json_out: str | None,
) -> list[tuple[Any, str]]:
    """Every option and output, checked before the download (``max_accuracy_drop`` in points);
    returns the named inputs (``report``)."""

    if not (destination.out or destination.push_to or destination.open_pr):
        raise HubBackdoorError("nothing to write: give --out DIR, --push-to org/name or --open-pr")
    if destination.push_to:
        check_repo_id(destination.push_to)

    if purify.holdout < 0 or purify.holdout >= 1:
        raise HubBackdoorError(f"--holdout {purify.holdout} must be in [0, 1)")
    options.check()
    if options.streaming:
        raise OptionError("--streaming is for audits: a purification reads its data several times and "
                          "holds part of it out; pass a split that fits, e.g. with --max-samples")
    # the budget is checked in points just below, as the flag gives it
    in_range = dataclasses.replace(purify, max_accuracy_drop=PurifyOptions().max_accuracy_drop)
    in_range.check(batch_size=options.batch_size, seed=options.seed, max_samples=options.max_samples,
                   device=options.device)
    if not 0 <= max_accuracy_drop <= 100:  # also refuses nan
        raise OptionError(f"--max-accuracy-drop {max_accuracy_drop} must be a number of points in 0..100")
    named = [(report, "the --report file")] if report else []
    check_outputs([(json_out, "--json")], named)
    if destination.out:
        out = Path(destination.out).expanduser()
        check_writable(out, "--out", folder=True)  # first: a name too long fails any other look
        check_not_protected(out, "--out", named)
        here = Path.cwd().resolve()
        if out.exists() and (out.resolve() == here or out.resolve() in here.parents):
            raise OutputPathError(
                f"--out {destination.out} is or holds the current folder, which cannot be "
                "replaced while in use; give another folder"
            )
    return named


def _choose_target(
    target: int | None, report: AuditReport, model: LoadedModel, say: Messages
) -> int | ExitCode:
    """The class to purify, or the exit code when there is none (1: nothing flagged, 4: inconclusive)."""
    if report.inconclusive and target is None:
        say.result(
            f"the audit of {model.label} is inconclusive: {report.reason}; nothing purified (pass "
            "--target K to purify class K anyway)"
        )
        return ExitCode.INCONCLUSIVE
    chosen = target if target is not None else report.target
    if chosen is None:
        say.result(
            f"no backdoor found in {model.label}; nothing purified (pass --target K to purify class K anyway)"
        )
        return ExitCode.BACKDOOR
    _check_target(chosen, model)
    return int(chosen)


def _check_target(target: int | None, model: LoadedModel) -> None:

    if target is not None and not 0 <= target < model.clf.num_classes:
        raise HubBackdoorError(
            f"--target {target} is not a class of {model.label} (0..{model.clf.num_classes - 1})"
        )


def purify_source(
    source: str,
    *,
    dataset: str | None = None,
    split: str | None = None,
    options: AuditOptions = _DEFAULT_OPTIONS,
    purify: PurifyOptions | Mapping[str, Any] | None = None,
    target: int | None = None,
    report: str | None = None,
    destination: Destination | None = None,
    json_out: str | None = None,
    eval_trigger: str | None = None,
    max_accuracy_drop: float | None = None,
    allow_pickle: bool = False,
    trust_remote_code: bool = False,
    messages: Messages | None = None,
) -> PurifyOutcome:
    """Audit ``source`` (or read its saved audit ``report``), fine-tune the flagged class (or
    ``target``) away with :func:`hub_backdoor.purify` (``purify``: its
    :class:`~hub_backdoor.options.PurifyOptions`, or a mapping of them; the batch size, seed, device
    and columns come from ``options``), audit the purified model again on the part of the data it
    was tuned on, and publish it to ``destination`` with its record (``json_out``: also here; ``-``
    for stdout).

    ``max_accuracy_drop`` is in points of held-out clean accuracy (None: the budget of ``purify``,
    a share, in points): a purification that loses more publishes nothing
    (:class:`~hub_backdoor.errors.AccuracyBudgetError`, exit 6). Returns exit 1 (nothing flagged) or
    4 (inconclusive audit) without purifying when no ``target`` is given."""

    say = messages or Silent()
    destination = destination or Destination()
    popts = purify if isinstance(purify, PurifyOptions) else PurifyOptions.from_mapping(purify or {})
    points = 100 * popts.max_accuracy_drop if max_accuracy_drop is None else max_accuracy_drop
    named = _check_purify(options, popts, destination, max_accuracy_drop=points, report=report,
                          json_out=json_out)
    popts = dataclasses.replace(popts, max_accuracy_drop=points / 100.0)
    model, data, before = _load_for_purify(
        source, dataset=dataset, split=split, options=options, named=named, destination=destination,
        report=report, target=target, json_out=json_out, allow_pickle=allow_pickle,
        trust_remote_code=trust_remote_code, say=say,
    )
    ref = ReferenceData(data.dataset, image_column=options.image_column, label_column=options.label_column)
    ref = ref.subset(options.max_samples, options.seed)  # max_samples bounds the fine-tuning too
    holdout = float(popts.holdout)
    fit = ref.split(holdout, options.seed)[0] if holdout > 0 else ref
    if before is None:
        say.info("auditing ...")
        before = audit_loaded(model, data, options, dataset=fit, progress=not say.quiet)
    say.show(before)
    chosen = _choose_target(target, before, model, say)
    if isinstance(chosen, ExitCode):
        return PurifyOutcome(chosen, before)
    result = _fine_tune(model, ref, before, chosen, options, popts, eval_trigger=eval_trigger, say=say)
    say.info("auditing the purified model ...")
    after = audit_loaded(model, data, options, dataset=fit, classifier=result.classifier,
                         progress=not say.quiet)
    outcome = PurifyOutcome(ExitCode.OK, before, result, after)
    if not is_main_process():  # the other ranks trained the same weights (DDP); rank 0 publishes
        return outcome
    extra = [*destination.flags(), *purify_flags(result)]
    extra += ["--eval-trigger", eval_trigger] if eval_trigger else []
    outcome.published = _publish(result, model, data, after, destination, options, extra,
                                 eval_trigger=eval_trigger, json_out=json_out, say=say)
    return outcome


def _load_for_purify(
    source: str, *, dataset: str | None, split: str | None, options: AuditOptions,
    named: list[tuple[Any, str]], destination: Destination, report: str | None, target: int | None,
    json_out: str | None, allow_pickle: bool, trust_remote_code: bool, say: Messages,
) -> tuple[LoadedModel, LoadedDataset, AuditReport | None]:
    """The model, its reference data and its saved audit (``report``, else None), each checked
    against the destinations and the others before any long work."""
    out = Path(destination.out).expanduser() if destination.out else None
    saved: list[AuditReport] = []

    def protect(model: LoadedModel, data: LoadedDataset | None) -> None:
        if data is None:
            check_destinations(model, out=out, push_to=destination.push_to, open_pr=destination.open_pr,
                               overwrite=destination.overwrite)
        inputs = protected_inputs(model, data, dataset)
        if out is not None:
            check_not_protected(out, "--out", [*named, *inputs])
        check_outputs([(json_out, "--json")], [*named, *inputs])
        if data is not None:
            return
        if not hasattr(model.clf, "save_pretrained"):
            raise UnsupportedModelError(f"cannot save a purified {model.clf.kind} model; only timm and "
                                        "transformers")
        if report:  # a report of another model is refused before any data is read
            saved.append(AuditReport.from_json(report))
            check_report_matches(saved[0], model.clf, model.label, f"--report {report}")
            say.info(f"using the audit in {report}")
        _check_target(target, model)

    model, data = load_inputs(source, dataset=dataset, split=split, options=options,
                              allow_pickle=allow_pickle, trust_remote_code=trust_remote_code, messages=say,
                              check=protect)
    return model, data, (saved[0] if saved else None)


def _fine_tune(
    model: LoadedModel,
    data: Any,
    report: AuditReport,
    target: int,
    options: AuditOptions,
    purify: PurifyOptions,
    *,
    eval_trigger: str | None,
    say: Messages,
) -> Any:
    """Run :func:`hub_backdoor.purify` on ``data`` against class ``target`` of ``report``."""

    trigger = zoo.ATTACKS[eval_trigger]() if eval_trigger else None
    say.info(f"purifying class {target} ({purify.epochs or 'auto'} epochs) ...")
    result = purify_model(
        model.clf,
        data,
        report=report,
        target=target,
        trigger=trigger,
        **purify.kwargs(),
        batch_size=options.batch_size,
        seed=options.seed,
        image_column=options.image_column,
        label_column=options.label_column,
        device=options.device,
        progress=not say.quiet,
    )
    result.classifier.model.to("cpu")
    return result


def _publish(
    result: Any,
    model: LoadedModel,
    data: LoadedDataset,
    after: AuditReport,
    destination: Destination,
    options: AuditOptions,
    extra: list[str],
    *,
    eval_trigger: str | None,
    json_out: str | None,
    say: Messages,
) -> Any:
    """Write, push or open the pull request, then say where it went and write ``json_out``."""

    published = publish(
        result,
        model=model,
        dataset=data,
        report_after=after,
        out=destination.out,
        push_to=destination.push_to,
        open_pr=destination.open_pr,
        overwrite=destination.overwrite,
        private=destination.private,
        trigger=eval_trigger,
        reproduce=reproduce_command("purify", model, data, options, extra),
    )
    if published.folder is not None:
        say.result(f"wrote purified model {published.folder}")
    if published.url:
        say.result(f"pushed to {destination.push_to}: {published.url}")
    if published.pr_url:
        say.result(f"opened pull request on {model.repo_id}: {published.pr_url}")
    say.result(result.summary())
    text = published.record.to_json()
    if json_out == "-":
        say.data(text.rstrip("\n"))
    elif json_out:
        atomic_write_text(Path(json_out), text)
        say.result(f"wrote purification record {json_out}")
    if after.backdoor_found:
        say.result(f"warning: the purified model is still flagged (class {after.target}); see the card")
    return published


# -- card -----------------------------------------------------------------------------------------------
def card_from_saved(source: str, *, report: str, purification: str | None = None, out: str = "card.md",
                    name: str | None = None, messages: Messages | None = None) -> str | None:
    """Write the security card of the saved audit ``report`` (and ``purification`` record) of the
    model ``source`` to ``out`` with its chart (``-``: the card alone to ``messages.data``); returns
    the card's path. Neither may overwrite the report, the record or a local model folder."""
    say = messages or Silent()
    named = [(report, "the --report file"), (purification, "the --purification record")]
    if Path(source).expanduser().exists():  # a local model folder: its own card and files stay
        named.append((source, "the model folder"))
    outputs = [(out, "--out")] + ([(chart_path_for(out), "--out (its chart)")] if out != "-" else [])
    check_outputs(outputs, named)
    audited = AuditReport.from_json(report)
    record = _read_record(purification, audited) if purification else None
    after = AuditReport.from_dict(record.audit_after) if record and record.audit_after else None
    src = audited.model.get("source") or {}
    repo_id = _repo_id(source)
    if src.get("repo_id") and repo_id and src["repo_id"].lower() != repo_id.lower():
        say.info(f"warning: the report is for {src['repo_id']}, not {repo_id}")
    ds = audited.data.get("source") or {}
    saved = record.card if record else {}
    name = name or saved.get("model_name") or (repo_id or source)
    hint = saved.get("load_hint") or (load_hint(str(audited.model.get("kind")), name) if record else "")
    ctx = CardContext(
        model_label=repo_id or Path(source).name or source, audited_repo=repo_id,
        audited_sha=src.get("sha") if repo_id else None, model_name=name, dataset=ds.get("name"),
        dataset_is_hub=ds.get("kind") == "hub", split=ds.get("split"),
        purification=record.to_dict() if record else None, report_after=after,
        reproduce=saved.get("reproduce") or _reproduce_report(audited, source), load_hint=hint,
        base_model=(repo_id or saved.get("base_model")) if record else None,
        extra_metadata=dict(saved.get("extra_metadata") or {}),
    )
    if out == "-":
        say.data(str(build_card(audited, ctx, chart_file="")).rstrip("\n"))
        return None
    card_path, chart = write_card(audited, ctx, out)
    say.result(f"wrote card {card_path} (chart {chart})")
    return str(card_path)


def _read_record(path: str, report: AuditReport) -> PurificationRecord:
    """The purification record at ``path``, checked against ``report``."""
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError, RecursionError) as e:  # RecursionError: nested too deeply
        raise HubBackdoorError(f"cannot read --purification {path} ({' '.join(str(e).split())})") from e
    try:
        record = PurificationRecord.from_dict(data)
    except ReportError as e:
        joint = " is" if str(e).startswith("not ") else ":"
        raise ReportError(f"--purification {path}{joint} {e}") from e
    C = len(report.classes)
    if not 0 <= record.target < C:
        raise HubBackdoorError(f"--purification {path}: 'target' must be a class index in 0..{C - 1}")
    if isinstance(record.audit_before, dict):
        b = AuditReport.from_dict(record.audit_before)
        mine, theirs = report.model.get("head_sha256"), b.model.get("head_sha256")
        if len(b.classes) != C or (mine and theirs and mine != theirs):
            raise HubBackdoorError(
                f"--purification {path} belongs to another model than the --report (its audit has another "
                "head fingerprint or class count); pass the record written with this report"
            )
    return record


def _repo_id(source: str) -> str | None:
    """The Hub id ``source`` names, or ``None`` for a folder."""
    if Path(source).expanduser().exists() or looks_like_path(source):
        return None
    return parse_repo_ref(source)[0]


def _reproduce_report(report: AuditReport, source: str) -> str:
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
    for option, key in (("--max-samples", "max_samples"), ("--soft-margin", "soft_margin")):
        if p.get(key) is not None:
            parts += [option, str(p[key])]
    parts += ["--seed", str(report.seed), "--rule", str(p.get("rule"))]
    parts += ["--threshold", str(p.get("threshold"))]
    return " ".join(shlex.quote(x) for x in parts)
