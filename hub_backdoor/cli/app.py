"""The ``hub-backdoor`` parser and :func:`main`: parse, configure logging and threads, run one command,
and map what it raised to an exit code (:class:`~hub_backdoor.errors.ExitCode`)."""

from __future__ import annotations

import argparse
import errno
import logging
import signal
import sys
import traceback
import warnings
from typing import Any

from .. import __version__
from ..config import command_defaults, read_config
from ..errors import ExitCode, HubBackdoorError, exit_codes_text
from . import audit, card, demo, purify
from .options import Parser
from .ui import UI, one_line

__all__ = ["COMMANDS", "build_parser", "main", "parse_args"]

#: OS errors that come from where the user asked to write, not from a bug (exit 2).
_USER_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.ENAMETOOLONG, errno.EROFS, errno.EACCES,
                          errno.EPERM, errno.EBUSY})

#: The command modules, in the order ``--help`` lists them; each has ``register`` and ``run``.
COMMANDS = (audit, purify, card, demo)


def build_parser(prog: str = "hub-backdoor") -> argparse.ArgumentParser:
    """The ``hub-backdoor`` parser with every command of :data:`COMMANDS` (``prog``: the name usage
    lines show, e.g. ``hf backdoor`` when run as the ``hf`` extension)."""
    parser = Parser(
        prog=prog,
        description="Find and remove backdoors in Hugging Face Hub image classifiers.",
        epilog=f"exit codes: {exit_codes_text()}",
    )
    parser.add_argument("--version", action="version", version=f"hub-backdoor {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=Parser)
    for command in COMMANDS:
        command.register(sub)
    return parser


def parse_args(parser: argparse.ArgumentParser, argv: list[str] | None) -> argparse.Namespace:
    """``argv`` parsed by ``parser``; with ``--config FILE``, parsed again with the file's
    ``[tool.hub-backdoor]`` values as the command's defaults, so that the flags given win. A bad file
    is a :class:`~hub_backdoor.errors.HubBackdoorError` (exit 2)."""
    args = parser.parse_args(argv)
    if getattr(args, "config", None) is None:
        return args
    defaults = command_defaults(read_config(args.config), purify=args.command == "purify")
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    sub.choices[args.command].set_defaults(**defaults)
    return parser.parse_args(argv)


def _set_progress_bars(enabled: bool) -> None:
    """Progress bars of huggingface_hub, datasets and transformers on or off."""
    from huggingface_hub.utils import disable_progress_bars, enable_progress_bars

    (enable_progress_bars if enabled else disable_progress_bars)()
    try:
        import datasets

        (datasets.enable_progress_bars if enabled else datasets.disable_progress_bars)()
    except ImportError:  # pragma: no cover
        pass
    try:
        import transformers

        transformers.logging.set_verbosity_error()
        tl = transformers.utils.logging
        (tl.enable_progress_bar if enabled else tl.disable_progress_bar)()
    except ImportError:  # pragma: no cover
        pass


def _configure(args: argparse.Namespace) -> None:
    import torch

    threads = args.threads or getattr(args, "threads_default", None)
    if threads:
        torch.set_num_threads(threads)
    for name in ("timm", "transformers", "datasets", "huggingface_hub"):
        logging.getLogger(name).setLevel(logging.WARNING if args.debug else logging.ERROR)
    # float(loss) on a tensor that requires grad: harmless, and not the user's business
    warnings.filterwarnings("ignore", message="Converting a tensor with requires_grad=True")
    if args.quiet:
        warnings.simplefilter("ignore")
    _set_progress_bars(not args.quiet)


def main(argv: list[str] | None = None, *, prog: str = "hub-backdoor") -> int:
    """Run the CLI; returns the exit code (docs/cli.md, :class:`~hub_backdoor.errors.ExitCode`)."""
    parser = build_parser(prog)
    try:
        args = parse_args(parser, argv)
    except SystemExit as e:  # --help / --version (0) or a usage error (2)
        return e.code if isinstance(e.code, int) else (0 if e.code is None else int(ExitCode.USAGE))
    except HubBackdoorError as e:  # an unreadable --config file
        UI(quiet=False).error(one_line(str(e)))
        return int(e.exit_code)
    if args.command is None:
        parser.print_help(sys.stderr)
        return int(ExitCode.USAGE)
    ui = UI(quiet=args.quiet)
    previous = _on_sigterm_interrupt()
    try:
        _configure(args)
        return int(args.func(args, ui))
    except HubBackdoorError as e:
        if args.debug:
            traceback.print_exc()
        ui.error(one_line(str(e)))
        return int(e.exit_code)
    except KeyboardInterrupt:
        ui.error("interrupted")
        return int(ExitCode.INTERRUPTED)
    except Exception as e:
        if isinstance(e, OSError) and e.errno in _USER_ERRNOS:
            # a full disk, a read-only place, a name too long: the place's fault, not a bug
            where = f": {e.filename}" if e.filename else ""
            ui.error(f"{e.strerror or e}{where}; free space, fix the permissions or choose another path")
            return int(ExitCode.USAGE)
        if args.debug:
            traceback.print_exc()
        ui.error(
            f"internal error: {type(e).__name__}: {one_line(str(e))[:300]} "
            "(rerun with --debug for the traceback, and please report it)"
        )
        return int(ExitCode.INTERNAL)
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def _interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt


def _on_sigterm_interrupt() -> Any:
    """SIGTERM (``kill``, CI cancellation) unwinds like Ctrl-C, so temporary folders are removed.

    Returns the previous handler, or None where none can be set (not the main thread)."""
    try:
        return signal.signal(signal.SIGTERM, _interrupt)
    except ValueError:  # signals can only be set from the main thread
        return None
