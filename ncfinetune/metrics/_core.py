"""Shared internals of the metrics: feature checks, float64 chunked passes, class statistics.

The lowest layer under :mod:`ncfinetune.metrics.collapse` (the one-shot metrics) and
:mod:`ncfinetune.metrics.stream` (the streaming :class:`NC1Accumulator`); it imports neither.
These names are public so both modules can share them, but they are building blocks for
those two modules, not part of the package API (``ncfinetune.__all__``): use the metrics
themselves. Conventions (float64 accumulation, :class:`~ncfinetune.errors.MetricInputError`
on bad input, the per-thread CPU scratch buffer, scale handling, labels) are described in
:mod:`ncfinetune.metrics.collapse`. Label checks live in :mod:`ncfinetune.metrics._labels`.
"""

from __future__ import annotations

import math
import threading
import warnings
from typing import Any

import numpy as np
import torch

from ncfinetune.errors import MetricInputError

__all__ = [
    "EPS64",
    "SAFE_EXPONENT",
    "as_tensor",
    "between_directions",
    "cdnv_from_stats",
    "discriminative_ratio_from_stats",
    "check_features",
    "chunk_rows",
    "class_means",
    "class_sums",
    "class_variances",
    "float64_chunks",
    "ldexp",
    "max_abs",
    "raise_all_zero",
    "raise_non_finite",
    "scale_exponent",
    "scratch",
    "shown_rows",
    "unit_rows",
    "unit_scale",
]

# float64 machine epsilon, the unit of every rank / pinv cutoff here and in the metrics.
EPS64 = float(torch.finfo(torch.float64).eps)
# Rows of float64 scratch per chunk: ~8 MiB on CPU keeps the working set in L2/L3 and gives
# MKL's skinny dgemm enough rows (measured on the 2-core benchmark CPU: 2-3x faster than
# whole-array float64 copies, whose page faults and DRAM traffic dominate); larger on
# accelerators, where each chunk costs a few kernel launches.
_CPU_CHUNK_BYTES = 8 * 2**20
_GPU_CHUNK_BYTES = 256 * 2**20
_SCRATCH = threading.local()  # per-thread CPU work buffer, see scratch
_SCRATCH_MAX_BYTES = 64 * 2**20
_HUGE_PAGE = 2 * 2**20
# float64 features whose largest magnitude lies in [2**-SAFE_EXPONENT, 2**SAFE_EXPONENT] are used
# as they are: every sum, Gram entry and fourth power the metrics form then stays far inside the
# float64 range (2**+-1022). Outside it they are first rescaled by a power of two (exact).
SAFE_EXPONENT = 64


# --------------------------------------------------------------------------- input checks


def as_tensor(x: Any, what: str) -> torch.Tensor:
    """``x`` as a detached torch tensor, without copying (NumPy arrays are shared).

    ``what`` names the argument in the error raised for object arrays (e.g. ragged lists).
    """
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


def check_features(features: Any, what: str = "features") -> torch.Tensor:
    """The features as a 2-D real tensor (not copied, not cast)."""
    h = as_tensor(features, what)
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


def shown_rows(idx: list[int], limit: int = 10) -> str:
    """Row numbers for a message: ``[3, 7, 9]`` or ``[3, 7, ...] (25 rows)``."""
    shown = ", ".join(map(str, idx[:limit]))
    return f"[{shown}]" if len(idx) <= limit else f"[{shown}, ...] ({len(idx)} rows)"


def raise_non_finite(h: torch.Tensor, what: str = "features") -> None:
    """Raise if ``h`` holds NaN or inf, saying how many, in which rows, and where the first is."""
    bad = ~torch.isfinite(h)
    count = int(bad.sum())
    if count == 0:
        return
    nans = int(torch.isnan(h).sum())
    rows = torch.nonzero(bad.any(1)).flatten().tolist()
    flat = int(torch.argmax(bad.reshape(-1).to(torch.uint8)))
    row, col = divmod(flat, h.shape[1])
    raise MetricInputError(
        f"{what} contain {count} non-finite value(s) ({nans} NaN, {count - nans} inf) in "
        f"{len(rows)} row(s) {shown_rows(rows)}; the first is at row {row}, column {col} "
        f"({float(h[row, col])}). Every value must be finite (metrics are undefined for NaN/inf): "
        "drop or fix those rows (e.g. check the model for overflow in half precision)."
    )


def max_abs(h: torch.Tensor, what: str = "features") -> float:
    """The largest magnitude in ``h`` (exact, any dtype; 0.0 if empty); raises on NaN/inf."""
    if h.numel() == 0:
        return 0.0
    lo, hi = torch.aminmax(h)  # one read of h, no copy; NaN propagates to both
    lo, hi = float(lo), float(hi)
    if not (math.isfinite(lo) and math.isfinite(hi)):
        raise_non_finite(h, what)
    return max(-lo, hi)


def scale_exponent(m: float) -> int:
    """e with m * 2**-e in [0.5, 1) for a finite m > 0 (0 for m = 0)."""
    return math.frexp(m)[1]


def ldexp(t: torch.Tensor, e: int) -> torch.Tensor:
    """``t * 2**e`` (exact for float64 unless it under/overflows); ``t`` itself when e = 0.

    Applied in steps of at most 2**+-1000, so that each factor is a normal float64.
    """
    while e:
        step = max(-1000, min(1000, e))
        t = t * 2.0**step
        e -= step
    return t


def unit_scale(h: torch.Tensor, what: str = "features") -> torch.Tensor:
    """``h`` made safe for float64 sums of squares (and Gram products) without changing a metric.

    Raises :class:`MetricInputError` on NaN/inf and on all-zero features (every metric here is
    0/0 for them). float64 input whose largest magnitude lies outside
    [2**-SAFE_EXPONENT, 2**SAFE_EXPONENT] comes back as a float64 copy scaled by a power of two
    to a largest magnitude in [0.5, 1): exact (each value keeps its digits), so the scale-
    invariant metrics give the same value, where the raw sums would overflow to inf (|h| ~ 1e200)
    or underflow to 0 (|h| ~ 1e-200). Other dtypes come back unchanged: float32/16, bfloat16
    and integers cannot leave the safe range once cast to float64 (float32 spans 2**+-149..128).
    """
    m = max_abs(h, what)
    if m == 0.0:
        raise_all_zero(h, what)
    e = scale_exponent(m)
    if h.dtype == torch.float64 and abs(e) > SAFE_EXPONENT:
        return ldexp(h, -e)
    return h


def unit_rows(h: torch.Tensor, what: str = "features") -> torch.Tensor:
    """The rows of ``h`` L2-normalised, float64, at any magnitude (for cosine similarities).

    Each row is divided by its largest magnitude before it is normalised, so no square overflows
    or underflows (1e-200 and 1e200 rows come out as the same unit vectors). Raises on NaN/inf,
    all-zero features and any all-zero row (its cosine similarity is undefined).
    """
    if max_abs(h, what) == 0.0:  # also raises on NaN/inf
        raise_all_zero(h, what)
    u = h.to(torch.float64)
    row_max = u.abs().amax(1, keepdim=True)
    zero = torch.nonzero(row_max.flatten() == 0).flatten()
    if zero.numel():
        raise MetricInputError(
            f"{zero.numel()} {what.removesuffix('s')} row(s) are all zero (first: row {int(zero[0])}); cosine "
            "similarity is undefined for them. Drop those rows."
        )
    u = u / row_max  # each row's largest entry is now +-1: its norm cannot under/overflow
    return u / torch.linalg.vector_norm(u, dim=1, keepdim=True)


def raise_all_zero(h: torch.Tensor, what: str = "features") -> None:
    """Raise the error for features whose values are all zero (``h`` is N x d)."""
    n, d = h.shape
    raise MetricInputError(
        f"{what} are all zero ({n} x {d} values), so the metric is 0/0 (undefined). Pass "
        "non-zero features: check that they were captured from the intended block (hook, "
        "pooling) and not from a zero-initialised buffer."
    )


# --------------------------------------------------------------------------- float64 passes


def chunk_rows(d: int, device: torch.device) -> int:
    """Rows per float64 chunk for d columns on ``device`` (~8 MiB on CPU, 256 MiB elsewhere)."""
    budget = _CPU_CHUNK_BYTES if device.type == "cpu" else _GPU_CHUNK_BYTES
    return max(64, budget // (8 * d))


def scratch(device: torch.device, *shapes: tuple[int, int]) -> list[torch.Tensor]:
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


def float64_chunks(h: torch.Tensor, buf: torch.Tensor | None):
    """Yield (start, end, rows start:end of ``h`` as float64), copied into ``buf`` (rows x d).

    Chunking keeps the float64 copy small (cache-resident on CPU) instead of doubling the
    memory of H; float64 input is passed through without a copy (``buf`` may then be None).
    """
    n = h.shape[0]
    rows = chunk_rows(h.shape[1], h.device)
    for s in range(0, n, rows):
        e = min(n, s + rows)
        if h.dtype == torch.float64:
            yield s, e, h[s:e]
            continue
        b = buf[: e - s]
        b.copy_(h[s:e])  # float32/16 -> float64 is exact
        yield s, e, b


def class_sums(h: torch.Tensor, y: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-class sums of the rows of ``h`` (K x d) and ||H||_F**2, float64, one pass over ``h``."""
    n, d = h.shape
    sums = torch.zeros(k, d, dtype=torch.float64, device=h.device)
    fro2 = torch.zeros((), dtype=torch.float64, device=h.device)
    (buf,) = scratch(h.device, (min(n, chunk_rows(d, h.device)), d))
    for s, e, b in float64_chunks(h, buf):
        sums.index_add_(0, y[s:e], b)
        flat = b.reshape(-1)
        fro2 += torch.dot(flat, flat)
    return sums, fro2


def class_means(
    h: torch.Tensor, y: torch.Tensor, k: int, counts: torch.Tensor
) -> tuple[torch.Tensor, float]:
    """Class means (K x d, float64) and ||H||_F**2; raises on non-finite features."""
    sums, fro2 = class_sums(h, y, k)
    # Any NaN/inf in h makes its class sum non-finite, so this check is free; the exact count
    # and position are only looked up when it fails.
    if not bool(torch.isfinite(sums).all()):
        raise_non_finite(h)
        raise MetricInputError(
            "the class sums of the features overflow float64 (values near 1e308). "
            "Rescale the features, e.g. divide by their largest absolute value."
        )
    return sums / counts.to(sums)[:, None], float(fro2)


def class_variances(
    h: torch.Tensor, y: torch.Tensor, k: int, counts: torch.Tensor, means: torch.Tensor
) -> torch.Tensor:
    """Per-class mean squared distance to the class mean (K,), float64, one pass over ``h``.

    ``means`` are the float64 class means of the same (already scaled) ``h``.
    """
    n, d = h.shape
    within = torch.zeros(k, dtype=torch.float64, device=h.device)
    rows = min(n, chunk_rows(d, h.device))
    buf, gathered = scratch(h.device, (rows, d), (rows, d))
    for s, e, b in float64_chunks(h, buf):
        g = gathered[: e - s]
        torch.index_select(means, 0, y[s:e], out=g)
        dev = b.sub_(g) if h.dtype != torch.float64 else b - g
        within.index_add_(0, y[s:e], dev.square_().sum(1))
    return within / counts.to(within)


def between_directions(means: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
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
    if spread <= max(d, k) * EPS64 * scale or spread == 0.0:
        raise MetricInputError(
            f"all {k} class means are identical (between-class spread {spread:.3g} vs mean norm "
            f"{scale:.3g}), so Sigma_B = 0 and NC1 is undefined. Check that the labels match "
            "the features (e.g. not shuffled independently)."
        )
    u, s, _ = torch.linalg.svd(centred.T, full_matrices=False)
    keep = s.square() > max(d, k) * EPS64 * s[0].square()
    return u[:, keep].contiguous(), s[keep]


def cdnv_from_stats(means: torch.Tensor, var: torch.Tensor, names: list | None = None) -> float:
    """CDNV from class statistics: ``means`` (K x d) and ``var`` (K,), both float64.

    ``var[k]`` is the mean squared distance of class k's features to its mean; ``names[k]`` is
    class k's label, for the message. Shared by :func:`ncfinetune.metrics.collapse.cdnv` and
    ``NC1Accumulator.cdnv``; both may pass statistics of features scaled by any common factor
    (CDNV is scale-invariant). Raises :class:`MetricInputError` if two class means coincide up
    to float64 rounding (distance at most max(d, K) * eps64 times the larger mean's norm, the
    cutoff :func:`between_directions` uses): CDNV would divide by zero, or by rounding noise.
    """
    k, d = means.shape
    c = means - means.mean(0, keepdim=True)
    gram = c @ c.T
    sqn = gram.diagonal()
    dist2 = (sqn[:, None] + sqn[None, :] - 2.0 * gram).clamp_min(0.0)
    # The Gram form loses digits for pairs much closer than the spread; redo those directly.
    close = torch.nonzero(dist2 <= 1e-6 * float(sqn.max())).T
    i, j = close[0], close[1]
    dist2[i, j] = (means[i] - means[j]).square().sum(1)
    off = ~torch.eye(k, dtype=torch.bool, device=means.device)
    norm2 = means.square().sum(1)
    tol2 = (max(d, k) * EPS64) ** 2 * torch.maximum(norm2[:, None], norm2[None, :])
    same = torch.nonzero((dist2 <= tol2) & off)
    if same.numel():
        a, b = same[0].tolist()
        if names is not None:
            a, b = names[a], names[b]
        raise MetricInputError(
            f"classes {a!r} and {b!r} have identical means (up to float64 rounding), so CDNV "
            "divides by zero. Check that the labels match the features, or merge the two "
            "classes."
        )
    ratio = (var[:, None] + var[None, :]) / (2.0 * dist2.masked_fill(~off, 1.0))
    return float(ratio[off].mean())


def discriminative_ratio_from_stats(
    means: torch.Tensor, var: torch.Tensor, counts: torch.Tensor
) -> float:
    """SL-MLP's D_inter / D_intra from class statistics (float64, any common scale): ``means``
    (K x d), ``var[k]`` the mean squared distance of class k to its mean, ``counts`` (K,).
    Shared by :func:`ncfinetune.metrics.transfer.discriminative_ratio` and
    ``NC1Accumulator.discriminative_ratio``; raises when every class has one example or the
    within-class spread is zero up to float64 rounding of the features."""
    k, d = means.shape
    counts = counts.to(means)
    n = float(counts.sum())
    if bool((counts == 1).all()):
        raise MetricInputError(
            f"every one of the {k} classes has a single example, so D_intra = 0 and the ratio is "
            "infinite. Pass several examples per class."
        )
    intra = float(var.mean())
    mean_sq = float((counts * (var + means.square().sum(1))).sum()) / n  # ||H||_F**2 / N
    if intra <= (max(n, d) * EPS64) ** 2 * mean_sq:
        raise MetricInputError(
            f"the within-class spread is zero (D_intra = {intra:.3g}, at float64 rounding of the "
            "features): every class sits on one point (or the features are constant), so "
            "D_inter / D_intra is infinite or 0/0. Pass features with within-class variation."
        )
    # sum over ordered pairs j != k of ||mu_j - mu_k||**2 = 2K sum_k ||mu_k - mean mu||**2
    inter = 2.0 * float((means - means.mean(0)).square().sum()) / (k - 1)
    return inter / intra
