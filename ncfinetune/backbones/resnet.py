"""timm ResNet family (resnet18/34/50/101, resnet50d, resnext, test_resnet, ...)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from timm.models.resnet import ResNet
from torch import nn

from ncfinetune.backbones.base import BackboneAdapter

_STAGES = ("layer1", "layer2", "layer3", "layer4")


class ResNetAdapter(BackboneAdapter):
    """Blocks are the residual blocks ``layer{s}.{b}`` in forward order; outputs are NCHW."""

    family = "ResNet"

    @classmethod
    def matches(cls, model: nn.Module) -> bool:
        return isinstance(model, ResNet)

    def _named_blocks(self) -> list[tuple[str, nn.Module]]:
        return [
            (f"{stage}.{j}", blk)
            for stage in _STAGES
            for j, blk in enumerate(getattr(self.model, stage))
        ]

    def block_channels(self, index: int) -> int:
        stage = self.block_names[index].split(".")[0]
        # timm's feature_info is the documented per-stage contract: every block of a stage
        # emits the stage's width.
        for info in self.model.feature_info:
            if info["module"] == stage:
                return int(info["num_chs"])
        raise KeyError(stage)  # unreachable for timm ResNets

    def stem(self, x: torch.Tensor) -> torch.Tensor:
        m = self.model
        return m.maxpool(m.act1(m.bn1(m.conv1(x))))

    def pool(self, h: torch.Tensor) -> torch.Tensor:
        return F.adaptive_avg_pool2d(h, 1).flatten(1)

    def penultimate(self, h: torch.Tensor) -> torch.Tensor:
        return self.model.forward_head(h, pre_logits=True)
