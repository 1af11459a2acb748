"""Device and precision, decided in one place for the recipes, block selection and the
benchmarks.

Precision names are accelerate's: ``no`` (fp32), ``fp16``, ``bf16``; a setting may also be
``auto`` (bf16 where the device computes it natively, else fp32) or None (accelerate's own
choice). accelerate is asked, never second-guessed: with no setting a run takes what the
launcher was told (``accelerate launch --mixed_precision``), the ``accelerate config`` file the
launcher read, or ``ACCELERATE_MIXED_PRECISION``; an ``Accelerator(mixed_precision=None)`` reads
exactly that, and :func:`accelerate_precision` reads it the same way where no Accelerator is
built (block selection run alone). With none of them set that is ``no``: fp32.
"""

from __future__ import annotations

import os

import torch
from torch import nn

from ncfinetune.errors import ConfigError

PRECISIONS = ("no", "fp16", "bf16")
"""The precisions a run can train in (accelerate's names; ``no`` is fp32)."""
SETTINGS = ("auto", *PRECISIONS)
"""What a ``mixed_precision`` key may say besides null (accelerate's choice)."""
LOOP_PRECISIONS = ("no", "bf16")
"""What the library's own loops run without an Accelerator (fp16 needs a loss scaler)."""


def native_bf16(device_type: str) -> bool:
    """Whether ``device_type`` (cpu or cuda) computes in bfloat16 natively: CUDA devices that
    support it, CPUs with the AVX-512 BF16 or AMX instructions (oneDNN's check)."""
    if device_type == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    if device_type == "cpu":
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    return False


def precision_problem(
    setting: str | None, allowed: tuple[str, ...] = SETTINGS, key: str = "mixed_precision"
) -> str | None:
    """The config problem of a precision ``setting`` named ``key`` (None: valid; null is)."""
    if setting is None or setting in allowed:
        return None
    return (
        f"{key} {setting!r} is not one of {', '.join(allowed)} or null (accelerate's "
        "choice: the launcher's --mixed_precision, its config file, or ACCELERATE_MIXED_PRECISION)"
    )


def resolve_precision(
    setting: str | None,
    device: str | torch.device,
    allowed: tuple[str, ...] = SETTINGS,
    key: str = "mixed_precision",
) -> str:
    """The precision ``setting`` means on ``device``: None -> accelerate's choice
    (:func:`accelerate_precision`), ``auto`` -> ``bf16`` where :func:`native_bf16` else ``no``,
    any other name unchanged.

    Raises:
        ConfigError: a setting not in ``allowed`` (the message lists them).
    """
    problem = precision_problem(setting, allowed, key)
    if problem:
        raise ConfigError(problem + ".")
    if setting is None:
        setting = accelerate_precision()
    if setting == "auto":
        return "bf16" if native_bf16(torch.device(device).type) else "no"
    return setting


def accelerate_precision() -> str:
    """accelerate's own choice of precision in this process, as an ``Accelerator`` built now
    with ``mixed_precision=None`` would take it: ``ACCELERATE_MIXED_PRECISION`` (which
    ``accelerate launch`` exports from its flag or config file), else ``no``."""
    from accelerate.utils import parse_choice_from_env

    return str(parse_choice_from_env("ACCELERATE_MIXED_PRECISION", "no")).lower()


def choose_precision(setting: str | None, device_type: str) -> tuple[str | None, str]:
    """What a recipe passes to ``Accelerator(mixed_precision=...)`` and where it came from:
    ``(None, "accelerate")`` without a setting (accelerate decides), else the setting resolved
    for ``device_type`` and ``"recipe"``."""
    if setting is None:
        return None, "accelerate"
    return resolve_precision(setting, device_type), "recipe"


def loop_precision(precision: str) -> str:
    """The precision the library's loops run for a run that trains in ``precision``: the same,
    except fp16, which runs in fp32 there (no loss scaler: short probes stay exact)."""
    return precision if precision in LOOP_PRECISIONS else "no"


def launch_device_type() -> str:
    """The device type an Accelerator made now would train on: ``cpu`` when accelerate is told
    to (``ACCELERATE_USE_CPU``) or no CUDA device is visible, else ``cuda``. (Building
    accelerate's ``PartialState`` early to ask would fix its process-group set-up before the
    Accelerator.)"""
    if os.environ.get("ACCELERATE_USE_CPU", "").lower() in ("1", "true", "yes"):
        return "cpu"
    return "cuda" if torch.cuda.is_available() else "cpu"


def default_device(device: str | torch.device | None = None) -> torch.device:
    """``device``, or CUDA when available, else the CPU (inference and benchmarks)."""
    if device is not None:
        return torch.device(device)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def model_device(model: nn.Module) -> torch.device:
    """The device of the model's first parameter (CPU for a model without parameters)."""
    return next((p.device for p in model.parameters()), torch.device("cpu"))


def is_conv_net(model: nn.Module) -> bool:
    """More than one 2-D convolution (a ViT has one: its patch embedding)."""
    return sum(isinstance(m, nn.Conv2d) for m in model.modules()) > 1


def use_channels_last(model: nn.Module, setting: bool | None = None) -> bool:
    """Whether to run ``model`` in channels_last memory format: ``setting`` when given, else
    on for conv nets (measured faster here, ``benchmarks/results/precision.md``)."""
    return is_conv_net(model) if setting is None else bool(setting)


def cpu_threads(device_type: str, local_processes: int, threads: int | None = None) -> int:
    """Set torch's intra-op threads for a run on ``device_type`` and return the number used.

    ``accelerate launch`` without ``--cpu`` exports ``OMP_NUM_THREADS=1`` unless the user set
    it, so a plain ``accelerate launch`` on a CPU machine would train on one core (measured
    here: ViT-Tiny pretraining at 94 img/s with 1 thread, 160 img/s with 2). With
    ``threads=None`` a CPU run uses the cores this process may run on divided by the processes
    on this machine (``LOCAL_WORLD_SIZE`` when set, else ``local_processes``); an explicit
    number wins. On accelerators torch's setting is left alone.

    Raises:
        ConfigError: ``threads`` < 1.
    """
    if device_type != "cpu":
        return torch.get_num_threads()
    if threads is None:
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
        local = int(os.environ.get("LOCAL_WORLD_SIZE", local_processes))
        threads = max(1, (cores or 1) // max(1, local))
    if threads < 1:
        raise ConfigError(f"cpu_threads must be >= 1 or null (auto), got {threads}")
    torch.set_num_threads(threads)
    return threads
