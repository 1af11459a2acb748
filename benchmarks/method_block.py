"""Claims 3-4 (paper Tables 5-7): Layer FT and SCL FT at every stage-first block.

    python benchmarks/method_block.py [--backbones ...] [--targets ...] [--seeds 0 1 2]

Layer FT and SCL FT at each block of ``BACKBONES[b]["blocks"]`` (resnet18: 0, 2, 4, 6; ViT-Tiny:
0, 3, 6, 9), plus linear probe and full FT, at ``TABLE_SIZES`` per class, with the learning
rate ``lr_grid.py`` chose per method (at the middle block). Records: test accuracy, penultimate
NC1 on the training subset and on the test split, % trainable parameters.
"""

from __future__ import annotations

import argparse
import sys

from common import BACKBONES, METHODS, SEEDS, TABLE_SIZES, chosen_lr, parse_common, run_all, run_for


def plan(backbones, targets, seeds=SEEDS) -> list:
    runs = []
    for b in backbones:
        for t in targets:
            lrs = {m: chosen_lr(b, t, m) for m in METHODS}
            if None in lrs.values():
                sys.exit(f"no learning rates chosen for {b}/{t}: run benchmarks/lr_grid.py first")
            for n in TABLE_SIZES:
                for s in seeds:
                    runs += [run_for(b, t, m, n, s, lrs[m]) for m in ("linear", "full")]
                    runs += [
                        run_for(b, t, m, n, s, lrs[m], block=k)
                        for k in BACKBONES[b]["blocks"]
                        for m in ("layer", "scl")
                    ]
    return runs


def main(argv=None) -> None:
    parser = parse_common(argparse.ArgumentParser(description=__doc__))
    parser.add_argument("--seeds", nargs="+", type=int, default=SEEDS)
    args = parser.parse_args(argv)
    run_all(plan(args.backbones, args.targets, args.seeds), force=args.force)


if __name__ == "__main__":
    main()
