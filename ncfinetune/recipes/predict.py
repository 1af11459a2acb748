"""Predict the class of every image in a folder with a tuned folder, into a CSV.

    python recipes/predict.py --tuned runs/finetune/tuned --images my_images/ --output preds.csv

Reads every image under ``images`` (recursively; the extensions PIL reads) or one image file,
and writes one CSV row per image: ``file`` (relative to the folder), ``class`` (its name, as
recorded when tuning), ``probability`` (softmax) and ``class_id``, quoted by Python's csv module.
A text cell that a spreadsheet would evaluate as a formula (starting with ``=``, ``+``, ``-``,
``@``, a tab or a carriage return: a file or class name such as ``=cmd|...``) is written with a
leading apostrophe, as the OWASP guidance on CSV injection advises.
The model is rebuilt from the folder alone when its base is a bundled backbone or a
recipes/pretrain.py folder (``ncfinetune.inference``).
"""

from __future__ import annotations

import csv
import sys
from dataclasses import dataclass
from pathlib import Path

from ncfinetune.files import atomic_write
from ncfinetune.inference import ImagePrediction, predict
from ncfinetune.recipes.checks import output_problems
from ncfinetune.recipes.config import key, parse_config, run_cli
from ncfinetune.recipes.sections import TunedConfig


@dataclass
class PredictConfig(TunedConfig):
    """The predict recipe's keys: the tuned folder, base backbone and run keys of
    :class:`TunedConfig`, and the images to predict."""

    images: str | None = key(None, "a folder of images (searched recursively) or one image file")
    output: str = key(
        "predictions.csv",
        "the CSV written (an existing file is replaced, as eval replaces its report): file, "
        "class, probability, class_id (text cells starting with = + - @ "
        "are prefixed with ' so that spreadsheets do not evaluate them)",
    )
    skip_unreadable: bool = key(
        False, "decode every image first and leave out unreadable ones (listed in the summary)"
    )

    def validate(self) -> list[str]:
        p = super().validate()
        if not self.images:
            p.append("images is required: --images FOLDER (or one image file)")
        elif not Path(self.images).exists():
            p.append(f"images {self.images} does not exist: pass a folder of images or one file")
        p += output_problems("output", self.output, folder=False)
        return p


FORMULA_START = ("=", "+", "-", "@", "\t", "\r")


def safe_cell(text: str) -> str:
    """``text`` with a leading apostrophe when a spreadsheet would evaluate it as a formula."""
    return "'" + text if str(text).startswith(FORMULA_START) else str(text)


def write_csv(rows: list[ImagePrediction], path: str | Path) -> Path:
    """Write the predictions as CSV (header file, class, probability, class_id), atomically."""

    def write(tmp: str) -> None:
        with open(tmp, "w", newline="", encoding="utf-8") as f:
            writer = csv.writer(f)
            writer.writerow(["file", "class", "probability", "class_id"])
            for r in rows:
                writer.writerow(
                    [safe_cell(r.file), safe_cell(r.class_name), f"{r.probability:.6f}", r.class_id]
                )

    return atomic_write(path, write)


def main(argv: list[str] | None = None) -> list[ImagePrediction]:
    cfg = parse_config(PredictConfig, sys.argv[1:] if argv is None else argv)
    skipped: list[tuple[str, str]] = []
    rows = predict(
        cfg.tuned, cfg.images, **cfg.run_kwargs(), **cfg.load_kwargs(),
        skip_unreadable=cfg.skip_unreadable, skipped=skipped,
    )  # fmt: skip
    replaced = Path(cfg.output).is_file()
    path = write_csv(rows, cfg.output)
    left = f", {len(skipped)} unreadable left out" if skipped else ""
    print(f"{len(rows)} images predicted{left}; {'replaced' if replaced else 'wrote'} {path}")
    for name, why in skipped[:5]:
        print(f"  left out {name}: {why}")
    return rows


if __name__ == "__main__":
    run_cli(main)
