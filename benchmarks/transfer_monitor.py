"""CTC's claim at this scale (issue 26): does transfer peak before source accuracy while a backbone
pretrains, and does the best-transferring checkpoint fine-tune better than the last one?

    python benchmarks/transfer_monitor.py pretrain   # resnet18 from scratch, the monitor on
    python benchmarks/transfer_monitor.py finetune   # SCL FT from the chosen vs the last epoch
    python benchmarks/transfer_monitor.py report     # results/transfer_monitor.{json,md,png}

``pretrain`` runs the pretrain recipe (``python -m ncfinetune pretrain``) on Fashion-MNIST 0-4
with ``--transfer_targets digits,fashion_mnist:5-9`` and keeps every epoch's backbone
(``--save_every 1``) under ``benchmarks/.cache/transfer_monitor/`` (not committed). An "epoch"
here is ``MAX_STEPS`` optimizer steps of batch 128 (about 0.43 of a pass over the 30,000 source
images) so that the curves span many points within the CPU budget.

``finetune``: for each target, the checkpoint is chosen leave one target out, i.e. at the epoch
where the *other* target's monitor probe accuracy peaked (the target itself never informs it),
and compared with the last epoch: SCL FT at the middle block (block 4), 10 and 100 per class, 3
seeds, 150 steps, the protocol of ``common.py`` (lr: the bundled resnet18's chosen SCL lr for
that target, from ``lr_grid.py``). Records: ``results/transfer_monitor/runs.jsonl``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

import numpy as np
from common import (
    BACKBONES,
    CACHE,
    RESULTS,
    SEEDS,
    chosen_lr,
    execute,
    mean_sd,
    read_record,
    run_for,
    upsert_record,
    versions,
)

OUT = CACHE / "transfer_monitor"
RECORDS = RESULTS / "transfer_monitor" / "runs.jsonl"
TARGETS = {"digits": "digits", "fashion_mnist:5-9": "fmnist59"}  # monitor name -> benchmark target
EPOCHS, MAX_STEPS = 24, 100
SIZES = [10, 100]
PRETRAIN = [
    "--model", "resnet18", "--dataset", "fashion_mnist", "--classes", "0,1,2,3,4",
    "--image_size", "32", "--epochs", str(EPOCHS), "--max_steps", str(MAX_STEPS),
    "--batch_size", "128", "--optimizer", "sgd", "--lr", "0.1", "--weight_decay", "0.0005",
    "--nc1_samples", "2000", "--seed", "0", "--save_every", "1",
    "--transfer_targets", ",".join(TARGETS), "--transfer_every", "1",
]  # fmt: skip


def pretrain() -> None:
    if (OUT / "backbone.json").is_file():
        print(f"{OUT} is finished; delete it to pretrain again")
        return
    if OUT.exists():  # an interrupted run: the recipe never resumes a pretraining
        import shutil

        shutil.rmtree(OUT)
    cmd = [sys.executable, "-m", "ncfinetune", "pretrain", *PRETRAIN, "--output_dir", str(OUT)]
    print(" ".join(cmd), flush=True)
    subprocess.run(cmd, check=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})


def history() -> list[dict]:
    return json.loads((OUT / "metrics.json").read_text())["history"]


def probe_curve(target: str) -> list[float]:
    return [r["transfer"][target]["linear_probe_accuracy"] for r in history()]


def chosen_epochs() -> dict[str, dict[str, int]]:
    """Per benchmark target: the epoch chosen on the other target's probe curve (LOTO: the
    target never informs it), the last epoch, and for context two in-sample choices that a
    user could not make without the target's own labels: the target's own probe peak and the
    recipe's ``best_transfer`` (the peak of the mean over both targets)."""
    h = history()
    mean_best = json.loads((OUT / "metrics.json").read_text())["best_transfer_epoch"]
    out = {}
    for name, target in TARGETS.items():
        other = next(n for n in TARGETS if n != name)
        out[target] = {
            "chosen_on_other": h[int(np.argmax(probe_curve(other)))]["epoch"],  # earliest peak
            "last": h[-1]["epoch"],
            "own_peak": h[int(np.argmax(probe_curve(name)))]["epoch"],
            "best_transfer_mean": mean_best,
        }
    return out


def backbone_for(epoch: int) -> str:
    """A ``common.BACKBONES`` entry for an epoch's checkpoint (resnet18's blocks)."""
    name = f"ctc_resnet18_e{epoch}"
    BACKBONES[name] = {**BACKBONES["resnet18"], "model": str(OUT / "epochs" / f"epoch_{epoch}")}
    return name


def finetune() -> None:
    for target, epochs in chosen_epochs().items():
        lr = chosen_lr("resnet18", target, "scl")
        for epoch in sorted(set(epochs.values())):
            backbone = backbone_for(epoch)
            for per_class in SIZES:
                for seed in SEEDS:
                    run = run_for(backbone, target, "scl", per_class, seed, lr)
                    key = f"{backbone}/{target}/{run.key}"
                    if read_record(RECORDS, key) is not None:
                        continue
                    rec = execute(run)
                    # "finetune_run", not "run": these are not records of results/runs/
                    run_fields = rec.pop("run")
                    rec = {**rec, "key": key, "finetune_run": run_fields}
                    upsert_record(RECORDS, rec)
                    m = rec["metrics"]
                    print(f"{backbone} {target} {run.key}: test {m['test_accuracy']}", flush=True)


def report() -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    h = history()
    metrics = json.loads((OUT / "metrics.json").read_text())
    epochs = [r["epoch"] for r in h]
    fig, axes = plt.subplots(1, 4, figsize=(17, 3.8))
    axes[0].plot(epochs, [r["test_accuracy"] for r in h], "k-o", ms=3, label="source test acc")
    axes[0].set_title("source (Fashion-MNIST 0-4)")
    ax_nc1 = axes[0].twinx()
    ax_nc1.plot(epochs, [r["nc1_train"] for r in h], "r--", label="source NC1")
    ax_nc1.set_ylabel("NC1 (train)", color="r")
    for ax, score, title in zip(axes[1:], ("linear_probe_accuracy", "recall_at_1", "nmi"),
                                ("linear probe acc (held-out train rows)", "R@1", "NMI"), strict=True):  # fmt: skip
        for name in TARGETS:
            ax.plot(epochs, [r["transfer"][name][score] for r in h], "-o", ms=3, label=name)
        ax.set_title(title)
        ax.legend(fontsize=8)
    for ax in axes:
        ax.set_xlabel(f"epoch ({MAX_STEPS} steps of 128)")
    fig.tight_layout()
    (RESULTS / "transfer_monitor").mkdir(parents=True, exist_ok=True)
    fig.savefig(RESULTS / "transfer_monitor" / "curves.png", dpi=110)

    recs = (
        [json.loads(line) for line in RECORDS.read_text().splitlines()] if RECORDS.exists() else []
    )
    chosen = chosen_epochs()
    rows = []
    for target, ep in chosen.items():
        for per_class in SIZES:
            row = {"target": target, "per_class": per_class, **ep}
            for which, epoch in ep.items():
                accs = [r["metrics"]["test_accuracy"] for r in recs
                        if r["key"].startswith(f"ctc_resnet18_e{epoch}/{target}/")
                        and r["finetune_run"]["per_class"] == per_class]  # fmt: skip
                row[f"{which}_acc"] = mean_sd(accs) if len(accs) == len(SEEDS) else None
                row[f"{which}_seeds"] = accs
            rows.append(row)
    peak = {n: h[int(np.argmax(probe_curve(n)))]["epoch"] for n in TARGETS}
    summary = {
        "command": "python benchmarks/transfer_monitor.py pretrain && python "
        "benchmarks/transfer_monitor.py finetune && python benchmarks/transfer_monitor.py report",
        "pretrain_args": PRETRAIN,
        "epochs": EPOCHS,
        "steps_per_epoch": MAX_STEPS,
        "best_source_epoch": metrics["best_source_epoch"],
        "best_transfer_epoch_mean": metrics.get("best_transfer_epoch"),
        "probe_peak_epoch": peak,
        "monitor_share_of_epoch": metrics["monitor_share_of_epoch"],
        "history": h,
        "finetune": rows,
        "versions": versions(),
    }
    (RESULTS / "transfer_monitor" / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    lines = [
        "# Transfer while pretraining (CTC's claim at this scale)",
        "",
        f"Command: `{summary['command']}`. resnet18 from scratch on Fashion-MNIST 0-4, {EPOCHS} "
        f"epochs of {MAX_STEPS} steps (batch 128, SGD lr 0.1 cosine); monitor on "
        f"{', '.join(TARGETS)} every epoch (linear probe fit on 50 per class, scored on 100 other "
        "training rows per class).",
        "",
        f"- best source test accuracy: epoch {summary['best_source_epoch']}; monitor probe "
        f"accuracy peaks: {', '.join(f'{k} epoch {v}' for k, v in peak.items())}; mean over "
        f"targets: epoch {summary['best_transfer_epoch_mean']}",
        f"- monitor cost: {100 * summary['monitor_share_of_epoch']:.1f}% of the epoch time",
        "",
        "| epoch | source acc | source NC1 | " + " | ".join(f"{n} probe / R@1 / NMI" for n in TARGETS) + " |",
        "|---|---|---|" + "---|" * len(TARGETS),
    ]  # fmt: skip
    for r in h:
        cells = [f"{r['transfer'][n]['linear_probe_accuracy']:.3f} / {r['transfer'][n]['recall_at_1']:.3f} / {r['transfer'][n]['nmi']:.3f}" for n in TARGETS]  # fmt: skip
        lines.append(f"| {r['epoch']} | {r['test_accuracy']:.4f} | {r['nc1_train']:.3f} | " + " | ".join(cells) + " |")  # fmt: skip
    lines += ["", "SCL FT (block 4, 150 steps, 3 seeds) from each checkpoint, test accuracy %, "
              "mean ± sd (epoch in brackets). LOTO: chosen on the other target's monitor curve, "
              "the valid comparison with the last epoch; own peak and best_transfer (mean over "
              "both targets) use the target's own held-out training rows: context only.", "",
              "| target | per class | LOTO choice | last | LOTO - last | own peak | best_transfer |",
              "|---|---|---|---|---|---|---|"]  # fmt: skip

    def cell(row, which):
        a = row[f"{which}_acc"]
        return "-" if a is None else f"{100 * a[0]:.2f} ± {100 * a[1]:.2f} ({row[which]})"

    for row in rows:
        if row["chosen_on_other_acc"] is None or row["last_acc"] is None:
            continue
        diff = 100 * (np.mean(row["chosen_on_other_seeds"]) - np.mean(row["last_seeds"]))
        lines.append(
            f"| {row['target']} | {row['per_class']} | {cell(row, 'chosen_on_other')} | "
            f"{cell(row, 'last')} | {diff:+.2f} | {cell(row, 'own_peak')} | "
            f"{cell(row, 'best_transfer_mean')} |"
        )
    (RESULTS / "transfer_monitor" / "summary.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("stage", choices=["pretrain", "finetune", "report"])
    {"pretrain": pretrain, "finetune": finetune, "report": report}[parser.parse_args().stage]()
