"""The recipes' side of training on accelerate: CPU threads, the optimizer-step
count and cosine schedule of a run, an epoch through the shared loop of
:mod:`ncfinetune.training.loop` (a diverged loss stops every process; prediction gathered over
processes is its ``predict_batches(..., accelerator=...)``), NC1 streamed and merged across
processes, strict JSON, and atomic checkpoints for resume.

A model here is anything with ``forward(x) -> logits`` and ``forward_with_features(x) ->
(logits, features)`` (a :class:`~ncfinetune.tuning.model.TunedModel`, or the pretraining network).
"""

from __future__ import annotations

import contextlib
import json
import math
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import gather_object
from torch.utils.data import BatchSampler, DataLoader
from tqdm.auto import tqdm

from ncfinetune.errors import ConfigError
from ncfinetune.files import install_folder, sha256_file, write_json, write_text
from ncfinetune.metrics.stream import NC1Accumulator
from ncfinetune.training.device import cpu_threads, model_device
from ncfinetune.training.loop import (
    as_memory_format,
    build_cosine_schedule,
    diverged,
    fit_batches,
)


def set_cpu_threads(accelerator: Accelerator, threads: int | None = None) -> int:
    """Torch's intra-op threads for this run (:func:`ncfinetune.training.device.cpu_threads`
    for the Accelerator's device and processes); returns the number used."""
    return cpu_threads(accelerator.device.type, accelerator.num_processes, threads)


@dataclass(frozen=True)
class StepPlan:
    """The optimizer steps of a run, counted on the prepared training loader.

    A prepared loader holds each process's share of the batches (the same number on every
    process), so its length is the batches one process trains per epoch, for any number of
    processes. ``max_steps`` caps those batches; each ``grad_accum`` of them (the last group
    possibly smaller) make one optimizer step, as :func:`ncfinetune.training.loop.fit_batches` does.

    Attributes:
        epochs: epochs of the run.
        batches_per_epoch: batches each process trains per epoch (after ``max_steps``).
        grad_accum: batches per optimizer step.
    """

    epochs: int
    batches_per_epoch: int
    grad_accum: int = 1

    @property
    def steps_per_epoch(self) -> int:
        """Optimizer steps per epoch: ``ceil(batches_per_epoch / grad_accum)``."""
        return -(-self.batches_per_epoch // self.grad_accum)

    @property
    def total_steps(self) -> int:
        """Optimizer steps of the whole run (the cosine schedule's length)."""
        return self.epochs * self.steps_per_epoch


def plan_steps(loader, epochs: int, grad_accum: int = 1, max_steps: int | None = None) -> StepPlan:
    """The :class:`StepPlan` of ``epochs`` passes over ``loader`` (the *prepared* loader:
    before ``accelerator.prepare`` its length counts the batches of all processes)."""
    batches = len(loader) if max_steps is None else min(len(loader), max_steps)
    if batches < 1 or epochs < 1 or grad_accum < 1:
        raise ValueError(
            f"a run needs epochs, batches per epoch and grad_accum >= 1; got epochs={epochs}, "
            f"{batches} batches (loader of {len(loader)}, max_steps={max_steps}), "
            f"grad_accum={grad_accum}."
        )
    return StepPlan(epochs, batches, grad_accum)


def build_schedule(
    accelerator: Accelerator,
    optimizer: torch.optim.Optimizer,
    loader,
    *,
    epochs: int,
    min_lr: float,
    grad_accum: int = 1,
    max_steps: int | None = None,
) -> tuple[torch.optim.lr_scheduler.LRScheduler, StepPlan]:
    """The run's cosine schedule from the optimizer's lr to ``min_lr``, exactly as long as the
    run's optimizer steps (:func:`plan_steps` on the prepared ``loader``): after the run's last
    optimizer step the lr is ``min_lr``.

    The schedule is stepped once per optimizer step by the training loop, so it is *not*
    passed to ``accelerator.prepare`` (whose wrapper steps it once per process per optimizer
    step). Nor is it registered for accelerate's checkpointing, which pickles custom objects
    and unpickles them with ``weights_only=False``: :func:`save_training_state` writes its
    state as JSON instead. Returns (scheduler, plan).
    """
    plan = plan_steps(loader, epochs, grad_accum, max_steps)
    scheduler = build_cosine_schedule(optimizer, plan.total_steps, min_lr)
    return scheduler, plan


@dataclass
class EpochStats:
    """What one training epoch did (reduced over processes).

    Attributes:
        loss: mean training loss over the epoch's images.
        images: images trained on, over all processes.
        seconds: wall time of the training steps (this process).
        steps: optimizer steps.
        step_losses: the loss of every optimizer step, averaged over processes.
        lrs: the lr of every optimizer step.
    """

    loss: float
    images: int
    seconds: float
    steps: int
    step_losses: list[float] = field(default_factory=list)
    lrs: list[float] = field(default_factory=list)

    @property
    def images_per_s(self) -> float:
        return self.images / max(self.seconds, 1e-9)


def train_epoch(
    accelerator: Accelerator,
    model: torch.nn.Module,
    loader,
    optimizer,
    scheduler,
    *,
    grad_accum: int = 1,
    label_smoothing: float = 0.0,
    max_steps: int | None = None,
    desc: str = "train",
    channels_last: bool = False,
    steps_before: int = 0,
) -> EpochStats:
    """One pass over ``loader`` through the shared loop (:func:`ncfinetune.training.loop.fit_batches`)
    with the Accelerator's autocast and backward, ``grad_accum`` batches per optimizer step
    (see ``fit_batches``: a last, smaller group is stepped too). The losses are reduced over
    processes once, at the end; a NaN or infinite loss on any process then raises on every
    process (none waits for the others in a later collective), and so do NaN or infinite
    trained weights or BatchNorm statistics after the epoch (the last step diverged: its loss
    was still finite).
    ``channels_last``: feed 4-D batches in that memory format. ``steps_before``: optimizer
    steps of earlier epochs (to number the step in the error).

    Raises:
        TrainingDiverged: a step's loss, or the weights after the last step, were NaN or
            infinite; names the step and its lr.
    """
    fit = fit_batches(
        model,
        loader,
        optimizer,
        scheduler,
        accelerator=accelerator,
        label_smoothing=label_smoothing,
        max_steps=max_steps,
        channels_last=channels_last,
        progress=desc,
        check_finite=False,
        grad_accum=grad_accum,
    )
    device = fit.loss_sum.device
    images = torch.tensor(float(fit.images), dtype=torch.float64, device=device)
    # the trained weights and the BatchNorm statistics (what the epoch changed)
    state = [p for group in optimizer.param_groups for p in group["params"]]
    state += [b for b in model.buffers() if b.is_floating_point()]
    broken = sum((~torch.isfinite(t.detach())).any().double() for t in state)  # one sync below
    broken = torch.as_tensor(broken, dtype=torch.float64, device=device)
    total = torch.stack([fit.loss_sum, images, broken])
    total = accelerator.reduce(total.to(accelerator.device), reduction="sum")
    per_step = fit.step_losses().to(accelerator.device, torch.float32)
    per_step = accelerator.reduce(per_step, reduction="mean")  # same length on every process
    bad = (~torch.isfinite(per_step)).nonzero()
    if bad.numel():
        i = int(bad[0])
        what = f"the loss became {per_step[i].item()}"
        raise diverged(what, steps_before + i + 1, fit.lrs[i], f" ({desc})")
    if total[2] > 0:
        what = "the trained weights or BatchNorm statistics became NaN or infinite"
        raise diverged(what, steps_before + fit.optimizer_steps, fit.lrs[-1], f" ({desc})")
    return EpochStats(
        float(total[0] / total[1].clamp(min=1)),
        int(total[1]),
        fit.seconds,
        fit.optimizer_steps,
        per_step.tolist(),
        list(fit.lrs),
    )


class Stopwatch:
    """Seconds spent per named part of a run: ``with clock("test"): ...`` or
    ``clock.add("train", seconds)``; ``clock.seconds`` maps each name to its total."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    def add(self, name: str, seconds: float) -> None:
        self.seconds[name] = self.seconds.get(name, 0.0) + seconds

    @contextlib.contextmanager
    def __call__(self, name: str):
        start = time.perf_counter()
        try:
            yield
        finally:
            self.add(name, time.perf_counter() - start)


def shard_loader(loader: DataLoader, index: int, count: int) -> DataLoader:
    """The rows ``index, index + count, ...`` of an unprepared, unshuffled ``loader``, in its
    batch size: each process's share of the rows with no row twice and none padded (unlike a
    prepared loader, whose last batches are padded to the same size on every process)."""
    if count == 1:
        return loader
    batch = loader.batch_size or loader.batch_sampler.batch_size
    return DataLoader(
        loader.dataset,
        batch_sampler=BatchSampler(range(index, len(loader.dataset), count), batch, False),
        collate_fn=loader.collate_fn,
        num_workers=loader.num_workers,
        pin_memory=loader.pin_memory,
    )


def collect_nc1(
    accelerator: Accelerator,
    model: torch.nn.Module,
    loader: DataLoader,
    *,
    channels_last: bool = False,
    progress: str | None = None,
) -> float | None:
    """Penultimate NC1 (:func:`ncfinetune.metrics.collapse.nc1`) of every sample of ``loader``.

    ``loader`` is *not* prepared: each process streams its share of the rows
    (:func:`shard_loader`) through a :class:`~ncfinetune.metrics.stream.NC1Accumulator`
    (:func:`accumulate_nc1`) and the accumulators are merged across processes
    (:func:`merge_nc1`; each is a few d x d floats), so no process holds every feature.
    Classes without a sample are left out; None when fewer than 2 classes have one; NaN when
    a feature was NaN or infinite on any process (the model diverged; every process agrees).
    """
    net = accelerator.unwrap_model(model, keep_torch_compile=False)
    shard = shard_loader(loader, accelerator.process_index, accelerator.num_processes)
    show = progress is not None and accelerator.is_local_main_process
    stats = accumulate_nc1(
        net, tqdm(shard, desc=progress, leave=False, disable=not show), accelerator.autocast,
        channels_last=channels_last,
    )  # fmt: skip
    part = stats if stats is None or isinstance(stats, str) else _nc1_state(stats)
    return merge_nc1(gather_object([part]) if accelerator.num_processes > 1 else [part])


@torch.no_grad()
def accumulate_nc1(
    net: torch.nn.Module, batches, autocast=contextlib.nullcontext, *, channels_last: bool = False
) -> NC1Accumulator | None:
    """An NC1Accumulator over the penultimate features of ``batches`` (eval mode, forward
    passes under ``autocast()``); None when there was no batch, ``"non-finite"`` when a
    feature was NaN or infinite (the rest is skipped)."""
    device = model_device(net)
    net.eval()
    stats = None
    for x, y in batches:
        x = as_memory_format(x.to(device, non_blocking=True), channels_last)
        with autocast():
            logits, feats = net.forward_with_features(x)
        if stats is None:
            stats = NC1Accumulator(logits.shape[1], feats.shape[1], device=device)
        if not bool(torch.isfinite(feats).all()):
            return _NON_FINITE
        stats.update(feats.float(), y.to(device))
    return stats


def merge_nc1(parts: list) -> float | None:
    """NC1 of the merged accumulator states ``parts`` (one per process, from
    :func:`accumulate_nc1` as a dict of tensors; None: no rows; NaN when any is non-finite)."""
    if _NON_FINITE in [p for p in parts if isinstance(p, str)]:
        return math.nan
    merged = None
    for part in parts:
        if part is not None:
            other = _nc1_from_state(part)
            merged = other if merged is None else merged.merge(other)
    return None if merged is None else _nc1_of_present(merged)


_NC1_STATE = ("counts", "means", "sq_dev", "scatter")
_NON_FINITE = "non-finite"


def _nc1_state(stats: NC1Accumulator) -> dict[str, torch.Tensor]:
    return {k: getattr(stats, k).cpu() for k in _NC1_STATE}


def _nc1_from_state(state: dict[str, torch.Tensor]) -> NC1Accumulator:
    k, d = state["means"].shape
    stats = NC1Accumulator(int(k), int(d))
    for key in _NC1_STATE:  # copies: merging updates the accumulator in place
        setattr(stats, key, state[key].clone())
    return stats


def _nc1_of_present(stats: NC1Accumulator) -> float | None:
    """NC1 over the classes that have samples (None when fewer than 2 do)."""
    present = (stats.counts > 0).nonzero().flatten()
    if present.numel() < 2:
        return None
    if present.numel() < stats.num_classes:
        stats = _nc1_from_state(
            {
                "counts": stats.counts[present],
                "means": stats.means[present],
                "sq_dev": stats.sq_dev[present],
                "scatter": stats.scatter,
            }
        )
    return stats.compute()


# -- checkpoints for resume (atomic: write to a temporary folder, then rename) -------------------
SCHEDULER_FILE = "scheduler.json"


def save_training_state(
    accelerator: Accelerator,
    root: Path,
    epoch: int,
    history: list,
    *,
    scheduler=None,
    keep_last: int = 1,
    extra: dict[str, str] | None = None,
) -> Path:
    """Save model/optimizer/RNG state (accelerate, safetensors) and the ``scheduler``'s state
    (JSON) after ``epoch`` (1-based) under ``root`` as ``epoch_{epoch}``: written to a staging
    folder, then moved into place (:func:`ncfinetune.files.install_folder`), so a folder named
    ``epoch_N`` is always complete. Afterwards only the ``keep_last`` newest checkpoints are
    kept (and leftovers of interrupted writes are removed). ``extra``: more files (name ->
    text) written into the checkpoint, e.g. the config it was trained with. Every file's
    SHA-256 goes into ``manifest.json`` (:func:`verify_training_state`)."""
    if keep_last < 1:
        raise ValueError(f"keep_last must be >= 1, got {keep_last}")
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"epoch_{epoch}"
    tmp = root / f".epoch_{epoch}.tmp"  # one name for every process (they all write into it)
    if accelerator.is_main_process and tmp.exists():
        shutil.rmtree(tmp)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp), safe_serialization=True)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        if scheduler is not None:
            write_json(tmp / SCHEDULER_FILE, scheduler.state_dict())
        write_json(tmp / "history.json", {"epoch": epoch, "history": history}, None)
        for name, text in (extra or {}).items():
            write_text(tmp / name, text)
        write_json(tmp / MANIFEST_FILE, {f: sha256_file(tmp / f) for f in _state_files(tmp)})
        install_folder(tmp, final)
        done = sorted(
            (d for d in root.glob("epoch_*") if d.name.split("_")[-1].isdigit()),
            key=lambda d: int(d.name.split("_")[-1]),
        )
        for old in [d for d in done if d != final][: max(0, len(done) - keep_last)]:
            shutil.rmtree(old)
        for stale in root.glob(".epoch_*.tmp"):  # an interrupted write of another epoch
            shutil.rmtree(stale, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


MANIFEST_FILE = "manifest.json"  # SHA-256 of every other file of a training checkpoint


def _state_files(folder: Path) -> list[str]:
    return sorted(
        str(p.relative_to(folder))
        for p in folder.rglob("*")
        if p.is_file() and p.name != MANIFEST_FILE
    )


def verify_training_state(path: Path) -> None:
    """Raise naming the file when a training checkpoint is not as written: a file missing,
    added, truncated or changed (its SHA-256 against ``manifest.json``). A checkpoint written
    before manifests existed is not checked.

    Raises:
        ConfigError: the first file that differs, with how to go on.
    """
    path = Path(path)
    manifest = path / MANIFEST_FILE
    if not manifest.is_file():
        return
    how = (
        "The checkpoint is corrupt; delete that epoch folder to resume from an earlier one (if "
        "kept), or start a new run (a new --output_dir)."
    )
    try:
        expected = json.loads(manifest.read_text())
    except (OSError, ValueError) as err:
        raise ConfigError(
            f"checkpoint {path}: {MANIFEST_FILE} is unreadable ({err}). {how}"
        ) from None
    present = _state_files(path)
    for name in sorted(set(expected) | set(present)):
        if name not in present:
            raise ConfigError(f"checkpoint {path}: {name} is missing. {how}")
        if name not in expected:
            raise ConfigError(f"checkpoint {path}: {name} was not written with it. {how}")
        if sha256_file(path / name) != expected[name]:
            raise ConfigError(
                f"checkpoint {path}: {name} differs from what was written (SHA-256 mismatch: "
                f"changed or truncated). {how}"
            )


def load_training_state(accelerator: Accelerator, path: Path, scheduler) -> None:
    """Restore what :func:`save_training_state` wrote: accelerate's state (loaded with
    ``weights_only=True``: nothing is unpickled) and the scheduler's JSON state.

    Raises:
        ConfigError: the checkpoint holds pickles, or has no scheduler state (incomplete, or
            not written by ncfinetune).
    """
    verify_training_state(path)
    file = Path(path) / SCHEDULER_FILE
    pickles = sorted(p.name for p in Path(path).glob("custom_checkpoint_*"))
    if pickles:
        raise ConfigError(
            f"checkpoint {path} holds pickled objects ({', '.join(pickles)}), which ncfinetune "
            "does not write and will not unpickle (they can run code). Start a new run (a new "
            "--output_dir), or remove them if you wrote them yourself."
        )
    if not file.is_file():
        raise ConfigError(
            f"checkpoint {path} has no {SCHEDULER_FILE}: it is incomplete or was not written by "
            "ncfinetune, so the learning-rate schedule cannot be restored. Start a new run (a "
            "new --output_dir)."
        )
    accelerator.load_state(str(path))
    scheduler.load_state_dict(json.loads(file.read_text()))


def latest_training_state(root: Path) -> tuple[Path, int, list] | None:
    """The newest complete checkpoint under ``root`` as (path, epoch, history), or None."""
    found = []
    for d in root.glob("epoch_*"):
        meta = d / "history.json"
        if d.is_dir() and meta.is_file():
            try:
                info = json.loads(meta.read_text())
                found.append((d, int(info["epoch"]), info["history"]))
            except (OSError, ValueError, KeyError, TypeError) as err:
                raise ConfigError(
                    f"checkpoint {d}: {meta.name} is unreadable ({type(err).__name__}: {err}); "
                    "the checkpoint is corrupt. Delete that folder to use an earlier one (if "
                    "kept), or start a new run (a new --output_dir)."
                ) from None
    return max(found, key=lambda t: t[1]) if found else None
