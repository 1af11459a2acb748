"""Fine-tune a timm backbone with linear probe, Layer FT, SCL FT or full FT.

    accelerate launch recipes/finetune.py                      # bundled default, offline
    accelerate launch recipes/finetune.py --config recipes/configs/fmnist59_scl.yaml --epochs 5

With no arguments: SCL FT of the bundled resnet18 (pretrained here on Fashion-MNIST classes 0-4)
at block 4 on scikit-learn's digits. Any config key can be overridden as ``--key value``.
Writes ``config.yaml``, TensorBoard logs, a checkpoint per epoch (``--resume`` continues from
the newest), ``metrics.json`` and the tuned weights (``tuned/``) under ``output_dir``.
"""

from __future__ import annotations

import json
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import DataLoaderConfiguration, set_seed

import ncfinetune
import ncfinetune.selection
from ncfinetune import data as nd
from ncfinetune.config import DownstreamConfig, config_to_dict, parse_config, save_config
from ncfinetune.loop import (
    MIXED_PRECISION,
    is_conv_net,
    latest_training_state,
    launch_device_type,
    predict,
    resolve_mixed_precision,
    save_training_state,
    set_cpu_threads,
    train_epoch,
)
from ncfinetune.metric_modules import load_metric
from ncfinetune.metrics import nc1
from ncfinetune.prefix_cache import CacheTooLarge, prefix_blocker, prefix_loader
from ncfinetune.training import build_cosine_schedule, build_optimizer

DEFAULTS = Path(__file__).parent / "configs" / "default.yaml"
COMPILE_BACKENDS = ("inductor", "aot_eager", "eager", "cudagraphs")  # torch.compile, via accelerate


@dataclass
class FinetuneConfig(DownstreamConfig):
    # backbone and data keys: DownstreamConfig (model, pretrained, checkpoint, dataset, data_dir,
    # image_column, label_column, classes, per_class, test_fraction, image_size, seed)
    train_size: int | None = None
    val_fraction: float = 0.0
    augment: bool = False
    # method
    method: str = "scl"
    block: str | None = "4"  # index, name, or "auto" (select_block on the training subset)
    # block auto: probe | probe_accuracy | middle | curve | linear (ncfinetune.select_block;
    # its probes run at its lr, 0.03, or with lr: auto choose the lr with the block)
    select_rule: str = ncfinetune.selection.DEFAULT_RULE
    # block auto: parameter budget of the candidates (% trainable; null = no budget)
    select_max_percent: float | None = ncfinetune.selection.MAX_TRAINABLE_PERCENT
    # block auto / lr auto: selection runs on a class-balanced sample of the training subset
    select_max_images: int = 5000
    bn: str | None = None
    skip_norm: bool | None = None
    lora_rank: int = 8  # lora-block / lora: rank of the peft LoRA update
    lora_alpha: float | None = None  # LoRA scale alpha (null = rank)
    lora_skip: bool = False  # lora-block: also add the SCL skip from the block
    prefix_cache: bool | None = None  # null = auto: cache the frozen prefix's outputs when legal
    # optimisation (paper defaults, SPEC section 5)
    optimizer: str = "sgd"
    # a number, or auto: short probes at 0.1, 0.03, 0.01 on held-out training rows choose it
    # (with --block auto, together with the block); never the test split
    lr: float | str = 0.1
    min_lr: float = 1e-4
    momentum: float = 0.9
    weight_decay: float = 1e-4
    epochs: int = 10
    batch_size: int = 64
    grad_accum: int = 1
    mixed_precision: str = "auto"  # auto = bf16 where the device has native bf16, else no
    channels_last: bool | None = None  # null = auto: on for conv nets (measured faster here)
    compile: str | None = None  # a torch.compile backend (e.g. inductor), via accelerate
    cpu_threads: int | None = None  # CPU only; null = cores / processes on this machine
    num_workers: int = 0
    max_steps: int | None = None  # per epoch; for smoke tests
    # evaluation and output
    metric: str = "accuracy"
    nc1: bool = True
    output_dir: str = "runs/finetune"
    resume: bool = False
    stop_after: int | None = None  # stop after this many epochs (simulates an interruption)
    tracker: str | None = "tensorboard"  # or none

    def validate(self) -> list[str]:
        p = super().validate()
        if self.cpu_threads is not None and self.cpu_threads < 1:
            p.append(f"cpu_threads must be >= 1 or null (auto), got {self.cpu_threads}")
        methods = ncfinetune.methods.METHODS
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
        if self.bn not in (None, *ncfinetune.methods.BN_POLICIES):
            p.append(f"bn {self.bn!r} is not one of update, frozen")
        if self.optimizer not in ("sgd", "adamw"):
            p.append(f"optimizer {self.optimizer!r} is not one of sgd, adamw")
        if self.mixed_precision not in MIXED_PRECISION:
            p.append(
                f"mixed_precision {self.mixed_precision!r} is not one of {', '.join(MIXED_PRECISION)}"
            )
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
        if not 0 <= self.val_fraction < 1:
            p.append(f"val_fraction must be in [0, 1), got {self.val_fraction}")
        if self.per_class is not None and self.train_size is not None:
            p.append("give per_class or train_size, not both")
        return p


def tuned_block(cfg: FinetuneConfig) -> str | None:
    """The configured block where the method tunes one (else None: it has no effect)."""
    return cfg.block if ncfinetune.methods.method_class(cfg.method).tunes_block else None


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
            "precision": "bf16" if precision == "bf16" else "no",
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


def main(argv: list[str] | None = None) -> dict:
    argv = sys.argv[1:] if argv is None else argv
    cfg = parse_config(
        FinetuneConfig, argv, defaults_file=str(DEFAULTS) if DEFAULTS.is_file() else None
    )
    out = Path(cfg.output_dir)
    precision = resolve_mixed_precision(cfg.mixed_precision, launch_device_type())
    acc = Accelerator(
        mixed_precision=precision,
        # None leaves accelerate's own setting (`accelerate launch --dynamo_backend`) in charge
        dynamo_backend=cfg.compile,
        gradient_accumulation_steps=cfg.grad_accum,
        log_with=cfg.tracker,
        project_dir=str(out),
        # accelerate's seedable sampler: `train_dl.set_epoch(e)` reaches it through the
        # per-process shards, so epoch e is shuffled by (seed, e) alone, resumed or not
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True, data_seed=cfg.seed),
    )
    set_seed(cfg.seed)
    threads = set_cpu_threads(acc, cfg.cpu_threads)
    launched = os.environ.get("ACCELERATE_MIXED_PRECISION")  # accelerate launch always sets it
    if cfg.mixed_precision == "auto" and launched and launched != precision:
        acc.print(
            f"mixed precision: the recipe's mixed_precision 'auto' chose {precision} over the "
            f"launcher's {launched!r}; pass --mixed_precision {launched} after the script name "
            "to train in that instead."
        )

    # data: the training subset is drawn from the training split only; the test split stays whole
    data = cfg.load_data()
    labels = data.labels("train")
    train_idx = None
    if cfg.per_class or cfg.train_size:
        train_idx = nd.balanced_subset(
            labels, per_class=cfg.per_class, total=cfg.train_size, seed=cfg.seed
        )
    val_idx = None
    if cfg.val_fraction and train_idx is None:
        train_idx, val_idx = nd.validation_split(labels, cfg.val_fraction, seed=cfg.seed)
    elif cfg.val_fraction:  # a small subset: validate on training-split rows outside it
        val_idx = nd.validation_split(labels, cfg.val_fraction, seed=cfg.seed, exclude=train_idx)[1]

    # model
    model = cfg.load_model(data.num_classes)
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
    tuned = ncfinetune.tuning.wrap(
        model,
        cfg.method,
        block,
        bn=cfg.bn,
        skip_norm=cfg.skip_norm,
        lora_rank=cfg.lora_rank,
        lora_alpha=cfg.lora_alpha,
        lora_skip=cfg.lora_skip,
    )
    channels_last = is_conv_net(model) if cfg.channels_last is None else cfg.channels_last
    if channels_last:
        tuned.to(memory_format=torch.channels_last)
    train_tf = nd.build_transforms(model, image_size=cfg.image_size, augment=cfg.augment)
    kw = {"batch_size": cfg.batch_size, "num_workers": cfg.num_workers}
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
    steps_per_epoch = -(-min(len(train_dl), cfg.max_steps or len(train_dl)) // cfg.grad_accum)
    # the prepared scheduler steps once per process per optimizer step; give it the global count
    sched = build_cosine_schedule(opt, cfg.epochs * steps_per_epoch * acc.num_processes, cfg.min_lr)
    tuned, opt, train_dl, train_eval_dl, test_dl, sched = acc.prepare(
        tuned, opt, train_dl, train_eval_dl, test_dl, sched
    )
    if val_dl is not None:
        val_dl = acc.prepare(val_dl)
    metric = load_metric(cfg.metric)

    history, start_epoch = [], 0
    ckpt_root = out / "checkpoints"
    if cfg.resume and (found := latest_training_state(ckpt_root)):
        path, start_epoch, history = found
        acc.load_state(str(path))
        acc.print(f"resumed from {path} (epoch {start_epoch})")
    if acc.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
        save_config(cfg, out / "config.yaml")
        if selection is not None:  # what --resume reuses
            tmp = out / "selection.json.tmp"
            tmp.write_text(json.dumps({"block": block, "lr": lr, **selection}) + "\n")
            tmp.replace(out / "selection.json")
    if cfg.tracker:
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

    t0 = time.time()
    for epoch in range(start_epoch, cfg.epochs):
        train_dl.set_epoch(epoch)  # resumes at an epoch boundary: no batches to skip
        stats = train_epoch(
            acc,
            tuned,
            train_dl,
            opt,
            sched,
            max_steps=cfg.max_steps,
            desc=f"epoch {epoch + 1}/{cfg.epochs}",
            channels_last=channels_last,
        )
        res = predict(acc, tuned, test_dl, channels_last=channels_last)
        row = {
            "epoch": epoch + 1,
            "train_loss": stats.loss,
            "train_images_per_s": stats.images_per_s,
            "test_" + cfg.metric: metric.compute(
                predictions=res["preds"], references=res["labels"]
            )[cfg.metric],
            "test_samples": len(res["labels"]),
        }
        if cfg.nc1:
            feats = predict(acc, tuned, train_eval_dl, features=True, channels_last=channels_last)
            row["nc1_train"] = (
                nc1(feats["features"], feats["labels"])
                if len(set(feats["labels"].tolist())) > 1
                else None
            )
        if val_dl is not None:
            v = predict(acc, tuned, val_dl, channels_last=channels_last)
            row["val_accuracy"] = (v["preds"] == v["labels"]).float().mean().item()
        history.append(row)
        acc.log({k: v for k, v in row.items() if isinstance(v, (int, float))}, step=epoch + 1)
        acc.print(
            json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in row.items()})
        )
        save_training_state(acc, ckpt_root, epoch + 1, history)
        if cfg.stop_after and epoch + 1 >= cfg.stop_after and epoch + 1 < cfg.epochs:
            acc.print(f"stopping after epoch {epoch + 1} (stop_after); continue with --resume")
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
        "epochs": cfg.epochs,
        "wall_time_s": wall,
        "train_images_per_s": sum(h["train_images_per_s"] for h in history) / len(history),
        "num_processes": acc.num_processes,
        "cpu_threads": threads if acc.device.type == "cpu" else None,
        "prefix_cache": net.prefix_inputs,
        "mixed_precision": precision,
        "channels_last": channels_last,
        "compile": compiled,
        "lr": lr,
        "selection": selection,  # --block auto / --lr auto: what was chosen, at what cost
        "history": history,
    }
    if acc.is_main_process:
        net.save_pretrained(out / "tuned")
        tmp = out / "metrics.json.tmp"
        tmp.write_text(json.dumps(metrics, indent=2) + "\n")
        tmp.replace(out / "metrics.json")
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
    main()
