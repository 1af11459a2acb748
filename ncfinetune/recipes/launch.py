"""What the launcher decided, read before an Accelerator exists: whether ``accelerate launch``
was *given* a mixed precision, and the per-process batch that a global batch size means.

``accelerate launch`` exports ``ACCELERATE_MIXED_PRECISION`` whether or not it was told one
(without ``--mixed_precision`` and without a config file it exports ``no``), so the value alone
cannot tell "the user chose fp32" from "nobody chose". The launcher's own command line can: it is
the parent (one process) or the torchrun agent's process (several) of every worker. It is parsed
with accelerate's own argument parser, and a setting in the accelerate config file the launcher
read (``--config_file``, or the default file written by ``accelerate config``) counts as given,
exactly as the launcher itself decides.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence

from ncfinetune.errors import ConfigError
from ncfinetune.recipes.engine import resolve_mixed_precision

_LAUNCH_MODULES = ("accelerate.commands.launch",)
_CLI_MODULES = ("accelerate.commands.accelerate_cli",)


def launch_arguments(cmdline: Sequence[str]) -> list[str] | None:
    """The arguments after ``launch`` when ``cmdline`` is an ``accelerate launch`` command
    (``accelerate launch ...``, ``accelerate-launch ...``, ``python -m
    accelerate.commands.launch ...``), else None."""
    for i, part in enumerate(cmdline):
        name = os.path.basename(part)
        if name == "accelerate" and cmdline[i + 1 : i + 2] == ["launch"]:
            return list(cmdline[i + 2 :])
        if name == "accelerate-launch":
            return list(cmdline[i + 1 :])
        if part == "-m" and i + 1 < len(cmdline):
            if cmdline[i + 1] in _LAUNCH_MODULES:
                return list(cmdline[i + 2 :])
            if cmdline[i + 1] in _CLI_MODULES and cmdline[i + 2 : i + 3] == ["launch"]:
                return list(cmdline[i + 3 :])
    return None


def given_mixed_precision(launch_args: Sequence[str]) -> str | None:
    """The mixed precision an ``accelerate launch`` with these arguments was explicitly given:
    its ``--mixed_precision`` option, else the ``mixed_precision`` of the config file it read;
    None when it fell back to its default."""
    from accelerate.commands.config import default_config_file
    from accelerate.commands.config.config_args import load_config_from_file
    from accelerate.commands.launch import launch_command_parser

    try:
        args, _ = launch_command_parser().parse_known_args(list(launch_args))
    except SystemExit:  # not parseable by this accelerate: look for the option itself
        for i, arg in enumerate(launch_args):
            if arg.startswith("--mixed_precision=") or arg.startswith("--mixed-precision="):
                return arg.split("=", 1)[1]
            if arg in ("--mixed_precision", "--mixed-precision") and i + 1 < len(launch_args):
                return launch_args[i + 1]
        return None
    if args.mixed_precision:
        return str(args.mixed_precision)
    # the launcher reads a config file when given one, or its default file unless --cpu
    if args.config_file is None and (args.cpu or not os.path.isfile(default_config_file)):
        return None
    try:
        config = load_config_from_file(args.config_file)
    except Exception:  # a file the launcher itself could not have read
        return None
    value = getattr(config, "mixed_precision", None)
    return None if value is None else str(value)


def _launcher_cmdline() -> list[str] | None:
    """The launch arguments of the ``accelerate launch`` process this one descends from."""
    try:
        import psutil  # an accelerate dependency
    except ImportError:
        return None
    try:
        parents = psutil.Process().parents()
    except psutil.Error:
        return None
    for process in parents:
        try:
            found = launch_arguments(process.cmdline())
        except psutil.Error:
            continue
        if found is not None:
            return found
    return None


def launcher_mixed_precision(env: Mapping[str, str] | None = None) -> str | None:
    """The mixed precision the launcher was *given*, or None when it was given none.

    None when this process was not started by ``accelerate launch`` (no
    ``ACCELERATE_MIXED_PRECISION``) or the launcher used its default. A value exported by
    something other than ``accelerate launch`` (the user, a job script) counts as given.
    """
    env = os.environ if env is None else env
    value = env.get("ACCELERATE_MIXED_PRECISION")
    if not value:
        return None
    launch_args = _launcher_cmdline()
    if launch_args is None:
        return value
    return value if given_mixed_precision(launch_args) is not None else None


def choose_mixed_precision(
    setting: str, device_type: str, launcher: str | None
) -> tuple[str, str, str | None]:
    """The precision a recipe trains in, where it came from, and a note to print (or None).

    The recipe's own explicit setting (``no``, ``fp16``, ``bf16``; after the script name or in
    its YAML) wins; with ``auto`` an explicit launcher choice (``accelerate launch
    --mixed_precision X`` or its config file) wins, and only when the launcher was given none
    does ``auto`` pick bf16 where the device computes it natively, else fp32.

    Returns:
        (precision, source, note): source is ``recipe``, ``launcher`` or ``auto``.
    """
    if setting != "auto":
        precision = resolve_mixed_precision(setting, device_type)
        note = None
        if launcher is not None and launcher != precision:
            note = (
                f"mixed precision: {precision} (the recipe's mixed_precision) instead of the "
                f"launcher's {launcher!r}."
            )
        return precision, "recipe", note
    if launcher is not None:
        return launcher, "launcher", None
    return resolve_mixed_precision("auto", device_type), "auto", None


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
