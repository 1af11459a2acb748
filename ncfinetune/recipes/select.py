"""Choose the block (and the learning rate) to fine-tune on a downstream training set.

    python recipes/select_block.py                                   # bundled resnet18, digits
    python recipes/select_block.py --dataset fashion_mnist --classes 5,6,7,8,9 --per_class 20 \\
        --rule probe_accuracy --output_dir runs/select

    python recipes/select_block.py --method auto --per_class 10     # which method, block and lr

Writes ``block_selection.json`` (one row per candidate, the choice and why) and
``block_selection.png`` (the quantity the rule chose by, the choice marked; accuracy against
trainable share) under ``output_dir`` and prints the table. Only the training split is used (a
seeded class-balanced subset with --per_class). The defaults are ``ncfinetune.select_block``'s,
and ``recipes/finetune.py --block auto`` runs the same code: same data and seed, same choice.
With ``--method auto`` it writes ``method_selection.json`` (``ncfinetune.select_method``: every
candidate method's probes, the choice and why), as ``finetune --method auto`` does.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

import torch

import ncfinetune.data as nd
import ncfinetune.selection as S
import ncfinetune.tuning.methods
from ncfinetune.recipes.checks import every_problems, output_problems, seed_problems
from ncfinetune.recipes.config import key, parse_config, run_cli, save_config, section
from ncfinetune.recipes.sections import DownstreamConfig
from ncfinetune.training.device import LOOP_PRECISIONS, launch_device_type, precision_problem
from ncfinetune.training.length import default_steps


@dataclass
class SelectionSection:
    """How the block is chosen (the defaults are ncfinetune.select_block's)."""

    rule: str = key(S.DEFAULT_RULE, " | ".join(S.RULES))
    method: str = key(
        "scl",
        "a one-block method: layer | scl | lora-block (the block is chosen), or auto: the method "
        "too (ncfinetune.selection.select_method: linear, Layer/SCL FT, LoRA-in-block, full FT)",
    )
    steps: int | None = key(
        None,
        "method auto: the fine-tune's optimizer steps the candidates compare at (null: the "
        "default length of finetune for these rows at batch 64: ncfinetune.training.length)",
    )
    candidates: list[str] | None = key(None, "block indices or names; default: within the budget")
    max_trainable_percent: float | None = key(
        S.MAX_TRAINABLE_PERCENT, "% of the parameters trainable at most (null: any)"
    )
    lr: float | str = key(S.PROBE_LR, "the probes' lr; auto: chosen with the block by short probes")
    probe_steps: int = key(S.PROBE_STEPS, "optimizer steps of each probe fine-tune")
    bn: str | None = key(None, "BatchNorm statistics: update | frozen (null = update)")
    select_max_images: int = key(
        5000, "a class-balanced sample of the training subset, as finetune's --block auto"
    )
    diagnostics: bool = key(
        True, "also R@1 and the linear-vs-MLP probe gap of each candidate (report columns)"
    )

    def validate(self) -> list[str]:
        p = []
        if self.rule not in S.RULES:
            p.append(f"rule {self.rule!r} is not one of {', '.join(S.RULES)}")
        one_block = [n for n, c in ncfinetune.tuning.methods.METHODS.items() if c.tunes_block]
        if self.method not in (*one_block, "auto"):
            p.append(f"method {self.method!r} is not one of {', '.join(one_block)} or auto")
        p += every_problems(self, ("steps",))
        if self.probe_steps < 1:
            p.append(f"probe_steps must be >= 1, got {self.probe_steps}")
        if self.lr != "auto" and not (isinstance(self.lr, float) and self.lr > 0):
            p.append(f"lr must be a number > 0 or auto, got {self.lr!r}")
        if self.select_max_images < 1:
            p.append(f"select_max_images must be >= 1, got {self.select_max_images}")
        return p


@dataclass
class SelectRun:
    """The run: seed, the probes' precision, output."""

    seed: int = key(0, "seeds the split, the subset and the probes (as finetune's)")
    mixed_precision: str | None = key(
        None,
        "probes: null = accelerate's choice, as finetune takes it (fp16: fp32) | no | bf16 | "
        "auto (bf16 where the device computes it natively)",
    )
    output_dir: str = key("runs/select_block", "block_selection.json / .png and config.yaml")

    def validate(self) -> list[str]:
        p = seed_problems(self.seed)
        if problem := precision_problem(self.mixed_precision, ("auto", *LOOP_PRECISIONS)):
            p.append(problem)
        return p + output_problems("output_dir", self.output_dir)


@dataclass
class SelectConfig(DownstreamConfig):
    """The select recipe's keys by section; backbone and data as finetune's (only the training
    split is read)."""

    selection: SelectionSection = section(SelectionSection)
    run: SelectRun = section(SelectRun)


def main(argv: list[str] | None = None) -> ncfinetune.selection.BlockSelection:
    cfg = parse_config(SelectConfig, sys.argv[1:] if argv is None else argv)
    torch.manual_seed(cfg.run.seed)
    data = cfg.load_data()
    model = cfg.load_model(data.num_classes)
    rows = None
    if cfg.data.per_class:
        rows = nd.balanced_subset(
            data.labels("train"), per_class=cfg.data.per_class, seed=cfg.run.seed
        )
    sc = cfg.selection
    if sc.method == "auto":
        return _select_method(cfg, data, model, rows)
    sel = ncfinetune.selection.select_block_on_split(
        model,
        data,
        nd.build_transforms(model, image_size=cfg.data.image_size),
        rows,
        max_images=sc.select_max_images,
        rule=sc.rule,
        method=sc.method,
        candidates=[int(c) if str(c).lstrip("-").isdigit() else c for c in sc.candidates]
        if sc.candidates
        else None,
        max_trainable_percent=sc.max_trainable_percent,
        lr=sc.lr,
        probe_steps=sc.probe_steps,
        diagnostics=sc.diagnostics or None,
        bn=sc.bn,
        precision=cfg.run.mixed_precision,
        device=launch_device_type(),  # where finetune would train
        seed=cfg.run.seed,
    )
    out = Path(cfg.run.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    save_config(cfg, out / "config.yaml")
    report, png = sel.save(out)
    print(f"{sel}\nreport: {report}, plot: {png}")
    return sel


def _select_method(cfg: SelectConfig, data, model, rows) -> ncfinetune.selection.MethodPlan:
    """``--method auto``: the method, block and lr (``select_method``), its report printed and
    written as ``method_selection.json``."""
    sc = cfg.selection
    plan = ncfinetune.selection.select_method_on_split(
        model, data, nd.build_transforms(model, image_size=cfg.data.image_size), rows,
        max_images=sc.select_max_images,
        steps=sc.steps or default_steps(data.num_training_rows(rows)),
        blocks=[int(c) if str(c).lstrip("-").isdigit() else c for c in sc.candidates]
        if sc.candidates else None,
        max_trainable_percent=sc.max_trainable_percent, probe_steps=sc.probe_steps, bn=sc.bn,
        precision=cfg.run.mixed_precision, device=launch_device_type(), seed=cfg.run.seed,
    )  # fmt: skip
    out = Path(cfg.run.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    save_config(cfg, out / "config.yaml")
    report = plan.save_json(out / "method_selection.json")
    print(f"{plan}\nreport: {report}")
    return plan


if __name__ == "__main__":
    run_cli(main)
