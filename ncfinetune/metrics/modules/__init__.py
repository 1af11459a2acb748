"""``evaluate`` metric scripts shipped with ncfinetune, loadable offline.

``evaluate.load(path)`` accepts a directory holding a script of the same name
(``nc1/nc1.py``); :func:`metric_path` gives that directory and :func:`load_metric` loads it,
falling back to ``evaluate.load(name)`` (the Hugging Face Hub or evaluate's cache) for names
not shipped here.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ncfinetune.errors import ConfigError

__all__ = ["SHIPPED_METRICS", "load_metric", "metric_path"]

_HERE = Path(__file__).resolve().parent
SHIPPED_METRICS = ("accuracy", "nc1")


def metric_path(name: str) -> str:
    """The directory of the shipped metric ``name`` (pass it to ``evaluate.load``)."""
    if name not in SHIPPED_METRICS:
        raise ConfigError(
            f"metric {name!r} is not shipped with ncfinetune; shipped: "
            f"{', '.join(SHIPPED_METRICS)}. Use one of those, or evaluate.load() for Hub metrics."
        )
    return str(_HERE / name)


def load_metric(name: str, **kwargs: Any) -> Any:
    """Load a metric: a shipped one from its directory (offline), else ``evaluate.load(name)``.

    Args:
        name: a shipped name (see ``SHIPPED_METRICS``), a Hub metric name, or a local path.
        **kwargs: forwarded to ``evaluate.load`` (e.g. ``cache_dir``, ``experiment_id``,
            ``keep_in_memory``).

    Returns:
        The ``evaluate.EvaluationModule``.

    Raises:
        ConfigError: if ``name`` is not shipped and evaluate cannot find or download it (for
            example because the machine is offline).
    """
    import evaluate  # imported lazily: evaluate pulls in datasets, which is slow to import

    if name in SHIPPED_METRICS:
        return evaluate.load(metric_path(name), **kwargs)
    try:
        return evaluate.load(name, **kwargs)
    except (ConnectionError, FileNotFoundError, OSError) as err:
        raise ConfigError(
            f"could not load metric {name!r} with evaluate.load ({type(err).__name__}: {err}). "
            f"It is not shipped with ncfinetune (shipped, work offline: "
            f"{', '.join(SHIPPED_METRICS)}); Hub metrics need network access on first use. "
            "Use a shipped metric, pass a local metric script path, or load it once online so "
            "evaluate caches it."
        ) from err
