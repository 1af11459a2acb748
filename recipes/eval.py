"""`accelerate launch recipes/eval.py [--key value ...]`: the same as `ncfinetune eval`.

The recipe lives in the package (:mod:`ncfinetune.recipes.eval`); this file keeps the documented
script path of a source checkout working. `--help` lists every key.
"""

from ncfinetune.cli import run_recipe

if __name__ == "__main__":
    run_recipe("eval")
