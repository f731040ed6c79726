"""Robust accuracy (RA) under a backdoor trigger, as an ``evaluate`` metric.

Load it offline by path: ``hub_backdoor.purification.metrics.load("robust_accuracy")``.
"""

from __future__ import annotations

from typing import Any

import datasets
import evaluate
import numpy as np

__all__ = ["RobustAccuracy"]

_DESCRIPTION = """\
Robust accuracy under a backdoor trigger: the share of triggered images whose true label is not the
target class that the model still classifies as their true label. Images of the target class are left
out, as for the attack success rate. 0.0 when no reference is outside the target.
"""

_KWARGS_DESCRIPTION = """\
Args:
    predictions (list of int): predicted labels of the triggered images.
    references (list of int): true labels of the same images (before the trigger).
    target (int): the backdoor's target class.
Returns:
    robust_accuracy (float): in [0, 1].
Example:
    >>> ra = hub_backdoor.purification.metrics.load("robust_accuracy")
    >>> ra.compute(predictions=[3, 3, 1, 3], references=[0, 1, 1, 3], target=3)
    {'robust_accuracy': 0.3333333333333333}
"""

_CITATION = """\
@inproceedings{wu2022backdoorbench,
  title={BackdoorBench: A Comprehensive Benchmark of Backdoor Learning},
  author={Wu, Baoyuan and Chen, Hongrui and Zhang, Mingda and Zhu, Zihao and Wei, Shaokui and
          Yuan, Danni and Shen, Chao},
  booktitle={Advances in Neural Information Processing Systems (Datasets and Benchmarks)},
  year={2022}
}
"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class RobustAccuracy(evaluate.Metric):
    """Share of non-target references predicted as their true label."""

    def _info(self) -> evaluate.MetricInfo:
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features(
                {"predictions": datasets.Value("int64"), "references": datasets.Value("int64")}
            ),
        )

    def _compute(self, predictions: Any, references: Any, target: int) -> dict[str, float]:
        p, y = np.asarray(predictions, dtype=np.int64), np.asarray(references, dtype=np.int64)
        keep = y != int(target)
        right, count = int(np.sum(p[keep] == y[keep])), int(np.sum(keep))
        return {"robust_accuracy": right / max(count, 1)}
