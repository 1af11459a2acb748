"""Turn the run records into tables, plots and a verdict on each claim of SPEC section 6.

    python benchmarks/summarize.py

Reads the run records in ``results/runs/<backbone>/<target>.jsonl`` (full-budget runs only)
and ``results/lr_grid.json``; writes ``results/summary.{md,json}`` and
``results/small_data_<backbone>_<target>.png``. Reading only: it never trains, so it can run at
any time on whatever records exist.
"""

from __future__ import annotations

import json

import numpy as np
from common import (
    BACKBONES,
    MAIN_BACKBONES,
    MAIN_TARGETS,
    METHODS,
    PAPER_LR,
    PAPER_LR_SIZES,
    RESULTS,
    RUNS,
    SIZES,
    STEPS,
    TABLE_SIZES,
    chosen_lr,
    mean_sd,
    read_records,
)
from scipy.stats import spearmanr

NAMES = {"linear": "linear probe", "layer": "Layer FT", "scl": "SCL FT", "full": "full FT"}


def load_records() -> list[dict]:
    """The records of the main tables, in file and key order: full budget, not the lr grid,
    default BN policy and skip (no ablations), the whole test split."""
    recs = []
    for path in sorted(RUNS.rglob("*.jsonl")):
        for rec in read_records(path):
            run = rec["run"]
            if (
                run["steps"] == STEPS
                and not run["validate"]
                and not run.get("bn")
                and run.get("skip_norm") is None
                and run.get("budget") is None  # budget.py's runs live elsewhere anyway
                and run.get("test_max") is None  # so do selection_loto.py's
            ):
                recs.append(rec)
    return recs


def group(recs, b, t, m, n, lr, block="middle"):
    blk = BACKBONES[b]["middle"] if block == "middle" else block
    return [
        r
        for r in recs
        if (r["run"]["backbone"], r["run"]["target"], r["run"]["method"], r["run"]["per_class"])
        == (b, t, m, n)
        and r["run"]["lr"] == lr
        and (m in ("linear", "full") or r["run"]["block"] == blk)
    ]


def stats(rs, key="test_accuracy"):
    vals = [r["metrics"][key] for r in rs if r["metrics"].get(key) is not None]
    if not vals:
        return None
    mean, sd = mean_sd(vals)
    return {"mean": mean, "std": sd, "n": len(vals)}


def cell(s, scale=100.0, digits=1):
    if s is None:
        return "-"
    sd = f" ± {scale * s['std']:.{digits}f}" if s["n"] > 1 else ""
    return f"{scale * s['mean']:.{digits}f}{sd}"


def small_data(recs, b, t, lr_of, out):
    """Table and plot of accuracy vs per-class size; returns {method: {size: stats}}."""
    table = {m: {n: stats(group(recs, b, t, m, n, lr_of(m))) for n in SIZES[t]} for m in METHODS}
    lrs = ", ".join(f"{NAMES[m]} {lr_of(m):g}" if lr_of(m) else f"{NAMES[m]} -" for m in METHODS)
    size_table(out, f"### {b} on {t} (learning rates: {lrs})", table, SIZES[t])
    plot_curve(b, t, table)
    return table


def size_table(out, title, table, sizes):
    """Markdown rows: one per per-class size, one column per method ({method: {size: stats}})."""
    out += [
        "",
        title,
        "",
        "| per class | " + " | ".join(NAMES[m] for m in METHODS) + " |",
        "|---:|" + "---:|" * len(METHODS),
    ]
    for n in sizes:
        out.append(f"| {n} | " + " | ".join(cell(table[m][n]) for m in METHODS) + " |")


def plot_curve(b, t, table):
    if not any(s is not None for v in table.values() for s in v.values()):
        (RESULTS / f"small_data_{b}_{t}.png").unlink(missing_ok=True)  # no records: no plot
        return
    from ncfinetune.plotting import new_figure, save_figure

    fig, ax = new_figure(figsize=(6, 4))
    for m in METHODS:
        pts = [(n, s) for n, s in table[m].items() if s is not None]
        if not pts:
            continue
        xs = [n for n, _ in pts]
        ys = np.array([100 * s["mean"] for _, s in pts])
        sd = np.array([100 * s["std"] for _, s in pts])
        ax.plot(xs, ys, marker="o", label=NAMES[m])
        ax.fill_between(xs, ys - sd, ys + sd, alpha=0.15)
    ax.set_xscale("log")
    ax.set_xlabel("training images per class")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title(f"{BACKBONES[b]['model']} -> {t} (mean ± sd over seeds)")
    ax.grid(alpha=0.3)
    ax.legend()
    save_figure(fig, RESULTS / f"small_data_{b}_{t}.png", dpi=120)


def method_block(recs, b, t, n, lr_of, out):
    rows = []
    for m in ("linear", "full"):
        rows.append((m, None, group(recs, b, t, m, n, lr_of(m))))
    for k in BACKBONES[b]["blocks"]:
        for m in ("layer", "scl"):
            rows.append((m, k, group(recs, b, t, m, n, lr_of(m), block=k)))
    out += [
        "",
        f"### {b} on {t}, {n} per class",
        "",
        "| method | block | test acc (%) | NC1 train | NC1 test | trainable (%) |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    table = []
    for m, k, rs in rows:
        if not rs:
            continue
        acc, ntr, nte = stats(rs), stats(rs, "nc1_train"), stats(rs, "nc1_test")
        out.append(
            f"| {NAMES[m]} | {'' if k is None else k} | {cell(acc)} | {cell(ntr, 1, 3)} | "
            f"{cell(nte, 1, 3)} | {rs[0]['trainable_percent']:.2f} |"
        )
        table.append(
            {
                "method": m,
                "block": k,
                "accuracy": acc,
                "nc1_train": ntr,
                "nc1_test": nte,
                "trainable_percent": rs[0]["trainable_percent"],
            }
        )
    return table


def spearman(recs, key="nc1_train"):
    pairs = [
        (r["metrics"][key], r["metrics"]["test_accuracy"])
        for r in recs
        if r["metrics"].get(key) is not None
    ]
    if len(pairs) < 3:
        return None
    rho, p = spearmanr(*zip(*pairs, strict=True))
    return {"rho": float(rho), "p": float(p), "n": len(pairs)}


def main() -> None:
    recs = load_records()
    summary = {
        "num_records": len(recs),
        "small_data": {},
        "paper_lr": {},
        "method_block": {},
        "spearman": {},
        "compute_hours": sum(r["train_seconds"] + r["eval_seconds"] for r in recs) / 3600,
    }
    out = [
        "# Benchmark summary",
        "",
        f"{len(recs)} runs ({STEPS} SGD steps each, batch 32), "
        f"{summary['compute_hours']:.2f} h of training + evaluation in total.",
        "",
        "## 1. Small-data curve (test accuracy %, mean ± sd over seeds, sd with ddof 1; lr chosen per method)",
    ]
    for b in MAIN_BACKBONES:
        for t in MAIN_TARGETS:
            tab = small_data(recs, b, t, lambda m, b=b, t=t: chosen_lr(b, t, m), out)
            summary["small_data"][f"{b}/{t}"] = {
                m: {str(n): s for n, s in v.items()} for m, v in tab.items()
            }
    out += ["", f"## 1b. The paper's fixed setting: SGD lr {PAPER_LR:g} for every method"]
    for b in MAIN_BACKBONES:
        for t in MAIN_TARGETS:
            table = {
                m: {n: stats(group(recs, b, t, m, n, PAPER_LR)) for n in PAPER_LR_SIZES}
                for m in METHODS
            }
            size_table(out, f"### {b} on {t}", table, PAPER_LR_SIZES)
            for n in PAPER_LR_SIZES:
                summary["paper_lr"][f"{b}/{t}/{n}"] = {m: table[m][n] for m in METHODS}
    out += ["", "## 2. Method x block (lr chosen per method at the middle block)"]
    for b in MAIN_BACKBONES:
        for t in MAIN_TARGETS:
            for n in TABLE_SIZES:
                summary["method_block"][f"{b}/{t}/{n}"] = method_block(
                    recs, b, t, n, lambda m, b=b, t=t: chosen_lr(b, t, m), out
                )
    out += [
        "",
        "## 3. Penultimate NC1 after fine-tuning vs test accuracy",
        "",
        "Spearman correlation between the penultimate NC1 of the training subset (and of the "
        "test split) after fine-tuning and test accuracy, over every run of experiments 1 and 2 "
        "(all methods, blocks, sizes, seeds, both learning-rate settings; the lr-grid runs "
        "excluded); negative = lower NC1 goes with higher accuracy.",
        "",
        "| backbone | target | runs | rho (NC1 train) | p | rho (NC1 test) | p |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    runs12 = recs  # load_records keeps experiments 1 and 2 only

    def rho_row(b, t, rs):
        s, st = spearman(rs), spearman(rs, "nc1_test")
        if s and st:
            out.append(
                f"| {b} | {t} | {s['n']} | {s['rho']:.3f} | {s['p']:.1e} | "
                f"{st['rho']:.3f} | {st['p']:.1e} |"
            )
        return {"nc1_train": s, "nc1_test": st}

    for b in MAIN_BACKBONES:
        for t in MAIN_TARGETS:
            summary["spearman"][f"{b}/{t}"] = rho_row(
                b, t, [r for r in runs12 if (r["run"]["backbone"], r["run"]["target"]) == (b, t)]
            )
    summary["spearman"]["all"] = rho_row("all", "all", runs12)
    out += [
        "",
        "Pooled over sizes, the subset size confounds the correlation (more samples: higher "
        "accuracy *and* a harder-to-collapse training set). At a fixed size, across methods and "
        "blocks (the method x block runs, chosen learning rates, all seeds):",
        "",
        "| backbone | target | per class | runs | rho (NC1 train) | rho (NC1 test) |",
        "|---|---|---:|---:|---:|---:|",
    ]
    summary["spearman_fixed_size"] = {}
    for b in MAIN_BACKBONES:
        for t in MAIN_TARGETS:
            for n in TABLE_SIZES:
                rs = [
                    r
                    for r in runs12
                    if (r["run"]["backbone"], r["run"]["target"], r["run"]["per_class"])
                    == (b, t, n)
                    and r["run"]["lr"] == chosen_lr(b, t, r["run"]["method"])
                ]
                s, st = spearman(rs), spearman(rs, "nc1_test")
                summary["spearman_fixed_size"][f"{b}/{t}/{n}"] = {"nc1_train": s, "nc1_test": st}
                if s and st:
                    out.append(f"| {b} | {t} | {n} | {s['n']} | {s['rho']:.3f} | {st['rho']:.3f} |")
    (RESULTS / "summary.json").write_text(json.dumps(summary, indent=1, default=str) + "\n")
    (RESULTS / "summary.md").write_text("\n".join(out) + "\n")
    print("\n".join(out))


if __name__ == "__main__":
    main()
