"""Exceptions raised by ncfinetune.

Every message says what was received, what is valid, and how to fix it.
"""

from __future__ import annotations


class NcFinetuneError(Exception):
    """Base class of every error ncfinetune raises on purpose."""


class UnsupportedModelError(NcFinetuneError, TypeError):
    """The model is not of a family ncfinetune knows how to split into blocks."""


class BlockError(NcFinetuneError, ValueError):
    """A block index or name does not address a block of the model."""


class ConfigError(NcFinetuneError, ValueError):
    """A configuration value is invalid (one message may list several problems)."""


class CheckpointError(NcFinetuneError, ValueError):
    """A tuned checkpoint cannot be written, read or applied to the given base model."""


class MetricInputError(NcFinetuneError, ValueError):
    """Features or labels given to a metric are invalid (shape, classes, non-finite values)."""


class DataError(NcFinetuneError, ValueError):
    """A dataset spec, split or subset request cannot be satisfied."""


class TrainingDiverged(NcFinetuneError, FloatingPointError):
    """The training loss became NaN or infinite: the lr is too high for this model and data.

    Attributes:
        step: the optimizer step (1-based, counted over the whole run) whose loss was first
            non-finite.
        lr: the learning rate that step trained with.
    """

    def __init__(self, message: str, *, step: int, lr: float):
        super().__init__(message)
        self.step, self.lr = step, lr


class NonFiniteOutputs(NcFinetuneError, FloatingPointError):
    """A model's logits were NaN or infinite (finite weights can still overflow): its weights
    diverged in training, or its inputs are broken.

    Attributes:
        rows: how many of the evaluated rows had a non-finite logit.
        total: how many rows were evaluated.
    """

    def __init__(self, message: str, *, rows: int, total: int):
        super().__init__(message)
        self.rows, self.total = rows, total
