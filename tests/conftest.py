"""Tiny timm models and synthetic images shared by the tests (offline, CPU)."""

from __future__ import annotations

import pytest
import timm
import torch

# name -> create_model kwargs; image size 32 keeps every forward pass to milliseconds.
TINY = {
    "test_resnet": {},
    "test_vit": {"img_size": 32},
}
# Real architectures, random init, where still cheap at 32 px.
CHEAP = {
    "resnet18": {},
    "vit_tiny_patch16_224": {"img_size": 32},
    "deit_tiny_distilled_patch16_224": {"img_size": 32},
}
NUM_CLASSES = 5
IMAGE_SIZE = 32


def make_model(name: str, seed: int = 0, num_classes: int = NUM_CLASSES) -> torch.nn.Module:
    """A randomly initialised timm model; the same seed gives the same weights."""
    torch.manual_seed(seed)
    kwargs = {**TINY, **CHEAP}.get(name, {})
    return timm.create_model(name, pretrained=False, num_classes=num_classes, **kwargs)


def images(n: int = 8, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, IMAGE_SIZE, IMAGE_SIZE, generator=g)


def labels(n: int = 8, seed: int = 2) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, NUM_CLASSES, (n,), generator=g)


# --- Test tiers ----------------------------------------------------------------------------
# `python -m pytest` runs everything (CI, the README); `python -m pytest -m "not slow"` is the
# fast tier for development. A test is slow when it carries one of the finer markers below (in
# its module, `@pytest.mark.e2e`, or here); each finer marker implies `slow`. The lists below
# mark the slow tests of modules that do not mark themselves, so that the tiers live in one
# place; tests/test_tiers.py checks that every name listed here still exists.
FINER_MARKERS = {
    "e2e": "runs a recipe end to end (a tiny fine-tune, pretrain, selection, eval or predict)",
    "multiprocess": "launches 2 gloo CPU processes with accelerate launch",
    "readme": "runs a README block as written",
    "results": "regenerates the committed benchmark tables from the committed records",
}
# module -> the finer markers of every test in it
SLOW_MODULES: dict[str, tuple[str, ...]] = {
    "test_readme.py": ("readme", "e2e"),
    "test_committed_results.py": ("results",),
}
# module -> {test function name (without parameters): its finer markers}
SLOW_TESTS: dict[str, dict[str, tuple[str, ...]]] = {}


@pytest.hookimpl(tryfirst=True)  # before `-m` deselects by marker
def pytest_collection_modifyitems(config, items):
    for item in items:
        module = item.path.name
        name = getattr(item, "originalname", item.name)
        for marker in SLOW_MODULES.get(module, ()) + SLOW_TESTS.get(module, {}).get(name, ()):
            item.add_marker(marker)
        if any(item.get_closest_marker(m) for m in FINER_MARKERS):
            item.add_marker("slow")
