"""`accelerate launch recipes/pretrain.py [--key value ...]`: the same as `ncfinetune pretrain`.

The recipe lives in the package (:mod:`ncfinetune.recipes.pretrain`); this file keeps the documented
script path of a source checkout working. `--help` lists every key.
"""

from ncfinetune.cli import run_recipe

if __name__ == "__main__":
    run_recipe("pretrain")
