"""``hub-backdoor demo``: make a small backdoored model from bundled data, audit and purify it."""

from __future__ import annotations

import argparse
from typing import Any

from ..defaults import DEMO, ZOO_ARCHS
from .options import positive_int, runtime_options
from .ui import UI

__all__ = ["register", "run"]


def register(subparsers: Any) -> argparse.ArgumentParser:
    """Add the ``demo`` command to ``subparsers``."""
    arch, epochs, seed = DEMO["arch"], DEMO["epochs"], DEMO["seed"]

    p = subparsers.add_parser(
        "demo",
        parents=[runtime_options()],
        help="make a small backdoored model from bundled data, audit and purify it",
        description="Offline end-to-end demo: trains a small model with a BadNets backdoor on "
        "bundled MNIST digits, audits it, purifies it and writes reports and cards next to it.",
    )
    p.add_argument(
        "--arch",
        choices=sorted(ZOO_ARCHS),
        default=arch,
        help=f"model to backdoor (default {arch}; transformers-resnet for transformers)",
    )
    p.add_argument(
        "--out",
        default="hub-backdoor-demo",
        metavar="DIR",
        help="output folder (default hub-backdoor-demo; rebuilt on every run)",
    )
    p.add_argument(
        "--epochs",
        type=positive_int,
        default=epochs,
        help=f"training epochs of the backdoored model (default {epochs})",
    )
    p.add_argument("--purify-epochs", type=positive_int, default=None,
                   help="fine-tuning epochs (default: as purify's --epochs)")
    p.add_argument(
        "--seed", type=int, default=seed, help=f"data and training seed (default {seed})"
    )
    p.set_defaults(func=run, threads_default=1)
    return p


def run(args: argparse.Namespace, ui: UI) -> int:
    """Run the demo into ``--out``; 0 when the planted backdoor was found and purified, 1 when missed."""
    from ..demo import run_demo

    return run_demo(
        args.out,
        arch=args.arch,
        epochs=args.epochs,
        seed=args.seed,
        purify_epochs=args.purify_epochs,
        quiet=ui.quiet,
    )
