"""Backdoor metrics as ``evaluate`` modules, shipped inside the package and loaded by path (offline).

- ``attack_success_rate``: share of triggered non-target images predicted as the target (ASR).
- ``robust_accuracy``: share of triggered non-target images still predicted as their true label (RA).
- ``defense_effectiveness_rating``: BackdoorBench's DER from ASR and clean accuracy before / after.

``load(name)`` is ``evaluate.load`` on the module file in the installed package, so no Hub lookup is
made; ``hub_backdoor.purification.purify`` computes its held-out ASR and RA with the first two.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

__all__ = ["METRICS", "load", "module_path"]

#: The metric modules of the package, by name.
METRICS = ("attack_success_rate", "robust_accuracy", "defense_effectiveness_rating")


def module_path(name: str) -> Path:
    """The ``.py`` file of metric ``name`` (one of :data:`METRICS`) inside the installed package."""
    if name not in METRICS:
        raise ValueError(f"unknown metric {name!r}; choose one of {', '.join(METRICS)}")
    return Path(__file__).resolve().parent / name / f"{name}.py"


def load(name: str, **kwargs: Any) -> Any:
    """``evaluate.load`` of metric ``name`` by its file path (an ``evaluate.EvaluationModule``);
    ``kwargs`` go to ``evaluate.load`` (e.g. ``experiment_id``, ``keep_in_memory``)."""
    import evaluate

    # a path to an existing .py file: evaluate loads it as a local module, with no Hub request
    return evaluate.load(str(module_path(name)), **kwargs)
