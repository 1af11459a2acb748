"""The recipes' side of training on accelerate: CPU threads, mixed precision, an epoch through
the shared loop of :mod:`ncfinetune.training`, prediction gathered over processes, and atomic
checkpoints for resume.

A model here is anything with ``forward(x) -> logits`` and ``forward_with_features(x) ->
(logits, features)`` (a :class:`~ncfinetune.tuning.TunedModel`, or the pretraining network).
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
from accelerate import Accelerator

from ncfinetune.training import fit_batches, predict_batches


def set_cpu_threads(accelerator: Accelerator, threads: int | None = None) -> int:
    """Set torch's intra-op threads for a run on CPU and return the number used.

    ``accelerate launch`` without ``--cpu`` exports ``OMP_NUM_THREADS=1`` unless the user set it,
    so a plain ``accelerate launch recipes/finetune.py`` on a CPU machine would train on one core
    (measured here: ViT-Tiny pretraining at 94 img/s with 1 thread, 160 img/s with 2). With
    ``threads=None`` a CPU run uses the cores this process may run on divided by the processes
    on this machine; an explicit number wins. On accelerators torch's setting is left alone.
    """
    if accelerator.device.type != "cpu":
        return torch.get_num_threads()
    if threads is None:
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
        local = int(os.environ.get("LOCAL_WORLD_SIZE", accelerator.num_processes))
        threads = max(1, (cores or 1) // max(1, local))
    if threads < 1:
        raise ValueError(f"cpu_threads must be >= 1 or null (auto), got {threads}")
    torch.set_num_threads(threads)
    return threads


MIXED_PRECISION = ("auto", "no", "fp16", "bf16")


def native_bf16(device_type: str) -> bool:
    """Whether ``device_type`` (cpu or cuda) computes in bfloat16 natively: CUDA devices that
    support it, CPUs with the AVX-512 BF16 or AMX instructions (oneDNN's check)."""
    if device_type == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    if device_type == "cpu":
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    return False


def launch_device_type() -> str:
    """The device type an Accelerator made now would train on: ``cpu`` when accelerate is told
    to (``ACCELERATE_USE_CPU``) or no CUDA device is visible, else ``cuda``. (Building accelerate's
    ``PartialState`` early to ask would fix its process-group set-up before the Accelerator.)"""
    if os.environ.get("ACCELERATE_USE_CPU", "").lower() in ("1", "true", "yes"):
        return "cpu"
    return "cuda" if torch.cuda.is_available() else "cpu"


def resolve_mixed_precision(setting: str, device_type: str) -> str:
    """``auto`` -> ``bf16`` where :func:`native_bf16`, else ``no``; other settings unchanged.

    Measured on this project's 2-core AVX-512 BF16 CPU (``benchmarks/results/precision.md``):
    bf16 autocast trains resnet18 and ViT-Small faster than fp32 at 224 px; see the README.
    """
    if setting not in MIXED_PRECISION:
        raise ValueError(
            f"mixed_precision {setting!r} is not one of {', '.join(MIXED_PRECISION)}; "
            "'auto' picks bf16 where the device has native bf16 and 'no' elsewhere."
        )
    if setting != "auto":
        return setting
    return "bf16" if native_bf16(device_type) else "no"


def is_conv_net(model: torch.nn.Module) -> bool:
    """More than one 2-D convolution (a ViT has one: its patch embedding)."""
    return sum(isinstance(m, torch.nn.Conv2d) for m in model.modules()) > 1


@dataclass
class EpochStats:
    """What one training epoch did (reduced over processes)."""

    loss: float
    images: int
    seconds: float
    steps: int

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
    label_smoothing: float = 0.0,
    max_steps: int | None = None,
    desc: str = "train",
    channels_last: bool = False,
) -> EpochStats:
    """One pass over ``loader`` through the shared loop (:func:`ncfinetune.training.fit_batches`)
    with the Accelerator's gradient accumulation and autocast; the mean loss is reduced over
    processes. ``channels_last``: feed 4-D batches in that memory format."""
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
    )
    images = torch.tensor(float(fit.images), dtype=torch.float64, device=fit.loss_sum.device)
    total = torch.stack([fit.loss_sum, images]).to(accelerator.device)
    total = accelerator.reduce(total, reduction="sum")
    return EpochStats(
        float(total[0] / total[1].clamp(min=1)), int(total[1]), fit.seconds, fit.steps
    )


def predict(
    accelerator: Accelerator,
    model: torch.nn.Module,
    loader,
    *,
    features: bool = False,
    channels_last: bool = False,
) -> dict[str, torch.Tensor]:
    """Predictions (and optionally classifier-input features) for every sample of ``loader``,
    gathered from all processes so that each sample appears exactly once (through
    :func:`ncfinetune.training.predict_batches`)."""
    return predict_batches(
        model, loader, accelerator=accelerator, features=features, channels_last=channels_last
    )


# -- checkpoints for resume (atomic: write to a temporary folder, then rename) -------------------
def save_training_state(accelerator: Accelerator, root: Path, epoch: int, history: list) -> Path:
    """Save model/optimizer/scheduler/RNG state after ``epoch`` (1-based) under ``root``."""
    root.mkdir(parents=True, exist_ok=True)
    final, tmp = root / f"epoch_{epoch}", root / f".epoch_{epoch}.tmp"
    if accelerator.is_main_process and tmp.exists():
        shutil.rmtree(tmp)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp), safe_serialization=True)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        (tmp / "history.json").write_text(json.dumps({"epoch": epoch, "history": history}))
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        for old in root.glob("epoch_*"):  # keep only the newest complete checkpoint
            if old != final and old.name.split("_")[-1].isdigit():
                shutil.rmtree(old)
    accelerator.wait_for_everyone()
    return final


def latest_training_state(root: Path) -> tuple[Path, int, list] | None:
    """The newest complete checkpoint under ``root`` as (path, epoch, history), or None."""
    found = []
    for d in root.glob("epoch_*"):
        meta = d / "history.json"
        if d.is_dir() and meta.is_file():
            info = json.loads(meta.read_text())
            found.append((d, int(info["epoch"]), info["history"]))
    return max(found, key=lambda t: t[1]) if found else None
