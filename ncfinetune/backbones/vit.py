"""timm VisionTransformer family (vit_*, deit_*, registers, test_vit, ...)."""

from __future__ import annotations

import torch
from timm.models.deit import VisionTransformerDistilled
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from ncfinetune.backbones.base import BackboneAdapter, Prediction


class ViTAdapter(BackboneAdapter):
    """Blocks are ``blocks.{i}``; outputs are N x tokens x C, prefix tokens first.

    Pooling of a block output uses the model's own token pooling (class token, mean of patch
    tokens, or attention pooling per ``global_pool``), so the skip and the layer-wise metrics see
    the same token the classifier sees at the end.
    """

    family = "VisionTransformer"
    has_skip_norm = True

    @classmethod
    def matches(cls, model: nn.Module) -> bool:
        return isinstance(model, VisionTransformer)

    def _named_blocks(self) -> list[tuple[str, nn.Module]]:
        return [(f"blocks.{i}", blk) for i, blk in enumerate(self.model.blocks)]

    def block_channels(self, index: int) -> int:
        return int(self.model.embed_dim)

    def stem(self, x: torch.Tensor) -> torch.Tensor:
        m = self.model
        return m.norm_pre(m.patch_drop(m._pos_embed(m.patch_embed(x))))

    def pool(self, h: torch.Tensor) -> torch.Tensor:
        return self.model.pool(h)

    def pool_normed(self, h: torch.Tensor) -> torch.Tensor:
        """Pool through the model's final norm(s), exactly as phi(x) is made from the last block."""
        m = self.model
        return m.fc_norm(m.pool(m.norm(h)))

    def penultimate(self, h: torch.Tensor) -> torch.Tensor:
        return self.model.forward_head(self.model.norm(h), pre_logits=True)


class DistilledViTAdapter(ViTAdapter):
    """DeiT with a distillation token: two heads whose logits are averaged (timm's inference rule).

    The skip is added to the input of both heads, and both heads are the classifier.
    """

    family = "VisionTransformerDistilled"

    @classmethod
    def matches(cls, model: nn.Module) -> bool:
        return isinstance(model, VisionTransformerDistilled)

    def classify(self, h: torch.Tensor, skip: torch.Tensor | None) -> Prediction:
        m = self.model
        h = m.norm(h)
        cls_tok, dist_tok = m.head_drop(h[:, 0]), m.head_drop(h[:, 1])
        if skip is not None:
            cls_tok, dist_tok = cls_tok + skip, dist_tok + skip
        return Prediction((m.head(cls_tok) + m.head_dist(dist_tok)) / 2, (cls_tok + dist_tok) / 2)

    def classifier_modules(self) -> list[nn.Module]:
        return [self.model.head, self.model.head_dist]
