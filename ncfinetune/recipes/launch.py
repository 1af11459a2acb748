"""What a global batch size means per process, read before the data loaders exist.

Precision and device are not decided here: :mod:`ncfinetune.training.device` asks accelerate.
"""

from __future__ import annotations

from ncfinetune.errors import ConfigError


def per_process_batch(
    batch_size: int, global_batch_size: int | None, num_processes: int, grad_accum: int
) -> int:
    """Images per process per forward pass: ``batch_size``, or ``global_batch_size`` (images
    per optimizer step over all processes) divided by ``num_processes x grad_accum``.

    Raises:
        ConfigError: the global batch is not a multiple of ``num_processes x grad_accum``.
    """
    if global_batch_size is None:
        return batch_size
    per_step = num_processes * grad_accum
    if global_batch_size % per_step:
        lower = global_batch_size // per_step * per_step
        near = " or ".join(str(v) for v in (lower, lower + per_step) if v > 0)
        raise ConfigError(
            f"global_batch_size {global_batch_size} is not divisible by {num_processes} "
            f"process(es) x grad_accum {grad_accum} = {per_step}. Pass a multiple of "
            f"{per_step} (e.g. {near}), or batch_size (per process) instead."
        )
    return global_batch_size // per_step
