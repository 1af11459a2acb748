"""Warnings that are said once per process, for settings that have no effect."""

from __future__ import annotations

import warnings

_SAID: set[str] = set()


def warn_once(message: str, category: type[Warning] = UserWarning) -> None:
    """Emit ``message`` the first time it is seen in this process, then stay silent."""
    if message in _SAID:
        return
    _SAID.add(message)
    warnings.warn(message, category, stacklevel=3)
