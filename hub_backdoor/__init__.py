"""hub_backdoor: find and remove backdoors in image classifiers from the Hugging Face Hub.

Public API::

    from hub_backdoor import audit, purify, load_classifier

    report = audit("org/model", dataset)          # AuditReport
    result = purify("org/model", dataset, report=report)  # PurifyResult
"""

from .adapters import Classifier, load_classifier
from .audit import audit
from .errors import HubBackdoorError
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
