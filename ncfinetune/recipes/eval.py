"""Evaluate a tuned folder (``<output_dir>/tuned`` of recipes/finetune.py) on a dataset.

    python recipes/eval.py --tuned runs/finetune/tuned          # the test split it was tuned on
    python recipes/eval.py --tuned runs/fmnist59_scl/tuned --dataset fashion_mnist \\
        --classes 5,6,7,8,9 --output_dir runs/fmnist59_scl/eval

Writes ``evaluation.json`` (accuracy, per-class accuracy, confusion matrix, NC1 of the
classifier-input features on the evaluated samples) and ``confusion_matrix.png`` under
``output_dir`` and prints a summary. The data keys default to those the run was tuned on
(recorded in ``tuned_config.json``); any dataset spec the recipes accept can be given instead.
The model is rebuilt from the folder alone when its base is a bundled backbone or a
recipes/pretrain.py folder (``ncfinetune.inference.load_tuned_folder``).
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

from ncfinetune.files import write_json
from ncfinetune.inference import Evaluation, evaluate, recorded_data
from ncfinetune.recipes.checks import output_problems, seed_problems
from ncfinetune.recipes.config import key, parse_config, run_cli
from ncfinetune.recipes.sections import TunedConfig
from ncfinetune.tuning.checkpoint import read_tuned_config

DATA_KEYS = ("dataset", "data_dir", "image_column", "label_column", "classes", "test_fraction",
             "seed", "allow_outside_paths", "skip_unreadable")  # fmt: skip


@dataclass
class EvaluateConfig(TunedConfig):
    """The eval recipe's keys: the tuned folder, base backbone and run keys of
    :class:`TunedConfig`, and the data to evaluate on (null: as the folder records it)."""

    dataset: str | None = key(
        None,
        "null = the dataset the folder was tuned on; else any spec the recipes accept (digits, "
        "fashion_mnist, a folder, a .csv/.parquet file, a hub name)",
    )
    data_dir: str | None = key(None, "fashion_mnist: folder of the IDX files (null = as recorded)")
    image_column: str | None = key(None, "null = as recorded, else detected")
    label_column: str | None = key(None, "null = as recorded, else detected")
    classes: list[int] | None = key(None, "keep these classes, renumbered (null = as recorded)")
    test_fraction: float | None = key(None, "test share without a test split (null = as recorded)")
    seed: int | None = key(None, "seed of that split (null = as recorded)")
    allow_outside_paths: bool | None = key(
        None, ".csv/.parquet: allow image paths outside the table's folder (null = as recorded)"
    )
    skip_unreadable: bool | None = key(None, "leave out unreadable images (null = as recorded)")
    split: str = key("test", "test | train")
    output_dir: str = key("runs/evaluate", "evaluation.json and confusion_matrix.png go here")

    def validate(self) -> list[str]:
        p = super().validate()
        if self.split not in ("test", "train"):
            p.append(f"split {self.split!r} is not one of test, train")
        if self.test_fraction is not None and not 0 < self.test_fraction < 1:
            p.append(f"test_fraction must be in (0, 1) or null, got {self.test_fraction}")
        if self.seed is not None:
            p += seed_problems(self.seed)
        p += output_problems("output_dir", self.output_dir)
        return p


def main(argv: list[str] | None = None) -> Evaluation:
    cfg = parse_config(EvaluateConfig, sys.argv[1:] if argv is None else argv)
    changes = {k: getattr(cfg, k) for k in DATA_KEYS if getattr(cfg, k) is not None}
    data = recorded_data(read_tuned_config(cfg.tuned), **changes)
    run = cfg.run_kwargs()
    result = evaluate(cfg.tuned, data, split=cfg.split, **run, **cfg.load_kwargs())
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    record = {"tuned": str(cfg.tuned), **result.to_dict(), "precision": run["precision"]}
    write_json(out / "evaluation.json", record)
    png = result.plot_confusion(out / "confusion_matrix.png")
    nc = "n/a" if result.nc1 is None else f"{result.nc1:.3f}"
    worst = sorted(
        ((a, n) for n, a in result.per_class_accuracy.items() if a is not None),
        key=lambda t: t[0],
    )[:3]
    print(
        f"{result.info['model']}\n{data.name} ({cfg.split}): {result.num_samples} images; accuracy "
        f"{100 * result.accuracy:.2f}%; NC1 {nc}\nlowest per-class accuracy: "
        + ", ".join(f"{n} {100 * a:.1f}%" for a, n in worst)
        + f"\nwrote {out / 'evaluation.json'} and {png}"
    )
    return result


if __name__ == "__main__":
    run_cli(main)
