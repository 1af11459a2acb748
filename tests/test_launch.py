"""Device and precision decided in one place (ncfinetune.training.device), accelerate asked
rather than guessed, and the per-process batch a global batch size means."""

import os
import subprocess
import sys

import pytest
import torch

from ncfinetune.errors import ConfigError
from ncfinetune.recipes.launch import per_process_batch
from ncfinetune.training import device as D


def test_precision_settings_resolve_for_the_device():
    assert D.resolve_precision("auto", "cpu") == ("bf16" if D.native_bf16("cpu") else "no")
    assert D.resolve_precision("auto", "mps") == "no"  # no native-bf16 check there
    for setting in D.PRECISIONS:
        assert D.resolve_precision(setting, "cpu") == setting
    with pytest.raises(
        ConfigError, match=r"mixed_precision 'fp8' is not one of auto, no, fp16, bf16 or null"
    ):
        D.resolve_precision("fp8", "cpu")
    assert D.precision_problem("bf16", D.LOOP_PRECISIONS) is None
    assert "is not one of no, bf16 or null" in D.precision_problem("fp16", D.LOOP_PRECISIONS)
    assert D.loop_precision("fp16") == "no" and D.loop_precision("bf16") == "bf16"


def test_no_setting_is_accelerates_choice_and_an_explicit_key_wins(monkeypatch):
    monkeypatch.delenv("ACCELERATE_MIXED_PRECISION", raising=False)
    assert D.accelerate_precision() == "no"  # nothing set anywhere: fp32
    assert D.resolve_precision(None, "cpu") == "no"
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "bf16")  # as `accelerate launch` exports
    assert D.accelerate_precision() == "bf16"
    assert D.resolve_precision(None, "cpu") == "bf16"
    assert D.choose_precision(None, "cpu") == (None, "accelerate")  # Accelerator decides
    assert D.choose_precision("no", "cpu") == ("no", "recipe")
    auto = "bf16" if D.native_bf16("cpu") else "no"
    assert D.choose_precision("auto", "cpu") == (auto, "recipe")


def test_an_accelerator_without_a_setting_takes_the_launchers_choice():
    """What ``choose_precision(None)`` hands over: accelerate reads the launcher's export."""
    code = (
        "from accelerate import Accelerator; "
        "print(Accelerator(cpu=True, mixed_precision=None).mixed_precision)"
    )
    env = {**os.environ, "ACCELERATE_MIXED_PRECISION": "bf16"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().splitlines()[-1] == "bf16"


def test_no_module_reads_a_process_command_line():
    import ncfinetune

    root = os.path.dirname(ncfinetune.__file__)
    for folder, _, files in os.walk(root):
        for name in files:
            if name.endswith(".py"):
                text = open(os.path.join(folder, name)).read()
                assert "psutil" not in text and ".cmdline()" not in text, name


def test_cpu_threads_split_the_cores_over_local_processes(monkeypatch):
    before = torch.get_num_threads()
    try:
        monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
        cores = len(os.sched_getaffinity(0))
        assert D.cpu_threads("cpu", 1) == cores == torch.get_num_threads()
        assert D.cpu_threads("cpu", 2) == max(1, cores // 2)
        monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
        assert D.cpu_threads("cpu", 1) == max(1, cores // 4)
        assert D.cpu_threads("cpu", 1, 3) == 3  # explicit wins
        torch.set_num_threads(1)
        assert D.cpu_threads("cuda", 1, 3) == 1  # left alone on an accelerator
        with pytest.raises(ConfigError, match="cpu_threads must be >= 1 or null"):
            D.cpu_threads("cpu", 1, 0)
    finally:
        torch.set_num_threads(before)


def test_device_helpers():
    m = torch.nn.Linear(2, 2)
    assert D.model_device(m) == torch.device("cpu")
    assert D.model_device(torch.nn.ReLU()) == torch.device("cpu")
    assert D.default_device("cpu") == torch.device("cpu")
    assert D.use_channels_last(m, True) and not D.use_channels_last(m)


def test_global_batch_size_is_split_over_processes_and_accumulation():
    assert per_process_batch(64, None, 4, 2) == 64  # batch_size is per process
    assert per_process_batch(64, 96, 4, 2) == 12
    with pytest.raises(ConfigError, match=r"global_batch_size 100 is not divisible by 4 .*"
                       r"grad_accum 2 = 8. Pass a multiple of 8 \(e.g. 96 or 104\)"):  # fmt: skip
        per_process_batch(64, 100, 4, 2)
    with pytest.raises(ConfigError, match=r"e.g. 8\)"):
        per_process_batch(64, 5, 4, 2)
