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
import sys
import types
from typing import TYPE_CHECKING, Any

from .errors import HubBackdoorError

if TYPE_CHECKING:
    from .adapters import Classifier, load_classifier
    from .audit import audit
    from .guard import GuardedModel
    from .publish import load_guarded
    from .purification import PurifyResult, purify
    from .report import AuditReport

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
    "AuditReport": ".report",
    "Classifier": ".adapters",
    "GuardedModel": ".guard",
    "PurifyResult": ".purification",
    "audit": ".audit",
    "load_classifier": ".adapters",
    "load_guarded": ".publish",
    "purify": ".purification",
}


def __getattr__(name: str) -> Any:
    if name not in _LAZY:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(_LAZY[name], __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))


class _Package(types.ModuleType):
    """The package module. Importing the submodule ``hub_backdoor.audit`` binds it to the package's
    attribute ``audit``, which names the function; that binding is skipped so the function stays."""

    def __setattr__(self, name: str, value: Any) -> None:
        if isinstance(value, types.ModuleType) and _LAZY.get(name) == f".{name}":
            return
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package
