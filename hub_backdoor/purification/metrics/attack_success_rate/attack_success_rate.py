"""Attack success rate (ASR) of a backdoor, as an ``evaluate`` metric.

Load it offline by path: ``hub_backdoor.purification.metrics.load("attack_success_rate")``.
"""

from __future__ import annotations

from typing import Any

import datasets
import evaluate
import numpy as np

__all__ = ["AttackSuccessRate"]

_DESCRIPTION = """\
Attack success rate of a backdoor: the share of triggered images whose true label is not the target
class that the model classifies as the target. Images of the target class are left out, since
predicting the target there is no success of the attack. 0.0 when no reference is outside the target.
"""

_KWARGS_DESCRIPTION = """\
Args:
    predictions (list of int): predicted labels of the triggered images.
    references (list of int): true labels of the same images (before the trigger).
    target (int): the backdoor's target class.
Returns:
    attack_success_rate (float): in [0, 1].
Example:
    >>> asr = hub_backdoor.purification.metrics.load("attack_success_rate")
    >>> asr.compute(predictions=[3, 3, 1, 3], references=[0, 1, 1, 3], target=3)
    {'attack_success_rate': 0.6666666666666666}
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
class AttackSuccessRate(evaluate.Metric):
    """Share of non-target references predicted as the target."""

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
        # integer counts, then one division: the same float as hits / count computed by hand
        hits, count = int(np.sum(p[keep] == int(target))), int(np.sum(keep))
        return {"attack_success_rate": hits / max(count, 1)}
