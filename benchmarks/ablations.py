"""What was tried where a claim did not hold: the BN policy (resnet18) and the ViT skip's norm.

    python benchmarks/ablations.py       # results/ablations.{md,json}; needs lr_grid.py first

At 10 and 100 per class, 3 seeds, the chosen learning rates of ``lr_grid.py``:
- resnet18, Layer FT and SCL FT at block 4 with ``bn="frozen"`` (pretrained BatchNorm
  statistics outside the block) against the default ``bn="update"``;
- vit_p4 (the 6-block patch-4 ViT), SCL FT at block 3 with the skip added raw
  (``skip_norm=False``) against the default skip through the final norm.
"""

from __future__ import annotations

import argparse
import json

import numpy as np
from common import RESULTS, SEEDS, TARGETS, chosen_lr, parse_common, run_all, run_for

SIZES = [10, 100]
VARIANTS = [  # (backbone, method, label, Run overrides)
    ("resnet18", "layer", 'bn="frozen"', {"bn": "frozen"}),
    ("resnet18", "scl", 'bn="frozen"', {"bn": "frozen"}),
    ("vit_p4", "scl", "skip_norm=False", {"skip_norm": False}),
]


def diverged(rec: dict) -> bool:
    return bool(rec["metrics"].get("diverged"))


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


def main(argv=None) -> None:
    args = parse_common(argparse.ArgumentParser(description=__doc__)).parse_args(argv)
    recs = run_all(plan(args.backbones, args.targets))
    by_key = {(r["run"]["backbone"], r["run"]["target"], r["key"]): r for r in recs}
    lines = [
        "# Ablations: BN policy (resnet18) and the ViT skip's norm",
        "",
        "`python benchmarks/ablations.py`; test accuracy %, mean ± sd over seeds "
        f"{SEEDS}, chosen learning rates, 150 steps.",
        "",
        "| backbone | target | method | per class | default | variant | variant acc |",
        "|---|---|---|---:|---:|---|---:|",
    ]
    out = []
    for b, m, label, kw in VARIANTS:
        for t in TARGETS:
            lr = chosen_lr(b, t, m)
            if b not in args.backbones or t not in args.targets or lr is None:
                continue
            for n in SIZES:
                base, var = [], []
                for s in SEEDS:
                    base.append(by_key[(b, t, run_for(b, t, m, n, s, lr).key)])
                    var.append(by_key[(b, t, run_for(b, t, m, n, s, lr, **kw).key)])
                acc0 = [100 * r["metrics"]["test_accuracy"] for r in base]
                acc1 = [100 * r["metrics"]["test_accuracy"] for r in var if not diverged(r)]
                bad = sum(map(diverged, var))
                out.append(
                    {"backbone": b, "target": t, "method": m, "per_class": n, "variant": label,
                     "default": acc0, "variant_acc": acc1}
                )  # fmt: skip
                lines.append(
                    f"| {b} | {t} | {m} | {n} | {np.mean(acc0):.1f} ± {np.std(acc0):.1f} | "
                    f"{label} | "
                    + (f"{np.mean(acc1):.1f} ± {np.std(acc1):.1f}" if acc1 else "-")
                    + (f" ({bad} of {len(var)} diverged)" if bad else "")
                    + " |"
                )
    (RESULTS / "ablations.json").write_text(json.dumps(out, indent=1) + "\n")
    (RESULTS / "ablations.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
