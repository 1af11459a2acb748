"""The adapter protocol: the only interface the rest of ncfinetune uses to reach timm internals.

An adapter splits a timm classifier into ``stem -> blocks[0..n-1] -> head`` so that the tuning
wrapper can run the frozen prefix without autograd, capture any block's output for the skip, and
collect every block's pooled output in one pass. Each family implements the same few methods;
dispatch is by ``isinstance`` on the timm class, so variants (resnet50d, resnext, deit, ...)
need no extra code.
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import nn

from ncfinetune.errors import BlockError, ConfigError


class Prediction(NamedTuple):
    """What a forward pass with features returns, everywhere in ncfinetune."""

    logits: torch.Tensor
    """The classifier's output (N x K)."""
    features: torch.Tensor
    """The classifier's input: penultimate features phi(x), plus the SCL skip when added."""


@dataclass(frozen=True)
class BlockInfo:
    """One fine-tuning unit of a backbone.

    Attributes:
        index: 0-based position in forward order.
        name: module name inside the timm model (``layer3.0``, ``blocks.7``).
        channels: width of the block's pooled output (ResNet: output channels; ViT: embed dim).
        num_params: number of parameters inside the block.
    """

    index: int
    name: str
    channels: int
    num_params: int

    def __str__(self) -> str:
        return f"{self.index:>3}  {self.name:<12} channels={self.channels:<5} params={self.num_params:,}"


class BackboneAdapter:
    """Base class of the per-family adapters. Subclasses fill in the timm-specific parts."""

    family: str = ""
    """Human-readable family name used in messages."""

    splittable: bool = True
    """True when :meth:`stem` and :meth:`forward_blocks` can run any range of blocks on its own.
    That split is what lets the frozen prefix run once and be cached; an adapter without it
    (the generic one) runs the whole feature extractor and captures block outputs by hook."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self._blocks = self._named_blocks()
        if not self._blocks:
            raise BlockError(f"{type(model).__name__} has no blocks to tune")

    # -- what every family must provide -------------------------------------------------
    @classmethod
    def matches(cls, model: nn.Module) -> bool:
        """True when this adapter understands ``model``."""
        raise NotImplementedError

    def _named_blocks(self) -> list[tuple[str, nn.Module]]:
        raise NotImplementedError

    def block_channels(self, index: int) -> int:
        """Width of the pooled output of block ``index``."""
        raise NotImplementedError

    def stem(self, x: torch.Tensor) -> torch.Tensor:
        """Everything before the first block (patch/conv embedding, positions, stem pooling)."""
        raise NotImplementedError

    def pool(self, h: torch.Tensor) -> torch.Tensor:
        """Pool a block output to one vector per example (N x C), as SPEC section 2 defines."""
        raise NotImplementedError

    def penultimate(self, h: torch.Tensor) -> torch.Tensor:
        """Penultimate features phi(x) from the last block's output (the classifier's input)."""
        raise NotImplementedError

    def classify(self, h: torch.Tensor, skip: torch.Tensor | None) -> Prediction:
        """Logits from the last block's output, with an optional skip added to the classifier
        input; returns ``Prediction(logits, features)``."""
        feats = self.penultimate(h)
        if skip is not None:
            feats = feats + skip
        return Prediction(self.model.get_classifier()(feats), feats)

    has_skip_norm: bool = False
    """True when :meth:`pool_normed` exists: the skip can pass through the final norm (ViTs)."""

    def pool_normed(self, h: torch.Tensor) -> torch.Tensor:
        """Pool through the model's final norm(s); only where :attr:`has_skip_norm`."""
        raise NotImplementedError

    def classifier_modules(self) -> list[nn.Module]:
        """Modules that hold the downstream classifier (always trainable)."""
        return [self.model.get_classifier()]

    # -- shared logic ---------------------------------------------------------------------
    @property
    def blocks(self) -> list[nn.Module]:
        """The block modules in forward order."""
        return [m for _, m in self._blocks]

    @property
    def block_names(self) -> list[str]:
        """Module names of the blocks in forward order."""
        return [n for n, _ in self._blocks]

    @property
    def feature_dim(self) -> int:
        """Width of the classifier input (penultimate features)."""
        for clf in self.classifier_modules():
            if not isinstance(clf, nn.Linear):
                raise ConfigError(
                    f"{type(self.model).__name__} has no linear classifier (found "
                    f"{type(clf).__name__}). Create the model with the downstream class count, "
                    "e.g. timm.create_model(name, num_classes=K)."
                )
        return self.classifier_modules()[0].in_features

    def describe_blocks(self) -> list[BlockInfo]:
        """One :class:`BlockInfo` per block, in forward order."""
        return [
            BlockInfo(i, name, self.block_channels(i), sum(p.numel() for p in m.parameters()))
            for i, (name, m) in enumerate(self._blocks)
        ]

    def resolve(self, block: int | str) -> int:
        """Turn a block index (negative counts from the end) or module name into an index."""
        n = len(self._blocks)
        names = self.block_names
        listing = _listing(names)
        arch = arch_name(self.model)
        if isinstance(block, bool) or not isinstance(block, (int, str)):
            raise BlockError(
                f"block must be an int index or a module name, got {type(block).__name__} "
                f"{block!r}. Valid for {arch} ({n} blocks: {listing})."
            )
        if isinstance(block, str):
            digits = block.removeprefix("-")
            if digits.isascii() and digits.isdigit():  # "3" and "-1"; not "²" or "٣"
                return self.resolve(int(block))
            if block in names:
                return names.index(block)
            raise BlockError(
                f"block {block!r} is not a block of {arch} ({n} blocks: {listing}). "
                f"Pass an index in [{-n}, {n - 1}] or one of these names."
            )
        if not -n <= block < n:
            raise BlockError(
                f"block {block} is out of range for {arch} ({n} blocks: {listing}). "
                f"Pass an index in [{-n}, {n - 1}] or a block name."
            )
        return block % n

    def forward_blocks(
        self, h: torch.Tensor, start: int = 0, stop: int | None = None
    ) -> torch.Tensor:
        """Run blocks ``start .. stop-1`` on ``h``."""
        for blk in self.blocks[start:stop]:
            h = blk(h)
        return h

    def block_modules(self, index: int) -> list[nn.Module]:
        """The modules that train when block ``index`` is tuned (the block itself; a generic
        timm group may add the stage's downsampling layer that runs before it)."""
        return [self.blocks[index]]

    def forward_capture(
        self, x: torch.Tensor, capture: Collection[int] = ()
    ) -> tuple[torch.Tensor, dict[int, torch.Tensor]]:
        """Run the feature extractor on images ``x``.

        Returns:
            ``(h, outputs)``: the last block's output (what :meth:`penultimate` and
            :meth:`classify` take) and the raw output of every block index in ``capture``.
        """
        h = self.stem(x)
        outputs = {}
        for i, blk in enumerate(self.blocks):
            h = blk(h)
            if i in capture:
                outputs[i] = h
        return h, outputs


def _listing(names: list[str]) -> str:
    if len(names) <= 6:
        return ", ".join(f"{i} {n}" for i, n in enumerate(names))
    last = len(names) - 1
    return f"0 {names[0]}, 1 {names[1]} ... {last} {names[last]}"


def arch_name(model: nn.Module) -> str:
    cfg = getattr(model, "pretrained_cfg", None) or {}
    return cfg.get("architecture") or type(model).__name__
