"""Metrics at extreme scales and dtypes, with any hashable labels, and every documented error.

Companion to test_metrics.py (golden values): here NC1, CDNV, numerical rank, class-separation
R^2 and linear CKA must give the same finite value at any global scale of the features, and
every ``Raises:`` promise of ncfinetune.metrics / metrics_stream must hold, with a message that
says what was received and what is valid.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from ncfinetune.errors import MetricInputError, NcFinetuneError
from ncfinetune.metrics import cdnv, class_separation_r2, linear_cka, nc1, numerical_rank
from ncfinetune.metrics.stream import NC1Accumulator

N, D, K = 120, 8, 4


def make(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """float64 features (N x D) of K separated classes, every class present; int64 labels."""
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(N) % K
    mu = 3.0 * torch.randn(K, D, generator=g, dtype=torch.float64)
    return mu[y] + torch.randn(N, D, generator=g, dtype=torch.float64), y


def other_rep(h: torch.Tensor) -> torch.Tensor:
    """A second representation of the same examples, for CKA."""
    g = torch.Generator().manual_seed(1)
    return h[:, :5] ** 2 + torch.randn(len(h), 5, generator=g, dtype=torch.float64)


def streamed(h: torch.Tensor, y: torch.Tensor, batch: int = 32) -> NC1Accumulator:
    acc = NC1Accumulator(K, h.shape[1])
    for s in range(0, len(h), batch):
        acc.update(h[s : s + batch], y[s : s + batch])
    return acc


# Each metric as f(features, labels); CKA compares h with a fixed transform of itself, scaled
# the same way (CKA is invariant to scaling either representation).
METRICS = {
    "nc1": nc1,
    "cdnv": cdnv,
    "numerical_rank": numerical_rank,
    "class_separation_r2": class_separation_r2,
    "linear_cka": lambda h, y: linear_cka(h, other_rep(make()[0]).to(h.dtype) * (h.abs().max())),
    "stream_nc1": lambda h, y: streamed(h, y).compute(),
    "stream_cdnv": lambda h, y: streamed(h, y).cdnv(),
}


def rel(a: float, b: float) -> float:
    return abs(a - b) / abs(b)


# ------------------------------------------------------------------ scale invariance


@pytest.mark.parametrize("scale", [1e-300, 1e-200, 1e-30, 1e-10, 1e10, 1e30, 1e200, 1e300])
@pytest.mark.parametrize("name", list(METRICS))
def test_float64_scale_invariance(name, scale):
    h, y = make()
    fn = METRICS[name]
    base, scaled = fn(h, y), fn(h * scale, y)
    assert math.isfinite(scaled)
    assert rel(scaled, base) <= 1e-6


@pytest.mark.parametrize("scale", [1e-30, 1e-10, 1e10, 1e30])
@pytest.mark.parametrize("name", list(METRICS))
def test_float32_scale_invariance(name, scale):
    h, y = make()
    base, scaled = METRICS[name](h.float(), y), METRICS[name]((h * scale).float(), y)
    assert math.isfinite(scaled)
    assert rel(scaled, base) <= 1e-6  # float32 rounding of h * scale: ~1e-7 relative


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("name", list(METRICS))
def test_half_precision(name, dtype):
    h, y = make()
    fn = METRICS[name]
    low = h.to(dtype)
    # Scaling by a power of two is exact in these dtypes (bfloat16 spans float32's range, so
    # 2**100 ~ 1e30 fits; float16 only up to 65504), hence the same value to 1e-6.
    factor = 2.0**100 if dtype == torch.bfloat16 else 2.0**-8
    assert rel(fn(low * factor, y), fn(low, y)) <= 1e-6
    # Against float64, only the input rounding (8 or 11 significant bits) differs.
    assert rel(fn(low, y), fn(h, y)) <= 2e-2


def test_accumulator_matches_one_shot_across_extreme_batches():
    # Batches 1e250 apart, in both orders and merged: the running unit must rescale exactly.
    h, y = make(seed=2)
    big = h * 1e250
    for tiny in (1e-250, 1e-100):
        h2 = torch.cat([h[:60] * tiny, big[60:]])
        expected = nc1(h2, y)
        fwd = streamed(h2, y)
        rev = NC1Accumulator(K, D).update(h2[60:], y[60:]).update(h2[:60], y[:60])
        merged = (
            NC1Accumulator(K, D)
            .update(h2[:60], y[:60])
            .merge(NC1Accumulator(K, D).update(h2[60:], y[60:]))
        )
        for acc in (fwd, rev, merged):
            assert math.isfinite(acc.compute())
            assert rel(acc.compute(), expected) <= 1e-9
            assert rel(acc.cdnv(), cdnv(h2, y)) <= 1e-9


def test_accumulator_state_round_trip_keeps_natural_units():
    # ncfinetune.recipes.engine copies counts/means/sq_dev/scatter into a fresh accumulator: those
    # attributes must stay in natural units although they are stored rescaled.
    h, y = make(seed=3)
    acc = streamed(h * 1e20, y)
    assert torch.allclose(acc.means, torch.stack([(h * 1e20)[y == c].mean(0) for c in range(K)]))
    copy = NC1Accumulator(K, D)
    for key in ("counts", "means", "sq_dev", "scatter"):
        setattr(copy, key, getattr(acc, key).clone())
    assert rel(copy.compute(), acc.compute()) <= 1e-12


# ------------------------------------------------------------------ labels of any hashable type


LABELINGS = {
    "str_list": lambda y: [["cat", "dog", "emu", "yak"][i] for i in y.tolist()],
    "str_array": lambda y: np.array(["cat", "dog", "emu", "yak"])[y.numpy()],
    "tuple_list": lambda y: [(i, f"c{i}") for i in y.tolist()],
    "mixed_types": lambda y: [[3, "b", (1, 2), 2.5][i] for i in y.tolist()],
    "numpy_ints_in_list": lambda y: [np.int16(i * 7 - 3) for i in y.tolist()],
    "numpy_object_array": lambda y: np.array([f"x{i}" for i in y.tolist()], dtype=object),
}


@pytest.mark.parametrize("labeling", list(LABELINGS))
def test_hashable_labels_equal_integer_labels(labeling):
    h, y = make(seed=4)
    labels = LABELINGS[labeling](y)
    for fn in (nc1, cdnv, numerical_rank, class_separation_r2):
        assert fn(h, labels) == pytest.approx(fn(h, y), rel=1e-12)
    if labeling != "numpy_ints_in_list":  # ints are class ids, which num_classes bounds
        assert nc1(h, labels, num_classes=K) == pytest.approx(nc1(h, y), rel=1e-12)


# ------------------------------------------------------------------ every documented error


def _h():
    return make()[0]


def _y():
    return make()[1]


def _with(values: dict) -> torch.Tensor:
    h = _h().clone()
    for (r, c), v in values.items():
        h[r, c] = v
    return h


def _same_dir():
    g = torch.Generator().manual_seed(5)
    v = torch.randn(D, dtype=torch.float64, generator=g)
    mags = torch.rand(N, 1, dtype=torch.float64, generator=g) * 9 + 0.1
    return mags * v  # one direction, different lengths: unit rows equal only up to rounding


def _acc_with_inf():
    acc = streamed(_h(), _y())
    acc.scatter = torch.full((D, D), math.inf, dtype=torch.float64)
    return acc


SAME_MEANS = torch.cat([_h()[:60], _h()[:60].flip(0)])  # class 0 and 1: same points, reordered
ERRORS = {
    # (call, regex the message must match: what was received ... what is valid / how to fix)
    "features_not_2d": (lambda: nc1(_h()[:, 0], _y()), r"2-D \(N, d\) matrix, got shape \(120,\)"),
    "features_complex": (
        lambda: cdnv(_h().to(torch.complex128), _y()),
        r"real numbers, got dtype torch.complex128. Cast with .float",
    ),
    "features_zero_dims": (lambda: nc1(_h()[:, :0], _y()), r"d = 0 feature dimensions"),
    "label_count": (
        lambda: numerical_rank(_h(), _y()[:-3]),
        r"N = 120 rows but labels have 117 entries; pass one label per feature row",
    ),
    "label_count_str": (
        lambda: class_separation_r2(_h(), ["a", "b"] * 59),
        r"N = 120 rows but labels have 118 entries",
    ),
    "labels_float": (
        lambda: nc1(_h(), _y().double()),
        r"integer dtype, got torch.float64. Cast with .long\(\).*hashable values",
    ),
    "labels_one_hot": (
        lambda: cdnv(_h(), torch.eye(K, dtype=torch.int64)[_y()]),
        r"1-D array of N class ids, got shape \(120, 4\).*argmax",
    ),
    "labels_unhashable": (
        lambda: nc1(_h(), [[1, 0], [0, 1]] * 60),
        r"must be hashable .* 120 are not, in rows \[0, 1, 2, .*\] \(120 rows\)"
        r" \(first: \[1, 0\], a list\).*argmax",
    ),
    "labels_missing": (
        lambda: cdnv(_h(), ["a", "b"] * 59 + [None, math.nan]),
        r"2 missing value\(s\) \(None or NaN\) in rows \[118, 119\]",
    ),
    "one_class": (
        lambda: class_separation_r2(_h(), ["only"] * N),
        r"at least 2 classes, got 1 \(N = 120\)",
    ),
    "empty_class": (
        lambda: numerical_rank(_h(), _y(), num_classes=K + 1),
        r"1 of num_classes=5 classes have no sample \(class 4\)",
    ),
    "label_out_of_range": (lambda: nc1(_h(), _y(), num_classes=3), r"label 3 is outside \[0, 3\)"),
    "num_classes_not_int": (lambda: nc1(_h(), _y(), num_classes=4.0), r"int or None, got 4.0"),
    "num_classes_vs_str_labels": (
        lambda: cdnv(_h(), [f"c{i}" for i in _y().tolist()], num_classes=3),
        r"num_classes=3 but the labels hold 4 distinct values \('c0', 'c1', 'c2', 'c3'\)",
    ),
    "nan_features": (
        lambda: nc1(_with({(5, 1): math.nan, (9, 0): math.nan, (9, 3): math.inf}), _y()),
        r"3 non-finite value\(s\) \(2 NaN, 1 inf\) in 2 row\(s\) \[5, 9\]; the first is at row"
        r" 5, column 1.*must be finite",
    ),
    "inf_features_cdnv": (
        lambda: cdnv(_with({(0, 0): -math.inf}), _y()),
        r"\(0 NaN, 1 inf\) in 1 row\(s\) \[0\]; the first is at row 0, column 0 \(-inf\)",
    ),
    "nan_features_rank": (lambda: numerical_rank(_with({(7, 2): math.nan}), _y()), r"1 NaN"),
    "nan_features_r2": (lambda: class_separation_r2(_with({(7, 2): math.nan}), _y()), r"1 NaN"),
    "half_overflow_inf": (
        lambda: nc1((_h() * 1e5).half(), _y()),
        r"non-finite value\(s\) \(0 NaN, \d+ inf\).*half precision",
    ),
    "all_zero_nc1": (lambda: nc1(torch.zeros(N, D), _y()), r"all zero \(120 x 8 values\).*0/0"),
    "all_zero_cdnv": (lambda: cdnv(torch.zeros(N, D), _y()), r"all zero"),
    "all_zero_rank": (lambda: numerical_rank(torch.zeros(N, D), _y()), r"all zero"),
    "all_zero_r2": (lambda: class_separation_r2(torch.zeros(N, D), _y()), r"all zero"),
    "identical_means_nc1": (
        lambda: nc1(SAME_MEANS, torch.repeat_interleave(torch.arange(2), 60)),
        r"class means are identical.*NC1 is undefined",
    ),
    "identical_means_cdnv": (
        lambda: cdnv(SAME_MEANS, ["x"] * 60 + ["y"] * 60),
        r"classes 'x' and 'y' have identical means \(up to float64 rounding\)",
    ),
    "zero_class_rank": (
        lambda: numerical_rank(torch.where((_y() == 2)[:, None], 0.0, _h()), _y()),
        r"class 2 has all-zero features.*0/0",
    ),
    "zero_row_r2": (
        lambda: class_separation_r2(torch.where(torch.arange(N)[:, None] == 4, 0.0, _h()), _y()),
        r"1 feature row\(s\) are all zero \(first: row 4\)",
    ),
    "same_direction_r2": (
        lambda: class_separation_r2(_same_dir(), _y()),
        r"same direction.*zero up to float64 rounding.*R\^2 is 0/0",
    ),
    "cka_not_2d": (lambda: linear_cka(_h()[:, 0], _h()), r"features_a must be a 2-D"),
    "cka_rows": (
        lambda: linear_cka(_h(), _h()[:-1]),
        r"features_a has N = 120 rows but features_b has 119",
    ),
    "cka_one_example": (lambda: linear_cka(_h()[:1], _h()[:1]), r"at least 2 examples, got N = 1"),
    "cka_nan": (
        lambda: linear_cka(_h(), _with({(3, 3): math.nan})),
        r"features_b contain 1 non-finite value\(s\) \(1 NaN, 0 inf\) in 1 row\(s\) \[3\]",
    ),
    "cka_constant": (
        lambda: linear_cka(_h(), torch.full((N, 3), 0.1, dtype=torch.float64)),
        r"features_b is constant over the 120 examples",
    ),
    "cka_zeros": (lambda: linear_cka(torch.zeros(N, 2), _h()), r"features_a is constant"),
    "acc_num_classes": (lambda: NC1Accumulator(1, D), r"num_classes must be an int >= 2, got 1"),
    "acc_dim": (lambda: NC1Accumulator(K, 0), r"dim must be an int >= 1, got 0"),
    "acc_batch_dim": (
        lambda: NC1Accumulator(K, D).update(_h()[:, :5], _y()),
        r"built for dim=8 but the batch has d = 5",
    ),
    "acc_str_labels": (
        lambda: NC1Accumulator(K, D).update(_h()[:3], ["cat", 1, "dog"]),
        r"integer class ids in \[0, num_classes\).*2 are not, in rows \[0, 2\].*'cat', 'dog'",
    ),
    "acc_label_count": (
        lambda: NC1Accumulator(K, D).update(_h(), _y()[:7]),
        r"N = 120 rows but labels have 7 entries",
    ),
    "acc_label_range": (
        lambda: NC1Accumulator(3, D).update(_h(), _y()),
        r"label 3 is outside \[0, 3\)",
    ),
    "acc_nan": (
        lambda: NC1Accumulator(K, D).update(_with({(2, 2): math.nan}), _y()),
        r"1 non-finite value\(s\) \(1 NaN, 0 inf\) in 1 row\(s\) \[2\]",
    ),
    "acc_merge_shape": (
        lambda: NC1Accumulator(K, D).merge(NC1Accumulator(K, D + 1)),
        r"cannot merge .* dim=9 into one with num_classes=4, dim=8",
    ),
    "acc_merge_type": (
        lambda: NC1Accumulator(K, D).merge(3),
        r"expects an NC1Accumulator, got int",
    ),
    "acc_empty_class": (
        lambda: NC1Accumulator(K, D).update(_h()[:2], _y()[:2]).compute(),
        r"2 of num_classes=4 classes have no sample yet \(class 2, 3; N = 2\)",
    ),
    "acc_all_zero": (
        lambda: streamed(torch.zeros(N, D), _y()).compute(),
        r"all 120 features seen are zero.*0/0",
    ),
    "acc_identical_means": (
        lambda: (
            NC1Accumulator(2, D)
            .update(SAME_MEANS, torch.repeat_interleave(torch.arange(2), 60))
            .cdnv()
        ),
        r"classes 0 and 1 have identical means",
    ),
    "acc_identical_means_nc1": (
        lambda: (
            NC1Accumulator(2, D)
            .update(SAME_MEANS, torch.repeat_interleave(torch.arange(2), 60))
            .compute()
        ),
        r"all 2 class means are identical.*NC1 is undefined",
    ),
    "acc_non_finite_state": (lambda: _acc_with_inf().compute(), r"statistics hold NaN or inf"),
}


@pytest.mark.parametrize("case", list(ERRORS))
def test_documented_errors(case):
    call, pattern = ERRORS[case]
    with pytest.raises(MetricInputError, match=pattern) as info:
        call()
    # One hierarchy: callers can catch NcFinetuneError, or ValueError like any bad argument.
    assert isinstance(info.value, NcFinetuneError) and isinstance(info.value, ValueError)
