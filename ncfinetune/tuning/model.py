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

import gc
import os
import weakref
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ncfinetune.backbones import BackboneAdapter, get_adapter
from ncfinetune.backbones.base import Prediction, arch_name
from ncfinetune.backbones.hub import BASE_ATTRIBUTE
from ncfinetune.errors import ConfigError, NonFiniteOutputs
from ncfinetune.messages import warn_once
from ncfinetune.tuning import checkpoint
from ncfinetune.tuning.batchnorm import hold_batchnorms
from ncfinetune.tuning.inputs import check_images
from ncfinetune.tuning.methods import (
    BN_POLICIES,
    FullConfig,
    LayerConfig,
    LinearConfig,
    LoRABlockConfig,
    MethodConfig,
    SCLConfig,
    method_config,
)

MethodLike = MethodConfig | str


class TunedModel(nn.Module):
    """A timm classifier prepared for one tuning method (see :mod:`ncfinetune.tuning.methods`).

    Build it with :func:`get_tuned_model` (or :func:`scl_wrap`, :func:`layer_wrap`,
    :func:`linear_wrap`, :func:`full_wrap`, :func:`lora_block_wrap`). The wrapped timm model is
    ``self.model``; it is modified in place (``requires_grad`` flags, LoRA layers), so a model
    belongs to one wrapper: wrapping a model that a live TunedModel owns raises
    :class:`ConfigError` (wrap ``copy.deepcopy(model)`` instead, or drop the first wrapper).
    """

    def __init__(self, model: nn.Module, config: MethodConfig, *, owns_model: bool = True) -> None:
        """``owns_model=False`` is for wrappers that only run the frozen prefix of a model that
        is never trained (block selection's prefix caches share one frozen copy among the
        candidate blocks): such a wrapper neither checks nor records ownership."""
        super().__init__()
        if isinstance(model, TunedModel):
            raise ConfigError("model is already a TunedModel; wrap its .model or a fresh model.")
        if not isinstance(model, nn.Module):
            raise ConfigError(
                f"model must be a timm model (torch nn.Module), got {type(model).__name__} "
                f"{str(model)[:60]!r}. Create one first: ncfinetune.create_backbone(name, "
                "num_classes) or timm.create_model(name, num_classes=...)."
            )
        if not isinstance(config, MethodConfig):
            raise ConfigError(
                f"config must be a method config such as SCLConfig(block=4), got "
                f"{type(config).__name__} {config!r}."
            )
        if owns_model:
            _check_unowned(model)
        adapter = get_adapter(model)
        self.model = model
        self.adapter: BackboneAdapter = adapter
        self.config = config
        self.feature_dim = adapter.feature_dim
        self.block_index: int | None = None
        if config.tunes_block:
            self.block_index = adapter.resolve(config.block)
            if config.uses_skip:
                self._check_skip_fits(self.block_index)
        self.prefix_stop = config.prefix_stop(len(adapter.blocks), self.block_index)
        """First block after the frozen prefix (``None``: no frozen prefix)."""
        self.skip_norm = self._resolve_skip_norm()
        self.bn = self._resolve_bn()
        self.prefix_inputs = False
        """True when the inputs are already the prefix's outputs (batches from a
        :func:`ncfinetune.tuning.prefix_cache.prefix_loader`): forward then runs the suffix alone."""
        config.prepare(self)
        self.frozen_batchnorms: list[nn.Module] = []
        """BatchNorms outside the trained modules (kept in eval mode under ``bn="frozen"``)."""
        self._freeze()
        if owns_model:  # last: only a complete wrapper owns it (and holds its BatchNorms)
            hold_batchnorms(self)
            model.__dict__[_OWNER] = weakref.ref(self)

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
                f"Blocks that fit: {', '.join(fits) or 'none'}. Pick one of them or use "
                "method='layer'."
            )

    def _resolve_skip_norm(self) -> bool:
        requested = getattr(self.config, "skip_norm", None)
        has_norm = self.adapter.has_skip_norm
        if requested and not has_norm and self.config.uses_skip:
            warn_once(f"skip_norm has no effect on {self.arch}: its adapter has no final norm.")
        if requested is None:
            return has_norm
        return bool(requested) and has_norm

    def _resolve_bn(self) -> str:
        has_bn = any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in self.model.modules())
        if self.config.bn is not None and not has_bn:
            warn_once(f"bn={self.config.bn!r} has no effect: {self.arch} has no BatchNorm layers.")
        return self.config.bn or "update"

    def trainable_modules(self) -> list[nn.Module]:
        """The modules whose parameters train, as the method defines them."""
        return self.config.trainable_modules(self)

    def _freeze(self) -> None:
        self.model.requires_grad_(False)
        for m in self.trainable_modules():
            m.requires_grad_(True)
        trained = {id(s) for m in self.trainable_modules() for s in m.modules()}
        self.frozen_batchnorms = [
            m
            for m in self.model.modules()
            if isinstance(m, nn.modules.batchnorm._BatchNorm) and id(m) not in trained
        ]
        self.train(self.model.training)

    # -- properties -------------------------------------------------------------------------
    @property
    def method(self) -> str:
        """The tuning method's name (``linear``, ``layer``, ``scl``, ``full``, ...)."""
        return self.config.name

    @property
    def arch(self) -> str:
        """The timm architecture name of the wrapped model."""
        return arch_name(self.model)

    @property
    def block_name(self) -> str | None:
        """Module name of the tuned block (None for methods without one)."""
        return None if self.block_index is None else self.adapter.block_names[self.block_index]

    @property
    def splits_prefix(self) -> bool:
        """True when :meth:`forward_prefix` runs the frozen blocks apart from the rest (adapters
        with a stem/blocks split and a method with a frozen prefix): the precondition of the
        prefix cache. Otherwise the prefix returns the images and the suffix runs everything."""
        return self.adapter.splittable and self.prefix_stop is not None

    # -- modes ------------------------------------------------------------------------------
    def train(self, mode: bool = True) -> TunedModel:
        """Set train/eval mode; with ``bn="frozen"`` frozen BatchNorms always stay in eval mode
        (also when ``train()`` is called on the wrapped model or a part of it: the wrapper
        holds them: :func:`~ncfinetune.tuning.batchnorm.hold_batchnorms`)."""
        super().train(mode)
        if mode and self.bn == "frozen":
            for m in self.frozen_batchnorms:
                m.eval()
        return self

    # -- forward ----------------------------------------------------------------------------
    def forward_prefix(self, x: torch.Tensor) -> torch.Tensor:
        """The frozen part before the first trained block, run without autograd.

        Returns the input of the tuned block (one-block methods), the last block's output
        (linear probe), or ``x`` itself where there is no separable frozen prefix (full FT,
        LoRA on every block, and families without a prefix split).
        """
        if not self.splits_prefix:
            return x
        with torch.no_grad():
            return self.adapter.forward_blocks(self.adapter.stem(x), 0, self.prefix_stop)

    def forward_suffix(self, h: torch.Tensor) -> Prediction:
        """The trained part, from the output of :meth:`forward_prefix`.

        Returns:
            ``Prediction(logits, features)``; features are the classifier's input (penultimate
            features plus the SCL skip).
        """
        a = self.adapter
        capture = {self.block_index} if self.config.uses_skip else set()
        if self.splits_prefix:
            outputs = {}
            for i in range(self.prefix_stop, len(a.blocks)):
                h = a.blocks[i](h)
                if i in capture:
                    outputs[i] = h
        else:
            h, outputs = a.forward_capture(h, capture)
        skip = self.skip(outputs[self.block_index]) if capture else None
        return a.classify(h, skip)

    def skip(self, block_output: torch.Tensor) -> torch.Tensor:
        """The SCL skip: the block output pooled (SPEC section 2) and zero-padded to phi's width."""
        if self.skip_norm:
            pooled = self.adapter.pool_normed(block_output)
        else:
            pooled = self.adapter.pool(block_output)
        return F.pad(pooled, (0, self.feature_dim - pooled.shape[1]))

    def forward_with_features(self, x: torch.Tensor) -> Prediction:
        """``Prediction(logits, features)`` in one pass; features are the classifier's input."""
        if self.prefix_inputs:
            return self.forward_suffix(x)
        check_images(self.model, x)  # a DataError saying how to convert a wrong batch
        return self.forward_suffix(self.forward_prefix(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits for a batch of images (or of prefix outputs when ``prefix_inputs`` is set)."""
        return self.forward_with_features(x).logits

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
        extra += self.config.describe(self)
        return (
            f"{self.config.title} of {self.arch}{where}, bn={self.bn}{extra}: "
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
        trained = {id(s) for m in self.trainable_modules() for s in m.modules()}
        for mod_name, mod in self.model.named_modules():
            is_bn = isinstance(mod, nn.modules.batchnorm._BatchNorm)
            if id(mod) in trained or (is_bn and self.bn == "update"):
                prefix = f"{mod_name}." if mod_name else ""
                keep.update(prefix + b for b, _ in mod.named_buffers(recurse=False))
        state = self.model.state_dict()
        return {k: v.detach() for k, v in state.items() if k in keep}

    def save_pretrained(
        self,
        path: str | os.PathLike,
        *,
        base_model: str | None = None,
        metadata: dict | None = None,
    ) -> Path:
        """Write the tuned tensors (safetensors) and metadata (JSON) to directory ``path``.

        Only what was tuned is written, atomically (see :mod:`ncfinetune.tuning.checkpoint`); LoRA
        methods also write a peft adapter (``adapter_model.safetensors``).

        Args:
            base_model: the base backbone as passed to ``create_backbone`` (a bundled name, a
                ``recipes/pretrain.py`` folder or a timm name), recorded as ``base_model`` so
                that ``ncfinetune.inference.load_tuned_folder`` can rebuild it. Default: what
                ``create_backbone`` recorded on the model (with its pretrained/checkpoint
                arguments as ``base_model_kwargs``), else null.
            metadata: more JSON facts to record (the recipes add the class names, the image
                size and the dataset); the keys written here take precedence.
        """
        tensors = self.tuned_state_dict()
        trainable, total = self.parameter_counts()
        created = getattr(self.model, BASE_ATTRIBUTE, None) or {}
        meta = {
            **(metadata or {}),
            "base_model": base_model if base_model is not None else created.get("name"),
            "architecture": self.arch,
            "model_class": type(self.model).__name__,
            "num_classes": int(self.model.num_classes),
            "method": self.method,
            "config": self.config.to_dict(),
            "block": self.block_index,
            "block_name": self.block_name,
            "bn": self.bn,
            "skip_norm": self.skip_norm if self.config.uses_skip else None,
            "trainable_params": trainable,
            "total_params": total,
        }
        if base_model is None and created:
            meta["base_model_kwargs"] = {k: v for k, v in created.items() if k != "name"}
        return checkpoint.write_checkpoint(
            path, tensors, meta, self.model, peft_config=self.config.peft_export(self)
        )

    @classmethod
    def from_pretrained(
        cls, path: str | os.PathLike, base_model: nn.Module, *, verify_base: bool = True
    ) -> TunedModel:
        """Rebuild a tuned model from a checkpoint and a fresh copy of its base model.

        Args:
            path: the directory written by :meth:`save_pretrained`.
            base_model: the same timm architecture, created with the same ``num_classes`` and
                the same pretrained weights as when tuning started. Modified in place, wrapped.
            verify_base: check the fingerprint of the base weights; a mismatch is an error.
                With False a mismatch only warns.

        Returns:
            A :class:`TunedModel` whose logits equal those of the model that was saved.
        """
        meta = checkpoint.read_tuned_config(path)
        checkpoint.check_base(path, meta, arch_name(base_model), base_model)
        settings = meta["config"]
        settings = {**settings, "block": meta["block"]} if "block" in settings else settings
        # wrap first: the LoRA methods add modules (and state keys) the checkpoint fills
        tuned = cls(base_model, method_config(meta["method"], **settings))
        checkpoint.load_weights(
            path, meta, tuned.model, expected=tuned.tuned_state_dict(), verify_base=verify_base
        )
        _check_finite_logits(tuned, path)
        return tuned


def _check_finite_logits(tuned: TunedModel, path: str | os.PathLike) -> None:
    """Raise NonFiniteOutputs when the loaded model's logits on a fixed probe batch (two seeded
    normal images at the model's input size) are NaN or infinite: finite weights that overflow
    are a diverged training run, whose predictions would be meaningless."""
    from timm.data import resolve_model_data_config

    model = tuned.model
    channels, height, width = resolve_model_data_config(model)["input_size"]
    fixed = getattr(getattr(model, "patch_embed", None), "img_size", None)
    if fixed:  # a ViT takes only the size it was made for
        height, width = fixed
    x = torch.randn(2, channels, height, width, generator=torch.Generator().manual_seed(0))
    was = model.training
    model.eval()
    try:
        with torch.no_grad():
            logits = model(x.to(next(model.parameters()).device))
    finally:
        model.train(was)
    if not bool(torch.isfinite(logits).all()):
        raise NonFiniteOutputs(
            f"the tuned model in {path} gives NaN or infinite logits on a probe batch although "
            "its weights are finite: its training diverged, so its predictions would be "
            "meaningless. Retrain it with a lower lr.",
            rows=int((~torch.isfinite(logits).all(1)).sum()),
            total=2,
        )


_OWNER = "_ncfinetune_owner"


def _check_unowned(model: nn.Module) -> None:
    """Raise if a live wrapper owns ``model`` or an earlier wrapper injected LoRA layers."""
    ref = model.__dict__.get(_OWNER)
    owner = ref() if ref is not None else None
    if owner is not None and owner.model is model:
        gc.collect()  # a dropped wrapper caught in a reference cycle is not the owner any more
        owner = ref()
    if owner is not None and owner.model is model:
        raise ConfigError(
            f"this {arch_name(model)} is already wrapped by a live TunedModel ({owner.describe()}); "
            "a second wrapper would train and describe the same tensors differently. Wrap a "
            "copy (get_tuned_model(copy.deepcopy(model), ...)) or a fresh model, or delete the "
            "first wrapper (del tuned) before wrapping again."
        )
    if ref is not None and any("lora_" in name for name, _ in model.named_parameters()):
        raise ConfigError(
            f"this {arch_name(model)} was wrapped by a LoRA method before, which injected LoRA "
            "layers into it; wrap a fresh model (or the copy you made before wrapping)."
        )


def load_tuned(
    path: str | os.PathLike, base_model: nn.Module, *, verify_base: bool = True
) -> TunedModel:
    """Rebuild a tuned model from a checkpoint (see :meth:`TunedModel.from_pretrained`)."""
    return TunedModel.from_pretrained(path, base_model, verify_base=verify_base)


def get_tuned_model(model: nn.Module, config: MethodLike, **settings) -> TunedModel:
    """Prepare ``model`` for a tuning method, peft's way: ``get_tuned_model(model,
    SCLConfig(block=4))``. ``config`` may also be a method name with flat settings,
    ``get_tuned_model(model, "scl", block=4)``.

    Returns:
        The :class:`TunedModel` (``model`` is modified in place and wrapped).
    """
    if isinstance(config, str):
        config = method_config(config, **settings)
    elif settings:
        raise ConfigError(
            f"settings {sorted(settings)} given with a config object; put them in the config."
        )
    return TunedModel(model, config)


def scl_wrap(
    model: nn.Module, block: int | str, *, bn: str | None = None, skip_norm: bool | None = None
) -> TunedModel:
    """SCL FT: train one block and the classifier, with the pooled, zero-padded skip from the block
    added to the penultimate features (no new parameters)."""
    return TunedModel(model, SCLConfig(block=block, bn=bn, skip_norm=skip_norm))


def layer_wrap(model: nn.Module, block: int | str, *, bn: str | None = None) -> TunedModel:
    """Layer FT: train one block and the classifier."""
    return TunedModel(model, LayerConfig(block=block, bn=bn))


def linear_wrap(model: nn.Module, *, bn: str | None = None) -> TunedModel:
    """Linear probe: train the classifier only."""
    return TunedModel(model, LinearConfig(bn=bn))


def full_wrap(model: nn.Module, *, bn: str | None = None) -> TunedModel:
    """Full fine-tuning: train everything (the baseline, through the same wrapper)."""
    return TunedModel(model, FullConfig(bn=bn))


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
    return TunedModel(
        model,
        LoRABlockConfig(
            block=block,
            bn=bn,
            skip_norm=skip_norm,
            lora_rank=rank,
            lora_alpha=alpha,
            lora_skip=skip,
        ),
    )


__all__ = [
    "BN_POLICIES",
    "TunedModel",
    "full_wrap",
    "get_tuned_model",
    "layer_wrap",
    "linear_wrap",
    "load_tuned",
    "lora_block_wrap",
    "scl_wrap",
]
