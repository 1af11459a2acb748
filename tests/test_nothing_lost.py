"""Nothing lost, round 2 (issue 28): non-finite outputs are divergence everywhere."""

from __future__ import annotations

import errno
import json

import pytest
import torch
from conftest import images, labels, make_model
from safetensors.torch import save_file
from test_recipes import FINETUNE, finetune, launch_two_processes

from ncfinetune import get_tuned_model
from ncfinetune.backbones.hub import create_backbone
from ncfinetune.errors import (
    ConfigError,
    DataError,
    NonFiniteOutputs,
    TrainingDiverged,
    UnsupportedModelError,
)
from ncfinetune.recipes.config import run_cli
from ncfinetune.selection import select_block
from ncfinetune.selection.probe import as_fetch
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


# -- weak messages of the sweep: each names what was received and how to fix it -------------------
@pytest.mark.parametrize(
    "make, message",
    [
        (lambda x: x[:, :1], r"takes 3-channel images, got shape 2x1x32x32 .* x.expand\(-1, 3"),
        (lambda x: x[0], r"4-D batch N x C x H x W, got a 3-D .* x.unsqueeze\(0\)"),
        (lambda x: x.permute(0, 2, 3, 1), r"got shape 2x32x32x3 .* x.permute\(0, 3, 1, 2\)"),
        (lambda x: (x * 255).to(torch.uint8), r"got uint8 pixels \(0-255\), shape 2x3x32x32"),
        (lambda x: x.double(), r"got a float64 tensor, shape 2x3x32x32.* pass x.float\(\)"),
        (lambda x: x.tolist(), r"expected a torch.Tensor batch of images, got list"),
    ],
)
def test_a_tuned_model_names_what_is_wrong_with_a_batch(make, message):
    tuned = get_tuned_model(make_model("test_resnet"), "scl", block=1)
    with pytest.raises(DataError, match=message):
        tuned(make(images(2)))
    assert tuned(images(2)).shape == (2, 5)  # the right batch still works (5 classes)


def test_a_vit_names_the_patch_size_a_batch_must_fit():
    tuned = get_tuned_model(make_model("test_vit"), "scl", block=1)
    with pytest.raises(DataError, match=r"cuts images into 16x16 patches, got 40x40"):
        tuned(torch.rand(2, 3, 40, 40))


@pytest.mark.parametrize(
    "case, message",
    [
        ("labels 3 7 9", r"class indices 0..2 for this model's 3-class head; got 3, 7, 9"),
        ("float labels", r"integer class indices 0..C-1, got float32 values such as 0.5"),
        ("nan images", r"30 of 30 sampled images hold NaN or infinite pixels"),
        ("1 channel", r"takes 3-channel images, got shape 30x1x32x32"),
        ("identical", r"all 30 sampled images are identical, so every candidate would score"),
    ],
)
def test_block_selection_refuses_data_no_choice_can_be_made_on(case, message):
    x, y = images(30), torch.arange(30) % 3
    data = {
        "labels 3 7 9": (x, torch.tensor([3, 7, 9] * 10)),
        "float labels": (x, y.float() + 0.5),
        "nan images": (torch.full_like(x, float("nan")), y),
        "1 channel": (x[:, :1], y),
        "identical": (torch.zeros_like(x), y),
    }[case]
    with pytest.raises(DataError, match=message):
        select_block(make_model("test_resnet", num_classes=3), data, probe_steps=2)


def test_whole_number_float_labels_are_taken_as_classes():
    fetch, labels_ = as_fetch((images(6), torch.tensor([0.0, 1.0, 2.0] * 2)))
    assert labels_.dtype.kind == "i" and fetch([0, 4])[1].tolist() == [0, 1]


def test_a_dangling_or_looping_symlink_output_dir_is_refused_before_loading(tmp_path):
    (tmp_path / "dangling").symlink_to(tmp_path / "gone")
    (tmp_path / "a").symlink_to(tmp_path / "b")
    (tmp_path / "b").symlink_to(tmp_path / "a")
    with pytest.raises(ConfigError, match=r"dangling is a symlink to .*gone, which does not"):
        finetune("--output_dir", tmp_path / "dangling" / "run")
    with pytest.raises(ConfigError, match=r"a is a symlink loop"):
        finetune("--output_dir", tmp_path / "a")


def test_a_config_file_that_is_not_utf8_says_so(tmp_path):
    bad = tmp_path / "latin1.yaml"
    bad.write_bytes("optim:\n  lr: 0.1  # caf\xe9\n".encode("latin-1"))
    with pytest.raises(ConfigError, match=r"is not UTF-8 text \(byte 0xe9 at position 23\)"):
        finetune("--config", bad)


def test_a_checkpoint_of_another_architecture_or_junk_is_refused_naming_why(tmp_path):
    resnet = make_model("test_resnet", num_classes=0)
    save_file(resnet.state_dict(), tmp_path / "resnet.safetensors")
    with pytest.raises(ConfigError, match=r"does not fit 'test_vit': \d+ of its weights are "
                       r"not in the file .* another architecture\? Pass the --model"):  # fmt: skip
        create_backbone("test_vit", 3, checkpoint=str(tmp_path / "resnet.safetensors"))
    (tmp_path / "junk.pth").write_bytes(bytes(range(256)) * 4)
    with pytest.raises(ConfigError, match=r"neither a safetensors file nor a torch checkpoint"):
        create_backbone("test_resnet", 3, checkpoint=str(tmp_path / "junk.pth"))
    torch.save({"model": print}, tmp_path / "code.pth")  # a pickle that would call code
    with pytest.raises(ConfigError, match=r"holds pickled objects besides tensors, which are "
                       r"never loaded"):  # fmt: skip
        create_backbone("test_resnet", 3, checkpoint=str(tmp_path / "code.pth"))
    torch.save(resnet.state_dict(), tmp_path / "ok.pth")  # its own weights still load exactly
    loaded = create_backbone("test_resnet", 3, checkpoint=str(tmp_path / "ok.pth"))
    assert torch.equal(loaded.conv1[0].weight, resnet.conv1[0].weight)


class _NoMatcher(torch.nn.Module):
    def forward_features(self, x):
        return x

    def forward_head(self, x, pre_logits=False):
        return x

    def get_classifier(self):
        return torch.nn.Linear(2, 2)


def test_an_unsupported_model_says_which_requirement_it_misses():
    with pytest.raises(UnsupportedModelError, match=r"into blocks: it has no group_matcher\(\)"):
        get_tuned_model(_NoMatcher(), "scl", block=0)
    with pytest.raises(UnsupportedModelError, match=r"it has no forward_features\(\), forward"):
        get_tuned_model(torch.nn.Linear(3, 3), "scl", block=0)


def test_resume_with_another_launch_is_refused_or_rebuilt_with_the_override(tmp_path):
    """2 -> 1 and 1 -> 2 processes: refused by default; with --resume_override launch the
    cosine is rebuilt for the steps left (ends at min_lr) and the change recorded. 60 images,
    batch 8 per process: 8 steps an epoch on 1 process, 4 on 2."""
    args = ["--epochs", 3, "--per_class", 6, "--batch_size", 8, "--seed", 3, "--nc1", "false",
            "--mixed_precision", "no", "--cpu_threads", 1, "--min_lr", 0.001]  # fmt: skip
    two_one, one_two = tmp_path / "21", tmp_path / "12"
    launch_two_processes(*args, "--output_dir", two_one, "--stop_after", 1)
    m = finetune(*args, "--output_dir", two_one, "--resume", "true",
                 "--resume_override", "launch")  # fmt: skip
    assert [r["step"] for r in m["history"]] == [4, 12, 20] and m["optimizer_steps"] == 20
    assert m["final_lr"] == pytest.approx(0.001) and m["num_processes"] == 1
    change = m["resume_overrides"][0]
    assert change["at_epoch"] == 1 and change["num_processes"] == {"saved": 2, "now": 1}
    assert change["global_batch_size"] == {"saved": 16, "now": 8}
    finetune(*args, "--output_dir", one_two, "--stop_after", 1)
    refused = launch_two_processes(*args, "--output_dir", one_two, "--resume", check=False)
    assert refused.returncode != 0 and "add --resume_override launch" in refused.stderr
    launch_two_processes(*args, "--output_dir", one_two, "--resume", "--resume_override", "launch")
    m = json.loads((one_two / "metrics.json").read_text())
    assert [r["step"] for r in m["history"]] == [8, 12, 16] and m["optimizer_steps"] == 16
    assert m["final_lr"] == pytest.approx(0.001) and m["num_processes"] == 2


def test_a_full_disk_is_one_message_saying_how_to_go_on(capsys):
    class SafetensorError(Exception):  # safetensors' error carries the OS text, not errno
        pass

    for raised in (
        OSError(errno.ENOSPC, "No space left on device", "/out/tuned/tuned.safetensors"),
        SafetensorError(
            'IoError(Os { code: 28, kind: StorageFull, message: "No space left on device" })'
        ),  # fmt: skip
    ):

        def main(argv, raised=raised):
            raise raised

        with pytest.raises(SystemExit) as stop:
            run_cli(main, [])
        printed = capsys.readouterr().err
        assert stop.value.code == 2 and "Traceback" not in printed
        assert "no space left on the device while writing" in printed
        assert "Free space or pass another --output_dir" in printed and "--resume" in printed

    def other(argv):
        raise KeyError("a bug, not the disk")

    with pytest.raises(KeyError):  # anything else keeps its traceback
        run_cli(other, [])


def test_pretraining_takes_the_run_lock_too(tmp_path):
    import socket
    import subprocess
    import sys

    from test_recipes import PRETRAIN, fresh_accelerate

    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        lock = {"pid": holder.pid, "host": socket.gethostname(), "started": "2026-12-06 11:00:00"}
        (tmp_path / ".lock").write_text(json.dumps(lock))
        fresh_accelerate()
        with pytest.raises(ConfigError, match=rf"in use by another run \(pid {holder.pid} "):
            PRETRAIN.main(["--model", "test_resnet", "--dataset", "digits", "--epochs", "1",
                           "--max_steps", "1", "--output_dir", str(tmp_path)])  # fmt: skip
        assert sorted(p.name for p in tmp_path.iterdir()) == [".lock"]  # nothing else written
    finally:
        holder.kill()
        holder.wait()
