"""Neural-collapse and representation metrics: pure tensor maths, no models.

Every function takes features ``H`` (N x d; a torch tensor on any device, computed on that
device, or a NumPy array) and, where it needs them, integer class labels ``y`` of shape (N,).
Labels are class ids. With ``num_classes=None`` the K classes are the distinct label values,
remapped in sorted order to 0..K-1 (so labels may skip values or be negative); with
``num_classes=K`` every label must lie in [0, K) and every class must have a sample. All sums
are accumulated in float64, whatever the input dtype. Bad input raises
:class:`~ncfinetune.errors.MetricInputError`, never a silent NaN. On CPU, each calling thread
keeps one float64 scratch buffer (~10-20 MiB, at most 64 MiB) between calls, for speed.

Definitions (SPEC section 3): ``mu_k`` is the mean of class k, ``mu_G`` the unweighted mean of
the K class means.

The streaming (one-pass, mergeable) NC1 lives in :mod:`ncfinetune.metrics_stream` and is
re-exported here as ``NC1Accumulator``.
"""

from __future__ import annotations

import threading
import warnings
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from ncfinetune.errors import MetricInputError

if TYPE_CHECKING:
    from ncfinetune.metrics_stream import NC1Accumulator

__all__ = [
    "NC1Accumulator",
    "cdnv",
    "class_separation_r2",
    "linear_cka",
    "nc1",
    "numerical_rank",
]

_EPS64 = float(torch.finfo(torch.float64).eps)
# Rows of float64 scratch per chunk: ~8 MiB on CPU keeps the working set in L2/L3 and gives
# MKL's skinny dgemm enough rows (measured on the 2-core benchmark CPU: 2-3x faster than
# whole-array float64 copies, whose page faults and DRAM traffic dominate); larger on
# accelerators, where each chunk costs a few kernel launches.
_CPU_CHUNK_BYTES = 8 * 2**20
_GPU_CHUNK_BYTES = 256 * 2**20
_SCRATCH = threading.local()  # per-thread CPU work buffer, see _scratch
_SCRATCH_MAX_BYTES = 64 * 2**20
_HUGE_PAGE = 2 * 2**20
# nc1 projects raw features when rounding provably costs less than this relative error.
_FAST_PATH_RTOL = 1e-8


# --------------------------------------------------------------------------- input checks


def _as_tensor(x: Any, what: str) -> torch.Tensor:
    if isinstance(x, torch.Tensor):
        return x.detach()
    arr = np.asarray(x)
    if arr.dtype == object:
        raise MetricInputError(
            f"{what} could not be read as a numeric array (got {type(x).__name__} of objects). "
            "Pass a torch tensor or a NumPy array."
        )
    with warnings.catch_warnings():  # read-only arrays are fine: we never write into them
        warnings.simplefilter("ignore", UserWarning)
        return torch.from_numpy(arr)


def _check_features(features: Any, what: str = "features") -> torch.Tensor:
    """The features as a 2-D real tensor (not copied, not cast)."""
    h = _as_tensor(features, what)
    if h.ndim != 2:
        raise MetricInputError(
            f"{what} must be a 2-D (N, d) matrix, got shape {tuple(h.shape)}. "
            "Flatten or pool each example to one vector, e.g. features.reshape(len(features), -1)."
        )
    if h.is_complex() or h.dtype == torch.bool:
        raise MetricInputError(
            f"{what} must be real numbers, got dtype {h.dtype}. Cast with .float()."
        )
    if h.shape[1] == 0:
        raise MetricInputError(f"{what} has d = 0 feature dimensions; pass at least one.")
    return h


def _raise_non_finite(h: torch.Tensor, what: str = "features") -> None:
    """Raise if ``h`` holds NaN or inf, saying how many and where the first one is."""
    bad = ~torch.isfinite(h)
    count = int(bad.sum())
    if count == 0:
        return
    flat = int(torch.argmax(bad.reshape(-1).to(torch.uint8)))
    row, col = divmod(flat, h.shape[1])
    raise MetricInputError(
        f"{what} contain {count} non-finite value(s) (NaN or inf); the first is at row {row}, "
        f"column {col} ({float(h[row, col])}). Metrics are undefined for them: drop or fix "
        "those rows (e.g. check the model for overflow in half precision)."
    )


def _label_ids(labels: Any, n: int, device: torch.device) -> torch.Tensor:
    """Labels checked for shape, integer dtype and length; returned as int64 on ``device``."""
    y = _as_tensor(labels, "labels")
    if y.ndim != 1:
        raise MetricInputError(
            f"labels must be a 1-D array of N class ids, got shape {tuple(y.shape)}. "
            "Pass class indices, not one-hot rows (use labels.argmax(1))."
        )
    if y.dtype == torch.bool or y.is_floating_point() or y.is_complex():
        raise MetricInputError(
            f"labels must have an integer dtype, got {y.dtype}. Cast with .long() "
            "(or .astype(np.int64)) if they hold whole-number class ids."
        )
    if y.shape[0] != n:
        raise MetricInputError(
            f"features have N = {n} rows but labels have {y.shape[0]} entries; "
            "pass one label per feature row."
        )
    return y.to(device=device, dtype=torch.int64)


def _check_range(y: torch.Tensor, k: int) -> None:
    """Raise unless every label lies in [0, k)."""
    if y.numel() == 0:
        return
    lo, hi = int(y.min()), int(y.max())
    if lo < 0 or hi >= k:
        raise MetricInputError(
            f"label {lo if lo < 0 else hi} is outside [0, {k}) for num_classes={k}. Remap the "
            "labels to 0..num_classes-1, or pass num_classes=None to use the distinct labels."
        )


def _check_labels(
    labels: Any, n: int, device: torch.device, num_classes: int | None
) -> tuple[torch.Tensor, int, torch.Tensor]:
    """Validate labels; return (class ids in [0, K) as int64 on ``device``, K, counts per class)."""
    y = _label_ids(labels, n, device)
    if num_classes is None:
        _, y, counts = torch.unique(y, sorted=True, return_inverse=True, return_counts=True)
        k = int(counts.numel())
    else:
        if isinstance(num_classes, bool) or not isinstance(num_classes, int | np.integer):
            raise MetricInputError(
                f"num_classes must be an int or None, got {num_classes!r}. Pass the number of "
                "classes, or None to use the distinct labels."
            )
        k = int(num_classes)
        _check_range(y, k)
        counts = torch.bincount(y, minlength=max(k, 0))
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
    return y, k, counts


def _chunk_rows(d: int, device: torch.device) -> int:
    budget = _CPU_CHUNK_BYTES if device.type == "cpu" else _GPU_CHUNK_BYTES
    return max(64, budget // (8 * d))


def _scratch(device: torch.device, *shapes: tuple[int, int]) -> list[torch.Tensor]:
    """float64 work arrays of the given shapes, carved from one buffer.

    On CPU the buffer starts on a 2 MiB boundary (so Linux can back it with transparent huge
    pages) and is kept per thread between calls (up to 64 MiB). Measured on the 2-core VM the
    benchmark runs on: an unaligned fresh buffer per call made nc1 up to 2x slower at d = 2048,
    K = 10, depending on whether it happened to get huge pages (TLB misses in the chunked
    copy/GEMM) and on page faults (~15 us per 4 KiB page there). Accelerators use torch's
    caching allocator instead.
    """
    sizes = [rows * cols for rows, cols in shapes]
    total = sum(sizes)
    if device.type != "cpu":
        buf = torch.empty(total, dtype=torch.float64, device=device)
    else:
        buf = getattr(_SCRATCH, "buf", None)
        if buf is None or buf.numel() < total:
            raw = torch.empty(total * 8 + _HUGE_PAGE, dtype=torch.uint8)
            start = -raw.data_ptr() % _HUGE_PAGE
            buf = raw[start : start + total * 8].view(torch.float64)
            if total * 8 <= _SCRATCH_MAX_BYTES:
                _SCRATCH.buf = buf
    views, start = [], 0
    for shape, size in zip(shapes, sizes, strict=True):
        views.append(buf[start : start + size].view(shape))
        start += size
    return views


def _float64_chunks(h: torch.Tensor, buf: torch.Tensor | None):
    """Yield (start, end, rows start:end of ``h`` as float64), copied into ``buf`` (rows x d).

    Chunking keeps the float64 copy small (cache-resident on CPU) instead of doubling the
    memory of H; float64 input is passed through without a copy (``buf`` may then be None).
    """
    n = h.shape[0]
    rows = _chunk_rows(h.shape[1], h.device)
    for s in range(0, n, rows):
        e = min(n, s + rows)
        if h.dtype == torch.float64:
            yield s, e, h[s:e]
            continue
        b = buf[: e - s]
        b.copy_(h[s:e])  # float32/16 -> float64 is exact
        yield s, e, b


def _class_sums(h: torch.Tensor, y: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-class sums of the rows of ``h`` (K x d) and ||H||_F**2, float64, one pass over ``h``."""
    n, d = h.shape
    sums = torch.zeros(k, d, dtype=torch.float64, device=h.device)
    fro2 = torch.zeros((), dtype=torch.float64, device=h.device)
    (buf,) = _scratch(h.device, (min(n, _chunk_rows(d, h.device)), d))
    for s, e, b in _float64_chunks(h, buf):
        sums.index_add_(0, y[s:e], b)
        flat = b.reshape(-1)
        fro2 += torch.dot(flat, flat)
    return sums, fro2


def _class_means(
    h: torch.Tensor, y: torch.Tensor, k: int, counts: torch.Tensor
) -> tuple[torch.Tensor, float]:
    """Class means (K x d, float64) and ||H||_F**2; raises on non-finite features."""
    sums, fro2 = _class_sums(h, y, k)
    # Any NaN/inf in h makes its class sum non-finite, so this check is free; the exact count
    # and position are only looked up when it fails.
    if not bool(torch.isfinite(sums).all()):
        _raise_non_finite(h)
        raise MetricInputError(
            "the class sums of the features overflow float64 (values near 1e308). "
            "Rescale the features, e.g. divide by their largest absolute value."
        )
    return sums / counts.to(sums)[:, None], float(fro2)


def _between_directions(means: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The range of Sigma_B as (U, s): Sigma_B = U diag(s**2 / K) U^T, U with orthonormal columns.

    ``means`` is K x d (float64); we take the SVD of the d x K centred means M instead of forming
    Sigma_B = (1/K) M M^T. Pinv cutoff: s_j**2 / K counts only if s_j**2 > max(d, K) * eps64 *
    s_max**2 (see :func:`nc1`). A zero singular value of M comes out as ~eps * s_max, i.e. an
    eigenvalue ~eps**2 * s_max**2 of Sigma_B, far below the cutoff; an eigen-solver on the dense
    Sigma_B would return ~eps * s_max**2, close to it.
    """
    k, d = means.shape
    centred = means - means.mean(0, keepdim=True)
    scale = float(torch.linalg.vector_norm(means))
    spread = float(torch.linalg.vector_norm(centred))
    # Means equal up to rounding: Sigma_B is zero and NC1 = trace(Sigma_W pinv(0)) is meaningless.
    if spread <= max(d, k) * _EPS64 * scale or spread == 0.0:
        raise MetricInputError(
            f"all {k} class means are identical (between-class spread {spread:.3g} vs mean norm "
            f"{scale:.3g}), so Sigma_B = 0 and NC1 is undefined. Check that the labels match "
            "the features (e.g. not shuffled independently)."
        )
    u, s, _ = torch.linalg.svd(centred.T, full_matrices=False)
    keep = s.square() > max(d, k) * _EPS64 * s[0].square()
    return u[:, keep].contiguous(), s[keep]


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

    Invariant (tested) to permuting the samples, scaling the features by any c != 0, adding a
    constant vector, and rotating the features by an orthogonal matrix.

    Args:
        features: N x d feature matrix (torch tensor on any device, or NumPy array).
        labels: N integer class ids (see the module docstring for how they are read).
        num_classes: the number of classes K if labels are already 0..K-1 (then every class
            must have a sample), or None to use the distinct label values.

    Returns:
        NC1 as a Python float (>= 0).

    Raises:
        MetricInputError: on bad shapes or dtypes, fewer than 2 classes, an empty class,
            non-finite features, or identical class means (NC1 undefined).
    """
    h = _check_features(features)
    n, d = h.shape
    y, k, counts = _check_labels(labels, n, h.device, num_classes)
    means, fro2 = _class_means(h, y, k, counts)
    u, s = _between_directions(means)
    w = 1.0 / s.square()
    # Fast path: project the raw features and subtract mu_y U afterwards (no centring pass).
    # That subtraction cancels ||h|| against the within-class spread, so bound the damage:
    # each entry of H U and mu U is off by at most gamma_d (||h_i|| + ||mu_k||) (Higham's
    # dot-product bound), i.e. sum_i err_ij**2 <= e2 = 4 gamma_d**2 ||H||_F**2 for every j.
    sq = _projected_squares(h, y, means, u, centre=False)
    gamma = d * _EPS64 / (1.0 - d * _EPS64)
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
    # _scratch for why).
    n, d = h.shape
    r = u.shape[1]
    rows = min(n, _chunk_rows(d, h.device))
    ut = u.T.contiguous()
    means_ut = ut @ means.T  # r x K
    sq = torch.zeros(r, dtype=torch.float64, device=h.device)
    buf, gathered, zt_buf, gz_buf = _scratch(
        h.device, (rows, d), (rows if centre else 0, d), (r, rows), (r, rows)
    )
    owned = h.dtype != torch.float64  # b is our scratch copy, not a view of the input
    for s, e, b in _float64_chunks(h, buf):
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
    their distances. Scale- and translation-invariant (tested). Distances between means come
    from a K x K Gram of the centred means; near-zero entries are recomputed directly, so two
    coinciding means are detected exactly.

    Args:
        features: N x d feature matrix (torch tensor or NumPy array).
        labels: N integer class ids.
        num_classes: K if labels are 0..K-1, or None to use the distinct labels.

    Returns:
        CDNV as a Python float (>= 0).

    Raises:
        MetricInputError: on bad input (see :func:`nc1`) or two classes with the same mean.
    """
    h = _check_features(features)
    n, d = h.shape
    y, k, counts = _check_labels(labels, n, h.device, num_classes)
    means, _ = _class_means(h, y, k, counts)
    within = torch.zeros(k, dtype=torch.float64, device=h.device)
    rows = min(n, _chunk_rows(d, h.device))
    buf, gathered = _scratch(h.device, (rows, d), (rows, d))
    for s, e, b in _float64_chunks(h, buf):
        g = gathered[: e - s]
        torch.index_select(means, 0, y[s:e], out=g)
        dev = b.sub_(g) if h.dtype != torch.float64 else b - g
        within.index_add_(0, y[s:e], dev.square_().sum(1))
    var = within / counts.to(within)
    return _cdnv_from_stats(means, var)


def _cdnv_from_stats(means: torch.Tensor, var: torch.Tensor) -> float:
    k = means.shape[0]
    c = means - means.mean(0, keepdim=True)
    gram = c @ c.T
    sqn = gram.diagonal()
    dist2 = (sqn[:, None] + sqn[None, :] - 2.0 * gram).clamp_min(0.0)
    # The Gram form loses digits for pairs much closer than the spread; redo those directly.
    close = torch.nonzero(dist2 <= 1e-6 * float(sqn.max())).T
    i, j = close[0], close[1]
    dist2[i, j] = (means[i] - means[j]).square().sum(1)
    off = ~torch.eye(k, dtype=torch.bool, device=means.device)
    same = torch.nonzero((dist2 == 0) & off)
    if same.numel():
        a, b = same[0].tolist()
        raise MetricInputError(
            f"classes {a} and {b} (after remapping to 0..K-1) have identical means, so CDNV "
            "divides by zero. Check the labels, or merge the two classes."
        )
    ratio = (var[:, None] + var[None, :]) / (2.0 * dist2.masked_fill(~off, 1.0))
    return float(ratio[off].mean())


def numerical_rank(features: Any, labels: Any, num_classes: int | None = None) -> float:
    """Mean numerical rank of the class feature matrices (paper App. A).

    (1/K) sum_k ||H_k||_F**2 / ||H_k||_2**2, where H_k holds the class-k rows as they are: NOT
    centred, following the SPEC / paper definition (so it is not translation-invariant). Each
    term lies in [1, min(N_k, d)]; smaller means the class spans fewer directions.
    Scale-invariant. ||H_k||_2**2 is the largest eigenvalue of the smaller Gram matrix of H_k
    (N_k x N_k or d x d, float64), which has the same relative accuracy as an SVD for that value.

    Args:
        features: N x d feature matrix (torch tensor or NumPy array).
        labels: N integer class ids.
        num_classes: K if labels are 0..K-1, or None to use the distinct labels.

    Returns:
        The mean numerical rank as a Python float.

    Raises:
        MetricInputError: on bad input (see :func:`nc1`) or a class whose features are all zero.
    """
    h = _check_features(features)
    n, d = h.shape
    y, k, _ = _check_labels(labels, n, h.device, num_classes)
    _raise_non_finite(h)
    order = torch.argsort(y, stable=True)
    groups = torch.split(order, torch.bincount(y, minlength=k).tolist())
    total = 0.0
    for cls, idx in enumerate(groups):  # one eigen-solve per class, K in all
        hk = h[idx].to(torch.float64)
        gram = hk @ hk.T if hk.shape[0] <= d else hk.T @ hk
        top = float(torch.linalg.eigvalsh(gram)[-1])
        if top <= 0.0:
            raise MetricInputError(
                f"class {cls} (after remapping to 0..K-1) has all-zero features, so its "
                "numerical rank ||H_k||_F^2 / ||H_k||_2^2 is 0/0. Drop that class."
            )
        total += float(gram.trace()) / top
    return total / k


def class_separation_r2(features: Any, labels: Any, num_classes: int | None = None) -> float:
    """Class separation R^2 of Kornblith et al. (2021, eq. 11), with cosine distance.

    R^2 = 1 - d_within / d_total, where d_within = (1/K) sum_k mean over all N_k**2 ordered
    pairs (m, n) of class k of (1 - cos(x_m, x_n)), and d_total = (1/K**2) sum_{j,k} mean over
    the N_j N_k pairs across classes j and k (class-weighted, as in the paper). Following the
    paper's formula, the pairs include m == n (distance 0). In [0, 1]; 1 means each class
    collapses to one direction. Scale-invariant per example (tested).

    Computed in O(N d) through class means m_k of the L2-normalised rows u_i: the mean of
    1 - cos over class k is (1/N_k) sum_i ||u_i - m_k||**2 (no 1 - ||m_k||**2 cancellation), and
    d_total = d_within + (1/K) sum_k ||m_k - mean_j m_j||**2.

    Args:
        features: N x d feature matrix (torch tensor or NumPy array).
        labels: N integer class ids.
        num_classes: K if labels are 0..K-1, or None to use the distinct labels.

    Returns:
        R^2 as a Python float.

    Raises:
        MetricInputError: on bad input (see :func:`nc1`), an all-zero row (cosine undefined),
            or all examples pointing the same way (d_total = 0).
    """
    h = _check_features(features)
    n, d = h.shape
    y, k, counts = _check_labels(labels, n, h.device, num_classes)
    _raise_non_finite(h)
    u = h.to(torch.float64)
    norms = torch.linalg.vector_norm(u, dim=1, keepdim=True)
    zero = torch.nonzero(norms.flatten() == 0).flatten()
    if zero.numel():
        raise MetricInputError(
            f"{zero.numel()} feature row(s) are all zero (first: row {int(zero[0])}); cosine "
            "similarity is undefined for them. Drop those rows."
        )
    u = u / norms
    m = torch.zeros(k, d, dtype=torch.float64, device=h.device).index_add_(0, y, u)
    m /= counts.to(m)[:, None]
    within = torch.zeros(k, dtype=torch.float64, device=h.device)
    within.index_add_(0, y, (u - m[y]).square().sum(1))
    d_within = float((within / counts.to(within)).mean())
    d_total = d_within + float((m - m.mean(0)).square().sum(1).mean())
    if d_total <= 0.0:
        raise MetricInputError(
            "every example points in the same direction, so the mean cosine distance is 0 "
            "and R^2 is 0/0. Pass features that vary in direction."
        )
    return 1.0 - d_within / d_total


def linear_cka(features_a: Any, features_b: Any) -> float:
    """Linear centred kernel alignment between two representations of the same N examples.

    CKA = ||A_c^T B_c||_F**2 / (||A_c^T A_c||_F ||B_c^T B_c||_F) with column-centred A_c (N x
    d_a) and B_c (N x d_b); d_a and d_b may differ. In [0, 1]; 1 means the representations agree
    up to an orthogonal transform and isotropic scaling, to which CKA is invariant (tested).
    Uses the d x d feature-space form when d_a + d_b <= N, otherwise the equal N x N Gram form
    <A_c A_c^T, B_c B_c^T>, whichever is cheaper; float64 throughout.

    Args:
        features_a: N x d_a matrix (torch tensor or NumPy array).
        features_b: N x d_b matrix for the same examples, in the same order.

    Returns:
        Linear CKA as a Python float.

    Raises:
        MetricInputError: on non-2-D input, differing N, non-finite values, or a representation
            that is constant over the examples (CKA 0/0).
    """
    a = _check_features(features_a, "features_a")
    b = _check_features(features_b, "features_b")
    if a.shape[0] != b.shape[0]:
        raise MetricInputError(
            f"features_a has N = {a.shape[0]} rows but features_b has {b.shape[0]}; CKA compares "
            "two representations of the same examples, so pass matching rows."
        )
    _raise_non_finite(a, "features_a")
    _raise_non_finite(b, "features_b")
    b = b.to(device=a.device)
    a = a.to(torch.float64)
    b = b.to(torch.float64)
    a = a - a.mean(0)
    b = b - b.mean(0)
    if a.shape[1] + b.shape[1] <= a.shape[0]:
        cross = torch.linalg.matrix_norm(a.T @ b).square()
        na, nb = torch.linalg.matrix_norm(a.T @ a), torch.linalg.matrix_norm(b.T @ b)
    else:
        ka, kb = a @ a.T, b @ b.T
        cross = (ka * kb).sum()
        na, nb = torch.linalg.matrix_norm(ka), torch.linalg.matrix_norm(kb)
    if float(na) == 0.0 or float(nb) == 0.0:
        which = "features_a" if float(na) == 0.0 else "features_b"
        raise MetricInputError(
            f"{which} is constant over the {a.shape[0]} examples (zero after centring), so CKA "
            "is 0/0. Pass a representation that varies across examples."
        )
    return float(cross / (na * nb))


def __getattr__(name: str) -> Any:
    # Lazy re-export: metrics_stream imports the helpers above, so importing it eagerly here
    # would be circular.
    if name == "NC1Accumulator":
        from ncfinetune.metrics_stream import NC1Accumulator

        return NC1Accumulator
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
