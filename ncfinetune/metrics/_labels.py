"""Label checks of the metrics: labels -> int64 class ids in [0, K), with K and the class names.

Private to :mod:`ncfinetune.metrics`, like :mod:`ncfinetune.metrics._core` (whose feature
checks it shares). Integer labels are class ids; any other hashable labels (strings, tuples,
mixed) are factorised by :func:`check_labels`, their K distinct values being the classes. Float,
bool and complex labels are refused (they are almost always scores or one-hot rows).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch

from ncfinetune.errors import MetricInputError
from ncfinetune.metrics._core import as_tensor, shown_rows

__all__ = ["check_labels", "check_range", "label_ids"]


def _is_number(v: Any) -> bool:
    return isinstance(v, int | float | complex | np.number | np.bool_)


def _is_int(v: Any) -> bool:
    return isinstance(v, int | np.integer) and not isinstance(v, bool | np.bool_)


def _not_1d(shape: tuple[int, ...]) -> MetricInputError:
    return MetricInputError(
        f"labels must be a 1-D array of N class ids, got shape {tuple(shape)}. "
        "Pass class indices, not one-hot rows (use labels.argmax(1))."
    )


def _read_labels(labels: Any, n: int) -> torch.Tensor | list:
    """Labels as a 1-D integer tensor (class ids) or, for any other hashable labels, a list.

    Checks the length against the ``n`` feature rows, and rejects float, bool and complex
    numeric labels (they are almost always scores or one-hot rows, not class ids).
    """
    if isinstance(labels, torch.Tensor):
        y = labels.detach()
    elif isinstance(labels, list | tuple) and not all(_is_number(v) for v in labels):
        y = list(labels)  # strings, tuples, mixed: each element is one label
    elif isinstance(labels, list | tuple) and len(labels) == 0:
        y = torch.empty(0, dtype=torch.int64)
    else:
        arr = np.asarray(labels)
        if arr.dtype.kind in "biufc":
            y = as_tensor(arr, "labels")
        elif arr.ndim != 1:
            raise _not_1d(arr.shape)
        else:
            y = arr.tolist()  # str/bytes/object arrays, e.g. a pandas column
            if all(map(_is_int, y)):
                try:
                    y = torch.tensor(y, dtype=torch.int64)
                except (OverflowError, RuntimeError):  # ints beyond int64: plain labels
                    pass
    if isinstance(y, list):
        if len(y) != n:
            raise MetricInputError(
                f"features have N = {n} rows but labels have {len(y)} entries; "
                "pass one label per feature row."
            )
        return y
    if y.ndim != 1:
        raise _not_1d(y.shape)
    if y.dtype == torch.bool or y.is_floating_point() or y.is_complex():
        raise MetricInputError(
            f"labels must have an integer dtype, got {y.dtype}. Cast with .long() "
            "(or .astype(np.int64)) if they hold whole-number class ids; labels may also be "
            "any hashable values such as strings or tuples, passed as a list."
        )
    if y.shape[0] != n:
        raise MetricInputError(
            f"features have N = {n} rows but labels have {y.shape[0]} entries; "
            "pass one label per feature row."
        )
    return y


def _factorize(items: list) -> tuple[torch.Tensor, list]:
    """Hashable labels -> (class ids 0..K-1 in sorted label order, the K labels in that order).

    Labels that compare equal (1, 1.0, np.int64(1)) are one class. Labels of types that do not
    sort together (e.g. 1 and "a") are ordered by type name, then repr.
    """
    index: dict = {}
    ids = np.empty(len(items), dtype=np.int64)
    unhashable, missing = [], []
    for i, v in enumerate(items):
        if v is None or (isinstance(v, float | np.floating) and math.isnan(v)):
            missing.append(i)
            continue
        try:
            ids[i] = index.setdefault(v, len(index))
        except TypeError:
            unhashable.append(i)
    if unhashable:
        first = items[unhashable[0]]
        raise MetricInputError(
            f"labels must be hashable (int, str, tuple, ...), but {len(unhashable)} are not, "
            f"in rows {shown_rows(unhashable)} (first: {first!r:.60}, a {type(first).__name__}). "
            "If they are one-hot or score rows, pass labels.argmax(1); otherwise convert each "
            "label to a tuple or a string."
        )
    if missing:
        raise MetricInputError(
            f"labels hold {len(missing)} missing value(s) (None or NaN) in rows "
            f"{shown_rows(missing)}; every feature row needs a class label. Drop those rows or "
            "give them a label."
        )
    names = list(index)
    try:
        order = sorted(range(len(names)), key=names.__getitem__)
    except (TypeError, ValueError):  # mixed types: any fixed order will do, classes are unordered
        order = sorted(range(len(names)), key=lambda c: (type(names[c]).__name__, repr(names[c])))
    rank = np.empty(len(names), dtype=np.int64)
    rank[order] = np.arange(len(names))
    return torch.from_numpy(rank[ids]), [names[c] for c in order]


def label_ids(labels: Any, n: int, device: torch.device) -> torch.Tensor:
    """Integer class ids checked for shape, dtype and length; returned as int64 on ``device``.

    Used where labels must already be class ids (:class:`NC1Accumulator`); other hashable
    labels are an error that names them.
    """
    y = _read_labels(labels, n)
    if isinstance(y, list):
        odd = [i for i, v in enumerate(y) if not _is_int(v)]
        distinct = list(dict.fromkeys(repr(y[i])[:30] for i in odd))
        shown = ", ".join(distinct[:5]) + (" ..." if len(distinct) > 5 else "")
        raise MetricInputError(
            f"labels must be integer class ids in [0, num_classes) here, but {len(odd)} are "
            f"not, in rows {shown_rows(odd)} (e.g. {shown}). Map them to ids first, e.g. "
            "index = {c: i for i, c in enumerate(sorted(set(labels)))}; "
            "ids = [index[c] for c in labels]."
        )
    return y.to(device=device, dtype=torch.int64)


def check_range(y: torch.Tensor, k: int) -> None:
    """Raise unless every label lies in [0, k)."""
    if y.numel() == 0:
        return
    lo, hi = int(y.min()), int(y.max())
    if lo < 0 or hi >= k:
        raise MetricInputError(
            f"label {lo if lo < 0 else hi} is outside [0, {k}) for num_classes={k}. Remap the "
            "labels to 0..num_classes-1, or pass num_classes=None to use the distinct labels."
        )


def check_labels(
    labels: Any, n: int, device: torch.device, num_classes: int | None
) -> tuple[torch.Tensor, int, torch.Tensor, list]:
    """Validate labels; return (class ids in [0, K) as int64 on ``device``, K, counts per class,
    the label of each class 0..K-1 for messages).

    Integer labels are class ids (see :mod:`ncfinetune.metrics.collapse`); any other hashable labels
    (strings, tuples, mixed) are factorised, their K distinct values being the classes.
    """
    if num_classes is not None and (
        isinstance(num_classes, bool) or not isinstance(num_classes, int | np.integer)
    ):
        raise MetricInputError(
            f"num_classes must be an int or None, got {num_classes!r}. Pass the number of "
            "classes, or None to use the distinct labels."
        )
    raw = _read_labels(labels, n)
    if isinstance(raw, list):
        y, names = _factorize(raw)
        y = y.to(device)
        k = len(names)
        counts = torch.bincount(y, minlength=k)
        if num_classes is not None and int(num_classes) != k:
            shown = ", ".join(repr(v)[:30] for v in names[:10]) + (" ..." if k > 10 else "")
            raise MetricInputError(
                f"num_classes={int(num_classes)} but the labels hold {k} distinct values "
                f"({shown}). With non-integer labels the classes are the distinct labels: "
                f"pass num_classes=None (or {k})."
            )
    elif num_classes is None:
        y = raw.to(device=device, dtype=torch.int64)
        values, y, counts = torch.unique(y, sorted=True, return_inverse=True, return_counts=True)
        k = int(counts.numel())
        names = values.tolist()
    else:
        y = raw.to(device=device, dtype=torch.int64)
        k = int(num_classes)
        check_range(y, k)
        counts = torch.bincount(y, minlength=max(k, 0))
        names = list(range(max(k, 0)))
        empty = torch.nonzero(counts == 0).flatten().tolist()
        if empty and k >= 2:
            shown = ", ".join(map(str, empty[:10])) + (" ..." if len(empty) > 10 else "")
            raise MetricInputError(
                f"{len(empty)} of num_classes={k} classes have no sample (class {shown}). "
                "Every class needs at least one example; drop the empty classes from "
                "num_classes or pass num_classes=None."
            )
    if k < 2:
        raise MetricInputError(
            f"the metrics need at least 2 classes, got {k} (N = {n}). "
            "Pass features of two or more classes."
        )
    return y, k, counts, names
