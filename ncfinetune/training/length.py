"""How long a run trains when the user does not say: the one rule for the recipes, the probes
of block, lr and method selection, and the benchmark that chose it (``benchmarks/train_length.py``).

A run counts epochs (``DEFAULT_EPOCHS`` passes, as before), but never fewer than ``MIN_STEPS``
optimizer steps: a small dataset makes few steps per epoch, and ten passes over 100 images are
about 20 steps, far too few. A large dataset is unchanged (ten epochs of 60,000 images at batch
64 are 9,380 steps, far above the floor).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from ncfinetune.errors import ConfigError

DEFAULT_EPOCHS = 10
DEFAULT_BATCH = 64  # images per optimizer step of the recipe's default run
# chosen leave one target out by benchmarks/train_length.py (results/train_length.md)
MIN_STEPS = 200
# the end-of-run warning: the training loss over the last tenth of the steps is still this
# fraction (or more) of the loss over the first tenth (set a priori; its record on the
# benchmark's runs is in results/train_length.md)
STILL_HIGH = 0.1


@dataclass(frozen=True)
class Length:
    """A run's length: ``epochs`` passes of ``steps_per_epoch`` optimizer steps, and why.

    Attributes:
        epochs: passes over the training data.
        steps_per_epoch: optimizer steps per pass (after ``max_steps`` and grad_accum).
        rule: ``"given"`` (the user's epochs), ``"epochs"`` (the default epochs already reach
            the floor), ``"min_steps"`` (epochs raised to reach ``MIN_STEPS``) or
            ``"max_steps"`` (a smoke test's cap on the batches per epoch: the default epochs,
            no floor).
    """

    epochs: int
    steps_per_epoch: int
    rule: str
    min_steps: int = MIN_STEPS

    @property
    def steps(self) -> int:
        return self.epochs * self.steps_per_epoch

    def describe(self) -> str:
        why = {
            "given": "epochs as given",
            "max_steps": f"the default {DEFAULT_EPOCHS} epochs of at most max_steps batches",
            "epochs": f"the default {DEFAULT_EPOCHS} epochs (already >= {self.min_steps} steps)",
            "min_steps": (
                f"default: {DEFAULT_EPOCHS} epochs would be only "
                f"{DEFAULT_EPOCHS * self.steps_per_epoch} steps, raised to reach the floor of "
                f"{self.min_steps} steps for small data; pass --epochs N to choose"
            ),
        }[self.rule]
        return (
            f"{self.epochs} epochs x {self.steps_per_epoch} optimizer steps = {self.steps} "
            f"steps ({why})"
        )


def run_length(
    steps_per_epoch: int,
    epochs: int | None = None,
    *,
    min_steps: int = MIN_STEPS,
    capped: bool = False,
) -> Length:
    """The length of a run with ``steps_per_epoch`` optimizer steps per pass: ``epochs`` when
    given, else ``max(DEFAULT_EPOCHS, ceil(min_steps / steps_per_epoch))`` whole epochs
    (``capped``: the batches per epoch are capped for a smoke test, so ``DEFAULT_EPOCHS``).

    Raises:
        ConfigError: if ``steps_per_epoch`` or a given ``epochs`` is not an integer >= 1.
    """
    for name, value in (("steps_per_epoch", steps_per_epoch), ("epochs", epochs)):
        if value is None and name == "epochs":
            continue
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ConfigError(f"{name} must be an integer >= 1, got {value!r}")
    if isinstance(min_steps, bool) or not isinstance(min_steps, int) or min_steps < 0:
        raise ConfigError(f"min_steps must be an integer >= 0, got {min_steps!r}")
    if epochs is not None:
        return Length(epochs, steps_per_epoch, "given", min_steps)
    if capped:
        return Length(DEFAULT_EPOCHS, steps_per_epoch, "max_steps", min_steps)
    raised = math.ceil(min_steps / steps_per_epoch)
    if raised <= DEFAULT_EPOCHS:
        return Length(DEFAULT_EPOCHS, steps_per_epoch, "epochs", min_steps)
    return Length(raised, steps_per_epoch, "min_steps", min_steps)


def default_steps(
    num_rows: int, batch_size: int = DEFAULT_BATCH, *, min_steps: int = MIN_STEPS
) -> int:
    """Optimizer steps of a default-length run over ``num_rows`` rows in batches of
    ``batch_size`` (the last batch of a pass may be short): what the recipe trains, and what the
    probes of ``select_method`` compare at when not told."""
    if num_rows < 1 or batch_size < 1:
        raise ConfigError(
            f"default_steps needs num_rows and batch_size >= 1, got {num_rows}, {batch_size}"
        )
    return run_length(math.ceil(num_rows / batch_size), min_steps=min_steps).steps


def still_high(losses, *, high: float = STILL_HIGH) -> float | None:
    """Whether a run ended undertrained: the mean training loss over the last tenth of
    ``losses`` (one per optimizer step) as a fraction of the mean over the first tenth, when
    that fraction is at least ``high``; else None. Fewer than 10 steps: None (too short to say).

    The cosine schedule's lr is near zero at the end, so the loss's slope there is flat even in
    a run that stopped far too early; how much of the starting loss is left is what shows it.
    """
    values = [float(v) for v in losses]
    if len(values) < 10:
        return None
    k = len(values) // 10
    first = sum(values[:k]) / k
    last = sum(values[-k:]) / k
    if not (math.isfinite(first) and math.isfinite(last)) or first <= 0:
        return None
    left = last / first
    return left if left >= high else None


def undertrained_warning(left: float | None, epochs: int, steps: int) -> str:
    """The end-of-run warning (a line of its own) for a run that ended with ``left`` of its
    starting loss (:func:`still_high`); "" when ``left`` is None."""
    if left is None:
        return ""
    return (
        f"\n   warning: the training loss was still {100 * left:.0f}% of its starting value at "
        f"the end: the run may be undertrained. Train longer: --epochs {3 * epochs} (this run: "
        f"{epochs} epochs, {steps} optimizer steps)."
    )
