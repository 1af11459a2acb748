"""The command line: ``ncfinetune <command> [--key value ...]`` (also ``python -m ncfinetune``
and ``accelerate launch -m ncfinetune <command>`` for several processes).

Each command is a recipe of :mod:`ncfinetune.recipes`, run by its ``main(argv)``; ``--help``
after a command lists that recipe's keys. The thin scripts ``recipes/*.py`` of a source checkout
call :func:`run_recipe` too, so ``accelerate launch recipes/finetune.py`` and ``ncfinetune
finetune`` are the same code.
"""

from __future__ import annotations

import importlib
import sys

# command -> recipe module; "select_block" is the name of the script in a checkout.
COMMANDS = {
    "finetune": "ncfinetune.recipes.finetune",
    "select": "ncfinetune.recipes.select",
    "eval": "ncfinetune.recipes.eval",
    "predict": "ncfinetune.recipes.predict",
    "pretrain": "ncfinetune.recipes.pretrain",
}
ALIASES = {"select_block": "select", "evaluate": "eval"}

USAGE = """usage: ncfinetune <command> [--config FILE.yaml] [--key value ...]

commands:
  finetune   fine-tune a backbone (linear probe, Layer FT, SCL FT, LoRA-in-block, full FT);
             with no arguments, SCL FT of the bundled resnet18 on scikit-learn's digits
  select     choose the block (and learning rate) on the downstream training data
  eval       evaluate a tuned folder on a dataset
  predict    predict the classes of a folder of images into a CSV
  pretrain   pretrain a backbone on a source dataset

`ncfinetune <command> --help` lists the command's keys. Several processes:
  accelerate launch -m ncfinetune finetune ...
"""


def run_recipe(command: str, argv: list[str] | None = None):
    """Run one command's recipe with ``argv`` (default: the rest of ``sys.argv``)."""
    from ncfinetune.recipes.config import run_cli

    module = importlib.import_module(COMMANDS[ALIASES.get(command, command)])
    return run_cli(module.main, argv)


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``ncfinetune`` console script and ``python -m ncfinetune``."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(USAGE, end="")
        return 0
    command = ALIASES.get(argv[0], argv[0])
    if command in ("-V", "--version", "version"):
        from ncfinetune._version import __version__

        print(f"ncfinetune {__version__}")
        return 0
    if command not in COMMANDS:
        print(
            f"ncfinetune: unknown command {argv[0]!r}; the commands are "
            f"{', '.join(COMMANDS)}. Run `ncfinetune --help` for what each does.",
            file=sys.stderr,
        )
        return 2
    run_recipe(command, argv[1:])
    return 0
