"""Issue 27: what ``--method auto`` costs against the fine-tune it precedes, at the recipe's
default length.

    python benchmarks/method_cost.py measure   # 6 recipe runs (resumable); ~20 min on 2 cores
    python benchmarks/method_cost.py report    # results/method_cost.md + .json

``ncfinetune finetune --method auto`` with everything else at the recipe's defaults (10 epochs of
batch 64, at least 200 optimizer steps, SGD, the prefix cache where legal, fp32 on this CPU) on
Fashion-MNIST classes 5-9 at 10, 20 and 100 per class (seed 0), for the two bundled backbones the
product leads with (resnet18_fmnist04, vit_tiny_p4_fmnist04). Each run's ``metrics.json`` holds
both numbers, timed in the same process one after the other: the selection's wall time
(``selection.seconds``: every probe, the prefix caches, the held-out scoring) and the chosen
fine-tune's training time (``time_s.train``, the same run's optimizer steps). Cost = their
ratio. Also reported: the ratio to the run after the selection (training, evaluations, checkpoints: ``wall_time_s``).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from itertools import product

from common import RESULTS, ROOT, read_records, upsert_record, versions, write_report

BACKBONES = ("resnet18_fmnist04", "vit_tiny_p4_fmnist04")
SIZES = (10, 20, 100)
SEED = 0
OUT = ROOT / ".cache" / "method_cost"
RECORDS = RESULTS / "method_cost" / "runs.jsonl"


def command(model: str, n: int, out) -> list[str]:
    return [
        sys.executable, "-m", "ncfinetune", "finetune", "--model", model,
        "--dataset", "fashion_mnist", "--classes", "5,6,7,8,9",
        "--per_class", str(n), "--seed", str(SEED), "--method", "auto", "--nc1", "false",
        "--output_dir", str(out),
    ]  # fmt: skip


def design() -> str:
    """select_method's default design, which names the records (a new default, new runs):
    blocks (all | mid), lr grid, margin, tie-break, unstable probes set aside."""
    import inspect

    from ncfinetune.selection import method as m

    blocks = inspect.signature(m.select_method).parameters["blocks"].default
    lrs = "_".join(f"{v:g}" for v in m.METHOD_LR_GRID)
    return (
        f"{'all' if blocks is None else 'mid'}-lr{lrs}-m{m.METHOD_MARGIN:g}-{m.METHOD_TIEBREAK}"
        + ("-stable" if m.METHOD_STABLE_FIRST else "")
    )


def measure() -> None:
    done = {r["key"] for r in read()}
    for model, n in product(BACKBONES, SIZES):
        key = f"{model}-n{n}-s{SEED}-{design()}"
        if key in done:
            continue
        out = OUT / key
        if out.exists():  # an interrupted run: start it again
            subprocess.run(["rm", "-rf", str(out)], check=True)
        cmd = command(model, n, out)
        print(" ".join(cmd[1:]), flush=True)
        subprocess.run(cmd, check=True, cwd=ROOT.parent)
        m = json.loads((out / "metrics.json").read_text())
        rec = {
            "key": key,
            "design": design(),
            "model": model,
            "per_class": n,
            "seed": SEED,
            "command": "python -m " + " ".join(cmd[2:-2]) + " --output_dir OUT",
            "method": m["method"],
            "block": m.get("block"),
            "lr": m["lr"],
            "selection_seconds": m["selection"]["seconds"],
            "train_seconds": m["time_s"]["train"],
            "run_seconds": m["wall_time_s"],
            "optimizer_steps": m["optimizer_steps"],
            "test_accuracy": m["test_accuracy"],
            "prefix_cache": m["prefix_cache"],
            "versions": versions(),
        }
        upsert_record(RECORDS, rec)


def read() -> list[dict]:
    return read_records(RECORDS)


def report() -> None:
    recs = read()
    if not recs:
        raise SystemExit("no records: run `python benchmarks/method_cost.py measure` first")
    lines = [
        "# What `--method auto` costs at the recipe's default length",
        "",
        "`python benchmarks/method_cost.py measure && python benchmarks/method_cost.py report`: "
        "`ncfinetune finetune --method auto` on Fashion-MNIST 5-9 (seed 0), the recipe's "
        "defaults otherwise (at least 200 optimizer steps of batch 64, fp32, 2 CPU cores). "
        "Selection and fine-tune timed in the same process; the run after it: training, evaluations and checkpoints (`wall_time_s`).",
        "",
        "| design | backbone | per class | chosen | steps | test acc. | selection s | training s | "
        "selection / training | selection / the run after it |",
        "|---|---|---:|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in sorted(recs, key=lambda r: (r["design"], r["model"], r["per_class"])):
        chosen = r["method"] + ("" if r["block"] is None else f"@{r['block']}")
        lines.append(
            f"| {r['design']} | {r['model']} | {r['per_class']} | {chosen}, lr {r['lr']:g} "
            f"| {r['optimizer_steps']} | {100 * r['test_accuracy']:.2f} "
            f"| {r['selection_seconds']:.1f} | {r['train_seconds']:.1f} "
            f"| {100 * r['selection_seconds'] / r['train_seconds']:.0f}% "
            f"| {100 * r['selection_seconds'] / r['run_seconds']:.0f}% |"
        )
    write_report("method_cost", lines, recs)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("what", choices=["measure", "report"])
    if ap.parse_args().what == "measure":
        measure()
    report()


if __name__ == "__main__":
    main()
