"""Issue 6's measurement: how good are select_block's choices, and what do they cost?

    python benchmarks/selection_regret.py [--backbones ...] [--targets ...]

For each backbone, target and size of ``TABLE_SIZES`` (per class) and seed of ``SEEDS``: run each
rule of ``ncfinetune.select_block`` (SCL, candidates = the method x block table's blocks, so the
hindsight comparison covers the same set) on the training subset only; read the test accuracy of
SCL FT at the chosen block from the ``method_block.py`` records (run that first); the best block
in hindsight is the one with the highest test accuracy for that seed. Regret = best - chosen
(accuracy points). Cost = selection wall time / the train time of one full-FT run on the same
subset (same budget as every run here), and images processed by the selection / images
processed by that run. Writes ``results/selection_regret.{json,md}``.
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch
from common import (
    BACKBONES,
    BATCH,
    RESULTS,
    SEEDS,
    STEPS,
    TABLE_SIZES,
    chosen_lr,
    ensure,
    load_data,
    parse_common,
    run_for,
    subset,
    versions,
)

import ncfinetune
from ncfinetune.hub import create_backbone
from ncfinetune.selection import RULES


def main(argv=None) -> None:
    args = parse_common(argparse.ArgumentParser(description=__doc__)).parse_args(argv)
    rows = []
    for b in args.backbones:
        blocks = BACKBONES[b]["blocks"]
        for t in args.targets:
            lr = {m: chosen_lr(b, t, m) for m in ("scl", "full")}
            if None in lr.values():
                raise SystemExit(f"run benchmarks/lr_grid.py for {b}/{t} first")
            data = load_data(b, t)
            for n in TABLE_SIZES:
                for s in SEEDS:
                    acc = {
                        k: ensure(run_for(b, t, "scl", n, s, lr["scl"], block=k))["metrics"][
                            "test_accuracy"
                        ]
                        for k in blocks
                    }
                    full = ensure(run_for(b, t, "full", n, s, lr["full"]))
                    best = max(acc, key=acc.get)
                    idx = subset(data, n, s)
                    images = data["train"].images[idx]
                    cache = ncfinetune.data.TensorCache(
                        images, data["train"].labels[idx], data["train"].transform
                    )
                    for rule in RULES:
                        where = {
                            "backbone": b,
                            "target": t,
                            "per_class": n,
                            "seed": s,
                            "rule": rule,
                        }
                        torch.manual_seed(s)
                        model = create_backbone(BACKBONES[b]["model"], data["num_classes"])
                        t0 = time.perf_counter()
                        try:
                            sel = ncfinetune.select_block(
                                model,
                                cache,
                                rule=rule,
                                method="scl",
                                candidates=blocks,
                                lr=lr["scl"],
                                seed=s,
                            )
                        except ncfinetune.ConfigError as e:  # e.g. too few samples to hold out
                            rows.append({**where, "error": str(e)})
                            continue
                        sec = time.perf_counter() - t0
                        full_images = STEPS * min(BATCH, len(idx))
                        rows.append(
                            {
                                **where,
                                "chosen": sel.chosen,
                                "best": best,
                                "chosen_accuracy": acc[sel.chosen],
                                "best_accuracy": acc[best],
                                "regret_points": 100 * (acc[best] - acc[sel.chosen]),
                                "seconds": sec,
                                "full_ft_train_seconds": full["train_seconds"],
                                "cost_fraction_time": sec / full["train_seconds"],
                                "images": sel.images_processed,
                                "cost_fraction_images": sel.images_processed / full_images,
                            }
                        )
                        r = rows[-1]
                        print(
                            f"{b}/{t} n={n} s={s} {rule:>14}: block {r['chosen']} (best {best}) "
                            f"regret {r['regret_points']:.2f} pts, cost {r['cost_fraction_time']:.0%}",
                            flush=True,
                        )
    summary = {}
    for rule in RULES:
        ok = [r for r in rows if r["rule"] == rule and "error" not in r]
        if ok:
            summary[rule] = {
                "runs": len(ok),
                "mean_regret_points": float(np.mean([r["regret_points"] for r in ok])),
                "max_regret_points": float(np.max([r["regret_points"] for r in ok])),
                "mean_cost_fraction_time": float(np.mean([r["cost_fraction_time"] for r in ok])),
                "mean_cost_fraction_images": float(
                    np.mean([r["cost_fraction_images"] for r in ok])
                ),
                "errors": sum(1 for r in rows if r["rule"] == rule and "error" in r),
            }
    out = {"rows": rows, "summary": summary, "versions": versions()}
    (RESULTS / "selection_regret.json").write_text(json.dumps(out, indent=1) + "\n")
    lines = [
        "# Block selection: regret and cost per rule",
        "",
        "`python benchmarks/selection_regret.py`; SCL FT, candidates = the method x block "
        f"table's blocks, sizes {TABLE_SIZES} per class, seeds {SEEDS}. Regret in accuracy "
        "points against the best block in hindsight (same seed); cost relative to one "
        f"full-FT run ({STEPS} steps) on the same subset.",
        "",
        "| rule | selections | mean regret (pts) | max regret | cost (time) | cost (images) |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for rule, v in summary.items():
        lines.append(
            f"| {rule} | {v['runs']} | {v['mean_regret_points']:.2f} | "
            f"{v['max_regret_points']:.2f} | {100 * v['mean_cost_fraction_time']:.0f}% | "
            f"{100 * v['mean_cost_fraction_images']:.0f}% |"
        )
    (RESULTS / "selection_regret.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
