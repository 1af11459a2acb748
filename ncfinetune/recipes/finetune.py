"""Fine-tune a timm backbone with linear probe, Layer FT, SCL FT or full FT.

    accelerate launch recipes/finetune.py                      # bundled default, offline
    accelerate launch recipes/finetune.py --config recipes/configs/fmnist59_scl.yaml --epochs 5

With no arguments: SCL FT of the bundled resnet18 (pretrained here on Fashion-MNIST classes 0-4)
at block 4 on scikit-learn's digits. Any config key can be overridden as ``--key value``.
Writes ``config.yaml``, TensorBoard logs (loss and lr per optimizer step), checkpoints every
``save_every`` epochs and after the last (``--resume`` continues from the newest), ``metrics.json``
and the tuned weights (``tuned/``) under ``output_dir``. Validation and NC1 run every
``eval_every`` epochs, the test split once at the end.
"""

from __future__ import annotations

import dataclasses
import json
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import DataLoaderConfiguration, set_seed

import ncfinetune
import ncfinetune.messages
import ncfinetune.tuning.methods
import ncfinetune.selection
import ncfinetune.data as nd
from ncfinetune.recipes import launch, runs
from ncfinetune.recipes.config import (
    DownstreamConfig,
    bound_problems,
    config_to_dict,
    output_problems,
    parse_config,
    parse_overrides,
    run_cli,
    save_config,
)
from ncfinetune.files import finite_json, write_json
from ncfinetune.recipes.engine import (
    Stopwatch,
    build_schedule,
    collect_nc1,
    latest_training_state,
    load_training_state,
    predict,
    save_training_state,
    set_cpu_threads,
    train_epoch,
)
from ncfinetune.metrics.modules import load_metric
from ncfinetune.tuning.prefix_cache import CacheTooLarge, prefix_blocker, prefix_loader
from ncfinetune.training.device import (
    choose_precision,
    launch_device_type,
    loop_precision,
    precision_problem,
    use_channels_last,
)
from ncfinetune.training.loop import build_optimizer, diverged

DEFAULTS = Path(__file__).parent / "configs" / "default.yaml"
COMPILE_BACKENDS = ("inductor", "aot_eager", "eager", "cudagraphs")  # torch.compile, via accelerate


@dataclass
class FinetuneConfig(DownstreamConfig):
    # backbone and data keys: DownstreamConfig (model, pretrained, checkpoint, dataset, data_dir,
    # image_column, label_column, classes, per_class, test_fraction, image_size, seed)

    train_size: int | None = None  # class-balanced training subset of this many images (null = all)
    # validation rows (val_accuracy, each evaluation): null = auto: with a training subset
    # (per_class / train_size), as many training-split rows outside it as it holds (at least
    # 100, as available); with the whole split, none. A share in (0, 1): that share of the rows
    # outside the subset (without one: held out of the training split). 0 = none
    val_fraction: float | None = None
    augment: bool = False  # timm's random training augmentation (crop, flip, colour)
    # method
    method: str = "scl"  # linear | layer | scl | full | lora-block | lora
    block: str | None = "4"  # index, name, or "auto" (select_block on the training subset)
    # block auto: probe | probe_accuracy | middle | curve | linear (ncfinetune.select_block;
    # its probes run at its lr, 0.03, or with lr: auto choose the lr with the block)
    select_rule: str = ncfinetune.selection.DEFAULT_RULE
    # block auto: parameter budget of the candidates (% trainable; null = no budget)
    select_max_percent: float | None = ncfinetune.selection.MAX_TRAINABLE_PERCENT
    # block auto / lr auto: selection runs on a class-balanced sample of the training subset
    select_max_images: int = 5000
    bn: str | None = None  # BatchNorm statistics: update | frozen (null = update)
    skip_norm: bool | None = None  # ViT SCL: pass the skip through the final norm (null = yes)
    lora_rank: int = 8  # lora-block / lora: rank of the peft LoRA update
    lora_alpha: float | None = None  # LoRA scale alpha (null = rank)
    lora_skip: bool = False  # lora-block: also add the SCL skip from the block
    prefix_cache: bool | None = None  # null = auto: cache the frozen prefix's outputs when legal
    # optimisation (paper defaults, SPEC section 5)
    optimizer: str = "sgd"  # sgd (momentum, no Nesterov) | adamw
    # a number, or auto: short probes at 0.1, 0.03, 0.01 on held-out training rows choose it
    # (with --block auto, together with the block); never the test split
    lr: float | str = 0.1
    min_lr: float = 1e-4  # the cosine schedule's final lr
    momentum: float = 0.9  # SGD momentum
    weight_decay: float = 1e-4  # on every trained parameter
    epochs: int = 10  # passes over the training subset
    batch_size: int = 64  # images per process per step (x processes x grad_accum per update)
    # images per optimizer update over all processes; replaces batch_size with
    # global_batch_size / (processes x grad_accum), which must divide it (null = use batch_size)
    global_batch_size: int | None = None
    grad_accum: int = 1  # batches accumulated per optimizer update
    # null = accelerate's choice (accelerate launch --mixed_precision, its config file or
    # ACCELERATE_MIXED_PRECISION; none: no) | no | fp16 | bf16 | auto (bf16 where the device
    # computes it natively, else no); a value here wins over accelerate's
    mixed_precision: str | None = None
    channels_last: bool | None = None  # null = auto: on for conv nets (measured faster here)
    compile: str | None = None  # a torch.compile backend (e.g. inductor), via accelerate
    cpu_threads: int | None = None  # CPU only; null = cores / processes on this machine
    num_workers: int = 0  # data loader worker processes (0 = load in the training process)
    max_steps: int | None = None  # batches per epoch and process; for smoke tests
    # evaluation and output
    metric: str = "accuracy"  # the test metric (an evaluate module: accuracy, or a hub metric)
    nc1: bool = True  # record the penultimate NC1 on the training subset at each evaluation
    # validation and NC1 every N epochs and after the last (null = auto: every ceil(epochs/10))
    eval_every: int | None = None
    test_every: int | None = None  # also test every N epochs (null = once, after the last epoch)
    # a checkpoint every N epochs, after the last and at stop_after (null = as eval_every)
    save_every: int | None = None
    keep_last: int = 1  # checkpoints kept (older ones are deleted once a newer one is complete)
    output_dir: str = "runs/finetune"  # where the run writes (a folder holding a run is not reused)
    # continue the newest checkpoint in output_dir, with its saved config.yaml as the defaults
    resume: bool = False
    # with resume: keys allowed to differ from the saved config: epochs and/or lr (epochs,lr)
    resume_override: list[str] | None = None
    stop_after: int | None = None  # stop after this many epochs (simulates an interruption)
    # tensorboard (logs under output_dir), none, or another accelerate tracker that is installed
    tracker: str | None = "tensorboard"

    def validate(self) -> list[str]:
        p = super().validate()
        if self.cpu_threads is not None and self.cpu_threads < 1:
            p.append(f"cpu_threads must be >= 1 or null (auto), got {self.cpu_threads}")
        methods = ncfinetune.tuning.methods.METHODS
        if self.method not in methods:
            p.append(f"method {self.method!r} is not one of {', '.join(methods)}")
        elif methods[self.method].tunes_block and self.block is None:
            p.append(f"method {self.method!r} needs a block (index, name or auto)")
        elif self.block == "auto" and not methods[self.method].tunes_block:
            p.append(
                f"block 'auto' needs a one-block method (layer, scl, ...), got {self.method!r}"
            )
        if self.select_rule not in ncfinetune.selection.RULES:
            p.append(
                f"select_rule {self.select_rule!r} is not one of {', '.join(ncfinetune.selection.RULES)}"
            )
        if self.bn not in (None, *ncfinetune.tuning.methods.BN_POLICIES):
            p.append(f"bn {self.bn!r} is not one of update, frozen")
        if self.optimizer not in ("sgd", "adamw"):
            p.append(f"optimizer {self.optimizer!r} is not one of sgd, adamw")
        if problem := precision_problem(self.mixed_precision):
            p.append(problem)
        if self.compile is not None and self.compile not in COMPILE_BACKENDS:
            p.append(
                f"compile {self.compile!r} is not a torch.compile backend; use one of "
                f"{', '.join(COMPILE_BACKENDS)} or null (no compilation)"
            )
        for key in ("epochs", "batch_size", "grad_accum"):
            if getattr(self, key) < 1:
                p.append(f"{key} must be >= 1, got {getattr(self, key)}")
        if self.lr != "auto" and not (isinstance(self.lr, float) and self.lr > 0):
            p.append(f"lr must be a number > 0 or auto, got {self.lr!r}")
        if self.select_max_images < 1:
            p.append(f"select_max_images must be >= 1, got {self.select_max_images}")
        if self.val_fraction is not None and not 0 <= self.val_fraction < 1:
            p.append(f"val_fraction must be in [0, 1) or null (auto), got {self.val_fraction}")
        for key in ("eval_every", "test_every", "save_every", "max_steps"):
            if getattr(self, key) is not None and getattr(self, key) < 1:
                p.append(f"{key} must be >= 1 or null, got {getattr(self, key)}")
        if self.keep_last < 1:
            p.append(f"keep_last must be >= 1, got {self.keep_last}")
        if self.per_class is not None and self.train_size is not None:
            p.append("give per_class or train_size, not both")
        if self.global_batch_size is not None and self.global_batch_size < 1:
            p.append(f"global_batch_size must be >= 1 or null, got {self.global_batch_size}")
        bad = [k for k in self.resume_override or [] if k not in runs.RESUME_OVERRIDABLE]
        if bad:
            p.append(
                f"resume_override {','.join(bad)}: only {', '.join(runs.RESUME_OVERRIDABLE)} "
                "can change on --resume"
            )
        if self.resume_override and not self.resume:
            p.append("resume_override only applies with --resume")
        p += bound_problems(
            self, train_size=">=1", weight_decay=">=0", min_lr=">=0", momentum="[0,1)",
            num_workers=">=0", select_max_percent="(0,100]", lora_rank=">=1", lora_alpha=">0",
            stop_after=">=1",
        )  # fmt: skip
        if isinstance(self.lr, float) and self.min_lr > self.lr:
            p.append(f"min_lr ({self.min_lr}) must be <= lr ({self.lr}): the cosine decays to it")
        p += tracker_problems(self.tracker)
        p += output_problems("output_dir", self.output_dir)
        return p


def tracker_problems(tracker: str | None) -> list[str]:
    """A problem when ``tracker`` is not an accelerate tracker installed here (or none)."""
    import importlib.util

    from accelerate.utils import LoggerType, imports

    if tracker in (None, "none"):
        return []
    names = [t.value for t in LoggerType if t.value != "all"]
    if tracker not in names:
        return [f"tracker {tracker!r} is not one of none, {', '.join(names)} (accelerate's)"]
    check = getattr(imports, f"is_{tracker}_available", None)
    available = check() if check else importlib.util.find_spec(tracker) is not None
    if not available:
        return [
            f"tracker {tracker!r} is not installed here: pip install {tracker}, or use "
            "tensorboard or none"
        ]
    return []


# keys that do not change what is trained (output, evaluation, logging, speed): --resume
# accepts new values for them; every other key must keep its saved value
RESUME_FREE = ("output_dir", "resume", "resume_override", "stop_after", "tracker", "metric", "nc1",
               "eval_every", "test_every", "save_every", "keep_last", "num_workers",
               "cpu_threads", "compile", "channels_last", "prefix_cache")  # fmt: skip
# keys of one invocation: --resume does not take them from the saved config
PER_INVOCATION = ("resume", "resume_override", "stop_after")


def load_config(argv: list[str]) -> FinetuneConfig:
    """The config from the command line over ``--config`` (or ``configs/default.yaml``); with
    ``--resume`` and no ``--config``, over the run's saved ``config.yaml`` instead."""
    defaults = str(DEFAULTS) if DEFAULTS.is_file() else None
    cfg = parse_config(FinetuneConfig, argv, defaults_file=defaults)
    if cfg.resume and parse_overrides(argv)[0] is None:
        base = runs.resume_base(Path(cfg.output_dir), PER_INVOCATION)
        if base is not None:  # keys this version no longer has cannot be compared: dropped
            keys = {f.name for f in dataclasses.fields(FinetuneConfig)}
            base = {k: v for k, v in base.items() if k in keys}
            cfg = parse_config(FinetuneConfig, argv, defaults_file=defaults, base=base)
    return without_unused_method_keys(cfg)


METHOD_KEYS = {"block": None, "bn": None, "skip_norm": None, "lora_alpha": None, "lora_skip": False,
               "lora_rank": FinetuneConfig.lora_rank}  # fmt: skip
"""The method settings of the flat config, with the value that means "not set" (the rank has
no unset value: its default)."""


def without_unused_method_keys(cfg: FinetuneConfig) -> FinetuneConfig:
    """``cfg`` with the method settings the chosen method does not have reset to "not set",
    with one warning naming them: what config.yaml and the metrics record is then what ran
    (e.g. ``--method linear --block 3``: no block is tuned, and block is recorded as null)."""
    fields = {f.name for f in dataclasses.fields(ncfinetune.tuning.methods.method_class(cfg.method))}
    unused = {
        k: getattr(cfg, k)
        for k, unset in METHOD_KEYS.items()
        if k not in fields and getattr(cfg, k) != unset
    }
    if not unused:
        return cfg
    ncfinetune.messages.warn_once(
        f"method {cfg.method!r} has no {', '.join(unused)} setting: "
        + ", ".join(f"{k}={v!r}" for k, v in unused.items())
        + " has no effect and is recorded as "
        + ", ".join(f"{k}={METHOD_KEYS[k]!r}" for k in unused)
        + " (drop it from the command line or config to silence this)."
    )
    return dataclasses.replace(cfg, **{k: METHOD_KEYS[k] for k in unused})


def tuned_block(cfg: FinetuneConfig) -> str | None:
    """The configured block where the method tunes one (else None: it has no effect)."""
    return cfg.block if ncfinetune.tuning.methods.method_class(cfg.method).tunes_block else None


def choose_block_and_lr(acc, cfg, model, data, train_idx, eval_tf, precision, out: Path):
    """--block auto and/or --lr auto, on (a class-balanced sample of) the training subset only,
    through the same code path as ``ncfinetune.select_block`` and ``recipes/select_block.py``.
    The main process selects; the others receive its choice. Returns (block, lr, record)."""
    from accelerate.utils import broadcast_object_list

    block = tuned_block(cfg)
    found = [block, cfg.lr, None]
    if acc.is_main_process:
        common = {
            "max_images": cfg.select_max_images,
            "method": cfg.method,
            "bn": cfg.bn,
            "seed": cfg.seed,
            "precision": loop_precision(precision),  # the probes: as the fine-tune runs
            "device": acc.device,  # where the fine-tune runs
        }
        if block == "auto":  # the probes run at the selection's default lr unless lr: auto
            sel = ncfinetune.selection.select_block_on_split(
                model,
                data,
                eval_tf,
                train_idx,
                rule=cfg.select_rule,
                lr="auto" if cfg.lr == "auto" else ncfinetune.selection.PROBE_LR,
                max_trainable_percent=cfg.select_max_percent,
                **common,
            )
            sel.save(out)
            found = [
                sel.chosen,
                cfg.lr if sel.lr is None else sel.lr,
                {
                    "rule": sel.rule,
                    "block": sel.chosen,
                    "lr": sel.lr,
                    "seconds": sel.seconds,
                    "images_processed": sel.images_processed,
                },
            ]
        else:
            sel = ncfinetune.selection.select_lr_on_split(
                model, data, eval_tf, train_idx, block=block, **common
            )
            found = [
                block,
                sel.lr,
                {"lr": sel.lr, "seconds": sel.seconds, "images_processed": sel.images_processed},
            ]
        print(sel, flush=True)
    if acc.num_processes > 1:
        broadcast_object_list(found)
    return found


def read_selection(out: Path, block, lr):
    """The block and lr chosen before an interruption (``selection.json``)."""
    path = out / "selection.json"
    if not path.is_file():
        raise ncfinetune.errors.ConfigError(
            f"--resume with block/lr auto needs {path}, written when the choice was made; "
            "it is missing. Start afresh (without --resume) or pass the block and lr."
        )
    saved = json.loads(path.read_text())
    return (saved["block"] if block == "auto" else block), (saved["lr"] if lr == "auto" else lr)


def tuned_metadata(cfg: FinetuneConfig, data) -> dict:
    """What ``tuned/tuned_config.json`` records beside the weights so that the folder alone
    rebuilds the model and its inputs (``ncfinetune.inference``, ``recipes/eval.py``)."""
    return {
        "base_model_kwargs": {"pretrained": cfg.pretrained, "checkpoint": cfg.checkpoint},
        "image_size": cfg.image_size,
        "class_names": list(data.class_names),
        "data": {
            k: getattr(cfg, k)
            for k in ("dataset", "data_dir", "image_column", "label_column", "classes")
            + ("test_fraction", "seed", "allow_outside_paths", "skip_unreadable")
        },
    }


def cached_loaders(tuned, train_dl, train_eval_dl, test_dl, val_dl):
    """The loaders as prefix outputs computed once per image (raises where that is not legal:
    a BatchNorm adapting in the prefix, augmentation, data too large)."""
    blocker = prefix_blocker(tuned)
    if blocker is not None:
        raise ncfinetune.errors.ConfigError(blocker)
    train = prefix_loader(train_dl, tuned)
    out = [
        train,
        prefix_loader(train_eval_dl, tuned, share_with=train),  # same rows, same positions
        prefix_loader(test_dl, tuned),
        None if val_dl is None else prefix_loader(val_dl, tuned),
    ]
    tuned.prefix_inputs = True
    return out


def evaluate(acc, tuned, loader, metric, name: str, split: str, channels_last: bool) -> dict:
    """``{split}_{name}`` (the metric) and ``{split}_samples`` over every sample of a prepared
    ``loader``, each counted once over all processes."""
    res = predict(acc, tuned, loader, channels_last=channels_last, progress=split)
    score = metric.compute(predictions=res["preds"], references=res["labels"])[name]
    return {f"{split}_{name}": score, f"{split}_samples": len(res["labels"])}


def validation_rows(labels, train_idx, fraction: float | None, seed: int):
    """(training rows, validation rows or None), both from the training split (never the test
    split). ``fraction`` None (auto): with a subset, as many rows outside it as it holds (at
    least 100, as available; none when fewer than 2 per class remain); without, none."""
    if fraction == 0 or (fraction is None and train_idx is None):
        return train_idx, None
    if train_idx is None:  # the whole split: hold the share out of training
        return nd.validation_split(labels, fraction, seed=seed)
    if fraction is None:
        free = len(labels) - len(train_idx)
        if free < 2 * len(set(labels.tolist())):
            return train_idx, None
        fraction = min(max(len(train_idx), 100), free - 1)
    return train_idx, nd.validation_split(labels, fraction, seed=seed, exclude=train_idx)[1]


def main(argv: list[str] | None = None) -> dict:
    argv = sys.argv[1:] if argv is None else argv
    cfg = load_config(argv)
    out = Path(cfg.output_dir)
    # a run never overwrites another; --resume continues one only with the config it trained with
    if cfg.resume:
        resume = runs.check_resume(out, cfg, ignore=RESUME_FREE, override=cfg.resume_override or ())
    else:
        runs.check_fresh_start(out)
        resume = None
    # the recipe's mixed_precision when set, else accelerate's own choice (None)
    precision, precision_source = choose_precision(cfg.mixed_precision, launch_device_type())
    acc = Accelerator(
        mixed_precision=precision,
        # None leaves accelerate's own setting (`accelerate launch --dynamo_backend`) in charge
        dynamo_backend=cfg.compile,
        # no gradient_accumulation_steps: the loop accumulates grad_accum batches itself
        # (ncfinetune.training.loop.fit_batches), which also closes a partial group at max_steps
        log_with=None if cfg.tracker in (None, "none") else cfg.tracker,
        project_dir=str(out),
        # accelerate's seedable sampler: `train_dl.set_epoch(e)` reaches it through the
        # per-process shards, so epoch e is shuffled by (seed, e) alone, resumed or not
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True, data_seed=cfg.seed),
    )
    set_seed(cfg.seed)
    threads = set_cpu_threads(acc, cfg.cpu_threads)
    precision = acc.mixed_precision  # what runs, whoever chose it
    # batch_size is per process; a global batch is split over processes and accumulation
    batch_size = launch.per_process_batch(
        cfg.batch_size, cfg.global_batch_size, acc.num_processes, cfg.grad_accum
    )

    # data: the training subset is drawn from the training split only; the test split stays whole
    data = cfg.load_data()
    labels = data.labels("train")
    train_idx = None
    if cfg.per_class or cfg.train_size:
        train_idx = nd.balanced_subset(
            labels, per_class=cfg.per_class, total=cfg.train_size, seed=cfg.seed
        )
    train_idx, val_idx = validation_rows(labels, train_idx, cfg.val_fraction, cfg.seed)

    # model
    model = cfg.load_model(data.num_classes).to(acc.device)  # selection probes run there too
    eval_tf = nd.build_transforms(model, image_size=cfg.image_size, augment=False)
    block = tuned_block(cfg)
    lr, selection = cfg.lr, None
    if (block == "auto" or lr == "auto") and not (
        cfg.resume and latest_training_state(out / "checkpoints")
    ):
        block, lr, selection = choose_block_and_lr(
            acc, cfg, model, data, train_idx, eval_tf, precision, out
        )
    elif block == "auto" or lr == "auto":  # resuming: the choice made before the interruption
        block, lr = read_selection(out, block, lr)
    tuned = ncfinetune.tuning.model.wrap(
        model,
        cfg.method,
        block,
        bn=cfg.bn,
        skip_norm=cfg.skip_norm,
        lora_rank=cfg.lora_rank,
        lora_alpha=cfg.lora_alpha,
        lora_skip=cfg.lora_skip,
    )
    channels_last = use_channels_last(model, cfg.channels_last)
    if channels_last:
        tuned.to(memory_format=torch.channels_last)
    train_tf = nd.build_transforms(model, image_size=cfg.image_size, augment=cfg.augment)
    kw = {"batch_size": batch_size, "num_workers": cfg.num_workers}
    train_dl = nd.build_loader(
        data.train, train_tf, shuffle=True, seed=cfg.seed, indices=train_idx, **kw
    )
    train_eval_dl = nd.build_loader(data.train, eval_tf, shuffle=False, indices=train_idx, **kw)
    test_dl = nd.build_loader(data.test, eval_tf, shuffle=False, **kw)
    val_dl = (
        nd.build_loader(data.train, eval_tf, shuffle=False, indices=val_idx, **kw)
        if val_idx is not None
        else None
    )
    cache_note = "off (prefix_cache: false)"
    if cfg.prefix_cache is not False:
        try:
            train_dl, train_eval_dl, test_dl, val_dl = cached_loaders(
                tuned, train_dl, train_eval_dl, test_dl, val_dl
            )
            cache_note = "on: the frozen prefix runs once per image"
        except (ncfinetune.errors.ConfigError, ncfinetune.errors.DataError, CacheTooLarge) as err:
            if cfg.prefix_cache:
                raise ncfinetune.errors.ConfigError(f"prefix_cache: true, but {err}") from err
            cache_note = f"off ({err})"

    opt = build_optimizer(tuned, cfg.optimizer, lr, cfg.momentum, cfg.weight_decay)
    # train_eval_dl stays unprepared: NC1 takes each process's share of it (loop.collect_nc1)
    tuned, opt, train_dl, test_dl = acc.prepare(tuned, opt, train_dl, test_dl)
    if val_dl is not None:
        val_dl = acc.prepare(val_dl)
    # as long as the run's optimizer steps, counted on the prepared (per-process) loader: the
    # lr reaches min_lr at the end for any number of processes, grad_accum and max_steps
    sched, plan = build_schedule(
        acc, opt, train_dl, epochs=cfg.epochs, min_lr=cfg.min_lr,
        grad_accum=cfg.grad_accum, max_steps=cfg.max_steps,
    )  # fmt: skip
    metric = load_metric(cfg.metric)

    history, start_epoch, overrides = [], 0, []
    ckpt_root = out / "checkpoints"
    if resume is not None:  # checked above: it continues with the saved config
        fresh = getattr(sched, "scheduler", sched).state_dict()  # the current config's schedule
        path, start_epoch, history = resume.checkpoint, resume.epoch, resume.history
        load_training_state(acc, path, sched)
        acc.print(f"resumed from {path} (epoch {start_epoch})")
        if resume.changed:  # resume_override: the schedule the new epochs/lr ask for
            runs.retarget_schedule(sched, fresh)
            acc.print(
                "resume_override: "
                + ", ".join(f"{k} {a} -> {b}" for k, (a, b) in resume.changed.items())
                + "; the cosine schedule continues as the new one from this step"
            )
        if acc.is_main_process:
            overrides = runs.record_override(out, resume)
    if acc.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
        save_config(cfg, out / "config.yaml")
        if selection is not None:  # what --resume reuses
            write_json(out / "selection.json", {"block": block, "lr": lr, **selection}, None)
    if cfg.tracker not in (None, "none"):
        acc.init_trackers("finetune", config={k: str(v) for k, v in config_to_dict(cfg).items()})
    net = acc.unwrap_model(tuned, keep_torch_compile=False)
    compiled = acc.state.dynamo_plugin.backend.value.lower()  # "no" unless a backend was set
    acc.print(
        f"{net.describe()}\ndata: {nd.describe(data)}; training on {len(train_dl.dataset)} images"
        + f"\nprefix cache: {cache_note}"
        + f"\nmixed precision: {precision}; channels_last: {channels_last}; "
        + f"compile: {compiled}"
        + (f"; {threads} CPU threads per process" if acc.device.type == "cpu" else "")
    )

    eval_every = cfg.eval_every or -(-cfg.epochs // 10)  # auto: about 10 evaluations a run
    save_every = cfg.save_every or eval_every
    clock, steps = Stopwatch(), start_epoch * plan.steps_per_epoch  # optimizer steps done
    t0 = time.time()
    for epoch in range(start_epoch, cfg.epochs):
        n, last = epoch + 1, epoch + 1 == cfg.epochs
        stop = bool(cfg.stop_after) and n >= cfg.stop_after and not last
        train_dl.set_epoch(epoch)  # resumes at an epoch boundary: no batches to skip
        stats = train_epoch(
            acc, tuned, train_dl, opt, sched, grad_accum=cfg.grad_accum, max_steps=cfg.max_steps,
            desc=f"epoch {n}/{cfg.epochs}", channels_last=channels_last, steps_before=steps,
        )  # fmt: skip
        # (a NaN/inf loss raised TrainingDiverged above: nothing of this epoch is logged or saved)
        clock.add("train", stats.seconds)
        for i, (loss, step_lr) in enumerate(zip(stats.step_losses, stats.lrs, strict=True)):
            acc.log({"train/loss": loss, "train/lr": step_lr}, step=steps + i + 1)
        steps += stats.steps
        row = {"epoch": n, "step": steps, "train_loss": stats.loss, "lr": stats.lrs[-1],
               "train_images_per_s": stats.images_per_s}  # fmt: skip
        if n % eval_every == 0 or last:
            if val_dl is not None:
                with clock("validation"):
                    row |= evaluate(acc, tuned, val_dl, metric, cfg.metric, "val", channels_last)
            if cfg.nc1:
                with clock("nc1"):
                    row["nc1_train"] = collect_nc1(
                        acc, tuned, train_eval_dl, channels_last=channels_last, progress="NC1"
                    )
                if row["nc1_train"] is not None and math.isnan(row["nc1_train"]):  # all agree
                    what = "the training images' penultimate features became NaN or infinite"
                    raise diverged(what, steps, stats.lrs[-1], f" (evaluated after epoch {n})")
        if last or (cfg.test_every and n % cfg.test_every == 0):  # the test split: at the end
            with clock("test"):
                row |= evaluate(acc, tuned, test_dl, metric, cfg.metric, "test", channels_last)
        history.append(row)
        acc.log({k: v for k, v in row.items() if k != "step" and isinstance(v, int | float)}, steps)
        shown = {k: round(v, 4) if isinstance(v, float) else v for k, v in row.items()}
        acc.print(json.dumps(finite_json(shown)))
        if n % save_every == 0 or last or stop:
            with clock("checkpoints"):
                save_training_state(
                    acc, ckpt_root, n, history, scheduler=sched, keep_last=cfg.keep_last
                )
        if stop:
            acc.print(f"stopping after epoch {n} (stop_after); continue with --resume")
            acc.end_training()
            return {"history": history, "stopped": True}

    wall = time.time() - t0
    trainable, total = net.parameter_counts()
    last = history[-1]
    metrics = {
        "test_" + cfg.metric: last["test_" + cfg.metric],
        "nc1_train": last.get("nc1_train"),
        "trainable_params": trainable,
        "total_params": total,
        "trainable_percent": 100 * trainable / total,
        "method": cfg.method,
        "block": net.block_index,
        "block_name": net.block_name,
        "bn": net.bn,
        "model": cfg.model,
        "dataset": cfg.dataset,
        "num_train": len(train_dl.dataset) if train_idx is None else len(train_idx),
        "num_test": len(data.test),
        "test_samples_evaluated": last["test_samples"],
        "val_" + cfg.metric: last.get("val_" + cfg.metric),  # null: no validation rows
        "num_val": last.get("val_samples", 0),
        "epochs": cfg.epochs,
        "grad_accum": cfg.grad_accum,
        "optimizer_steps": steps,  # epochs x ceil(min(batches per process, max_steps) / grad_accum)
        "steps_per_epoch": plan.steps_per_epoch,
        "final_lr": opt.param_groups[0]["lr"],  # where the schedule ended: min_lr
        "eval_every": eval_every,
        "save_every": save_every,
        "wall_time_s": wall,
        "time_s": clock.seconds,  # this invocation's training steps, evaluations, checkpoints
        "train_images_per_s": sum(h["train_images_per_s"] for h in history) / len(history),
        "num_processes": acc.num_processes,
        "cpu_threads": threads if acc.device.type == "cpu" else None,
        "prefix_cache": net.prefix_inputs,
        "mixed_precision": precision,
        "mixed_precision_from": precision_source,  # recipe (its key) | accelerate
        "batch_size_per_process": batch_size,
        "global_batch_size": batch_size * acc.num_processes * cfg.grad_accum,
        "channels_last": channels_last,
        "compile": compiled,
        "lr": lr,
        "selection": selection,  # --block auto / --lr auto: what was chosen, at what cost
        "resume_overrides": overrides,  # --resume_override: what changed, at which epoch
        "history": history,
    }
    if acc.is_main_process:
        net.save_pretrained(out / "tuned", base_model=cfg.model, metadata=tuned_metadata(cfg, data))
        write_json(out / "metrics.json", metrics)  # strict JSON: a NaN/inf is written as null
        nc = f"{metrics['nc1_train']:.3f}" if metrics["nc1_train"] is not None else "n/a"
        print(
            f"\n== {net.describe()}\n"
            f"   {cfg.dataset}: {metrics['num_train']} training images, {metrics['num_test']} test images\n"
            f"   test {cfg.metric} {100 * metrics['test_' + cfg.metric]:.2f}%   penultimate NC1 (train) {nc}   "
            f"trainable {metrics['trainable_percent']:.2f}%\n"
            f"   {cfg.epochs - start_epoch} epochs in {wall:.1f}s ({metrics['train_images_per_s']:.0f} img/s); "
            f"outputs in {out}/"
        )
    acc.end_training()
    return metrics


if __name__ == "__main__":
    run_cli(main)
