"""Streaming NC1 (and CDNV) over batches, in one pass, mergeable across processes.

Why one pass with a d x d matrix: the pinv directions U of Sigma_B depend on the class means,
which are only known after the last batch. The O(N d K) one-shot form of
:func:`ncfinetune.metrics.nc1` projects the centred features onto U, so a streaming version of
it would have to read the data twice. Instead we keep the pooled within-class scatter S_W
(d x d, float64) and project it onto U once at the end: trace(Sigma_W pinv(Sigma_B)) needs only
U^T S_W U. Memory: 8 d**2 + 8 K (d + 2) bytes (d = 2048: 32 MiB; d = 768: 4.5 MiB), independent
of N. Time: O(B d**2) per batch of B rows.

Numerics: S_W is merged with Chan et al.'s parallel update (the batch's scatter around its own
class means plus n_a n_b / (n_a + n_b) * delta_k delta_k^T per class), never as
E[h h^T] - mu mu^T, so near-collapsed features (within-class spread 1e-5 of the mean norm)
keep full float64 accuracy.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from ncfinetune.errors import MetricInputError
from ncfinetune.metrics_core import (
    between_directions,
    cdnv_from_stats,
    check_features,
    check_range,
    class_means,
    label_ids,
)

__all__ = ["NC1Accumulator"]


class NC1Accumulator:
    """Accumulates NC1 (and CDNV) batch by batch; ``compute()`` equals ``nc1`` on all the data.

    Example::

        acc = NC1Accumulator(num_classes=10, dim=512)
        for feats, labels in batches:
            acc.update(feats, labels)
        value = acc.compute()

    Under ``torch.distributed``, give each process its own accumulator, gather them (e.g. with
    ``torch.distributed.all_gather_object``) and ``merge`` them into one; the result does not
    depend on how the data was split.

    Args:
        num_classes: K; labels must be ints in [0, K) and every class needs a sample by
            ``compute()``.
        dim: d, the feature dimension every batch must have.
        device: where the statistics live and are computed (default CPU); batches are moved
            there.
    """

    def __init__(self, num_classes: int, dim: int, device: torch.device | str | None = None):
        for name, value, least in (("num_classes", num_classes, 2), ("dim", dim, 1)):
            if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < least:
                raise MetricInputError(
                    f"{name} must be an int >= {least}, got {value!r}. Pass the number of "
                    f"{'classes' if name == 'num_classes' else 'feature dimensions'}."
                )
        self.num_classes = int(num_classes)
        self.dim = int(dim)
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        f64 = {"dtype": torch.float64, "device": self.device}
        self.counts = torch.zeros(num_classes, dtype=torch.int64, device=self.device)
        self.means = torch.zeros(num_classes, dim, **f64)
        # Per-class sum of squared distances to the class mean (the trace of each class's
        # scatter), needed only for CDNV: K floats.
        self.sq_dev = torch.zeros(num_classes, **f64)
        self.scatter = torch.zeros(dim, dim, **f64)  # pooled within-class scatter S_W

    @property
    def num_samples(self) -> int:
        """N, the number of rows seen so far."""
        return int(self.counts.sum())

    def update(self, features: Any, labels: Any) -> NC1Accumulator:
        """Add one batch: features B x d (torch or NumPy), labels B ints in [0, K). Returns self."""
        h = check_features(features)
        if h.shape[1] != self.dim:
            raise MetricInputError(
                f"this accumulator was built for dim={self.dim} but the batch has "
                f"d = {h.shape[1]}. Pass features of the same layer, or build another one."
            )
        h = h.to(self.device)
        # Range check only: a batch need not contain every class (compute() checks that).
        y = label_ids(labels, h.shape[0], self.device)
        check_range(y, self.num_classes)
        if h.shape[0] == 0:
            return self
        counts = torch.bincount(y, minlength=self.num_classes)
        means, _ = class_means(h, y, self.num_classes, counts.clamp_min(1))  # raises on NaN/inf
        dev = h.to(torch.float64) - means[y]
        sq_dev = torch.zeros_like(self.sq_dev).index_add_(0, y, dev.square().sum(1))
        self._merge_stats(counts, means, sq_dev, dev.T @ dev)
        return self

    def merge(self, other: NC1Accumulator) -> NC1Accumulator:
        """Fold another accumulator (same K and d, e.g. from another process) into this one."""
        if not isinstance(other, NC1Accumulator):
            raise MetricInputError(f"merge expects an NC1Accumulator, got {type(other).__name__}.")
        if (other.num_classes, other.dim) != (self.num_classes, self.dim):
            raise MetricInputError(
                f"cannot merge an accumulator with num_classes={other.num_classes}, "
                f"dim={other.dim} into one with num_classes={self.num_classes}, dim={self.dim}. "
                "Merge only accumulators of the same layer and label set."
            )
        self._merge_stats(
            other.counts.to(self.device),
            other.means.to(self.device),
            other.sq_dev.to(self.device),
            other.scatter.to(self.device),
        )
        return self

    def _merge_stats(
        self, nb: torch.Tensor, mb: torch.Tensor, sqb: torch.Tensor, scatter_b: torch.Tensor
    ) -> None:
        # Chan, Golub & LeVeque parallel update, per class, for the mean and the scatter.
        na = self.counts.to(torch.float64)
        nbf = nb.to(torch.float64)
        total = na + nbf
        safe = total.clamp_min(1.0)
        delta = mb - self.means  # rows of classes absent from either side get weight 0 below
        weight = na * nbf / safe
        self.scatter += scatter_b + (delta.T * weight) @ delta
        self.sq_dev += sqb + weight * delta.square().sum(1)
        self.means += delta * (nbf / safe)[:, None]
        self.counts += nb

    def _check_ready(self) -> None:
        empty = torch.nonzero(self.counts == 0).flatten().tolist()
        if empty:
            shown = ", ".join(map(str, empty[:10])) + (" ..." if len(empty) > 10 else "")
            raise MetricInputError(
                f"{len(empty)} of num_classes={self.num_classes} classes have no sample yet "
                f"(class {shown}; N = {self.num_samples}). Every class needs at least one "
                "example: update with more data or build the accumulator with fewer classes."
            )

    def compute(self) -> float:
        """NC1 = (1/K) trace(Sigma_W pinv(Sigma_B)) of everything seen (see ``nc1``)."""
        self._check_ready()
        u, s = between_directions(self.means)
        projected = ((self.scatter @ u) * u).sum(0)  # diag(U^T S_W U), O(d^2 r)
        return float((projected / s.square()).sum() / self.num_samples)

    def cdnv(self) -> float:
        """CDNV of everything seen (see ``ncfinetune.metrics.cdnv``)."""
        self._check_ready()
        return cdnv_from_stats(self.means, self.sq_dev / self.counts.to(torch.float64))
