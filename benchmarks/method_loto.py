"""Issue 27: which method for this data? ``select_method`` measured leave one target out.

    python benchmarks/method_loto.py measure grid [--pairs ...]     # the hindsight grid (resumable)
    python benchmarks/method_loto.py measure signals [--pairs ...]  # select_method's probes
    python benchmarks/method_loto.py report                         # tables + plot from the records

The development pairs, sizes (10, 20, 100 per class) and seeds (0, 1, 2) of
``benchmarks/selection_loto.py``, on the same class-balanced training subsets. For each subset:

1. **Hindsight grid** (150 SGD steps of batch 32, fp32, test accuracy on the same test rows as
   ``selection_loto.py``): every candidate ``select_method`` considers by default (linear probe;
   Layer FT and SCL FT at the blocks ``select_block`` considers; LoRA-in-block at the middle of
   those blocks; full FT), each at every lr of ``LR_GRID``. The SCL FT runs are
   ``selection_loto.py``'s own records (the same keys); the others are added here.
2. **Signals**: one ``select_method(..., probe_all=True)`` per subset: every (candidate, lr)
   probe (``probe_steps`` SGD steps on 70% of the subset, scored on the other 30%), timed.

``report`` applies each procedure (``ncfinetune.selection.choose_method``, the library's one code
path) to the recorded probes. Its design choices (which probes; the margin within which
candidates count as tied on held-out accuracy; the tie-break among them: the fewest trainable
parameters or the lowest held-out NC1) are chosen on the other pairs and scored on the held-out
pair. Regret = the best grid cell in hindsight (any method, block, lr;
same subset and seed) minus the chosen cell. Fixed policies in the same table: always SCL FT at
the middle block, always full FT (each with its lr chosen by its own probes).
"""

from __future__ import annotations

import argparse
import json
import time
from itertools import product

import numpy as np
from common import (
    BACKBONES,
    RESULTS,
    SEEDS,
    read_record,
    run_all,
    run_for,
    saved,
    upsert_record,
    versions,
)
from selection_loto import (
    LR_GRID,
    PAIRS,
    PRECISION,
    SIZES,
    TEST_MAX,
    _subset_data,
    candidates,
    load_data,
    pair_name,
)

import ncfinetune

# The digits pairs' committed selection_loto records predate the digits split change of commit
# 06b4058 (their subsets and test rows are no longer the ones the data code draws): they are
# left out until re-run (``--pairs`` with a digits pair re-runs nothing that is recorded).
# resnet18_src59 needs its backbone pretrained first (selection_loto.py says how).
DEFAULT_PAIRS = [("vit_tiny", "fmnist59"), ("resnet18", "fmnist59"), ("resnet18", "fmnist59_inv")]
assert set(DEFAULT_PAIRS) <= set(PAIRS)
PROBE_STEPS = 10
SIGNALS = RESULTS / "method_loto" / "signals"
KW = {"precision": PRECISION, "test_max": TEST_MAX}


def lora_block(cands: list[int]) -> int:
    """The block LoRA-in-block is measured at: the middle of the candidate blocks."""
    return cands[len(cands) // 2]


def grid_cells(b: str, t: str, n: int, s: int) -> dict[tuple[str, int | None, float], object]:
    """The subset's hindsight grid: (method, block, lr) -> Run."""
    cands = candidates(b, load_data(b, t)["num_classes"])
    cells = {}
    for lr in LR_GRID:
        cells[("linear", None, lr)] = run_for(b, t, "linear", n, s, lr, **KW)
        for k in cands:
            cells[("layer", k, lr)] = run_for(b, t, "layer", n, s, lr, block=k, **KW)
            cells[("scl", k, lr)] = run_for(b, t, "scl", n, s, lr, block=k, **KW)
        k = lora_block(cands)
        cells[("lora-block", k, lr)] = run_for(b, t, "lora-block", n, s, lr, block=k, **KW)
        cells[("full", None, lr)] = run_for(b, t, "full", n, s, lr, **KW)
    return cells


def signal_key(n: int, s: int) -> str:
    """A subset's signal record; "-r": probes that record their training loss's rise (the
    records without it, of the library before, stay in the files but are not read)."""
    return f"n{n}-s{s}-p{PROBE_STEPS}-r"


def signals_file(b: str, t: str):
    return SIGNALS / b / f"{t}.jsonl"


def signal_record(b: str, t: str, n: int, s: int) -> dict:
    """select_method's probes on one training subset (every candidate and lr), cached on disk."""
    key = signal_key(n, s)
    if (rec := read_record(signals_file(b, t), key)) is not None:
        return rec
    cache, model = _subset_data(b, t, n, s)
    cands = candidates(b, load_data(b, t)["num_classes"])
    t0 = time.perf_counter()
    plan = ncfinetune.selection.select_method(
        model,
        cache,
        seed=s,
        blocks=cands,
        lora_blocks=[lora_block(cands)],
        lr_grid=LR_GRID,
        probe_steps=PROBE_STEPS,
        precision=PRECISION,
    )
    rec = {
        "key": key,
        "backbone": b,
        "target": t,
        "per_class": n,
        "seed": s,
        "probe_steps": PROBE_STEPS,
        "plan": plan.to_dict(),
        "seconds": time.perf_counter() - t0,
        "num_train": len(cache),
        "versions": versions(),
    }
    upsert_record(signals_file(b, t), rec)
    return rec


def measure(pairs, what: str) -> None:
    for b, t in pairs:
        if what == "grid":
            runs = [r for n, s in product(SIZES, SEEDS) for r in grid_cells(b, t, n, s).values()]
            run_all(runs)
        else:
            for n, s in product(SIZES, SEEDS):
                rec = signal_record(b, t, n, s)
                print(f"{b}/{t} n={n} s={s}: signals in {rec['seconds']:.1f}s", flush=True)


# -- report ---------------------------------------------------------------------------------------
def load_subsets(pairs) -> list[dict]:
    """Every subset with its signals and complete hindsight grid (test accuracy per cell)."""
    out = []
    for b, t in pairs:
        for n, s in product(SIZES, SEEDS):
            sig = read_record(signals_file(b, t), signal_key(n, s))
            if sig is None:
                continue
            cells = grid_cells(b, t, n, s)
            recs = {c: saved(r) for c, r in cells.items()}
            if None in recs.values():
                continue
            out.append(
                {
                    "pair": pair_name(b, t),
                    "per_class": n,
                    "seed": s,
                    "signals": sig,
                    "acc": {c: _acc(r) for c, r in recs.items()},
                    "train_s": {c: r["train_seconds"] for c, r in recs.items()},
                }
            )
    return out


def _acc(rec: dict) -> float:
    a = rec["metrics"]["test_accuracy"]
    return 0.0 if a is None else 100 * a


MARGINS = (0.0, 1.0, 2.0, 3.0, 5.0)  # select_method's margin, chosen leave one target out
# which probes select_method runs, chosen leave one target out with the margin: every candidate
# at every lr, or only lr 0.03, or the one-block methods at the middle candidate only, or both
# (and "full0.03": full FT, the costliest probe, at lr 0.03 only; the rest at every lr)
VARIANTS = ("all", "lr0.03", "mid", "mid-lr0.03", "all-full0.03", "mid-full0.03")
MAX_COST = 0.25  # the goal: selection <= 25% of the fine-tune it precedes


def finetune_seconds(sub: dict, c) -> float:
    """Estimated training time of the fine-tune ``c`` at the recipe's default length for the
    subset: ``default_steps`` optimizer steps of ``DEFAULT_BATCH`` images, at the step time the
    same select_method call measured for batch ``PROBE_BATCH`` (scaled by the batch ratio; the
    probes of one-block methods ran on prefix-cache outputs, as the recipe's fine-tune does).
    ``benchmarks/method_cost.py`` measures the real ratio in the recipe."""
    from ncfinetune.selection.rules import PROBE_BATCH
    from ncfinetune.training.length import DEFAULT_BATCH, default_steps

    steps = default_steps(sub["signals"]["num_train"])
    return steps * c.step_seconds * DEFAULT_BATCH / PROBE_BATCH


def candidates_of(sub: dict, variant: str = "all", stable: bool = False) -> list:
    """The subset's recorded candidates as select_method saw them, restricted to a variant's
    probes (each candidate's best lr and score recomputed by the library's choose_lr, unstable
    probes last when ``stable``)."""
    from ncfinetune.selection import CandidateRow, MethodCandidate, choose_lr

    cands = [MethodCandidate(**c) for c in sub["signals"]["plan"]["candidates"]]
    if variant.startswith("mid"):
        mid = middle_block(sub)
        cands = [c for c in cands if c.block is None or c.block == mid]
    for c in cands:
        if variant.endswith("lr0.03") or (variant.endswith("full0.03") and c.method == "full"):
            c.probes = {k: v for k, v in c.probes.items() if float(k) == 0.03}
        c.lr, _ = choose_lr(CandidateRow(-1, "", 0, 0.0, probes=c.probes), stable)
        c.accuracy = 100 * c.probes[f"{c.lr:g}"]["accuracy"]
    return cands


def middle_block(sub: dict) -> int:
    """The middle of the subset's candidate blocks (where LoRA-in-block was probed)."""
    return next(
        c["block"] for c in sub["signals"]["plan"]["candidates"] if c["method"] == "lora-block"
    )


def pick(sub: dict, policy) -> tuple[tuple[str, int | None, float], float]:
    """(the grid cell a policy picks on one subset, its cost): ("auto", variant, margin) is
    select_method's rule on the variant's probes; "scl-middle" and "full" are the fixed
    policies, each at the lr its own probes chose. Cost: the call's wall time outside the
    probes plus the probes the policy uses, over the chosen fine-tune at the recipe's default
    length (:func:`finetune_seconds`; both timed in one process under the same load)."""
    from ncfinetune.selection import choose_method

    if isinstance(policy, tuple) and policy[0] == "fixed":
        return fixed_cell(sub, *policy[1:]), 0.0
    plan = sub["signals"]["plan"]
    everything = [p for c in plan["candidates"] for p in c["probes"].values()]
    overhead = plan["seconds"] - sum(p["seconds"] for p in everything)
    if isinstance(policy, tuple):
        cands = candidates_of(sub, policy[1], policy[4])
        c, _ = choose_method(cands, policy[2], policy[3], policy[4])
        used = [p for d in cands for p in d.probes.values()]
    else:
        cands = candidates_of(sub)
        if policy == "full":
            c = next(d for d in cands if d.method == "full")
        else:
            b = BACKBONES[sub["signals"]["backbone"]]["middle"]
            c = next(d for d in cands if d.method == "scl" and d.block == b)
        used = list(c.probes.values())
    cost = (overhead + sum(p["seconds"] for p in used)) / finetune_seconds(sub, c)
    return (c.method, c.block, c.lr), cost


POSITIONS = ("first", "mid", "last")  # a block by its place among the candidate blocks


def fixed_cell(sub: dict, method: str, position: str | None, lr: float) -> tuple:
    """The subset's grid cell of a fixed policy that names its block by position."""
    if position is None:
        return (method, None, lr)
    blocks = sorted({b for m, b, _ in sub["acc"] if m == method})
    at = {"first": 0, "mid": len(blocks) // 2, "last": len(blocks) - 1}[position]
    return (method, blocks[min(at, len(blocks) - 1)], lr)


def fixed_policies(subs: list[dict]) -> list[tuple]:
    """Every fixed policy of the grid: ("fixed", method, block position or None, lr)."""
    out = set()
    for m, b, lr in subs[0]["acc"]:
        for pos in (None,) if b is None else POSITIONS:
            out.add(("fixed", m, pos, lr))
    return sorted(out, key=str)


def best_fixed(subs: list[dict]) -> tuple:
    """The fixed policy with the least mean regret over ``subs`` (no probe: cost 0)."""
    return min(fixed_policies(subs), key=lambda p: (evaluate(subs, p)["regret"], str(p)))


def evaluate(subs: list[dict], policy) -> dict:
    """Mean accuracy, mean and max regret (vs the best grid cell in hindsight) and cost of a
    policy over subsets."""
    picks = [pick(s, policy) for s in subs]
    acc = [s["acc"][cell] for s, (cell, _) in zip(subs, picks, strict=True)]
    regret = [max(s["acc"].values()) - a for s, a in zip(subs, acc, strict=True)]
    cost = [c for _, c in picks]
    return {"accuracy": float(np.mean(acc)), "regret": float(np.mean(regret)),
            "max_regret": float(np.max(regret)), "cost": float(np.mean(cost)),
            "max_cost": float(np.max(cost)), "n": len(subs),
            "chose": [f"{m}" + ("" if b is None else f"@{b}") for (m, b, _), _ in picks]}  # fmt: skip


TIEBREAKS = ("params", "nc1")  # among the candidates within the margin: fewest parameters / NC1
STABLE = (False, True)  # unstable probes (training loss above its first step's) ranked last
AUTO = [("auto", v, m, t, u) for v in VARIANTS for m in MARGINS for t in TIEBREAKS for u in STABLE]


def name(policy: tuple) -> str:
    """A design's short name: probes, margin, tie-break."""
    return f"{policy[1]} m{policy[2]:g} {policy[3]}" + (" stable" if policy[4] else "")


def design(subs: list[dict]) -> tuple:
    """The (variant, margin) with the highest mean accuracy among those whose mean cost is at
    most MAX_COST (none: the cheapest); ties: the cheaper, then the larger margin."""
    scored = [(p, evaluate(subs, p)) for p in AUTO]
    ok = [(p, e) for p, e in scored if e["cost"] <= MAX_COST]
    if not ok:
        return min(scored, key=lambda t: t[1]["cost"])[0]
    return max(ok, key=lambda t: (round(t[1]["accuracy"], 6), -t[1]["cost"], t[0][2:]))[0]


def oracle_floor(subs: list[dict], pair: str) -> dict:
    """The regret of an oracle that knows the *test* accuracies of every cell on the pair's
    other seeds at the same size and picks the cell best on their mean: a floor for any rule
    that sees only a subset's training rows, which can know less than that."""
    held = [s for s in subs if s["pair"] == pair]
    regret = []
    for s in held:
        others = [o for o in held if o["per_class"] == s["per_class"] and o["seed"] != s["seed"]]
        if not others:
            continue
        cell = max(s["acc"], key=lambda c: np.mean([o["acc"][c] for o in others]))
        regret.append(max(s["acc"].values()) - s["acc"][cell])
    return {"regret": float(np.mean(regret)), "max_regret": float(np.max(regret)), "n": len(regret)}


def loto(subs: list[dict]) -> dict:
    """Per held-out pair: the design chosen on the other pairs, scored on the pair, beside the
    fixed policies."""
    pairs = sorted({s["pair"] for s in subs})
    out = {}
    for p in pairs:
        held = [s for s in subs if s["pair"] == p]
        rest = [s for s in subs if s["pair"] != p]
        row = {}
        if rest:
            policy = design(rest)
            row["design"] = list(policy[1:])
            row["design_name"] = name(policy)
            row["auto"] = evaluate(held, policy)
            fixed = best_fixed(rest)
            row["fixed_design"] = list(fixed[1:])
            row["fixed"] = evaluate(held, fixed)
        row["scl-middle"] = evaluate(held, "scl-middle")
        row["full"] = evaluate(held, "full")
        row["best_in_hindsight"] = float(np.mean([max(s["acc"].values()) for s in held]))
        row["oracle_floor"] = oracle_floor(subs, p)
        row["every_design"] = {name(p): evaluate(held, p) for p in AUTO}
        out[p] = row
    return out


def report(subs: list[dict]) -> None:
    if not subs:
        raise SystemExit("no subset has both its signals and its complete grid: run measure first")
    res = loto(subs)
    lines = [
        "# Method selection (`select_method`), leave one target out",
        "",
        f"`python benchmarks/method_loto.py measure grid && python benchmarks/method_loto.py "
        f"measure signals && python benchmarks/method_loto.py report`. {len(res)} (backbone, "
        f"target) pairs, {len(subs)} subsets (sizes {SIZES} per class, seeds {SEEDS}). Every "
        f"candidate (linear probe; Layer/SCL FT at the `select_block` candidates; LoRA-in-block at "
        f"their middle; full FT) at lr {', '.join(f'{v:g}' for v in LR_GRID)}: 150 SGD steps of "
        f"batch 32, test accuracy. `select_method` probes every candidate and lr for "
        f"{PROBE_STEPS} steps on 70% of the subset, scored on the other 30%; its design (which "
        f"probes: {', '.join(VARIANTS)}; the margin within which candidates tie, in {MARGINS}; "
        f"the tie-break: {' or '.join(TIEBREAKS)}) is chosen on the other pairs: the highest mean accuracy "
        f"among designs costing at most {100 * MAX_COST:.0f}% of the fine-tune. Regret: best grid cell in hindsight minus the chosen cell "
        "(accuracy points). Fixed policies: SCL FT at the middle block, full FT (each at the lr "
        "its own probes chose); and, for reference, the one grid cell (method, block by its "
        "place among the candidates, lr) with the least mean regret on the other pairs, with no "
        "probe at all. Cost: select_method's wall time / the chosen fine-tune at the recipe's "
        "default length (`default_steps` of the subset at batch 64), estimated from the step "
        "time the same call measured (`results/method_cost.md` measures it in the recipe).",
        "",
        "| pair | design (LOTO: probes, margin, ties, stable) | auto acc | auto regret (mean / max) | SCL middle "
        "acc | regret | full FT acc | regret | auto - better fixed | best cell of the other "
        "pairs: acc / regret | best in hindsight | cost mean / max | auto chose |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---|---:|---:|---|",
    ]
    for p, r in res.items():
        a, m, f, x = r["auto"], r["scl-middle"], r["full"], r["fixed"]
        better = max(m["accuracy"], f["accuracy"])
        cell = "{}@{} lr {:g}".format(*r["fixed_design"]).replace("@None", "")
        lines.append(
            f"| {p} | {r['design_name']} | {a['accuracy']:.2f} "
            f"| {a['regret']:.2f} / {a['max_regret']:.2f} | {m['accuracy']:.2f} | {m['regret']:.2f} "
            f"| {f['accuracy']:.2f} | {f['regret']:.2f} | {a['accuracy'] - better:+.2f} "
            f"| {cell}: {x['accuracy']:.2f} / {x['regret']:.2f} "
            f"| {r['best_in_hindsight']:.2f} | {100 * a['cost']:.0f}% / {100 * a['max_cost']:.0f}% "
            f"| {' '.join(a['chose'])} |"
        )
    pol = ("auto", "scl-middle", "full", "fixed")
    mean = {k: np.mean([r[k]["regret"] for r in res.values()]) for k in pol}
    worst = {k: max(r[k]["max_regret"] for r in res.values()) for k in pol}
    vs = [
        r["auto"]["accuracy"] - max(r["scl-middle"]["accuracy"], r["full"]["accuracy"])
        for r in res.values()
    ]
    overall = design(subs)
    lines += [
        "",
        f"The design chosen the same way on every pair (the library's default): probes "
        f"{overall[1]}, margin {overall[2]:g}, ties by {overall[3]}, unstable probes "
        f"{'set aside' if overall[4] else 'kept'} (`{name(overall)}`).",
        "",
        f"Over the {len(res)} pairs (each scored by the design chosen without it): mean regret "
        f"auto {mean['auto']:.2f}, SCL middle {mean['scl-middle']:.2f}, full FT "
        f"{mean['full']:.2f}, best cell of the other pairs {mean['fixed']:.2f}; worst subset "
        f"auto {worst['auto']:.2f}, SCL middle {worst['scl-middle']:.2f}, full FT "
        f"{worst['full']:.2f}, best cell of the other pairs {worst['fixed']:.2f}; auto minus the better fixed "
        f"policy per pair: worst {min(vs):+.2f}; cost of auto, mean "
        f"{100 * np.mean([r['auto']['cost'] for r in res.values()]):.0f}%.",
        "",
        "How low regret can go here: an oracle that knows the *test* accuracy of every cell on "
        "the same pair and size at the other two seeds, and takes the cell best on their mean, "
        "has mean regret "
        + ", ".join(f"{p} {r['oracle_floor']['regret']:.2f}" for p, r in res.items())
        + " (max "
        + ", ".join(f"{r['oracle_floor']['max_regret']:.2f}" for r in res.values())
        + "). A rule that sees only the subset's training rows knows less than that oracle.",
        "",
        "## Every design on every pair (in hindsight, for reference: not a LOTO number)",
        "",
        "accuracy / mean regret / mean cost",
        "",
        "| design | " + " | ".join(res) + " |",
        "|---|" + "---:|" * len(res),
    ]
    for label in next(iter(res.values()))["every_design"]:
        lines.append(
            f"| {label} | "
            + " | ".join(
                "{accuracy:.2f} / {regret:.2f} / {c:.0f}%".format(
                    **r["every_design"][label], c=100 * r["every_design"][label]["cost"]
                )
                for r in res.values()
            )
            + " |"
        )
    (RESULTS / "method_loto.md").write_text("\n".join(lines) + "\n")
    (RESULTS / "method_loto.json").write_text(json.dumps(res, indent=1, sort_keys=True) + "\n")
    plot(res)
    print("\n".join(lines))


def plot(res: dict) -> None:
    from ncfinetune.plotting import new_figure, save_figure

    fig, ax = new_figure(1, 1, figsize=(7, 3.5))
    pairs = list(res)
    x = np.arange(len(pairs))
    for i, (k, name) in enumerate(
        [("auto", "select_method (LOTO)"), ("scl-middle", "SCL FT, middle"), ("full", "full FT")]
    ):
        ax.bar(x + (i - 1) * 0.27, [res[p][k]["accuracy"] for p in pairs], 0.27, label=name)
    ax.scatter(
        x,
        [res[p]["best_in_hindsight"] for p in pairs],
        marker="_",
        s=400,
        color="k",
        label="best in hindsight",
        zorder=3,
    )
    lo = min(min(res[p][k]["accuracy"] for k in ("auto", "scl-middle", "full")) for p in pairs)
    ax.set_ylim(lo - 5, None)
    ax.set_xticks(x, pairs, fontsize=8)
    ax.set_ylabel("test accuracy (%), mean over subsets")
    ax.legend(fontsize=7)
    ax.set_title("which method: select_method vs fixed policies (150-step grid)", fontsize=9)
    save_figure(fig, RESULTS / "method_loto.png")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("what", choices=["measure", "report"])
    ap.add_argument("part", nargs="?", choices=["grid", "signals"], default="grid")
    ap.add_argument("--pairs", nargs="+", default=[f"{b}/{t}" for b, t in DEFAULT_PAIRS])
    a = ap.parse_args()
    pairs = [tuple(p.split("/")) for p in a.pairs]
    if a.what == "measure":
        measure(pairs, a.part)
    else:
        report(load_subsets(pairs))


if __name__ == "__main__":
    main()
