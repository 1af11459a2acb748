"""Tiny timm models and synthetic images shared by the tests (offline, CPU)."""

from __future__ import annotations

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
