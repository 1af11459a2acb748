"""Class-balanced, seeded, nested small-data subsets and validation splits of a training split.

Re-exported by `ncfinetune.data.loaders`.
"""

from __future__ import annotations

from collections.abc import Sequence

import datasets
import numpy as np
import torch

from ncfinetune.errors import DataError


def _as_labels(labels: Sequence[int] | np.ndarray | torch.Tensor) -> np.ndarray:
    array = np.asarray(labels)
    if array.ndim != 1 or array.size == 0 or not np.issubdtype(array.dtype, np.integer):
        raise DataError(
            f"labels must be a non-empty 1-D array of integer class ids; got shape "
            f"{array.shape} of {array.dtype}. Pass e.g. data.labels('train')."
        )
    if array.min() < 0:
        raise DataError(
            f"labels hold {array.min()}; class ids must be >= 0. Drop unlabelled (-1) rows first."
        )
    return array.astype(np.int64, copy=False)


def _class_rng(seed: int, *key: int) -> np.random.Generator:
    if seed < 0:
        raise DataError(f"seed={seed} is negative; pass a seed >= 0.")
    return np.random.default_rng([seed, *key])


def balanced_subset(
    labels: Sequence[int] | np.ndarray,
    *,
    per_class: int | None = None,
    total: int | None = None,
    seed: int = 0,
) -> np.ndarray:
    """Pick a class-balanced, seeded, nested subset of a training split.

    Each class draws one permutation of its members from (seed, class id) and takes a prefix,
    so for one seed a smaller subset is always contained in a larger one (10 per class within
    20 per class), and adding classes does not change the picks of the others.

    Args:
        labels: class id of every row of the split, e.g. `data.labels("train")`.
        per_class: rows to take from every class present in `labels`.
        total: rows in all, instead of per_class: `total // K` per class, and one more for
            `total % K` classes picked by a seeded order of the classes (not always the lowest
            ids, so no class is favoured across seeds; still nested for one seed).
        seed: seed of the draws (>= 0).

    Returns:
        Sorted int64 row indices into `labels`.

    Raises:
        DataError: neither or both of per_class/total given, or a class has too few rows;
            the message names the class and the largest valid request.
    """
    labels = _as_labels(labels)
    if (per_class is None) == (total is None):
        raise DataError(
            f"balanced_subset got per_class={per_class} and total={total}; pass exactly one."
        )
    classes, counts = np.unique(labels, return_counts=True)
    k = classes.size
    if per_class is not None:
        if per_class < 1:
            raise DataError(f"per_class={per_class} must be >= 1.")
        take = np.full(k, per_class)
    else:
        if total < 1:
            raise DataError(f"total={total} must be >= 1.")
        rank = np.argsort(_class_rng(seed, 0).permutation(k))

        def plan(t: int) -> np.ndarray:
            return t // k + (rank < t % k)

        take = plan(total)
    short = np.flatnonzero(take > counts)
    if short.size:
        c = short[0]
        if per_class is not None:
            largest = f"the largest valid per_class is {counts.min()}"
        else:  # plans grow monotonically with t, so bisect for the largest feasible total
            lo, hi = 0, int(counts.sum())
            while lo < hi:
                mid = (lo + hi + 1) // 2
                lo, hi = (mid, hi) if np.all(plan(mid) <= counts) else (lo, mid - 1)
            largest = f"the largest valid total for seed {seed} is {lo}"
        raise DataError(
            f"class {classes[c]} has {counts[c]} rows but {take[c]} were asked "
            f"(per_class={per_class}, total={total}); {largest}. Ask for fewer."
        )
    picks = []
    for cls, n in zip(classes, take, strict=True):
        members = np.flatnonzero(labels == cls)
        # Key 0 is the class order above; classes use key id + 1.
        picks.append(members[_class_rng(seed, int(cls) + 1).permutation(members.size)[:n]])
    return np.sort(np.concatenate(picks))


def stratified_rows(
    labels: np.ndarray, test_size: float | int, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """Positions of a stratified, seeded (train, test) split of `labels`, each sorted.

    The split is datasets' own `Dataset.train_test_split(test_size, stratify_by_column, seed)`
    (a port of scikit-learn's StratifiedShuffleSplit drawing from `np.random.default_rng(seed)`),
    run on an in-memory table of (position, label as a ClassLabel), so nothing is cached on disk.
    datasets 5 reads the label column row by row there: about 0.2 s for 1,800 rows and 5 s for
    60,000 on the 2-core dev machine.

    Args:
        labels: class ids >= 0, one per row.
        test_size: share of rows in the test part, in (0, 1), or a number of rows.
        seed: seed of the split.

    Returns:
        (train positions, test positions) into `labels`, sorted.

    Raises:
        ValueError: from datasets, when a class has fewer than 2 rows, or a part would hold
            fewer rows than there are classes.
    """
    features = datasets.Features(
        position=datasets.Value("int64"),
        label=datasets.ClassLabel(num_classes=int(labels.max()) + 1),
    )
    table = datasets.Dataset.from_dict(
        {"position": np.arange(labels.size), "label": labels}, features=features
    )
    parts = table.train_test_split(
        test_size=test_size, stratify_by_column="label", seed=seed, keep_in_memory=True
    )
    # [:] reads the column as one array (a bare ["position"] is a lazy Column read row by row)
    train, test = (parts[k].with_format("numpy")[:]["position"] for k in ("train", "test"))
    return np.sort(train).astype(np.int64), np.sort(test).astype(np.int64)


def validation_split(
    labels: Sequence[int] | np.ndarray,
    fraction: float,
    seed: int = 0,
    *,
    exclude: Sequence[int] | np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Split the rows outside `exclude` into stratified train and validation indices.

    Benchmarks choose hyperparameters on a validation set drawn from the training split but
    outside the small subset being trained on: pass that subset as `exclude`.

    The split is datasets' stratified `Dataset.train_test_split` (see `stratified_rows`). It
    was scikit-learn's `train_test_split(stratify=...)` before: both give each class its share
    to within one row, but they draw from different random generators, so for one seed the
    rows now differ from those of earlier versions.

    Args:
        labels: class id of every row of the split.
        fraction: share of the remaining rows to put in validation, in (0, 1); an int is a
            number of rows instead.
        seed: seed of the stratified split (>= 0).
        exclude: row indices to leave out of both parts.

    Returns:
        (train indices, validation indices), sorted, disjoint and disjoint from `exclude`.

    Raises:
        DataError: bad fraction, seed or exclude, or a class too small to stratify.
    """
    labels = _as_labels(labels)
    if seed < 0:
        raise DataError(f"seed={seed} is negative; pass a seed >= 0.")
    excluded = np.asarray([] if exclude is None else exclude, dtype=np.int64)
    if excluded.size and (excluded.min() < 0 or excluded.max() >= labels.size):
        raise DataError(
            f"exclude holds indices {excluded.min()}..{excluded.max()} but labels has "
            f"{labels.size} rows; pass indices in [0, {labels.size})."
        )
    pool = np.setdiff1d(np.arange(labels.size), excluded)
    valid = isinstance(fraction, float) and 0.0 < fraction < 1.0
    valid |= isinstance(fraction, int) and 0 < fraction < pool.size
    if not valid:
        raise DataError(
            f"fraction={fraction!r} is invalid for {pool.size} rows; pass a float in (0, 1) "
            f"or an int number of rows in [1, {pool.size - 1}]."
        )
    try:
        train, val = stratified_rows(labels[pool], fraction, seed)
    except ValueError as exc:
        counts = dict(zip(*np.unique(labels[pool], return_counts=True), strict=True))
        raise DataError(
            f"cannot stratify {pool.size} rows (class counts {counts}) with fraction "
            f"{fraction}: {str(exc).rstrip('.')}. Exclude fewer rows or change the fraction."
        ) from exc
    return pool[train], pool[val]
