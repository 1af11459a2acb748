"""Nothing lost, round 2 (issue 28): non-finite outputs are divergence everywhere."""

from __future__ import annotations

import pytest
import torch
from conftest import images, labels, make_model
from test_recipes import FINETUNE, finetune

from ncfinetune import get_tuned_model
from ncfinetune.errors import NonFiniteOutputs, TrainingDiverged
from ncfinetune.training.loop import predict_batches


def overflowing(tuned):
    """Finite weights whose logits overflow: the head's weights at 1e38."""
    head = tuned.adapter.classifier_modules()[0]
    with torch.no_grad():
        head.weight.fill_(1e38)
    assert all(bool(torch.isfinite(p).all()) for p in tuned.parameters())
    return tuned


def test_predict_batches_refuses_non_finite_logits_and_counts_the_rows():
    tuned = get_tuned_model(make_model("test_resnet"), "linear")
    x, y = images(6), labels(6)
    ok = predict_batches(tuned, [(x, y)])
    assert ok["preds"].shape == (6,) and "finite" not in ok
    overflowing(tuned)
    with pytest.raises(NonFiniteOutputs, match=r"NaN or infinite on 6 of 6 images") as err:
        predict_batches(tuned, [(x[:3], y[:3]), (x[3:], y[3:])])
    assert (err.value.rows, err.value.total) == (6, 6)
    assert isinstance(err.value, FloatingPointError)


def test_a_run_whose_logits_overflow_with_finite_weights_is_divergence(tmp_path, monkeypatch):
    """The loss of every step was finite, the weights are finite, the logits are not: caught
    after the epoch, before anything is evaluated or saved."""
    real = FINETUNE.train_one_epoch

    def then_overflow(run, epoch):
        row = real(run, epoch)
        overflowing(run.net)
        return row

    monkeypatch.setattr(FINETUNE, "train_one_epoch", then_overflow)
    args = ["--epochs", 1, "--max_steps", 1, "--per_class", 5, "--nc1", "false",
            "--output_dir", tmp_path]  # fmt: skip
    with pytest.raises(TrainingDiverged, match=r"the logits became NaN or infinite on \d+ of \d+"):
        finetune(*args)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.yaml"]


@pytest.mark.parametrize("arch", ["test_resnet", "test_vit"])
def test_load_tuned_refuses_a_model_whose_logits_overflow(tmp_path, arch):
    from ncfinetune import load_tuned

    tuned = get_tuned_model(make_model(arch), "linear")
    tuned.save_pretrained(tmp_path / "ok")
    assert load_tuned(tmp_path / "ok", make_model(arch)).method == "linear"  # a sane one loads
    overflowing(tuned).save_pretrained(tmp_path / "bad")
    with pytest.raises(
        NonFiniteOutputs, match=r"bad gives NaN or infinite logits on a probe batch"
    ):
        load_tuned(tmp_path / "bad", make_model(arch))


@pytest.mark.parametrize("alpha", [float("inf"), float("nan"), 1e30, 0, -1, True, "8"])
def test_lora_alpha_must_be_finite_and_sane(alpha):
    from ncfinetune.errors import ConfigError

    with pytest.raises(ConfigError, match=r"lora_alpha=.* must be a finite number in \(0, 10000\]"):
        get_tuned_model(make_model("test_resnet"), "lora-block", block=1, lora_alpha=alpha)


def test_a_run_killed_after_its_last_checkpoint_finishes_its_outputs_on_resume(tmp_path):
    import json
    import shutil

    from ncfinetune.errors import ConfigError

    args = ["--epochs", 2, "--max_steps", 1, "--per_class", 5, "--output_dir", tmp_path]
    done = finetune(*args)
    # as if killed between the last checkpoint and the outputs (or the disk was full)
    shutil.rmtree(tmp_path / "tuned")
    (tmp_path / "metrics.json").unlink()
    with pytest.raises(ConfigError, match="unfinished run .* --resume"):
        finetune(*args)
    again = finetune(*args, "--resume", "true")
    assert (tmp_path / "tuned").is_dir() and (tmp_path / "metrics.json").is_file()
    assert again["test_accuracy"] == done["test_accuracy"]
    assert again["history"] == done["history"]
    saved = json.loads((tmp_path / "metrics.json").read_text())
    assert saved["test_accuracy"] == done["test_accuracy"]
    # now finished: a resume has nothing left to do and says so
    with pytest.raises(ConfigError, match="nothing to train .* finished all 2 epochs"):
        finetune(*args, "--resume", "true")


def test_a_second_run_on_a_busy_folder_is_refused_and_a_stale_lock_taken_over(tmp_path):
    import json
    import os
    import socket
    import subprocess
    import sys

    from ncfinetune.errors import ConfigError

    args = ["--epochs", 1, "--max_steps", 1, "--per_class", 5, "--output_dir", tmp_path]
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        tmp_path.mkdir(exist_ok=True)
        lock = {"pid": holder.pid, "host": socket.gethostname(), "started": "2026-12-06 10:00:00"}
        (tmp_path / ".lock").write_text(json.dumps(lock))
        with pytest.raises(ConfigError, match=rf"in use by another run \(pid {holder.pid} on .*"
                           r"started 2026-12-06 10:00:00\)"):  # fmt: skip
            finetune(*args)
        assert sorted(p.name for p in tmp_path.iterdir()) == [".lock"]  # nothing else written
    finally:
        holder.kill()
        holder.wait()
    # the holder is gone: its lock is stale, taken over with a warning, released at the end
    with pytest.warns(UserWarning, match=f"taking over the lock .*'pid': {holder.pid}"):
        finetune(*args)
    assert not (tmp_path / ".lock").exists() and (tmp_path / "metrics.json").is_file()
    assert os.getpid() != holder.pid


def test_an_edited_config_yaml_is_refused_on_resume_naming_each_key(tmp_path):
    from ncfinetune.errors import ConfigError

    args = ["--epochs", 2, "--max_steps", 1, "--per_class", 5, "--output_dir", tmp_path]
    assert finetune(*args, "--stop_after", 1)["stopped"]
    assert (tmp_path / "checkpoints" / "epoch_1" / "run_config.yaml").is_file()
    path = tmp_path / "config.yaml"
    text = path.read_text()
    assert "lr: 0.05" in text and "per_class: 5" in text
    path.write_text(text.replace("lr: 0.05", "lr: 0.07").replace("per_class: 5", "per_class: 6"))
    with pytest.raises(ConfigError, match=r"config.yaml was edited after the run started") as err:
        finetune("--output_dir", tmp_path, "--resume", "true")
    assert "lr: 0.05 -> 0.07" in str(err.value) and "per_class: 5 -> 6" in str(err.value)
    path.write_text(text)  # restored: the run continues
    assert finetune("--output_dir", tmp_path, "--resume", "true")["lr"] == 0.05


@pytest.mark.parametrize(
    "fault, message",
    [
        ("flip", r"model.safetensors differs from what was written \(SHA-256 mismatch"),
        ("truncate", r"optimizer.bin differs from what was written"),
        ("delete", r"scheduler.json is missing"),
        ("history", r"history.json is unreadable"),
    ],
)
def test_a_corrupt_training_checkpoint_is_refused_before_anything_trains(tmp_path, fault, message):
    from ncfinetune.errors import ConfigError

    args = ["--epochs", 2, "--max_steps", 1, "--per_class", 5, "--output_dir", tmp_path]
    assert finetune(*args, "--stop_after", 1)["stopped"]
    ck = tmp_path / "checkpoints" / "epoch_1"
    if fault == "flip":  # one frozen weight's bytes changed
        data = bytearray((ck / "model.safetensors").read_bytes())
        data[-10] ^= 0xFF
        (ck / "model.safetensors").write_bytes(bytes(data))
    elif fault == "truncate":
        data = (ck / "optimizer.bin").read_bytes()
        (ck / "optimizer.bin").write_bytes(data[: len(data) // 2])
    elif fault == "delete":
        (ck / "scheduler.json").unlink()
    else:
        (ck / "history.json").write_text("{not json")
    with pytest.raises(ConfigError, match=message):
        finetune(*args, "--resume", "true")
    assert not (tmp_path / "tuned").exists() and not (tmp_path / "metrics.json").exists()


def test_pretrain_refuses_an_output_folder_inside_the_installed_package():
    from pathlib import Path

    import ncfinetune
    from ncfinetune.errors import ConfigError
    from ncfinetune.recipes import pretrain
    from ncfinetune.recipes.config import parse_config

    assets = Path(ncfinetune.__file__).parent / "assets"
    with pytest.raises(ConfigError, match=r"output_dir .*assets is inside the installed package"):
        parse_config(pretrain.PretrainConfig, ["--output_dir", str(assets)])


@pytest.mark.parametrize("block", ["²", "٣", "3.0", "-"])
def test_a_block_that_is_not_an_ascii_integer_or_a_name_is_refused(block):
    from ncfinetune.errors import BlockError

    with pytest.raises(BlockError, match=rf"block {block!r} is not a block of test_resnet"):
        get_tuned_model(make_model("test_resnet"), "scl", block=block)


def test_eval_and_predict_refuse_a_device_torch_does_not_know(tmp_path):
    from ncfinetune.errors import ConfigError
    from ncfinetune.recipes import eval as eval_recipe
    from ncfinetune.recipes.config import parse_config

    with pytest.raises(ConfigError, match=r"device 'banana' is not a torch device: pass cpu, cuda"):
        parse_config(eval_recipe.EvaluateConfig, ["--tuned", str(tmp_path), "--device", "banana"])


def test_predict_replaces_an_existing_output_file_as_eval_replaces_its_report(tmp_path):
    from ncfinetune.recipes.checks import output_problems

    out = tmp_path / "preds.csv"
    out.write_text("old")
    assert output_problems("output", str(out), folder=False) == []
    assert "is a folder" in output_problems("output", str(tmp_path), folder=False)[0]
    blocker = tmp_path / "file"
    blocker.write_text("x")
    assert (
        "is a file, not a folder"
        in output_problems("output", str(blocker / "p.csv"), folder=False)[0]
    )
