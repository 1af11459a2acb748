"""Pieces shared by recipes, benchmarks and block selection: optimizers over the trainable set,
schedules, and a fixed-step training loop and evaluation over in-memory data."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from ncfinetune.errors import ConfigError
from ncfinetune.prefix_cache import PrefixCache, check_prefix
from ncfinetune.tuning import TunedModel

OPTIMIZERS = ("sgd", "adamw")


def build_optimizer(
    tuned: TunedModel,
    name: str = "sgd",
    lr: float = 0.1,
    momentum: float = 0.9,
    weight_decay: float = 1e-4,
) -> torch.optim.Optimizer:
    """An optimizer over the trainable parameters only (paper defaults: SGD, momentum 0.9,
    weight decay 1e-4, lr 0.1)."""
    params = tuned.trainable_parameters()
    if not params:
        raise ConfigError("the tuned model has no trainable parameters; nothing to optimise.")
    if not (lr > 0 and math.isfinite(lr)):
        raise ConfigError(f"lr must be a positive finite number, got {lr!r}.")
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay)
    if name == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    raise ConfigError(f"optimizer {name!r} is not one of {', '.join(OPTIMIZERS)}.")


def build_cosine_schedule(
    optimizer: torch.optim.Optimizer, total_steps: int, min_lr: float = 1e-4
) -> torch.optim.lr_scheduler.LRScheduler:
    """Cosine decay from the optimizer's lr to ``min_lr`` over ``total_steps`` (paper: 0.1 -> 1e-4)."""
    if total_steps < 1:
        raise ConfigError(f"total_steps must be >= 1, got {total_steps}.")
    return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=total_steps, eta_min=min_lr)


Fetch = Callable[[list[int]], tuple[torch.Tensor, torch.Tensor]]
PRECISIONS = ("no", "bf16")


def _autocast(tuned: TunedModel, precision: str) -> Callable[[], Any]:
    """A factory of bf16 autocast contexts on the model's device (no-op ones for ``"no"``);
    validated and resolved once per loop, not per step."""
    if precision not in PRECISIONS:
        raise ConfigError(f"precision {precision!r} is not one of {', '.join(PRECISIONS)}.")
    device = next(tuned.parameters()).device.type
    return lambda: torch.autocast(device, dtype=torch.bfloat16, enabled=precision == "bf16")


def train_steps(
    tuned: TunedModel,
    fetch: Fetch,
    rows: Sequence[int] | np.ndarray,
    *,
    steps: int,
    batch_size: int = 32,
    lr: float = 0.1,
    seed: int = 0,
    optimizer: str = "sgd",
    momentum: float = 0.9,
    weight_decay: float = 1e-4,
    min_lr: float = 1e-4,
    prefix: PrefixCache | None = None,
    precision: str = "no",
) -> torch.Tensor:
    """Train ``tuned`` for a fixed number of optimizer steps on ``rows`` of an in-memory dataset.

    ``fetch(list_of_rows)`` returns one (images, labels) batch. Rows are reshuffled once per
    pass (seeded); every step gets a full batch of ``min(batch_size, len(rows))``, so the
    compute is the same whatever the number of rows. Cosine schedule from ``lr`` to ``min_lr``.
    Used by the benchmarks and by the probe rule of block selection, where a step budget (not
    an epoch count) is what keeps runs comparable.

    With ``prefix`` (a :class:`~ncfinetune.prefix_cache.PrefixCache` over the same data), each
    step runs only the model's suffix on cached prefix outputs; each row's prefix is computed
    once. Same seed, same batches: the result equals the uncached path up to float rounding.
    ``precision="bf16"`` runs forward passes under bf16 autocast (faster on CPUs and GPUs with
    native bf16; the recipe's ``mixed_precision: auto`` makes the same choice).

    Returns:
        The training loss of every step (float32 tensor).

    Raises:
        FloatingPointError: if the loss becomes NaN or infinite (diverged: lower the lr).
    """
    rows = np.asarray(rows)
    if rows.size == 0:
        raise ConfigError("train_steps got no rows to train on.")
    forward = tuned
    if prefix is not None:
        check_prefix(tuned, prefix)
        fetch, forward = prefix.fetch, lambda h: tuned.forward_suffix(h)[1]
    opt = build_optimizer(tuned, optimizer, lr, momentum, weight_decay)
    sched = build_cosine_schedule(opt, steps, min_lr)
    batch = min(batch_size, rows.size)
    gen = torch.Generator().manual_seed(seed)
    order: list[int] = []
    losses = torch.empty(steps)
    autocast = _autocast(tuned, precision)
    tuned.train()
    for step in range(steps):
        if len(order) < batch:
            order += rows[torch.randperm(rows.size, generator=gen).numpy()].tolist()
        picked, order = order[:batch], order[batch:]
        x, y = fetch(picked)
        with autocast():
            loss = F.cross_entropy(forward(x).float(), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        losses[step] = loss.detach()
    if not bool(torch.isfinite(losses).all()):
        bad = int((~torch.isfinite(losses)).nonzero()[0])
        raise FloatingPointError(
            f"the training loss became {losses[bad].item()} at step {bad + 1} of {steps} (lr "
            f"{lr:g}): training diverged. Lower the learning rate."
        )
    return losses


@torch.no_grad()
def evaluate_rows(
    tuned: TunedModel,
    fetch: Fetch,
    rows: Sequence[int] | np.ndarray,
    batch_size: int = 500,
    prefix: PrefixCache | None = None,
    precision: str = "no",
) -> dict[str, Any]:
    """Accuracy, penultimate features and labels of ``rows`` (eval mode, one pass); with
    ``prefix``, from cached prefix outputs, and ``precision`` as in :func:`train_steps`."""
    tuned.eval()
    rows = np.asarray(rows)
    if prefix is not None:
        check_prefix(tuned, prefix)
        fetch = prefix.fetch
    autocast = _autocast(tuned, precision)
    preds, feats, labels = [], [], []
    for s in range(0, rows.size, batch_size):
        x, y = fetch(rows[s : s + batch_size].tolist())
        with autocast():
            if prefix is None:
                logits, f = tuned.forward_with_features(x)
            else:
                f, logits = tuned.forward_suffix(x)
        preds.append(logits.argmax(1))
        feats.append(f.float())
        labels.append(y)
    preds, feats, labels = torch.cat(preds), torch.cat(feats), torch.cat(labels)
    return {
        "accuracy": float((preds == labels).float().mean()),
        "features": feats,
        "labels": labels,
    }
