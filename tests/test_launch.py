"""What the launcher decided: an explicit mixed precision, and the per-process batch."""

import os
import subprocess
import sys
import textwrap

import pytest

from ncfinetune.errors import ConfigError
from ncfinetune.recipes.launch import (
    choose_mixed_precision,
    given_mixed_precision,
    launch_arguments,
    launcher_mixed_precision,
    per_process_batch,
)


@pytest.mark.parametrize(
    "cmdline,args",
    [
        (["/v/bin/python", "/v/bin/accelerate", "launch", "--cpu", "f.py", "--lr", "1"],
         ["--cpu", "f.py", "--lr", "1"]),
        (["python", "-m", "accelerate.commands.launch", "--multi_gpu", "f.py"],
         ["--multi_gpu", "f.py"]),
        (["python", "-m", "accelerate.commands.accelerate_cli", "launch", "f.py"], ["f.py"]),
        (["/v/bin/accelerate-launch", "f.py"], ["f.py"]),
        (["python", "f.py", "--mixed_precision", "no"], None),
        (["/v/bin/accelerate", "env"], None),
    ],
)  # fmt: skip
def test_launch_arguments_recognise_every_way_to_call_the_launcher(cmdline, args):
    assert launch_arguments(cmdline) == args


def test_given_mixed_precision_reads_the_option_or_the_config_file(tmp_path, monkeypatch):
    import accelerate.commands.config as accelerate_config

    # no default accelerate config file (its path is fixed when accelerate is imported)
    monkeypatch.setattr(accelerate_config, "default_config_file", str(tmp_path / "none.yaml"))
    assert given_mixed_precision(["--mixed_precision", "no", "f.py"]) == "no"
    assert given_mixed_precision(["--mixed_precision=bf16", "f.py", "--x"]) == "bf16"
    assert given_mixed_precision(["--cpu", "f.py", "--mixed_precision", "bf16"]) is None
    assert given_mixed_precision(["--num_processes", "2", "f.py"]) is None
    config = tmp_path / "acc.yaml"
    config.write_text(
        "compute_environment: LOCAL_MACHINE\ndistributed_type: 'NO'\nmixed_precision: bf16\n"
    )
    assert given_mixed_precision(["--config_file", str(config), "f.py"]) == "bf16"


def test_launcher_mixed_precision_without_a_launcher():
    assert launcher_mixed_precision({}) is None  # python recipes/finetune.py
    # exported by something that is not accelerate launch (this test's parents): given
    assert launcher_mixed_precision({"ACCELERATE_MIXED_PRECISION": "no"}) == "no"


def run_under_fake_launcher(launcher_args: list[str]) -> str:
    """A child of a process whose command line is `python -m accelerate.commands.launch ...`
    (without accelerate's start-up cost), with the variable accelerate launch exports."""
    child = "from ncfinetune.recipes.launch import launcher_mixed_precision as f; print(f())"
    parent = textwrap.dedent(f"""
        import subprocess, sys
        subprocess.run([sys.executable, "-c", {child!r}], check=True)
    """)
    env = {**os.environ, "ACCELERATE_MIXED_PRECISION": "no", "HF_HOME": "/nonexistent"}
    cmd = [sys.executable, "-c", parent, "-m", "accelerate.commands.launch", *launcher_args]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc.stdout.strip()


def test_the_launchers_own_command_line_tells_given_from_default():
    assert run_under_fake_launcher(["recipes/finetune.py"]) == "None"  # its default 'no'
    assert run_under_fake_launcher(["--mixed_precision", "no", "recipes/finetune.py"]) == "no"


def test_choose_mixed_precision_explicit_wins_then_launcher_then_auto():
    assert choose_mixed_precision("no", "cpu", "bf16")[:2] == ("no", "recipe")
    assert "instead of the launcher's 'bf16'" in choose_mixed_precision("no", "cpu", "bf16")[2]
    assert choose_mixed_precision("auto", "cpu", "no") == ("no", "launcher", None)
    precision, source, note = choose_mixed_precision("auto", "cpu", None)
    assert source == "auto" and precision in ("bf16", "no") and note is None


def test_global_batch_size_is_split_over_processes_and_accumulation():
    assert per_process_batch(64, None, 4, 2) == 64  # batch_size is per process
    assert per_process_batch(64, 96, 4, 2) == 12
    with pytest.raises(ConfigError, match=r"global_batch_size 100 is not divisible by 4 .*"
                       r"grad_accum 2 = 8. Pass a multiple of 8 \(e.g. 96 or 104\)"):  # fmt: skip
        per_process_batch(64, 100, 4, 2)
    with pytest.raises(ConfigError, match=r"e.g. 8\)"):
        per_process_batch(64, 5, 4, 2)
