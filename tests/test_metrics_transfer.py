"""Transfer metrics (R@1, NMI, discriminative ratio, redundancy) against direct formulas written
here, their invariances at extreme scales, and their errors on degenerate input."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from sklearn.cluster import KMeans
from sklearn.metrics import normalized_mutual_info_score

from ncfinetune.errors import MetricInputError
from ncfinetune.metrics import discriminative_ratio, feature_redundancy, nmi, recall_at_1

N, D, K = 90, 6, 3


def make(seed: int = 0, n: int = N, d: int = D, k: int = K, sep: float = 0.7):
    """float64 features of k overlapping classes (so no metric sits at its bound), int labels."""
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % k
    mu = sep * torch.randn(k, d, generator=g, dtype=torch.float64)
    return mu[y] + torch.randn(n, d, generator=g, dtype=torch.float64), y


# ------------------------------------------------------------------ direct formulas


def ref_recall_at_1(h, y):
    h, y = np.asarray(h, np.float64), np.asarray(y)
    hits = 0
    for i in range(len(h)):
        best, best_j = -np.inf, None
        for j in range(len(h)):
            if j == i:
                continue
            cos = h[i] @ h[j] / (np.linalg.norm(h[i]) * np.linalg.norm(h[j]))
            if cos > best:
                best, best_j = cos, j
        hits += y[best_j] == y[i]
    return hits / len(h)


def ref_discriminative_ratio(h, y):
    h, y = np.asarray(h, np.float64), np.asarray(y)
    classes = np.unique(y)
    mu = [h[y == c].mean(0) for c in classes]
    c = len(classes)
    inter = sum(np.sum((mu[a] - mu[b]) ** 2) for a in range(c) for b in range(c) if a != b)
    intra = np.mean([np.mean(np.sum((h[y == k] - mu[i]) ** 2, 1)) for i, k in enumerate(classes)])
    return inter / (c * (c - 1)) / intra


def ref_redundancy(h):
    h = np.asarray(h, np.float64)
    d = h.shape[1]
    return sum(abs(np.corrcoef(h[:, i], h[:, j])[0, 1]) for i in range(d) for j in range(d)) / d**2


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_recall_at_1_matches_the_leave_one_out_loop(seed):
    h, y = make(seed)
    value = recall_at_1(h, y)
    assert value == ref_recall_at_1(h, y)
    assert 0.0 < value < 1.0  # overlapping classes: neither bound


def test_recall_at_1_on_separated_classes_is_one_and_on_random_labels_near_chance():
    h, y = make(sep=50.0)
    assert recall_at_1(h, y) == 1.0
    g = torch.Generator().manual_seed(5)
    noise = torch.randn(600, 8, generator=g, dtype=torch.float64)
    assert abs(recall_at_1(noise, torch.arange(600) % 4) - 0.25) < 0.07


def test_recall_at_1_blocks_agree_with_one_block(monkeypatch):
    import ncfinetune.metrics.transfer as transfer

    h, y = make(3)
    whole = recall_at_1(h, y)
    monkeypatch.setattr(transfer, "_SIMILARITY_BYTES", 8 * N * 7)  # 7 rows per block
    assert recall_at_1(h, y) == whole


@pytest.mark.parametrize("seed", [0, 1])
def test_nmi_is_sklearn_kmeans_then_arithmetic_nmi(seed):
    h, y = make(seed)
    x = (h - h.mean(0)).numpy()
    x = x / np.linalg.norm(x) * math.sqrt(N)
    clusters = KMeans(n_clusters=K, n_init=10, random_state=seed).fit_predict(x)
    ref = normalized_mutual_info_score(y.numpy(), clusters, average_method="arithmetic")
    value = nmi(h, y, seed=seed)
    assert value == pytest.approx(ref, abs=1e-12)
    assert 0.0 < value < 1.0
    assert nmi(h, y, seed=seed) == value  # deterministic for a seed


def test_nmi_is_one_for_separated_classes_whatever_the_label_names():
    h, y = make(sep=50.0)
    names = np.array(["cat", "dog", "eel"])[y.numpy()]
    assert nmi(h, names) == pytest.approx(1.0)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_discriminative_ratio_matches_the_pairwise_formula(seed):
    h, y = make(seed)
    assert discriminative_ratio(h, y) == pytest.approx(ref_discriminative_ratio(h, y), rel=1e-12)


def test_discriminative_ratio_with_unequal_classes():
    h, y = make(4)
    keep = torch.cat([torch.arange(0, N, 3), torch.arange(1, 40, 3), torch.arange(2, 20, 3)])
    h, y = h[keep], y[keep]
    assert discriminative_ratio(h, y) == pytest.approx(ref_discriminative_ratio(h, y), rel=1e-12)


@pytest.mark.parametrize("seed", [0, 1])
def test_feature_redundancy_matches_pearson_over_all_pairs(seed):
    h, _ = make(seed)
    h = h @ torch.randn(D, D, generator=torch.Generator().manual_seed(9), dtype=torch.float64)
    assert feature_redundancy(h) == pytest.approx(ref_redundancy(h.numpy()), rel=1e-12)


def test_feature_redundancy_bounds():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(5000, 4, generator=g, dtype=torch.float64)
    assert feature_redundancy(x) == pytest.approx(0.25, abs=0.02)  # diagonal only: 1/d
    copies = torch.cat([x[:, :1], 2 * x[:, :1] + 1, -x[:, :1]], 1)
    assert feature_redundancy(copies) == pytest.approx(1.0, abs=1e-12)


# ------------------------------------------------------------------ invariances


LABELLED = {
    "recall_at_1": recall_at_1,
    "nmi": nmi,
    "discriminative_ratio": discriminative_ratio,
    "feature_redundancy": lambda h, y: feature_redundancy(h),
}


@pytest.mark.parametrize("scale", [1e-300, 1e-30, 1e-3, 7.0, 1e30, 1e300])
@pytest.mark.parametrize("name", list(LABELLED))
def test_scale_invariance(name, scale):
    h, y = make()
    fn = LABELLED[name]
    base, scaled = fn(h, y), fn(h * scale, y)
    assert math.isfinite(scaled)
    assert scaled == pytest.approx(base, rel=1e-9)


@pytest.mark.parametrize("name", list(LABELLED))
def test_float32_and_rotation(name):
    h, y = make(1)
    fn = LABELLED[name]
    assert fn(h.float(), y) == pytest.approx(fn(h, y), rel=1e-5)
    if name != "feature_redundancy":  # a rotation mixes the columns, redundancy measures that
        q, _ = torch.linalg.qr(torch.randn(D, D, generator=torch.Generator().manual_seed(3),
                                           dtype=torch.float64))  # fmt: skip
        assert fn(h @ q, y) == pytest.approx(fn(h, y), rel=1e-9)


def test_translation_invariance_where_the_formula_has_it():
    h, y = make(2)
    shift = torch.full((D,), 3.0, dtype=torch.float64)
    assert discriminative_ratio(h + shift, y) == pytest.approx(discriminative_ratio(h, y), rel=1e-9)
    assert nmi(h + shift, y) == pytest.approx(nmi(h, y), abs=1e-12)
    assert feature_redundancy(h + shift) == pytest.approx(feature_redundancy(h), rel=1e-9)


# ------------------------------------------------------------------ degenerate input


@pytest.mark.parametrize("fn", [recall_at_1, nmi, discriminative_ratio])
def test_one_class_is_an_error(fn):
    h, _ = make()
    with pytest.raises(MetricInputError, match="at least 2 classes, got 1"):
        fn(h, torch.zeros(N, dtype=torch.long))


def test_constant_features_are_errors():
    h, y = make()
    const = torch.ones_like(h) * 3.0
    with pytest.raises(MetricInputError, match="same direction.*every nearest neighbour is a tie"):
        recall_at_1(const, y)
    with pytest.raises(MetricInputError, match=r"only 1 distinct vector\(s\) for K = 3 classes"):
        nmi(const, y)
    with pytest.raises(MetricInputError, match="within-class spread is zero"):
        discriminative_ratio(const, y)
    with pytest.raises(MetricInputError, match=r"6 of the 6 feature columns are constant"):
        feature_redundancy(const)
    dead = h.clone()
    dead[:, [1, 4]] = 0.0
    with pytest.raises(MetricInputError, match=r"columns \[1, 4\].*features.std\(0\) > 0"):
        feature_redundancy(dead)
    with pytest.raises(MetricInputError, match="all values are zero|all zero"):
        recall_at_1(torch.zeros_like(h), y)


def test_single_sample_classes_are_errors():
    h, _ = make(n=3)
    y = torch.arange(3)
    with pytest.raises(MetricInputError, match=r"3 class\(es\) have a single example \(0, 1, 2\)"):
        recall_at_1(h, y)
    with pytest.raises(MetricInputError, match="more examples than classes, got N = 3 for K = 3"):
        nmi(h, y)
    with pytest.raises(MetricInputError, match="every one of the 3 classes has a single example"):
        discriminative_ratio(h, y)
    with pytest.raises(MetricInputError, match="at least 2 examples, got N = 1"):
        feature_redundancy(h[:1])
    # one singleton among larger classes: R@1 names it; the others are defined
    h, y = make()
    y = y.clone()
    y[0] = 7
    with pytest.raises(MetricInputError, match=r"1 class\(es\) have a single example \(7\)"):
        recall_at_1(h, y)
    assert math.isfinite(discriminative_ratio(h, y)) and math.isfinite(nmi(h, y))


def test_collapsed_classes_make_the_ratio_an_error_not_inf():
    h, y = make()
    means = torch.stack([h[y == c].mean(0) for c in range(K)])
    with pytest.raises(MetricInputError, match="every class sits on one point"):
        discriminative_ratio(means[y], y)


def test_shared_input_errors():
    h, y = make()
    bad = h.clone()
    bad[4, 1] = float("nan")
    for fn in (recall_at_1, nmi, discriminative_ratio):
        with pytest.raises(MetricInputError, match="1 non-finite value.*row 4, column 1"):
            fn(bad, y)
        with pytest.raises(MetricInputError, match="N = 90 rows but labels have 89 entries"):
            fn(h, y[:-1])
    with pytest.raises(MetricInputError, match="1 non-finite value"):
        feature_redundancy(bad)
    with pytest.raises(MetricInputError, match=r"must be a 2-D \(N, d\) matrix"):
        feature_redundancy(h[:, 0])
    with pytest.raises(MetricInputError, match="n_init must be a positive int"):
        nmi(h, y, n_init=0)
    zero_row = h.clone()
    zero_row[5] = 0.0
    with pytest.raises(MetricInputError, match=r"1 feature row\(s\) are all zero \(first: row 5\)"):
        recall_at_1(zero_row, y)


def test_streamed_discriminative_ratio_equals_one_shot_at_any_batching_and_scale():
    from ncfinetune.metrics.stream import NC1Accumulator

    h, y = make(5)
    for scale, batch in ((1.0, 7), (1e-200, 32), (1e200, 90)):
        acc = NC1Accumulator(K, D)
        for s in range(0, N, batch):
            acc.update(h[s : s + batch] * scale, y[s : s + batch])
        assert acc.discriminative_ratio() == pytest.approx(discriminative_ratio(h, y), rel=1e-9)
    collapsed = NC1Accumulator(K, D)
    means = torch.stack([h[y == c].mean(0) for c in range(K)])
    collapsed.update(means[y], y)
    with pytest.raises(MetricInputError, match="every class sits on one point"):
        collapsed.discriminative_ratio()
