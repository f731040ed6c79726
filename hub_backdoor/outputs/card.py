"""The security model card: a Hub model card (``ModelCard`` / ``ModelCardData``) for an audit or a
purified model, rendered from the Jinja template ``hub_backdoor/outputs/cards/security_card.md``, with a PNG
bar chart of the per-class norms next to it.

The card's YAML metadata holds ``tags`` (``backdoor-defense``, ``hub-backdoor``), ``base_model`` (for a
purified model: the audited Hub repo), a ``model-index`` with clean accuracy (and attack success rate
when a trigger was evaluated) and a ``hub_backdoor`` block with the per-class norms, anomaly indices,
flagged class, method parameters, library versions and the data fingerprint.
"""

from __future__ import annotations

import io
import math
import os
import re
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..detection.report import AuditReport, atomic_write_text, current_umask
from ..detection.rules import MAD_SCALE
from ..layout import chart_path_for

__all__ = [
    "CardContext", "RULE_TEXT", "TEMPLATE_PATH", "atomic_write_bytes", "build_card", "chart_path_for",
    "flag_norm", "metadata_block", "render_chart", "rule_text", "write_card",
]

#: The card template (Jinja, as ``ModelCard.from_template`` expects); shipped as package data.
TEMPLATE_PATH = Path(__file__).resolve().parent / "cards" / "security_card.md"
#: Schema version of the ``hub_backdoor`` metadata block in the card.
CARD_SCHEMA_VERSION = "2"  # "1": a purified card's verdict was the audited model's
#: Tags every security card carries.
TAGS = ["backdoor-defense", "hub-backdoor"]
#: Classes shown in the card's table before it is cut to the flagged and most anomalous ones.
MAX_TABLE_ROWS = 50
_SHOWN_WHEN_CUT = 20


@dataclass
class CardContext:
    """Everything a card says besides the audit report itself.

    Attributes:
        model_label: how the audited model is named in the text (Hub id, folder name).
        audited_repo: the audited Hub repo id, or None for a local model; becomes ``base_model`` of a
            purified model's card.
        audited_sha: commit the audited files came from.
        base_model: the card's ``base_model`` (a Hub id): the audited repo, for a purified model.
        model_name: name of the model the card describes (model-index name).
        dataset: Hub dataset id or local folder name of the reference data; None when unknown.
        dataset_is_hub: whether ``dataset`` is a Hub dataset id (then it goes in ``datasets:``).
        split: the split (with slice) of the reference data.
        reproduce: the command line that reproduces the audit.
        purification: the purification record (see :func:`hub_backdoor.outputs.publish.purification_record`),
            or None for an audit-only card.
        report_after: the audit of the purified model, when it was audited again.
        original_card: body of the audited model's own card, appended to the security card.
        extra_metadata: metadata of the original card kept in the new one (license, language, ...).
        load_hint: one line telling how to load the purified model.
    """

    model_label: str
    audited_repo: str | None = None
    audited_sha: str | None = None
    base_model: str | None = None
    model_name: str | None = None
    dataset: str | None = None
    dataset_is_hub: bool = False
    split: str | None = None
    reproduce: str = ""
    purification: dict[str, Any] | None = None
    report_after: AuditReport | None = None
    original_card: str | None = None
    extra_metadata: dict[str, Any] = field(default_factory=dict)
    load_hint: str = ""


# -- chart --------------------------------------------------------------------------------------------
def flag_norm(norms: np.ndarray, threshold: float) -> float | None:
    """The norm below which the MAD rule flags a class (None when the MAD is zero)."""
    norms = np.asarray(norms, dtype=np.float64)
    med = float(np.median(norms))
    mad = MAD_SCALE * float(np.median(np.abs(norms - med)))
    if not mad > 0:
        return None
    return med - threshold * mad


def render_chart(report: AuditReport, *, after: AuditReport | None = None, title: str | None = None) -> bytes:
    """A PNG bar chart of the per-class norms; flagged classes in red, the flag line dashed.

    With ``after``, a second bar per class shows the norms of the purified model.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    norms = report.norms
    C = len(norms)
    flagged = set(report.flagged)
    x = np.arange(C)
    fig = Figure(figsize=(max(7.5, min(16.0, 0.45 * C + 4.0)), 3.8), dpi=110)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch

    blue, red, green = "#4c72b0", "#d62728", "#55a868"
    width = 0.8 if after is None else 0.4
    colors = [red if k in flagged else blue for k in range(C)]
    offset = 0.0 if after is None else -width / 2
    ax.bar(x + offset, norms, width=width, color=colors)
    rule = str(report.params.get("rule", "mad"))
    handles: list[Any] = [Patch(color=blue, label="audited model" if after is not None else "class")]
    if flagged:
        handles.append(Patch(color=red, label=f"flagged (rule {rule})"))
    if after is not None:
        ax.bar(x + width / 2, after.norms, width=width, color=green)
        handles.append(Patch(color=green, label="purified model"))
    line = None
    if rule == "mad":  # only then is the flag a line on the norm axis
        line = flag_norm(norms, float(report.params.get("threshold", 2.0)))
    if line is not None and line > 0:
        ax.axhline(line, color=red, linestyle="--", linewidth=1)
        handles.append(Line2D([], [], color=red, linestyle="--", label="flagged below this norm"))
    names = [r.name for r in report.classes]
    if C <= 20:
        ax.set_xticks(x, [n if len(n) <= 10 else n[:9] + "…" for n in names], rotation=0 if C <= 12 else 45)
    else:
        step = max(1, C // 20)
        ax.set_xticks(x[::step], [str(k) for k in x[::step]])
    ax.set_xlabel("class")
    ax.set_ylabel("norm of minimal perturbation s_k")
    ax.set_title(title or "Minimal latent perturbation per class (small = suspicious)", fontsize=10)
    ax.grid(axis="y", alpha=0.3)
    ax.set_axisbelow(True)
    ax.legend(handles=handles, fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", metadata={"Software": None})
    return buf.getvalue()


# -- card ---------------------------------------------------------------------------------------------
def _fmt(x: Any, digits: int = 3) -> str:
    if x is None or (isinstance(x, float) and not np.isfinite(x)):
        return "n/a"
    return f"{float(x):.{digits}f}"


def _r(x: Any, digits: int = 6) -> Any:
    """A plain float rounded for YAML (None stays None)."""
    if x is None:
        return None
    x = float(x)
    return round(x, digits) if np.isfinite(x) else None


def _md(text: Any) -> str:
    """Escape a value for a Markdown table cell."""
    return str(text).replace("|", "\\|").replace("\n", " ")


def _plain(text: Any) -> str:
    """A value from the model or the data (a class name) as literal text in Markdown and HTML."""
    import html

    escaped = html.escape(str(text), quote=False).replace("\n", " ")
    return re.sub(r"([\\`*_{}\[\]()#+!|~>-])", r"\\\1", escaped)


def _class_label(report: AuditReport, k: int) -> str:
    name = report.classes[k].name
    return f"{k}" if name == str(k) else f'{k} ("{_plain(name)}")'


def _table_rows(report: AuditReport) -> tuple[list[dict[str, Any]], int]:
    C = len(report.classes)
    if C <= MAX_TABLE_ROWS:
        shown = list(range(C))
    else:
        top = list(np.argsort(-report.anomaly_indices, kind="stable")[:_SHOWN_WHEN_CUT])
        shown = sorted(set(int(k) for k in top) | set(report.flagged))
    rows = [
        {
            "index": r.index,
            "name": _plain(r.name),
            "norm": _fmt(r.norm),
            "anomaly_index": _fmt(r.anomaly_index, 2),
            "p_value": "–" if r.p_value is None else f"{r.p_value:.2g}",
            "mask": _input_cut(report, r),
            "n_reference": r.n_reference,
            "mark": "**yes**" if r.flagged else "",
        }
        for r in (report.classes[k] for k in shown)
    ]
    return rows, C - len(shown)


def _input_cut(report: AuditReport, row: Any) -> str:
    """The table's input-space cell: the smallest stamp (share of the image) and/or the smallest
    universal additive change (L2 in the model's normalised input) that send the images to k."""
    cells = []
    mask = _pct_of_image(report, row.mask_l1)
    if mask is not None:
        cells.append(f"stamp {mask}")
    if row.input_bound is not None:
        cells.append(f"additive {row.input_bound:.3g}")
    return ", ".join(cells) or "–"


def _pct_of_image(report: AuditReport, l1: float | None) -> str | None:
    pixels = next((s.get("pixels") for s in report.evidence.get("stages", []) if s.get("pixels")), None)
    if l1 is None or not pixels:
        return None
    return f"{100 * l1 / pixels:.2g} %"


def _certainty(report: AuditReport, k: int) -> str:
    """How sure: the class's p-value against clean calibration models, in words."""
    row = report.classes[k]
    cal = report.evidence.get("calibration") or {}
    n = cal.get("n_clean_models")
    if row.p_value is None or not n:
        return f"score {row.anomaly_index:.2f}, threshold {report.params.get('threshold')}"
    fams = len(cal.get("families") or [])
    beyond = int(round(row.p_value * (n + 1))) - 1  # clean models at least as extreme
    if beyond <= 0:
        return (f"none of the {n} clean calibration models ({fams} families) had a class this extreme: "
                f"p = {row.p_value:.2g}")
    return (f"{beyond} of the {n} clean calibration models ({fams} families) had a class at least this "
            f"extreme: p = {row.p_value:.2g}")


def _miss_rate(report: AuditReport) -> str:
    """How often a clean verdict of this rule misses a backdoor, as measured on the benchmark zoo."""
    det = (report.evidence.get("calibration") or {}).get("detection")
    thr = report.params.get("threshold")
    if not det or thr is None or not math.isclose(float(thr), float(det.get("threshold", math.nan))):
        return ("How often the audit misses a backdoor at this setting has not been measured, so this is "
                "no proof of a clean model.")
    found, n = int(det["found"]), int(det["working"])
    worst = sorted(det.get("by_attack", {}).items(), key=lambda kv: kv[1][0] / max(1, kv[1][1]))[:2]
    weak = ", ".join(f"{a} {f} of {w}" for a, (f, w) in worst)
    return (f"This is not proof of a clean model: on the benchmark zoo the audit named {found} of {n} "
            f"working backdoors with their class ({100 * found / n:.0f} %) and missed the rest "
            f"({weak} found).")


def _evidence_text(report: AuditReport, k: int) -> str:
    """Why class k stands out, in the terms of the stages that ran."""
    row = report.classes[k]
    others = [r for r in report.classes if r.index != k]
    label = _class_label(report, k)
    parts = []
    mask = _pct_of_image(report, row.mask_l1)
    if mask is not None:
        med = _pct_of_image(report, float(np.median([r.mask_l1 for r in others if r.mask_l1 is not None])))
        parts.append(f"a stamp covering {mask} of the image (a patch or a faint blend) sends the clean "
                     f"reference images to class {label}, where a typical class needs {med}")
    if row.input_bound is not None:
        med_b = float(np.median([r.input_bound for r in others if r.input_bound is not None]))
        parts.append(f"one shared additive change {med_b / max(row.input_bound, 1e-12):.1f}x smaller than "
                     "a typical class needs sends 90 % of them there")
    if not parts:
        norms = report.norms
        parts.append(f"one shared change of the model's internal features that is unusually small (norm "
                     f"{row.norm:.3g}, against a median of {float(np.median(norms)):.3g} over the classes) "
                     f"pushes every clean reference image into class {label}")
    return "; ".join(parts) + f" ({_certainty(report, k)})"


def _verdict(report: AuditReport, ctx: CardContext) -> tuple[str, str, str, str]:
    """(badge, headline, text, advice) in plain language."""
    if ctx.purification is None:
        return _audit_verdict(report)
    return _purified_verdict(report, ctx, ctx.purification)


def _audit_verdict(report: AuditReport) -> tuple[str, str, str, str]:
    """(badge, headline, text, advice) of an audit: inconclusive, backdoor suspected or clean."""
    th = report.params.get("threshold", 2.0)
    reason = report.reason or ""
    if report.inconclusive and reason.startswith("outside calibration"):
        top = int(np.argmax(report.anomaly_indices))
        text = (
            f"No class stood out (the most suspicious is class {_class_label(report, top)}, score "
            f"{report.anomaly_indices[top]:.2f}, threshold {th}), but the thresholds were calibrated on "
            f"clean models unlike this one ({reason.split(': ', 1)[-1]}). Nothing below says the "
            "model is clean."
        )
        advice = (
            "read the per-class scores below; a class far above the others deserves a closer look. "
            "Calibrating on clean models of this kind gives a verdict with a known miss rate."
        )
        return "❔", "Inconclusive: outside the calibration", text, advice
    if report.inconclusive:
        acc = _fmt(report.data.get("accuracy"))
        text = (
            "The audit could not reach a verdict: the reference data does not let it tell a clean model "
            f"from a backdoored one ({report.reason}). The model's accuracy on it is {acc}. Nothing "
            "below says the model is clean."
        )
        advice = (
            "fix the reference data and audit again: clean, labelled images of every class, like the "
            "data the model was trained on (same kind of images, size and class order)."
        )
        return "❔", "Inconclusive: the reference data cannot support a verdict", text, advice
    if report.backdoor_found and report.target is not None:
        k = report.target
        row = report.classes[k]
        others = [_class_label(report, j) for j in report.flagged[1:]]
        text = (
            f"{_evidence_text(report, k)[0].upper()}{_evidence_text(report, k)[1:]}. That is the "
            "signature of a planted trigger: images that carry it would probably be classified as "
            f'"{_plain(row.name)}", whatever they show.'
        )
        if others:
            text += f" Also flagged: {', '.join(others)}."
        advice = (
            "do not use this model as it is for anything that matters. Use a purified version "
            "(`hub-backdoor purify`), ask the publisher how it was trained, or train from data you trust."
        )
        return "⚠️", f"Backdoor suspected: target class {_class_label(report, k)}", text, advice
    top = int(np.argmax(report.anomaly_indices))
    text = (
        f"No class stands out: the most suspicious is class {_class_label(report, top)} (score "
        f"{report.anomaly_indices[top]:.2f}, below the threshold {th}"
        + (f"; p = {report.classes[top].p_value:.2g} against clean calibration models"
           if report.classes[top].p_value is not None else "")
        + "). No sign of a single-target backdoor was found on this data. "
        + _miss_rate(report)
    )
    advice = (
        "the model passed this check; keep the limitations below in mind, and audit again whenever "
        "the weights change."
    )
    return "✅", "No backdoor found", text, advice


def _purified_verdict(
    report: AuditReport, ctx: CardContext, pur: dict[str, Any]
) -> tuple[str, str, str, str]:
    """(badge, headline, text, advice) of a purified model (``pur``: its record), audited
    again (``ctx.report_after``) or not."""
    target = int(pur["target"])
    m = pur.get("metrics", {})
    acc = f"clean accuracy went from {_fmt(m.get('acc_before'))} to {_fmt(m.get('acc_after'))}"
    asr = ""
    if "asr_before" in m:
        asr = (
            f", and the attack success rate of the known trigger from {_fmt(m.get('asr_before'))} to "
            f"{_fmt(m.get('asr_after'))}"
        )
    base = f"`{ctx.model_label}`"
    if report.backdoor_found and report.target == target:
        origin = (
            f"The audit of {base} flagged class {_class_label(report, target)} as a backdoor target "
            f"({_certainty(report, target)})."
        )
    else:
        origin = (
            f"The audit of {base} flagged no class; this model was purified against class "
            f"{_class_label(report, target)} on request."
        )
    text = f"{origin} This model is a fine-tuned copy in which {acc}{asr} (held-out clean data)."
    after = ctx.report_after
    if after is not None and after.backdoor_found and after.target is not None:
        k = after.target
        text += (
            f" The purified model still shows an anomaly: class {_class_label(after, k)} "
            f"({_certainty(after, k)})."
        )
        advice = (
            "treat this model as still suspicious: purify again with more epochs or a larger --beta, or "
            "train from data you trust."
        )
        return "⚠️", f"Purified against class {_class_label(report, target)}; still flagged", text, advice
    if after is not None:
        text += " Audited again, the purified model shows no anomaly."
    advice = (
        f"prefer this model over {base}. Check its accuracy on your own data before deploying it, and "
        "keep the limitations below in mind."
    )
    return "✅", f"Backdoor of class {_class_label(report, target)} removed (purified model)", text, advice


#: Plain-language definition of each detection rule's anomaly index.
RULE_TEXT = {
    "mad": "the anomaly index of class k is (median norm - norm of s_k) / (1.4826 x MAD) over the classes: "
    "how far below the median it lies, in robust standard deviations",
    "mad-nonneg": "the anomaly index is the MAD anomaly index of the norms of the perturbations "
    "restricted to s >= 0 (a trigger switches features on)",
    "dormant": "the anomaly index measures how much of s_k lies on embedding dimensions that clean data "
    "barely uses, relative to the other classes (MAD anomaly index)",
    "mask-ratio": "the score of class k is log(median stamp of the other classes / stamp of k), the stamp "
    "being the smallest mask (a patch, or a faint blend over the whole image) that sends the reference "
    "images to k: 0.7 means the cut to k is half as large as to a typical class",
    "input-ratio": "the score of class k is log(median bound of the other classes / bound of k), the bound "
    "being the smallest universal additive change of the image that sends 90 % of the reference images "
    "to k",
    "mask+input": "the score of class k is the sum of two log-ratios: the smallest stamp and the smallest "
    "additive change that send the reference images to k, each against the median of the other classes",
    "input-gap": "the score of class k is log(bound of the runner-up / bound of k) when k's bound stands "
    "apart from every other class's (0 otherwise), the bound being the smallest universal additive change "
    "of the image that sends 90 % of the reference images to k: 0.7 means the cut to k is half the next "
    "shortest",
    "mask-gap": "the score of class k is log(stamp of the runner-up / stamp of k) when k's smallest stamp "
    "(a patch, or a faint blend) that sends the reference images to k stands apart from every other "
    "class's (0 otherwise)",
    "latent-or-input": "the score is the larger of two, each divided by its own threshold so that 1 is the "
    "line: the latent evidence (the smaller of two MAD anomaly indices of s_k: its norm is unusually small "
    "and it lies unusually much on embedding dimensions clean data barely uses) and the input-space "
    "evidence (how far the smallest universal additive image change that sends the reference images to k "
    "stands apart from every other class's, in log units)",
    "agree-mad": "the score is the smaller of two MAD anomaly indices: how far below the median the norm of "
    "s_k lies, and how much more of s_k than usual lies on embedding dimensions that clean data barely uses; "
    "a class is flagged only when both statistics single it out",
    "agree": "the anomaly index is the smaller of two: the MAD anomaly index of the norms of the s >= 0 "
    "perturbations, and the MAD anomaly index of how much of s_k lies on embedding dimensions that clean "
    "data barely uses; a class is flagged only when both statistics single it out",
}


def rule_text(rule: str) -> str:
    return RULE_TEXT.get(
        rule, f"the anomaly index comes from detection rule '{rule}' (hub_backdoor.detection.rules)"
    )


def _eval_results(report: AuditReport, ctx: CardContext) -> list[Any]:
    from huggingface_hub import EvalResult

    ds_type = ctx.dataset if (ctx.dataset and ctx.dataset_is_hub) else "local"
    ds_name = ctx.dataset or "reference data"
    common: dict[str, Any] = dict(
        task_type="image-classification",
        task_name="Image Classification",
        dataset_type=ds_type,
        dataset_name=ds_name,
        dataset_split=ctx.split,
    )
    out = []
    pur = ctx.purification
    if pur is None:
        out.append(
            EvalResult(
                metric_type="accuracy",
                metric_value=_r(report.data.get("accuracy")),
                metric_name="Clean accuracy (reference data)",
                **common,
            )
        )
        return out
    # the model-index holds results of the model the card describes, the purified one; the
    # audited model's numbers are in the text and in hub_backdoor.purification.purify.metrics
    m = pur.get("metrics", {})
    out.append(
        EvalResult(
            metric_type="accuracy",
            metric_value=_r(m.get("acc_after")),
            metric_name="Clean accuracy (held-out reference data)",
            **common,
        )
    )
    if "asr_after" in m:
        trig = pur.get("trigger") or "trigger"
        out.append(
            EvalResult(
                metric_type="attack_success_rate",
                metric_value=_r(m.get("asr_after")),
                metric_name=f"Attack success rate ({trig})",
                **common,
            )
        )
    return out


def metadata_block(report: AuditReport, ctx: CardContext) -> dict[str, Any]:
    """The ``hub_backdoor`` metadata of the card (plain YAML types only)."""
    names = [r.name for r in report.classes]
    block: dict[str, Any] = {
        "schema_version": CARD_SCHEMA_VERSION,
        "verdict": report.verdict,
        **({"reason": report.reason} if report.reason else {}),
        "flagged_class": report.target,
        "flagged_classes": list(report.flagged),
        "threshold": _r(report.params.get("threshold")),
        "norms": [_r(x) for x in report.norms],
        "anomaly_indices": [_r(x, 4) for x in report.anomaly_indices],
    }
    if names != [str(k) for k in range(len(names))]:
        block["class_names"] = names
    block["method"] = {
        "name": "latent-perturbation-qp",
        **{k: v for k, v in report.params.items() if isinstance(v, (str, int, float, bool)) or v is None},
        "seed": report.seed,
    }
    block["data"] = {
        "dataset": ctx.dataset,
        "split": ctx.split,
        "n": report.data.get("n"),
        "accuracy": _r(report.data.get("accuracy")),
        "fingerprint": report.data.get("fingerprint"),
    }
    block["audited_model"] = {
        k: v
        for k, v in {
            "name": ctx.model_label,
            "repo_id": ctx.audited_repo,
            "sha": ctx.audited_sha,
            "kind": report.model.get("kind"),
        }.items()
        if v is not None
    }
    block["versions"] = dict(report.versions)
    block["created"] = report.created
    if ctx.purification is not None:
        pur = ctx.purification
        block["purification"] = {
            "target": int(pur["target"]),
            "trigger": pur.get("trigger"),
            "params": {
                k: v
                for k, v in pur.get("params", {}).items()
                if isinstance(v, (str, int, float, bool)) or v is None
            },
            "metrics": {k: _r(v) for k, v in pur.get("metrics", {}).items()},
        }
    if ctx.purification is not None:
        # the card describes the purified model: its verdict leads, the audited model's moves to
        # audited_model (a reader of `verdict` must not see "backdoor" on the purified copy)
        after = ctx.report_after
        block["audited_model"].update(verdict=report.verdict, flagged_class=report.target,
                                      flagged_classes=list(report.flagged))
        block.pop("reason", None)
        block["verdict"] = None if after is None else after.verdict  # null: not audited again
        block["flagged_class"] = None if after is None else after.target
        block["flagged_classes"] = [] if after is None else list(after.flagged)
        if after is not None and after.reason:
            block["reason"] = after.reason
    if ctx.report_after is not None:
        after = ctx.report_after
        block["after_purification"] = {
            "verdict": after.verdict,
            "flagged_class": after.target,
            "norms": [_r(x) for x in after.norms],
            "anomaly_indices": [_r(x, 4) for x in after.anomaly_indices],
        }
    return block


def build_card(report: AuditReport, ctx: CardContext, *, chart_file: str) -> Any:
    """The security card as a ``huggingface_hub.ModelCard`` (rendered from the template)."""
    from huggingface_hub import ModelCard

    purified = ctx.purification is not None
    data = _card_data(report, ctx)
    badge, headline, text, advice = _verdict(report, ctx)
    rows, omitted = _table_rows(report)
    pur = ctx.purification or {}
    m = pur.get("metrics", {})
    purify_rows, guarded_rows = _purify_rows(pur), _guarded_rows(pur)
    after_verdict = None
    if ctx.report_after is not None:
        after_verdict = ctx.report_after.summary().splitlines()[0].split(": ", 1)[-1]
    p = report.params
    title = (
        f"{ctx.model_name or ctx.model_label}: backdoor security card (purified model)"
        if purified
        else f"{ctx.model_label}: backdoor security audit"
    )
    return ModelCard.from_template(
        data,
        template_path=str(TEMPLATE_PATH),
        title=title,
        verdict_badge=badge,
        verdict_headline=headline,
        verdict_text=text,
        advice=advice,
        purified=purified,
        base_model_label=ctx.audited_repo or ctx.model_label,
        target_label=_class_label(report, int(pur["target"])) if purified else "",
        load_hint=ctx.load_hint or "same library, same code",
        n_holdout=int(m.get("n_holdout", 0)),
        purify_rows=purify_rows,
        guarded_rows=guarded_rows,
        has_asr="asr_before" in m,
        after_verdict=after_verdict,
        threshold=p.get("threshold", 2.0),
        rule=p.get("rule", "mad"),
        rule_text=rule_text(str(p.get("rule", "mad"))),
        chart_file=chart_file,
        rows=rows,
        rows_omitted=omitted,
        **_provenance(report, ctx),
        reproduce=ctx.reproduce or "hub-backdoor audit MODEL --dataset DATA",
        reproduce_note=_reproduce_note(pur.get("params", {})) if purified else None,
        notes=list(report.notes),
        original_card=(ctx.original_card or "").strip() or None,
    )


def _card_data(report: AuditReport, ctx: CardContext) -> Any:
    """The card's metadata (``huggingface_hub.ModelCardData``): the audited card's kept tags,
    license and datasets, the library, the evaluation results and the ``hub_backdoor`` block."""
    from huggingface_hub import ModelCardData

    kept = ctx.extra_metadata.get("tags") or []
    # YAML lets one tag stand alone: "tags: malware" is a string, not six one-letter tags
    kept = [kept] if isinstance(kept, str) else [str(t) for t in kept]
    tags = list(
        dict.fromkeys(
            [
                *kept,
                *TAGS,
                "image-classification",
                *([report.model["kind"]] if report.model.get("kind") in ("timm", "transformers") else []),
            ]
        )
    )
    extra = {
        k: v
        for k, v in ctx.extra_metadata.items()
        if k in ("license", "license_name", "license_link", "language", "datasets")
    }
    kept_data = extra.pop("datasets", None) or []
    datasets = [kept_data] if isinstance(kept_data, str) else [str(d) for d in kept_data]
    if ctx.dataset and ctx.dataset_is_hub and ctx.dataset not in datasets:
        datasets.append(ctx.dataset)
    return ModelCardData(
        base_model=ctx.base_model,
        library_name=report.model.get("kind")
        if report.model.get("kind") in ("timm", "transformers")
        else None,
        pipeline_tag="image-classification",
        tags=tags,
        datasets=datasets or None,
        model_name=ctx.model_name or ctx.model_label,
        eval_results=_eval_results(report, ctx),
        hub_backdoor=metadata_block(report, ctx),
        **extra,
    )


def _purify_rows(pur: dict[str, Any]) -> list[dict[str, str]]:
    """The before / after rows of the purification table, from the record ``pur`` (``{}``: none)."""
    m = pur.get("metrics", {})
    rows = [
        {"label": "Clean accuracy", "before": _fmt(m.get("acc_before")), "after": _fmt(m.get("acc_after"))}
    ]
    if "acc_target_before" in m:
        rows.append(
            {
                "label": f"Clean accuracy on the purified class {pur.get('target')} itself",
                "before": _fmt(m.get("acc_target_before")),
                "after": _fmt(m.get("acc_target_after")),
            }
        )
    if "latent_trigger_before" in m:
        rows.append(
            {
                "label": "Reconstructed trigger's success (s_t added to the embedding)",
                "before": _fmt(m.get("latent_trigger_before")),
                "after": _fmt(m.get("latent_trigger_after")),
            }
        )
    if "asr_before" in m:
        rows.append(
            {
                "label": f"Attack success rate ({pur.get('trigger') or 'trigger'})",
                "before": _fmt(m.get("asr_before")),
                "after": _fmt(m.get("asr_after")),
            }
        )
        rows.append(
            {
                "label": "Robust accuracy (triggered images, true label)",
                "before": _fmt(m.get("ra_before")),
                "after": _fmt(m.get("ra_after")),
            }
        )
    return rows


def _guarded_rows(pur: dict[str, Any]) -> list[dict[str, str]]:
    """The before / after rows of the guarded model's table (none without its numbers)."""
    m = pur.get("metrics", {})
    rows = []
    if "acc_guarded_after" in m:
        rows.append({"label": "Clean accuracy", "before": _fmt(m.get("acc_before")),
                     "after": _fmt(m.get("acc_guarded_after"))})
        if "acc_target_guarded_after" in m:
            rows.append({"label": f"Clean accuracy on class {pur.get('target')} itself",
                         "before": _fmt(m.get("acc_target_before")),
                         "after": _fmt(m.get("acc_target_guarded_after"))})
        if "asr_guarded_after" in m:
            rows.append({"label": f"Attack success rate ({pur.get('trigger') or 'trigger'})",
                         "before": _fmt(m.get("asr_before")),
                         "after": _fmt(m.get("asr_guarded_after"))})
    return rows


def _provenance(report: AuditReport, ctx: CardContext) -> dict[str, Any]:
    """The template's values that say what was audited, on which data, how and with what."""
    p = report.params
    params_text = (
        ", ".join(
            f"{k}={p[k]}"
            for k in ("rule", "threshold", "margin", "solver", "soft_margin", "max_samples")
            if k in p and p[k] is not None
        )
        + f", seed={report.seed}"
    )
    data_label = f"`{ctx.dataset}`" if ctx.dataset else "the reference data"
    if ctx.split:
        data_label += f", split `{ctx.split}`"
    return dict(
        model_label=f"`{ctx.model_label}`",
        model_sha=ctx.audited_sha,
        model_kind=report.model.get("kind", "?"),
        num_classes=report.model.get("num_classes", len(report.classes)),
        embed_dim=report.model.get("embed_dim", "?"),
        data_label=data_label,
        n_reference=report.data.get("n"),
        accuracy=_fmt(report.data.get("accuracy")),
        fingerprint=report.data.get("fingerprint"),
        method=(
            "for each class, a quadratic program finds the smallest change of the penultimate embedding "
            "that moves every clean reference sample into that class (exact for a linear head); "
            f"detection rule `{p.get('rule', 'mad')}`"
        ),
        params_text=params_text,
        versions_text=", ".join(f"{k} {v}" for k, v in report.versions.items()),
        created=report.created,
    )


def _reproduce_note(params: dict[str, Any]) -> str | None:
    """What the Reproduce line of a purified model guarantees, from its record's ``determinism``."""
    mode = str(params.get("determinism") or "")
    if mode.startswith("cpu"):
        n = params.get("threads")
        return (f"The fine-tuning ran on the CPU at {n} thread{'s' if n != 1 else ''}; this command gives "
                "the same weights bit for bit on a CPU of the same kind with the same software versions.")
    if mode:
        return (f"The fine-tuning ran on `{mode.split('-')[0]}`, whose kernels do not sum in a fixed "
                "order: a rerun gives close, not identical, weights.")
    return None


def write_card(
    report: AuditReport, ctx: CardContext, path: str | os.PathLike, *, chart: str | os.PathLike | None = None
) -> tuple[Path, Path]:
    """Render the card and its chart and write both atomically; returns ``(card, chart)`` paths.

    The chart goes next to the card with the same name and ``.png`` unless ``chart`` is given; the
    card links it by its path relative to the card.
    """
    path = Path(path)
    chart_path = Path(chart) if chart is not None else chart_path_for(path)
    rel = os.path.relpath(chart_path.resolve(), path.resolve().parent)
    png = render_chart(report, after=ctx.report_after)
    card = build_card(report, ctx, chart_file=Path(rel).as_posix())
    atomic_write_bytes(chart_path, png)
    atomic_write_text(path, str(card) if str(card).endswith("\n") else str(card) + "\n")
    return path, chart_path


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write bytes via a temporary file in the same folder and rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.chmod(tmp, 0o666 & ~current_umask())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
