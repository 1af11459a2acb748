"""Which method for this data: linear probe, one block (Layer FT, SCL FT, LoRA-in-block) or full
fine-tuning, with its block and learning rate, chosen on the downstream training data.

:func:`select_method` runs a short probe fine-tune (``probe_steps`` SGD steps, batch 32) of every
candidate at every lr of ``lr_grid`` on 70% of the training data and scores each on the held-out
30% (the probes of :func:`~ncfinetune.selection.select_block`, sharing prefix caches between
methods whose frozen prefix ends at the same block). :func:`choose_method` then takes each
candidate at its best lr and, among those within ``margin`` held-out accuracy points of the best,
the one with the lowest held-out NC1 (``tiebreak="nc1"``) or the fewest trainable parameters
(``"params"``); with ``stable_first`` a probe whose training loss rose above its first step's is
set aside while a stable one exists. The default design (every candidate block, lr 0.03, margin 5,
NC1, stable first) is the one ``benchmarks/method_loto.py`` chooses over its development pairs;
measured leave one target out it did not meet the issue's regret goal (results/method_loto.md).
The test split is never an input.

Candidates by default: the linear probe; Layer FT and SCL FT at the blocks ``select_block``
considers (:func:`~ncfinetune.selection.default_candidates`, within the parameter budget, which
is raised to the smallest block when no block fits and said so in ``.budget_note``;
``blocks="middle"``: the middle one only); LoRA-in-block at the middle of them; full FT.

With ``budget`` the comparison is at equal wall-clock instead of equal steps: each candidate
gets the steps that fit the budget at its own measured step time, and is probed again at its
best lr for the same share of those steps.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn

from ncfinetune.backbones import get_adapter
from ncfinetune.backbones.base import arch_name
from ncfinetune.errors import ConfigError
from ncfinetune.selection.block import budget_candidates, fits_skip
from ncfinetune.selection.probe import (
    Prober,
    as_fetch,
    on_device,
    probe_precision,
    training_cache,
)
from ncfinetune.selection.report import CandidateRow, JsonReport
from ncfinetune.selection.rules import (
    HELDOUT_FRACTION,
    MAX_TRAINABLE_PERCENT,
    PROBE_BATCH,
    PROBE_STEPS,
    check_grid,
    check_probe,
    check_samples,
    choose_lr,
    positive,
    unstable,
)
from ncfinetune.training.device import model_device
from ncfinetune.training.length import default_steps
from ncfinetune.tuning.methods import MethodConfig, method_class, method_config

METHOD_CANDIDATES = ("linear", "layer", "scl", "lora-block", "full")
# The default design, chosen by benchmarks/method_loto.py over its development pairs (the
# highest mean accuracy among the designs whose probes cost at most 25% of the fine-tune; see
# results/method_loto.md): every candidate block, lr 0.03 only, within 5 held-out points the
# lowest held-out NC1, unstable probes set aside.
METHOD_LR_GRID = (0.03,)
METHOD_MARGIN = 5.0  # accuracy points
TIEBREAKS = ("nc1", "params")
METHOD_TIEBREAK = "nc1"  # among the candidates within the margin
METHOD_STABLE_FIRST = True  # probes whose training loss rose above its first step's: last
MAX_BUDGET_PROBE = 5  # a budget probe runs at most this many times probe_steps


@dataclass
class MethodCandidate:
    """One candidate of a :class:`MethodPlan`.

    Attributes:
        method, block, block_name: what would be fine-tuned (block None: linear probe, full FT).
        trainable_percent: % of the model's parameters it trains.
        probes: held-out ``accuracy``, ``nc1``, ``seconds``, ``train_seconds`` and ``steps`` of
            the short probe fine-tune per lr (key: the lr as text).
        lr, accuracy: its best lr on the probes and the held-out accuracy there (%).
        step_seconds: measured seconds per training step (from the probes).
        steps: the steps it would train in the plan (``steps``, or what fits the budget).
        budget_probe: with a budget, the probe at ``lr`` for the budget's share of ``steps``.
    """

    method: str
    block: int | None
    block_name: str | None
    trainable_percent: float
    probes: dict[str, dict[str, float | None]] = field(default_factory=dict)
    lr: float | None = None
    accuracy: float | None = None
    step_seconds: float | None = None
    steps: int | None = None
    budget_probe: dict[str, float | None] | None = None

    @property
    def label(self) -> str:
        return self.method if self.block is None else f"{self.method}@{self.block}"


@dataclass
class MethodPlan(JsonReport):
    """The result of :func:`select_method`: the chosen method, block, lr and steps, every
    candidate's probes, and why. ``.config`` is a method config ``get_tuned_model`` accepts."""

    method: str
    block: int | None
    lr: float
    steps: int
    arch: str
    candidates: list[MethodCandidate]
    reason: str
    margin: float
    probe_steps: int
    seconds: float
    images_processed: int
    budget_seconds: float | None = None
    budget_note: str | None = None
    tiebreak: str = METHOD_TIEBREAK
    stable_first: bool = METHOD_STABLE_FIRST

    @property
    def config(self) -> MethodConfig:
        return method_config(self.method, block=self.block)

    @property
    def chosen(self) -> MethodCandidate:
        return next(c for c in self.candidates if (c.method, c.block) == (self.method, self.block))

    def table(self) -> str:
        lrs = sorted({k for c in self.candidates for k in c.probes}, key=float, reverse=True)
        head = f"   {'candidate':<16} {'train %':>8}" + "".join(f" {'lr ' + k:>9}" for k in lrs)
        head += f" {'best':>7} {'steps':>6} {'est. s':>7}"
        lines = [head]
        for c in self.candidates:
            mark = "*" if c is self.chosen else " "
            line = f" {mark} {c.label:<16} {c.trainable_percent:>7.2f}%"
            for k in lrs:
                p = c.probes.get(k)
                line += f" {'-':>9}" if p is None else f" {100 * p['accuracy']:>8.1f}%"
            acc = "-" if c.accuracy is None else f"{c.accuracy:.1f}%"
            est = (
                "-"
                if c.step_seconds is None or c.steps is None
                else f"{c.step_seconds * c.steps:.1f}"
            )
            line += f" {acc:>7} {c.steps or '-':>6} {est:>7}"
            lines.append(line)
        what = (
            "equal steps"
            if self.budget_seconds is None
            else f"equal wall-clock ({self.budget_seconds:.1f} s)"
        )
        lines.append(
            f"(held-out accuracy after a {self.probe_steps}-step probe per lr; best: at the "
            f"candidate's best lr; compared at {what}; est. s: steps x measured step time)"
        )
        if self.budget_note:
            lines.append(self.budget_note)
        block = "" if self.block is None else f" at block {self.block}"
        lines.append(
            f"chosen: {self.method}{block}, lr {self.lr:g}, {self.steps} steps. {self.reason} "
            f"Cost: {self.seconds:.1f} s, {self.images_processed:,} images processed."
        )
        return "\n".join(lines)

    def __str__(self) -> str:
        return f"method selection for {self.arch}\n" + self.table()

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "config": {"method": self.method, **self.config.to_dict()}}


def choose_method(
    candidates: Sequence[MethodCandidate],
    margin: float = METHOD_MARGIN,
    tiebreak: str = METHOD_TIEBREAK,
    stable_first: bool = METHOD_STABLE_FIRST,
) -> tuple[MethodCandidate, str]:
    """The candidate to fine-tune, and why: among the candidates within ``margin`` accuracy
    points of the best score, the one with the lowest held-out NC1 (``tiebreak="nc1"``, the
    tie-break ``choose_lr`` uses between lrs; then fewer trainable parameters) or the one
    training the fewest parameters (``"params"``; then the higher score). The score is the
    budget probe's where measured, else the best lr's. ``stable_first``: candidates whose probe
    was unstable (:func:`~ncfinetune.selection.rules.unstable`) are set aside while a stable one
    exists. The one place the method is decided: :func:`select_method` and the benchmark both
    call it."""
    check_tiebreak(tiebreak)
    scored = [(c, _probe(c)) for c in candidates if _probe(c) is not None]
    if not scored:
        raise ConfigError("no method candidate has a probe score; nothing to choose from.")
    aside = ""
    if stable_first and any(not unstable(p) for _, p in scored):
        shaky = [c.label for c, p in scored if unstable(p)]
        scored = [(c, p) for c, p in scored if not unstable(p)]
        if shaky:
            rose = "the probe's training loss rose above its first step's"
            aside = f" Set aside: {', '.join(shaky)} ({rose})."
    top_c, top = max(scored, key=lambda t: (t[1]["accuracy"], -t[0].trainable_percent))
    best = 100 * top["accuracy"]
    near = [(c, p) for c, p in scored if 100 * p["accuracy"] >= best - margin]
    if tiebreak == "nc1":
        c, p = min(near, key=lambda t: (_nc1(t[1]), t[0].trainable_percent, -t[1]["accuracy"]))
    else:
        c, p = min(near, key=lambda t: (t[0].trainable_percent, -t[1]["accuracy"]))
    s = 100 * p["accuracy"]
    if len(near) == 1:
        return c, f"The highest held-out accuracy ({s:.1f}%) among {len(scored)} candidates.{aside}"
    within = "tied with" if margin == 0 else f"within {margin:g} points of"
    others = ", ".join(d.label for d, _ in near if d is not c)
    by = (
        f"the lowest held-out NC1 ({_nc1(p):.3g})"
        if tiebreak == "nc1"
        else f"the fewest trainable parameters ({c.trainable_percent:.2f}%)"
    )
    return (
        c,
        f"Held-out accuracy {s:.1f}% ({within} the best, {best:.1f}%); of those ({others}) {by}."
        + aside,
    )


def check_tiebreak(tiebreak: str) -> None:
    if tiebreak not in TIEBREAKS:
        raise ConfigError(f"tiebreak must be one of {', '.join(TIEBREAKS)}, got {tiebreak!r}.")


def _probe(c: MethodCandidate) -> dict | None:
    """The probe a candidate is scored on: the budget probe where measured, else its best lr's."""
    if c.budget_probe is not None:
        return c.budget_probe
    return None if c.lr is None else c.probes.get(f"{c.lr:g}")


def _nc1(p: dict) -> float:
    return float("inf") if p.get("nc1") is None else p["nc1"]


def select_method(
    model: nn.Module,
    train_data: Any,
    steps: int | None = None,
    seed: int = 0,
    methods: Sequence[str] | None = None,
    budget: float | str | None = None,
    *,
    blocks: Sequence[int | str] | str | None = None,
    lora_blocks: Sequence[int | str] | None = None,
    max_trainable_percent: float | None = MAX_TRAINABLE_PERCENT,
    margin: float = METHOD_MARGIN,
    tiebreak: str = METHOD_TIEBREAK,
    stable_first: bool = METHOD_STABLE_FIRST,
    lr_grid: Sequence[float] = METHOD_LR_GRID,
    heldout_fraction: float = HELDOUT_FRACTION,
    probe_steps: int = PROBE_STEPS,
    batch_size: int = PROBE_BATCH,
    bn: str | None = None,
    precision: str | None = None,
    device: str | torch.device | None = None,
) -> MethodPlan:
    """Choose the method, block, lr (and steps) to fine-tune ``model`` on ``train_data``.

    Args:
        model: the pretrained timm model with its downstream classifier (not modified).
        train_data: the downstream *training* data, as for
            :func:`~ncfinetune.selection.select_block`; the test split is never an input.
        steps: the fine-tune's length in optimizer steps (equal steps for every candidate);
            None: the default length of ``ncfinetune.training.length`` for this many rows at
            the recipe's batch (``default_steps``), as ``ncfinetune finetune`` would train.
        seed: the probes' own RNG (torch's global RNG is left as it was).
        methods: the method names to consider (default :data:`METHOD_CANDIDATES`).
        budget: None (equal steps), seconds (a number) or ``"<k>x"``: k times full FT's
            measured time for ``steps`` steps (as ``benchmarks/budget.py``). Each candidate then
            trains the steps that fit the budget at its own step time.
        blocks: the blocks of Layer FT and SCL FT: None (default: all of
            :func:`~ncfinetune.selection.default_candidates`, as chosen by
            ``benchmarks/method_loto.py``), ``"middle"`` (the middle one) or a list.
        lora_blocks: the blocks of LoRA-in-block (default: the middle of ``blocks``).
        max_trainable_percent: the default blocks' parameter budget; when no block fits, the
            smallest block's share is used and ``.budget_note`` says so.
        margin: accuracy points within which candidates count as tied with the best.
        tiebreak: among those, ``"nc1"`` (the lowest held-out NC1) or ``"params"`` (the fewest
            trainable parameters); see :func:`choose_method`.
        stable_first: rank a probe whose training loss rose above its first step's below the
            stable ones, for the lr and the method (see :func:`choose_method`).
        lr_grid, heldout_fraction, probe_steps, batch_size, bn, precision, device: the probes,
            as for :func:`~ncfinetune.selection.select_block`.

    Returns:
        A :class:`MethodPlan`; ``get_tuned_model(model, plan.config)`` builds the choice.

    Raises:
        ConfigError: an unknown method, bad blocks, lr grid, probe settings or budget, or too
            few training samples per class to hold some out.
    """
    t0 = time.perf_counter()
    methods, budget = _check(
        methods, steps, budget, margin, tiebreak, lr_grid, probe_steps, batch_size
    )
    model = on_device(model, device)
    precision = probe_precision(precision, model_device(model))
    fetch, labels = as_fetch(train_data, model)
    check_samples(labels, "method", "auto", heldout_fraction)
    steps = default_steps(len(labels)) if steps is None else steps
    blocks, lora_blocks, note = _blocks(model, methods, blocks, lora_blocks, max_trainable_percent)
    cands = _candidates(model, methods, blocks, lora_blocks)
    prober = Prober(
        model, fetch, labels, method="scl", bn=bn, seed=seed, fraction=heldout_fraction,
        steps=probe_steps, batch=batch_size, precision=precision,
    )  # fmt: skip
    for c in cands:
        c.probes = {f"{v:g}": prober.probe(c.block, float(v), c.method) for v in lr_grid}
        c.trainable_percent = next(iter(c.probes.values()))["trainable_percent"]
        c.lr, _ = choose_lr(CandidateRow(-1, "", 0, 0.0, probes=c.probes), stable_first)
        c.accuracy = 100 * c.probes[f"{c.lr:g}"]["accuracy"]
        trained = [p["train_seconds"] / p["steps"] for p in c.probes.values()]
        c.step_seconds = min(trained)  # the least disturbed measurement
        c.steps = steps
    budget_s = _budget_seconds(budget, steps, cands, prober)
    if budget_s is not None:
        for c in cands:
            c.steps = max(1, int(budget_s / c.step_seconds))
            share = min(
                MAX_BUDGET_PROBE * probe_steps, max(1, round(probe_steps * c.steps / steps))
            )
            c.budget_probe = prober.probe(c.block, c.lr, c.method, steps=share)
    chosen, reason = choose_method(cands, margin, tiebreak, stable_first)
    return MethodPlan(
        method=chosen.method, block=chosen.block, lr=chosen.lr, steps=chosen.steps,
        arch=arch_name(model), candidates=cands, reason=reason, margin=margin,
        tiebreak=tiebreak, stable_first=stable_first, probe_steps=probe_steps,
        seconds=time.perf_counter() - t0, images_processed=prober.images,
        budget_seconds=budget_s, budget_note=note,
    )  # fmt: skip


def select_method_on_split(
    model: nn.Module, data: Any, transform: Any, rows=None, *, max_images=None, seed=0, **kwargs
) -> MethodPlan:
    """:func:`select_method` on rows of a loaded dataset's *training* split (``--method auto``);
    the arguments are those of :func:`~ncfinetune.selection.select_block_on_split`."""
    cache = training_cache(data, transform, rows, max_images, seed)
    return select_method(model, cache, seed=seed, **kwargs)


def _check(methods, steps, budget, margin, tiebreak, lr_grid, probe_steps, batch_size):
    """(the method names, the budget as ``(value, relative)`` or None), or a ConfigError."""
    methods = list(METHOD_CANDIDATES if methods is None else methods)
    if not methods:
        raise ConfigError(f"methods is empty; pass some of {', '.join(METHOD_CANDIDATES)} or None.")
    for m in methods:
        method_class(m)  # a clear error for an unknown name
    if len(set(methods)) != len(methods):
        raise ConfigError(f"methods lists a method twice: {methods}.")
    if steps is not None and (isinstance(steps, bool) or not isinstance(steps, int) or steps < 1):
        raise ConfigError(
            f"steps must be a positive integer (optimizer steps) or None, got {steps!r}."
        )
    if not (isinstance(margin, (int, float)) and 0 <= margin < float("inf")):
        raise ConfigError(
            f"margin must be a finite number of accuracy points >= 0, got {margin!r}."
        )
    check_tiebreak(tiebreak)
    check_grid(lr_grid)
    check_probe(probe_steps, batch_size)
    return methods, None if budget is None else _parse_budget(budget)


def _parse_budget(budget: float | str) -> tuple[float, bool]:
    """(value, relative): seconds, or a multiple of full FT's time (``"2x"``)."""
    text = str(budget).strip()
    relative = isinstance(budget, str) and text.lower().endswith("x")
    try:
        value = float(text[:-1] if relative else text)
    except ValueError:
        value = float("nan")
    if isinstance(budget, bool) or not positive(value):
        raise ConfigError(
            f"budget must be a positive number of seconds or '<k>x' (k times full FT's time for "
            f"the same steps, e.g. '1x', '0.5x'), got {budget!r}."
        )
    return value, relative


def _budget_seconds(budget, steps, cands, prober) -> float | None:
    if budget is None:
        return None
    value, relative = budget
    if not relative:
        return value
    full = next((c for c in cands if c.method == "full"), None)
    if full is None:  # time full FT's steps with a probe of its own
        p = prober.probe(None, cands[0].lr or 0.01, "full")
        return value * steps * p["train_seconds"] / p["steps"]
    return value * steps * full.step_seconds


def _blocks(model, methods, blocks, lora_blocks, max_trainable_percent):
    """(blocks of layer/scl, blocks of lora-block, a note when the budget was raised)."""
    adapter = get_adapter(model)
    tuned = [m for m in methods if method_class(m).tunes_block]
    if not tuned:
        return [], [], None
    note = None
    if blocks is None or blocks == "middle":
        found, note = budget_candidates(model, "scl", max_trainable_percent)
        blocks = found if blocks is None else found[len(found) // 2 : len(found) // 2 + 1]
    elif isinstance(blocks, str):
        raise ConfigError(
            f"blocks must be None, 'middle' or a list of block indices or names, got {blocks!r}."
        )
    else:
        blocks = sorted({adapter.resolve(b) for b in blocks})
    if not blocks:
        raise ConfigError("blocks is empty; pass block indices or names, or None for the default.")
    if lora_blocks is None:
        lora_blocks = [blocks[len(blocks) // 2]]
    else:
        lora_blocks = sorted({adapter.resolve(b) for b in lora_blocks})
    return blocks, lora_blocks, note


def _candidates(model, methods, blocks, lora_blocks) -> list[MethodCandidate]:
    adapter = get_adapter(model)
    names = adapter.block_names
    out = []
    for m in methods:
        if not method_class(m).tunes_block:
            at = [None]
        elif m.startswith("lora"):
            at = lora_blocks
        else:  # SCL only where the block's width fits the skip
            at = [b for b in blocks if m != "scl" or fits_skip(adapter, b)]
        for b in at:
            # trainable_percent: counted on the first probe's model
            out.append(MethodCandidate(m, b, None if b is None else names[b], 0.0))
    return out
