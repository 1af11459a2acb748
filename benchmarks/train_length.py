"""Issue 29: how long should a default run train on small data?

    python benchmarks/train_length.py measure [--backbones resnet18] [--seeds 0 1]  # resumable
    python benchmarks/train_length.py report

The recipe's default method (SCL FT at the backbone's middle block, SGD lr 0.1, batch 64, cosine
to 1e-4: ``recipes/configs/default.yaml``) on class-balanced subsets of SIZES images per class of
each target in TARGETS, trained for every length a candidate rule gives: ``run_length`` of
``ncfinetune.training.length`` (the library's one rule: at least ``DEFAULT_EPOCHS`` epochs and at
least ``min_steps`` optimizer steps) for each ``min_steps`` in FLOORS (0 = the old default, ten
epochs), and 30 and 100 epochs (the issue's comparison) while they stay <= MAX_STEPS. Test
accuracy on the test split (Fashion-MNIST: a fixed class-balanced 2,000).

``report`` chooses the floor leave one target out: for each held-out target, the floor with the
highest mean accuracy over the other targets' subsets (floors within TIE points of it: the
smallest, i.e. the cheapest), scored on the held-out target as regret against the best length in
hindsight (same subset and seed) and against the best of 10, 30 and 100 epochs; with the cost in
optimizer steps relative to the old default.
"""

from __future__ import annotations

import argparse
import json
import math

import numpy as np
from common import BACKBONES, RESULTS, load_data, run_all, run_for, saved, subset

from ncfinetune.training.length import DEFAULT_EPOCHS, MIN_STEPS, run_length

OUT = RESULTS / "train_length"
TARGETS = ["fmnist59", "digits", "fmnist59_inv", "digits_rot90"]
SIZES = [10, 2, 50, 20, 5, 100]  # per class, in the order measured (most telling first)
FLOORS = [0, 100, 150, 200, 300]
EPOCH_POINTS = [10, 30, 100]
MAX_STEPS = 600
BATCH = 64  # the recipe's batch_size
LR = 0.1  # the recipe's lr
TEST_MAX = 2000
TIE = 0.25  # points: floors this close to the best count as level (the smaller one wins)


def steps_per_epoch(b: str, t: str, n: int) -> int:
    rows = len(subset(load_data(b, t), n, 0))
    return math.ceil(rows / BATCH)


def lengths(spe: int) -> dict[str, int]:
    """Steps of every candidate for a subset with ``spe`` steps per epoch."""
    out = {f"floor{f}": run_length(spe, min_steps=f).steps for f in FLOORS}
    for e in EPOCH_POINTS:
        if e * spe <= MAX_STEPS or e == DEFAULT_EPOCHS:
            out[f"epochs{e}"] = e * spe
    return out


def run_of(b: str, t: str, n: int, s: int, steps: int):
    return run_for(
        b, t, "scl", n, s, LR, steps=steps, batch=BATCH, test_max=TEST_MAX, bench="train_length"
    )


def plan(backbones, seeds, sizes=SIZES) -> list:
    runs = []
    for s in seeds:
        for b in backbones:
            for n in sizes:
                for t in TARGETS:
                    spe = steps_per_epoch(b, t, n)
                    runs += [run_of(b, t, n, s, k) for k in sorted(set(lengths(spe).values()))]
    return list(dict.fromkeys(runs))


def acc(rec: dict | None) -> float | None:
    if rec is None or rec["metrics"].get("test_accuracy") is None:
        return None  # not run, or diverged
    return 100 * rec["metrics"]["test_accuracy"]


def cells(backbones, seeds) -> list[dict]:
    """One dict per measured (backbone, target, size, seed): accuracy per candidate."""
    out = []
    for b in backbones:
        for t in TARGETS:
            for n in SIZES:
                spe = steps_per_epoch(b, t, n)
                for s in seeds:
                    cand = lengths(spe)
                    accs = {k: acc(saved(run_of(b, t, n, s, v))) for k, v in cand.items()}
                    if any(a is None for a in accs.values()):
                        continue
                    out.append(
                        dict(
                            backbone=b, target=t, per_class=n, seed=s, spe=spe, steps=cand, acc=accs
                        )
                    )
    return out


def choose_floor(train: list[dict]) -> int:
    means = {f: np.mean([c["acc"][f"floor{f}"] for c in train]) for f in FLOORS}
    best = max(means.values())
    return min(f for f in FLOORS if means[f] >= best - TIE)


def loto(cs: list[dict]) -> dict:
    rows = []
    for t in TARGETS:
        held = [c for c in cs if c["target"] == t]
        train = [c for c in cs if c["target"] != t]
        if not held or not train:
            continue
        f = choose_floor(train)
        k = f"floor{f}"
        regret = [max(c["acc"].values()) - c["acc"][k] for c in held]
        regret_ep = [
            max(c["acc"][f"epochs{e}"] for e in EPOCH_POINTS if f"epochs{e}" in c["acc"])
            - c["acc"][k]
            for c in held
        ]
        gain = [c["acc"][k] - c["acc"]["floor0"] for c in held]
        cost = [c["steps"][k] / c["steps"]["floor0"] for c in held]
        rows.append(
            dict(
                target=t,
                floor=f,
                cells=len(held),
                acc=float(np.mean([c["acc"][k] for c in held])),
                old=float(np.mean([c["acc"]["floor0"] for c in held])),
                gain=float(np.mean(gain)),
                regret_mean=float(np.mean(regret)),
                regret_max=float(np.max(regret)),
                regret_epochs_mean=float(np.mean(regret_ep)),
                regret_epochs_max=float(np.max(regret_ep)),
                cost_mean=float(np.mean(cost)),
                cost_max=float(np.max(cost)),
            )
        )
    return {"rows": rows, "all_targets_floor": choose_floor(cs) if cs else None}


def table_by_size(cs: list[dict]) -> list[str]:
    keys = [f"floor{f}" for f in FLOORS] + [f"epochs{e}" for e in EPOCH_POINTS]
    head = "| backbone / target | per class | steps/epoch | " + " | ".join(keys) + " |"
    lines = [head, "|" + "---|" * (3 + len(keys))]
    groups: dict[tuple, list[dict]] = {}
    for c in cs:
        groups.setdefault((c["backbone"], c["target"], c["per_class"]), []).append(c)
    for (b, t, n), g in sorted(groups.items()):
        vals = []
        for k in keys:
            if k not in g[0]["acc"]:
                vals.append("-")
                continue
            vals.append(f"{np.mean([c['acc'][k] for c in g]):.1f} ({g[0]['steps'][k]})")
        lines.append(f"| {b} / {t} | {n} | {g[0]['spe']} | " + " | ".join(vals) + " |")
    return lines


def report(backbones, seeds) -> None:
    cs = cells(backbones, seeds)
    res = loto(cs)
    md = [
        "# Training length for small data (issue 29)",
        "",
        "`python benchmarks/train_length.py measure && python benchmarks/train_length.py report`",
        "",
        f"SCL FT at the middle block, SGD lr {LR}, batch {BATCH}, cosine to 1e-4 (the recipe's "
        f"defaults); test accuracy (%), mean over seeds {', '.join(map(str, seeds))}; in brackets "
        "the optimizer steps. `floorF`: at least ten epochs and at least F steps (floor0 = the "
        "old default, ten epochs); `epochsE`: E epochs.",
        "",
        *table_by_size(cs),
        "",
        "## Leave one target out",
        "",
        f"The floor is chosen on the other targets (highest mean accuracy; within {TIE} points: "
        "the smaller floor) and scored on the held-out one. Regret: best length in hindsight "
        "(any candidate) minus the chosen floor's accuracy, same subset and seed; 'vs epochs': "
        "the same against the best of 10, 30, 100 epochs. Cost: steps / the old default's steps.",
        "",
        "| held-out target | subsets | floor chosen | acc (old default) | gain | regret mean / max "
        "| vs epochs mean / max | cost mean / max |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in res["rows"]:
        md.append(
            f"| {r['target']} | {r['cells']} | {r['floor']} | {r['acc']:.2f} ({r['old']:.2f}) | "
            f"{r['gain']:+.2f} | {r['regret_mean']:.2f} / {r['regret_max']:.2f} | "
            f"{r['regret_epochs_mean']:.2f} / {r['regret_epochs_max']:.2f} | "
            f"{r['cost_mean']:.1f}x / {r['cost_max']:.1f}x |"
        )
    md += [
        "",
        f"On all targets together the same procedure picks floor {res['all_targets_floor']}; the "
        f"library's `MIN_STEPS` is {MIN_STEPS}.",
    ]
    OUT.mkdir(parents=True, exist_ok=True)
    (RESULTS / "train_length.md").write_text("\n".join(md) + "\n")
    (RESULTS / "train_length.json").write_text(
        json.dumps({"cells": cs, "loto": res, "min_steps": MIN_STEPS}, indent=1) + "\n"
    )
    plot(cs)
    print("\n".join(md))


def plot(cs: list[dict]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(TARGETS), figsize=(4 * len(TARGETS), 3.4), sharey=False)
    for ax, t in zip(np.atleast_1d(axes), TARGETS, strict=True):
        for n in sorted({c["per_class"] for c in cs if c["target"] == t}):
            g = [c for c in cs if c["target"] == t and c["per_class"] == n]
            by_steps = {g[0]["steps"][k]: k for k in g[0]["acc"]}  # one key per length
            xs = sorted(by_steps)
            ys = [np.mean([c["acc"][by_steps[x]] for c in g]) for x in xs]
            ax.plot(xs, ys, marker="o", label=f"{n}/class")
        ax.axvline(MIN_STEPS, color="grey", ls=":", lw=1)
        ax.set_xscale("log")
        ax.set_title(t)
        ax.set_xlabel("optimizer steps")
    np.atleast_1d(axes)[0].set_ylabel("test accuracy (%)")
    np.atleast_1d(axes)[-1].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(RESULTS / "train_length.png", dpi=110)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("what", choices=["measure", "report"])
    p.add_argument("--backbones", nargs="+", default=["resnet18"], choices=list(BACKBONES))
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1])
    p.add_argument("--sizes", nargs="+", type=int, default=SIZES, help="per class")
    a = p.parse_args(argv)
    if a.what == "measure":
        run_all(plan(a.backbones, a.seeds, a.sizes))
    else:
        report(a.backbones, a.seeds)


if __name__ == "__main__":
    main()
