"""The tuned model: one wrapper type for linear probe, Layer FT, SCL FT, full fine-tuning and
the peft LoRA methods (``lora-block``, ``lora``).

``TunedModel`` freezes the backbone, unfreezes what the method trains, applies the BatchNorm
policy, adds the parameter-free skip for SCL FT, and reports what is trained. Its forward runs in
two parts: :meth:`TunedModel.forward_prefix`, the frozen part before the tuned block, under
``torch.no_grad()`` (no autograd graph is ever built there), and :meth:`TunedModel.forward_suffix`,
the rest. The split is explicit (not a hook) so that the prefix output can be cached when it is a
pure function of the input (``bn="frozen"``, no augmentation).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from ncfinetune._warn import warn_once
from ncfinetune.backbones import BackboneAdapter, get_adapter
from ncfinetune.backbones.base import _arch_name
from ncfinetune.errors import ConfigError

METHODS = ("linear", "layer", "scl", "full", "lora-block", "lora")
"""Tuning methods: linear probe, Layer FT, SCL FT, full fine-tuning (SPEC section 2), and two
peft LoRA methods: ``lora-block`` (LoRA on the Linear/Conv2d layers of one block, optionally
with the SCL skip) and ``lora`` (LoRA on every block's Linear/Conv2d layers, the usual peft
baseline)."""

BLOCK_METHODS = ("layer", "scl", "lora-block")
"""Methods that tune one chosen block."""

BN_POLICIES = ("update", "frozen")
"""``update``: every BatchNorm adapts its running statistics to the downstream data in train mode
(the paper's setting, App. B.2). ``frozen``: BatchNorms outside the trained modules keep their
pretrained statistics (they stay in eval mode), which makes the frozen prefix a pure function of
the input."""

METHOD_TITLES = {
    "linear": "linear probe",
    "layer": "Layer FT",
    "scl": "SCL FT",
    "full": "full FT",
    "lora-block": "LoRA-in-block",
    "lora": "LoRA (all blocks)",
}


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
        lora_rank, lora_alpha: LoRA methods: the rank r of the update B A and its scale
            alpha / r (peft's ``LoraConfig.r`` and ``lora_alpha``; alpha defaults to r).
        lora_skip: ``lora-block`` only: also add the SCL skip from the block.
    """

    method: str = field(metadata={"help": "linear | layer | scl | full"})
    block: int | str | None = field(default=None, metadata={"help": "index or module name"})
    bn: str | None = field(default=None, metadata={"help": "update | frozen"})
    skip_norm: bool | None = field(default=None, metadata={"help": "ViT: norm the SCL skip"})
    lora_rank: int = field(default=8, metadata={"help": "LoRA methods: rank r"})
    lora_alpha: float | None = field(default=None, metadata={"help": "LoRA: scale alpha (r)"})
    lora_skip: bool = field(default=False, metadata={"help": "lora-block: add the SCL skip"})

    def __post_init__(self) -> None:
        problems = []
        if self.method not in METHODS:
            problems.append(f"method={self.method!r} is not one of {', '.join(METHODS)}")
        if (
            isinstance(self.lora_rank, bool)
            or not isinstance(self.lora_rank, int)
            or (self.lora_rank < 1)
        ):
            problems.append(f"lora_rank={self.lora_rank!r} must be an integer >= 1")
        if self.lora_alpha is not None and not self.lora_alpha > 0:
            problems.append(f"lora_alpha={self.lora_alpha!r} must be > 0")
        if self.method in BLOCK_METHODS and self.block is None:
            problems.append(
                f"method={self.method!r} tunes one block: pass block=INDEX or block=NAME "
                "(see ncfinetune.list_blocks(model))"
            )
        if self.bn is not None and self.bn not in BN_POLICIES:
            problems.append(f"bn={self.bn!r} is not one of {', '.join(BN_POLICIES)}")
        if problems:
            raise ConfigError("invalid tuning config: " + "; ".join(problems) + ".")
        if self.lora_skip and self.method != "lora-block":
            warn_once(f"lora_skip has no effect with method={self.method!r}; ignored.")
            self.lora_skip = False
        if self.method in ("linear", "full", "lora") and self.block is not None:
            warn_once(f"block={self.block!r} has no effect with method={self.method!r}; ignored.")
            self.block = None
        if self.skip_norm is not None and not self.uses_skip:
            warn_once(f"skip_norm has no effect with method={self.method!r} (no skip); ignored.")

    @property
    def uses_skip(self) -> bool:
        """True when the model adds the SCL skip (``scl``, or ``lora-block`` with ``lora_skip``)."""
        return self.method == "scl" or (self.method == "lora-block" and self.lora_skip)


class TunedModel(nn.Module):
    """A timm classifier prepared for one of the tuning methods (:data:`METHODS`).

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
        if config.method in BLOCK_METHODS:
            self.block_index = adapter.resolve(config.block)
            if config.uses_skip:
                self._check_skip_fits(self.block_index)
        self.skip_norm = self._resolve_skip_norm()
        self.bn = self._resolve_bn()
        self.prefix_inputs = False
        """True when the inputs are already the prefix's outputs (batches from a
        :func:`ncfinetune.prefix_cache.prefix_loader`): forward then runs the suffix alone."""
        self._lora_layers: list[nn.Module] = []
        if config.method.startswith("lora"):
            self._lora_layers = _inject_lora(self)
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
        if self.config.skip_norm and not is_vit and self.config.uses_skip:
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
        if self._lora_layers:  # only the low-rank factors train; the block's own weights stay
            mods += [d for m in self._lora_layers for d in (m.lora_A, m.lora_B)]
        elif self.block_index is not None:
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

        Returns the input of the tuned block (``layer``/``scl``/``lora-block``), the last
        block's output (``linear``), or ``x`` itself (``full``, ``lora``).
        """
        if self.method in ("full", "lora"):
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
        if self.method in ("full", "lora"):
            h = a.forward_blocks(a.stem(h))
            return a.classify(h, None)
        if self.method == "linear":
            return a.classify(h, None)
        h = a.blocks[self.block_index](h)
        skip = self.skip(h) if self.config.uses_skip else None
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
        feats, logits = self.forward_suffix(x if self.prefix_inputs else self.forward_prefix(x))
        return logits, feats

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits for a batch of images (or of prefix outputs when ``prefix_inputs`` is set)."""
        return self.forward_suffix(x if self.prefix_inputs else self.forward_prefix(x))[1]

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
        extra = f", skip_norm={self.skip_norm}" if self.config.uses_skip and self.skip_norm else ""
        if self._lora_layers:
            alpha = self.config.lora_alpha or self.config.lora_rank
            extra += f", LoRA r={self.config.lora_rank} alpha={alpha:g} on {len(self._lora_layers)} layers"
            extra += ", with SCL skip" if self.config.uses_skip else ""
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


def _inject_lora(tuned: TunedModel) -> list[nn.Module]:
    """Add peft LoRA adapters to the Linear/Conv2d layers of the tuned block (``lora-block``) or
    of every block (``lora``), in place; return the LoRA layers."""
    from peft import LoraConfig, inject_adapter_in_model
    from peft.tuners.lora import LoraLayer

    a = tuned.adapter
    blocks = [tuned.block_index] if tuned.block_index is not None else range(len(a.blocks))
    targets = [
        f"{a.block_names[i]}.{name}"
        for i in blocks
        for name, m in a.blocks[i].named_modules()
        if isinstance(m, (nn.Linear, nn.Conv2d))
    ]
    if not targets:
        raise ConfigError(
            f"{tuned.arch} has no Linear or Conv2d layer in the chosen block(s) for LoRA; use "
            "method='layer' or another block."
        )
    cfg = tuned.config
    config = LoraConfig(
        r=cfg.lora_rank,
        lora_alpha=cfg.lora_alpha or cfg.lora_rank,
        lora_dropout=0.0,  # keeps the frozen prefix a pure function of the input
        # a string is matched against whole module names (re.fullmatch): exactly these layers
        target_modules="|".join(re.escape(t) for t in targets),
    )
    inject_adapter_in_model(config, tuned.model)
    return [m for m in tuned.model.modules() if isinstance(m, LoraLayer)]


def wrap(
    model: nn.Module,
    method: str,
    block: int | str | None = None,
    *,
    bn: str | None = None,
    skip_norm: bool | None = None,
    lora_rank: int = 8,
    lora_alpha: float | None = None,
    lora_skip: bool = False,
) -> TunedModel:
    """Prepare ``model`` for ``method`` (one of :data:`METHODS`)."""
    return TunedModel(
        model,
        TuningConfig(
            method=method,
            block=block,
            bn=bn,
            skip_norm=skip_norm,
            lora_rank=lora_rank,
            lora_alpha=lora_alpha,
            lora_skip=lora_skip,
        ),
    )


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


def lora_block_wrap(
    model: nn.Module,
    block: int | str,
    *,
    rank: int = 8,
    alpha: float | None = None,
    skip: bool = False,
    bn: str | None = None,
    skip_norm: bool | None = None,
) -> TunedModel:
    """LoRA-in-block: peft LoRA adapters (rank ``rank``) on the Linear/Conv2d layers of one block,
    plus the classifier; ``skip=True`` adds the SCL skip from that block."""
    return wrap(
        model,
        "lora-block",
        block,
        bn=bn,
        skip_norm=skip_norm,
        lora_rank=rank,
        lora_alpha=alpha,
        lora_skip=skip,
    )
