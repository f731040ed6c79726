"""Start-up time of the command line, beside ``hf version``: ``python -m benchmarks.startup``.

Runs each command ``--repeat`` times in fresh processes, alternating them, and writes the median
wall time of each and its ratio to ``hf version`` to ``--out`` (Markdown and JSON). Then the time
an untrained model takes to get its inconclusive verdict (exit 4) from ``hub-backdoor audit``: a
224-px timm ResNet-18 with 10 and with 1000 classes on 300 reference images."""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

from ._machine import cpu_name

COMMANDS = {
    "hf version": ["hf", "version"],
    "hub-backdoor --version": ["hub-backdoor", "--version"],
    "hub-backdoor --help": ["hub-backdoor", "--help"],
    "hub-backdoor audit --help": ["hub-backdoor", "audit", "--help"],
    "hub-backdoor purify --help": ["hub-backdoor", "purify", "--help"],
}


def _executable(name: str) -> str:
    """The console script beside this interpreter, else the one on PATH."""
    here = Path(sys.executable).parent / name
    found = str(here) if here.exists() else shutil.which(name)
    if found is None:
        raise SystemExit(f"{name} is not installed")
    return found


def measure(repeat: int) -> dict[str, float]:
    """Median seconds per command, the commands interleaved so that load drifts hit them alike."""
    times: dict[str, list[float]] = {k: [] for k in COMMANDS}
    for _ in range(repeat):
        for name, argv in COMMANDS.items():
            cmd = [_executable(argv[0]), *argv[1:]]
            t0 = time.perf_counter()
            subprocess.run(cmd, capture_output=True, check=True)
            times[name].append(time.perf_counter() - t0)
    return {k: statistics.median(v) for k, v in times.items()}


def untrained(work: Path) -> dict[str, dict[str, float]]:
    """Seconds (whole command, fresh process) and exit code of ``audit`` on untrained models."""
    import datasets
    import numpy as np
    import timm
    import torch
    from PIL import Image

    from hub_backdoor.adapters import load_classifier
    rng = np.random.default_rng(0)
    imgs = [Image.fromarray(rng.integers(0, 256, (224, 224, 3), dtype=np.uint8)) for _ in range(300)]
    for classes in (10, 1000):
        torch.manual_seed(0)
        net = timm.create_model("resnet18", pretrained=False, num_classes=classes).eval()
        load_classifier(net).save_pretrained(work / f"resnet18-{classes}")
        label = datasets.ClassLabel(num_classes=classes)
        feats = datasets.Features({"image": datasets.Image(), "label": label})
        labels = [int(k) for k in rng.integers(0, classes, len(imgs))]
        datasets.Dataset.from_dict({"image": imgs, "label": labels}, features=feats).save_to_disk(
            str(work / f"noise-{classes}"))
    out = {}
    for classes in (10, 1000):
        name = f"{classes}-class timm resnet18, 224 px, 300 images"
        cmd = [_executable("hub-backdoor"), "audit", str(work / f"resnet18-{classes}"), "--dataset",
               str(work / f"noise-{classes}"), "--quiet"]
        t0 = time.perf_counter()
        done = subprocess.run(cmd, capture_output=True, text=True)
        out[name] = {"seconds": time.perf_counter() - t0, "exit_code": done.returncode}
    return out


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--repeat", type=int, default=7)
    p.add_argument("--out", default="benchmarks/results/startup")
    args = p.parse_args(argv)
    med = measure(args.repeat)
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        cold = untrained(Path(tmp))
    base = med["hf version"]
    rows = [f"| `{k}` | {v:.2f} | {v / base:.2f} |" for k, v in med.items()]
    md = "\n".join([
        f"Start-up, median of {args.repeat} fresh processes each, interleaved ({cpu_name()}).",
        "",
        "| command | seconds | ratio to `hf version` |",
        "|---|---:|---:|",
        *rows,
        "",
        "Untrained models, `hub-backdoor audit MODEL --dataset DATA --quiet` (whole command, one run each):",
        "",
        "| model | seconds | exit code |",
        "|---|---:|---:|",
        *[f"| {k} | {v['seconds']:.1f} | {v['exit_code']} |" for k, v in cold.items()],
        "",
    ])
    out = Path(args.out)
    out.with_suffix(".md").write_text(md)
    out.with_suffix(".json").write_text(json.dumps({"repeat": args.repeat, "cpu": cpu_name(), "seconds": med,
                                                    "untrained": cold}, indent=2) + "\n")
    print(md)


if __name__ == "__main__":
    main()
