"""What a tuned model accepts as images, checked before the first layer sees them: a float batch
N x C x H x W with the backbone's channels (and, for a ViT with a fixed input size, its size).
The error says what was received and how to convert it, instead of a raw convolution or shape
error from deep inside the model."""

from __future__ import annotations

import weakref

import torch
from torch import nn

from ncfinetune.errors import DataError

_CHANNELS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_FLOATS = (torch.float32, torch.float16, torch.bfloat16)
FIX = "ncfinetune.data.build_transforms(model) makes such batches from PIL images"


def input_channels(model: nn.Module) -> int | None:
    """The channels the backbone's first convolution takes (None: it has none)."""
    if model not in _CHANNELS:
        first = next((m for m in model.modules() if isinstance(m, nn.Conv2d)), None)
        _CHANNELS[model] = None if first is None else first.in_channels
    return _CHANNELS[model]


def image_problem(model: nn.Module, x) -> str | None:
    """Why ``x`` is not a batch of images ``model`` takes (None: it is)."""
    if not isinstance(x, torch.Tensor):
        return f"expected a torch.Tensor batch of images, got {type(x).__name__}"
    shape = "x".join(map(str, x.shape))
    if x.dim() != 4:
        hint = " (one image? add the batch dimension: x.unsqueeze(0))" if x.dim() == 3 else ""
        return (
            f"expected a 4-D batch N x C x H x W, got a {x.dim()}-D tensor of shape {shape}{hint}"
        )
    if x.dtype == torch.uint8:
        return (
            f"got uint8 pixels (0-255), shape {shape}: convert to float and normalise as the "
            f"backbone was trained (x.float() / 255, then its mean/std); {FIX}"
        )
    if x.dtype not in _FLOATS:
        return (
            f"got a {str(x.dtype).replace('torch.', '')} tensor, shape {shape}; the model computes "
            f"in float32 (or float16/bfloat16 under autocast): pass x.float()"
        )
    want = input_channels(model)
    if want is not None and x.shape[1] != want:
        if x.shape[-1] == want:
            hint = "channels last (N x H x W x C)? pass x.permute(0, 3, 1, 2)"
        elif x.shape[1] == 1:
            hint = f"a grayscale batch? repeat it: x.expand(-1, {want}, -1, -1)"
        else:
            hint = f"convert the images to {want} channels"
        return f"the backbone takes {want}-channel images, got shape {shape} (N x C x H x W): {hint}; {FIX}"
    embed = getattr(model, "patch_embed", None)
    size = getattr(embed, "img_size", None)
    if getattr(embed, "strict_img_size", False) and size and tuple(x.shape[-2:]) != tuple(size):
        return (
            f"the backbone takes {size[0]}x{size[1]} images, got {x.shape[-2]}x{x.shape[-1]} "
            f"(shape {shape}): resize them (data.image_size / --image_size {size[0]}); {FIX}"
        )
    patch = getattr(embed, "patch_size", None)
    if patch and not getattr(embed, "dynamic_img_pad", False):
        if x.shape[-2] % patch[0] or x.shape[-1] % patch[1]:
            return (
                f"the backbone cuts images into {patch[0]}x{patch[1]} patches, got "
                f"{x.shape[-2]}x{x.shape[-1]} (shape {shape}): resize them to a multiple of "
                f"{patch[0]} (e.g. {size[0] if size else patch[0]}); {FIX}"
            )
    return None


def check_images(model: nn.Module, x) -> None:
    """Raise DataError naming what is wrong with ``x`` as a batch of images for ``model``
    (skipped while torch.compile traces the model: a compiled step keeps one graph)."""
    if torch.compiler.is_compiling():
        return
    problem = image_problem(model, x)
    if problem is not None:
        raise DataError(f"images for {type(model).__name__}: {problem}.")
