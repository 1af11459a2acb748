"""The tuning methods, one config class each, and their registry.

A method is a validated dataclass (peft's shape: ``SCLConfig(block=4)``) that also answers every
question the rest of ncfinetune asks about it: which modules train, where the frozen prefix
ends, whether the SCL skip is added, what the checkpoint metadata records and what it adds to the
model (the LoRA methods inject peft adapters). Nothing outside this module compares method
names: it calls :func:`method_config` to turn a name into a config and then asks the config.

Adding a method is one class here with ``@register``.

The model these classes receive as ``tuned`` is a :class:`ncfinetune.tuning.model.TunedModel`; only
its ``adapter``, ``model`` and ``block_index`` are used, so this module does not import it.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from typing import Any, ClassVar

from torch import nn

from ncfinetune.errors import ConfigError
from ncfinetune.messages import warn_once

BN_POLICIES = ("update", "frozen")
"""``update``: every BatchNorm adapts its running statistics to the downstream data in train mode
(the paper's setting, App. B.2). ``frozen``: BatchNorms outside the trained modules keep their
pretrained statistics (they stay in eval mode), which makes the frozen prefix a pure function of
the input."""

METHODS: dict[str, type[MethodConfig]] = {}
"""Registry: method name -> config class, in registration order."""


def register(cls: type[MethodConfig]) -> type[MethodConfig]:
    """Class decorator: add a method config class to :data:`METHODS` under ``cls.name``."""
    if cls.name in METHODS:
        raise ValueError(f"method {cls.name!r} is registered twice")
    METHODS[cls.name] = cls
    return cls


@dataclass
class MethodConfig:
    """Fields and behaviour every method shares. Not registered itself.

    Attributes:
        bn: BatchNorm policy, ``update`` or ``frozen`` (:data:`BN_POLICIES`); ``None`` means
            ``update`` and stays silent on models without BatchNorm.
    """

    name: ClassVar[str] = ""
    """The method's name in configs, records and checkpoints."""
    title: ClassVar[str] = ""
    """How reports name it."""
    tunes_block: ClassVar[bool] = False
    """True when the method tunes one chosen block (it then has a ``block`` field)."""

    bn: str | None = field(default=None, metadata={"help": "update | frozen (null: update)"})

    def __post_init__(self) -> None:
        problems = self._problems()
        if problems:
            raise ConfigError(f"invalid {type(self).__name__}: " + "; ".join(problems) + ".")

    def _problems(self) -> list[str]:
        if self.bn is not None and self.bn not in BN_POLICIES:
            return [f"bn={self.bn!r} is not one of {', '.join(BN_POLICIES)}"]
        return []

    # -- what the rest of ncfinetune asks -----------------------------------------------------
    @property
    def uses_skip(self) -> bool:
        """True when the classifier input gets the SCL skip from the tuned block."""
        return False

    def prefix_stop(self, num_blocks: int, block_index: int | None) -> int | None:
        """Index of the first block that is not in the frozen prefix; ``None`` when there is no
        frozen prefix (the stem itself trains or adapts)."""
        return block_index

    def trainable_modules(self, tuned: Any) -> list[nn.Module]:
        """The modules whose parameters train (the classifier, plus the method's own)."""
        mods = list(tuned.adapter.classifier_modules())
        if tuned.block_index is not None:
            mods += tuned.adapter.block_modules(tuned.block_index)
        return mods

    def prepare(self, tuned: Any) -> None:
        """Change the model before freezing (the LoRA methods inject adapters here)."""

    def describe(self, tuned: Any) -> str:
        """Method-specific details for :meth:`TunedModel.describe` (may be empty)."""
        return ""

    def peft_export(self, tuned: Any) -> Any:
        """The peft config whose adapter a checkpoint also writes in peft's format (or None)."""
        return None

    def to_dict(self) -> dict[str, Any]:
        """The config's fields, for metadata and records."""
        return dataclasses.asdict(self)


@register
@dataclass
class LinearConfig(MethodConfig):
    """Linear probe: train the classifier only."""

    name: ClassVar[str] = "linear"
    title: ClassVar[str] = "linear probe"

    def prefix_stop(self, num_blocks: int, block_index: int | None) -> int | None:
        return num_blocks


@dataclass
class BlockConfig(MethodConfig):
    """A method that tunes one chosen block.

    Attributes:
        block: 0-based block index (negative from the end) or module name; see
            :func:`ncfinetune.list_blocks`.
    """

    tunes_block: ClassVar[bool] = True
    block: int | str | None = field(default=None, metadata={"help": "index or module name"})

    def _problems(self) -> list[str]:
        problems = super()._problems()
        if self.block is None:
            problems.append(
                f"method={self.name!r} tunes one block: pass block=INDEX or block=NAME "
                "(see ncfinetune.list_blocks(model))"
            )
        elif isinstance(self.block, bool) or not isinstance(self.block, (int, str)):
            problems.append(
                f"block must be an int index or a module name, got {type(self.block).__name__} "
                f"{self.block!r}"
            )
        return problems


@register
@dataclass
class LayerConfig(BlockConfig):
    """Layer FT: train one block and the classifier."""

    name: ClassVar[str] = "layer"
    title: ClassVar[str] = "Layer FT"


@dataclass
class SkipConfig(BlockConfig):
    """A one-block method that can add the SCL skip.

    Attributes:
        skip_norm: token models only. Pass the skip through the model's final norm (``norm``,
            then pooling, then ``fc_norm``), exactly as phi(x) is made from the last block.
            ``None`` means True where the adapter has that norm (ViTs). The raw residual stream
            of an inner block has a scale unrelated to the normalised penultimate features;
            with the norm both live in the same coordinates.
    """

    skip_norm: bool | None = field(default=None, metadata={"help": "ViT: norm the SCL skip"})

    def _problems(self) -> list[str]:
        problems = super()._problems()
        if self.skip_norm is not None and not isinstance(self.skip_norm, bool):
            problems.append(
                f"skip_norm must be True, False or None (auto), got "
                f"{type(self.skip_norm).__name__} {self.skip_norm!r}"
            )
        return problems

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.skip_norm is not None and not self.uses_skip:
            warn_once(f"skip_norm has no effect with method={self.name!r} (no skip); ignored.")


@register
@dataclass
class SCLConfig(SkipConfig):
    """SCL FT: train one block and the classifier, with the block's pooled, zero-padded output
    added to the penultimate features (no new parameters)."""

    name: ClassVar[str] = "scl"
    title: ClassVar[str] = "SCL FT"

    @property
    def uses_skip(self) -> bool:
        return True


@register
@dataclass
class FullConfig(MethodConfig):
    """Full fine-tuning: train everything (the baseline, through the same wrapper)."""

    name: ClassVar[str] = "full"
    title: ClassVar[str] = "full FT"

    def _problems(self) -> list[str]:
        if self.bn == "frozen":
            warn_once("bn='frozen' has no effect with method='full': every layer is trained.")
        return super()._problems()

    def prefix_stop(self, num_blocks: int, block_index: int | None) -> int | None:
        return None

    def trainable_modules(self, tuned: Any) -> list[nn.Module]:
        return [tuned.model]


MAX_LORA_ALPHA = 1e4  # alpha / rank scales the update: beyond this the logits overflow


class _LoRAMixin:
    """LoRA fields' validation and injection, shared by the two LoRA methods."""

    lora_rank: int
    lora_alpha: float | None

    def _lora_problems(self) -> list[str]:
        problems = []
        rank = self.lora_rank
        if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
            problems.append(f"lora_rank={rank!r} must be an integer >= 1")
        alpha = self.lora_alpha
        if alpha is not None and not (
            isinstance(alpha, (int, float))
            and not isinstance(alpha, bool)
            and 0 < alpha <= MAX_LORA_ALPHA
        ):
            problems.append(
                f"lora_alpha={alpha!r} must be a finite number in (0, {MAX_LORA_ALPHA:g}] (the "
                "update is scaled by alpha / rank; None: the rank, a scale of 1)"
            )
        return problems

    def peft_config(self, target_modules: list[str]):
        """The ``peft.LoraConfig`` for exactly ``target_modules`` (module names)."""
        from peft import LoraConfig as PeftLoraConfig

        return PeftLoraConfig(
            r=self.lora_rank,
            lora_alpha=self.lora_alpha or self.lora_rank,
            lora_dropout=0.0,  # keeps the frozen prefix a pure function of the input
            # a string is matched against whole module names (re.fullmatch): exactly these
            target_modules="|".join(re.escape(t) for t in target_modules),
        )

    def lora_targets(self, tuned: Any) -> list[str]:
        """Names of the Linear/Conv2d layers that get LoRA: in the tuned block, or everywhere.

        Grouped convolutions (depthwise ones in ConvNeXt, EfficientNet, ...) are left out unless
        the rank is a multiple of their groups: peft's LoRA needs that to factor them.
        """
        a = tuned.adapter
        blocks = [tuned.block_index] if tuned.block_index is not None else range(len(a.blocks))
        module_names = {id(m): n for n, m in tuned.model.named_modules()}
        return [
            module_names[id(m)]
            for i in blocks
            for top in a.block_modules(i)
            for m in top.modules()
            if isinstance(m, nn.Linear)
            or (isinstance(m, nn.Conv2d) and self.lora_rank % m.groups == 0)
        ]

    def prepare(self, tuned: Any) -> None:
        from peft import inject_adapter_in_model

        targets = self.lora_targets(tuned)
        if not targets:
            raise ConfigError(
                f"{tuned.arch} has no Linear or Conv2d layer in the chosen block(s) for LoRA; "
                "use method='layer' or another block."
            )
        inject_adapter_in_model(self.peft_config(targets), tuned.model)

    def peft_export(self, tuned: Any) -> Any:
        return tuned.model.peft_config["default"]  # what inject_adapter_in_model recorded

    def trainable_modules(self, tuned: Any) -> list[nn.Module]:
        # only the low-rank factors train; the blocks' own weights stay frozen
        from peft.tuners.lora import LoraLayer

        mods = list(tuned.adapter.classifier_modules())
        lora = [m for m in tuned.model.modules() if isinstance(m, LoraLayer)]
        return mods + [d for m in lora for d in (m.lora_A, m.lora_B)]

    def describe(self, tuned: Any) -> str:
        from peft.tuners.lora import LoraLayer

        n = sum(isinstance(m, LoraLayer) for m in tuned.model.modules())
        alpha = self.lora_alpha or self.lora_rank
        return f", LoRA r={self.lora_rank} alpha={alpha:g} on {n} layers"


@register
@dataclass
class LoRABlockConfig(_LoRAMixin, SkipConfig):
    """LoRA-in-block: peft LoRA adapters on the Linear/Conv2d layers of one block, plus the
    classifier; ``lora_skip=True`` also adds the SCL skip from that block.

    Attributes:
        lora_rank: rank r of the update B A (peft's ``LoraConfig.r``).
        lora_alpha: scale alpha / r (peft's ``lora_alpha``); ``None`` means the rank.
        lora_skip: also add the SCL skip from the block.
    """

    name: ClassVar[str] = "lora-block"
    title: ClassVar[str] = "LoRA-in-block"

    lora_rank: int = field(default=8, metadata={"help": "rank r of the LoRA update"})
    lora_alpha: float | None = field(default=None, metadata={"help": "LoRA scale alpha (r)"})
    lora_skip: bool = field(default=False, metadata={"help": "also add the SCL skip"})

    def _problems(self) -> list[str]:
        return super()._problems() + self._lora_problems()

    @property
    def uses_skip(self) -> bool:
        return bool(self.lora_skip)

    def describe(self, tuned: Any) -> str:
        return super().describe(tuned) + (", with SCL skip" if self.uses_skip else "")


@register
@dataclass
class LoRAConfig(_LoRAMixin, MethodConfig):
    """LoRA on the Linear/Conv2d layers of every block, plus the classifier (the usual peft
    baseline). Fields as :class:`LoRABlockConfig`, without the block and the skip."""

    name: ClassVar[str] = "lora"
    title: ClassVar[str] = "LoRA (all blocks)"

    lora_rank: int = field(default=8, metadata={"help": "rank r of the LoRA update"})
    lora_alpha: float | None = field(default=None, metadata={"help": "LoRA scale alpha (r)"})

    def _problems(self) -> list[str]:
        return super()._problems() + self._lora_problems()

    def prefix_stop(self, num_blocks: int, block_index: int | None) -> int | None:
        return None


def method_names() -> tuple[str, ...]:
    """The registered method names, in registration order."""
    return tuple(METHODS)


def method_class(name: str) -> type[MethodConfig]:
    """The config class of method ``name``; a clear error for an unknown name."""
    if name not in METHODS:
        raise ConfigError(
            f"method={name!r} is not one of {', '.join(METHODS)}. Pass one of these names, or a "
            "config object such as ncfinetune.SCLConfig(block=4)."
        )
    return METHODS[name]


def method_config(name: str, **settings: Any) -> MethodConfig:
    """Build the config of method ``name`` from flat settings (as recipes and checkpoints keep
    them: ``block``, ``bn``, ``skip_norm``, ``lora_rank``, ``lora_alpha``, ``lora_skip``).

    A setting the method does not have warns once (it has no effect) when it is not at its
    neutral value (``None``/``False``/the default); an unknown setting is an error.
    """
    if name not in METHODS:  # one error listing every problem (the bn check is shared)
        problems = [f"method={name!r} is not one of {', '.join(METHODS)}"]
        bn = settings.get("bn")
        if bn is not None and bn not in BN_POLICIES:
            problems.append(f"bn={bn!r} is not one of {', '.join(BN_POLICIES)}")
        raise ConfigError(
            "invalid tuning config: " + "; ".join(problems) + ". Pass a method name, or a config "
            "object such as ncfinetune.SCLConfig(block=4)."
        )
    cls = METHODS[name]
    known = {f.name for f in dataclasses.fields(cls)}
    every = {f.name: f for c in METHODS.values() for f in dataclasses.fields(c)}
    unknown = sorted(set(settings) - set(every))
    if unknown:
        raise ConfigError(
            f"unknown method setting(s) {', '.join(unknown)}; valid: {', '.join(sorted(every))}."
        )
    kept = {}
    for key, value in settings.items():
        if key in known:
            kept[key] = value
        elif value not in (None, False) and value != every[key].default:
            warn_once(f"{key}={value!r} has no effect with method={name!r}; ignored.")
    return cls(**kept)


__all__ = [
    "BN_POLICIES",
    "METHODS",
    "BlockConfig",
    "FullConfig",
    "LayerConfig",
    "LinearConfig",
    "LoRABlockConfig",
    "LoRAConfig",
    "MethodConfig",
    "SCLConfig",
    "SkipConfig",
    "method_class",
    "method_config",
    "method_names",
    "register",
]
