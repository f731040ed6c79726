"""Exceptions raised by hub_backdoor.

Every error a user can cause derives from :class:`HubBackdoorError`; its message is one line that
names the problem and, where there is one, what to do next. Each class carries the exit code the CLI
returns for it (:attr:`HubBackdoorError.exit_code`: 2, bad input, for most; 5 for a Hub or network
failure that may pass on a retry); anything else is an internal error (exit code 3). :class:`ExitCode`
is the one table of codes; Hub errors (:class:`HubError`) also carry ``status``, ``repo_id`` and
``transient``, and chain the huggingface_hub exception they come from (``__cause__``).
"""

from __future__ import annotations

from enum import IntEnum

__all__ = [
    "AccuracyBudgetError",
    "ChannelMismatchError",
    "ColumnError",
    "CorruptWeightsError",
    "DatasetError",
    "EmptyDatasetError",
    "EXIT_MEANINGS",
    "ExitCode",
    "HubBackdoorError",
    "HubError",
    "HubUnavailableError",
    "InfeasibleError",
    "LabelRangeError",
    "NonFiniteLogitsError",
    "NonLinearHeadError",
    "OneClassDatasetError",
    "OptionError",
    "OutputPathError",
    "RepoNotFoundError",
    "ReportError",
    "RevisionNotFoundError",
    "SolverError",
    "UnsafeWeightsError",
    "UnsupportedModelError",
    "VERDICT_EXIT",
    "exit_codes_text",
]


class ExitCode(IntEnum):
    """The exit codes of the ``hub-backdoor`` commands (docs/cli.md, "Exit codes")."""

    OK = 0  # audit: no backdoor found; purify / card / demo: done
    BACKDOOR = 1  # audit: backdoor found; purify: nothing flagged, nothing purified
    USAGE = 2  # bad input or usage: the message says what to fix
    INTERNAL = 3  # a bug
    INCONCLUSIVE = 4  # no verdict: the data cannot support one, or the model is outside the calibration
    TRANSIENT = 5  # the Hub or the network failed in a way a retry may fix (5xx, 429, no connection)
    ACCURACY_BUDGET = 6  # purify: the purified model lost more clean accuracy than allowed; nothing published
    INTERRUPTED = 130  # Ctrl-C or SIGTERM (128 + SIGINT, the shell's convention)


#: What each exit code means, in the words ``--help`` prints (docs/cli.md has the table per command).
EXIT_MEANINGS: dict[ExitCode, str] = {
    ExitCode.OK: "no backdoor found / done",
    ExitCode.BACKDOOR: "backdoor found (audit; purify: nothing flagged)",
    ExitCode.USAGE: "bad input or usage",
    ExitCode.INTERNAL: "internal error",
    ExitCode.INCONCLUSIVE: "inconclusive (reference data unusable, or outside the calibration)",
    ExitCode.TRANSIENT: "Hub or network failure (retry)",
    ExitCode.ACCURACY_BUDGET: "purify: over the accuracy budget, nothing published",
    ExitCode.INTERRUPTED: "interrupted",
}


def exit_codes_text() -> str:
    """``0 ..., 1 ..., ...``: every exit code and its meaning on one line."""
    return ", ".join(f"{int(code)} {text}" for code, text in EXIT_MEANINGS.items())


class HubBackdoorError(Exception):
    """Base class: a problem with the input (model, data or options), not a bug."""

    exit_code: ExitCode = ExitCode.USAGE


class UnsupportedModelError(HubBackdoorError):
    """The model has no linear head that reproduces its logits, or its architecture is unknown."""


class NonLinearHeadError(UnsupportedModelError):
    """The classifier head is not affine in the penultimate embedding (e.g. an MLP head)."""


class InfeasibleError(HubBackdoorError):
    """Theorem 1 fails: C - 1 >= d or V_k is rank deficient, so no universal perturbation exists."""


class SolverError(HubBackdoorError):
    """A QP solver did not reach an optimal solution within tolerance."""


class DatasetError(HubBackdoorError):
    """The reference data cannot be used (empty, unlabelled, ambiguous columns, ...)."""


class EmptyDatasetError(DatasetError):
    """The reference data has no samples."""


class OneClassDatasetError(DatasetError):
    """All reference samples carry the same label; no class change can be measured."""


class ColumnError(DatasetError):
    """An image or label column is missing or ambiguous."""


class LabelRangeError(DatasetError):
    """A label lies outside [0, C)."""


class ChannelMismatchError(DatasetError):
    """The images have a different number of channels than the model expects."""


class NonFiniteLogitsError(HubBackdoorError):
    """The model produced NaN or infinite logits on the reference data."""


class UnsafeWeightsError(HubBackdoorError):
    """Weights are only available in a pickle-based format and pickle loading was not allowed."""


class ReportError(HubBackdoorError):
    """A saved report cannot be read (wrong schema version, missing fields)."""


class HubError(HubBackdoorError):
    """A Hub request failed. ``status`` is the HTTP status (``None``: no answer), ``repo_id`` the repo
    asked for; ``transient`` says whether the same request may succeed later (exit code 5 then)."""

    def __init__(
        self, message: str, *, status: int | None = None, repo_id: str | None = None, transient: bool = False
    ) -> None:
        super().__init__(message)
        self.status = status
        self.repo_id = repo_id
        self.transient = transient
        if transient:  # an instance attribute: the same class covers a 4xx and a 5xx answer
            self.exit_code = ExitCode.TRANSIENT


class HubUnavailableError(HubError):
    """The Hub could not be reached or answered 5xx, 408, 409, 412, 425 or 429: try again later."""

    def __init__(self, message: str, *, status: int | None = None, repo_id: str | None = None) -> None:
        super().__init__(message, status=status, repo_id=repo_id, transient=True)


class RepoNotFoundError(HubError):
    """The Hub repo does not exist, or is private/gated and the token gives no access."""


class RevisionNotFoundError(HubError):
    """The repo exists but the branch, tag, pull request ref or commit sha does not."""


class CorruptWeightsError(HubBackdoorError):
    """A weights file is damaged or is not what its name says (e.g. a truncated .safetensors file)."""


class OptionError(HubBackdoorError):
    """An option is out of range or not a finite number (threshold, soft margin, lr, seed, device, ...)."""


class OutputPathError(HubBackdoorError):
    """An output path cannot be written, is a directory, or would overwrite an input."""


class AccuracyBudgetError(HubBackdoorError):
    """A purified model lost more held-out clean accuracy than the caller allowed; nothing was
    published (a model that silently lost accuracy is worse than none)."""

    exit_code = ExitCode.ACCURACY_BUDGET


#: The exit code of each verdict (docs/cli.md).
VERDICT_EXIT = {"clean": ExitCode.OK, "backdoor": ExitCode.BACKDOOR, "inconclusive": ExitCode.INCONCLUSIVE}
