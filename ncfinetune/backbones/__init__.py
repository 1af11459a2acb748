"""Per-family adapters: the only code that knows timm model internals."""

from __future__ import annotations

from torch import nn

from ncfinetune.backbones.base import BackboneAdapter, BlockInfo
from ncfinetune.backbones.generic import TimmAdapter
from ncfinetune.backbones.resnet import ResNetAdapter
from ncfinetune.backbones.vit import DistilledViTAdapter, ViTAdapter
from ncfinetune.errors import UnsupportedModelError

# Most specific first: a distilled DeiT is also a VisionTransformer. The generic timm adapter
# comes last: the hand-written ones split the model into stem and blocks (a cacheable prefix).
ADAPTERS: tuple[type[BackboneAdapter], ...] = (
    ResNetAdapter,
    DistilledViTAdapter,
    ViTAdapter,
    TimmAdapter,
)


def get_adapter(model: nn.Module) -> BackboneAdapter:
    """The adapter for ``model``; raises UnsupportedModelError saying what a model needs."""
    for cls in ADAPTERS:
        if cls.matches(model):
            return cls(model)
    families = ", ".join(sorted({c.family for c in ADAPTERS if c.splittable}))
    raise UnsupportedModelError(
        f"ncfinetune cannot split a {type(model).__module__}.{type(model).__name__} into blocks: "
        f"{TimmAdapter.why_not(model)}. "
        f"Supported timm families: {families} (hand-written adapters whose frozen prefix can be "
        "cached: resnet18, resnet50d, vit_base_patch32_224, deit_small_patch16_224, ...), and "
        "any other timm classifier that has forward_features(x), forward_head(x, "
        "pre_logits=True), get_classifier() returning one nn.Linear, and group_matcher() with at "
        "least one block group (the generic adapter: ConvNeXt, EfficientNet, RegNet, NFNet, "
        "MaxViT, Swin, EVA, ...). Pass a model made by timm.create_model(name, num_classes=K), "
        "not a features_only model or another nn.Module."
    )


def list_blocks(model: nn.Module) -> list[BlockInfo]:
    """The fine-tuning units of a timm model, in forward order.

    Example:
        >>> for b in list_blocks(timm.create_model("resnet18")):
        ...     print(b)
    """
    return get_adapter(model).describe_blocks()


__all__ = [
    "ADAPTERS",
    "BackboneAdapter",
    "BlockInfo",
    "TimmAdapter",
    "get_adapter",
    "list_blocks",
]
