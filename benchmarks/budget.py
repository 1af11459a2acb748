"""Issue 17: accuracy against wall-clock budgets, each method trained for the same seconds.

    python benchmarks/budget.py calibrate [--backbones ...] [--sizes ...] [--pause PATTERN]
    python benchmarks/budget.py measure [--backbones resnet18] [--targets digits] [--sizes 10]
    python benchmarks/budget.py report

The other benchmarks give every method 150 optimizer steps. Here each method gets the same
*time*: budgets of 0.25x, 0.5x, 1x and 2x the time of full FT's 150 steps. A one-block step
costs less than a full-FT step (and with the frozen-prefix cache much less), so it takes more
steps in the same time.

How the steps are set (``calibrate``, once per backbone, target and size, in one process, one
variant after the other; one line each of ``results/budget/calibration.jsonl``):

- ``tau``: seconds per optimizer step, measured over ``TIMED_STEPS`` steps after 3 warm-up steps
  (with a filled prefix cache where the variant uses one);
- ``fill``: seconds to compute the prefix outputs of the subset's rows (0 without a cache);
- a budget of ``b`` is ``b * 150 * tau(full)`` seconds; a variant gets
  ``max(1, round((budget - fill) / tau))`` steps.

Calibrate on a quiet machine: ``calibrate --pause PATTERN`` stops (SIGSTOP) every other process
whose command line matches the regular expression ``PATTERN`` (e.g. ``"small_data|method_block"``)
for the calibration's minute or two and resumes them (SIGCONT) afterwards, even on an error;
the calibration records the 1-minute load average it started under. ``measure`` calibrates a
missing size itself, without pausing anything.

Each run then trains that many steps with the usual cosine schedule, filling its own prefix
cache while it trains (``Run.budget``: not shared with other runs), and records the seconds it
actually took. The plots put accuracy against the budget's seconds (the calibration's, taken
with nothing else running); the tables also give the measured seconds, which other load on
this 2-core machine inflates unevenly. Evaluation is not timed. Learning rates are the ones ``lr_grid.py`` chose per method (``bn="frozen"`` variants
use their method's); LoRA-in-block gets its own grid here. The selected block is
``ncfinetune.select_block`` (its default rule) on the seed-0 subset, recorded with the
calibration; where it is the middle block, "SCL selected" is the SCL middle run.

Peak memory: each variant trains ``TIMED_STEPS`` steps in a fresh process, which reports its
peak resident memory above what it held after loading the data and the model.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import resource
import signal
import subprocess
import sys
import time
from dataclasses import dataclass

import numpy as np
import torch
from common import (
    BACKBONES,
    MAIN_TARGETS,
    RESULTS,
    SEEDS,
    STEPS,
    chosen_lr,
    diverged,
    load_data,
    lr_runs,
    mean_sd,
    read_record,
    read_records,
    run_all,
    run_for,
    subset,
    upsert_record,
)

import ncfinetune
from ncfinetune.backbones.hub import create_backbone
from ncfinetune.files import write_json, write_text
from ncfinetune.plotting import new_figure, save_figure
from ncfinetune.training import train_steps
from ncfinetune.tuning.prefix_cache import PrefixCache, fill_shared, prefix_blocker

OUT = RESULTS / "budget"
BUDGETS = [0.25, 0.5, 1.0, 2.0]
SIZES = [10, 100]
TIMED_STEPS = 20
BATCH = 32


@dataclass(frozen=True)
class Variant:
    """A method as the budget comparison runs it."""

    name: str
    method: str
    block: str | None = None  # "middle" | "selected" | None
    bn: str | None = None

    def block_index(self, backbone: str, selected: int | None) -> int | None:
        if self.block == "middle":
            return BACKBONES[backbone]["middle"]
        return selected if self.block == "selected" else None


def variants(backbone: str) -> list[Variant]:
    out = [
        Variant("linear probe", "linear"),
        Variant("Layer FT mid", "layer", "middle"),
        Variant("SCL FT mid", "scl", "middle"),
        Variant("SCL FT selected", "scl", "selected"),
        Variant("LoRA-in-block mid", "lora-block", "middle"),
        Variant("full FT", "full"),
    ]
    if backbone.startswith("resnet"):  # BatchNorm: the prefix is cacheable only when frozen
        out += [
            Variant("linear probe, bn frozen", "linear", bn="frozen"),
            Variant("Layer FT mid, bn frozen", "layer", "middle", "frozen"),
            Variant("SCL FT mid, bn frozen", "scl", "middle", "frozen"),
            Variant("LoRA-in-block mid, bn frozen", "lora-block", "middle", "frozen"),
        ]
    return out


def wrapped(backbone: str, data: dict, variant: Variant, selected: int | None):
    torch.manual_seed(0)
    model = create_backbone(BACKBONES[backbone]["model"], data["num_classes"])
    block = variant.block_index(backbone, selected)
    return ncfinetune.get_tuned_model(model, variant.method, block=block, bn=variant.bn)


def calibration_key(backbone: str, target: str, n: int) -> str:
    return f"{backbone}_{target}_n{n}"


def saved_calibration(backbone: str, target: str, n: int) -> dict | None:
    """The calibration of a backbone, target and size (a line of ``calibration.jsonl``), or None."""
    return read_record(OUT / "calibration.jsonl", calibration_key(backbone, target, n))


def calibrate(backbone: str, target: str, n: int) -> dict:
    """Seconds per step and prefix-fill seconds of every variant, and the selected block."""
    if (cal := saved_calibration(backbone, target, n)) is not None:
        return cal
    data = load_data(backbone, target)
    fetch = data["train"].__getitems__
    rows = subset(data, n, 0)
    model = create_backbone(BACKBONES[backbone]["model"], data["num_classes"])
    t0 = time.perf_counter()
    limit = BACKBONES[backbone].get(
        "select_max_percent", ncfinetune.selection.MAX_TRAINABLE_PERCENT
    )
    selection = ncfinetune.select_block(
        model, fetch(list(rows)), seed=0, precision="no", max_trainable_percent=limit
    )
    selected = {"block": selection.chosen, "rule": selection.rule, "max_trainable_percent": limit,
                "seconds": time.perf_counter() - t0}  # fmt: skip
    out = {"key": calibration_key(backbone, target, n),
           "backbone": backbone, "target": target, "per_class": n, "rows": len(rows),
           "selected": selected, "timed_steps": TIMED_STEPS,
           "loadavg_1min": os.getloadavg()[0], "variants": {}}  # fmt: skip
    for v in variants(backbone):
        tuned = wrapped(backbone, data, v, selected["block"])
        cache = None if prefix_blocker(tuned) else PrefixCache(tuned, fetch)
        t0 = time.perf_counter()
        if cache is not None:
            fill_shared([cache], rows)
        fill = time.perf_counter() - t0
        kw = dict(batch_size=BATCH, lr=0.01, seed=0, prefix=cache)
        train_steps(tuned, fetch, rows, steps=3, **kw)  # warm-up
        t0 = time.perf_counter()
        train_steps(tuned, fetch, rows, steps=TIMED_STEPS, **kw)
        tau = (time.perf_counter() - t0) / TIMED_STEPS
        out["variants"][v.name] = {"tau": tau, "fill": fill, "cache": cache is not None}
        print(f"calibrate {backbone}/{target}/n{n} {v.name}: {tau * 1000:.1f} ms/step, "
              f"fill {fill:.2f}s", flush=True)  # fmt: skip
    upsert_record(OUT / "calibration.jsonl", out)
    return out


def matching_processes(pattern: str) -> list[int]:
    """PIDs of the other processes whose command line matches ``pattern`` (Linux /proc)."""
    try:
        regex = re.compile(pattern)
    except re.error as err:
        raise SystemExit(f"--pause {pattern!r} is not a regular expression ({err})") from None
    own, pid = set(), os.getpid()  # this process and its ancestors (the shell that ran it)
    while pid > 1 and pid not in own:
        own.add(pid)
        try:
            pid = int(open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            break
    pids = []
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit() or int(entry.name) in own:
            continue
        try:
            cmd = open(f"/proc/{entry.name}/cmdline", "rb").read().replace(b"\0", b" ").decode()
        except OSError:  # gone meanwhile, or not ours to read
            continue
        if cmd and regex.search(cmd):
            pids.append(int(entry.name))
    return pids


@contextlib.contextmanager
def paused(pattern: str | None):
    """Stop the processes matching ``pattern`` for the duration; always resume them."""
    pids = [] if pattern is None else matching_processes(pattern)
    stopped = []
    try:
        for pid in pids:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGSTOP)
                stopped.append(pid)
        if pattern is not None:
            print(f"paused {len(stopped)} process(es) matching {pattern!r}: {stopped}", flush=True)
        yield stopped
    finally:
        for pid in stopped:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGCONT)


def steps_for(cal: dict, name: str, budget: float) -> int:
    seconds = budget * STEPS * cal["variants"]["full FT"]["tau"]
    v = cal["variants"][name]
    return max(1, round((seconds - v["fill"]) / v["tau"]))


def lr_for(backbone: str, target: str, method: str) -> float | None:
    return chosen_lr(backbone, target, method)


def plan(backbones, targets, sizes, seeds) -> tuple[list, list]:
    """(lr-grid runs still needed, budget runs) for the given grid."""
    grid, runs = [], []
    for b in backbones:
        for t in targets:
            methods = {v.method for v in variants(b)}
            missing = [m for m in sorted(methods) if lr_for(b, t, m) is None]
            grid += [r for m in missing for r in lr_runs(b, t, m)]
            if missing:
                continue
            for n in sizes:
                cal = calibrate(b, t, n)
                selected = cal["selected"]["block"]
                for v in variants(b):
                    if v.block == "selected" and selected == BACKBONES[b]["middle"]:
                        continue  # the same runs as the middle block's
                    block = v.block_index(b, selected)
                    for budget in BUDGETS:
                        steps = steps_for(cal, v.name, budget)
                        runs += [
                            run_for(b, t, v.method, n, s, lr_for(b, t, v.method), block=block,
                                    bn=v.bn, steps=steps, batch=BATCH, budget=budget)
                            for s in seeds
                        ]  # fmt: skip
    return grid, runs


def peak_memory(backbone: str, target: str, variant: str) -> dict:
    """Peak resident memory of training ``variant`` (``TIMED_STEPS`` steps, 10 per class), in
    a fresh process, above what it held before training."""
    code = (
        "import sys; sys.path.insert(0, 'benchmarks'); import budget; "
        f"budget._memory_child({backbone!r}, {target!r}, {variant!r})"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True,
        cwd=RESULTS.parents[1],
    )  # fmt: skip
    return json.loads(done.stdout.strip().splitlines()[-1])


def _memory_child(backbone: str, target: str, name: str) -> None:
    data = load_data(backbone, target)
    fetch = data["train"].__getitems__
    rows = subset(data, 10, 0)
    v = next(v for v in variants(backbone) if v.name == name)
    tuned = wrapped(backbone, data, v, BACKBONES[backbone]["middle"])
    cache = None if prefix_blocker(tuned) else PrefixCache(tuned, fetch)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    train_steps(tuned, fetch, rows, steps=TIMED_STEPS, batch_size=BATCH, lr=0.01, prefix=cache)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps({"peak_mib": peak / 1024, "training_mib": (peak - before) / 1024}))


# -- report -------------------------------------------------------------------------------------
def load_budget_records() -> list[dict]:
    """The budget runs' records (``Run.file``: ``OUT/runs/<backbone>/<target>.jsonl``)."""
    recs = []
    for path in sorted((OUT / "runs").rglob("*.jsonl")):
        recs += [rec for rec in read_records(path) if rec["run"].get("budget") is not None]
    return recs


def variant_of(rec: dict, cal: dict) -> list[str]:
    """The variant names a record serves (SCL mid also serves SCL selected when they agree)."""
    run = rec["run"]
    b = run["backbone"]
    names = []
    for v in variants(b):
        block = v.block_index(b, cal["selected"]["block"])
        if (v.method, block, v.bn) == (run["method"], run["block"], run["bn"]):
            names.append(v.name)
    return names


def report(out=None) -> dict:
    """Tables, verdicts and plots from the budget records into ``out`` (default ``OUT``; the
    calibrations are always read from ``OUT``)."""
    out = OUT if out is None else out
    recs = load_budget_records()
    summary, lines = {}, ["# Accuracy at equal wall-clock (issue 17)", ""]
    lines += [
        "`python benchmarks/budget.py measure` then `python benchmarks/budget.py report`. "
        "Budgets are multiples of the time full FT takes for 150 steps, measured per backbone, "
        "target and size in one process (`results/budget/calibration.jsonl`); each cell is the "
        "mean ± sd test accuracy (%) over seeds, then the mean measured training seconds and the "
        "optimizer steps the budget gave. The "
        "prefix cache is used wherever legal; its fill time is inside the run's seconds.",
        "",
    ]
    groups: dict[tuple, dict] = {}
    cals: dict[tuple, dict] = {}
    for rec in recs:
        run = rec["run"]
        cal = saved_calibration(run["backbone"], run["target"], run["per_class"])
        key = (run["backbone"], run["target"], run["per_class"])
        cals[key] = cal
        for name in variant_of(rec, cal):
            groups.setdefault(key, {}).setdefault(name, {}).setdefault(run["budget"], []).append(
                rec
            )
    for (b, t, n), table in sorted(groups.items()):
        lines += [f"## {b} on {t}, {n} per class", ""]
        lines += ["| method | " + " | ".join(f"{x:g}x" for x in BUDGETS) + " |"]
        lines += ["|---|" + "---:|" * len(BUDGETS)]
        block = {}
        for name in [v.name for v in variants(b) if v.name in table]:
            cells, block[name] = [], {}
            for x in BUDGETS:
                done = table[name].get(x, [])
                rs = [r for r in done if r["metrics"].get("test_accuracy") is not None]
                bad = sum(map(diverged, done))
                if not rs:
                    if bad:  # a result too: say so rather than leave the cell empty
                        block[name][str(x)] = {"n": 0, "diverged": bad}
                    cells.append(f"diverged ({bad} of {bad})" if bad else "–")
                    continue
                m, sd = mean_sd([100 * r["metrics"]["test_accuracy"] for r in rs])
                secs = float(np.mean([r["train_seconds"] for r in rs]))
                steps = rs[0]["run"]["steps"]
                budget_s = x * STEPS * cals[(b, t, n)]["variants"]["full FT"]["tau"]
                block[name][str(x)] = {"mean": m, "sd": sd, "n": len(rs), "seconds": secs,
                                       "budget_seconds": budget_s, "steps": steps}  # fmt: skip
                note = ""
                if bad:
                    block[name][str(x)]["diverged"] = bad
                    note = f", {bad} of {len(done)} diverged"
                cells.append(f"{m:.1f} ± {sd:.1f} ({secs:.0f}s, {steps} steps{note})")
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
        summary[f"{b}/{t}/{n}"] = block
        lines += ["", verdict(block), ""]
        plot(b, t, n, block, out)
    lines += memory_table()
    write_json(out / "budget.json", summary)
    write_text(out / "budget.md", "\n".join(lines) + "\n")
    return summary


def memory_table() -> list[str]:
    """Markdown lines of ``memory.json`` (``budget.py memory``): peak resident memory per variant."""
    path = OUT / "memory.json"
    if not path.is_file():
        return []
    lines = [
        "## Peak memory",
        "",
        f"Each variant trains {TIMED_STEPS} steps (batch {BATCH}, 10 per class, fmnist59) in a "
        "fresh process (`python benchmarks/budget.py memory`): its peak resident memory, and "
        "the part of it reached while training (above what the process held after loading "
        "the data and the model; a prefix cache fills while training, so it is in this part). "
        "SCL FT selected is measured at the middle block.",
        "",
        "| backbone | method | peak (MiB) | in training (MiB) |",
        "|---|---|---:|---:|",
    ]
    for key, m in table_rows(json.loads(path.read_text())):
        b, name = key.split("/", 1)
        lines.append(f"| {b} | {name} | {m['peak_mib']:.0f} | {m['training_mib']:.0f} |")
    return lines + [""]


def table_rows(table: dict) -> list[tuple[str, dict]]:
    """memory.json's rows in the order of :func:`variants` per backbone."""
    order = {f"{b}/{v.name}": (i, j) for i, b in enumerate(BACKBONES) for j, v in
             enumerate(variants(b))}  # fmt: skip
    return sorted(table.items(), key=lambda kv: order.get(kv[0], (len(order), 0)))


def verdict(block: dict) -> str:
    """Where a one-block method is ahead of full FT by more than one sd (the larger of the two),
    per budget; cells with fewer than 2 seeds, or with a diverged run, give no verdict."""
    full = block.get("full FT", {})
    ahead = []
    for x, f in full.items():
        for name, cells in block.items():
            if name in ("full FT",) or name.startswith("linear"):
                continue
            c = cells.get(x)
            if not c or min(c["n"], f["n"]) < 2:  # an sd needs at least 2 seeds
                continue
            if c.get("diverged"):  # the mean of the runs that survived would flatter it
                continue
            if c["mean"] - f["mean"] > max(c["sd"], f["sd"]):
                ahead.append(f"{name} at {float(x):g}x ({c['mean']:.1f} vs {f['mean']:.1f})")
    if not ahead:
        return "No one-block method is ahead of full FT by more than one sd at any budget."
    return "Ahead of full FT by more than one sd: " + "; ".join(ahead) + "."


def plot(b: str, t: str, n: int, block: dict, out) -> None:
    fig, ax = new_figure(figsize=(7, 4.5))
    for name, cells in block.items():
        cells = {x: c for x, c in cells.items() if c["n"]}  # a cell of diverged runs has no point
        xs = [c["budget_seconds"] for c in cells.values()]
        ys = [c["mean"] for c in cells.values()]
        es = [c["sd"] for c in cells.values()]
        style = "--" if "frozen" in name else "-"
        ax.errorbar(xs, ys, yerr=es, marker="o", linestyle=style, capsize=2, label=name)
    ax.set_xscale("log")
    ax.set_xlabel("budget: seconds of training, calibrated on a quiet machine (log)")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title(f"{b} -> {t}, {n} per class: accuracy at equal wall-clock")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    save_figure(fig, out / f"budget_{b}_{t}_n{n}.png")


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("command", choices=["calibrate", "measure", "report", "memory"])
    ap.add_argument("--backbones", nargs="+", default=["resnet18"], choices=list(BACKBONES))
    ap.add_argument("--targets", nargs="+", default=MAIN_TARGETS)
    ap.add_argument("--sizes", nargs="+", type=int, default=SIZES)
    ap.add_argument("--seeds", nargs="+", type=int, default=SEEDS)
    ap.add_argument(
        "--pause",
        metavar="PATTERN",
        help="calibrate only: stop other processes whose command line matches this regular "
        "expression while calibrating, resume them after",
    )
    args = ap.parse_args(argv)
    if args.pause is not None and args.command != "calibrate":
        ap.error(f"--pause is for the calibrate command, not {args.command!r}")
    if args.command == "calibrate":  # existing calibrations are kept: delete a line to redo it
        with paused(args.pause):
            for b in args.backbones:
                for t in args.targets:
                    for n in args.sizes:
                        calibrate(b, t, n)
        return
    if args.command == "report":
        report()
        return
    if args.command == "memory":  # adds to (replaces the given backbones' rows of) memory.json
        path = OUT / "memory.json"
        table = json.loads(path.read_text()) if path.is_file() else {}
        for b in args.backbones:
            for v in variants(b):
                table[f"{b}/{v.name}"] = peak_memory(b, args.targets[0], v.name)
                print(v.name, table[f"{b}/{v.name}"], flush=True)
        write_json(path, table)
        return
    grid, runs = plan(args.backbones, args.targets, args.sizes, args.seeds)
    if grid:
        print(f"learning-rate grid first: {len(grid)} runs", flush=True)
        run_all(grid)
        grid, runs = plan(args.backbones, args.targets, args.sizes, args.seeds)
    # cheapest budget first, so every budget has some seeds early
    run_all(sorted(runs, key=lambda r: (r.budget, r.seed, r.per_class)))


if __name__ == "__main__":
    main()
