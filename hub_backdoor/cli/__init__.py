"""The ``hub-backdoor`` command line: ``audit``, ``purify``, ``card`` and ``demo``.

One module per command (:mod:`.audit`, :mod:`.purify`, :mod:`.card`, :mod:`.demo`), each with
``register(subparsers)`` and ``run(args, ui)`` calling the library; shared option groups are in
:mod:`.options`, shared steps in :mod:`.common`, output in :mod:`.ui`; :func:`main` is in :mod:`.app`.

Exit codes: :class:`hub_backdoor.errors.ExitCode` and ``EXIT_MEANINGS``; per command in docs/cli.md.
"""

from __future__ import annotations

from .app import build_parser, main
from .ui import UI, print_table

__all__ = [
    "UI",
    "build_parser",
    "main",
    "print_table",
]
