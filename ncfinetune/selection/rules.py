"""The rules that choose a block and a learning rate from measured candidate rows, the
defaults they were measured with (``benchmarks/selection_loto.py``), and the checks of their
settings."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from ncfinetune.errors import ConfigError
from ncfinetune.selection.report import CandidateRow

RULES = ("middle", "curve", "linear", "recall", "mlp", "probe", "probe_accuracy")
PROBE_RULES = ("probe", "probe_accuracy")
DEFAULT_RULE = "probe"  # measured leave-one-target-out: benchmarks/results/selection_loto.md
LR_GRID = (0.1, 0.03)  # lr="auto" chooses among these (as measured: selection_loto.md)
PROBE_LR = 0.03  # the probes' lr by default: chosen leave-one-target-out over 0.1, 0.03, auto
PROBE_STEPS = 10  # per probe; as measured (benchmarks/results/selection_loto.md)
MAX_TRAINABLE_PERCENT = 10.0  # default parameter budget of the candidates
MAX_CANDIDATES = 3  # first, middle and deepest block within the budget
HELDOUT_FRACTION = 0.3
LINEAR_FOLDS = 5
PROBE_BATCH = 32


def choose(
    rule: str, rows: Sequence[CandidateRow], num_blocks: int, probe_steps: int = PROBE_STEPS
) -> tuple[int, float | None, str]:
    """Apply ``rule`` to measured candidate rows: (chosen block, chosen lr or None, reason).

    The probe rules pick a (block, lr) pair among the probes measured; the other rules pick a
    block only. The one place a rule is decided: :func:`select_block` and the benchmarks both
    call it.
    """
    if rule == "middle":
        mid = num_blocks // 2
        before = [r for r in rows if r.index <= mid]
        best = max(before, key=lambda r: r.index) if before else min(rows, key=lambda r: r.index)
        return (
            best.index,
            None,
            (
                f"The fixed middle block (index {mid} of {num_blocks})"
                + (
                    "."
                    if best.index == mid
                    else " is not a candidate; the deepest candidate before it."
                )
            ),
        )
    if rule == "curve":
        scored = [r for r in rows if r.nc1_block is not None]
        if not scored:
            raise ConfigError("rule 'curve': no candidate has a finite NC1 on this data.")
        best = min(scored, key=lambda r: (r.nc1_block, -r.index))
        return (
            best.index,
            None,
            (
                f"Its pooled output has the lowest NC1 on the training data ({best.nc1_block:.3f}) "
                f"among {len(rows)} candidates."
            ),
        )
    if rule == "linear":
        best = max(rows, key=lambda r: (r.linear_accuracy or 0.0, r.index))
        return (
            best.index,
            None,
            (
                f"A linear probe on its pooled output has the highest cross-validated accuracy "
                f"({100 * (best.linear_accuracy or 0):.1f}%) among {len(rows)} candidates "
                "(ties: the deeper block)."
            ),
        )
    if rule in ("recall", "mlp"):
        field, what = {
            "recall": ("recall_at_1", "nearest-neighbour retrieval (R@1)"),
            "mlp": ("mlp_accuracy", "MLP-probe held-out accuracy"),
        }[rule]
        best = max(rows, key=lambda r: (getattr(r, field) or 0.0, r.index))
        return (
            best.index,
            None,
            f"Its pooled output has the highest {what} ({100 * (getattr(best, field) or 0):.1f}%) "
            f"among {len(rows)} candidates (ties: the deeper block).",
        )
    pairs = [(r, lr, p) for r in rows for lr, p in r.probes.items()]
    if not pairs:
        raise ConfigError(f"rule {rule!r} needs probes; none were measured.")
    if rule == "probe":
        r, lr, p = min(pairs, key=lambda t: (t[2]["nc1"] is None, t[2]["nc1"] or 0.0, -float(t[1])))
        why = (
            f"the lowest held-out penultimate NC1 ({p['nc1']:.3f})"
            if p["nc1"] is not None
            else "no finite NC1 anywhere"
        )
    else:
        r, lr, p = max(pairs, key=lambda t: _accuracy_key(t[2], t[1]))
        why = (
            f"the highest held-out accuracy ({100 * p['accuracy']:.1f}%; ties: lower held-out NC1)"
        )
    return (
        r.index,
        float(lr),
        (
            f"After a {probe_steps}-step probe at lr {lr}, {why} among {len(pairs)} (block, lr) pairs."
        ),
    )


def choose_lr(row: CandidateRow, stable_first: bool = False) -> tuple[float, str]:
    """The lr of ``row``'s probes with the highest held-out accuracy (ties: the lower held-out
    NC1, then the larger lr), and why. ``stable_first``: an lr whose probe was unstable (see
    :func:`unstable`) ranks below every stable one."""
    lr, p = max(row.probes.items(), key=lambda kv: _accuracy_key(kv[1], kv[0], stable_first))
    why = f"the highest held-out accuracy ({100 * p['accuracy']:.1f}%) of short probes at "
    return float(lr), f"Learning rate {lr}: {why}{', '.join(row.probes)}."


UNSTABLE_RISE = 1.0  # a probe's training loss above its first step's: set a priori, not fitted


def unstable(p: dict) -> bool:
    """True when a probe's training loss rose above its first step's (``loss_rise`` > 1): the
    lr overshoots, which a short probe's held-out score may not show yet."""
    rise = p.get("loss_rise")
    return rise is not None and rise > UNSTABLE_RISE


def _accuracy_key(p: dict, lr: str, stable_first: bool = False) -> tuple:
    stable = not (stable_first and unstable(p))
    return (stable, p["accuracy"], p["nc1"] is not None, -(p["nc1"] or 0.0), float(lr))


def min_per_class(
    rule: str, lr: float | str = "auto", heldout_fraction: float = HELDOUT_FRACTION
) -> int:
    """The fewest training samples per class ``rule`` (with ``lr``; rule ``"lr"``: the lr sweep
    alone) can work with: 2 for the
    curve, linear and recall rules (NC1, cross-validation and R@1 need two samples of a class),
    4 for the mlp rule (its split holds one out and fits on at least two), and for the
    probe rules or ``lr="auto"`` enough to hold ``heldout_fraction`` of each class out (>= 1
    held out, >= 2 to fit)."""
    need = 1 if rule in ("middle", "lr", "method") else 4 if rule == "mlp" else 2
    if rule in PROBE_RULES or lr == "auto":
        f = heldout_fraction
        need = max(need, 3, int(np.ceil(1 / min(f, 1 - f))) + 1)
    return need


def positive(v: Any) -> bool:
    """A finite positive number (not a bool)."""
    return (
        isinstance(v, (int, float)) and not isinstance(v, bool) and bool(np.isfinite(v)) and v > 0
    )


def check_grid(lr_grid: Sequence[float]) -> None:
    if len(lr_grid) == 0 or not all(positive(v) for v in lr_grid):
        raise ConfigError(
            f"lr_grid must hold positive learning rates, got {list(lr_grid)}; e.g. (0.1, 0.03)."
        )


def check_probe(probe_steps: int, batch_size: int) -> None:
    for name, v in (("probe_steps", probe_steps), ("batch_size", batch_size)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ConfigError(f"{name} must be an integer >= 1, got {v!r}.")


def check_samples(labels: np.ndarray, rule: str, lr: float | str, fraction: float) -> None:
    if not 0 < fraction < 1:
        raise ConfigError(f"heldout_fraction must be in (0, 1), got {fraction}.")
    classes, counts = np.unique(labels, return_counts=True)
    if classes.size < 2:
        raise ConfigError(
            f"block selection needs at least 2 classes in the training data, got {classes.size}."
        )
    need = min_per_class(rule, lr, fraction)
    if counts.min() < need:
        worst = classes[counts.argmin()]
        why = (
            "to hold some out for the probes"
            if need > 2
            else "(NC1 and cross-validation need two samples of a class)"
        )
        what = {"lr": "lr 'auto'", "method": "method selection (select_method, --method auto)"}
        what = what.get(rule, f"rule {rule!r} with lr {lr!r}")
        fixed = rule not in ("lr", "method")
        raise ConfigError(
            f"class {worst} has {counts.min()} training samples; {what} "
            f"needs at least {need} per class {why}. Use more data"
            + (", rule='curve' or 'linear' with a fixed lr" if need > 2 and fixed else "")
            + (", or rule='middle' with a fixed lr" if rule not in ("middle", "method") else "")
            + (", or name the method, block and lr" if rule == "method" else "")
            + "."
        )
