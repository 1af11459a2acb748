"""Top-1 accuracy as an offline ``evaluate`` metric.

The Hub's ``accuracy`` needs a network download on first use; this one ships with ncfinetune,
so recipes can call ``ncfinetune.metrics.modules.load_metric("accuracy")`` offline. Inputs are
integer class ids; ``compute()`` returns ``{"accuracy": fraction of predictions equal to their
reference}``, a float in [0, 1]. Both columns are plain ``int64`` values, so evaluate hands
them to ``_compute`` as NumPy arrays (format "numpy") without a per-element Python conversion.
"""

from __future__ import annotations

import datasets
import evaluate
import numpy as np

_DESCRIPTION = "Top-1 accuracy: the fraction of predictions equal to their reference class id."
_KWARGS_DESCRIPTION = """
Args:
    predictions: predicted class ids, one int per example.
    references: true class ids, one int per example.
Returns:
    accuracy: fraction of correct predictions, in [0, 1].
"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class Accuracy(evaluate.Metric):
    def _info(self) -> evaluate.MetricInfo:
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation="",
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features(
                {"predictions": datasets.Value("int64"), "references": datasets.Value("int64")}
            ),
            format="numpy",
        )

    def _compute(self, predictions: np.ndarray, references: np.ndarray) -> dict[str, float]:
        if len(predictions) == 0:
            raise ValueError("accuracy of zero examples is undefined; add at least one batch.")
        return {"accuracy": float(np.mean(np.asarray(predictions) == np.asarray(references)))}
