"""Claim 4's fair hyperparameters: each method's learning rate, chosen on validation data.

    python benchmarks/lr_grid.py [--backbones resnet18 vit_p4] [--targets fmnist59 digits]

For every backbone, target and method: SGD at each learning rate of ``LR_GRID`` on the
``LR_SELECT_SIZE``-per-class subset (seed 0, the usual step budget), scored by accuracy on up to
``VAL_MAX`` training-split images outside the subset (never the test split). The best one is
reused at every subset size by the other scripts. Writes ``results/lr_grid.{json,md}``.
"""

from __future__ import annotations

import argparse
import json

from common import (
    LR_GRID,
    LR_SELECT_SIZE,
    METHODS,
    RESULTS,
    chosen_lr,
    lr_runs,
    parse_common,
    run_all,
    saved,
)


def plan(backbones, targets) -> list:
    return [r for b in backbones for t in targets for m in METHODS for r in lr_runs(b, t, m)]


def report(backbones, targets, out=None) -> dict:
    """``lr_grid.{md,json}`` into ``out`` (default ``RESULTS``) from the grid records; also the
    LoRA-in-block grid that ``budget.py`` runs."""
    out = RESULTS if out is None else out
    rows = []
    for b in backbones:
        for t in targets:
            for m in METHODS + ["lora-block"]:
                val = {}
                for r in lr_runs(b, t, m):
                    if (rec := saved(r)) is not None:
                        val[r.lr] = rec["metrics"]["val_accuracy"]
                rows.append(
                    {
                        "backbone": b,
                        "target": t,
                        "method": m,
                        "val_accuracy": val,
                        "chosen_lr": chosen_lr(b, t, m),
                    }
                )
    lines = [
        f"# Learning rate per method (validation accuracy, {LR_SELECT_SIZE} per class, seed 0)",
        "",
        "`python benchmarks/lr_grid.py`. Validation: up to 1,000 training-split images outside "
        "the subset. Chosen = best validation accuracy (ties: larger lr).",
        "",
        "| backbone | target | method | "
        + " | ".join(f"lr {lr:g}" for lr in LR_GRID)
        + " | chosen |",
        "|---|---|---|" + "---:|" * (len(LR_GRID) + 1),
    ]
    for row in rows:
        val = row["val_accuracy"]
        cells = [
            "-" if lr not in val else "diverged" if val[lr] is None else f"{100 * val[lr]:.1f}"
            for lr in LR_GRID
        ]
        chosen = "-" if row["chosen_lr"] is None else f"{row['chosen_lr']:g}"
        lines.append(
            f"| {row['backbone']} | {row['target']} | {row['method']} | "
            + " | ".join(cells)
            + f" | {chosen} |"
        )
    (out / "lr_grid.json").write_text(json.dumps(rows, indent=1) + "\n")
    (out / "lr_grid.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return {(r["backbone"], r["target"], r["method"]): r["chosen_lr"] for r in rows}


def main(argv=None) -> None:
    parser = parse_common(argparse.ArgumentParser(description=__doc__))
    parser.add_argument("--report", action="store_true", help="only the tables, from the records")
    args = parser.parse_args(argv)
    if not args.report:
        run_all(plan(args.backbones, args.targets), force=args.force)
    report(args.backbones, args.targets)


if __name__ == "__main__":
    main()
