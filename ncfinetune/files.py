"""Writing files so that a reader never sees half of one: the one atomic write, and strict JSON.

Every file ncfinetune writes (checkpoints, metrics, reports, figures, predictions) goes through
:func:`atomic_write`: the content is written to a hidden temporary file in the same folder and
moved into place with ``os.replace``, so the path holds either the old file or the whole new one.
The temporary file is created by the writer itself, so it gets the usual permissions (the
umask), not ``mkstemp``'s 0600.

Folders that must change as a whole (a tuned checkpoint, a training state) are written to a
hidden staging folder beside the target, flushed to disk, and moved into place by
:func:`install_folder`: a reader sees the old folder or the new one, never a mix.
"""

from __future__ import annotations

import ctypes
import errno
import hashlib
import json
import math
import os
import shutil
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any


def atomic_write(path: str | os.PathLike, write: Callable[[str], Any]) -> Path:
    """Run ``write(tmp)`` on a temporary path beside ``path`` (creating the folder), then
    rename it to ``path``; on any error the temporary file is removed. Returns the path."""
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        write(str(tmp))
        os.chmod(tmp, file_mode())  # whatever mode the writer chose: the umask's
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    return out


def staging_folder(target: str | os.PathLike) -> Path:
    """A new, empty hidden folder beside ``target`` to write its next version into
    (``.NAME.staging-PID-RANDOM``); hand it to :func:`install_folder` when complete."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = target.with_name(f".{target.name}.staging-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    staging.mkdir()
    return staging


def leftovers(target: str | os.PathLike) -> list[Path]:
    """Staging folders and set-aside old versions of ``target`` left by interrupted writes
    (their writer's process is gone; a live writer's are in use)."""
    target = Path(target)
    found = []
    for kind in ("staging", "old"):
        for path in target.parent.glob(f".{target.name}.{kind}-*"):
            pid = path.name.rsplit("-", 2)[-2]
            if not (pid.isdigit() and pid_alive(int(pid))):
                found.append(path)
    return found


def pid_alive(pid: int) -> bool:
    """Whether process ``pid`` (on this machine) is running."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def file_mode() -> int:
    """The permissions a new file gets from the user's umask (``0o666 & ~umask``)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return 0o666 & ~mask


def fsync_tree(folder: str | os.PathLike) -> None:
    """Give every file in ``folder`` (recursively) the umask's permissions (some writers, e.g.
    safetensors, create 0600 files), then flush the files and folders to disk."""
    mode = file_mode()
    for root, _, files in os.walk(folder):
        for name in files:
            os.chmod(os.path.join(root, name), mode)
            fd = os.open(os.path.join(root, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        _fsync_dir(root)


def _fsync_dir(folder: str | os.PathLike) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # a platform that cannot open folders: nothing to flush
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


_RENAME_EXCHANGE = 2  # linux/fs.h


def _exchange(a: Path, b: Path) -> bool:
    """Atomically swap two paths (Linux ``renameat2(RENAME_EXCHANGE)``); False where the
    platform or file system cannot."""
    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (AttributeError, OSError):
        return False
    at_fdcwd = -100
    done = renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), _RENAME_EXCHANGE)
    if done == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.EXDEV):
        return False
    raise OSError(err, os.strerror(err), str(b))


def install_folder(staging: str | os.PathLike, target: str | os.PathLike) -> Path:
    """Move the complete folder ``staging`` to ``target``, replacing what is there.

    The staging folder is flushed to disk first. A new target is one rename. An existing one is
    swapped with the staging folder in one atomic step where the platform can (Linux
    ``renameat2``), so every reader sees the old or the new folder; elsewhere the old folder is
    first renamed aside (``.NAME.old-PID-RANDOM``), then the new one moved in: a reader in
    between finds the old version there (:func:`set_aside`). The old version is removed
    afterwards, and so are leftovers of earlier interrupted writes (:func:`leftovers`).
    """
    staging, target = Path(staging), Path(target)
    fsync_tree(staging)
    if not target.exists():
        os.rename(staging, target)
    elif _exchange(staging, target):
        shutil.rmtree(staging)  # it now holds the old version
    else:
        aside = target.with_name(f".{target.name}.old-{os.getpid()}-{uuid.uuid4().hex[:8]}")
        os.rename(target, aside)
        os.rename(staging, target)
        shutil.rmtree(aside)
    _fsync_dir(target.parent)
    for stale in leftovers(target):
        shutil.rmtree(stale, ignore_errors=True)
    return target


def set_aside(target: str | os.PathLike) -> Path | None:
    """The old version of ``target`` that an interrupted :func:`install_folder` renamed aside
    (only on platforms without an atomic swap), or None."""
    target = Path(target)
    found = sorted(target.parent.glob(f".{target.name}.old-*"), key=lambda p: p.stat().st_mtime)
    return found[-1] if found else None


def sha256_file(path: str | os.PathLike) -> str:
    """The SHA-256 of a file's bytes (hex), read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def write_text(path: str | os.PathLike, text: str) -> Path:
    """Write ``text`` (UTF-8) to ``path`` atomically."""
    return atomic_write(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))


def finite_json(value: Any) -> Any:
    """``value`` with every NaN or infinite float (in nested dicts, lists and tuples) replaced
    by None, so that it serialises as strict JSON (``null``, never a bare ``NaN``)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: finite_json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite_json(v) for v in value]
    return value


def write_json(path: str | os.PathLike, data: Any, indent: int | None = 2) -> Path:
    """Write ``data`` as strict JSON (:func:`finite_json`, ``allow_nan=False``), atomically."""
    return write_text(path, json.dumps(finite_json(data), indent=indent, allow_nan=False) + "\n")


__all__ = [
    "atomic_write",
    "file_mode",
    "finite_json",
    "fsync_tree",
    "install_folder",
    "leftovers",
    "set_aside",
    "staging_folder",
    "write_json",
    "write_text",
]


def disk_full(err: BaseException | None) -> bool:
    """Whether ``err`` (or what caused it) is a full disk: ENOSPC, or safetensors' and torch's
    wrappers of it, which carry the OS message but not the errno."""
    while err is not None:
        if getattr(err, "errno", None) == errno.ENOSPC or "No space left on device" in str(err):
            return True
        err = err.__cause__ or err.__context__
    return False


def disk_full_message(err: BaseException) -> str:
    """What a command says when ``err`` was a full disk (:func:`disk_full`)."""
    return (
        f"no space left on the device while writing ({type(err).__name__}: "
        f"{str(err).splitlines()[0][:160]}). Nothing half-written is kept: files are written "
        "under a temporary name, then renamed. Free space or pass another --output_dir; a "
        "fine-tuning run continues from its last complete checkpoint with --resume."
    )
