"""Choose the block (and the learning rate) to fine-tune on a downstream training set.

    python recipes/select_block.py                                   # bundled resnet18, digits
    python recipes/select_block.py --dataset fashion_mnist --classes 5,6,7,8,9 --per_class 20 \\
        --rule probe_accuracy --output_dir runs/select

Writes ``block_selection.json`` (one row per candidate, the choice and why) and
``block_selection.png`` (the quantity the rule chose by, the choice marked; accuracy against
trainable share) under ``output_dir`` and prints the table. Only the training split is used (a
seeded class-balanced subset with --per_class). The defaults are ``ncfinetune.select_block``'s,
and ``recipes/finetune.py --block auto`` runs the same code: same data and seed, same choice.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

import torch

import ncfinetune
import ncfinetune.data as nd
import ncfinetune.selection as S
from ncfinetune.recipes.config import (
    DownstreamConfig,
    output_problems,
    parse_config,
    run_cli,
    save_config,
)
from ncfinetune.training.device import LOOP_PRECISIONS, launch_device_type, precision_problem


@dataclass
class SelectConfig(DownstreamConfig):
    # backbone and data keys: DownstreamConfig (model, pretrained, checkpoint, dataset, data_dir,
    # image_column, label_column, classes, per_class, test_fraction, image_size, seed); only
    # the training split is read

    rule: str = S.DEFAULT_RULE  # probe | probe_accuracy | middle | curve | linear
    method: str = "scl"  # a one-block method: layer | scl | lora-block
    candidates: list[str] | None = None  # block indices or names; default: within the budget
    max_trainable_percent: float | None = S.MAX_TRAINABLE_PERCENT  # % trainable at most (null: any)
    lr: float | str = S.PROBE_LR  # the probes' lr; auto: chosen with the block by short probes
    probe_steps: int = S.PROBE_STEPS  # optimizer steps of each probe fine-tune
    bn: str | None = None  # BatchNorm statistics: update | frozen (null = update)
    # probes: null = accelerate's choice, as finetune.py takes it (fp16: fp32) | no | bf16 |
    # auto (bf16 where the device computes it natively)
    mixed_precision: str | None = None
    select_max_images: int = 5000  # a class-balanced sample of the training subset, as finetune.py
    output_dir: str = "runs/select_block"  # block_selection.json / .png and config.yaml

    def validate(self) -> list[str]:
        p = super().validate()
        if self.rule not in S.RULES:
            p.append(f"rule {self.rule!r} is not one of {', '.join(S.RULES)}")
        one_block = [n for n, c in ncfinetune.tuning.methods.METHODS.items() if c.tunes_block]
        if self.method not in one_block:
            p.append(f"method {self.method!r} is not one of {', '.join(one_block)}")
        if self.probe_steps < 1:
            p.append(f"probe_steps must be >= 1, got {self.probe_steps}")
        if self.lr != "auto" and not (isinstance(self.lr, float) and self.lr > 0):
            p.append(f"lr must be a number > 0 or auto, got {self.lr!r}")
        if problem := precision_problem(self.mixed_precision, ("auto", *LOOP_PRECISIONS)):
            p.append(problem)
        p += output_problems("output_dir", self.output_dir)
        if self.select_max_images < 1:
            p.append(f"select_max_images must be >= 1, got {self.select_max_images}")
        return p


def main(argv: list[str] | None = None) -> ncfinetune.selection.BlockSelection:
    cfg = parse_config(SelectConfig, sys.argv[1:] if argv is None else argv)
    torch.manual_seed(cfg.seed)
    data = cfg.load_data()
    model = cfg.load_model(data.num_classes)
    rows = None
    if cfg.per_class:
        rows = nd.balanced_subset(data.labels("train"), per_class=cfg.per_class, seed=cfg.seed)
    sel = ncfinetune.selection.select_block_on_split(
        model,
        data,
        nd.build_transforms(model, image_size=cfg.image_size),
        rows,
        max_images=cfg.select_max_images,
        rule=cfg.rule,
        method=cfg.method,
        candidates=[int(c) if str(c).lstrip("-").isdigit() else c for c in cfg.candidates]
        if cfg.candidates
        else None,
        max_trainable_percent=cfg.max_trainable_percent,
        lr=cfg.lr,
        probe_steps=cfg.probe_steps,
        bn=cfg.bn,
        precision=cfg.mixed_precision,
        device=launch_device_type(),  # where finetune.py would train
        seed=cfg.seed,
    )
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    save_config(cfg, out / "config.yaml")
    report, png = sel.save(out)
    print(f"{sel}\nreport: {report}, plot: {png}")
    return sel


if __name__ == "__main__":
    run_cli(main)
