"""Claims 1-2 (paper Fig. 11): test accuracy against the number of training images per class.

    python benchmarks/small_data.py [--backbones ...] [--targets ...] [--quick]

Linear probe, Layer FT and SCL FT at the backbone's middle block, and full FT, at every size of
``SIZES`` and seed of ``SEEDS``, each method with the learning rate ``lr_grid.py`` chose for it
(run that first). Also the paper's fixed setting (SGD lr 0.1 for every method) at
``PAPER_LR_SIZES``. Records land in ``results/runs``; ``summarize.py`` makes the tables and plots.
"""

from __future__ import annotations

import argparse
import sys

from common import (
    METHODS,
    PAPER_LR,
    PAPER_LR_SIZES,
    SEEDS,
    SIZES,
    chosen_lr,
    parse_common,
    run_all,
    run_for,
)


def plan(backbones, targets, *, paper_lr: bool = True) -> list:
    runs, missing = [], []
    for b in backbones:
        for t in targets:
            for m in METHODS:
                lr = chosen_lr(b, t, m)
                if lr is None:
                    missing.append(f"{b}/{t}/{m}")
                    continue
                runs += [run_for(b, t, m, n, s, lr) for n in SIZES[t] for s in SEEDS]
                if paper_lr:
                    runs += [
                        run_for(b, t, m, n, s, PAPER_LR) for n in PAPER_LR_SIZES for s in SEEDS
                    ]
    if missing:
        sys.exit(
            "no learning rate chosen yet for "
            + ", ".join(missing)
            + ": run `python benchmarks/lr_grid.py` (with the same --backbones/--targets) first"
        )
    return list(dict.fromkeys(runs))  # runs shared by both settings are done once


def quick_plan(backbones) -> list:
    """Two sizes, one seed, 20 steps, lr 0.1, digits only: a smoke check of the whole path."""
    return [
        run_for(b, "digits", m, n, 0, PAPER_LR, steps=20)
        for b in backbones
        for m in METHODS
        for n in (5, 20)
    ]


def main(argv=None) -> None:
    args = parse_common(argparse.ArgumentParser(description=__doc__)).parse_args(argv)
    runs = quick_plan(args.backbones) if args.quick else plan(args.backbones, args.targets)
    run_all(runs, force=args.force)


if __name__ == "__main__":
    main()
