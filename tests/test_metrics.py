"""Metrics against dense float64 NumPy/SciPy references written here; invariances; errors."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.linalg
import torch

from ncfinetune.errors import MetricInputError
from ncfinetune.metrics import (
    cdnv,
    class_separation_r2,
    linear_cka,
    nc1,
    numerical_rank,
)
from ncfinetune.metrics import collapse as metrics
from ncfinetune.metrics.stream import NC1Accumulator

# ------------------------------------------------------------------ independent references


def _classes(y):
    classes, ids = np.unique(np.asarray(y), return_inverse=True)
    return ids, len(classes)


def ref_nc1(h, y):
    """The textbook formula: dense d x d Sigma_W and Sigma_B, scipy pinv with its defaults."""
    h = np.asarray(h, dtype=np.float64)
    y, k = _classes(y)
    means = np.stack([h[y == c].mean(0) for c in range(k)])
    hc = h - means[y]
    sigma_w = hc.T @ hc / len(h)
    mc = means - means.mean(0)
    sigma_b = mc.T @ mc / k
    return np.trace(sigma_w @ scipy.linalg.pinv(sigma_b)) / k


def ref_cdnv(h, y):
    h = np.asarray(h, dtype=np.float64)
    y, k = _classes(y)
    means = [h[y == c].mean(0) for c in range(k)]
    var = [((h[y == c] - means[c]) ** 2).sum(1).mean() for c in range(k)]
    terms = [
        (var[a] + var[b]) / (2 * np.sum((means[a] - means[b]) ** 2))
        for a in range(k)
        for b in range(k)
        if a != b
    ]
    return np.mean(terms)


def ref_rank(h, y):
    h = np.asarray(h, dtype=np.float64)
    y, k = _classes(y)
    return np.mean(
        [np.linalg.norm(h[y == c]) ** 2 / np.linalg.norm(h[y == c], 2) ** 2 for c in range(k)]
    )


def ref_r2(h, y):
    """Kornblith et al. eq. 11 by brute force over all O(N^2) pairs, i == j included."""
    h = np.asarray(h, dtype=np.float64)
    y, k = _classes(y)
    u = h / np.linalg.norm(h, axis=1, keepdims=True)
    dist = 1.0 - u @ u.T
    blocks = [[dist[np.ix_(y == a, y == b)].mean() for b in range(k)] for a in range(k)]
    return 1.0 - np.mean(np.diag(blocks)) / np.mean(blocks)


def ref_cka(a, b):
    a = np.asarray(a, np.float64) - np.mean(a, 0)
    b = np.asarray(b, np.float64) - np.mean(b, 0)
    return np.linalg.norm(a.T @ b) ** 2 / (np.linalg.norm(a.T @ a) * np.linalg.norm(b.T @ b))


def make_data(n, d, k, std=1.0, mean_norm=10.0, imbalanced=False, seed=0):
    """Class means of norm ``mean_norm`` plus isotropic noise; every class has a sample."""
    rng = np.random.default_rng(seed)
    p = np.arange(1, k + 1, dtype=float) ** 2 if imbalanced else np.ones(k)
    y = np.concatenate([np.arange(k), rng.choice(k, n - k, p=p / p.sum())])
    mu = rng.normal(size=(k, d))
    mu *= mean_norm / np.linalg.norm(mu, axis=1, keepdims=True)
    return mu[y] + std * rng.normal(size=(n, d)), y


def rel(a, b):
    return abs(a - b) / abs(b)


CASES = {
    "balanced": dict(n=600, d=32, k=6),
    "imbalanced": dict(n=600, d=32, k=6, imbalanced=True),
    "d_lt_k": dict(n=500, d=4, k=12),
    "d_gg_k": dict(n=300, d=256, k=3),
    "near_collapsed": dict(n=400, d=24, k=5, std=1e-4),
    "random": dict(n=300, d=16, k=4, mean_norm=0.0),
}


# ------------------------------------------------------------------ golden values


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("kind", ["numpy", "torch", "float32"])
def test_nc1_matches_dense_reference(case, kind):
    h, y = make_data(**CASES[case])
    if kind == "float32":
        h = h.astype(np.float32)  # the reference sees the same float32 values, cast to float64
    expected = ref_nc1(h, y)
    if kind != "numpy":
        h, y = torch.from_numpy(h), torch.from_numpy(y)
    assert rel(nc1(h, y), expected) <= 1e-6


@pytest.mark.parametrize("case", ["balanced", "imbalanced", "d_lt_k", "near_collapsed"])
def test_other_metrics_match_references(case):
    h, y = make_data(**CASES[case], seed=1)
    assert rel(cdnv(h, y), ref_cdnv(h, y)) <= 1e-6
    assert rel(numerical_rank(h, y), ref_rank(h, y)) <= 1e-9
    assert rel(class_separation_r2(h, y), ref_r2(h, y)) <= 1e-6


@pytest.mark.parametrize("n,da,db", [(200, 8, 5), (30, 40, 50)])  # feature form, Gram form
def test_linear_cka_matches_reference(n, da, db):
    rng = np.random.default_rng(2)
    a = rng.normal(size=(n, da))
    b = a[:, : min(da, db)] @ rng.normal(size=(min(da, db), db)) + rng.normal(size=(n, db))
    assert rel(linear_cka(a, b), ref_cka(a, b)) <= 1e-9
    assert linear_cka(torch.from_numpy(a), torch.from_numpy(a)) == pytest.approx(1.0, abs=1e-12)


def test_extreme_collapse_takes_the_exact_centred_path(monkeypatch):
    # std 1e-9 around means of norm 10: projecting raw features would lose ~10 of 16 digits, so
    # nc1 must notice (rounding bound) and centre first; ordinary data takes the fast path.
    h, y = make_data(300, 24, 5, std=1e-9, seed=9)
    assert rel(nc1(h, y), ref_nc1(h, y)) <= 1e-6
    calls = []
    real = metrics._projected_squares
    monkeypatch.setattr(
        metrics, "_projected_squares", lambda *a, **kw: calls.append(kw) or real(*a, **kw)
    )
    nc1(h, y)
    assert [c["centre"] for c in calls] == [False, True]
    calls.clear()
    h, y = make_data(300, 24, 5, std=1e-3, seed=9)
    assert rel(nc1(h, y), ref_nc1(h, y)) <= 1e-6
    assert [c["centre"] for c in calls] == [False]


def test_labels_are_remapped_and_num_classes_respected():
    h, y = make_data(300, 8, 3)
    expected = nc1(h, y, num_classes=3)
    assert rel(nc1(h, np.array([-5, 7, 100])[y]), expected) <= 1e-12  # skipped/negative ids
    assert rel(nc1(h, y.astype(np.int16)), expected) <= 1e-12


def test_singleton_class_is_fine():
    h, y = make_data(200, 8, 4)
    y[0] = 4  # class 4 has exactly one sample
    assert rel(nc1(h, y), ref_nc1(h, y)) <= 1e-6


# ------------------------------------------------------------------ invariances


def test_invariances():
    h, y = make_data(400, 16, 5, std=2.0, seed=3)
    q = np.linalg.qr(np.random.default_rng(4).normal(size=(16, 16)))[0]
    perm = np.random.default_rng(5).permutation(len(y))
    shift = np.full(16, 7.5)
    base = nc1(h, y)
    for hh, yy in [(-3.7 * h, y), (h + shift, y), (h @ q, y), (h[perm], y[perm])]:
        assert rel(nc1(hh, yy), base) <= 1e-9
    for hh in [0.01 * h, h + shift]:
        assert rel(cdnv(hh, y), cdnv(h, y)) <= 1e-9
    assert rel(class_separation_r2(25.0 * h, y), class_separation_r2(h, y)) <= 1e-12
    assert rel(numerical_rank(3.0 * h, y), numerical_rank(h, y)) <= 1e-12
    b = h[:, :5] ** 2
    assert rel(linear_cka(h @ q * 4.0, b), linear_cka(h, b)) <= 1e-9


# ------------------------------------------------------------------ streaming


@pytest.mark.parametrize("case", ["imbalanced", "d_lt_k", "near_collapsed"])
def test_accumulator_equals_one_shot(case):
    h, y = make_data(**CASES[case], seed=6)
    k, d = int(y.max()) + 1, h.shape[1]
    acc = NC1Accumulator(k, d)
    for s in range(0, len(y), 37):  # batches that miss classes and hold single samples
        acc.update(torch.from_numpy(h[s : s + 37]).float(), torch.from_numpy(y[s : s + 37]))
    h32 = h.astype(np.float32)
    assert acc.num_samples == len(y)
    assert rel(acc.compute(), nc1(h32, y)) <= 1e-9
    assert rel(acc.cdnv(), cdnv(h32, y)) <= 1e-9


def test_accumulator_merge_is_split_independent():
    h, y = make_data(500, 12, 5, std=1e-3, seed=7)
    whole = NC1Accumulator(5, 12).update(h, y)
    parts = [
        NC1Accumulator(5, 12).update(h[a:b], y[a:b]) for a, b in [(0, 3), (3, 240), (240, 500)]
    ]
    empty = NC1Accumulator(5, 12)
    merged = empty.merge(parts[2]).merge(parts[0]).merge(parts[1])
    assert merged.num_samples == 500
    assert rel(merged.compute(), whole.compute()) <= 1e-9
    assert rel(merged.compute(), nc1(h, y)) <= 1e-9
    assert rel(merged.cdnv(), cdnv(h, y)) <= 1e-9


def test_accumulator_errors():
    acc = NC1Accumulator(3, 4)
    with pytest.raises(MetricInputError, match="built for dim=4 but the batch has d = 5"):
        acc.update(np.zeros((2, 5)), np.array([0, 1]))
    with pytest.raises(MetricInputError, match=r"label 3 is outside \[0, 3\)"):
        acc.update(np.ones((2, 4)), np.array([0, 3]))
    acc.update(np.ones((2, 4)), np.array([0, 1]))
    with pytest.raises(MetricInputError, match="1 of num_classes=3 classes have no sample yet"):
        acc.compute()
    with pytest.raises(MetricInputError, match="cannot merge .* num_classes=2, dim=4"):
        acc.merge(NC1Accumulator(2, 4))
    with pytest.raises(MetricInputError, match="num_classes must be an int >= 2"):
        NC1Accumulator(1, 4)


# ------------------------------------------------------------------ input errors


ALL = [nc1, cdnv, numerical_rank, class_separation_r2]


@pytest.mark.parametrize("fn", ALL)
def test_input_errors(fn):
    h, y = make_data(60, 5, 3)
    with pytest.raises(MetricInputError, match=r"must be a 2-D \(N, d\) matrix, got shape \(60,\)"):
        fn(h[:, 0], y)
    with pytest.raises(MetricInputError, match="N = 60 rows but labels have 59 entries"):
        fn(h, y[:-1])
    with pytest.raises(
        MetricInputError, match=r"integer dtype, got torch.float64. Cast with .long"
    ):
        fn(h, y.astype(np.float64))
    with pytest.raises(MetricInputError, match="1-D array of N class ids"):
        fn(h, np.eye(3, dtype=np.int64)[y])
    with pytest.raises(MetricInputError, match="at least 2 classes, got 1"):
        fn(h, np.zeros(60, dtype=np.int64))
    with pytest.raises(
        MetricInputError, match=r"1 of num_classes=4 classes have no sample \(class 3\)"
    ):
        fn(h, y, num_classes=4)
    with pytest.raises(MetricInputError, match=r"label 2 is outside \[0, 2\)"):
        fn(h, y, num_classes=2)
    bad = h.copy()
    bad[7, 2], bad[9, 0] = np.nan, np.inf
    with pytest.raises(MetricInputError, match="2 non-finite value.*first is at row 7, column 2"):
        fn(torch.from_numpy(bad), torch.from_numpy(y))


def test_degenerate_inputs():
    h = np.random.default_rng(8).normal(size=(40, 6))
    y = np.tile([0, 1], 20)
    same = np.concatenate([h[:20], h[:20]])  # both classes hold the same points
    with pytest.raises(MetricInputError, match="class means are identical.*NC1 is undefined"):
        nc1(same, np.repeat([0, 1], 20))
    with pytest.raises(MetricInputError, match="classes 0 and 1 .* identical means"):
        cdnv(same, np.repeat([0, 1], 20))
    with pytest.raises(MetricInputError, match="all zero .*first: row 3"):
        class_separation_r2(np.where(np.arange(40)[:, None] == 3, 0.0, h), y)
    with pytest.raises(MetricInputError, match="class 1 .* all-zero features"):
        numerical_rank(np.where(y[:, None] == 1, 0.0, h), y)
    with pytest.raises(MetricInputError, match="N = 40 rows but features_b has 39"):
        linear_cka(h, h[:-1])
    with pytest.raises(MetricInputError, match="features_b is constant"):
        linear_cka(h, np.ones((40, 3)))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_matches_cpu():
    h, y = make_data(**CASES["imbalanced"])
    hc, yc = torch.from_numpy(h).float().cuda(), torch.from_numpy(y).cuda()
    assert rel(nc1(hc, yc), ref_nc1(hc.cpu().numpy(), y)) <= 1e-6
    acc = NC1Accumulator(6, 32, device="cuda").update(hc, yc)
    assert rel(acc.compute(), nc1(hc, yc)) <= 1e-9
    assert rel(cdnv(hc, yc), cdnv(h.astype(np.float32), y)) <= 1e-9
