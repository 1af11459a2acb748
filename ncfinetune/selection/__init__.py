"""Choices made on the downstream training data, never its test split: which block to tune
and at which learning rate, measured leave one target out (``benchmarks/selection_loto.py``).

``rules`` (the rules and their measured defaults), ``probe`` (the measurements), ``report``
(the table, JSON and plot), ``block`` (:func:`select_block`), ``lr`` (:func:`select_lr`), ``method``
(:func:`select_method`: which method, block and lr).
"""

from ncfinetune.selection.block import default_candidates, select_block, select_block_on_split
from ncfinetune.selection.lr import select_lr, select_lr_on_split
from ncfinetune.selection.method import (
    METHOD_CANDIDATES,
    METHOD_MARGIN,
    MethodCandidate,
    MethodPlan,
    choose_method,
    select_method,
    select_method_on_split,
)
from ncfinetune.selection.probe import linear_probe_accuracy, mlp_gap, transfer_scores
from ncfinetune.selection.report import BlockSelection, CandidateRow, LRSelection
from ncfinetune.selection.rules import (
    DEFAULT_RULE,
    HELDOUT_FRACTION,
    LR_GRID,
    MAX_CANDIDATES,
    MAX_TRAINABLE_PERCENT,
    PROBE_BATCH,
    PROBE_LR,
    PROBE_RULES,
    PROBE_STEPS,
    RULES,
    choose,
    choose_lr,
    min_per_class,
)

__all__ = [
    "DEFAULT_RULE",
    "HELDOUT_FRACTION",
    "LR_GRID",
    "METHOD_CANDIDATES",
    "METHOD_MARGIN",
    "MAX_CANDIDATES",
    "MAX_TRAINABLE_PERCENT",
    "PROBE_BATCH",
    "PROBE_LR",
    "PROBE_RULES",
    "PROBE_STEPS",
    "RULES",
    "BlockSelection",
    "CandidateRow",
    "LRSelection",
    "MethodCandidate",
    "MethodPlan",
    "choose",
    "choose_lr",
    "choose_method",
    "default_candidates",
    "linear_probe_accuracy",
    "mlp_gap",
    "transfer_scores",
    "min_per_class",
    "select_block",
    "select_block_on_split",
    "select_lr",
    "select_lr_on_split",
    "select_method",
    "select_method_on_split",
]
