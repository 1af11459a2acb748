"""Neural-collapse and representation metrics: pure tensor maths, no models.

Every function takes features ``H`` (N x d; a torch tensor on any device, computed on that
device, or a NumPy array) and, where it needs them, class labels ``y`` of length N.

Labels: integer labels (a tensor, an integer array, or a list of ints / NumPy ints) are class
ids. With ``num_classes=None`` the K classes are the distinct label values, remapped in sorted
order to 0..K-1 (so labels may skip values or be negative); with ``num_classes=K`` every label
must lie in [0, K) and every class must have a sample. Any other hashable labels (strings,
tuples, mixed types, e.g. ``["cat", "dog", ...]`` or ``[(0, "a"), ...]``) are accepted too: the
K classes are then their distinct values (labels that compare equal, such as 1 and 1.0, are one
class), and ``num_classes``, if given, must equal K. Float, bool and complex label *arrays*,
unhashable labels (lists, arrays) and missing labels (None, NaN) are errors that name them.

Scale and dtype: all sums are accumulated in float64, whatever the input dtype (float16,
bfloat16, float32 and integers are cast exactly). NC1, CDNV, numerical rank, class-separation
R^2 and linear CKA are invariant to a global scale of the features, and are computed so that
they stay so at any magnitude float64 can hold: float64 features of magnitude outside
[2**-64, 2**64] (e.g. 1e-200 or 1e200, where sums of squares would underflow to 0 or overflow
to inf) are first rescaled by a power of two, which is exact. (Other dtypes never need it.)

Bad input raises :class:`~ncfinetune.errors.MetricInputError` (a ``ValueError``) saying what
was received and how to fix it, never a silent NaN or inf: wrong shapes or label count, fewer
than 2 classes, an empty class, NaN/inf features (how many, in which rows), and all-zero
features (every metric here is 0/0 for them; we raise rather than pick a value). On CPU, each
calling thread keeps one float64 scratch buffer (~10-20 MiB, at most 64 MiB) between calls,
for speed.

Definitions (SPEC section 3): ``mu_k`` is the mean of class k, ``mu_G`` the unweighted mean of
the K class means.

The streaming (one-pass, mergeable) NC1 is :class:`ncfinetune.metrics.stream.NC1Accumulator`;
import it from there. The input checks and float64 passes that both modules use live in
:mod:`ncfinetune.metrics._core` and :mod:`ncfinetune.metrics._labels`.
"""

from __future__ import annotations

from typing import Any

import torch

from ncfinetune.errors import MetricInputError
from ncfinetune.metrics._core import (
    EPS64,
    between_directions,
    cdnv_from_stats,
    check_features,
    chunk_rows,
    class_means,
    class_variances,
    float64_chunks,
    ldexp,
    max_abs,
    raise_all_zero,
    scale_exponent,
    scratch,
    unit_rows,
    unit_scale,
)
from ncfinetune.metrics._labels import check_labels

__all__ = [
    "cdnv",
    "class_separation_r2",
    "linear_cka",
    "nc1",
    "nc1_or_none",
    "numerical_rank",
]

# nc1 projects raw features when rounding provably costs less than this relative error.
_FAST_PATH_RTOL = 1e-8


# --------------------------------------------------------------------------- metrics


def nc1(features: Any, labels: Any, num_classes: int | None = None) -> float:
    """Within-class variability collapse NC1 = (1/K) trace(Sigma_W pinv(Sigma_B)).

    Sigma_W = (1/N) sum_i (h_i - mu_{y_i})(h_i - mu_{y_i})^T and Sigma_B = (1/K) sum_k
    (mu_k - mu_G)(mu_k - mu_G)^T. Smaller means more collapsed: 0 when every example sits on
    its class mean; values of order 1 or more mean the classes overlap in the between-class
    directions. Pinv cutoff: eigenvalues of Sigma_B at or below max(d, K) * eps64 times the
    largest count as zero, i.e. ``scipy.linalg.pinv``'s default relative cutoff on the d x d
    Sigma_B (identical when K <= d; when K > d the SPEC's max(d, K) is at most K/d stricter).

    Computed exactly without any d x d matrix: with Sigma_B = U diag(s**2/K) U^T (rank
    r <= K-1, from an SVD of the d x K centred means), NC1 = sum_j ||Z_j||**2 / (N s_j**2)
    where Z = (H - mu_y) U is N x r. Cost O(N d K) time; memory O(K d) plus an 8 MiB chunk: two
    chunked float64 passes over H (class sums and ||H||_F, then project). The projection is
    done as H U - mu_y U when a rigorous rounding bound shows that costs < 1e-8 relative error;
    otherwise (within-class spread below about d * 1e-7 of the feature norm: strong collapse) H
    is centred in float64 before projecting, in a third pass. Agrees with the dense formula to
    ~1e-12 relative in tests (required: 1e-6).

    Invariant (tested) to permuting the samples, scaling the features by any c != 0 (also at
    extreme magnitudes such as 1e-200 or 1e200, see the module docstring), adding a constant
    vector, and rotating the features by an orthogonal matrix. A class with a single sample is
    fine (it adds no within-class scatter).

    Args:
        features: N x d feature matrix (torch tensor on any device, or NumPy array).
        labels: N class labels: integer class ids or any hashable labels (see the module
            docstring for how they are read).
        num_classes: the number of classes K if labels are already 0..K-1 (then every class
            must have a sample), or None to use the distinct label values.

    Returns:
        NC1 as a finite Python float (>= 0).

    Raises:
        MetricInputError: on bad shapes or dtypes, a label count that differs from N, unusable
            labels (unhashable, None/NaN), fewer than 2 classes, an empty class, non-finite
            (NaN/inf) or all-zero features, or identical class means (NC1 undefined).
    """
    h = check_features(features)
    n, d = h.shape
    y, k, counts, _ = check_labels(labels, n, h.device, num_classes)
    h = unit_scale(h)  # raises on NaN/inf or all zeros; rescales extreme float64 exactly
    means, fro2 = class_means(h, y, k, counts)
    u, s = between_directions(means)
    w = 1.0 / s.square()
    # Fast path: project the raw features and subtract mu_y U afterwards (no centring pass).
    # That subtraction cancels ||h|| against the within-class spread, so bound the damage:
    # each entry of H U and mu U is off by at most gamma_d (||h_i|| + ||mu_k||) (Higham's
    # dot-product bound), i.e. sum_i err_ij**2 <= e2 = 4 gamma_d**2 ||H||_F**2 for every j.
    sq = _projected_squares(h, y, means, u, centre=False)
    gamma = d * EPS64 / (1.0 - d * EPS64)
    e2 = 4.0 * gamma**2 * fro2
    bound = float(((2.0 * (sq * e2).sqrt() + e2) * w).sum() / (sq * w).sum().clamp_min(1e-300))
    if not bound <= _FAST_PATH_RTOL:  # also catches inf/nan from overflow
        # Nearly collapsed features: centre in float64 first, which is exact up to rounding.
        sq = _projected_squares(h, y, means, u, centre=True)
    return float((sq * w).sum() / n)


def nc1_or_none(features: Any, labels: Any, num_classes: int | None = None) -> float | None:
    """:func:`nc1`, or ``None`` where the input is not measurable (for example identical class
    means after a degenerate run) instead of raising :class:`MetricInputError`. For reports
    over many runs, where one unmeasurable row should not stop the rest."""
    try:
        return nc1(features, labels, num_classes)
    except MetricInputError:
        return None


def _projected_squares(
    h: torch.Tensor, y: torch.Tensor, means: torch.Tensor, u: torch.Tensor, centre: bool
) -> torch.Tensor:
    """sum_i ((h_i - mu_{y_i}) U)_j**2 for each column j of U (float64), one pass over ``h``."""
    # Work with Z^T = U^T B^T (r x rows): MKL's dgemm runs this skinny product about 1.5x faster
    # than B U (r << d) on the benchmark CPU. Every per-chunk array lives in scratch (see
    # _core.scratch for why).
    n, d = h.shape
    r = u.shape[1]
    rows = min(n, chunk_rows(d, h.device))
    ut = u.T.contiguous()
    means_ut = ut @ means.T  # r x K
    sq = torch.zeros(r, dtype=torch.float64, device=h.device)
    buf, gathered, zt_buf, gz_buf = scratch(
        h.device, (rows, d), (rows if centre else 0, d), (r, rows), (r, rows)
    )
    owned = h.dtype != torch.float64  # b is our scratch copy, not a view of the input
    for s, e, b in float64_chunks(h, buf):
        zt, gz = zt_buf[:, : e - s], gz_buf[:, : e - s]
        if centre:
            g = gathered[: e - s]
            torch.index_select(means, 0, y[s:e], out=g)
            torch.mm(ut, (b.sub_(g) if owned else b - g).T, out=zt)
        else:
            torch.mm(ut, b.T, out=zt)
            torch.index_select(means_ut, 1, y[s:e], out=gz)
            zt.sub_(gz)
        sq += zt.square_().sum(1)
    return sq


def cdnv(features: Any, labels: Any, num_classes: int | None = None) -> float:
    """Class-distance normalised variance (paper App. A), averaged over ordered class pairs.

    CDNV = mean over k != l of (Var_k + Var_l) / (2 ||mu_k - mu_l||**2), with Var_k the mean
    squared distance of the class-k features to mu_k. Smaller means tighter classes relative to
    their distances. Scale- (at any magnitude, see the module docstring) and
    translation-invariant (tested). Distances between means come from a K x K Gram of the
    centred means; near-zero entries are recomputed directly, so two coinciding means are
    detected exactly. A class with a single sample has Var_k = 0, which is fine.

    Args:
        features: N x d feature matrix (torch tensor or NumPy array).
        labels: N class labels (integer ids or any hashable labels).
        num_classes: K if labels are 0..K-1, or None to use the distinct labels.

    Returns:
        CDNV as a finite Python float (>= 0).

    Raises:
        MetricInputError: on bad input (see :func:`nc1`, all-zero features included) or two
            classes with the same mean (up to float64 rounding).
    """
    h = check_features(features)
    n, d = h.shape
    y, k, counts, names = check_labels(labels, n, h.device, num_classes)
    h = unit_scale(h)
    means, _ = class_means(h, y, k, counts)
    var = class_variances(h, y, k, counts, means)
    return cdnv_from_stats(means, var, names)


def numerical_rank(features: Any, labels: Any, num_classes: int | None = None) -> float:
    """Mean numerical rank of the class feature matrices (paper App. A).

    (1/K) sum_k ||H_k||_F**2 / ||H_k||_2**2, where H_k holds the class-k rows as they are: NOT
    centred, following the SPEC / paper definition (so it is not translation-invariant). Each
    term lies in [1, min(N_k, d)] (a class with one sample counts 1); smaller means the class
    spans fewer directions. Scale-invariant, also per class: each H_k is rescaled by a power of
    two to a largest magnitude in [0.5, 1) before its Gram matrix is formed, so the value is the
    same at any magnitude (1e-200 or 1e200 in float64 included). ||H_k||_2**2 is the largest
    eigenvalue of the smaller Gram matrix of H_k (N_k x N_k or d x d, float64), which has the
    same relative accuracy as an SVD for that value.

    Args:
        features: N x d feature matrix (torch tensor or NumPy array).
        labels: N class labels (integer ids or any hashable labels).
        num_classes: K if labels are 0..K-1, or None to use the distinct labels.

    Returns:
        The mean numerical rank as a finite Python float.

    Raises:
        MetricInputError: on bad input (see :func:`nc1`, all-zero features included) or a
            class whose features are all zero.
    """
    h = check_features(features)
    n, d = h.shape
    y, k, counts, names = check_labels(labels, n, h.device, num_classes)
    if max_abs(h) == 0.0:  # also raises on NaN/inf
        raise_all_zero(h)
    order = torch.argsort(y, stable=True)
    groups = torch.split(order, counts.tolist())
    total = 0.0
    for cls, idx in enumerate(groups):  # one eigen-solve per class, K in all
        hk = h[idx]
        top_abs = max_abs(hk)
        if top_abs == 0.0:
            raise MetricInputError(
                f"class {names[cls]!r} has all-zero features, so its numerical rank "
                "||H_k||_F^2 / ||H_k||_2^2 is 0/0. Drop that class (or those rows)."
            )
        hk = ldexp(hk.to(torch.float64), -scale_exponent(top_abs))
        gram = hk @ hk.T if hk.shape[0] <= d else hk.T @ hk
        total += float(gram.trace()) / float(torch.linalg.eigvalsh(gram)[-1])
    return total / k


def class_separation_r2(features: Any, labels: Any, num_classes: int | None = None) -> float:
    """Class separation R^2 of Kornblith et al. (2021, eq. 11), with cosine distance.

    R^2 = 1 - d_within / d_total, where d_within = (1/K) sum_k mean over all N_k**2 ordered
    pairs (m, n) of class k of (1 - cos(x_m, x_n)), and d_total = (1/K**2) sum_{j,k} mean over
    the N_j N_k pairs across classes j and k (class-weighted, as in the paper). Following the
    paper's formula, the pairs include m == n (distance 0). In [0, 1]; 1 means each class
    collapses to one direction. Scale-invariant per example (tested), at any magnitude: each
    row is divided by its largest magnitude before it is normalised, so no square overflows
    or underflows.

    Computed in O(N d) through class means m_k of the L2-normalised rows u_i: the mean of
    1 - cos over class k is (1/N_k) sum_i ||u_i - m_k||**2 (no 1 - ||m_k||**2 cancellation), and
    d_total = d_within + (1/K) sum_k ||m_k - mean_j m_j||**2.

    Args:
        features: N x d feature matrix (torch tensor or NumPy array).
        labels: N class labels (integer ids or any hashable labels).
        num_classes: K if labels are 0..K-1, or None to use the distinct labels.

    Returns:
        R^2 as a finite Python float.

    Raises:
        MetricInputError: on bad input (see :func:`nc1`, all-zero features included), an
            all-zero row (cosine undefined), or all examples pointing the same way (d_total
            = 0 up to float64 rounding of the normalised rows, so R^2 would be 0/0).
    """
    h = check_features(features)
    n, d = h.shape
    y, k, counts, _ = check_labels(labels, n, h.device, num_classes)
    u = unit_rows(h)
    m = torch.zeros(k, d, dtype=torch.float64, device=h.device).index_add_(0, y, u)
    m /= counts.to(m)[:, None]
    within = torch.zeros(k, dtype=torch.float64, device=h.device)
    within.index_add_(0, y, (u - m[y]).square().sum(1))
    d_within = float((within / counts.to(within)).mean())
    d_total = d_within + float((m - m.mean(0)).square().sum(1).mean())
    # Unit rows equal up to rounding differ by at most ~2 (d + 2) eps64 in norm: below that
    # (squared) d_total is rounding noise, not a direction spread, and R^2 is 0/0.
    if d_total <= (2 * (d + 2) * EPS64) ** 2:
        raise MetricInputError(
            f"every example points in the same direction (mean cosine distance {d_total:.3g}, "
            "zero up to float64 rounding), so R^2 is 0/0. Pass features that vary in direction."
        )
    return 1.0 - d_within / d_total


def linear_cka(features_a: Any, features_b: Any) -> float:
    """Linear centred kernel alignment between two representations of the same N examples.

    CKA = ||A_c^T B_c||_F**2 / (||A_c^T A_c||_F ||B_c^T B_c||_F) with column-centred A_c (N x
    d_a) and B_c (N x d_b); d_a and d_b may differ. In [0, 1]; 1 means the representations agree
    up to an orthogonal transform and isotropic scaling, to which CKA is invariant (tested),
    also at extreme magnitudes: each representation is rescaled by a power of two to a largest
    magnitude in [0.5, 1) before any product is formed (exact, and the fourth powers in CKA
    would otherwise overflow float64 from |x| ~ 1e77 on). Uses the d x d feature-space form
    when d_a + d_b <= N, otherwise the equal N x N Gram form <A_c A_c^T, B_c B_c^T>, whichever
    is cheaper; float64 throughout.

    Args:
        features_a: N x d_a matrix (torch tensor or NumPy array).
        features_b: N x d_b matrix for the same examples, in the same order.

    Returns:
        Linear CKA as a finite Python float.

    Raises:
        MetricInputError: on non-2-D input, differing N, fewer than 2 examples, non-finite
            values, or a representation that is constant over the examples (all zeros
            included; also when it varies only at float64 rounding level after centring), for
            which CKA is 0/0.
    """
    a = check_features(features_a, "features_a")
    b = check_features(features_b, "features_b")
    n = a.shape[0]
    if n != b.shape[0]:
        raise MetricInputError(
            f"features_a has N = {n} rows but features_b has {b.shape[0]}; CKA compares "
            "two representations of the same examples, so pass matching rows."
        )
    if n < 2:
        raise MetricInputError(
            f"CKA needs at least 2 examples, got N = {n}: a representation of fewer examples "
            "is constant, so CKA is 0/0. Pass more examples."
        )
    b = b.to(device=a.device)
    a, b = _centred_unit(a, "features_a"), _centred_unit(b, "features_b")
    if a.shape[1] + b.shape[1] <= n:
        cross = torch.linalg.matrix_norm(a.T @ b).square()
        na, nb = torch.linalg.matrix_norm(a.T @ a), torch.linalg.matrix_norm(b.T @ b)
    else:
        ka, kb = a @ a.T, b @ b.T
        cross = (ka * kb).sum()
        na, nb = torch.linalg.matrix_norm(ka), torch.linalg.matrix_norm(kb)
    return float(cross / (na * nb))


def _centred_unit(x: torch.Tensor, what: str) -> torch.Tensor:
    """``x`` in float64, scaled by a power of two to max |x| in [0.5, 1), columns centred.

    Raises if ``x`` holds NaN/inf or is constant over the rows (exactly, or up to rounding:
    ||X_c||_F <= 64 eps64 ||X||_F, i.e. the rows differ only in their last few bits, so X_c is
    the rounding noise of the centring), since CKA is then 0/0.
    """
    n = x.shape[0]
    m = max_abs(x, what)  # raises on NaN/inf
    x = ldexp(x.to(torch.float64), -scale_exponent(m)) if m > 0.0 else x.to(torch.float64)
    centred = x - x.mean(0)
    spread = float(torch.linalg.vector_norm(centred))
    size = float(torch.linalg.vector_norm(x))
    if bool((x == x[:1]).all()) or spread <= 64 * EPS64 * size:
        raise MetricInputError(
            f"{what} is constant over the {n} examples (zero after centring, up to float64 "
            f"rounding: spread {spread:.3g} vs norm {size:.3g}), so CKA is 0/0. Pass a "
            "representation that varies across examples."
        )
    return centred
