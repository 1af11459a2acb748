"""Cost of the all-block NC1 curve relative to one plain inference pass over the same data.

    python benchmarks/layerwise_cost.py            # writes results/layerwise_cost.{json,md}

For resnet18 and a ViT-Tiny (patch 8) at 32 px (random init: the cost does not depend on the
weights), over a fixed set of N synthetic images with K classes: the median wall time of
(a) ``model(x)`` for every batch under ``torch.no_grad()`` and (b) ``layerwise_nc1`` (pooled output of
every block + penultimate features collected in one pass, then NC1 of each), both kept-feature
and streamed. Ratios are taken within one run, alternating the two measurements.
"""

from __future__ import annotations

import json
import platform
import statistics
import sys
import time
from pathlib import Path

import timm
import torch

from ncfinetune.tuning.features import layerwise_nc1

OUT = Path(__file__).parent / "results"
MODELS = {"resnet18": {}, "vit_tiny_patch16_224": {"img_size": 32, "patch_size": 8}}
N, K, BATCH, REPEATS = 4096, 10, 256, 5


def main() -> None:
    torch.manual_seed(0)
    x = torch.randn(N, 3, 32, 32)
    y = torch.arange(N) % K
    batches = [(x[i : i + BATCH], y[i : i + BATCH]) for i in range(0, N, BATCH)]
    rows = []
    for name, kwargs in MODELS.items():
        model = timm.create_model(name, num_classes=K, **kwargs).eval()
        times = {"inference": [], "curve": [], "curve_stream": []}
        for _ in range(REPEATS):
            t = time.perf_counter()
            with torch.no_grad():
                for xb, _ in batches:
                    model(xb)
            times["inference"].append(time.perf_counter() - t)
            t = time.perf_counter()
            curve = layerwise_nc1(model, batches)
            times["curve"].append(time.perf_counter() - t)
            t = time.perf_counter()
            layerwise_nc1(model, batches, stream=True, num_classes=K)
            times["curve_stream"].append(time.perf_counter() - t)
        med = {k: statistics.median(v) for k, v in times.items()}
        rows.append(
            {
                "model": name,
                "kwargs": kwargs,
                "blocks": len(curve) - 1,
                "inference_s": med["inference"],
                "curve_s": med["curve"],
                "curve_stream_s": med["curve_stream"],
                "ratio": med["curve"] / med["inference"],
                "ratio_stream": med["curve_stream"] / med["inference"],
                "spread": {k: [min(v), max(v)] for k, v in times.items()},
            }
        )
        print(json.dumps(rows[-1]))
    record = {
        "command": "python benchmarks/layerwise_cost.py",
        "N": N,
        "K": K,
        "batch": BATCH,
        "repeats": REPEATS,
        "image_size": 32,
        "threads": torch.get_num_threads(),
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "timm": timm.__version__,
        "machine": platform.machine(),
        "date": time.strftime("%Y-%m-%d"),
        "rows": rows,
    }
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "layerwise_cost.json").write_text(json.dumps(record, indent=2) + "\n")
    lines = [
        "# Layer-wise NC1 curve vs one inference pass",
        "",
        f"`{record['command']}` — N={N} images (32 px), K={K}, batch {BATCH}, median of {REPEATS}, "
        f"{record['threads']} threads, torch {record['torch']}, timm {record['timm']}, {record['date']}.",
        "",
        "| model | blocks | inference (s) | curve, kept features (s) | ratio | curve, streamed (s) | ratio |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['model']} | {r['blocks']} | {r['inference_s']:.2f} | {r['curve_s']:.2f} | "
            f"{r['ratio']:.2f}x | {r['curve_stream_s']:.2f} | {r['ratio_stream']:.2f}x |"
        )
    lines += [
        "",
        "The curve is one forward pass that pools each block output as it is produced, then "
        "NC1 per block on the pooled features (O(N C K) each). Streaming adds an O(C^2) "
        "scatter update per batch and block instead of keeping N x C features.",
    ]
    (OUT / "layerwise_cost.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
