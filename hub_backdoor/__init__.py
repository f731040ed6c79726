"""hub_backdoor: find and remove backdoors in image classifiers from the Hugging Face Hub.

Public API::

    from hub_backdoor import audit, purify, load_classifier

    report = audit("org/model", dataset)          # AuditReport
    result = purify("org/model", dataset, report=report)  # PurifyResult

The names load on first use, so that ``hub-backdoor --version`` and ``--help`` do not pay for
importing torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from .errors import HubBackdoorError

if TYPE_CHECKING:
    from .adapters import Classifier, load_classifier
    from .detection.audit import audit
    from .detection.report import AuditReport
    from .outputs.publish import load_guarded
    from .purification.guard import GuardedModel
    from .purification.purify import PurifyResult, purify

__version__ = "0.1.0"

__all__ = [
    "AuditReport",
    "Classifier",
    "GuardedModel",
    "HubBackdoorError",
    "PurifyResult",
    "audit",
    "load_classifier",
    "load_guarded",
    "purify",
]

#: public name -> the module that defines it
_LAZY = {
    "AuditReport": ".detection.report",
    "Classifier": ".adapters",
    "GuardedModel": ".purification.guard",
    "PurifyResult": ".purification.purify",
    "audit": ".detection.audit",
    "load_classifier": ".adapters",
    "load_guarded": ".outputs.publish",
    "purify": ".purification.purify",
}


def __getattr__(name: str) -> Any:
    if name not in _LAZY:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(_LAZY[name], __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
