"""The one training loop and the one evaluation loop (``loop``), and device and precision
decided in one place (``device``). Library code: nothing here knows about run folders or
command lines (that is :mod:`ncfinetune.recipes`).
"""

from ncfinetune.training.device import (
    LOOP_PRECISIONS,
    PRECISIONS,
    SETTINGS,
    accelerate_precision,
    choose_precision,
    cpu_threads,
    default_device,
    is_conv_net,
    launch_device_type,
    loop_precision,
    model_device,
    native_bf16,
    precision_problem,
    resolve_precision,
    use_channels_last,
)
from ncfinetune.training.loop import (
    OPTIMIZERS,
    FitStats,
    as_memory_format,
    autocast_factory,
    build_cosine_schedule,
    build_optimizer,
    diverged,
    evaluate_rows,
    fit_batches,
    predict_batches,
    train_steps,
)

__all__ = [
    "LOOP_PRECISIONS",
    "OPTIMIZERS",
    "PRECISIONS",
    "SETTINGS",
    "FitStats",
    "accelerate_precision",
    "as_memory_format",
    "autocast_factory",
    "build_cosine_schedule",
    "build_optimizer",
    "choose_precision",
    "cpu_threads",
    "default_device",
    "diverged",
    "evaluate_rows",
    "fit_batches",
    "is_conv_net",
    "launch_device_type",
    "loop_precision",
    "model_device",
    "native_bf16",
    "precision_problem",
    "predict_batches",
    "resolve_precision",
    "train_steps",
    "use_channels_last",
]
