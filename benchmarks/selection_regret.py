"""Issue 6's measurement: how good are select_block's choices, and what do they cost?

    python benchmarks/selection_regret.py [--backbones ...] [--targets ...]

For each backbone, target and size of ``TABLE_SIZES`` (per class) and seed of ``SEEDS``: run each
rule of ``ncfinetune.select_block`` (SCL, candidates = the method x block table's blocks, so the
hindsight comparison covers the same set) on the training subset only; read the test accuracy of
SCL FT at the chosen block from the ``method_block.py`` records (run that first); the best block
in hindsight is the one with the highest test accuracy for that seed. Regret = best - chosen
(accuracy points). Cost = selection wall time / the train time of one full-FT run on the same
subset (same budget as every run here), and images processed by the selection / images
processed by that run. Each selection is a record under ``results/selection/`` (resumable);
the report over all records is ``results/selection_regret.{json,md}``.
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import asdict

import numpy as np
import torch
from common import (
    BACKBONES,
    BATCH,
    RESULTS,
    SEEDS,
    STEPS,
    TABLE_SIZES,
    chosen_lr,
    ensure,
    load_data,
    parse_common,
    run_for,
    subset,
    versions,
)

import ncfinetune
from ncfinetune.hub import create_backbone

SELECTIONS = RESULTS / "selection"  # one record per selection: backbone/target/rule-n-s.json

# what is measured: a label (the record's "rule") -> select_block keyword arguments.
# - curve, probe, probe_accuracy: the rules at the library's defaults (15 probe steps).
# - -p10: 10-step probes (cheaper still).
# - -p50: 50-step probes, the first default (measured with the code of then: the probe's whole
#   fit part evaluated for its training NC1, probe_accuracy ties broken by the lower index).
# - -bnfrozen: 15-step probes with BatchNorm frozen in the probes only, which makes resnet18's
#   prefix cacheable (the final fine-tune keeps bn='update'); measured with the code of -p50.
VARIANTS: dict[str, dict] = {
    "curve": {"rule": "curve"},
    "probe": {"rule": "probe"},
    "probe_accuracy": {"rule": "probe_accuracy"},
    "probe-p10": {"rule": "probe", "probe_steps": 10},
    "probe_accuracy-p10": {"rule": "probe_accuracy", "probe_steps": 10},
    "probe-p50": {"rule": "probe", "probe_steps": 50},
    "probe_accuracy-p50": {"rule": "probe_accuracy", "probe_steps": 50},
    "probe-p15-bnfrozen": {"rule": "probe", "probe_steps": 15, "bn": "frozen"},
    "probe_accuracy-p15-bnfrozen": {"rule": "probe_accuracy", "probe_steps": 15, "bn": "frozen"},
}
NO_BN = {"vit_tiny"}  # no BatchNorm: the bnfrozen variants would be the plain ones; not run


def select_record(b: str, t: str, n: int, s: int, rule: str, lr: float, data: dict) -> dict:
    """One selection (``rule``: a label of ``VARIANTS``) on one training subset, cached under
    results/selection."""
    path = SELECTIONS / b / t / f"{rule}-n{n}-s{s}.json"
    if path.is_file():
        return json.loads(path.read_text())
    idx = subset(data, n, s)
    train = data["train"]
    cache = ncfinetune.data.TensorCache(train.images[idx], train.labels[idx], train.transform)
    torch.manual_seed(s)
    model = create_backbone(BACKBONES[b]["model"], data["num_classes"])
    t0 = time.perf_counter()
    rec = {"backbone": b, "target": t, "per_class": n, "seed": s, "rule": rule, "lr": lr}
    try:
        sel = ncfinetune.select_block(
            model,
            cache,
            method="scl",
            candidates=BACKBONES[b]["blocks"],
            lr=lr,
            seed=s,
            **VARIANTS[rule],
        )
        rec.update(
            chosen=sel.chosen,
            seconds=time.perf_counter() - t0,
            images=sel.images_processed,
            reason=sel.reason,
            candidates=[asdict(r) for r in sel.rows],
        )
    except ncfinetune.ConfigError as e:  # e.g. too few samples per class to hold out
        rec["error"] = str(e)
    rec["versions"] = versions()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(rec, indent=1) + "\n")
    tmp.replace(path)
    return rec


def variants_for(b: str) -> list[str]:
    return [v for v in VARIANTS if not (b in NO_BN and VARIANTS[v].get("bn"))]


def measure(backbones: list[str], targets: list[str]) -> None:
    """Run every missing selection (resumable; the fine-tuning runs come from method_block)."""
    for b in backbones:
        for t in targets:
            lr = chosen_lr(b, t, "scl")
            if lr is None:
                raise SystemExit(f"run benchmarks/lr_grid.py for {b}/{t} first")
            data = load_data(b, t)
            for n in TABLE_SIZES:
                for s in SEEDS:
                    for rule in variants_for(b):
                        r = select_record(b, t, n, s, rule, lr, data)
                        what = r.get("error") or f"block {r['chosen']} in {r['seconds']:.1f}s"
                        print(f"{b}/{t} n={n} s={s} {rule:>14}: {what}", flush=True)


def rows_of(rec: dict) -> dict | None:
    """Join one selection record with the method x block records: regret and cost."""
    if "error" in rec:
        return None
    b, t, n, s = rec["backbone"], rec["target"], rec["per_class"], rec["seed"]
    runs = {k: run_for(b, t, "scl", n, s, rec["lr"], block=k) for k in BACKBONES[b]["blocks"]}
    full = run_for(b, t, "full", n, s, chosen_lr(b, t, "full"))
    if not all(r.path.is_file() for r in [*runs.values(), full]):
        return None  # method_block.py has not run these yet
    acc = {k: ensure(r)["metrics"]["test_accuracy"] for k, r in runs.items()}
    full_rec = ensure(full)
    best = max(acc, key=acc.get)
    full_images = STEPS * min(BATCH, full_rec["num_train"])
    return {
        **{k: rec[k] for k in ("backbone", "target", "per_class", "seed", "rule", "chosen")},
        "best": best,
        "chosen_accuracy": acc[rec["chosen"]],
        "best_accuracy": acc[best],
        "regret_points": 100 * (acc[best] - acc[rec["chosen"]]),
        "seconds": rec["seconds"],
        "full_ft_train_seconds": full_rec["train_seconds"],
        "cost_fraction_time": rec["seconds"] / full_rec["train_seconds"],
        "images": rec["images"],
        "cost_fraction_images": rec["images"] / full_images,
    }


def report() -> dict:
    """Aggregate every selection record into results/selection_regret.{json,md}."""
    recs = [json.loads(p.read_text()) for p in sorted(SELECTIONS.glob("*/*/*.json"))]
    rows = [r for r in map(rows_of, recs) if r is not None]
    errors = [r for r in recs if "error" in r]
    groups = sorted({(r["backbone"], r["target"]) for r in rows})
    summary = {}
    for rule in VARIANTS:
        for g in [*groups, ("all", "all")]:
            ok = [
                r
                for r in rows
                if r["rule"] == rule and g in ((r["backbone"], r["target"]), ("all", "all"))
            ]
            if ok:
                summary[f"{rule}/{g[0]}/{g[1]}"] = {
                    "rule": rule,
                    "backbone": g[0],
                    "target": g[1],
                    "selections": len(ok),
                    "mean_regret_points": float(np.mean([r["regret_points"] for r in ok])),
                    "max_regret_points": float(np.max([r["regret_points"] for r in ok])),
                    "picked_best": sum(r["chosen"] == r["best"] for r in ok),
                    "mean_cost_fraction_time": float(
                        np.mean([r["cost_fraction_time"] for r in ok])
                    ),
                    "mean_cost_fraction_images": float(
                        np.mean([r["cost_fraction_images"] for r in ok])
                    ),
                    "errors": sum(
                        1
                        for r in errors
                        if r["rule"] == rule and g in ((r["backbone"], r["target"]), ("all", "all"))
                    ),
                }
    out = {"rows": rows, "summary": summary, "errors": errors}
    (RESULTS / "selection_regret.json").write_text(json.dumps(out, indent=1) + "\n")
    lines = [
        "# Block selection: regret and cost per rule",
        "",
        "`python benchmarks/selection_regret.py`; SCL FT, candidates = the method x block "
        f"table's blocks, sizes {TABLE_SIZES} per class, seeds {SEEDS}. Regret in accuracy "
        "points against the best candidate block in hindsight (same subset and seed); cost "
        f"relative to one full-FT run ({STEPS} steps of batch {BATCH}) on the same subset: wall "
        "time, and images processed (forward passes of one image; a training step counts its "
        "batch once).",
        "",
        "| rule | backbone | target | selections | picked best | mean regret (pts) | max regret "
        "| cost (time) | cost (images) | errors |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for v in summary.values():
        lines.append(
            f"| {v['rule']} | {v['backbone']} | {v['target']} | {v['selections']} | "
            f"{v['picked_best']} | {v['mean_regret_points']:.2f} | {v['max_regret_points']:.2f} | "
            f"{100 * v['mean_cost_fraction_time']:.0f}% | "
            f"{100 * v['mean_cost_fraction_images']:.0f}% | {v['errors']} |"
        )
    if errors:
        lines += ["", "Selections that raised (counted under errors):", ""]
        lines += sorted({f"- {e['rule']}, {e['per_class']}/class: {e['error']}" for e in errors})
    (RESULTS / "selection_regret.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return out


def main(argv=None) -> None:
    args = parse_common(argparse.ArgumentParser(description=__doc__)).parse_args(argv)
    measure(args.backbones, args.targets)
    report()


if __name__ == "__main__":
    main()
