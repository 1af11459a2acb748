"""Neural-collapse and representation metrics: pure tensor maths, no models.

The one-shot metrics live in ``collapse``, the streaming NC1 in ``stream``, the transfer metrics
of the seed papers (R@1, NMI, discriminative ratio, redundancy) in ``transfer``, the
``evaluate``-loadable metric modules in ``modules``; ``_core`` and ``_labels`` hold their shared,
private internals (feature and label checks, float64 chunked passes, class statistics).
"""

from ncfinetune.metrics.collapse import (
    cdnv,
    class_separation_r2,
    linear_cka,
    nc1,
    nc1_or_none,
    numerical_rank,
)
from ncfinetune.metrics.stream import NC1Accumulator
from ncfinetune.metrics.transfer import (
    discriminative_ratio,
    feature_redundancy,
    nmi,
    recall_at_1,
)

__all__ = [
    "NC1Accumulator",
    "cdnv",
    "class_separation_r2",
    "discriminative_ratio",
    "feature_redundancy",
    "linear_cka",
    "nc1",
    "nc1_or_none",
    "nmi",
    "numerical_rank",
    "recall_at_1",
]
