"""Names of the files hub-backdoor writes beside a model's weights (docs/formats.md), in one light
module that the command line reads without importing torch."""

import os
from pathlib import Path

__all__ = ["AUDIT_FILE", "PURIFICATION_FILE", "chart_path_for"]

#: The audit a purified copy was purified against.
AUDIT_FILE = "backdoor_audit.json"
#: The purification record a purified copy ships with; fetched with the weights so that a guarded
#: model can be built from the repo alone.
PURIFICATION_FILE = "backdoor_purification.json"


def chart_path_for(card_path: str | os.PathLike) -> Path:
    """Where the chart of a card goes: next to it, same name, ``.png``."""
    return Path(card_path).with_suffix(".png")
