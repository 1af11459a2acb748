"""One explicit training loop on accelerate, shared by the recipes and the benchmarks.

A model here is anything with ``forward(x) -> logits`` and ``forward_with_features(x) ->
(logits, features)`` (a :class:`~ncfinetune.tuning.TunedModel`, or the pretraining network).
"""

from __future__ import annotations

import json
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from accelerate import Accelerator
from tqdm.auto import tqdm


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


def as_memory_format(x: torch.Tensor, channels_last: bool) -> torch.Tensor:
    """``x`` in channels_last memory format when asked and 4-D (images or conv features)."""
    if channels_last and x.dim() == 4:
        return x.contiguous(memory_format=torch.channels_last)
    return x


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
    """One pass over ``loader`` with gradient accumulation; the loss stays on device until the end
    of the epoch (no host round trip per step). ``channels_last``: feed 4-D batches in that
    memory format (for a model converted with ``model.to(memory_format=torch.channels_last)``)."""
    model.train()
    total = torch.zeros(2, device=accelerator.device, dtype=torch.float64)
    bar = tqdm(loader, desc=desc, leave=False, disable=not accelerator.is_local_main_process)
    start, steps = time.perf_counter(), 0
    for x, y in bar:
        x = as_memory_format(x, channels_last)
        with accelerator.accumulate(model):
            with accelerator.autocast():
                loss = F.cross_entropy(model(x), y, label_smoothing=label_smoothing)
            accelerator.backward(loss)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
        total += torch.stack(
            [
                loss.detach().double() * len(y),
                torch.tensor(len(y), device=total.device, dtype=torch.float64),
            ]
        )
        steps += 1
        if max_steps is not None and steps >= max_steps:
            break
    seconds = time.perf_counter() - start
    total = accelerator.reduce(total, reduction="sum")
    return EpochStats(float(total[0] / total[1].clamp(min=1)), int(total[1]), seconds, steps)


@torch.no_grad()
def predict(
    accelerator: Accelerator,
    model: torch.nn.Module,
    loader,
    *,
    features: bool = False,
    channels_last: bool = False,
) -> dict[str, torch.Tensor]:
    """Predictions (and optionally classifier-input features) for every sample of ``loader``,
    gathered from all processes so that each sample appears exactly once."""
    net = accelerator.unwrap_model(model, keep_torch_compile=False)
    net.eval()
    out: dict[str, list[torch.Tensor]] = {"preds": [], "labels": []}
    if features:
        out["features"] = []
    for x, y in loader:
        with accelerator.autocast():
            logits, feats = net.forward_with_features(as_memory_format(x, channels_last))
        items = [logits.argmax(1), y] + ([feats.float()] if features else [])
        items = accelerator.gather_for_metrics(items)
        for key, value in zip(out, items, strict=True):
            out[key].append(value)  # stays on the device: one copy to the host at the end
    return {k: torch.cat(v).cpu() if v else torch.empty(0) for k, v in out.items()}


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
