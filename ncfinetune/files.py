"""Writing files so that a reader never sees half of one: the one atomic write, and strict JSON.

Every file ncfinetune writes (checkpoints, metrics, reports, figures, predictions) goes through
:func:`atomic_write`: the content is written to a hidden temporary file in the same folder and
moved into place with ``os.replace``, so the path holds either the old file or the whole new one.
The temporary file is created by the writer itself, so it gets the usual permissions (the
umask), not ``mkstemp``'s 0600.
"""

from __future__ import annotations

import json
import math
import os
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
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    return out


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


__all__ = ["atomic_write", "finite_json", "write_json", "write_text"]
