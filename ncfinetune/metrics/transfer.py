"""Transfer metrics of the seed papers: how usable a representation is beyond its labels.

``recall_at_1`` and ``nmi`` are the retrieval and clustering measures of CTC (seed 000: R@1 and
NMI, which it tracks per epoch to show transfer peaking mid-training); ``discriminative_ratio``
and ``feature_redundancy`` are SL-MLP's (seed 001: phi = D_inter / D_intra, eq. 4, and R, eq.
3). Inputs and conventions are those of :mod:`ncfinetune.metrics.collapse`: features N x d (torch
tensor on any device, or NumPy array), labels of length N (integer ids or any hashable labels),
float64 throughout, exact power-of-two rescaling at extreme magnitudes, and
:class:`~ncfinetune.errors.MetricInputError` (a ``ValueError``) that says what was received and
how to fix it instead of a NaN: also for the inputs on which a metric is degenerate (one class,
constant features, classes of a single sample).
"""

from __future__ import annotations

import warnings
from typing import Any

import torch

from ncfinetune.errors import MetricInputError
from ncfinetune.metrics._core import (
    EPS64,
    check_features,
    class_means,
    class_variances,
    discriminative_ratio_from_stats,
    max_abs,
    raise_all_zero,
    unit_rows,
    unit_scale,
)
from ncfinetune.metrics._labels import check_labels

__all__ = ["discriminative_ratio", "feature_redundancy", "nmi", "recall_at_1"]

# Rows of the N x N similarity computed at a time in recall_at_1 (float64): ~64 MiB.
_SIMILARITY_BYTES = 64 * 2**20


def recall_at_1(features: Any, labels: Any, num_classes: int | None = None) -> float:
    """Leave-one-out nearest-neighbour retrieval: the share of examples whose most
    cosine-similar *other* example has the same label (R@1 of CTC, seed 000).

    Ties between equally similar neighbours go to the lowest row index, so the value is
    deterministic. Invariant to scaling any row by c > 0 (cosine), to permuting the examples
    (up to ties), and to rotating the features. Cost O(N**2 d), in float64 row blocks of about
    64 MiB; memory O(N d).

    Raises:
        MetricInputError: on bad input (see :func:`ncfinetune.metrics.nc1`), an all-zero row
            (cosine undefined), fewer than 2 classes, a class with a single example (it has no
            same-class neighbour to find: drop it, or gather a second example), or every example
            pointing the same way (every neighbour is a tie).
    """
    h = check_features(features)
    n, d = h.shape
    y, k, counts, names = check_labels(labels, n, h.device, num_classes)
    single = torch.nonzero(counts < 2).flatten().tolist()
    if single:
        shown = ", ".join(repr(names[c]) for c in single[:5])
        raise MetricInputError(
            f"recall_at_1 needs at least 2 examples per class; {len(single)} class(es) have a "
            f"single example ({shown}{', ...' if len(single) > 5 else ''}), which can never "
            "retrieve a same-class neighbour. Drop those classes or add examples."
        )
    u = unit_rows(h)
    spread = float((u - u[:1]).abs().max())
    if spread <= 4 * d * EPS64:
        raise MetricInputError(
            f"all {n} examples point in the same direction (largest difference of the unit rows "
            f"{spread:.3g}, zero up to float64 rounding), so every nearest neighbour is a tie "
            "and R@1 is arbitrary. Pass features that vary in direction."
        )
    rows = max(1, _SIMILARITY_BYTES // (8 * n))
    hits = 0
    for s in range(0, n, rows):
        e = min(n, s + rows)
        sim = u[s:e] @ u.T
        sim[torch.arange(e - s), torch.arange(s, e)] = -torch.inf  # leave the query out
        hits += int((y[sim.argmax(1)] == y[s:e]).sum())
    return hits / n


def nmi(
    features: Any, labels: Any, seed: int = 0, num_classes: int | None = None, n_init: int = 10
) -> float:
    """Clustering quality: k-means with K = number of classes on the features, then the
    normalised mutual information between clusters and labels (CTC, seed 000).

    scikit-learn's ``KMeans(n_clusters=K, n_init=n_init, random_state=seed)`` (k-means++ seeding,
    the best of ``n_init`` runs) on the features centred and divided by their RMS norm (so the
    value does not depend on their scale, and neither does k-means' tolerance), then
    ``normalized_mutual_info_score(labels, clusters, average_method="arithmetic")``. In [0, 1];
    1 when the clusters are the classes. The same features, labels and seed give the same value.

    Raises:
        MetricInputError: on bad input (see :func:`ncfinetune.metrics.nc1`), fewer than 2
            classes, no more examples than classes (every example would be its own cluster),
            fewer distinct feature vectors than classes (constant features included: k-means
            cannot form K clusters), or ``n_init`` < 1.
    """
    from sklearn.cluster import KMeans
    from sklearn.metrics import normalized_mutual_info_score

    if not isinstance(n_init, int) or isinstance(n_init, bool) or n_init < 1:
        raise MetricInputError(f"n_init must be a positive int (k-means restarts), got {n_init!r}")
    h = check_features(features)
    n, d = h.shape
    y, k, _, _ = check_labels(labels, n, h.device, num_classes)
    if n <= k:
        raise MetricInputError(
            f"nmi needs more examples than classes, got N = {n} for K = {k} (with one example "
            "per class every example is its own cluster and NMI is 1 whatever the features). "
            "Pass several examples per class."
        )
    x = unit_scale(h).to(torch.float64)  # raises on NaN/inf and on all-zero features
    x = x - x.mean(0)
    distinct = int(torch.unique(x, dim=0).shape[0])
    if distinct < k:
        raise MetricInputError(
            f"the features hold only {distinct} distinct vector(s) for K = {k} classes "
            f"({'constant features' if distinct == 1 else 'many duplicates'}), so k-means cannot "
            f"form {k} clusters. Pass features that vary across examples."
        )
    x = (x / torch.linalg.vector_norm(x) * n**0.5).cpu().numpy()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # near-duplicate points: "fewer distinct clusters"
        clusters = KMeans(n_clusters=k, n_init=n_init, random_state=seed).fit_predict(x)
    return float(
        normalized_mutual_info_score(y.cpu().numpy(), clusters, average_method="arithmetic")
    )


def discriminative_ratio(features: Any, labels: Any, num_classes: int | None = None) -> float:
    """SL-MLP's discriminative ratio phi = D_inter / D_intra (seed 001, eq. 4, after LDA).

    D_inter = 1/(K(K-1)) sum over ordered pairs j != k of ||mu_j - mu_k||**2 (mean squared
    distance between distinct class means) and D_intra = (1/K) sum_k (1/N_k) sum_{i in k}
    ||h_i - mu_k||**2 (mean per-class squared distance to the class mean). Larger means classes
    further apart relative to their spread (less intra-class variation, in seed 001's terms).
    Computed without pairs: sum_{j != k} ||mu_j - mu_k||**2 = 2K sum_k ||mu_k - mean_j mu_j||**2.
    Invariant to scale (at any magnitude), translation, rotation and permutation. Streamed over
    batches: ``NC1Accumulator.discriminative_ratio()``.

    Raises:
        MetricInputError: on bad input (see :func:`ncfinetune.metrics.nc1`), fewer than 2
            classes, every class a single example, or zero within-class spread (each class
            collapsed to one point, constant features included): D_intra = 0.
    """
    h = check_features(features)
    n, d = h.shape
    y, k, counts, _ = check_labels(labels, n, h.device, num_classes)
    h = unit_scale(h)
    means, _ = class_means(h, y, k, counts)
    return discriminative_ratio_from_stats(means, class_variances(h, y, k, counts, means), counts)


def feature_redundancy(features: Any) -> float:
    """SL-MLP's feature redundancy R (seed 001, eq. 3): the mean |Pearson correlation| over all
    d x d pairs of feature dimensions (the diagonal's d ones included, as in the paper).

    Columns are mean-centred (Pearson, as the paper names it; its printed formula leaves the
    centring out). In [1/d, 1]; larger means more redundant channels. Invariant to scaling or
    shifting any column, and to permuting the examples or the columns. Cost O(N d**2), memory
    O(d**2) float64.

    Raises:
        MetricInputError: on bad input (non-2-D, NaN/inf, all-zero), fewer than 2 examples, or a
            constant column (its correlation is 0/0: the message names the columns; drop them,
            e.g. ``features[:, features.std(0) > 0]``).
    """
    h = check_features(features)
    n, d = h.shape
    if n < 2:
        raise MetricInputError(
            f"feature_redundancy needs at least 2 examples, got N = {n}: correlations of a "
            "single example are 0/0. Pass more examples."
        )
    if max_abs(h) == 0.0:  # also raises on NaN/inf
        raise_all_zero(h)
    x = h.to(torch.float64)
    x = x / x.abs().amax(0).clamp_min(torch.finfo(torch.float64).tiny)  # per column, exact-ish
    c = x - x.mean(0)
    norm = torch.linalg.vector_norm(c, dim=0)
    constant = torch.nonzero((norm <= 4 * n * EPS64) | (x == x[:1]).all(0)).flatten().tolist()
    if constant:
        shown = ", ".join(map(str, constant[:10]))
        raise MetricInputError(
            f"{len(constant)} of the {d} feature columns are constant over the {n} examples "
            f"(columns [{shown}{', ...' if len(constant) > 10 else ''}]), so their correlation is "
            "0/0. Drop them first, e.g. features[:, features.std(0) > 0] (dead ReLU channels "
            "are the usual cause)."
        )
    z = c / norm
    corr = (z.T @ z).clamp_(-1.0, 1.0)
    return float(corr.abs().mean())
