"""The one training loop and the one evaluation loop (``loop``), and device and precision
decided in one place (``device``). Library code: nothing here knows about run folders or
command lines (that is :mod:`ncfinetune.recipes`).
"""

from ncfinetune.training.loop import (
    OPTIMIZERS,
    PRECISIONS,
    FitStats,
    as_memory_format,
    autocast_factory,
    build_cosine_schedule,
    build_optimizer,
    diverged,
    evaluate_rows,
    fit_batches,
    model_device,
    predict_batches,
    train_steps,
)

__all__ = [
    "OPTIMIZERS",
    "PRECISIONS",
    "FitStats",
    "as_memory_format",
    "autocast_factory",
    "build_cosine_schedule",
    "build_optimizer",
    "diverged",
    "evaluate_rows",
    "fit_batches",
    "model_device",
    "predict_batches",
    "train_steps",
]
