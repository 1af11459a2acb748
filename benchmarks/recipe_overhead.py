"""How much of a small fine-tuning run is not training? (issue 15: evaluation and checkpoint
cadence)

Usage (writes benchmarks/results/recipe_overhead.json and .md)::

    python benchmarks/recipe_overhead.py                 # this checkout, 100 images x 80 epochs
    python benchmarks/recipe_overhead.py --checkout /tmp/before --epochs 8 --label before

Runs ``accelerate launch recipes/finetune.py --train_size 100 --epochs 80`` (default settings
otherwise: the bundled resnet18 on digits, SCL FT at block 4, batch 64, the recipe's defaults
for evaluation, NC1, checkpoints and mixed precision) on one process, and compares the loop's
wall time (``wall_time_s`` in metrics.json: first epoch to the end of the last checkpoint) with
what it cannot do without: the training steps alone plus one final evaluation of the test split.
The goal: loop <= 1.3 x (training steps + final test evaluation).

The recipe times its parts itself (``time_s`` in metrics.json: ``train`` is the sum of
``fit_batches``' own timings, ``test``/``validation``/``nc1``/``checkpoints`` the rest).
Checkouts from before ``time_s`` existed (``--checkout`` of an older commit, e.g. a worktree of
3f225fc) evaluated the test split every epoch and recorded ``train_images_per_s`` per epoch;
there the training steps are sum(images / (images/s)) over the epochs, and "one final
evaluation" is the loop's mean per-epoch time outside training, counted once (an upper bound:
it also holds NC1 and the checkpoint write). A run of fewer ``--epochs`` is scaled to 80 in the
table: the loop and the training steps linearly (every epoch did the same work there), the one
final evaluation not.

Timings on a shared machine are noisy: the 1-minute load average before and after each run is
recorded. A commit shown with "+" ran with uncommitted changes in its working tree.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
RESULTS = HERE / "results"
GOAL = 1.3
TRAIN_SIZE, EPOCHS = 100, 80


def command(checkout: Path, epochs: int, out: Path) -> list[str]:
    """The launch command (its ``python -m accelerate.commands.launch`` is ``accelerate launch``)."""
    return [
        sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "1",
        "--num_machines", "1", "--dynamo_backend", "no",
        str(checkout / "recipes" / "finetune.py"),
        "--train_size", str(TRAIN_SIZE), "--epochs", str(epochs), "--output_dir", str(out),
    ]  # fmt: skip


def shown(cmd: list[str], checkout: Path) -> str:
    """``cmd`` as a user types it, relative to the checkout."""
    parts = ["accelerate", "launch", *cmd[3:]]
    parts = [os.path.relpath(p, checkout) if p.startswith(str(checkout)) else p for p in parts]
    out = parts.index("--output_dir")
    return shlex.join(parts[:out] + parts[out + 2 :])


def measure(checkout: Path, epochs: int, label: str) -> dict:
    with tempfile.TemporaryDirectory(prefix="recipe_overhead_") as tmp:
        out = Path(tmp) / "run"
        cmd = command(checkout, epochs, out)
        env = {**os.environ, "PYTHONPATH": str(checkout)}
        load_before = os.getloadavg()[0]
        start = time.perf_counter()
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=checkout)
        process_s = time.perf_counter() - start
        if proc.returncode:
            raise SystemExit(f"the run failed:\n{proc.stderr[-3000:]}")
        metrics = json.loads((out / "metrics.json").read_text())
        checkpoints = sum(f.stat().st_size for f in (out / "checkpoints").rglob("*") if f.is_file())
    loop = metrics["wall_time_s"]
    if "time_s" in metrics:
        parts = dict(metrics["time_s"])
        final_eval = parts.get("test", 0.0)
    else:  # before time_s: training from the per-epoch throughput, the rest per epoch
        images = metrics["num_train"]
        parts = {"train": sum(images / h["train_images_per_s"] for h in metrics["history"])}
        parts["evaluation, NC1 and checkpoint every epoch"] = loop - parts["train"]
        final_eval = (loop - parts["train"]) / len(metrics["history"])
    k = EPOCHS / epochs  # the loop and its training scale with the epochs; one evaluation not
    reference = parts["train"] * k + final_eval
    git = ["git", "-C", str(checkout)]
    commit = subprocess.run([*git, "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
    changed = subprocess.run(  # uncommitted changes to tracked files: "+" after the commit
        [*git, "status", "--porcelain", "--untracked-files=no"], capture_output=True, text=True
    )
    commit = commit.stdout.strip() + ("+" if changed.stdout.strip() else "")
    return {
        "label": label,
        "commit": commit,
        "command": shown(cmd, checkout),
        "epochs": epochs,
        "train_size": TRAIN_SIZE,
        "date": dt.date.today().isoformat(),
        "loop_s": loop,
        "process_s": process_s,
        "parts_s": parts,
        "final_eval_s": final_eval,
        "reference_s": reference,  # at 80 epochs
        "ratio": loop * k / reference,  # at 80 epochs
        "scale_to_80": k,
        "test_accuracy": metrics.get("test_accuracy"),
        "optimizer_steps": metrics.get("optimizer_steps"),
        "final_lr": metrics.get("final_lr"),
        "eval_every": metrics.get("eval_every"),
        "save_every": metrics.get("save_every"),
        "checkpoint_bytes_left": checkpoints,
        "mixed_precision": metrics.get("mixed_precision"),
        "load_avg_1min": [round(load_before, 2), round(os.getloadavg()[0], 2)],
        "cpus": os.cpu_count(),
    }


def report(records: list[dict]) -> str:
    lines = [
        "# Recipe overhead: 100 training images x 80 epochs",
        "",
        "Loop wall time (metrics.json `wall_time_s`) against the training steps alone plus one "
        f"final test evaluation; goal: ratio <= {GOAL}. Runs of fewer epochs are scaled to 80 "
        "(x). Made by `python benchmarks/recipe_overhead.py` (see its docstring).",
        "",
        "| run | commit | epochs run | loop s (x80) | training steps s | final eval s | ratio |"
        " goal | process s | load avg before/after |",
        "|---|---|---:|---:|---:|---:|---:|---|---:|---|",
    ]
    for r in records:
        k = r["scale_to_80"]
        ok = "met" if r["ratio"] <= GOAL else "missed"
        lines.append(
            f"| {r['label']} | {r['commit']} | {r['epochs']} | {r['loop_s'] * k:.1f} | "
            f"{r['parts_s']['train'] * k:.1f} | {r['final_eval_s']:.2f} | {r['ratio']:.2f} | "
            f"{ok} | {r['process_s']:.1f} | {r['load_avg_1min'][0]} / {r['load_avg_1min'][1]} |"
        )
    lines += ["", "Commands (run from the checkout):", ""]
    lines += [f"- {r['label']}: `{r['command']}`" for r in records]
    lines += ["", "Where the loop's time went (seconds, as run):", ""]
    for r in records:
        parts = ", ".join(f"{k} {v:.2f}" for k, v in r["parts_s"].items())
        other = r["loop_s"] - sum(r["parts_s"].values())
        lines.append(f"- {r['label']}: {parts}; other {other:.2f}")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--checkout", type=Path, default=ROOT, help="the repository to run")
    ap.add_argument("--epochs", type=int, default=EPOCHS)
    ap.add_argument("--label", default="now")
    args = ap.parse_args(argv)
    record = measure(args.checkout.resolve(), args.epochs, args.label)
    path = RESULTS / "recipe_overhead.json"
    records = json.loads(path.read_text()) if path.is_file() else []
    records = [r for r in records if r["label"] != args.label] + [record]
    records.sort(key=lambda r: r["label"] != "before")
    path.write_text(json.dumps(records, indent=2) + "\n")
    (RESULTS / "recipe_overhead.md").write_text(report(records))
    print(report(records))


if __name__ == "__main__":
    main()
