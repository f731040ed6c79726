"""Names of the files hub-backdoor writes beside a model's weights (docs/formats.md), in one light
module that the command line reads without importing torch."""

__all__ = ["AUDIT_FILE", "PURIFICATION_FILE"]

#: The audit a purified copy was purified against.
AUDIT_FILE = "backdoor_audit.json"
#: The purification record a purified copy ships with; fetched with the weights so that a guarded
#: model can be built from the repo alone.
PURIFICATION_FILE = "backdoor_purification.json"
