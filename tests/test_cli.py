"""The recipes as commands: --help generated from each config dataclass, errors as a message and
exit status 2 (a traceback only with --debug), printed once under a 2-process launch."""

import dataclasses
import importlib
import importlib.util
import subprocess
import sys

import pytest
from test_recipes import ROOT, TINY_RUN, checkout_env

from ncfinetune.recipes.config import leaves, sections

RECIPES = ("finetune", "pretrain", "select_block", "eval", "predict")
CONFIGS = {"finetune": "FinetuneConfig", "pretrain": "PretrainConfig",
           "select_block": "SelectConfig", "eval": "EvaluateConfig", "predict": "PredictConfig"}  # fmt: skip
MODULES = {"finetune": "finetune", "pretrain": "pretrain", "select_block": "select", "eval": "eval",
           "predict": "predict"}  # fmt: skip


def test_recipe_names_do_not_shadow_installed_modules():
    # `python recipes/x.py` puts recipes/ first on sys.path: a recipes/evaluate.py would hide
    # Hugging Face's `evaluate` from every recipe (finetune.py's metric loading broke on it)
    for name in RECIPES:
        assert (ROOT / "recipes" / f"{name}.py").is_file()
        assert importlib.util.find_spec(name) is None, name


@pytest.mark.parametrize("name", RECIPES)
def test_every_recipe_has_help_grouped_by_section_with_every_key_described(name, capsys):
    recipe = importlib.import_module(f"ncfinetune.recipes.{MODULES[name]}")
    cls = getattr(recipe, CONFIGS[name])
    keys = leaves(cls)
    assert not [k for k, (_, f, _) in keys.items() if not f.metadata.get("help")], "undescribed"
    with pytest.raises(SystemExit) as e:
        recipe.main(["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    command = f"ncfinetune {MODULES[name]}"
    assert out.startswith(f"usage: {command} [--config FILE.yaml] [--KEY VALUE ...] [--debug]")
    flat = " ".join(out.split())  # argparse wraps the help text
    for k, (section, f, _) in keys.items():
        assert f"--{k} " in out and " ".join(f.metadata["help"].split())[:40] in flat, k
        if section is not None:  # listed under its section's heading
            assert out.index(f"\n{section}:\n") < out.index(f"--{k} ")
    for section, _ in sections(cls):
        assert section is None or f"\n{section}:\n" in out


def test_finetune_keys_are_in_sections_and_unique():
    from ncfinetune.recipes.finetune import FinetuneConfig

    assert [s for s, _ in sections(FinetuneConfig)] == [
        "backbone",
        "data",
        "tuning",
        "optim",
        "run",
    ]
    names = [f.name for _, c in sections(FinetuneConfig) for f in dataclasses.fields(c)]
    assert len(names) == len(set(names)) == len(leaves(FinetuneConfig)) == 55


def test_python_m_ncfinetune_finetune_help():
    proc = script("-m", "ncfinetune", "finetune", "--help")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.startswith("usage: ncfinetune finetune [--config FILE.yaml]")
    assert "\ntuning:\n" in proc.stdout and "--lr " in proc.stdout


def start(*args, env=None) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, *map(str, args)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env or checkout_env(),
                            cwd=ROOT)  # fmt: skip


def finish(proc: subprocess.Popen) -> subprocess.CompletedProcess:
    out, err = proc.communicate(timeout=300)
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def script(*args, env=None):
    return finish(start(*args, env=env))


def test_errors_exit_2_with_the_message_and_a_traceback_only_with_debug(tmp_path):
    finetune = ROOT / "recipes" / "finetune.py"
    # the three interpreters start together: each spends seconds importing, on its own core
    plain = start(finetune, "--epochs", 0, "--method", "nope", "--output_dir", tmp_path)
    debug = start(finetune, "--epochs", 0, "--debug", "--output_dir", tmp_path)
    help_ = start(ROOT / "recipes" / "eval.py", "--tuned", tmp_path / "none", "--help")
    proc = finish(plain)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert proc.stderr.startswith("error: 2 problem(s) in the config")
    assert "epochs must be >= 1" in proc.stderr and "Traceback" not in proc.stderr
    proc = finish(debug)
    assert proc.returncode == 1 and "Traceback" in proc.stderr and "ConfigError" in proc.stderr
    proc = finish(help_)
    assert proc.returncode == 0 and "--tuned" in proc.stdout


def test_two_processes_print_a_config_error_once(tmp_path):
    env = checkout_env(ACCELERATE_USE_CPU="true", OMP_NUM_THREADS="1")
    cmd = ["-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
           ROOT / "recipes" / "finetune.py", *TINY_RUN, "--epochs", "0",
           "--output_dir", tmp_path]  # fmt: skip
    proc = script(*cmd, env=env)
    assert proc.returncode != 0
    assert proc.stderr.count("error: 1 problem(s) in the config") == 1, proc.stderr[-3000:]
    assert proc.stderr.count("epochs must be >= 1 or null, got 0") == 1
