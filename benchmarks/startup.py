"""Start-up time of the command line, beside ``hf version``: ``python -m benchmarks.startup``.

Runs each command ``--repeat`` times in fresh processes, alternating them, and writes the median
wall time of each and its ratio to ``hf version`` to ``--out`` (Markdown and JSON)."""

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


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--repeat", type=int, default=7)
    p.add_argument("--out", default="benchmarks/results/startup")
    args = p.parse_args(argv)
    med = measure(args.repeat)
    base = med["hf version"]
    rows = [f"| `{k}` | {v:.2f} | {v / base:.2f} |" for k, v in med.items()]
    md = "\n".join([
        f"Start-up, median of {args.repeat} fresh processes each, interleaved ({cpu_name()}).",
        "",
        "| command | seconds | ratio to `hf version` |",
        "|---|---:|---:|",
        *rows,
        "",
    ])
    out = Path(args.out)
    out.with_suffix(".md").write_text(md)
    out.with_suffix(".json").write_text(json.dumps({"repeat": args.repeat, "cpu": cpu_name(), "seconds": med},
                                                   indent=2) + "\n")
    print(md)


if __name__ == "__main__":
    main()
