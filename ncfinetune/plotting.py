"""Figures without pyplot: no global backend switch, no figure registry to close.

`new_figure` builds a `matplotlib.figure.Figure` directly (rendered by Agg when saved as PNG,
whatever backend the caller's pyplot uses), so importing or plotting here never changes
`matplotlib.get_backend()` and never opens a window. `save_figure` writes atomically: a reader
(or a crash) never sees half a PNG.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib
from matplotlib.figure import Figure

from ncfinetune.files import atomic_write

__all__ = ["new_figure", "save_figure"]


def new_figure(
    nrows: int = 1,
    ncols: int = 1,
    *,
    figsize: tuple[float, float] | None = None,
    **subplots: Any,
) -> tuple[Figure, Any]:
    """A new figure and its axes, as `pyplot.subplots` would return them, without pyplot.

    Args:
        nrows: rows of axes.
        ncols: columns of axes.
        figsize: (width, height) in inches; default matplotlib's.
        **subplots: passed to `Figure.subplots` (`squeeze`, `sharex`, `sharey`, `width_ratios`,
            `subplot_kw`, ...).

    Returns:
        (figure, axes): one `Axes` for 1 x 1, else an array of them (as `Figure.subplots`).
    """
    fig = Figure(figsize=figsize)
    return fig, fig.subplots(nrows, ncols, **subplots)


def save_figure(fig: Figure, path: str | Path, dpi: int = 110) -> Path:
    """Lay out `fig` tightly and write it to `path`, creating the folder; returns the path.

    The image is written to a hidden temporary file in the same folder and moved into place
    with `os.replace`, so `path` holds either the old file or the whole new one. The format is
    the suffix of `path` (PNG when it has none).
    """
    fig.tight_layout()
    fmt = Path(path).suffix.lstrip(".").lower() or matplotlib.rcParams["savefig.format"]
    return atomic_write(path, lambda tmp: fig.savefig(tmp, format=fmt, dpi=dpi))
