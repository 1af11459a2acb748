"""The one training loop and the one evaluation loop, shared by the recipes, block selection's
probes and the benchmarks; optimizers over the trainable set and the cosine schedule.

:func:`fit_batches` and :func:`predict_batches` take any iterable of ``(images, labels)``
batches. Batches follow the model's device; forward passes run under bf16 autocast when asked
(``precision``), or under the Accelerator's autocast when one is given, which also does the
backward pass, gradient accumulation and (for prediction) the gather across processes.
:func:`train_steps` / :func:`evaluate_rows` feed them from rows of an in-memory dataset with a
fixed step budget, which is what keeps benchmark runs and probes comparable.
"""

from __future__ import annotations

import contextlib
import itertools
import math
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from timm.optim import create_optimizer_v2
from tqdm.auto import tqdm

from ncfinetune.errors import ConfigError, NonFiniteOutputs, TrainingDiverged
from ncfinetune.training.device import LOOP_PRECISIONS, model_device
from ncfinetune.tuning.model import TunedModel
from ncfinetune.tuning.prefix_cache import PrefixCache, check_prefix

OPTIMIZERS = ("sgd", "adamw")


_TIMM_NAMES = {"sgd": "momentum", "adamw": "adamw"}  # timm's "sgd" is Nesterov; ours is not


def build_optimizer(
    tuned: TunedModel,
    name: str = "sgd",
    lr: float = 0.1,
    momentum: float = 0.9,
    weight_decay: float = 1e-4,
    *,
    no_decay_norm_bias: bool = False,
) -> torch.optim.Optimizer:
    """An optimizer over the trainable parameters only, from timm's ``create_optimizer_v2``
    (paper defaults: SGD with momentum 0.9, no Nesterov, weight decay 1e-4, lr 0.1).

    Args:
        name: ``sgd`` (timm's ``momentum``) or ``adamw``.
        no_decay_norm_bias: no weight decay on norm weights and biases (1-D tensors), timm's
            ``filter_bias_and_bn``; off by default, as in the paper.
    """
    params = tuned.trainable_parameters()
    if not params:
        raise ConfigError("the tuned model has no trainable parameters; nothing to optimise.")
    if (
        isinstance(lr, bool)
        or not isinstance(lr, (int, float))
        or not (lr > 0 and math.isfinite(lr))
    ):
        raise ConfigError(f"lr must be a positive finite number, got {lr!r}.")
    if name not in _TIMM_NAMES:
        raise ConfigError(f"optimizer {name!r} is not one of {', '.join(OPTIMIZERS)}.")
    extra = {"momentum": momentum} if name == "sgd" else {}
    return create_optimizer_v2(
        tuned.model if no_decay_norm_bias else params,  # timm skips frozen parameters itself
        opt=_TIMM_NAMES[name],
        lr=lr,
        weight_decay=weight_decay,
        filter_bias_and_bn=no_decay_norm_bias,
        **extra,
    )


def build_cosine_schedule(
    optimizer: torch.optim.Optimizer, total_steps: int, min_lr: float = 1e-4
) -> torch.optim.lr_scheduler.LRScheduler:
    """Cosine decay from the optimizer's lr to ``min_lr`` over ``total_steps`` (paper: 0.1 -> 1e-4)."""
    if total_steps < 1:
        raise ConfigError(f"total_steps must be >= 1, got {total_steps}.")
    return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=total_steps, eta_min=min_lr)


Fetch = Callable[[list[int]], tuple[torch.Tensor, torch.Tensor]]


def as_memory_format(x: torch.Tensor, channels_last: bool) -> torch.Tensor:
    """``x`` in channels_last memory format when asked and 4-D (images or conv features)."""
    if channels_last and x.dim() == 4:
        return x.contiguous(memory_format=torch.channels_last)
    return x


def autocast_factory(model: torch.nn.Module, precision: str, accelerator=None) -> Callable[[], Any]:
    """A factory of autocast contexts: the Accelerator's when given, else bf16 autocast on the
    model's device for ``precision="bf16"`` and a no-op one for ``"no"``. Validated once per
    loop, not per step."""
    if accelerator is not None:
        return accelerator.autocast
    if precision not in LOOP_PRECISIONS:
        raise ConfigError(
            f"precision {precision!r} is not one of {', '.join(LOOP_PRECISIONS)}; the library's "
            "loops run fp32 or bf16 autocast (fp16 needs an Accelerator's loss scaler)."
        )
    device = model_device(model).type
    return lambda: torch.autocast(device, dtype=torch.bfloat16, enabled=precision == "bf16")


@dataclass
class FitStats:
    """What :func:`fit_batches` did on this process.

    Attributes:
        losses: the training loss of every batch (float32, on the model's device).
        images: images seen.
        seconds: wall time of the loop.
        loss_sum: sum over batches of the loss times the batch size (float64, on the device).
        lrs: the lr of every optimizer step (the first parameter group's), in order.
        grad_accum: batches per optimizer step (the last step of a pass may have fewer).
    """

    losses: torch.Tensor
    images: int
    seconds: float
    loss_sum: torch.Tensor
    lrs: list[float] = field(default_factory=list)
    grad_accum: int = 1

    @property
    def steps(self) -> int:
        """Batches trained on (forward and backward passes)."""
        return int(self.losses.numel())

    @property
    def optimizer_steps(self) -> int:
        return len(self.lrs)

    def step_losses(self) -> torch.Tensor:
        """The loss of every optimizer step: the mean over the batches it accumulated."""
        if not self.steps:
            return torch.empty(0, device=self.losses.device)
        return torch.stack([w.mean() for w in self.losses.split(self.grad_accum)])


def diverged(what: str, step: int, lr: float, where: str = "") -> TrainingDiverged:
    """The error for training that diverged at optimizer ``step`` (1-based) trained at ``lr``:
    ``what`` says how (e.g. "the loss became nan")."""
    return TrainingDiverged(
        f"training diverged at lr {lr:g}: {what} at optimizer step {step}{where}. Lower the "
        f"learning rate (e.g. --lr {lr / 10:g}).",
        step=step,
        lr=lr,
    )


def _marking_last(batches: Iterable, limit: int | None):
    """``(batch, is_last)`` pairs: the last of ``batches`` or the ``limit``-th is marked
    (reading one batch ahead, as accelerate's loaders do to find their end)."""
    it = iter(batches)
    try:
        item = next(it)
    except StopIteration:
        return
    count = 1
    while True:
        if limit is not None and count >= limit:
            yield item, True
            return
        try:
            following = next(it)
        except StopIteration:
            yield item, True
            return
        yield item, False
        item, count = following, count + 1


def _check_accumulation(grad_accum: int, accelerator) -> None:
    if isinstance(grad_accum, bool) or not isinstance(grad_accum, int) or grad_accum < 1:
        raise ConfigError(f"grad_accum must be an int >= 1, got {grad_accum!r}.")
    if accelerator is not None and accelerator.gradient_accumulation_steps != 1:
        raise ConfigError(
            f"the Accelerator accumulates gradients over {accelerator.gradient_accumulation_steps}"
            " steps itself; build it with gradient_accumulation_steps=1 and pass grad_accum to "
            "fit_batches (or loop.train_epoch) instead."
        )


def _sync(model, accelerator, closes: bool):
    """The context of a forward and backward pass: under DDP gradients are all-reduced only by
    the pass that ``closes`` the accumulation window (DDP needs the forward inside too)."""
    if accelerator is None or closes:
        return contextlib.nullcontext()
    return accelerator.no_sync(model)


def _optimizer_step(optimizer, scheduler, window: list[int]) -> float:
    """Close an accumulation window of batches of ``window`` sizes: rescale its gradients to
    the mean over its images (not a sum of means), step, zero; return the lr it stepped at."""
    if len(window) > 1:
        scale = window[0] / sum(window)
        for group in optimizer.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    p.grad.mul_(scale)
    lr = optimizer.param_groups[0]["lr"]
    optimizer.step()
    if not getattr(optimizer, "step_was_skipped", False):  # fp16 overflow: no step
        scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return lr


def _check_finite(stats: FitStats) -> None:
    """Raise :func:`diverged` at the first optimizer step whose loss was NaN or infinite."""
    per_step = stats.step_losses()
    bad = (~torch.isfinite(per_step)).nonzero()
    if bad.numel():
        i = int(bad[0])
        where = f" of {stats.optimizer_steps}"
        raise diverged(f"the loss became {per_step[i].item()}", i + 1, stats.lrs[i], where)


def fit_batches(
    model: torch.nn.Module,
    batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    *,
    accelerator=None,
    precision: str = "no",
    label_smoothing: float = 0.0,
    max_steps: int | None = None,
    channels_last: bool = False,
    progress: str | None = None,
    check_finite: bool = True,
    grad_accum: int = 1,
) -> FitStats:
    """Train ``model`` on ``batches``: one optimizer and scheduler step per ``grad_accum``
    batches (default: per batch).

    Batches are moved to the model's device. With ``accelerator`` (the model, optimizer and
    loader prepared by it; the scheduler need not be) the backward pass and autocast are its
    own (DDP, mixed precision); without, forward passes run under bf16 autocast when
    ``precision="bf16"``. Losses stay on the device until the end (no host round trip per step).

    Gradient accumulation: each batch's gradient is weighted by its share of the window's
    images, so one step equals one step on a batch holding all of them (BatchNorm in training
    mode still sees each batch alone). The last window of a pass (at the end of ``batches`` or
    at ``max_steps``) is stepped even when shorter, so a pass of ``n`` batches makes
    ``ceil(n / grad_accum)`` optimizer steps. The scheduler steps once per optimizer step (not
    when a mixed-precision optimizer skipped its step).

    Args:
        max_steps: stop after this many batches.
        progress: a tqdm description to show a bar (main process only), or None.
        check_finite: raise when a loss was NaN or infinite.
        grad_accum: batches per optimizer step (>= 1). The Accelerator must be built with
            ``gradient_accumulation_steps=1``: the accumulation happens here.

    Raises:
        TrainingDiverged: a loss became NaN or infinite (lower the lr); a ``FloatingPointError``.
        ConfigError: ``grad_accum`` < 1, or an Accelerator that accumulates itself.
    """
    _check_accumulation(grad_accum, accelerator)
    device = model_device(model)
    autocast = autocast_factory(model, precision, accelerator)
    show = progress is not None and (accelerator is None or accelerator.is_local_main_process)
    losses, images, lrs, window = [], 0, [], []  # window: batch sizes since the last step
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    model.train()
    start = time.perf_counter()
    bar = tqdm(batches, desc=progress, leave=False, disable=not show)
    marked = _marking_last(bar, max_steps) if grad_accum > 1 else ((b, False) for b in bar)
    for (x, y), last in marked:
        x = as_memory_format(x.to(device, non_blocking=True), channels_last)
        y = y.to(device, non_blocking=True)
        window.append(len(y))
        closes = last or len(window) == grad_accum
        with _sync(model, accelerator, closes):
            with autocast():
                loss = F.cross_entropy(model(x).float(), y, label_smoothing=label_smoothing)
            weighted = loss if len(window) == 1 else loss * (window[-1] / window[0])
            accelerator.backward(weighted) if accelerator is not None else weighted.backward()
        if closes:
            lrs.append(_optimizer_step(optimizer, scheduler, window))
            window = []
        losses.append(loss.detach())
        loss_sum += loss.detach().double() * len(y)
        images += len(y)
        if max_steps is not None and len(losses) >= max_steps:
            break
    seconds = time.perf_counter() - start
    loss_tensor = torch.stack(losses) if losses else torch.empty(0)
    stats = FitStats(loss_tensor, images, seconds, loss_sum, lrs, grad_accum)
    if check_finite and stats.steps:
        _check_finite(stats)
    return stats


@torch.no_grad()
def predict_batches(
    model: torch.nn.Module,
    batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
    *,
    accelerator=None,
    precision: str = "no",
    features: bool = False,
    channels_last: bool = False,
    progress: str | None = None,
    logits: bool = False,
) -> dict[str, torch.Tensor]:
    """Predictions, labels (and the classifier-input features) of every sample, in eval mode.

    ``model`` must have ``forward_with_features(x) -> (logits, features)`` (a TunedModel).
    With ``accelerator`` the results are gathered from all processes so that each sample
    appears exactly once. Results are returned on the CPU (one copy at the end).
    ``logits=True`` also returns the float32 logits (``"logits"``: softmax them for
    probabilities).

    Raises:
        NonFiniteOutputs: a logit was NaN or infinite (on any process: the check is gathered,
            so every process raises, after the last batch).
    """
    net = (
        model if accelerator is None else accelerator.unwrap_model(model, keep_torch_compile=False)
    )
    device = model_device(net)
    autocast = autocast_factory(net, precision, accelerator)
    show = progress is not None and (accelerator is None or accelerator.is_local_main_process)
    net.eval()
    out: dict[str, list[torch.Tensor]] = {"preds": [], "labels": []}
    if features:
        out["features"] = []
    if logits:
        out["logits"] = []
    out["finite"] = []
    for x, y in tqdm(batches, desc=progress, leave=False, disable=not show):
        x = as_memory_format(x.to(device, non_blocking=True), channels_last)
        with autocast():
            scores, feats = net.forward_with_features(x)
        items = [scores.argmax(1), y.to(device)] + ([feats.float()] if features else [])
        items += [scores.float()] if logits else []
        items.append(torch.isfinite(scores).all(1))  # gathered: every process sees every row
        if accelerator is not None:
            items = accelerator.gather_for_metrics(items)
        for key, value in zip(out, items, strict=True):
            out[key].append(value)
    res = {k: torch.cat(v).cpu() if v else torch.empty(0) for k, v in out.items()}
    finite = res.pop("finite")
    if finite.numel() and not bool(finite.all()):
        bad = int((~finite).sum())
        raise NonFiniteOutputs(
            f"the model's logits are NaN or infinite on {bad} of {finite.numel()} images (its "
            "weights overflow even where they are finite: training diverged). Its predictions "
            "are meaningless; retrain with a lower lr.",
            rows=bad,
            total=int(finite.numel()),
        )
    return res


def _row_batches(fetch: Fetch, rows: np.ndarray, steps: int, batch: int, seed: int):
    """``steps`` batches of ``batch`` rows; rows are reshuffled once per pass (seeded)."""
    gen = torch.Generator().manual_seed(seed)
    order: list[int] = []
    for _ in range(steps):
        if len(order) < batch:
            order += rows[torch.randperm(rows.size, generator=gen).numpy()].tolist()
        picked, order = order[:batch], order[batch:]
        yield fetch(picked)


@contextlib.contextmanager
def _prefix_inputs(tuned: TunedModel, prefix: PrefixCache | None, fetch: Fetch):
    """Feed ``tuned`` from ``prefix`` (its ``fetch``, ``prefix_inputs`` set) inside the block."""
    if prefix is None:
        yield fetch
        return
    check_prefix(tuned, prefix)
    before, tuned.prefix_inputs = tuned.prefix_inputs, True
    try:
        yield prefix.fetch
    finally:
        tuned.prefix_inputs = before


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
    head_warmup: int = 0,
) -> torch.Tensor:
    """Train ``tuned`` for a fixed number of optimizer steps on ``rows`` of an in-memory dataset,
    through :func:`fit_batches`.

    ``fetch(list_of_rows)`` returns one (images, labels) batch. Rows are reshuffled once per
    pass (seeded); every step gets a full batch of ``min(batch_size, len(rows))``, so the
    compute is the same whatever the number of rows. Cosine schedule from ``lr`` to ``min_lr``.
    Used by the benchmarks and by the probe rule of block selection, where a step budget (not
    an epoch count) is what keeps runs comparable.

    With ``prefix`` (a :class:`~ncfinetune.tuning.prefix_cache.PrefixCache` over the same data), each
    step runs only the model's suffix on cached prefix outputs; each row's prefix is computed
    once. Same seed, same batches: the result equals the uncached path up to float rounding.
    ``precision="bf16"`` runs forward passes under bf16 autocast.

    ``head_warmup`` (LP-FT): the first ``head_warmup`` of the ``steps`` train the classifier
    alone (the rest of the trainable set frozen; its own optimizer and cosine from ``lr``), then
    the whole trainable set trains for the steps left, from fresh optimizer state. The same
    batches in the same order as without it.

    Returns:
        The training loss of every step (float32 tensor, on the CPU).

    Raises:
        TrainingDiverged: if the loss becomes NaN or infinite (diverged: lower the lr); a
            ``FloatingPointError``.
    """
    rows = np.asarray(rows)
    if rows.size == 0:
        raise ConfigError("train_steps got no rows to train on.")
    if (
        isinstance(head_warmup, bool)
        or not isinstance(head_warmup, int)
        or not (0 <= head_warmup < steps)
    ):
        raise ConfigError(f"head_warmup must be an int in [0, steps={steps}), got {head_warmup!r}.")
    losses = []
    with _prefix_inputs(tuned, prefix, fetch) as source:
        batches = _row_batches(source, rows, steps, min(batch_size, rows.size), seed)
        for n, head_only in ((head_warmup, True), (steps - head_warmup, False)):
            if n == 0:
                continue
            with _classifier_only(tuned, head_only):
                opt = build_optimizer(tuned, optimizer, lr, momentum, weight_decay)
                sched = build_cosine_schedule(opt, n, min_lr)
                phase = itertools.islice(batches, n)  # the shared stream goes on after it
                stats = fit_batches(tuned, phase, opt, sched, precision=precision)
            losses.append(stats.losses.cpu())
    return torch.cat(losses)


@contextlib.contextmanager
def _classifier_only(tuned: TunedModel, active: bool):
    """Inside, only the classifier of ``tuned`` takes gradients (when ``active``)."""
    if not active:
        yield
        return
    head = {id(p) for m in tuned.adapter.classifier_modules() for p in m.parameters()}
    paused = [p for p in tuned.trainable_parameters() if id(p) not in head]
    for p in paused:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p in paused:
            p.requires_grad_(True)


def evaluate_rows(
    tuned: TunedModel,
    fetch: Fetch,
    rows: Sequence[int] | np.ndarray,
    batch_size: int = 500,
    prefix: PrefixCache | None = None,
    precision: str = "no",
) -> dict[str, Any]:
    """Accuracy, penultimate features and labels of ``rows`` (eval mode, one pass through
    :func:`predict_batches`); with ``prefix``, from cached prefix outputs, and ``precision``
    as in :func:`train_steps`."""
    rows = np.asarray(rows)
    with _prefix_inputs(tuned, prefix, fetch) as source:
        batches = (
            source(rows[s : s + batch_size].tolist()) for s in range(0, rows.size, batch_size)
        )
        res = predict_batches(tuned, batches, precision=precision, features=True)
    return {
        "accuracy": float((res["preds"] == res["labels"]).float().mean()),
        "features": res["features"],
        "labels": res["labels"],
    }
