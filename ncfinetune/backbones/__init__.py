"""Per-family adapters: the only code that knows timm model internals."""

from __future__ import annotations

from torch import nn

from ncfinetune.backbones.base import BackboneAdapter, BlockInfo
from ncfinetune.backbones.resnet import ResNetAdapter
from ncfinetune.backbones.vit import DistilledViTAdapter, ViTAdapter
from ncfinetune.errors import UnsupportedModelError

# Most specific first: a distilled DeiT is also a VisionTransformer.
ADAPTERS: tuple[type[BackboneAdapter], ...] = (ResNetAdapter, DistilledViTAdapter, ViTAdapter)


def get_adapter(model: nn.Module) -> BackboneAdapter:
    """The adapter for ``model``; raises UnsupportedModelError naming the supported families."""
    for cls in ADAPTERS:
        if cls.matches(model):
            return cls(model)
    families = ", ".join(sorted({c.family for c in ADAPTERS}))
    raise UnsupportedModelError(
        f"ncfinetune cannot split a {type(model).__module__}.{type(model).__name__} into blocks. "
        f"Supported timm families: {families} (e.g. resnet18, resnet50d, resnext50_32x4d, "
        "vit_base_patch32_224, deit_small_patch16_224, test_resnet, test_vit). "
        "Pass a model made by timm.create_model with one of these architectures."
    )


def list_blocks(model: nn.Module) -> list[BlockInfo]:
    """The fine-tuning units of a timm model, in forward order.

    Example:
        >>> for b in list_blocks(timm.create_model("resnet18")):
        ...     print(b)
    """
    return get_adapter(model).describe_blocks()


__all__ = ["ADAPTERS", "BackboneAdapter", "BlockInfo", "get_adapter", "list_blocks"]
