"""Issue 13: does block selection hold on targets it was never designed on?

    python benchmarks/selection_loto.py measure [--pairs ...]   # resumable; hours on 2 cores
    python benchmarks/selection_loto.py report                  # tables + plot from the records

Development pairs (backbone, target), all built offline from real data here (PAIRS): the bundled
resnet18 (source: Fashion-MNIST 0-4) on Fashion-MNIST 5-9, digits, inverted Fashion-MNIST 5-9
and digits rotated by 90 degrees; a second resnet18 pretrained here on Fashion-MNIST 5-9 on
classes 0-4 and on digits; the bundled ViT-Tiny on digits and Fashion-MNIST 5-9.

For each pair, size in SIZES (per class) and seed in SEEDS, on the class-balanced training
subset (``common.subset``):

1. **Hindsight grid**: SCL FT at every default candidate block
   (``ncfinetune.selection.default_candidates``: at most 10% of the parameters trainable, at
   most 3 blocks evenly spaced) and full FT, each at every lr of ``LR_GRID``: 150 SGD steps of
   batch 32, fp32, test accuracy on the test split (digits: all 360; Fashion-MNIST: a fixed
   class-balanced 2,000 of 5,000, to fit the grid in a session).
2. **Signals**: one ``select_block(..., probe_all=True)`` per probe length in PROBE_STEPS: the
   pretrained curve (NC1 per block), the per-block linear probe, and a short probe fine-tune
   for every (candidate, lr) on 70% of the subset, scored on the other 30%. Timed.

``report`` applies every rule (``ncfinetune.selection.choose`` / ``choose_lr``: the library's
one code path) to the recorded signals. A rule's design choices (probe length; lr procedure:
the rule's own sweep or one fixed lr) are chosen on the other pairs and scored on the held-out
pair (leave one target out); so is the choice of the default rule itself. Regret = test accuracy
of the best candidate block in hindsight at the lr the rule chose, minus the chosen block's
(same subset, seed, lr). Baselines in the same table: the fixed middle block, the per-block
linear probe, the curve and probe rules, and full FT with the same lr procedure.
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import asdict
from itertools import product
from pathlib import Path

import numpy as np
import torch
from common import (
    BACKBONES,
    RESULTS,
    SEEDS,
    TABLE_SIZES,
    load_data,
    read_record,
    run_all,
    run_for,
    saved,
    subset,
    upsert_record,
    versions,
)

import ncfinetune
from ncfinetune.backbones.hub import create_backbone
from ncfinetune.selection import CandidateRow, choose, choose_lr, default_candidates

PAIRS = [
    ("resnet18", "fmnist59"),
    ("resnet18", "digits"),
    ("resnet18", "fmnist59_inv"),
    ("resnet18", "digits_rot90"),
    ("resnet18_src59", "fmnist04"),
    ("resnet18_src59", "digits"),
    ("vit_tiny", "digits"),
    ("vit_tiny", "fmnist59"),
]
SIZES = TABLE_SIZES  # 10, 20, 100 per class
LR_GRID = (0.1, 0.03)  # = ncfinetune.selection.LR_GRID (the signal records also probed 0.01)
PROBE_STEPS = (10,)  # 3 lrs x 10 steps = 20% of a 150-step fine-tune
PRECISION = "no"  # measured: bf16 autocast was no faster at 32 px, batch 32 on this CPU
TEST_MAX = 2000  # a fixed class-balanced sample of the 5,000-image Fashion-MNIST test splits
# one JSON Lines file per pair: the signals per (size, seed, probe length), "n10-s0-p10"; full
# FT's probed lr, "full-n10-s0-p10"; selection against fine-tune time per size, "cost-n10-p10".
# The grid's runs are common.Run records in selection_loto/runs/<backbone>/<target>.jsonl.
SIGNALS = RESULTS / "selection_loto" / "signals"


def pair_name(b: str, t: str) -> str:
    return f"{b}/{t}"


def candidates(b: str, num_classes: int) -> list[int]:
    return default_candidates(create_backbone(BACKBONES[b]["model"], num_classes), "scl")


def grid_runs(b: str, t: str) -> list:
    data = load_data(b, t)
    cands = candidates(b, data["num_classes"])
    runs = []
    kw = {"precision": PRECISION, "test_max": TEST_MAX}
    for n, s in product(SIZES, SEEDS):
        for lr in LR_GRID:
            runs += [run_for(b, t, "scl", n, s, lr, block=k, **kw) for k in cands]
        # full FT at the lr its own probes chose (select_lr: the same procedure as lr="auto")
        runs.append(
            run_for(b, t, "full", n, s, full_lr_record(b, t, n, s, PROBE_STEPS[0])["lr"], **kw)
        )
    return runs


def _subset_data(b: str, t: str, n: int, s: int):
    """(training subset as a TensorCache, the backbone with a fresh head) for one subset."""
    data = load_data(b, t)
    idx = subset(data, n, s)
    train = data["train"]
    cache = ncfinetune.data.TensorCache(train.images[idx], train.labels[idx], train.transform)
    torch.manual_seed(s)
    return cache, create_backbone(BACKBONES[b]["model"], data["num_classes"])


def _head(b: str, t: str, n: int, s: int, steps: int) -> dict:
    """What names a selection record: pair, size, seed and probe length."""
    return {"backbone": b, "target": t, "per_class": n, "seed": s, "probe_steps": steps}


def signals_file(b: str, t: str) -> Path:
    return SIGNALS / b / f"{t}.jsonl"


def _load(b: str, t: str, key: str) -> dict | None:
    """The pair's selection record named ``key``, or None."""
    return read_record(signals_file(b, t), key)


def _save(b: str, t: str, key: str, rec: dict) -> dict:
    rec = {"key": key, **rec}
    upsert_record(signals_file(b, t), rec)
    return rec


def signal_record(b: str, t: str, n: int, s: int, steps: int) -> dict:
    """select_block's measurements on one training subset (every probe), cached on disk."""
    key = f"n{n}-s{s}-p{steps}"
    if (rec := _load(b, t, key)) is not None:
        return rec
    cache, model = _subset_data(b, t, n, s)
    t0 = time.perf_counter()
    sel = ncfinetune.select_block(
        model,
        cache,
        rule="linear",
        method="scl",
        lr="auto",
        lr_grid=LR_GRID,
        probe_steps=steps,
        precision=PRECISION,
        seed=s,
        probe_all=True,
    )
    probe_s = sum(p["seconds"] for r in sel.rows for p in r.probes.values())
    rec = {
        **_head(b, t, n, s, steps),
        "num_blocks": sel.num_blocks,
        "rows": [asdict(r) for r in sel.rows],
        "seconds": time.perf_counter() - t0,
        # the inference pass + linear probes, which every rule runs (the rest is probes)
        "base_seconds": sel.seconds - probe_s,
        "num_train": len(cache),
        "versions": versions(),
    }
    return _save(b, t, key, rec)


def full_lr_record(b: str, t: str, n: int, s: int, steps: int) -> dict:
    """Full FT's lr by the same procedure (``ncfinetune.selection.select_lr``), cached on disk."""
    key = f"full-n{n}-s{s}-p{steps}"
    if (rec := _load(b, t, key)) is not None:
        return rec
    cache, model = _subset_data(b, t, n, s)
    sel = ncfinetune.selection.select_lr(
        model, cache, method="full", lr_grid=LR_GRID, probe_steps=steps, precision=PRECISION, seed=s
    )
    rec = {**_head(b, t, n, s, steps), **asdict(sel), "versions": versions()}
    return _save(b, t, key, rec)


def cost_record(b: str, t: str, n: int, steps: int, warm: list) -> dict:
    """Selection and fine-tune timed back to back in one process (seed 0, one size): the
    inference pass + linear probes, every (block, lr) probe, and the 150-step SCL fine-tune at
    the middle block. The signal records' own times were taken with 2-3 benchmark processes
    sharing the CPU and are not comparable with the grid's."""
    key = f"cost-n{n}-p{steps}"
    if (rec := _load(b, t, key)) is not None:
        return rec
    cache, model = _subset_data(b, t, n, 0)
    kw = dict(method="scl", lr_grid=LR_GRID, probe_steps=steps, precision=PRECISION, seed=0)
    if not warm:  # imports and first-call set-up are not part of a selection's cost
        ncfinetune.select_block(model, cache, rule="linear", lr=0.1, **kw)
        warm.append(True)
    sel = ncfinetune.select_block(model, cache, rule="linear", lr="auto", probe_all=True, **kw)
    probes = {str(r.index): {k: p["seconds"] for k, p in r.probes.items()} for r in sel.rows}
    probe_s = sum(v for d in probes.values() for v in d.values())
    middle = BACKBONES[b]["middle"]
    run = run_for(
        b, t, "scl", n, 0, LR_GRID[0], block=middle, precision=PRECISION, test_max=TEST_MAX
    )
    from common import execute

    rec = {
        "backbone": b,
        "target": t,
        "per_class": n,
        "probe_steps": steps,
        "base_seconds": sel.seconds - probe_s,
        "probe_seconds": probes,
        "finetune_train_seconds": execute(run)["train_seconds"],
        "finetune": run.key,
        "versions": versions(),
    }
    return _save(b, t, key, rec)


def measure(pairs: list[tuple[str, str]], what: str) -> None:
    for b, _ in pairs:
        model = BACKBONES[b]["model"]
        if "/" in model and not (Path(model) / "backbone.json").is_file():
            raise SystemExit(
                f"backbone {b} is not built yet: run `accelerate launch recipes/pretrain.py "
                "--config recipes/configs/pretrain/resnet18_fmnist59.yaml` (about 5 minutes)"
            )
    for b, t in pairs:
        if what in ("signals", "all"):
            for n, s, steps in product(SIZES, SEEDS, PROBE_STEPS):
                rec = signal_record(b, t, n, s, steps)
                print(
                    f"{b}/{t} n={n} s={s} p={steps}: signals in {rec['seconds']:.1f}s", flush=True
                )
        if what in ("full_lr", "all"):
            for n, s, steps in product(SIZES, SEEDS, PROBE_STEPS):
                rec = full_lr_record(b, t, n, s, steps)
                print(
                    f"{b}/{t} n={n} s={s} p={steps}: full FT lr {rec['lr']:g} in "
                    f"{rec['seconds']:.1f}s",
                    flush=True,
                )
        if what in ("grid", "all"):
            run_all(grid_runs(b, t))
    warm: list = []
    for b, t in pairs:  # after every grid, so that no other benchmark shares the CPU
        if what in ("cost", "all"):
            for n in SIZES:
                rec = cost_record(b, t, n, PROBE_STEPS[0], warm)
                print(
                    f"{b}/{t} n={n}: base {rec['base_seconds']:.2f}s, fine-tune "
                    f"{rec['finetune_train_seconds']:.1f}s",
                    flush=True,
                )


# -- report: rules applied to the records, leave one target out ------------------------------------
RULE_NAMES = ["middle", "curve", "linear", "probe", "probe_accuracy"]
LR_PROCEDURES = ["auto", *LR_GRID]  # auto: the rule's own probes (select_block(lr="auto"))


def load_subsets(pairs, steps: int = PROBE_STEPS[0]) -> list[dict]:
    """Every (pair, size, seed) with its signals and its hindsight grid; None where missing."""
    out = []
    for b, t in pairs:  # from the records alone: no data or backbone needed
        for n, s in product(SIZES, SEEDS):
            sig = _load(b, t, f"n{n}-s{s}-p{steps}")
            full_sig = _load(b, t, f"full-n{n}-s{s}-p{steps}")
            if sig is None or full_sig is None:
                continue
            cands = [r["index"] for r in sig["rows"]]
            kw = {"precision": PRECISION, "test_max": TEST_MAX}
            scl = {
                (k, lr): run_for(b, t, "scl", n, s, lr, block=k, **kw)
                for k in cands
                for lr in LR_GRID
            }
            full = {full_sig["lr"]: run_for(b, t, "full", n, s, full_sig["lr"], **kw)}
            recs = {key: saved(r) for key, r in scl.items()}
            full_recs = {lr: saved(r) for lr, r in full.items()}
            if None in recs.values() or None in full_recs.values():
                continue
            out.append(
                {
                    "pair": pair_name(b, t),
                    "per_class": n,
                    "seed": s,
                    "signals": sig,
                    "full_lr": full_sig,
                    "acc": {key: _acc(rec) for key, rec in recs.items()},
                    "train_s": {key: rec["train_seconds"] for key, rec in recs.items()},
                    "full_acc": {lr: _acc(rec) for lr, rec in full_recs.items()},
                    "cost": _load(b, t, f"cost-n{n}-p{steps}"),
                }
            )
    return out


def _acc(rec: dict) -> float:
    a = rec["metrics"]["test_accuracy"]
    return 0.0 if a is None else a  # a diverged run predicts nothing


def apply_rule(sub: dict, rule: str, lr_proc) -> dict:
    """One rule (with one lr procedure) on one subset, through the library's ``choose``."""
    sig = sub["signals"]
    rows = [CandidateRow(**r) for r in sig["rows"]]
    for r in rows:  # the lrs of the grid only
        r.probes = {k: v for k, v in r.probes.items() if float(k) in LR_GRID}
    if lr_proc != "auto":  # a fixed lr: the probe rules see only their probes at it
        for r in rows:
            r.probes = {k: v for k, v in r.probes.items() if float(k) == lr_proc}
    block, lr, _ = choose(rule, rows, sig["num_blocks"], sig["probe_steps"])
    used = []  # the probes this rule ran: (block, lr text)
    if rule in ("probe", "probe_accuracy"):
        used = [(r.index, k) for r in rows for k in r.probes]
    if lr is None:
        if lr_proc == "auto":
            row = next(r for r in rows if r.index == block)
            lr, _ = choose_lr(row)
            used = [(block, k) for k in row.probes]
        else:
            lr = lr_proc
    accs = {k: a for (k, l_), a in sub["acc"].items() if l_ == lr}
    best = max(accs.values())
    grid_best = max(sub["acc"].values())
    c = sub.get("cost")
    if c is not None:  # timed back to back with a fine-tune (cost_record)
        cost_s = c["base_seconds"] + sum(c["probe_seconds"][str(k)][lr_] for k, lr_ in used)
        cost = cost_s / c["finetune_train_seconds"]
    else:  # the signal record's own times (CPU shared by the benchmark processes)
        probe_of = {
            (r["index"], k): p["seconds"] for r in sig["rows"] for k, p in r["probes"].items()
        }
        cost_s = sig["base_seconds"] + sum(probe_of[u] for u in used)
        cost = cost_s / sub["train_s"][(block, lr)]
    return {
        "block": block,
        "lr": lr,
        "accuracy": accs[block],
        "regret": 100 * (best - accs[block]),  # best block at the same lr
        "regret_grid": 100 * (grid_best - accs[block]),  # best (block, lr) of the grid
        "cost": cost,
        "seconds": cost_s,
    }


def full_result(sub: dict) -> float:
    """Full FT at the lr its probes chose (the only full-FT run of the grid)."""
    return sub["full_acc"][sub["full_lr"]["lr"]]


def mean_acc(subs, rule, lr_proc) -> float:
    return float(np.mean([apply_rule(x, rule, lr_proc)["accuracy"] for x in subs]))


def by_goals(subs: list[dict], design: dict) -> str:
    """The rule the issue's goals prefer on ``subs``: among the rules that are on no pair more
    than 0.5 point below the fixed middle block on average, the lowest mean per-pair regret
    (ties: the earlier rule of RULE_NAMES). The middle block itself always qualifies."""
    pairs = sorted({x["pair"] for x in subs})
    stats = {}
    for r in RULE_NAMES:
        per = {p: [apply_rule(x, r, design[r]) for x in subs if x["pair"] == p] for p in pairs}
        stats[r] = (
            {p: np.mean([y["accuracy"] for y in v]) for p, v in per.items()},
            float(np.mean([np.mean([y["regret"] for y in v]) for v in per.values()])),
        )
    mid = stats["middle"][0]
    ok = [r for r in RULE_NAMES if all(stats[r][0][p] - mid[p] >= -0.005 for p in pairs)]
    return min(ok, key=lambda r: stats[r][1])


def loto(subs: list[dict]) -> dict:
    """Per held-out pair: each rule's lr procedure chosen on the other pairs (highest mean test
    accuracy there), and the default rule chosen on them two ways: the highest mean accuracy,
    and the issue's goals (:func:`by_goals`)."""
    pairs = sorted({x["pair"] for x in subs})
    out = {}
    for p in pairs:
        train = [x for x in subs if x["pair"] != p]
        test = [x for x in subs if x["pair"] == p]
        design = {r: max(LR_PROCEDURES, key=lambda lp: mean_acc(train, r, lp)) for r in RULE_NAMES}
        by_acc = max(RULE_NAMES, key=lambda r: mean_acc(train, r, design[r]))
        default = by_goals(train, design)
        res = {r: [apply_rule(x, r, design[r]) for x in test] for r in RULE_NAMES}
        res["default (LOTO, by accuracy)"] = res[by_acc]
        res["default (LOTO, by the goals)"] = res[default]
        out[p] = {
            "design": design,
            "default": default,
            "default_by_accuracy": by_acc,
            "results": res,
            "full": [full_result(x) for x in test],
            "full_procedure": "auto",
            "subsets": [(x["per_class"], x["seed"]) for x in test],
        }
    return out


def report(pairs) -> dict:
    subs = load_subsets(pairs)
    if len({x["pair"] for x in subs}) < 2:
        raise SystemExit(
            "leave one target out needs complete records of 2 pairs or more: run "
            "`selection_loto.py measure` first"
        )
    res = loto(subs)
    rules = [*RULE_NAMES, "default (LOTO, by accuracy)", "default (LOTO, by the goals)"]
    table = {}
    for p, v in res.items():
        mid = np.mean([r["accuracy"] for r in v["results"]["middle"]])
        for r in rules:
            rr = v["results"][r]
            table[(p, r)] = {
                "chose": picked(v, r),
                "procedure": v["design"][picked(v, r)],
                "accuracy": 100 * float(np.mean([x["accuracy"] for x in rr])),
                "mean_regret": float(np.mean([x["regret"] for x in rr])),
                "max_regret": float(np.max([x["regret"] for x in rr])),
                "mean_regret_grid": float(np.mean([x["regret_grid"] for x in rr])),
                "vs_middle": 100 * (float(np.mean([x["accuracy"] for x in rr])) - mid),
                "cost": float(np.mean([x["cost"] for x in rr])),
                "max_cost": float(np.max([x["cost"] for x in rr])),
                "blocks": [x["block"] for x in rr],
                "lrs": [x["lr"] for x in rr],
            }
    overall = {}
    for r in rules:
        rows = [table[(p, r)] for p in res]
        overall[r] = {
            "mean_regret": float(np.mean([x["mean_regret"] for x in rows])),
            "worst_pair_regret": float(np.max([x["mean_regret"] for x in rows])),
            "mean_regret_grid": float(np.mean([x["mean_regret_grid"] for x in rows])),
            "mean_vs_middle": float(np.mean([x["vs_middle"] for x in rows])),
            "worst_pair_vs_middle": float(np.min([x["vs_middle"] for x in rows])),
            "pairs_within_half_point_of_middle": int(sum(x["vs_middle"] >= -0.5 for x in rows)),
            "mean_cost": float(np.mean([x["cost"] for x in rows])),
            "max_cost": float(np.max([x["max_cost"] for x in rows])),
            "accuracy": float(np.mean([x["accuracy"] for x in rows])),
        }
    full_vs = {
        p: {
            "full_ft": 100 * float(np.mean(v["full"])),
            "procedure": v["full_procedure"],
            "default_scl": table[(p, "default (LOTO, by the goals)")]["accuracy"],
        }
        for p, v in res.items()
    }
    out = {
        "pairs": list(res),
        "subsets": len(subs),
        "table": {f"{p}|{r}": v for (p, r), v in table.items()},
        "overall": overall,
        "full_ft": full_vs,
        "loto_defaults": {p: v["default"] for p, v in res.items()},
        "loto_defaults_by_accuracy": {p: v["default_by_accuracy"] for p, v in res.items()},
        "loto_designs": {p: v["design"] for p, v in res.items()},
        "default_on_all_pairs": _design_on(subs),
    }
    (RESULTS / "selection_loto.json").write_text(json.dumps(out, indent=1) + "\n")
    md = _markdown(out, table, res)
    (RESULTS / "selection_loto.md").write_text(md)
    _plot(table, list(res), rules)
    print(md)
    return out


def _design_on(subs) -> dict:
    """The rule and lr procedure the same procedure picks with every pair available (what the
    library ships), with each rule's mean accuracy on all pairs."""
    design = {r: max(LR_PROCEDURES, key=lambda lp: mean_acc(subs, r, lp)) for r in RULE_NAMES}
    accs = {r: 100 * mean_acc(subs, r, design[r]) for r in RULE_NAMES}
    return {
        "design": design,
        "accuracy": accs,
        "default_by_accuracy": max(accs, key=accs.get),
        "default": by_goals(subs, design),
    }


def picked(v: dict, r: str) -> str:
    """The rule behind a row of the LOTO table (a default row names the rule it chose)."""
    if r == "default (LOTO, by accuracy)":
        return v["default_by_accuracy"]
    return v["default"] if r == "default (LOTO, by the goals)" else r


def _markdown(out, table, res) -> str:
    ov = out["overall"]
    lines = [
        "# Block selection, leave one target out",
        "",
        f"`python benchmarks/selection_loto.py measure && python benchmarks/selection_loto.py "
        f"report`. {len(out['pairs'])} (backbone, target) pairs, sizes {SIZES} per class, seeds "
        f"{SEEDS} ({out['subsets']} subsets). SCL FT, 150 SGD steps of batch 32; candidates: "
        "`default_candidates` (<= 10% trainable, 3 blocks evenly spaced); probes: "
        f"{PROBE_STEPS[0]} steps on 70% of the subset, scored on the other 30%. lr procedure: "
        "`auto` = the rule's own probes (`select_block(lr='auto')`), or one fixed lr; each "
        "rule's procedure is chosen on the other pairs (highest mean test accuracy) and scored "
        "on the held-out pair; so is the default rule, two ways: by mean accuracy, and by the "
        "issue's goals (among the rules never more than 0.5 point below the middle block on a "
        "pair, the lowest mean regret). Regret: best candidate block in "
        "hindsight at the chosen lr minus the chosen block (accuracy points); regret vs grid: "
        "against the best (block, lr) of the grid. vs middle: accuracy minus the fixed middle "
        "block's (with its own held-out lr procedure). Cost: selection wall time / the 150-step "
        "fine-tune's train time at the chosen block and lr.",
        "",
        "## Over all pairs (each pair's numbers from rules designed without it)",
        "",
        "| rule | mean regret | worst-pair regret | regret vs grid | mean vs middle | worst pair vs "
        "middle | pairs >= middle - 0.5 | accuracy | cost (mean) | cost (max) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r, v in ov.items():
        lines.append(
            f"| {r} | {v['mean_regret']:.2f} | {v['worst_pair_regret']:.2f} | "
            f"{v['mean_regret_grid']:.2f} | {v['mean_vs_middle']:+.2f} | "
            f"{v['worst_pair_vs_middle']:+.2f} | {v['pairs_within_half_point_of_middle']}/"
            f"{len(out['pairs'])} | {v['accuracy']:.2f} | {100 * v['mean_cost']:.0f}% | "
            f"{100 * v['max_cost']:.0f}% |"
        )
    lines += [
        "",
        "## Per pair",
        "",
        "| pair | rule | lr procedure (LOTO) | accuracy | mean regret | max regret | regret vs "
        "grid | vs middle | cost | blocks chosen |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|---|",
    ]
    for (p, r), v in table.items():
        name = r if r in RULE_NAMES else f"{r[:-1]}: {v['chose']})"
        blocks = " ".join(str(b) for b in v["blocks"])
        lines.append(
            f"| {p} | {name} | {v['procedure']} | {v['accuracy']:.2f} | {v['mean_regret']:.2f} | "
            f"{v['max_regret']:.2f} | {v['mean_regret_grid']:.2f} | {v['vs_middle']:+.2f} | "
            f"{100 * v['cost']:.0f}% | {blocks} |"
        )
    lines += [
        "",
        "## Full FT with the same lr procedure (chosen LOTO) against the default",
        "",
        "| pair | full FT lr procedure | full FT accuracy | default SCL accuracy |",
        "|---|---|---:|---:|",
    ]
    for p, v in out["full_ft"].items():
        lines.append(f"| {p} | {v['procedure']} | {v['full_ft']:.2f} | {v['default_scl']:.2f} |")
    d = out["default_on_all_pairs"]
    lines += [
        "",
        "## With every pair available (what the library ships)",
        "",
        "| rule | lr procedure | mean accuracy (all pairs, in-sample) |",
        "|---|---|---:|",
    ]
    for r in RULE_NAMES:
        lines.append(f"| {r} | {d['design'][r]} | {d['accuracy'][r]:.2f} |")
    lines += [
        "",
        f"Default by the issue's goals (shipped): **{d['default']}** with lr procedure "
        f"{d['design'][d['default']]}; by accuracy alone: {d['default_by_accuracy']} with "
        f"{d['design'][d['default_by_accuracy']]}.",
        f"Chosen leave-one-out per held-out pair, by the goals: {out['loto_defaults']}; by "
        f"accuracy: {out['loto_defaults_by_accuracy']}.",
    ]
    return "\n".join(lines) + "\n"


def _plot(table, pairs, rules) -> None:
    from ncfinetune.plotting import new_figure, save_figure

    fig, axes = new_figure(1, 2, figsize=(14, 4.5))
    w = 0.8 / len(rules)
    for i, r in enumerate(rules):
        xs = np.arange(len(pairs)) + i * w
        axes[0].bar(xs, [table[(p, r)]["mean_regret"] for p in pairs], w, label=r)
        axes[1].bar(xs, [table[(p, r)]["vs_middle"] for p in pairs], w, label=r)
    for ax, title in zip(
        axes, ["mean regret (points, LOTO)", "accuracy vs fixed middle block (points)"], strict=True
    ):
        ax.set_xticks(
            np.arange(len(pairs)) + 0.4 - w / 2, pairs, rotation=30, ha="right", fontsize=7
        )
        ax.set_title(title)
        ax.axhline(0, color="k", lw=0.5)
    axes[1].axhline(-0.5, color="r", ls="--", lw=0.8)
    axes[0].legend(fontsize=7)
    save_figure(fig, RESULTS / "selection_loto.png", dpi=110)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("command", choices=["measure", "report"])
    ap.add_argument("--what", choices=["grid", "signals", "full_lr", "cost", "all"], default="all")
    ap.add_argument(
        "--pairs",
        nargs="+",
        default=[pair_name(*p) for p in PAIRS],
        help="backbone/target pairs (default: all of PAIRS)",
    )
    args = ap.parse_args(argv)
    pairs = [tuple(p.split("/")) for p in args.pairs]
    if args.command == "measure":
        measure(pairs, args.what)
    else:
        report(pairs)


if __name__ == "__main__":
    main()
