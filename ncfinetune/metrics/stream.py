"""Streaming NC1 (and CDNV, discriminative ratio) over batches, in one pass, mergeable across processes.

Why one pass with a d x d matrix: the pinv directions U of Sigma_B depend on the class means,
which are only known after the last batch. The O(N d K) one-shot form of
:func:`ncfinetune.metrics.collapse.nc1` projects the centred features onto U, so a streaming version of
it would have to read the data twice. Instead we keep the pooled within-class scatter S_W
(d x d, float64) and project it onto U once at the end: trace(Sigma_W pinv(Sigma_B)) needs only
U^T S_W U. Memory: 8 d**2 + 8 K (d + 2) bytes (d = 2048: 32 MiB; d = 768: 4.5 MiB), independent
of N. Time: O(B d**2) per batch of B rows.

Numerics: S_W is merged with Chan et al.'s parallel update (the batch's scatter around its own
class means plus n_a n_b / (n_a + n_b) * delta_k delta_k^T per class), never as
E[h h^T] - mu mu^T, so near-collapsed features (within-class spread 1e-5 of the mean norm)
keep full float64 accuracy.

Scale: the statistics are stored in units of a running power of two 2**e (means / 2**e,
scatters / 4**e), with e the exponent of the largest magnitude seen so far (e only grows once
data arrived; older statistics are rescaled exactly when it does). So every stored value is
O(1) x counts and nothing overflows or underflows at any float64 magnitude (1e-200 or 1e200
features give the same NC1 as at scale 1, as the one-shot :func:`~ncfinetune.metrics.collapse.nc1`
does). The attributes ``means``, ``sq_dev`` and ``scatter`` read and set natural units (as
before); reading them may overflow to inf for features beyond ~1e150, which ``compute()``
then reports as an error if they are set back.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from ncfinetune.errors import MetricInputError
from ncfinetune.metrics._core import (
    between_directions,
    cdnv_from_stats,
    check_features,
    class_means,
    discriminative_ratio_from_stats,
    ldexp,
    max_abs,
    scale_exponent,
)
from ncfinetune.metrics._labels import check_range, label_ids

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

    Raises:
        MetricInputError: from the constructor for num_classes < 2 or dim < 1; from
            ``update`` for a batch of another dimension, labels that are not integer ids in
            [0, K) (named in the message), a label count that differs from the batch's rows,
            or NaN/inf features (how many, in which rows); from ``merge`` for an accumulator of
            another K or d; from ``compute``/``cdnv`` for a class with no sample, features that
            were all zero, identical class means, or non-finite statistics set from outside.
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
        # The statistics below are stored divided by 2**_exp (means) or 4**_exp (sq_dev,
        # scatter); see the module docstring. Power-of-two factors keep them exact.
        self._exp = 0
        self._means = torch.zeros(num_classes, dim, **f64)
        # Per-class sum of squared distances to the class mean (the trace of each class's
        # scatter), needed only for CDNV: K floats.
        self._sq_dev = torch.zeros(num_classes, **f64)
        self._scatter = torch.zeros(dim, dim, **f64)  # pooled within-class scatter S_W

    @property
    def num_samples(self) -> int:
        """N, the number of rows seen so far."""
        return int(self.counts.sum())

    @property
    def means(self) -> torch.Tensor:
        """Class means (K x d, float64, natural units; rows of classes without samples are 0)."""
        return ldexp(self._means, self._exp)

    @means.setter
    def means(self, value: torch.Tensor) -> None:
        self._means = ldexp(self._f64(value), -self._exp)

    @property
    def sq_dev(self) -> torch.Tensor:
        """Per class, the sum of squared distances of its features to its mean (K, float64)."""
        return ldexp(self._sq_dev, 2 * self._exp)

    @sq_dev.setter
    def sq_dev(self, value: torch.Tensor) -> None:
        self._sq_dev = ldexp(self._f64(value), -2 * self._exp)

    @property
    def scatter(self) -> torch.Tensor:
        """The pooled within-class scatter S_W = sum_i (h_i - mu_y_i)(h_i - mu_y_i)^T (d x d)."""
        return ldexp(self._scatter, 2 * self._exp)

    @scatter.setter
    def scatter(self, value: torch.Tensor) -> None:
        self._scatter = ldexp(self._f64(value), -2 * self._exp)

    def _f64(self, value: Any) -> torch.Tensor:
        return torch.as_tensor(value).to(device=self.device, dtype=torch.float64)

    def _rescale(self, exp: int) -> None:
        """Store the statistics in units of 2**exp instead of 2**self._exp (exact)."""
        shift = self._exp - exp
        if shift:
            self._means = ldexp(self._means, shift)
            self._sq_dev = ldexp(self._sq_dev, 2 * shift)
            self._scatter = ldexp(self._scatter, 2 * shift)
            self._exp = exp

    def _is_zero(self) -> bool:
        """Whether every stored statistic is 0 (no data yet, or only all-zero features)."""
        return not (bool(self._means.any()) or bool(self._sq_dev.any()))

    def _unit_for(self, exp: int | None) -> None:
        """Rescale so that data whose largest magnitude has exponent ``exp`` stays <= 1.

        While the statistics are all zero the unit simply becomes that data's; afterwards it
        only grows, so smaller batches are scaled down, never the stored statistics up.
        """
        if exp is None:  # all-zero data: any unit will do
            return
        self._rescale(exp if self._is_zero() else max(self._exp, exp))

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
        top = max_abs(h)  # raises on NaN/inf, saying where
        self._unit_for(scale_exponent(top) if top > 0.0 else None)
        h = ldexp(h.to(torch.float64), -self._exp)  # exact; largest magnitude now <= 1
        counts = torch.bincount(y, minlength=self.num_classes)
        means, _ = class_means(h, y, self.num_classes, counts.clamp_min(1))
        dev = h - means[y]
        sq_dev = torch.zeros_like(self._sq_dev).index_add_(0, y, dev.square().sum(1))
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
        if other.num_samples == 0:
            return self
        self._unit_for(None if other._is_zero() else other._exp)
        shift = other._exp - self._exp  # <= 0 unless self was empty; exact either way
        self._merge_stats(
            other.counts.to(self.device),
            ldexp(other._means.to(self.device), shift),
            ldexp(other._sq_dev.to(self.device), 2 * shift),
            ldexp(other._scatter.to(self.device), 2 * shift),
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
        # All in the stored units (see _rescale): mb, sqb and scatter_b are already scaled.
        delta = mb - self._means  # rows of classes absent from either side get weight 0 below
        weight = na * nbf / safe
        self._scatter = self._scatter + scatter_b + (delta.T * weight) @ delta
        self._sq_dev = self._sq_dev + sqb + weight * delta.square().sum(1)
        self._means = self._means + delta * (nbf / safe)[:, None]
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
        stats = (self._means, self._sq_dev, self._scatter)
        if not all(bool(torch.isfinite(t).all()) for t in stats):
            raise MetricInputError(
                "the accumulated statistics hold NaN or inf; update() rejects such features, so "
                "they were set from outside (e.g. means/scatter read from an accumulator of "
                "features beyond ~1e150, whose natural-unit scatter overflows). Merge the "
                "accumulators themselves (merge()) instead of copying their statistics."
            )
        if self._is_zero():
            raise MetricInputError(
                f"all {self.num_samples} features seen are zero, so NC1 and CDNV are 0/0 "
                "(undefined). Pass non-zero features: check that they were captured from the "
                "intended layer."
            )

    def compute(self) -> float:
        """NC1 = (1/K) trace(Sigma_W pinv(Sigma_B)) of everything seen (see ``nc1``)."""
        self._check_ready()
        # Stored units: means / 2**e and S_W / 4**e, so the ratio below is unit-free.
        u, s = between_directions(self._means)
        projected = ((self._scatter @ u) * u).sum(0)  # diag(U^T S_W U), O(d^2 r)
        return float((projected / s.square()).sum() / self.num_samples)

    def cdnv(self) -> float:
        """CDNV of everything seen (see ``ncfinetune.metrics.collapse.cdnv``)."""
        self._check_ready()
        return cdnv_from_stats(self._means, self._sq_dev / self.counts.to(torch.float64))

    def discriminative_ratio(self) -> float:
        """SL-MLP's D_inter / D_intra of everything seen (see
        ``ncfinetune.metrics.transfer.discriminative_ratio``), from the same statistics."""
        self._check_ready()
        counts = self.counts.to(torch.float64)
        return discriminative_ratio_from_stats(self._means, self._sq_dev / counts, counts)
