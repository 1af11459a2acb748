"""NC1 as an offline ``evaluate`` metric: ``load_metric("nc1")`` or ``evaluate.load(<this dir>)``.

``add_batch(features=H_b, labels=y_b)`` per batch, then ``compute()`` ->
``{"nc1": ncfinetune.metrics.collapse.nc1(all features, all labels)}``; ``compute(num_classes=K)``
passes K through. Features are stored as float32 (float64 input is rounded to float32).

What evaluate costs (read from evaluate 0.4.6 ``module.py``): every ``add_batch`` encodes the
batch with ``datasets.Features.encode_batch`` (each feature row becomes a Python list of d
floats) and appends it to an Arrow file in ``cache_dir`` (default
``~/.cache/huggingface/metrics/nc1/``) through ``datasets.ArrowWriter``; ``keep_in_memory=True``
writes to an in-memory Arrow buffer instead. ``compute()`` reads the file back, converts the
columns to Python lists (evaluate's ``format="numpy"`` is only allowed for scalar ``Value``
columns, not for a list of floats), we turn them into one N x d NumPy array, run ``nc1``, and
evaluate deletes the file. So per sample: 4 d + 12 bytes on disk (float32 values, a 4-byte list
offset, an int64 label), and at ``compute()`` transiently ~32 bytes per value in Python objects.

Measured once (N = 10,000, d = 512, K = 10, ten add_batch calls of 1,000 rows, 2-core CPU,
evaluate 0.4.6, datasets 5.2.0), ``~/.cache/ncft-dev/bin/python
ncfinetune/metrics/modules/nc1/nc1.py``:
add_batch 1.52 s in all, compute 3.72 s (of which nc1 itself 14 ms), Arrow file 2060
B/sample (19.6 MiB), peak Python allocations during compute 177 MiB (the features themselves:
19.5 MiB). That is ~0.15 ms per sample to add and ~0.37 ms per sample to compute: compute()
alone takes ~270x as long as ``ncfinetune.metrics.collapse.nc1`` on the arrays (add + compute ~370x),
and its peak memory is ~9x the features'.
For large N or d, prefer ``ncfinetune.metrics.stream.NC1Accumulator``: one pass, no disk, no
per-element conversion, O(d^2 + K d) memory.
"""

from __future__ import annotations

import datasets
import evaluate
import numpy as np

from ncfinetune.metrics.collapse import nc1

_DESCRIPTION = (
    "Within-class variability collapse NC1 = (1/K) trace(Sigma_W pinv(Sigma_B)) of feature "
    "vectors (smaller = more collapsed), computed by ncfinetune.metrics.collapse.nc1."
)
_KWARGS_DESCRIPTION = """
Args:
    features: one feature vector (list/array of d floats) per example.
    labels: one integer class id per example.
    num_classes: optional K (then labels must be 0..K-1 and every class needs a sample);
        default: the distinct labels are the classes.
Returns:
    nc1: the NC1 value, a float >= 0.
"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class NC1(evaluate.Metric):
    def _info(self) -> evaluate.MetricInfo:
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation="",
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features(
                {
                    "features": datasets.Sequence(datasets.Value("float32")),
                    "labels": datasets.Value("int64"),
                }
            ),
        )

    def _compute(self, features, labels, num_classes: int | None = None) -> dict[str, float]:
        h = np.asarray(features, dtype=np.float32)  # list of N lists of d floats -> N x d
        return {"nc1": nc1(h, np.asarray(labels, dtype=np.int64), num_classes=num_classes)}


def _measure(n: int = 10_000, d: int = 512, k: int = 10, batch: int = 1_000) -> str:
    """Time add_batch/compute against a direct nc1 call; the line quoted in the docstring."""
    import os
    import tempfile
    import time
    import tracemalloc

    rng = np.random.default_rng(0)
    h = rng.normal(size=(n, d)).astype(np.float32)
    y = rng.integers(0, k, n)
    nc1(h, y)  # warm-up
    t0 = time.perf_counter()
    direct = nc1(h, y)
    t_direct = time.perf_counter() - t0
    with tempfile.TemporaryDirectory() as tmp:
        metric = evaluate.load(os.path.dirname(os.path.abspath(__file__)), cache_dir=tmp)
        t0 = time.perf_counter()
        for s in range(0, n, batch):
            metric.add_batch(features=h[s : s + batch], labels=y[s : s + batch])
        t_add = time.perf_counter() - t0
        disk = os.path.getsize(metric.cache_file_name)
        tracemalloc.start()
        t0 = time.perf_counter()
        value = metric.compute()["nc1"]
        t_compute = time.perf_counter() - t0
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
    if value != direct:
        raise RuntimeError(f"the metric gave {value}, the direct call {direct}")
    return (
        f"add_batch {t_add:.2f} s in all, compute {t_compute:.2f} s (of which nc1 itself "
        f"{t_direct * 1e3:.0f} ms), Arrow file {disk / n:.0f} B/sample ({disk / 2**20:.1f} MiB), "
        f"peak Python allocations during compute {peak / 2**20:.0f} MiB "
        f"(the features themselves: {h.nbytes / 2**20:.1f} MiB)."
    )


if __name__ == "__main__":
    print(_measure())
