"""Choose the block to fine-tune from NC1 on a downstream training set, and write the report.

    python recipes/select_block.py                                   # bundled resnet18, digits
    python recipes/select_block.py --dataset fashion_mnist --classes 5,6,7,8,9 --per_class 20 \\
        --rule probe --output_dir runs/select

Writes ``block_selection.json`` (one row per candidate, the choice and why) and
``block_selection.png`` (NC1 over depth, choice marked) under ``output_dir`` and prints the
table. Only the training split is used (a seeded class-balanced subset with --per_class).
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

import torch

import ncfinetune
from ncfinetune import data as nd
from ncfinetune.config import DownstreamConfig, parse_config, save_config
from ncfinetune.selection import DEFAULT_RULE, PROBE_STEPS, RULES


@dataclass
class SelectConfig(DownstreamConfig):
    # backbone and data keys: DownstreamConfig (model, pretrained, checkpoint, dataset, data_dir,
    # image_column, label_column, classes, per_class, test_fraction, image_size, seed); only
    # the training split is read
    rule: str = DEFAULT_RULE  # curve | probe | probe_accuracy
    method: str = "scl"  # layer | scl
    candidates: list[str] | None = None  # block indices or names; default all
    max_trainable_percent: float | None = None
    probe_steps: int = PROBE_STEPS
    lr: float = 0.03
    bn: str | None = None
    output_dir: str = "runs/select_block"

    def validate(self) -> list[str]:
        p = super().validate()
        if self.rule not in RULES:
            p.append(f"rule {self.rule!r} is not one of {', '.join(RULES)}")
        if self.method not in ("layer", "scl"):
            p.append(f"method {self.method!r} is not one of layer, scl")
        if self.probe_steps < 1:
            p.append(f"probe_steps must be >= 1, got {self.probe_steps}")
        return p


def main(argv: list[str] | None = None) -> ncfinetune.BlockSelection:
    cfg = parse_config(SelectConfig, sys.argv[1:] if argv is None else argv)
    torch.manual_seed(cfg.seed)
    data = cfg.load_data()
    model = cfg.load_model(data.num_classes)
    rows = None
    if cfg.per_class:
        rows = nd.balanced_subset(data.labels("train"), per_class=cfg.per_class, seed=cfg.seed)
    sel = ncfinetune.select_block_on_split(
        model,
        data,
        nd.build_transforms(model, image_size=cfg.image_size),
        rows,
        rule=cfg.rule,
        method=cfg.method,
        candidates=[int(c) if str(c).lstrip("-").isdigit() else c for c in cfg.candidates]
        if cfg.candidates
        else None,
        max_trainable_percent=cfg.max_trainable_percent,
        probe_steps=cfg.probe_steps,
        lr=cfg.lr,
        bn=cfg.bn,
        seed=cfg.seed,
    )
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    save_config(cfg, out / "config.yaml")
    report, png = sel.save(out)
    print(f"{sel}\nreport: {report}, plot: {png}")
    return sel


if __name__ == "__main__":
    main()
