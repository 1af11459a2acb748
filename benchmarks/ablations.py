"""What was tried where a claim did not hold: the BN policy (resnet18) and the ViT skip's norm.

    python benchmarks/ablations.py            # runs, then results/ablations.{md,json}; needs lr_grid.py
    python benchmarks/ablations.py --report   # the tables from the records only

At 10 and 100 per class, 3 seeds, the chosen learning rates of ``lr_grid.py``:
- resnet18, Layer FT and SCL FT at block 4 with ``bn="frozen"`` (pretrained BatchNorm
  statistics outside the block) against the default ``bn="update"``;
- vit_p4 (the 6-block patch-4 ViT), SCL FT at block 3 with the skip added raw
  (``skip_norm=False``) against the default skip through the final norm.
"""

from __future__ import annotations

import argparse

from common import (
    MAIN_TARGETS,
    RESULTS,
    SEEDS,
    chosen_lr,
    diverged,
    mean_sd,
    parse_common,
    run_all,
    run_for,
    saved,
)

from ncfinetune.files import write_json, write_text

SIZES = [10, 100]
VARIANTS = [  # (backbone, method, label, Run overrides)
    ("resnet18", "layer", 'bn="frozen"', {"bn": "frozen"}),
    ("resnet18", "scl", 'bn="frozen"', {"bn": "frozen"}),
    ("vit_p4", "scl", "skip_norm=False", {"skip_norm": False}),
]


def plan(backbones, targets):
    runs = []
    for b, m, _, kw in VARIANTS:
        for t in targets:
            lr = chosen_lr(b, t, m)
            if b not in backbones or lr is None:
                continue
            for n in SIZES:
                for s in SEEDS:
                    runs += [run_for(b, t, m, n, s, lr), run_for(b, t, m, n, s, lr, **kw)]
    return runs


def report(out=RESULTS) -> list[dict]:
    """``ablations.{md,json}`` in ``out`` from the records alone (every backbone and target; a
    row whose records are not all there yet is left out)."""
    lines = [
        "# Ablations: BN policy (resnet18) and the ViT skip's norm",
        "",
        "`python benchmarks/ablations.py`; test accuracy %, mean ± sd (ddof 1) over seeds "
        f"{SEEDS}, chosen learning rates, 150 steps.",
        "",
        "| backbone | target | method | per class | default | variant | variant acc |",
        "|---|---|---|---:|---:|---|---:|",
    ]
    rows = []
    for b, m, label, kw in VARIANTS:
        for t in MAIN_TARGETS:
            lr = chosen_lr(b, t, m)
            if lr is None:
                continue
            for n in SIZES:
                base = [saved(run_for(b, t, m, n, s, lr)) for s in SEEDS]
                var = [saved(run_for(b, t, m, n, s, lr, **kw)) for s in SEEDS]
                if None in base + var:
                    continue
                acc0 = [100 * r["metrics"]["test_accuracy"] for r in base]
                acc1 = [100 * r["metrics"]["test_accuracy"] for r in var if not diverged(r)]
                bad = sum(map(diverged, var))
                rows.append(
                    {"backbone": b, "target": t, "method": m, "per_class": n, "variant": label,
                     "default": acc0, "variant_acc": acc1}
                )  # fmt: skip
                lines.append(
                    f"| {b} | {t} | {m} | {n} | {'{:.1f} ± {:.1f}'.format(*mean_sd(acc0))} | "
                    f"{label} | "
                    + ("{:.1f} ± {:.1f}".format(*mean_sd(acc1)) if acc1 else "-")
                    + (f" ({bad} of {len(var)} diverged)" if bad else "")
                    + " |"
                )
    write_json(out / "ablations.json", rows, indent=1)
    write_text(out / "ablations.md", "\n".join(lines) + "\n")
    return rows


def main(argv=None) -> None:
    parser = parse_common(argparse.ArgumentParser(description=__doc__))
    parser.add_argument("--report", action="store_true", help="only the tables, from the records")
    args = parser.parse_args(argv)
    if not args.report:
        run_all(plan(args.backbones, args.targets))
    report()
    print((RESULTS / "ablations.md").read_text())


if __name__ == "__main__":
    main()
