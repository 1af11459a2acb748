"""Supervised pretraining of a timm backbone, e.g. the bundled resnet18 on Fashion-MNIST 0-4.

    accelerate launch recipes/pretrain.py --config recipes/configs/pretrain/resnet18_fmnist04.yaml

Cross-entropy with optional label smoothing and the optional MLP projector of Wang et al.
(FC-BN-ReLU-FC between backbone and classifier, discarded after pretraining). Logs source test
accuracy and NC1 of the backbone features on source training data every epoch. Optional
distillation from a teacher backbone (``--teacher resnet18_fmnist04``): its classifier is a
linear probe fitted on the source training features, and the student's target is
``(1 - distill_alpha) * one_hot(label) + distill_alpha * softmax(teacher logits)``.

Transfer monitor (``--transfer_targets digits,fashion_mnist:5-9 --transfer_every N``, see
:mod:`ncfinetune.recipes.monitor`): every N epochs the frozen backbone's linear-probe accuracy,
R@1, NMI and NC1 on each target's held-out training rows, logged with the epoch; the backbone
that transferred best is written to ``output_dir/best_transfer/`` beside the last one.

Writes the backbone (without classifier or projector) in float16 safetensors plus a JSON card
and a markdown model card, and ``metrics.json`` (the per-epoch history, after every epoch) and
TensorBoard logs, into ``output_dir`` only: the recipe never writes into the installed
package. Shipping a backbone with the package is a separate maintainer step
(``python tools/bundle_backbone.py runs/pretrain_x NAME``; see the README).
"""

from __future__ import annotations

import dataclasses
import json
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import timm
import torch
from accelerate import Accelerator
from accelerate.utils import DataLoaderConfiguration, set_seed
from torch import nn

import ncfinetune.data as nd
from ncfinetune.errors import ConfigError
from ncfinetune.files import write_json
from ncfinetune.recipes.checks import (
    bound_problems,
    inside_package_problems,
    output_problems,
    seed_problems,
    tracker_problems,
)
from ncfinetune.recipes.config import (
    flat_config,
    is_main_process,
    key,
    parse_config,
    run_cli,
    save_config,
    section,
)
from ncfinetune.recipes.engine import (
    build_schedule,
    collect_nc1,
    set_cpu_threads,
    train_epoch,
)
from ncfinetune.recipes.monitor import (
    TransferMonitor,
    TransferTarget,
    epoch_scalars,
    load_target,
    mean_probe_accuracy,
    measure,
    run_metrics,
)
from ncfinetune.recipes.pretrain_parts import (
    PretrainNet,
    Targets,
    backbone_card,
    build_backbone,
    fit_teacher,
    fp16_state,
    init_problems,
    write_backbone,
)
from ncfinetune.recipes.runs import run_lock
from ncfinetune.training.device import choose_precision, launch_device_type, precision_problem
from ncfinetune.training.loop import predict_batches


@dataclass
class PretrainBackbone:
    """The backbone: a timm architecture, from scratch or from another backbone's weights."""

    model: str = key("resnet18", "any timm architecture, trained from scratch")
    img_size: int | None = key(None, "ViT only: positional-embedding grid (timm img_size)")
    patch_size: int | None = key(None, "ViT only")
    model_kwargs: dict = key({}, "more timm.create_model args, e.g. depth")
    init_from: str | None = key(
        None,
        "start from this backbone's weights (bundled name or pretrain folder) of the same "
        "architecture and model_kwargs, and keep its normalisation; null = random init",
    )

    def validate(self) -> list[str]:
        p = []
        clash = {"num_classes", "pretrained", "img_size", "patch_size"} & set(self.model_kwargs)
        if clash:
            p.append(
                f"model_kwargs may not set {sorted(clash)}: use the img_size/patch_size keys "
                "(the classifier and weights are the recipe's own)"
            )
        if not timm.is_model(self.model):
            p.append(f"model {self.model!r} is not a timm architecture")
        elif self.init_from:
            p += init_problems(self.init_from, self.model, self.timm_kwargs())
        return p + bound_problems(self, img_size=">=1", patch_size=">=1")

    def timm_kwargs(self) -> dict:
        """The ``timm.create_model`` arguments: img_size, patch_size, model_kwargs."""
        sizes = (("img_size", self.img_size), ("patch_size", self.patch_size))
        return {**{k: v for k, v in sizes if v}, **self.model_kwargs}


@dataclass
class PretrainData:
    """The source data and its batches."""

    dataset: str = key("fashion_mnist", "the source data: any spec the recipes accept")
    data_dir: str | None = key(None, "fashion_mnist: folder of the IDX files; hub: its data_dir")
    classes: list[int] = key([0, 1, 2, 3, 4], "source classes kept")
    allow_outside_paths: bool = key(
        False, ".csv/.parquet: allow image paths outside the table's folder (absolute, ../)"
    )
    skip_unreadable: bool = key(
        False, "check every image at load time and leave out unreadable ones (counted)"
    )
    image_size: int = key(32, "input size in pixels (recorded in the backbone's data config)")
    augment: bool = key(True, "batch-level random flip + 2-pixel translation (cheap, tensor ops)")

    def validate(self) -> list[str]:
        p = [f"image_size must be >= 1, got {self.image_size}"] if self.image_size < 1 else []
        if len(set(self.classes)) < 2 or len(set(self.classes)) != len(self.classes):
            p.append(f"classes must name at least 2 distinct classes, got {self.classes}")
        return p


@dataclass
class Objective:
    """What the network learns: cross-entropy (label smoothing), optionally distilled from a
    teacher, optionally through a projector dropped afterwards."""

    label_smoothing: float = key(0.0, "cross-entropy label smoothing in [0, 1)")
    teacher: str | None = key(None, "distil from this backbone (bundled name or pretrain folder)")
    distill_alpha: float = key(
        0.5, "weight of the teacher's probabilities in the target, in (0, 1]"
    )
    projector: bool = key(False, "train through an MLP projector (FC-BN-ReLU-FC), then drop it")
    projector_dim: int = key(2048, "hidden width of that projector")

    def validate(self) -> list[str]:
        p = []
        if not 0 < self.distill_alpha <= 1:
            p.append(f"distill_alpha must be in (0, 1], got {self.distill_alpha}")
        if not 0 <= self.label_smoothing < 1:
            p.append(f"label_smoothing must be in [0, 1), got {self.label_smoothing}")
        return p + bound_problems(self, projector_dim=">=1")


@dataclass
class PretrainOptim:
    """Optimisation: the optimizer, the cosine schedule and the batches."""

    epochs: int = key(12, "passes over the source training split")
    batch_size: int = key(128, "images per process per step (x processes per update)")
    optimizer: str = key("sgd", "sgd (momentum) | adamw")
    lr: float = key(0.1, "the cosine schedule's first lr")
    min_lr: float = key(0.0, "the cosine schedule's final lr")
    momentum: float = key(0.9, "SGD momentum")
    weight_decay: float = key(5e-4, "on every parameter")
    max_steps: int | None = key(None, "per epoch; for smoke tests")

    def validate(self) -> list[str]:
        p = []
        for name in ("epochs", "batch_size"):
            if getattr(self, name) < 1:
                p.append(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.optimizer not in ("sgd", "adamw"):
            p.append(f"optimizer {self.optimizer!r} is not one of sgd, adamw")
        if self.max_steps is not None and self.max_steps < 1:
            p.append(f"max_steps must be >= 1 or null, got {self.max_steps}")
        if self.lr <= 0:
            p.append(f"lr must be > 0, got {self.lr}")
        p += bound_problems(self, weight_decay=">=0", min_lr=">=0", momentum="[0,1)")
        if self.min_lr > self.lr:
            p.append(f"min_lr ({self.min_lr}) must be <= lr ({self.lr})")
        return p


@dataclass
class PretrainRun:
    """The run: seed, precision and threads, the NC1 sample, output."""

    seed: int = key(0, "seeds the initialisation, the shuffling and the NC1 sample")
    mixed_precision: str | None = key(
        None,
        "no | fp16 | bf16 | auto (bf16 where native); null = accelerate's choice (accelerate "
        "launch --mixed_precision, its config file or ACCELERATE_MIXED_PRECISION; none: no)",
    )
    cpu_threads: int | None = key(None, "CPU only; null = cores / processes on this machine")
    nc1_samples: int = key(5000, "source training samples used for the per-epoch NC1")
    output_dir: str = key("runs/pretrain", "backbone.{safetensors,json,md}; never overwritten")
    tracker: str | None = key(
        "tensorboard", "tensorboard (logs under output_dir), none, or another accelerate tracker"
    )
    save_every: int | None = key(
        None, "also keep every N-th epoch's backbone as output_dir/epochs/epoch_N/; null = off"
    )
    bundle_as: str | None = key(None, "removed: use tools/bundle_backbone.py (a maintainer step)")

    def validate(self) -> list[str]:
        p = []
        if self.bundle_as is not None:
            p.append(
                f"bundle_as ({self.bundle_as!r}) was removed: a recipe never writes into the "
                "installed package. Pretrain into output_dir, then (maintainers) run "
                f"`python tools/bundle_backbone.py {self.output_dir} NAME`; drop bundle_as."
            )
        p += inside_package_problems("output_dir", self.output_dir)
        if self.cpu_threads is not None and self.cpu_threads < 1:
            p.append(f"cpu_threads must be >= 1 or null (auto), got {self.cpu_threads}")
        if self.nc1_samples < 1:
            p.append(f"nc1_samples must be >= 1, got {self.nc1_samples}")
        if problem := precision_problem(self.mixed_precision):
            p.append(problem)
        p += tracker_problems(self.tracker) + bound_problems(self, save_every=">=1")
        return p + seed_problems(self.seed) + output_problems("output_dir", self.output_dir)


@dataclass
class PretrainConfig:
    """The pretrain recipe's keys by section (``--help`` lists them with their defaults)."""

    backbone: PretrainBackbone = section(PretrainBackbone)
    data: PretrainData = section(PretrainData)
    objective: Objective = section(Objective)
    optim: PretrainOptim = section(PretrainOptim)
    monitor: TransferMonitor = section(TransferMonitor)
    run: PretrainRun = section(PretrainRun)


@dataclass
class Pretraining:
    """A pretraining run between :func:`setup`, :func:`train` and :func:`finish`: the config
    (its precision as it runs), the accelerator, the data, the backbone and its data config,
    the prepared network, optimizer, schedule and loaders, and the record."""

    cfg: PretrainConfig
    acc: Accelerator
    data: Any
    backbone: nn.Module
    data_cfg: dict
    net: nn.Module
    opt: torch.optim.Optimizer
    sched: Any
    plan: Any
    train: Any  # the prepared training loader
    batches: Targets  # its batches, augmented and with the distillation targets
    probe: Any  # the NC1 sample (unprepared: NC1 shards it itself)
    test: Any
    teacher_note: dict | None = None
    targets: list[TransferTarget] = field(default_factory=list)  # main process only
    history: list = field(default_factory=list)
    best_transfer: dict | None = None  # {"epoch", "score", "state"}: the best-transferring weights
    seconds: float = 0.0
    argv: list[str] = field(default_factory=list)  # the command line, for the cards


def main(argv: list[str] | None = None) -> dict:
    argv = sys.argv[1:] if argv is None else argv
    cfg = parse_config(PretrainConfig, argv)
    with run_lock(Path(cfg.run.output_dir), take=is_main_process()):  # one run per folder
        run = setup(cfg)
        run.argv = list(argv)
        train(run)
        finish(run, argv)
    return {"history": run.history}


def start(cfg: PretrainConfig) -> tuple[PretrainConfig, Accelerator]:
    """Refuse an output_dir that holds a backbone, start accelerate (the recipe's precision
    when set, else accelerate's own choice), seed; returns the config recording the precision
    as it runs, and the accelerator."""
    if (Path(cfg.run.output_dir) / "backbone.json").is_file():
        raise ConfigError(
            f"output_dir {cfg.run.output_dir} already holds a pretrained backbone (backbone.json); "
            "a run never overwrites another. Pass a new --output_dir, or delete the folder."
        )
    precision, _ = choose_precision(cfg.run.mixed_precision, launch_device_type())
    acc = Accelerator(
        mixed_precision=precision,
        log_with=None if cfg.run.tracker in (None, "none") else cfg.run.tracker,
        project_dir=cfg.run.output_dir,
        # accelerate's seedable sampler: epoch e is shuffled by (seed, e) on every process
        dataloader_config=DataLoaderConfiguration(
            use_seedable_sampler=True, data_seed=cfg.run.seed
        ),
    )
    ran = dataclasses.replace(cfg.run, mixed_precision=acc.mixed_precision)
    cfg = dataclasses.replace(cfg, run=ran)  # recorded as it ran
    set_seed(cfg.run.seed)
    set_cpu_threads(acc, cfg.run.cpu_threads)
    if cfg.run.tracker not in (None, "none"):
        acc.init_trackers("pretrain", config={k: str(v) for k, v in flat_config(cfg).items()})
    return cfg, acc


def setup(cfg: PretrainConfig) -> Pretraining:
    """Everything before the first epoch: accelerate, the source data, the backbone behind the
    optional projector and a classifier, loaders, optimizer and schedule, the teacher."""
    cfg, acc = start(cfg)
    loaded = nd.load_image_dataset(
        cfg.data.dataset, data_dir=cfg.data.data_dir, allow_outside_paths=cfg.data.allow_outside_paths,
        skip_unreadable=cfg.data.skip_unreadable,
    )  # fmt: skip
    data = nd.select_classes(loaded, cfg.data.classes)
    backbone, data_cfg = build_backbone(cfg, data)
    net = PretrainNet(
        backbone, data.num_classes, cfg.objective.projector, cfg.objective.projector_dim
    )
    tf = nd.build_transforms(backbone, augment=False)
    train = nd.build_loader(
        data.train,
        tf,
        batch_size=cfg.optim.batch_size,
        shuffle=True,
        seed=cfg.run.seed,
        drop_last=True,
    )
    g = torch.Generator().manual_seed(cfg.run.seed)
    probe_idx = torch.randperm(len(data.train), generator=g)[: cfg.run.nc1_samples].tolist()
    probe = nd.build_loader(data.train, tf, batch_size=512, shuffle=False, indices=probe_idx)
    test = nd.build_loader(data.test, tf, batch_size=512, shuffle=False)
    params = list(net.parameters())
    acc.print(f"pretraining {cfg.backbone.model} on {nd.describe(data)}; {sum(p.numel() for p in params):,} parameters")  # fmt: skip
    if cfg.optim.optimizer == "sgd":
        opt = torch.optim.SGD(
            params,
            lr=cfg.optim.lr,
            momentum=cfg.optim.momentum,
            weight_decay=cfg.optim.weight_decay,
        )
    else:
        opt = torch.optim.AdamW(params, lr=cfg.optim.lr, weight_decay=cfg.optim.weight_decay)
    net, opt, train, test = acc.prepare(net, opt, train, test)  # probe: NC1 shards it itself
    # as long as the run's optimizer steps, counted on the prepared (per-process) loader
    sched, plan = build_schedule(
        acc,
        opt,
        train,
        epochs=cfg.optim.epochs,
        min_lr=cfg.optim.min_lr,
        max_steps=cfg.optim.max_steps,
    )
    teacher, teacher_note = None, None
    if cfg.objective.teacher:
        teacher, teacher_note = fit_teacher(cfg, acc, data, backbone)
        acc.print(f"teacher {cfg.objective.teacher}: {teacher_note}")
    batches = Targets(
        train, augment=cfg.data.augment, teacher=teacher, alpha=cfg.objective.distill_alpha,
        num_classes=data.num_classes, autocast=acc.autocast,
    )  # fmt: skip
    m = cfg.monitor
    targets = [
        load_target(t, tf, fit_per_class=m.transfer_fit_per_class,
                    held_per_class=m.transfer_held_per_class, seed=cfg.run.seed)
        for t in (m.transfer_targets if acc.is_main_process else [])
    ]  # fmt: skip
    for t in targets:
        acc.print(f"transfer target {t.name}: {t.num_classes} classes, fit {len(t.fit)} / held-out {len(t.held)} training rows")  # fmt: skip
    return Pretraining(
        cfg, acc, data, backbone, data_cfg, net, opt, sched, plan, train, batches, probe, test,
        teacher_note, targets,
    )  # fmt: skip


def train(run: Pretraining) -> None:
    """Every epoch: the optimizer steps, then source test accuracy and the NC1 of the backbone
    features on the NC1 sample (streamed, merged across processes)."""
    cfg, acc = run.cfg, run.acc
    start = time.time()
    for epoch in range(cfg.optim.epochs):
        t0 = time.perf_counter()
        run.train.set_epoch(epoch)
        stats = train_epoch(
            acc, run.net, run.batches, run.opt, run.sched, label_smoothing=cfg.objective.label_smoothing,
            max_steps=cfg.optim.max_steps, desc=f"epoch {epoch + 1}",
            steps_before=epoch * run.plan.steps_per_epoch,
        )  # fmt: skip
        res = predict_batches(run.net, run.test, accelerator=acc)
        row = {
            "epoch": epoch + 1,
            "train_loss": stats.loss,
            "lr": stats.lrs[-1],
            "test_accuracy": (res["preds"] == res["labels"]).float().mean().item(),
            "nc1_train": collect_nc1(acc, run.net, run.probe),
            "images_per_s": stats.images_per_s,
            "epoch_seconds": round(time.perf_counter() - t0, 2),
        }
        if cfg.monitor.due(epoch + 1, cfg.optim.epochs):
            monitor_epoch(run, row)
        run.history.append(row)
        acc.print(json.dumps(row))
        if acc.is_main_process:
            acc.log(epoch_scalars(row), step=epoch + 1)
            every = cfg.run.save_every
            if every and (epoch + 1) % every == 0:
                run.seconds = time.time() - start
                folder = Path(cfg.run.output_dir) / "epochs" / f"epoch_{epoch + 1}"
                card = backbone_card(run, run.argv) | {
                    "selected": f"epoch {epoch + 1} (save_every)"
                }
                write_backbone(folder, fp16_state(acc.unwrap_model(run.net).backbone), card)
            write_json(
                Path(cfg.run.output_dir) / "metrics.json", run_metrics(run.history, cfg.monitor)
            )
    run.seconds = time.time() - start


def monitor_epoch(run: Pretraining, row: dict) -> None:
    """The transfer monitor after an epoch (main process; the others wait): every target's
    scores into ``row["transfer"]``, and a copy of the weights when they transfer best so far."""
    acc = run.acc
    if acc.is_main_process:
        backbone = acc.unwrap_model(run.net).backbone
        scores, seconds = measure(backbone, run.targets, acc.autocast, run.cfg.run.seed)
        score = mean_probe_accuracy(scores)
        row |= {
            "transfer": scores,
            "transfer_mean_probe_accuracy": score,
            "transfer_seconds": round(seconds, 2),
        }
        best = run.best_transfer
        if score is not None and (best is None or score > best["score"]):
            run.best_transfer = {
                "epoch": row["epoch"],
                "score": score,
                "state": fp16_state(backbone),
            }
    acc.wait_for_everyone()


def finish(run: Pretraining, argv: list[str]) -> None:
    """Write the backbone in float16 safetensors, its JSON card (last: its presence marks a
    finished run) and model card, then end accelerate."""
    acc, out = run.acc, Path(run.cfg.run.output_dir)
    if acc.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
        save_config(run.cfg, out / "config.yaml")
        card = backbone_card(run, argv)
        best = run.best_transfer
        if best is not None:
            epoch = next(r for r in run.history if r["epoch"] == best["epoch"])
            write_backbone(out / "best_transfer", best["state"], card | {
                "selected": f"epoch {best['epoch']} of {len(run.history)}: the best mean "
                "linear-probe accuracy over the transfer targets",
                "epoch": best["epoch"],
                "source_test_accuracy": epoch["test_accuracy"],
                "source_nc1_train": epoch["nc1_train"],
            })  # fmt: skip
        write_backbone(out, fp16_state(acc.unwrap_model(run.net).backbone), card)
        last = run.history[-1]
        acc.print(
            f"source test accuracy {last['test_accuracy']:.4f}, NC1 {last['nc1_train']:.3f}, "
            f"{card['wall_time_s']}s; wrote {out}/backbone.safetensors"
            + (f"; best transfer: epoch {best['epoch']} (mean probe accuracy "
               f"{best['score']:.4f}) -> {out}/best_transfer/" if best else "")
        )  # fmt: skip
    acc.end_training()


if __name__ == "__main__":
    run_cli(main)
