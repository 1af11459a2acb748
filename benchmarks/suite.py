"""The whole benchmark suite, in order, resumable: learning-rate grid, small-data curve,
method x block table, layer-wise NC1 curve, block selection (leave one target out), summary.

    nohup python benchmarks/suite.py > suite.log 2>&1 &    # a few hours on 2 CPU cores
    python benchmarks/suite.py --quick                      # smoke check, a few minutes

Every run is a record under results/runs (results/quick with --quick); a stopped suite picks
up where it stopped. ``--backbones``/``--targets`` restrict it.
"""

from __future__ import annotations

import argparse
import time

import lr_grid
import method_block
import nc1_curve
import selection_loto
import small_data
import summarize
from common import parse_common, run_all


def main(argv=None) -> None:
    args = parse_common(argparse.ArgumentParser(description=__doc__)).parse_args(argv)
    t0 = time.time()
    if args.quick:
        recs = run_all(small_data.quick_plan(args.backbones), force=args.force)
        for r in recs:
            m = r["metrics"]
            print(f"{r['run']['backbone']:>9} {r['key']:<40} test {100 * m['test_accuracy']:5.1f}%")
        print(f"quick suite: {len(recs)} runs in {time.time() - t0:.0f}s")
        return
    b, t = args.backbones, args.targets
    run_all(lr_grid.plan(b, t), force=args.force)
    lr_grid.report(b, t)
    run_all(small_data.plan(b, t), force=args.force)
    run_all(method_block.plan(b, t), force=args.force)
    nc1_curve.main(["--backbones", *b, "--targets", *t])
    selection_loto.main(["measure"])  # its own pairs (selection_loto.PAIRS)
    selection_loto.main(["report"])
    summarize.main()
    print(f"suite done in {(time.time() - t0) / 3600:.2f} h")


if __name__ == "__main__":
    main()
