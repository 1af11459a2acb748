"""The tuned model: one wrapper type for linear probe, Layer FT, SCL FT and full fine-tuning.

``TunedModel`` freezes the backbone, unfreezes what the method trains, applies the BatchNorm
policy, adds the parameter-free skip for SCL FT, and reports what is trained. Its forward runs in
two parts: :meth:`TunedModel.forward_prefix`, the frozen part before the tuned block, under
``torch.no_grad()`` (no autograd graph is ever built there), and :meth:`TunedModel.forward_suffix`,
the rest. The split is explicit (not a hook) so that the prefix output can be cached when it is a
pure function of the input (``bn="frozen"``, no augmentation).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from ncfinetune._warn import warn_once
from ncfinetune.backbones import BackboneAdapter, get_adapter
from ncfinetune.backbones.base import _arch_name
from ncfinetune.errors import ConfigError

METHODS = ("linear", "layer", "scl", "full")
"""Tuning methods: linear probe, Layer FT, SCL FT, full fine-tuning (SPEC section 2)."""

BN_POLICIES = ("update", "frozen")
"""``update``: every BatchNorm adapts its running statistics to the downstream data in train mode
(the paper's setting, App. B.2). ``frozen``: BatchNorms outside the trained modules keep their
pretrained statistics (they stay in eval mode), which makes the frozen prefix a pure function of
the input."""

METHOD_TITLES = {"linear": "linear probe", "layer": "Layer FT", "scl": "SCL FT", "full": "full FT"}


@dataclass
class TuningConfig:
    """What to train and how. Validated on construction.

    Attributes:
        method: one of ``linear``, ``layer``, ``scl``, ``full``.
        block: the block to tune for ``layer``/``scl``: 0-based index (negative from the end) or
            module name. Ignored (with a warning) for ``linear``/``full``.
        bn: BatchNorm policy, ``update`` or ``frozen``; ``None`` means ``update`` and stays silent
            on models without BatchNorm.
        skip_norm: ViT only. Pass the SCL skip through the model's final norm (``norm``, then
            pooling, then ``fc_norm``), exactly as phi(x) is made from the last block. ``None``
            means True for ViTs. The raw residual stream of an inner block has a scale unrelated
            to the normalised penultimate features, so adding it un-normalised lets one of the two
            terms dominate; with the norm both live in the same coordinates.
    """

    method: str = field(metadata={"help": "linear | layer | scl | full"})
    block: int | str | None = field(default=None, metadata={"help": "index or module name"})
    bn: str | None = field(default=None, metadata={"help": "update | frozen"})
    skip_norm: bool | None = field(default=None, metadata={"help": "ViT: norm the SCL skip"})

    def __post_init__(self) -> None:
        problems = []
        if self.method not in METHODS:
            problems.append(f"method={self.method!r} is not one of {', '.join(METHODS)}")
        if self.method in ("layer", "scl") and self.block is None:
            problems.append(
                f"method={self.method!r} tunes one block: pass block=INDEX or block=NAME "
                "(see ncfinetune.list_blocks(model))"
            )
        if self.bn is not None and self.bn not in BN_POLICIES:
            problems.append(f"bn={self.bn!r} is not one of {', '.join(BN_POLICIES)}")
        if problems:
            raise ConfigError("invalid tuning config: " + "; ".join(problems) + ".")
        if self.method in ("linear", "full") and self.block is not None:
            warn_once(f"block={self.block!r} has no effect with method={self.method!r}; ignored.")
            self.block = None
        if self.skip_norm is not None and self.method != "scl":
            warn_once(f"skip_norm has no effect with method={self.method!r} (no skip); ignored.")


class TunedModel(nn.Module):
    """A timm classifier prepared for one of the four tuning methods.

    Build it with :func:`wrap` (or :func:`scl_wrap`, :func:`layer_wrap`, :func:`linear_wrap`,
    :func:`full_wrap`). The wrapped timm model is ``self.model``; it is modified in place
    (``requires_grad`` flags), so wrap a model once.
    """

    def __init__(self, model: nn.Module, config: TuningConfig) -> None:
        super().__init__()
        if isinstance(model, TunedModel):
            raise ConfigError("model is already a TunedModel; wrap its .model or a fresh model.")
        adapter = get_adapter(model)
        self.model = model
        self.adapter: BackboneAdapter = adapter
        self.config = config
        self.feature_dim = adapter.feature_dim
        self.block_index: int | None = None
        if config.method in ("layer", "scl"):
            self.block_index = adapter.resolve(config.block)
            if config.method == "scl":
                self._check_skip_fits(self.block_index)
        self.skip_norm = self._resolve_skip_norm()
        self.bn = self._resolve_bn()
        self._freeze()

    # -- construction helpers -------------------------------------------------------------
    def _check_skip_fits(self, index: int) -> None:
        channels = self.adapter.block_channels(index)
        if channels > self.feature_dim:
            fits = [
                f"{b.index} {b.name}"
                for b in self.adapter.describe_blocks()
                if b.channels <= self.feature_dim
            ]
            raise ConfigError(
                f"SCL skip from block {index} ({self.adapter.block_names[index]}) has {channels} "
                f"channels, more than the {self.feature_dim} penultimate features of "
                f"{self.arch}; zero-padding cannot fit it and ncfinetune does not truncate. "
                f"Blocks that fit: {', '.join(fits)}. Pick one of them or use method='layer'."
            )

    def _resolve_skip_norm(self) -> bool:
        is_vit = hasattr(self.adapter, "pool_normed")
        if self.config.skip_norm and not is_vit and self.config.method == "scl":
            warn_once(f"skip_norm has no effect on {self.arch}: it has no final norm.")
        if self.config.skip_norm is None:
            return is_vit
        return bool(self.config.skip_norm) and is_vit

    def _resolve_bn(self) -> str:
        has_bn = any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in self.model.modules())
        if self.config.bn is not None and not has_bn:
            warn_once(f"bn={self.config.bn!r} has no effect: {self.arch} has no BatchNorm layers.")
        if self.config.bn == "frozen" and self.config.method == "full":
            warn_once("bn='frozen' has no effect with method='full': every layer is trained.")
        return self.config.bn or "update"

    def _trainable_modules(self) -> list[nn.Module]:
        if self.method == "full":
            return [self.model]
        mods = list(self.adapter.classifier_modules())
        if self.block_index is not None:
            mods.append(self.adapter.blocks[self.block_index])
        return mods

    def _freeze(self) -> None:
        self.model.requires_grad_(False)
        for m in self._trainable_modules():
            m.requires_grad_(True)
        trained = {id(s) for m in self._trainable_modules() for s in m.modules()}
        self._frozen_bn = [
            m
            for m in self.model.modules()
            if isinstance(m, nn.modules.batchnorm._BatchNorm) and id(m) not in trained
        ]
        self.train(self.model.training)

    # -- properties -------------------------------------------------------------------------
    @property
    def method(self) -> str:
        """The tuning method: ``linear``, ``layer``, ``scl`` or ``full``."""
        return self.config.method

    @property
    def arch(self) -> str:
        """The timm architecture name of the wrapped model."""
        return _arch_name(self.model)

    @property
    def block_name(self) -> str | None:
        """Module name of the tuned block (None for linear/full)."""
        return None if self.block_index is None else self.adapter.block_names[self.block_index]

    # -- modes ------------------------------------------------------------------------------
    def train(self, mode: bool = True) -> TunedModel:
        """Set train/eval mode; with ``bn="frozen"`` frozen BatchNorms always stay in eval mode."""
        super().train(mode)
        if mode and self.bn == "frozen":
            for m in self._frozen_bn:
                m.eval()
        return self

    # -- forward ----------------------------------------------------------------------------
    def forward_prefix(self, x: torch.Tensor) -> torch.Tensor:
        """The frozen part before the first trained block, run without autograd.

        Returns the input of the tuned block (``layer``/``scl``), the last block's output
        (``linear``), or ``x`` itself (``full``).
        """
        if self.method == "full":
            return x
        stop = self.block_index if self.block_index is not None else None
        with torch.no_grad():
            return self.adapter.forward_blocks(self.adapter.stem(x), 0, stop)

    def forward_suffix(self, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The trained part from the output of :meth:`forward_prefix`.

        Returns:
            ``(features, logits)``: the classifier's input (penultimate features plus the SCL
            skip) and the logits.
        """
        a = self.adapter
        if self.method == "full":
            h = a.forward_blocks(a.stem(h))
            return a.classify(h, None)
        if self.method == "linear":
            return a.classify(h, None)
        h = a.blocks[self.block_index](h)
        skip = self.skip(h) if self.method == "scl" else None
        h = a.forward_blocks(h, self.block_index + 1)
        return a.classify(h, skip)

    def skip(self, block_output: torch.Tensor) -> torch.Tensor:
        """The SCL skip: the block output pooled (SPEC section 2) and zero-padded to phi's width."""
        if self.skip_norm:
            pooled = self.adapter.pool_normed(block_output)
        else:
            pooled = self.adapter.pool(block_output)
        return F.pad(pooled, (0, self.feature_dim - pooled.shape[1]))

    def forward_with_features(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(logits, features)`` in one pass; features are the classifier's input."""
        feats, logits = self.forward_suffix(self.forward_prefix(x))
        return logits, feats

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits for a batch of images."""
        return self.forward_suffix(self.forward_prefix(x))[1]

    # -- parameters -------------------------------------------------------------------------
    def trainable_parameters(self) -> list[nn.Parameter]:
        """The parameters an optimizer should see (and the only ones that receive gradients)."""
        return [p for p in self.model.parameters() if p.requires_grad]

    def parameter_counts(self) -> tuple[int, int]:
        """``(trainable, total)`` parameter counts, the classifier included in both (SPEC 2)."""
        total = sum(p.numel() for p in self.model.parameters())
        return sum(p.numel() for p in self.trainable_parameters()), total

    @property
    def trainable_share(self) -> float:
        """Trainable parameters as a percentage of all parameters."""
        trainable, total = self.parameter_counts()
        return 100.0 * trainable / total

    def parameter_report(self) -> str:
        """``"trainable 924,170 of 11,181,642 (8.27%)"``."""
        trainable, total = self.parameter_counts()
        return f"trainable {trainable:,} of {total:,} ({100.0 * trainable / total:.2f}%)"

    def print_trainable_parameters(self) -> None:
        """Print :meth:`parameter_report` (the peft-style one-liner)."""
        print(self.parameter_report())

    def describe(self) -> str:
        """One readable line: method, block, BN policy and trainable share."""
        where = (
            "" if self.block_index is None else f" at block {self.block_index} ({self.block_name})"
        )
        extra = f", skip_norm={self.skip_norm}" if self.method == "scl" and self.skip_norm else ""
        return (
            f"{METHOD_TITLES[self.method]} of {self.arch}{where}, bn={self.bn}{extra}: "
            f"{self.parameter_report()}"
        )

    def extra_repr(self) -> str:
        return self.describe()

    # -- checkpoints --------------------------------------------------------------------------
    def tuned_state_dict(self) -> dict[str, torch.Tensor]:
        """What a checkpoint holds: trained parameters and the buffers that training changes.

        Buffers: those inside the trained modules, plus every BatchNorm buffer under
        ``bn="update"`` (running statistics adapt everywhere). Names are the timm model's own.
        """
        keep = {n for n, p in self.model.named_parameters() if p.requires_grad}
        trained = {id(s) for m in self._trainable_modules() for s in m.modules()}
        for mod_name, mod in self.model.named_modules():
            is_bn = isinstance(mod, nn.modules.batchnorm._BatchNorm)
            if id(mod) in trained or (is_bn and self.bn == "update"):
                prefix = f"{mod_name}." if mod_name else ""
                keep.update(prefix + b for b, _ in mod.named_buffers(recurse=False))
        state = self.model.state_dict()
        return {k: v.detach() for k, v in state.items() if k in keep}

    def save_pretrained(self, path: str) -> None:
        """Write the tuned tensors (safetensors) and metadata (JSON) to directory ``path``.

        Only what was tuned is written, atomically (temporary file, then rename). See
        :func:`ncfinetune.checkpoint.save_tuned`.
        """
        from ncfinetune.checkpoint import save_tuned

        save_tuned(self, path)


def wrap(
    model: nn.Module,
    method: str,
    block: int | str | None = None,
    *,
    bn: str | None = None,
    skip_norm: bool | None = None,
) -> TunedModel:
    """Prepare ``model`` for ``method`` (``linear``, ``layer``, ``scl``, ``full``)."""
    return TunedModel(model, TuningConfig(method=method, block=block, bn=bn, skip_norm=skip_norm))


def scl_wrap(
    model: nn.Module, block: int | str, *, bn: str | None = None, skip_norm: bool | None = None
) -> TunedModel:
    """SCL FT: train one block and the classifier, with the pooled, zero-padded skip from the block
    added to the penultimate features (no new parameters)."""
    return wrap(model, "scl", block, bn=bn, skip_norm=skip_norm)


def layer_wrap(model: nn.Module, block: int | str, *, bn: str | None = None) -> TunedModel:
    """Layer FT: train one block and the classifier."""
    return wrap(model, "layer", block, bn=bn)


def linear_wrap(model: nn.Module, *, bn: str | None = None) -> TunedModel:
    """Linear probe: train the classifier only."""
    return wrap(model, "linear", bn=bn)


def full_wrap(model: nn.Module, *, bn: str | None = None) -> TunedModel:
    """Full fine-tuning: train everything (the baseline, through the same wrapper)."""
    return wrap(model, "full", bn=bn)
