"""The config sections the recipes share, and the checks behind them.

``finetune`` is ``backbone`` + ``data`` + ``tuning`` + ``optim`` + ``run``; ``select`` shares
``backbone`` and ``data`` (so a block selected by one is selected on the training rows the other
trains on); ``eval`` and ``predict`` share :class:`TunedConfig`. Each section validates its own
keys and returns every problem (:func:`ncfinetune.recipes.config.parse_config` raises them as
one error); the tuning section asks the method registry (:mod:`ncfinetune.tuning.methods`).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import ncfinetune.selection as S
from ncfinetune.backbones.hub import DEFAULT_BACKBONE
from ncfinetune.errors import ConfigError
from ncfinetune.messages import warn_once
from ncfinetune.recipes.checks import (
    bound_problems,
    every_problems,
    model_problems,
    output_problems,
    seed_problems,
    tracker_problems,
)
from ncfinetune.recipes.config import key, section
from ncfinetune.training.device import LOOP_PRECISIONS, precision_problem
from ncfinetune.training.length import DEFAULT_BATCH, DEFAULT_EPOCHS, MIN_STEPS
from ncfinetune.tuning.methods import BN_POLICIES, method_class, method_config, method_names

RESUME_OVERRIDABLE = ("epochs", "lr", "launch")
"""The keys ``resume_override`` may name: the schedule can be rebuilt for new values of these
(``launch``: the number of processes and the global batch)."""
COMPILE_BACKENDS = ("inductor", "aot_eager", "eager", "cudagraphs")  # torch.compile, via accelerate


# -- the downstream sections: finetune and select -------------------------------------------------
@dataclass
class BackboneSection:
    """The backbone: a bundled name, a recipes/pretrain.py folder, or a timm name with
    pretrained or checkpoint."""

    model: str = key(DEFAULT_BACKBONE, "a bundled backbone, a pretrain folder or a timm name")
    pretrained: bool = key(False, "timm name: download its pretrained weights (hub)")
    checkpoint: str | None = key(None, "timm name: a local weights file for it")

    def validate(self) -> list[str]:
        p = (
            ["give pretrained or checkpoint, not both"]
            if self.pretrained and self.checkpoint
            else []
        )
        return p + model_problems(self.model, self.checkpoint)

    def build(self, num_classes: int):
        """The backbone with a fresh ``num_classes``-way classifier."""
        from ncfinetune.backbones.hub import create_backbone

        return create_backbone(
            self.model, num_classes, pretrained=self.pretrained, checkpoint=self.checkpoint
        )


@dataclass
class DataSection:
    """The downstream data: the source, its classes, its split and the training subset."""

    dataset: str = key(
        "digits", "digits | fashion_mnist | a folder | a .csv/.parquet file | a hub name"
    )
    data_dir: str | None = key(None, "fashion_mnist: folder of the IDX files; hub: its data_dir")
    image_column: str | None = key(None, "the table's image column (null = detected)")
    label_column: str | None = key(None, "the table's label column (null = detected)")
    classes: list[int] | None = key(None, "keep these classes, renumbered 0..K-1 (null = all)")
    allow_outside_paths: bool = key(
        False, ".csv/.parquet: allow image paths outside the table's folder (absolute, ../)"
    )
    skip_unreadable: bool = key(
        False, "check every image at load time and leave out unreadable ones (counted)"
    )
    per_class: int | None = key(None, "class-balanced, seeded, nested training subset (null = all)")
    test_fraction: float = key(0.2, "test share held out when the source has no test split")
    image_size: int | None = key(None, "input size in pixels (null = the backbone's)")

    def validate(self) -> list[str]:
        p = []
        if not 0 < self.test_fraction < 1:
            p.append(f"test_fraction must be in (0, 1), got {self.test_fraction}")
        p += bound_problems(self, per_class=">=1", image_size=">=1")
        if self.classes is not None:
            if len(set(self.classes)) < 2:
                p.append(f"classes must name at least 2 classes, got {self.classes}")
            if len(set(self.classes)) != len(self.classes):
                p.append(f"classes lists a class twice: {self.classes}")
            if any(c < 0 for c in self.classes):
                p.append(f"classes are label indices >= 0, got {self.classes}")
        return p

    def load(self, seed: int):
        """The dataset (``ncfinetune.data.ImageData``), restricted to ``classes`` if given;
        ``seed`` seeds the split of a source without a test split."""
        import ncfinetune.data as nd

        data = nd.load_image_dataset(
            self.dataset, image_column=self.image_column, label_column=self.label_column,
            data_dir=self.data_dir, test_fraction=self.test_fraction, seed=seed,
            allow_outside_paths=self.allow_outside_paths, skip_unreadable=self.skip_unreadable,
        )  # fmt: skip
        return nd.select_classes(data, self.classes) if self.classes else data


@dataclass
class DownstreamConfig:
    """A config with ``backbone`` and ``data`` sections and a ``run`` section with a ``seed``:
    how finetune and select load both the same way."""

    backbone: BackboneSection = section(BackboneSection)
    data: DataSection = section(DataSection)

    def load_data(self):
        return self.data.load(self.run.seed)

    def load_model(self, num_classes: int):
        return self.backbone.build(num_classes)


# -- finetune's own sections ----------------------------------------------------------------------
@dataclass
class FinetuneData(DataSection):
    """The downstream data: the source, its classes, its split, the training subset and the
    validation rows."""

    train_size: int | None = key(
        None, "class-balanced training subset of this many images (null = all)"
    )
    val_fraction: float | None = key(
        None,
        "validation rows (val_accuracy at each evaluation). null = auto: with a training "
        "subset (per_class / train_size), as many training-split rows outside it as it holds "
        "(at least 100, as available); with the whole split, none. A share in (0, 1): that "
        "share of the rows outside the subset (without one: held out of the training split). "
        "0 = none",
    )
    augment: bool = key(False, "timm's random training augmentation (crop, flip, colour)")

    def validate(self) -> list[str]:
        p = super().validate()
        if self.val_fraction is not None and not 0 <= self.val_fraction < 1:
            p.append(f"val_fraction must be in [0, 1) or null (auto), got {self.val_fraction}")
        if self.per_class is not None and self.train_size is not None:
            p.append("give per_class or train_size, not both")
        return p + bound_problems(self, train_size=">=1")


@dataclass
class TuningSection:
    """The tuning method and its settings, checked by the method registry
    (ncfinetune.tuning.methods): a setting the method does not have warns and is reset."""

    UNSET: ClassVar[dict[str, Any]] = {
        "block": None, "bn": None, "skip_norm": None, "lora_rank": 8, "lora_alpha": None,
        "lora_skip": False,
    }  # fmt: skip
    """Each method setting and the value that means "not set" (the rank has none: its default)."""

    method: str = key(
        "scl",
        " | ".join(method_names()) + " | auto (select_method on the training subset: the method, "
        "its block and lr, compared at the run's steps; block and lr are then chosen too)",
    )
    block: str | None = key("4", "index, name, or auto (select_block on the training subset)")
    select_rule: str = key(
        S.DEFAULT_RULE,
        f"block auto: {' | '.join(S.RULES)} (ncfinetune.select_block; its probes run at its "
        "lr, 0.03, or with lr auto choose the lr with the block)",
    )
    select_max_percent: float | None = key(
        S.MAX_TRAINABLE_PERCENT,
        "block auto: parameter budget of the candidates (% trainable; null = no budget)",
    )
    select_max_images: int = key(
        5000, "block / lr auto: selection runs on a class-balanced sample of the training subset"
    )
    bn: str | None = key(None, "BatchNorm statistics: update | frozen (null = update)")
    skip_norm: bool | None = key(None, "ViT SCL: pass the skip through the final norm (null = yes)")
    lora_rank: int = key(8, "lora-block / lora: rank of the peft LoRA update")
    lora_alpha: float | None = key(None, "LoRA scale alpha (null = rank)")
    lora_skip: bool = key(False, "lora-block: also add the SCL skip from the block")

    def validate(self) -> list[str]:
        p = []
        if self.method == "auto":
            return p + self._select_problems()
        if self.method not in method_names():
            p.append(f"method {self.method!r} is not one of {', '.join(method_names())} or auto")
        elif method_class(self.method).tunes_block and self.block is None:
            p.append(f"method {self.method!r} needs a block (index, name or auto)")
        elif self.block == "auto" and not method_class(self.method).tunes_block:
            p.append(
                f"block 'auto' needs a one-block method (layer, scl, ...), got {self.method!r}"
            )
        p += self._select_problems()
        if not p:  # what the registry checks beyond these (block auto: any block stands in)
            settings = self.settings()
            if settings.get("block") == "auto":
                settings["block"] = 0
            try:
                method_config(self.method, **settings)
            except ConfigError as e:
                p.append(str(e))
        return p

    def _select_problems(self) -> list[str]:
        p = []
        if self.select_rule not in S.RULES:
            p.append(f"select_rule {self.select_rule!r} is not one of {', '.join(S.RULES)}")
        if self.bn not in (None, *BN_POLICIES):
            p.append(f"bn {self.bn!r} is not one of {', '.join(BN_POLICIES)}")
        if self.select_max_images < 1:
            p.append(f"select_max_images must be >= 1, got {self.select_max_images}")
        return p + bound_problems(
            self, select_max_percent="(0,100]", lora_rank=">=1", lora_alpha=">0"
        )

    def settings(self) -> dict[str, Any]:
        """The settings the method has (``method_config(method, **settings)``)."""
        return self.settings_for(self.method)

    def settings_for(self, method: str) -> dict[str, Any]:
        """The settings ``method`` has, from this section (``--method auto``: the chosen one)."""
        fields = {f.name for f in dataclasses.fields(method_class(method))}
        return {k: getattr(self, k) for k in self.UNSET if k in fields}

    def without_unused(self) -> TuningSection:
        """This section with the settings the method does not have reset to "not set", with
        one warning naming them: what config.yaml and the metrics record is then what ran
        (e.g. ``--method linear --block 3``: no block is tuned, and block is recorded null)."""
        if self.method == "auto":  # the chosen method's settings apply; the rest are unused
            return self
        have = self.settings()
        unused = {
            k: getattr(self, k)
            for k, unset in self.UNSET.items()
            if k not in have and getattr(self, k) != unset
        }
        if not unused:
            return self
        warn_once(
            f"method {self.method!r} has no {', '.join(unused)} setting: "
            + ", ".join(f"{k}={v!r}" for k, v in unused.items())
            + " has no effect and is recorded as "
            + ", ".join(f"{k}={self.UNSET[k]!r}" for k in unused)
            + " (drop it from the command line or config to silence this)."
        )
        return dataclasses.replace(self, **{k: self.UNSET[k] for k in unused})

    def tuned_block(self) -> str | None:
        """The configured block where the method tunes one (else None: it has no effect);
        ``"auto"`` with ``--method auto``."""
        if self.method == "auto":
            return "auto"
        return self.block if method_class(self.method).tunes_block else None


@dataclass
class OptimSection:
    """Optimisation: the optimizer, the cosine schedule and the batches (paper defaults,
    SPEC section 5)."""

    optimizer: str = key("sgd", "sgd (momentum, no Nesterov) | adamw")
    lr: float | str = key(
        0.1,
        "a number, or auto: short probes at 0.1, 0.03, 0.01 on held-out training rows choose it "
        "(with --block auto, together with the block); never the test split",
    )
    min_lr: float = key(1e-4, "the cosine schedule's final lr")
    momentum: float = key(0.9, "SGD momentum")
    weight_decay: float = key(1e-4, "on every trained parameter")
    epochs: int | None = key(
        None,
        f"passes over the training subset; null = the default length: {DEFAULT_EPOCHS} epochs, "
        "raised on small data to reach at least min_steps optimizer steps (with max_steps: "
        f"{DEFAULT_EPOCHS}; ncfinetune.training.length); printed at the start, recorded in "
        "metrics.json",
    )
    min_steps: int = key(
        MIN_STEPS,
        "with epochs null: the fewest optimizer steps of a run (0 = always "
        f"{DEFAULT_EPOCHS} epochs); chosen leave one target out (benchmarks/train_length.py)",
    )
    batch_size: int = key(
        DEFAULT_BATCH, "images per process per step (x processes x grad_accum per update)"
    )
    global_batch_size: int | None = key(
        None,
        "images per optimizer update over all processes; replaces batch_size with "
        "global_batch_size / (processes x grad_accum), which must divide it (null = batch_size)",
    )
    grad_accum: int = key(1, "batches accumulated per optimizer update")
    max_steps: int | None = key(None, "batches per epoch and process; for smoke tests")

    def validate(self) -> list[str]:
        p = []
        if self.optimizer not in ("sgd", "adamw"):
            p.append(f"optimizer {self.optimizer!r} is not one of sgd, adamw")
        for name in ("batch_size", "grad_accum"):
            if getattr(self, name) < 1:
                p.append(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.lr != "auto" and not (isinstance(self.lr, float) and self.lr > 0):
            p.append(f"lr must be a number > 0 or auto, got {self.lr!r}")
        p += every_problems(self, ("epochs", "max_steps", "global_batch_size"))
        p += bound_problems(
            self, weight_decay=">=0", min_lr=">=0", momentum="[0,1)", min_steps=">=0"
        )
        if isinstance(self.lr, float) and self.min_lr > self.lr:
            p.append(f"min_lr ({self.min_lr}) must be <= lr ({self.lr}): the cosine decays to it")
        return p


@dataclass
class FinetuneRun:
    """The run: seed, precision and speed, evaluation, checkpoints, output and resuming."""

    seed: int = key(0, "seeds the split, the subset, the classifier's init and the shuffling")
    mixed_precision: str | None = key(
        None,
        "null = accelerate's choice (accelerate launch --mixed_precision, its config file or "
        "ACCELERATE_MIXED_PRECISION; none: no) | no | fp16 | bf16 | auto (bf16 where the device "
        "computes it natively, else no); a value here wins over accelerate's",
    )
    channels_last: bool | None = key(None, "null = auto: on for conv nets (measured faster here)")
    compile: str | None = key(None, "a torch.compile backend (e.g. inductor), via accelerate")
    cpu_threads: int | None = key(None, "CPU only; null = cores / processes on this machine")
    num_workers: int = key(0, "data loader worker processes (0 = load in the training process)")
    prefix_cache: bool | None = key(
        None, "null = auto: cache the frozen prefix's outputs when legal"
    )
    metric: str = key("accuracy", "the test metric (an evaluate module: accuracy, or a hub metric)")
    nc1: bool = key(True, "record the penultimate NC1 on the training subset at each evaluation")
    eval_every: int | None = key(
        None, "validation and NC1 every N epochs and after the last (null = every ceil(epochs/10))"
    )
    test_every: int | None = key(None, "also test every N epochs (null = once, after the last)")
    save_every: int | None = key(
        None, "a checkpoint every N epochs, after the last and at stop_after (null = eval_every)"
    )
    keep_last: int = key(1, "checkpoints kept (older ones go once a newer one is complete)")
    output_dir: str = key(
        "runs/finetune", "where the run writes (a folder holding a run is not reused)"
    )
    resume: bool = key(
        False, "continue the newest checkpoint in output_dir, its saved config.yaml as defaults"
    )
    resume_override: list[str] | None = key(
        None,
        "with resume: what may differ from the saved run: epochs, lr, launch (processes and "
        "global batch); the schedule is rebuilt to end at min_lr and the change recorded",
    )
    stop_after: int | None = key(None, "stop after this many epochs (simulates an interruption)")
    tracker: str | None = key(
        "tensorboard", "tensorboard (logs under output_dir), none, or another accelerate tracker"
    )

    def validate(self) -> list[str]:
        p = seed_problems(self.seed)
        problem = precision_problem(self.mixed_precision)
        p += [problem] if problem else []
        if self.cpu_threads is not None and self.cpu_threads < 1:
            p.append(f"cpu_threads must be >= 1 or null (auto), got {self.cpu_threads}")
        if self.compile is not None and self.compile not in COMPILE_BACKENDS:
            p.append(
                f"compile {self.compile!r} is not a torch.compile backend; use one of "
                f"{', '.join(COMPILE_BACKENDS)} or null (no compilation)"
            )
        p += every_problems(self, ("eval_every", "test_every", "save_every"))
        if self.keep_last < 1:
            p.append(f"keep_last must be >= 1, got {self.keep_last}")
        bad = [k for k in self.resume_override or [] if k not in RESUME_OVERRIDABLE]
        if bad:
            p.append(
                f"resume_override {','.join(bad)}: only {', '.join(RESUME_OVERRIDABLE)} "
                "can change on --resume"
            )
        if self.resume_override and not self.resume:
            p.append("resume_override only applies with --resume")
        p += bound_problems(self, num_workers=">=0", stop_after=">=1")
        return p + tracker_problems(self.tracker) + output_problems("output_dir", self.output_dir)


# -- eval and predict -----------------------------------------------------------------------------
@dataclass
class TunedConfig:
    """The keys shared by eval and predict: the tuned folder, how to rebuild its base backbone,
    and how to run it (see :mod:`ncfinetune.inference`)."""

    tuned: str = key("runs/finetune/tuned", "a folder written by the finetune recipe (its tuned/)")
    model: str | None = key(
        None,
        "the base backbone: null = the one the folder records (base_model); a bundled name, "
        "a pretrain folder or a timm name",
    )
    pretrained: bool | None = key(None, "timm base: download its hub weights (null = as recorded)")
    checkpoint: str | None = key(None, "timm base: a local weights file (null = as recorded)")
    verify_base: bool = key(True, "check the base weights' fingerprint (false: warn on a mismatch)")
    image_size: int | None = key(None, "null = the size it was tuned at, else the backbone's")
    batch_size: int = key(256, "images per forward pass")
    mixed_precision: str | None = key(
        "no",
        "no (fp32) | bf16 | auto (bf16 where the device has it natively); null = accelerate's "
        "choice (ACCELERATE_MIXED_PRECISION; fp16: fp32)",
    )
    device: str | None = key(None, "null = cuda when available, else cpu")

    def validate(self) -> list[str]:
        p = []
        if problem := precision_problem(self.mixed_precision, ("auto", *LOOP_PRECISIONS)):
            p.append(problem)
        if self.batch_size < 1:
            p.append(f"batch_size must be >= 1, got {self.batch_size}")
        if self.image_size is not None and self.image_size < 1:
            p.append(f"image_size must be >= 1 or null, got {self.image_size}")
        if self.device is not None:
            import torch

            try:
                torch.device(self.device)
            except (RuntimeError, ValueError):
                p.append(
                    f"device {self.device!r} is not a torch device: pass cpu, cuda, cuda:N or mps "
                    "(or null: cuda when available, else cpu)"
                )
        if not Path(self.tuned).is_dir():
            p.append(
                f"tuned {self.tuned} is not a folder: pass the tuned/ folder a finetune run "
                "wrote (e.g. runs/finetune/tuned)"
            )
        return p

    def load_kwargs(self) -> dict[str, Any]:
        """Arguments for ``ncfinetune.inference.load_tuned_folder`` (and predict/evaluate)."""
        return {
            "base_model": self.model,
            "pretrained": self.pretrained,
            "checkpoint": self.checkpoint,
            "verify_base": self.verify_base,
        }

    def run_kwargs(self) -> dict[str, Any]:
        """Image size, batch, precision (``auto`` resolved for the device) and device."""
        from ncfinetune.training.device import default_device, loop_precision, resolve_precision

        device = default_device(self.device)
        return {
            "image_size": self.image_size,
            "batch_size": self.batch_size,
            "precision": loop_precision(resolve_precision(self.mixed_precision, device)),
            "device": device,
        }
