"""How fast is ncfinetune.metrics.nc1 against the dense textbook formula?

Usage (writes benchmarks/results/nc1_speed.json and .md)::

    ~/.cache/ncft-dev/bin/python benchmarks/nc1_speed.py [--wait-quiet 600] [--repeats 7]

For N = 20,000 float32 features (class means + unit noise) and each (d, K), it times:

* ``ncfinetune.metrics.nc1``: O(N d K), float64, no d x d matrix (median of ``--repeats``).
* the dense float64 reference (NumPy/SciPy, vectorised): Sigma_W as one product of the centred
  features, ``scipy.linalg.pinv`` of the d x d Sigma_B, the trace of the product taken as an
  elementwise sum (O(d^2), generous to the reference); median of fewer repeats.
* once, at d = 512, K = 10, the per-sample loop of the public neural-collapse code (an outer
  product per sample added to Sigma_W, torch float64), on a subsample, extrapolated linearly in
  N, plus the same pinv/trace finish.
* two floors for context: reading H once into float64 (chunked cast) and one float64
  N x d x (K-1) product, the two things nc1 cannot avoid.

Timings on a shared machine are noisy: ``--wait-quiet S`` waits up to S seconds for the 1-minute
load average to drop below 0.5 before starting; the load before and after is recorded.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import scipy
import scipy.linalg
import torch

from ncfinetune.metrics import nc1

N = 20_000
SIZES = [(512, 10), (768, 100), (2048, 10), (2048, 100)]
LOOP_SIZE, LOOP_SUBSAMPLE = (512, 10), 2_000
RESULTS = Path(__file__).resolve().parent / "results"


def make_features(n: int, d: int, k: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """float32 features: class means of norm ~3 sqrt(d) plus N(0, 1) noise; balanced-ish labels."""
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, k, (n,), generator=g)
    means = 3.0 * torch.randn(k, d, generator=g)
    return (means[y] + torch.randn(n, d, generator=g)).float(), y


def dense_nc1(h: np.ndarray, y: np.ndarray, k: int) -> float:
    """The textbook formula in float64 NumPy/SciPy, vectorised, with a d x d Sigma_B."""
    h = h.astype(np.float64)
    counts = np.bincount(y, minlength=k)
    means = np.zeros((k, h.shape[1]))
    np.add.at(means, y, h)
    means /= counts[:, None]
    hc = h - means[y]
    sigma_w = hc.T @ hc / len(h)
    mc = means - means.mean(0)
    sigma_b = mc.T @ mc / k
    pinv = scipy.linalg.pinv(sigma_b)
    return float(np.sum(sigma_w * pinv.T) / k)  # trace(Sigma_W pinv) without a d^3 product


def loop_nc1(h: torch.Tensor, y: torch.Tensor, k: int) -> tuple[float, float, float]:
    """Per-sample outer products as in the public neural-collapse code; (NC1, loop s, finish s)."""
    h = h.double()
    means = torch.stack([h[y == c].mean(0) for c in range(k)])
    t0 = time.perf_counter()
    sigma_w = torch.zeros(h.shape[1], h.shape[1], dtype=torch.float64)
    for i in range(len(h)):
        diff = (h[i] - means[y[i]])[:, None]
        sigma_w += diff @ diff.T
    t_loop = time.perf_counter() - t0
    t0 = time.perf_counter()
    sigma_w /= len(h)
    mc = (means - means.mean(0)).numpy()
    pinv = scipy.linalg.pinv(mc.T @ mc / k)
    value = float(np.trace(sigma_w.numpy() @ pinv) / k)
    return value, t_loop, time.perf_counter() - t0


def timed(fn, repeats: int) -> tuple[float, list[float], object]:
    out = fn()  # warm-up (thread pools, allocator); not counted
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), times, out


def floors(h: torch.Tensor, k: int) -> dict[str, float]:
    """Time to read H once into float64, and of one float64 N x d x (K-1) product."""
    d = h.shape[1]
    rows = max(64, 4 * 2**20 // (8 * d))
    buf = torch.empty(rows, d, dtype=torch.float64)

    def read() -> None:
        for s in range(0, len(h), rows):
            buf[: len(h[s : s + rows])].copy_(h[s : s + rows])

    h64 = h.double()
    u = torch.linalg.qr(torch.randn(d, k - 1, dtype=torch.float64))[0]
    return {
        "read_h_as_float64_s": timed(read, 5)[0],
        "gemm_n_d_k_float64_s": timed(lambda: h64 @ u, 5)[0],
    }


def wait_quiet(limit_s: float) -> None:
    t0 = time.time()
    while os.getloadavg()[0] > 0.5 and time.time() - t0 < limit_s:
        time.sleep(15)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=7, help="repeats of nc1 per size")
    parser.add_argument("--dense-repeats", type=int, default=3, help="repeats of the reference")
    parser.add_argument("--wait-quiet", type=float, default=0.0, help="max seconds to wait")
    args = parser.parse_args()
    wait_quiet(args.wait_quiet)
    load_before = os.getloadavg()
    started = dt.datetime.now(dt.timezone.utc)
    rows = []
    for d, k in SIZES:
        h, y = make_features(N, d, k)
        t_fast, fast_times, v_fast = timed(lambda h=h, y=y: nc1(h, y), args.repeats)
        dense_repeats = args.dense_repeats if d < 2048 else max(1, args.dense_repeats - 1)
        hn, yn = h.numpy(), y.numpy()
        t_dense, dense_times, v_dense = timed(
            lambda hn=hn, yn=yn, k=k: dense_nc1(hn, yn, k), dense_repeats
        )
        row = {
            "n": N,
            "d": d,
            "k": k,
            "nc1_s": t_fast,
            "nc1_times_s": fast_times,
            "dense_s": t_dense,
            "dense_times_s": dense_times,
            "speedup": t_dense / t_fast,
            "nc1_value": v_fast,
            "dense_value": v_dense,
            "rel_diff": abs(v_fast - v_dense) / abs(v_dense),
            **floors(h, k),
        }
        rows.append(row)
        print(json.dumps({key: row[key] for key in ("d", "k", "nc1_s", "dense_s", "speedup")}))
    d, k = LOOP_SIZE
    h, y = make_features(N, d, k)
    sub = slice(0, LOOP_SUBSAMPLE)
    _, t_loop, t_finish = loop_nc1(h[sub], y[sub], k)
    loop = {
        "n": N,
        "d": d,
        "k": k,
        "subsample": LOOP_SUBSAMPLE,
        "loop_s_on_subsample": t_loop,
        "finish_s": t_finish,
        "extrapolated_s": t_loop * N / LOOP_SUBSAMPLE + t_finish,
        "nc1_s": next(r["nc1_s"] for r in rows if (r["d"], r["k"]) == LOOP_SIZE),
    }
    loop["speedup"] = loop["extrapolated_s"] / loop["nc1_s"]
    result = {
        "command": "~/.cache/ncft-dev/bin/python benchmarks/nc1_speed.py " + " ".join(sys.argv[1:]),
        "date_utc": started.isoformat(timespec="seconds"),
        "machine": {
            "cpu_count": os.cpu_count(),
            "torch_threads": torch.get_num_threads(),
            "processor": platform.processor() or platform.machine(),
            "python": platform.python_version(),
            "torch": torch.__version__,
            "numpy": np.__version__,
            "scipy": scipy.__version__,
            "load_avg_before": load_before,
            "load_avg_after": os.getloadavg(),
        },
        "rows": rows,
        "per_sample_loop": loop,
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "nc1_speed.json").write_text(json.dumps(result, indent=2) + "\n")
    (RESULTS / "nc1_speed.md").write_text(markdown(result))
    print(markdown(result))


def markdown(r: dict) -> str:
    m = r["machine"]
    lines = [
        "# NC1 speed: `ncfinetune.metrics.nc1` vs the dense formula",
        "",
        f"Made by `{r['command'].strip()}` on {r['date_utc']} (UTC); "
        f"{m['cpu_count']} CPUs, {m['torch_threads']} torch threads, torch {m['torch']}, "
        f"NumPy {m['numpy']}, SciPy {m['scipy']}, Python {m['python']}. "
        f"1/5/15-min load average before: {', '.join(f'{x:.2f}' for x in m['load_avg_before'])}; "
        f"after: {', '.join(f'{x:.2f}' for x in m['load_avg_after'])}.",
        "",
        "N = 20,000 float32 features (class means + N(0, 1) noise). `nc1`: median of "
        f"{len(r['rows'][0]['nc1_times_s'])} runs; dense float64 NumPy/SciPy reference "
        "(Sigma_W = Hc^T Hc / N, `scipy.linalg.pinv` of the d x d Sigma_B): median of "
        f"{len(r['rows'][0]['dense_times_s'])} runs ({len(r['rows'][-1]['dense_times_s'])} at "
        "d = 2048). Floors: reading H once into float64, and one float64 N x d x (K-1) product.",
        "",
        "| d | K | nc1 (ms) | dense (ms) | speed-up | rel. diff | floor: read H (ms) "
        "| floor: N d (K-1) GEMM (ms) |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in r["rows"]:
        lines.append(
            f"| {row['d']} | {row['k']} | {row['nc1_s'] * 1e3:.1f} | {row['dense_s'] * 1e3:.0f} "
            f"| {row['speedup']:.0f}x | {row['rel_diff']:.1e} "
            f"| {row['read_h_as_float64_s'] * 1e3:.1f} | {row['gemm_n_d_k_float64_s'] * 1e3:.1f} |"
        )
    loop = r["per_sample_loop"]
    lines += [
        "",
        f"Per-sample loop (public neural-collapse code style: one d x d outer product per sample, "
        f"torch float64) at d = {loop['d']}, K = {loop['k']}: {loop['loop_s_on_subsample']:.2f} s "
        f"for {loop['subsample']:,} samples, extrapolated linearly to N = {loop['n']:,} plus "
        f"{loop['finish_s'] * 1e3:.0f} ms of pinv/trace: about {loop['extrapolated_s']:.0f} s, "
        f"{loop['speedup']:.0f}x slower than `nc1` ({loop['nc1_s'] * 1e3:.1f} ms).",
        "",
        "## What bounds the speed",
        "",
        "The dense formula costs O(N d^2) for Sigma_W plus O(d^3) for the pinv of the d x d "
        "Sigma_B, whatever K is. `nc1` never forms a d x d matrix: Sigma_B has rank <= K-1, so "
        "an SVD of the d x K centred class means gives its range U (d x r), and "
        "NC1 = sum_j ||(H - mu_y) U_j||^2 / (N s_j^2). That is two chunked float64 passes over "
        "H: class sums (O(N d)), then centre and project (O(N d K)). For K = 10 the time is close "
        "to reading and converting H twice (memory-bound; compare the read floor); for K = 100 "
        "the N x d x (K-1) float64 product dominates (compare the GEMM floor). Centring happens "
        "in float64 before the projection, so near-collapsed features lose no digits; that costs "
        "one gather and subtraction per element, in cache.",
        "",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
