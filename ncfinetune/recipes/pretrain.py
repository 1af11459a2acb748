"""Supervised pretraining of a timm backbone, e.g. the bundled resnet18 on Fashion-MNIST 0-4.

    accelerate launch recipes/pretrain.py --config recipes/configs/pretrain/resnet18_fmnist04.yaml

Cross-entropy with optional label smoothing and the optional MLP projector of Wang et al.
(FC-BN-ReLU-FC between backbone and classifier, discarded after pretraining). Logs source test
accuracy and NC1 of the backbone features on source training data every epoch. Optional
distillation from a teacher backbone (``--teacher resnet18_fmnist04``): its classifier is a
linear probe fitted on the source training features, and the student's target is
``(1 - distill_alpha) * one_hot(label) + distill_alpha * softmax(teacher logits)``.

Writes the backbone (without classifier or projector) in float16 safetensors plus a JSON card
and a markdown model card, into ``output_dir`` only: the recipe never writes into the installed
package. Shipping a backbone with the package is a separate maintainer step
(``python tools/bundle_backbone.py runs/pretrain_x NAME``; see the README).
"""

from __future__ import annotations

import dataclasses
import json
import shlex
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import safetensors.torch
import timm
import torch
from accelerate import Accelerator
from accelerate.utils import DataLoaderConfiguration, set_seed
from torch import nn

import ncfinetune
import ncfinetune.backbones.hub
import ncfinetune.data as nd
from ncfinetune.backbones.base import Prediction
from ncfinetune.errors import ConfigError
from ncfinetune.files import atomic_write, write_json, write_text
from ncfinetune.recipes.config import key, parse_config, run_cli, save_config
from ncfinetune.recipes.engine import (
    build_schedule,
    collect_nc1,
    predict,
    set_cpu_threads,
    train_epoch,
)
from ncfinetune.recipes.sections import bound_problems, output_problems, seed_problems
from ncfinetune.training.device import choose_precision, launch_device_type, precision_problem


@dataclass
class PretrainConfig:
    """The pretrain recipe's keys (``--help`` lists them with their defaults)."""

    model: str = key("resnet18", "any timm architecture, trained from scratch")
    img_size: int | None = key(None, "ViT only: positional-embedding grid (timm img_size)")
    patch_size: int | None = key(None, "ViT only")
    model_kwargs: dict = key({}, "more timm.create_model args, e.g. depth")
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
    epochs: int = key(12, "passes over the source training split")
    batch_size: int = key(128, "images per process per step (x processes per update)")
    optimizer: str = key("sgd", "sgd (momentum) | adamw")
    lr: float = key(0.1, "the cosine schedule's first lr")
    min_lr: float = key(0.0, "the cosine schedule's final lr")
    momentum: float = key(0.9, "SGD momentum")
    weight_decay: float = key(5e-4, "on every parameter")
    label_smoothing: float = key(0.0, "cross-entropy label smoothing in [0, 1)")
    init_from: str | None = key(
        None,
        "start from this backbone's weights (bundled name or pretrain folder) of the same "
        "architecture and model_kwargs, and keep its normalisation; null = random init",
    )
    teacher: str | None = key(None, "distil from this backbone (bundled name or pretrain folder)")
    distill_alpha: float = key(
        0.5, "weight of the teacher's probabilities in the target, in (0, 1]"
    )
    projector: bool = key(False, "train through an MLP projector (FC-BN-ReLU-FC), then drop it")
    projector_dim: int = key(2048, "hidden width of that projector")
    nc1_samples: int = key(5000, "source training samples used for the per-epoch NC1")
    mixed_precision: str | None = key(
        None,
        "no | fp16 | bf16 | auto (bf16 where native); null = accelerate's choice (accelerate "
        "launch --mixed_precision, its config file or ACCELERATE_MIXED_PRECISION; none: no)",
    )
    cpu_threads: int | None = key(None, "CPU only; null = cores / processes on this machine")
    seed: int = key(0, "seeds the initialisation, the shuffling and the NC1 sample")
    max_steps: int | None = key(None, "per epoch; for smoke tests")
    output_dir: str = key("runs/pretrain", "backbone.{safetensors,json,md}; never overwritten")
    bundle_as: str | None = key(None, "removed: use tools/bundle_backbone.py (a maintainer step)")

    def validate(self) -> list[str]:
        problems = []
        if self.bundle_as is not None:
            problems.append(
                f"bundle_as ({self.bundle_as!r}) was removed: a recipe never writes into the "
                "installed package. Pretrain into output_dir, then (maintainers) run "
                f"`python tools/bundle_backbone.py {self.output_dir} NAME`; drop bundle_as."
            )
        if not 0 < self.distill_alpha <= 1:
            problems.append(f"distill_alpha must be in (0, 1], got {self.distill_alpha}")
        clash = {"num_classes", "pretrained", "img_size", "patch_size"} & set(self.model_kwargs)
        if clash:
            problems.append(
                f"model_kwargs may not set {sorted(clash)}: use the img_size/patch_size keys "
                "(the classifier and weights are the recipe's own)"
            )
        if self.cpu_threads is not None and self.cpu_threads < 1:
            problems.append(f"cpu_threads must be >= 1 or null (auto), got {self.cpu_threads}")
        if not timm.is_model(self.model):
            problems.append(f"model {self.model!r} is not a timm architecture")
        for name in ("epochs", "batch_size", "image_size", "nc1_samples"):
            if getattr(self, name) < 1:
                problems.append(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.optimizer not in ("sgd", "adamw"):
            problems.append(f"optimizer {self.optimizer!r} is not one of sgd, adamw")
        if problem := precision_problem(self.mixed_precision):
            problems.append(problem)
        if not 0 <= self.label_smoothing < 1:
            problems.append(f"label_smoothing must be in [0, 1), got {self.label_smoothing}")
        if self.max_steps is not None and self.max_steps < 1:
            problems.append(f"max_steps must be >= 1 or null, got {self.max_steps}")
        if self.lr <= 0:
            problems.append(f"lr must be > 0, got {self.lr}")
        problems += bound_problems(
            self, weight_decay=">=0", min_lr=">=0", momentum="[0,1)", projector_dim=">=1",
            img_size=">=1", patch_size=">=1",
        )  # fmt: skip
        if self.min_lr > self.lr:
            problems.append(f"min_lr ({self.min_lr}) must be <= lr ({self.lr})")
        if len(set(self.classes)) < 2 or len(set(self.classes)) != len(self.classes):
            problems.append(f"classes must name at least 2 distinct classes, got {self.classes}")
        if self.init_from and timm.is_model(self.model):
            problems += init_problems(self.init_from, self.model, self.timm_kwargs())
        problems += seed_problems(self.seed)
        problems += output_problems("output_dir", self.output_dir)
        return problems

    def timm_kwargs(self) -> dict:
        """The ``timm.create_model`` arguments of the backbone: img_size, patch_size, model_kwargs."""
        kwargs = {
            k: v for k, v in (("img_size", self.img_size), ("patch_size", self.patch_size)) if v
        }
        return {**kwargs, **self.model_kwargs}


class PretrainNet(nn.Module):
    """Backbone (timm, no classifier) -> optional MLP projector -> linear classifier."""

    def __init__(self, backbone: nn.Module, num_classes: int, projector: bool, hidden: int):
        super().__init__()
        d = backbone.num_features
        self.backbone = backbone
        self.projector = (
            nn.Sequential(
                nn.Linear(d, hidden), nn.BatchNorm1d(hidden), nn.ReLU(), nn.Linear(hidden, d)
            )
            if projector
            else nn.Identity()
        )
        self.classifier = nn.Linear(d, num_classes)

    def forward_with_features(self, x):
        feats = self.backbone(x)
        return Prediction(self.classifier(self.projector(feats)), feats)

    def forward(self, x):
        return self.forward_with_features(x).logits


def channel_stats(model: nn.Module, dataset, n: int = 5000) -> tuple[tuple[float, ...], ...]:
    """Per-channel mean and std of up to ``n`` images after the model's (unnormalised) resize."""
    idx = list(range(min(n, len(dataset))))
    loader = nd.build_loader(
        dataset, nd.build_transforms(model), batch_size=1000, shuffle=False, indices=idx
    )
    x = torch.cat([b for b, _ in loader]).double()
    mean, std = x.mean(dim=(0, 2, 3)), x.std(dim=(0, 2, 3))
    return tuple(round(v, 4) for v in mean.tolist()), tuple(round(v, 4) for v in std.tolist())


def jitter(x: torch.Tensor, pad: int = 2) -> torch.Tensor:
    """Random horizontal flip and translation by up to ``pad`` pixels, per batch."""
    if torch.rand(()) < 0.5:
        x = x.flip(3)
    dx, dy = torch.randint(-pad, pad + 1, (2,)).tolist()
    return torch.roll(x, shifts=(dy, dx), dims=(2, 3))


def main(argv: list[str] | None = None) -> dict:
    cfg = parse_config(PretrainConfig, sys.argv[1:] if argv is None else argv)
    if (Path(cfg.output_dir) / "backbone.json").is_file():
        raise ConfigError(
            f"output_dir {cfg.output_dir} already holds a pretrained backbone (backbone.json); "
            "a run never overwrites another. Pass a new --output_dir, or delete the folder."
        )
    # the recipe's mixed_precision when set, else accelerate's own choice (None)
    precision, _ = choose_precision(cfg.mixed_precision, launch_device_type())
    acc = Accelerator(
        mixed_precision=precision,
        # accelerate's seedable sampler: epoch e is shuffled by (seed, e) on every process
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True, data_seed=cfg.seed),
    )
    cfg = dataclasses.replace(cfg, mixed_precision=acc.mixed_precision)  # recorded as it ran
    set_seed(cfg.seed)
    set_cpu_threads(acc, cfg.cpu_threads)
    out = Path(cfg.output_dir)
    loaded = nd.load_image_dataset(
        cfg.dataset,
        data_dir=cfg.data_dir,
        allow_outside_paths=cfg.allow_outside_paths,
        skip_unreadable=cfg.skip_unreadable,
    )
    data = nd.select_classes(loaded, cfg.classes)
    data_cfg = {
        "input_size": (3, cfg.image_size, cfg.image_size),
        "mean": (0.0,) * 3,
        "std": (1.0,) * 3,
        "crop_pct": 1.0,
        "interpolation": "bilinear",
        "num_classes": 0,
    }
    kwargs = cfg.timm_kwargs()
    backbone = timm.create_model(
        cfg.model, num_classes=0, pretrained_cfg_overlay=data_cfg, **kwargs
    )
    if cfg.init_from:
        data_cfg["mean"], data_cfg["std"] = load_init(cfg.init_from, backbone)
    else:
        # normalise with the source data's own statistics (recorded in the card for fine-tuning)
        data_cfg["mean"], data_cfg["std"] = channel_stats(backbone, data.train)
    backbone.pretrained_cfg.update(mean=data_cfg["mean"], std=data_cfg["std"])
    net = PretrainNet(backbone, data.num_classes, cfg.projector, cfg.projector_dim)
    tf = nd.build_transforms(backbone, augment=False)
    train = nd.build_loader(
        data.train, tf, batch_size=cfg.batch_size, shuffle=True, seed=cfg.seed, drop_last=True
    )
    g = torch.Generator().manual_seed(cfg.seed)
    probe_idx = torch.randperm(len(data.train), generator=g)[: cfg.nc1_samples].tolist()
    probe = nd.build_loader(data.train, tf, batch_size=512, shuffle=False, indices=probe_idx)
    test = nd.build_loader(data.test, tf, batch_size=512, shuffle=False)
    params = [p for p in net.parameters()]
    if cfg.optimizer == "sgd":
        opt = torch.optim.SGD(
            params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay
        )
    else:
        opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    net, opt, train, test = acc.prepare(net, opt, train, test)  # probe: NC1 shards it itself
    # as long as the run's optimizer steps, counted on the prepared (per-process) loader
    sched, plan = build_schedule(
        acc, opt, train, epochs=cfg.epochs, min_lr=cfg.min_lr, max_steps=cfg.max_steps
    )
    teacher, teacher_note = None, None
    if cfg.teacher:
        teacher, teacher_note = fit_teacher(cfg, acc, data, backbone)
        acc.print(f"teacher {cfg.teacher}: {teacher_note}")
    train_iter = _Targets(
        train,
        augment=cfg.augment,
        teacher=teacher,
        alpha=cfg.distill_alpha,
        num_classes=data.num_classes,
        autocast=acc.autocast,
    )
    acc.print(
        f"pretraining {cfg.model} on {nd.describe(data)}; {sum(p.numel() for p in params):,} parameters"
    )
    history, start = [], time.time()
    for epoch in range(cfg.epochs):
        train.set_epoch(epoch)
        stats_e = train_epoch(
            acc,
            net,
            train_iter,
            opt,
            sched,
            label_smoothing=cfg.label_smoothing,
            max_steps=cfg.max_steps,
            desc=f"epoch {epoch + 1}",
            steps_before=epoch * plan.steps_per_epoch,
        )
        res = predict(acc, net, test)
        accuracy = (res["preds"] == res["labels"]).float().mean().item()
        row = {
            "epoch": epoch + 1,
            "train_loss": stats_e.loss,
            "lr": stats_e.lrs[-1],
            "test_accuracy": accuracy,
            "nc1_train": collect_nc1(acc, net, probe),  # streamed, merged across processes
            "images_per_s": stats_e.images_per_s,
        }
        history.append(row)
        acc.print(json.dumps(row))
    if acc.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
        save_config(cfg, out / "config.yaml")
        state = {
            k: v.detach().to(torch.float16).contiguous()
            for k, v in acc.unwrap_model(net).backbone.state_dict().items()
        }
        atomic_write(
            out / "backbone.safetensors",
            lambda tmp: safetensors.torch.save_file(state, tmp, metadata={"format": "pt"}),
        )
        card = {
            "architecture": cfg.model,
            "model_kwargs": kwargs,
            "pretrained_cfg": data_cfg,
            "source": {
                "dataset": cfg.dataset,
                "classes": cfg.classes,
                "class_names": data.class_names,
                "train_size": len(data.train),
                "test_size": len(data.test),
            },
            "training": {
                k: v for k, v in vars(cfg).items() if k not in ("output_dir", "bundle_as")
            },
            "teacher": teacher_note,
            "source_test_accuracy": history[-1]["test_accuracy"],
            "source_nc1_train": history[-1]["nc1_train"],
            "final_lr": opt.param_groups[0]["lr"],  # the schedule's end: min_lr
            "history": history,
            "wall_time_s": round(time.time() - start, 1),
            "command": "accelerate launch recipes/pretrain.py "
            + shlex.join(sys.argv[1:] if argv is None else argv),  # pasteable: quoted
            "versions": {
                "ncfinetune": ncfinetune.__version__,
                "timm": timm.__version__,
                "torch": torch.__version__,
            },
        }
        write_text(out / "backbone.md", model_card(card))
        write_json(out / "backbone.json", card)  # last: its presence marks a finished run
        acc.print(
            f"source test accuracy {history[-1]['test_accuracy']:.4f}, NC1 {history[-1]['nc1_train']:.3f}, "
            f"{card['wall_time_s']}s; wrote {out}/backbone.safetensors"
        )
    acc.end_training()
    return {"history": history}


class _Targets:
    """Wraps a loader: :func:`jitter` each batch (``augment``) and, with a ``teacher``, replace
    the labels by the distillation target ``(1 - alpha) * one_hot + alpha * softmax(teacher)``
    (cross-entropy takes class probabilities as its target)."""

    def __init__(self, loader, *, augment, teacher, alpha, num_classes, autocast):
        self.loader, self.augment, self.teacher = loader, augment, teacher
        self.alpha, self.num_classes, self.autocast = alpha, num_classes, autocast

    def __len__(self):
        return len(self.loader)

    def __iter__(self):
        for x, y in self.loader:
            if self.augment:
                x = jitter(x)
            if self.teacher is not None:
                with torch.no_grad(), self.autocast():
                    soft = self.teacher(x.to(_device(self.teacher))).float().softmax(-1)
                hard = nn.functional.one_hot(y, self.num_classes).float()
                y = (1 - self.alpha) * hard.to(soft.device) + self.alpha * soft
            yield x, y


def _device(module: nn.Module) -> torch.device:
    return next(module.parameters()).device


class _Renormalized(nn.Module):
    """The teacher behind a change of input normalisation: the loader normalises with the
    student's statistics; the teacher was trained with its own."""

    def __init__(self, model: nn.Module, student_stats, teacher_stats):
        super().__init__()
        self.model = model
        for name, (mean, std) in (("s", student_stats), ("t", teacher_stats)):
            self.register_buffer(f"{name}_mean", torch.tensor(mean).view(1, -1, 1, 1))
            self.register_buffer(f"{name}_std", torch.tensor(std).view(1, -1, 1, 1))

    def forward(self, x):
        raw = x * self.s_std + self.s_mean
        return self.model((raw - self.t_mean) / self.t_std)


def init_problems(name: str, model: str, kwargs: dict) -> list[str]:
    """Why backbone ``name`` cannot start a run that builds ``model`` with ``kwargs``."""
    found = ncfinetune.backbones.hub.backbone_files(name)
    if found is None:
        return [
            f"init_from {name!r} is neither a bundled backbone "
            f"({', '.join(ncfinetune.backbones.hub.bundled_backbones())}) nor a folder with backbone.json "
            "from recipes/pretrain.py; pass one of those, or null to start from random weights."
        ]
    card = found[0]
    theirs = (card["architecture"], card.get("model_kwargs", {}))
    if theirs != (model, kwargs):
        return [
            f"init_from {name!r} is {theirs[0]} with {theirs[1]}, this run builds {model} with "
            f"{kwargs}; set model, img_size, patch_size and model_kwargs to match it."
        ]
    return []


def load_init(name: str, backbone: nn.Module) -> tuple[tuple, tuple]:
    """Copy the weights of backbone ``name`` (bundled or a pretrain folder) into ``backbone``,
    whose architecture and timm arguments ``PretrainConfig.validate`` checked against it;
    returns its (mean, std)."""
    card, weights = ncfinetune.backbones.hub.backbone_files(name)
    backbone.load_state_dict(safetensors.torch.load_file(weights), strict=True)
    cfg = card["pretrained_cfg"]
    return tuple(cfg["mean"]), tuple(cfg["std"])


def fit_teacher(cfg, acc, data, student: nn.Module) -> tuple[nn.Module, dict]:
    """The teacher backbone with a linear classifier fitted (multinomial logistic regression,
    scikit-learn) on its features of the unaugmented source training images. Returns the
    teacher (eval mode, frozen, on the accelerator's device) and what to record about it."""
    from sklearn.linear_model import LogisticRegression

    model = (
        ncfinetune.backbones.hub.create_backbone(cfg.teacher, data.num_classes)
        .eval()
        .requires_grad_(False)
    )
    size = tuple(model.pretrained_cfg["input_size"])
    if size != (3, cfg.image_size, cfg.image_size):
        raise ConfigError(
            f"teacher {cfg.teacher!r} takes input {size}, the student (3, {cfg.image_size}, "
            f"{cfg.image_size}); pick a teacher pretrained at image_size {cfg.image_size}."
        )
    tf = nd.build_transforms(model, augment=False)  # the teacher's own normalisation
    splits = {}
    for split, dataset in (("train", data.train), ("test", data.test)):
        loader = nd.build_loader(dataset, tf, batch_size=512, shuffle=False)
        feats, labels = [], []
        with torch.no_grad():
            for x, y in loader:
                feats.append(model.forward_head(model.forward_features(x), pre_logits=True))
                labels.append(y)
        splits[split] = (torch.cat(feats).float().numpy(), torch.cat(labels).numpy())
    probe = LogisticRegression(max_iter=1000).fit(*splits["train"])
    head = model.get_classifier()
    head.weight.data.copy_(torch.as_tensor(probe.coef_, dtype=head.weight.dtype))
    head.bias.data.copy_(torch.as_tensor(probe.intercept_, dtype=head.bias.dtype))
    stats = (tuple(model.pretrained_cfg["mean"]), tuple(model.pretrained_cfg["std"]))
    student_stats = (tuple(student.pretrained_cfg["mean"]), tuple(student.pretrained_cfg["std"]))
    teacher = _Renormalized(model, student_stats, stats).to(acc.device).eval()
    note = {
        "backbone": cfg.teacher,
        "classifier": "logistic regression on its source training features",
        "source_test_accuracy": round(float(probe.score(*splits["test"])), 4),
        "distill_alpha": cfg.distill_alpha,
    }
    return teacher, note


def model_card(card: dict) -> str:
    src, tr = card["source"], card["training"]
    rows = "\n".join(
        f"| {h['epoch']} | {h['train_loss']:.4f} | {h['test_accuracy']:.4f} | {h['nc1_train']:.3f} |"
        for h in card["history"]
    )
    t = card.get("teacher")
    teacher_line = (
        f"- distilled from `{t['backbone']}` (its classifier: {t['classifier']}; source test "
        f"accuracy {t['source_test_accuracy']:.4f}), target weight {t['distill_alpha']}\n"
        if t
        else ""
    )
    start = (
        f"Trained from the weights of `{tr['init_from']}` (its own card describes that stage)"
        if tr.get("init_from")
        else "Trained from scratch"
    )
    return f"""# {card["architecture"]} pretrained on {src["dataset"]} classes {src["classes"]}

{start} with `recipes/pretrain.py` on this project's machine (2 CPU cores).

- architecture: `{card["architecture"]}` {card["model_kwargs"] or ""}, input {card["pretrained_cfg"]["input_size"]}
- data: {src["dataset"]} classes {src["classes"]} ({", ".join(src["class_names"])}), {src["train_size"]} train / {src["test_size"]} test images, grayscale replicated to RGB, mean {[round(m, 4) for m in card["pretrained_cfg"]["mean"]]}, std {[round(s, 4) for s in card["pretrained_cfg"]["std"]]}
- training: {tr["epochs"]} epochs, batch {tr["batch_size"]}, {tr["optimizer"]} lr {tr["lr"]} cosine, momentum {tr["momentum"]}, weight decay {tr["weight_decay"]}, label smoothing {tr["label_smoothing"]}, projector {tr["projector"]}, augment {tr["augment"]}, seed {tr["seed"]}
{teacher_line}- **source test accuracy: {card["source_test_accuracy"]:.4f}**; NC1 of backbone features on {tr["nc1_samples"]} source training images: {card["source_nc1_train"]:.3f}
- wall time: {card["wall_time_s"]} s; weights stored as float16 (no classifier)
- command: `{card["command"]}`
- versions: {card["versions"]}

| epoch | train loss | source test acc | NC1 (train) |
|---|---|---|---|
{rows}
"""


if __name__ == "__main__":
    run_cli(main)
