"""The learning rate of any method (``--lr auto``), chosen by the short probes of block
selection on held-out training rows; never the test split."""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from ncfinetune.backbones import get_adapter
from ncfinetune.selection.probe import Prober, as_fetch, on_device, probe_precision, training_cache
from ncfinetune.selection.report import CandidateRow, LRSelection
from ncfinetune.selection.rules import (
    HELDOUT_FRACTION,
    LR_GRID,
    PROBE_BATCH,
    PROBE_STEPS,
    check_grid,
    check_probe,
    check_samples,
    choose_lr,
)
from ncfinetune.training.device import model_device
from ncfinetune.tuning.methods import method_class


def select_lr(
    model: nn.Module,
    train_data: Any,
    *,
    method: str,
    block: int | str | None = None,
    lr_grid: Sequence[float] = LR_GRID,
    heldout_fraction: float = HELDOUT_FRACTION,
    probe_steps: int = PROBE_STEPS,
    batch_size: int = PROBE_BATCH,
    bn: str | None = None,
    precision: str | None = None,
    device: str | torch.device | None = None,
    seed: int = 0,
) -> LRSelection:
    """Choose the learning rate of any method (``--lr auto``) by the short probes of
    :func:`select_block`: ``probe_steps`` SGD steps at each lr of ``lr_grid`` on a stratified
    part of the training data, the highest accuracy on the held-out rest (ties: the lower
    held-out NC1, then the larger lr). The test split is never an input. ``precision``,
    ``device`` and ``seed`` as for :func:`~ncfinetune.selection.select_block`.

    Raises:
        ConfigError: bad lr_grid or probe settings, or fewer training samples per class than
            holding some out needs (the message names the minimum).
    """
    t0 = time.perf_counter()
    method_class(method)  # a clear error for an unknown name
    check_grid(lr_grid)
    check_probe(probe_steps, batch_size)
    model = on_device(model, device)
    precision = probe_precision(precision, model_device(model))
    fetch, labels = as_fetch(train_data, model)
    check_samples(labels, "lr", "auto", heldout_fraction)
    index = None if block is None else get_adapter(model).resolve(block)
    prober = Prober(
        model, fetch, labels, method=method, bn=bn, seed=seed, fraction=heldout_fraction,
        steps=probe_steps, batch=batch_size, precision=precision,
    )  # fmt: skip
    probes = {f"{v:g}": prober.probe(index, float(v)) for v in lr_grid}
    lr, reason = choose_lr(CandidateRow(-1, "", 0, 0.0, probes=probes))
    return LRSelection(
        method, index, lr, probes, reason, time.perf_counter() - t0, prober.images, probe_steps
    )


def select_lr_on_split(
    model: nn.Module,
    data: Any,
    transform: Any,
    rows: Sequence[int] | np.ndarray | None = None,
    *,
    max_images: int | None = None,
    seed: int = 0,
    **kwargs: Any,
) -> LRSelection:
    """:func:`select_lr` on rows of a loaded dataset's *training* split (``--lr auto``); the
    arguments are those of :func:`~ncfinetune.selection.select_block_on_split`."""
    cache = training_cache(data, transform, rows, max_images, seed)
    return select_lr(model, cache, seed=seed, **kwargs)
