"""Pieces shared by recipes and benchmarks: optimizers over the trainable set, schedules."""

from __future__ import annotations

import math

import torch

from ncfinetune.errors import ConfigError
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
