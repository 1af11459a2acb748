"""The pretrain recipe's pieces: the network (backbone, optional MLP projector, classifier),
the source statistics, batch augmentation and distillation targets, the teacher (a backbone
whose classifier is a linear probe), starting from another backbone, the cards and the
backbone folder."""

from __future__ import annotations

import shlex
from pathlib import Path

import safetensors.torch
import timm
import torch
from torch import nn

import ncfinetune.backbones.hub
import ncfinetune.data as nd
from ncfinetune._version import __version__
from ncfinetune.backbones.base import Prediction
from ncfinetune.errors import ConfigError
from ncfinetune.files import atomic_write, write_json, write_text
from ncfinetune.recipes.config import flat_config
from ncfinetune.recipes.monitor import best_epochs
from ncfinetune.training.device import model_device


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


def fp16_state(backbone: nn.Module) -> dict[str, torch.Tensor]:
    """The backbone's weights as stored: float16 copies on the CPU."""
    return {
        k: v.detach().to("cpu", torch.float16).contiguous().clone()
        for k, v in backbone.state_dict().items()
    }


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


class Targets:
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
                    soft = self.teacher(x.to(model_device(self.teacher))).float().softmax(-1)
                hard = nn.functional.one_hot(y, self.num_classes).float()
                y = (1 - self.alpha) * hard.to(soft.device) + self.alpha * soft
            yield x, y


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
    try:
        found = ncfinetune.backbones.hub.backbone_files(name)
    except ConfigError as err:  # a folder without its weights: one problem among the others
        return [f"init_from {name!r}: {err}"]
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


def build_backbone(cfg, data) -> tuple[nn.Module, dict]:
    """The timm backbone (no classifier) and its data config: normalised with the source
    data's own statistics, or with those of the ``init_from`` backbone whose weights it takes."""
    data_cfg = {
        "input_size": (3, cfg.data.image_size, cfg.data.image_size),
        "mean": (0.0,) * 3,
        "std": (1.0,) * 3,
        "crop_pct": 1.0,
        "interpolation": "bilinear",
        "num_classes": 0,
    }
    backbone = timm.create_model(
        cfg.backbone.model,
        num_classes=0,
        pretrained_cfg_overlay=data_cfg,
        **cfg.backbone.timm_kwargs(),
    )
    if cfg.backbone.init_from:
        data_cfg["mean"], data_cfg["std"] = load_init(cfg.backbone.init_from, backbone)
    else:  # recorded in the card for fine-tuning
        data_cfg["mean"], data_cfg["std"] = channel_stats(backbone, data.train)
    backbone.pretrained_cfg.update(mean=data_cfg["mean"], std=data_cfg["std"])
    return backbone, data_cfg


def fit_teacher(cfg, acc, data, student: nn.Module) -> tuple[nn.Module, dict]:
    """The teacher backbone with a linear classifier fitted (multinomial logistic regression,
    scikit-learn) on its features of the unaugmented source training images. Returns the
    teacher (eval mode, frozen, on the accelerator's device) and what to record about it."""
    from sklearn.linear_model import LogisticRegression

    model = (
        ncfinetune.backbones.hub.create_backbone(cfg.objective.teacher, data.num_classes)
        .eval()
        .requires_grad_(False)
    )
    size = tuple(model.pretrained_cfg["input_size"])
    if size != (3, cfg.data.image_size, cfg.data.image_size):
        raise ConfigError(
            f"teacher {cfg.objective.teacher!r} takes input {size}, the student (3, {cfg.data.image_size}, "
            f"{cfg.data.image_size}); pick a teacher pretrained at image_size {cfg.data.image_size}."
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
        "backbone": cfg.objective.teacher,
        "classifier": "logistic regression on its source training features",
        "source_test_accuracy": round(float(probe.score(*splits["test"])), 4),
        "distill_alpha": cfg.objective.distill_alpha,
    }
    return teacher, note


def backbone_card(run, argv: list[str]) -> dict:
    """What ``backbone.json`` records: architecture, data config, source, training, results."""
    cfg, data, last = run.cfg, run.data, run.history[-1]
    return {
        "architecture": cfg.backbone.model,
        "model_kwargs": cfg.backbone.timm_kwargs(),
        "pretrained_cfg": run.data_cfg,
        "source": {
            "dataset": cfg.data.dataset,
            "classes": cfg.data.classes,
            "class_names": data.class_names,
            "train_size": len(data.train),
            "test_size": len(data.test),
        },
        "training": {
            k: v for k, v in flat_config(cfg).items() if k not in ("output_dir", "bundle_as")
        },
        "teacher": run.teacher_note,
        "source_test_accuracy": last["test_accuracy"],
        "source_nc1_train": last["nc1_train"],
        "final_lr": run.opt.param_groups[0]["lr"],  # the schedule's end: min_lr
        "epoch": len(run.history),
        **best_epochs(run.history),
        "history": run.history,
        "wall_time_s": round(run.seconds, 1),
        "command": "accelerate launch recipes/pretrain.py " + shlex.join(argv),  # quoted
        "versions": {
            "ncfinetune": __version__,
            "timm": timm.__version__,
            "torch": torch.__version__,
        },
    }


def model_card(card: dict) -> str:
    src, tr = card["source"], card["training"]
    monitored = any("transfer" in h for h in card["history"])

    def probe(h: dict) -> str:
        score = h.get("transfer_mean_probe_accuracy")
        return "" if not monitored else " - |" if score is None else f" {score:.4f} |"

    rows = "\n".join(
        f"| {h['epoch']} | {h['train_loss']:.4f} | {h['test_accuracy']:.4f} | {h['nc1_train']:.3f} |"
        + probe(h)
        for h in card["history"]
    )
    transfer_line = (
        f"- transfer monitor on {', '.join(tr['transfer_targets'])}: best mean linear-probe "
        f"accuracy at epoch {card['best_transfer_epoch']} "
        f"({card['best_transfer_mean_probe_accuracy']:.4f}, kept in `best_transfer/`); best "
        f"source test accuracy at epoch {card['best_source_epoch']}"
        f"{'; this folder holds epoch ' + str(card['epoch']) if 'selected' in card else ''}\n"
        if card.get("best_transfer_epoch")
        else ""
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
{teacher_line}{transfer_line}- **source test accuracy: {card["source_test_accuracy"]:.4f}**; NC1 of backbone features on {tr["nc1_samples"]} source training images: {card["source_nc1_train"]:.3f}
- wall time: {card["wall_time_s"]} s; weights stored as float16 (no classifier)
- command: `{card["command"]}`
- versions: {card["versions"]}

| epoch | train loss | source test acc | NC1 (train) |{" mean transfer probe acc |" if monitored else ""}
|---|---|---|---|{"---|" if monitored else ""}
{rows}
"""


def write_backbone(folder: Path, state: dict, card: dict) -> None:
    """A backbone folder: float16 safetensors, the model card, then ``backbone.json`` (last:
    its presence marks a finished folder)."""
    folder.mkdir(parents=True, exist_ok=True)
    atomic_write(
        folder / "backbone.safetensors",
        lambda tmp: safetensors.torch.save_file(state, tmp, metadata={"format": "pt"}),
    )
    write_text(folder / "backbone.md", model_card(card))
    write_json(folder / "backbone.json", card)
