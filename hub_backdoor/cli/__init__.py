"""The ``hub-backdoor`` command line: ``audit``, ``purify``, ``card`` and ``demo``.

One module per command (:mod:`.audit`, :mod:`.purify`, :mod:`.card`, :mod:`.demo`), each with
``register(subparsers)`` and ``run(args, ui)`` calling the library; shared option groups are in
:mod:`.options`, shared steps in :mod:`.common`, output in :mod:`.ui`; :func:`main` is in :mod:`.app`.

Exit codes (docs/cli.md, :class:`hub_backdoor.errors.ExitCode`):

  0  audit: no backdoor found; purify / card / demo: done
  1  audit: backdoor found; purify: no backdoor found, nothing purified; demo: the planted backdoor
     was missed
  2  bad input or usage (unknown repo or revision, unusable data or model, bad options)
  3  internal error (a bug; rerun with ``--debug`` for the traceback)
  4  audit / purify: inconclusive, the reference data cannot support a verdict (the model's accuracy
     on it is below the floor, or classes lack images), or nothing stood out on a model outside the
     calibration (another class count); the message says which
  5  the Hub or the network failed in a way that may pass on a retry (HTTP 5xx or 429, no connection)
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
