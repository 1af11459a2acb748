"""The checks behind the recipes' config sections: each returns a list of problems (empty when
the value is fine), found before any data or model is loaded."""

from __future__ import annotations

import difflib
import errno
import os
from pathlib import Path
from typing import Any

SEED_MAX = 2**32 - 1
"""Largest seed every generator a run seeds accepts (numpy's legacy seeding is 32-bit)."""


def bound_problems(config: Any, **bounds: str) -> list[str]:
    """Problems with numeric keys of ``config``: ``bounds`` maps a key to a rule, one of
    ``">=0"``, ``">=1"``, ``">0"``, ``"[0,1)"``, ``"(0,100]"``; a None value always passes (the
    keys' null means auto or not set)."""
    rules = {
        ">=0": lambda v: v >= 0,
        ">=1": lambda v: v >= 1,
        ">0": lambda v: v > 0,
        "[0,1)": lambda v: 0 <= v < 1,
        "(0,100]": lambda v: 0 < v <= 100,
    }
    problems = []
    for name, rule in bounds.items():
        value = getattr(config, name)
        if value is not None and not isinstance(value, str) and not rules[rule](value):
            what = {">=0": ">= 0", ">=1": ">= 1", ">0": "> 0"}.get(rule, f"in {rule}")
            problems.append(f"{name} must be {what}, got {value}")
    return problems


def model_problems(model: str, checkpoint: str | None = None) -> list[str]:
    """A problem when ``model`` names no backbone ``create_backbone`` can build, or the
    ``checkpoint`` file is missing (checked before anything loads)."""
    import timm

    from ncfinetune.backbones.hub import bundled_backbones

    problems = []
    bundled = bundled_backbones()
    if not (model in bundled or (Path(model) / "backbone.json").is_file() or timm.is_model(model)):
        close = difflib.get_close_matches(model, [*bundled, *timm.list_models()], n=3)
        hint = f" (did you mean {', '.join(close)}?)" if close else ""
        problems.append(
            f"model {model!r} is not a bundled backbone ({', '.join(bundled)}), a folder with "
            f"backbone.json from recipes/pretrain.py, or a timm architecture{hint}"
        )
    if checkpoint is not None and not Path(checkpoint).is_file():
        problems.append(f"checkpoint {checkpoint} is not a file: pass a local weights file")
    return problems


def seed_problems(seed: int, name: str = "seed") -> list[str]:
    """A problem when ``seed`` is outside what torch, numpy and random all accept."""
    if not 0 <= seed <= SEED_MAX:
        return [f"{name} must be in [0, 2**32 - 1] (what numpy accepts), got {seed}"]
    return []


def inside_package_problems(name: str, path: str) -> list[str]:
    """A problem when ``path`` lies inside the installed ncfinetune package: a recipe never
    writes there (a backbone in its assets/ would be loaded by every user)."""
    package = Path(__file__).resolve().parents[1]
    out = Path(path).expanduser().resolve()
    if out != package and package not in out.parents:
        return []
    return [
        f"{name} {path} is inside the installed package ({package}): a recipe never writes "
        "there (a backbone in its assets/ would be loaded by every user). Pretrain into another "
        "folder, then (maintainers) run `python tools/bundle_backbone.py FOLDER NAME`."
    ]


def output_problems(name: str, path: str | None, *, folder: bool = True) -> list[str]:
    """Problems writing to ``path`` (the value of config key ``name``), found before any data
    or model is loaded: a file where a folder is needed (or the reverse), a parent that is a
    file, or no permission to create or write it."""
    if path is None:
        return []
    target = Path(path)
    for link in (target, *target.parents):  # a dangling or looping link fails only when written
        if link.is_symlink() and not link.exists():
            loop = False
            try:
                link.resolve(strict=True)
            except (RuntimeError, OSError) as err:  # Python < 3.13: a loop is a RuntimeError
                loop = isinstance(err, RuntimeError) or getattr(err, "errno", 0) == errno.ELOOP
            why = (
                "is a symlink loop"
                if loop
                else f"is a symlink to {os.readlink(link)}, which does not exist"
            )
            return [
                f"{name} {path}: {link} {why}; remove the link or point it at an existing "
                "folder, or pass another path"
            ]
    if folder and target.exists() and not target.is_dir():
        return [
            f"{name} {path} is a file, not a folder: pass a folder path (the run writes "
            "several files into it)"
        ]
    if not folder and target.is_dir():
        return [f"{name} {path} is a folder: pass a file path, e.g. {target / 'predictions.csv'}"]
    # an existing file where a file is wanted is replaced (as eval replaces its report)
    start = target.parents if not folder and target.is_file() else (target, *target.parents)
    existing = next((a for a in start if a.exists()), Path("."))
    if not existing.is_dir():
        return [f"{name} {path} cannot be created: {existing} is a file, not a folder"]
    if not os.access(existing, os.W_OK | os.X_OK):
        return [
            f"{name} {path} cannot be written: no write permission on {existing}; pick a "
            "folder you can write to"
        ]
    return []


def tracker_problems(tracker: str | None) -> list[str]:
    """A problem when ``tracker`` is not an accelerate tracker installed here (or none)."""
    import importlib.util

    from accelerate.utils import LoggerType, imports

    if tracker in (None, "none"):
        return []
    names = [t.value for t in LoggerType if t.value != "all"]
    if tracker not in names:
        return [f"tracker {tracker!r} is not one of none, {', '.join(names)} (accelerate's)"]
    check = getattr(imports, f"is_{tracker}_available", None)
    available = check() if check else importlib.util.find_spec(tracker) is not None
    if not available:
        return [
            f"tracker {tracker!r} is not installed here: pip install {tracker}, or use "
            "tensorboard or none"
        ]
    return []


def every_problems(config: Any, names: tuple[str, ...], null: bool = True) -> list[str]:
    """``name must be >= 1[ or null]`` for each of the count keys ``names`` below 1."""
    found = []
    for name in names:
        value = getattr(config, name)
        if value is not None and value < 1:
            found.append(f"{name} must be >= 1{' or null' if null else ''}, got {value}")
    return found
