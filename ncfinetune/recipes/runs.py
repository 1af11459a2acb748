"""A training recipe's output folder: what a run left there, and the rules for starting or
resuming one.

* A folder that holds a run (a checkpoint under ``checkpoints/`` or ``metrics.json``) is never
  started over silently: without ``--resume`` that is an error saying how to go on (a new
  ``--output_dir``, ``--resume``, or deleting the folder).
* A run holds an exclusive lock on its folder while it runs (``.lock``: pid, host, start time):
  a second run on the same folder is refused naming the holder; a lock left by a process that
  is gone is taken over with a warning (:func:`run_lock`).
* A run whose every epoch is checkpointed but whose outputs (``tuned/``, ``metrics.json``) were
  not written finishes them on ``--resume``.
* ``--resume`` continues the newest checkpoint. The saved ``config.yaml`` is compared with the
  current config: a different value of any key that changes training is an error listing every
  difference (``key: saved -> now``). Only the keys named in ``resume_override`` (``epochs``,
  ``lr``) may change; the schedule is then rebuilt for the new values at the step reached
  (:func:`retarget_schedule`) and the change is recorded (``resume_overrides.json``, copied into
  ``metrics.json``).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import socket
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ncfinetune.errors import ConfigError
from ncfinetune.files import pid_alive, write_json
from ncfinetune.messages import warn_once
from ncfinetune.recipes.config import (
    config_differences,
    flat_config,
    flat_values,
    leaves,
    read_config_file,
    show_value,
)
from ncfinetune.recipes.engine import latest_training_state, verify_training_state
from ncfinetune.recipes.sections import RESUME_OVERRIDABLE

CONFIG_FILE = "config.yaml"
METRICS_FILE = "metrics.json"
CHECKPOINTS = "checkpoints"
OVERRIDES_FILE = "resume_overrides.json"
LOCK_FILE = ".lock"
RUN_CONFIG = "run_config.yaml"  # in each checkpoint: the config it was trained with


@contextlib.contextmanager
def run_lock(out: Path, take: bool = True) -> Iterator[None]:
    """Hold the exclusive lock of the run folder ``out`` for the block (``take=False``: a
    process other than the main one, which holds it for all).

    Raises:
        ConfigError: another live run holds the lock (its pid, host and start time named).
    """
    if not take:
        yield
        return
    path = Path(out) / LOCK_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    me = {"pid": os.getpid(), "host": socket.gethostname(),
          "started": time.strftime("%Y-%m-%d %H:%M:%S %z")}  # fmt: skip
    for _ in range(3):
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            holder = _lock_holder(path)
            if holder is not None and _alive(holder):
                raise ConfigError(
                    f"output_dir {out} is in use by another run (pid {holder['pid']} on "
                    f"{holder['host']}, started {holder['started']}); two runs in one folder "
                    "would overwrite each other's files. Wait for it, or pass another "
                    f"--output_dir (if that process is gone, delete {path})."
                ) from None
            warn_once(
                f"taking over the lock of {out}: its holder ({holder or 'unreadable lock'}) is "
                "no longer running (a run that was killed)."
            )
            path.unlink(missing_ok=True)
            continue
        with os.fdopen(fd, "w") as f:
            json.dump(me, f)
        break
    else:
        raise ConfigError(f"could not take the lock {path}: another run keeps taking it.")
    try:
        yield
    finally:
        path.unlink(missing_ok=True)


def _lock_holder(path: Path) -> dict | None:
    try:
        holder = json.loads(path.read_text())
        return holder if {"pid", "host", "started"} <= set(holder) else None
    except (OSError, ValueError):
        return None  # a half-written or foreign lock file: treated as stale


def _alive(holder: dict) -> bool:
    """Whether the lock's holder may still run (another host cannot be checked: assume so)."""
    return holder["host"] != socket.gethostname() or pid_alive(int(holder["pid"]))


@dataclass
class Resume:
    """What ``--resume`` continues from.

    Attributes:
        checkpoint: the newest complete checkpoint folder.
        epoch: epochs it completed.
        history: the per-epoch rows recorded up to it.
        changed: key -> (saved, now) for each overridden key whose value changed.
    """

    checkpoint: Path
    epoch: int
    history: list
    changed: dict[str, tuple[Any, Any]]


def saved_config(out: Path, cls: type) -> dict[str, Any] | None:
    """The ``config.yaml`` a run saved in ``out`` as ``{key: value}`` (sections flattened) of
    config class ``cls``, or None."""
    path = Path(out) / CONFIG_FILE
    return flat_values(cls, read_config_file(path), []) if path.is_file() else None


def resume_base(out: Path, cls: type, per_invocation: Iterable[str]) -> dict[str, Any] | None:
    """The saved config of the run in ``out`` without the keys that belong to one invocation
    (``resume``, ``stop_after``, ...) and those config class ``cls`` no longer has (they cannot
    be compared): the values ``--resume`` starts from, or None."""
    saved = saved_config(out, cls)
    if saved is None:
        return None
    keep = set(leaves(cls)) - set(per_invocation)
    return {k: v for k, v in saved.items() if k in keep}


def check_fresh_start(out: Path) -> None:
    """Raise when ``out`` already holds a run (finished, or with a checkpoint) and the recipe
    was not asked to resume it."""
    out = Path(out)
    found = latest_training_state(out / CHECKPOINTS)
    if (out / METRICS_FILE).is_file():
        state = "a finished run (metrics.json)"
        go_on = (
            f"--resume --resume_override epochs --epochs N to train it further (N > "
            f"{found[1] if found else 'its epochs'})"
        )
    elif found is not None:
        state = f"an unfinished run (checkpoint after epoch {found[1]})"
        go_on = "--resume to continue it"
    else:
        return
    raise ConfigError(
        f"output_dir {out} already holds {state}; a run never overwrites another. Pass a new "
        f"--output_dir, or {go_on}, or delete {out} to start it again."
    )


def check_resume(
    out: Path,
    config: Any,
    *,
    ignore: Iterable[str],
    override: Sequence[str] = (),
) -> Resume:
    """Check that ``config`` may continue the run in ``out``; return what to resume from.

    Args:
        out: the run's output folder.
        config: the current config (a dataclass with ``epochs`` and ``lr``).
        ignore: keys that do not change what is trained (output, logging, speed settings).
        override: keys of :data:`RESUME_OVERRIDABLE` allowed to change.

    Raises:
        ConfigError: no checkpoint (naming where it looked), no saved config, a finished run
            with nothing left to train, or every difference in keys that change training.
    """
    out = Path(out)
    root = out / CHECKPOINTS
    found = latest_training_state(root)
    if found is None:
        why = (
            "the run there stopped before finishing its first epoch"
            if (out / CONFIG_FILE).is_file()
            else "no run was started there"
        )
        raise ConfigError(
            f"--resume found no checkpoint to continue: looked for {root}/epoch_N folders "
            f"(written after each epoch) and found none; {why}. Check --output_dir, or start "
            "the run without --resume."
        )
    path, epoch, history = found
    verify_training_state(path)  # before anything loads or trains
    saved = saved_config(out, type(config))
    if saved is None:
        raise ConfigError(
            f"--resume: {out / CONFIG_FILE} is missing, so the checkpoint in {path} cannot be "
            "checked against the current config. Restore the file, or start a new run."
        )
    check_unedited(out, path, saved, type(config), ignore=ignore)
    now = flat_config(config)
    allowed = {k for k in override if k in RESUME_OVERRIDABLE}
    check_same_training(out, saved, config, ignore=ignore, allowed=allowed)
    if epoch == now["epochs"] and not (out / METRICS_FILE).is_file():
        # every epoch checkpointed, the outputs never written (killed, or a full disk, between
        # the last checkpoint and tuned/ + metrics.json): finishing them is what is left
        return Resume(path, epoch, history, {})
    if epoch >= now["epochs"]:
        more = (
            f"it finished all {epoch} epochs"
            if epoch == now["epochs"]
            else f"it already trained {epoch} epochs, more than --epochs {now['epochs']}"
        )
        raise ConfigError(
            f"--resume: nothing to train in {out}: {more}. To train further pass --resume "
            f"--resume_override epochs --epochs N with N > {epoch}, or start a new run with a "
            "new --output_dir."
        )
    changed = {}
    for key in sorted(allowed - {"launch"}):  # launch: check_launch, once processes are known
        before = saved.get(key)
        after = now[key]
        if before != after:
            changed[key] = (before, after)
    return Resume(path, epoch, history, changed)


def check_unedited(
    out: Path, checkpoint: Path, saved: dict[str, Any], cls: type, *, ignore: Iterable[str]
) -> None:
    """Raise naming every key that changes training whose value in ``config.yaml`` differs from
    the config saved in the ``checkpoint`` (``run_config.yaml``): the file was edited after the
    run started, and the checkpoint was trained with other values."""
    path = Path(checkpoint) / RUN_CONFIG
    if not path.is_file():  # a run started by an older version
        return
    written = flat_values(cls, read_config_file(path), [])
    skip = set(ignore)
    edits = [
        f"{k}: {show_value(written.get(k))} -> {show_value(v)}"
        for k, v in sorted(saved.items())
        if k not in skip and written.get(k) != v
    ]
    if edits:
        raise ConfigError(
            f"--resume: {Path(out) / CONFIG_FILE} was edited after the run started; its "
            f"checkpoints were trained with other values of {len(edits)} key(s):\n  - "
            + "\n  - ".join(edits)
            + f"\nRestore the file (the checkpoint holds the config it was trained with: {path}); to change the epochs or "
            "the lr, pass --resume_override epochs,lr with the new values; anything else needs "
            "a new run (a new --output_dir)."
        )


LAUNCH_FILE = "launch.json"  # in each checkpoint: the processes and global batch it trained with


def checkpoint_files(config_text: str, num_processes: int, global_batch: int) -> dict[str, str]:
    """What each training checkpoint records besides the state: the config it was trained with
    and how it was launched (checked on ``--resume``)."""
    launch = {"num_processes": num_processes, "global_batch_size": global_batch}
    return {RUN_CONFIG: config_text, LAUNCH_FILE: json.dumps(launch)}


def check_launch(
    checkpoint: Path, num_processes: int, global_batch: int, *, allow: bool = False
) -> dict | None:
    """Raise when a resumed run is launched with another number of processes or global batch
    than ``checkpoint`` was trained with: its schedule counts optimizer steps of that batch.
    With ``allow`` (``--resume_override launch``) return the change instead, as
    ``{"num_processes": (saved, now), "global_batch_size": (saved, now)}`` (None: no change)."""
    out = Path(checkpoint).parents[1]
    path = Path(checkpoint) / LAUNCH_FILE
    if not path.is_file():  # a run started by an older version
        return
    try:
        was = json.loads(path.read_text())
        before = (int(was["num_processes"]), int(was["global_batch_size"]))
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise ConfigError(
            f"--resume: {path} is not readable ({type(err).__name__}: {err}); it records the "
            "processes and batch the run trained with. Restore it, or start a new run."
        ) from None
    if before == (num_processes, global_batch):
        return None
    if allow:
        return {
            "num_processes": (before[0], num_processes),
            "global_batch_size": (before[1], global_batch),
        }
    raise ConfigError(
        f"--resume: the run in {out} trained with {before[0]} process(es) and a global batch "
        f"of {before[1]}; this launch has {num_processes} process(es) and a global batch of "
        f"{global_batch}. The schedule counts optimizer steps of that batch, so it would no "
        f"longer match. Launch it again with --num_processes {before[0]} (and the same "
        "batch_size / global_batch_size), add --resume_override launch to continue with this "
        "launch (the schedule is rebuilt for the steps left), or start a new run."
    )


def check_same_training(
    out: Path, saved: dict[str, Any], config: Any, *, ignore: Iterable[str], allowed: set[str]
) -> None:
    """Raise listing every key that changes training whose value differs from the ``saved``
    config (except the ``allowed`` overrides), with how to go on."""
    diffs = config_differences(saved, config, ignore=ignore)
    blocking = [d for d in diffs if d.split(":", 1)[0] not in allowed]
    if flat_config(config)["lr"] == "auto" and saved.get("lr") != "auto":
        blocking.append(
            f"lr: {show_value(saved.get('lr'))} -> auto (lr auto is chosen only when a run "
            "starts; pass a number)"
        )
    if not blocking:
        return
    hint = ""
    if any(d.split(":", 1)[0] in RESUME_OVERRIDABLE for d in blocking):
        hint = (
            " To change only the epoch count or the lr, add --resume_override "
            + ",".join(
                k for k in RESUME_OVERRIDABLE if any(d.startswith(k + ":") for d in blocking)
            )
            + "."
        )
    raise ConfigError(
        f"--resume: the config differs from the run's saved {out / CONFIG_FILE} in "
        f"{len(blocking)} key(s) that change training:\n  - "
        + "\n  - ".join(blocking)
        + f"\nResume with the saved values (drop these options: --resume alone reuses the "
        f"saved config), or start a new run with a new --output_dir.{hint}"
    )


def record_override(out: Path, resume: Resume) -> list[dict]:
    """Append this resume's overridden keys to ``out/resume_overrides.json``; return the list
    (every override of the run so far, for ``metrics.json``)."""
    path = Path(out) / OVERRIDES_FILE
    done = json.loads(path.read_text()) if path.is_file() else []
    if resume.changed:
        done.append(
            {
                "at_epoch": resume.epoch,
                **{k: {"saved": a, "now": b} for k, (a, b) in resume.changed.items()},
            }
        )
        write_json(path, done)
    return done


def retarget_schedule(scheduler: Any, fresh_state: dict) -> None:
    """Make a resumed cosine schedule the one the current config asks for.

    ``fresh_state`` is the state of the schedule built from the current config (new length
    ``T_max`` and base lr), taken before the checkpoint was loaded. The loaded schedule keeps
    its step count and the optimizer its moments; length and base lr become the new ones, and
    each parameter group's lr is set to the new schedule's value at the step reached, so the
    recorded lr and the lr trained with agree. (The lr therefore moves at the resume: e.g. a
    finished 10-epoch run extended to 20 continues from the middle of the 20-epoch cosine.)

    Args:
        scheduler: the (accelerate-prepared or plain) ``CosineAnnealingLR``.
        fresh_state: ``scheduler.state_dict()`` before ``load_state``.

    Raises:
        ConfigError: the schedule is not a cosine schedule (only those are retargeted).
    """
    inner = getattr(scheduler, "scheduler", scheduler)
    needed = ("T_max", "eta_min", "base_lrs", "last_epoch")
    if not all(k in fresh_state for k in needed):
        raise ConfigError(
            f"resume_override needs the cosine schedule; this run's schedule is "
            f"{type(inner).__name__}. Resume without --resume_override."
        )
    state = inner.state_dict()
    state.update(T_max=fresh_state["T_max"], eta_min=fresh_state["eta_min"])
    state["base_lrs"] = list(fresh_state["base_lrs"])
    inner.load_state_dict(state)
    step = inner.last_epoch
    lrs = [
        inner.eta_min
        + (base - inner.eta_min)
        * (1 + math.cos(math.pi * min(step, inner.T_max) / inner.T_max))
        / 2
        for base in inner.base_lrs
    ]
    for group, base, lr in zip(inner.optimizer.param_groups, inner.base_lrs, lrs, strict=True):
        group["initial_lr"] = base
        group["lr"] = lr
    inner._last_lr = lrs
