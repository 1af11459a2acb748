"""Issue 29: the default training length fits the data (at least MIN_STEPS optimizer steps on
small data, ten epochs otherwise), is printed and recorded, and a run that ends with most of its
loss left says so."""

import json

import pytest
import torch
from test_recipes import finetune

from ncfinetune.errors import ConfigError
from ncfinetune.recipes import finetune as FINETUNE
from ncfinetune.training.length import (
    DEFAULT_EPOCHS,
    MIN_STEPS,
    STILL_HIGH,
    default_steps,
    run_length,
    still_high,
)


def test_small_data_is_raised_to_the_floor_and_large_data_keeps_ten_epochs():
    # 100 images at batch 64: 2 steps an epoch; ten epochs would be 20 steps
    small = run_length(2)
    assert (small.epochs, small.steps, small.rule) == (MIN_STEPS // 2, MIN_STEPS, "min_steps")
    assert "raised to reach the floor" in small.describe() and "--epochs N" in small.describe()
    # the bundled digits default (1,437 images, 23 batches): unchanged, 230 steps
    digits = run_length(23)
    assert (digits.epochs, digits.steps, digits.rule) == (DEFAULT_EPOCHS, 230, "epochs")
    # 60,000 images at batch 64: not one step longer than the old default
    big = run_length(938)
    assert (big.epochs, big.steps) == (DEFAULT_EPOCHS, 9380)
    # a floor that is not a whole number of epochs rounds up to whole epochs
    assert run_length(3, min_steps=100).epochs == 34
    # given epochs win; a smoke test's max_steps cap keeps the ten epochs; floor 0: old default
    assert (run_length(2, 3).epochs, run_length(2, 3).rule) == (3, "given")
    assert (run_length(2, capped=True).epochs, run_length(2, capped=True).rule) == (10, "max_steps")
    assert run_length(2, min_steps=0).epochs == DEFAULT_EPOCHS


def test_default_steps_counts_a_short_last_batch():
    assert default_steps(100) == MIN_STEPS  # 2 batches of <= 64
    assert default_steps(1437) == 230
    assert default_steps(65, 64, min_steps=0) == 20


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda: run_length(0), "steps_per_epoch must be an integer >= 1, got 0"),
        (lambda: run_length(2, 0), "epochs must be an integer >= 1, got 0"),
        (lambda: run_length(2, 2.5), "epochs must be an integer >= 1, got 2.5"),
        (lambda: run_length(True), "steps_per_epoch must be an integer >= 1, got True"),
        (lambda: run_length(2, min_steps=-1), "min_steps must be an integer >= 0, got -1"),
        (lambda: default_steps(0, 64), "num_rows and batch_size >= 1, got 0, 64"),
    ],
)
def test_bad_lengths_are_refused_with_the_value(call, message):
    with pytest.raises(ConfigError, match=message):
        call()


def test_still_high_flags_a_loss_that_barely_moved_and_passes_a_converged_one():
    assert still_high([2.3] * 20) == pytest.approx(1.0)
    converged = [2.3, 2.0] + [0.01] * 18
    assert still_high(converged) is None
    half = [2.0] * 10 + [0.5] * 10  # last tenth 0.5 / first tenth 2.0
    assert still_high(half) == pytest.approx(0.25)
    assert still_high([2.0] * 9) is None  # too short to say
    assert still_high([float("nan")] * 20) is None
    assert still_high([2.0] * 18 + [2.0 * STILL_HIGH] * 2) == pytest.approx(STILL_HIGH)


def test_the_recipe_default_is_epochs_null_with_the_floor():
    cfg = FINETUNE.load_config([])
    assert cfg.optim.epochs is None and cfg.optim.min_steps == MIN_STEPS
    bad = ["--epochs", "0", "--min_steps", "-3"]
    with pytest.raises(ConfigError) as e:
        FINETUNE.load_config(bad)
    assert "epochs must be >= 1 or null, got 0" in str(e.value)
    assert "min_steps must be >= 0, got -3" in str(e.value)


def test_a_small_run_trains_to_the_floor_and_records_its_length(tmp_path, capsys):
    out = tmp_path / "run"
    # 2 per class x 10 classes = 20 rows: one step an epoch; ten epochs would be 10 steps
    m = finetune("--per_class", 2, "--min_steps", 14, "--nc1", "false", "--output_dir", out)
    assert (m["epochs"], m["optimizer_steps"], m["length_rule"]) == (14, 14, "min_steps")
    assert m["min_steps"] == 14 and m["steps_per_epoch"] == 1 and len(m["history"]) == 14
    printed = capsys.readouterr().out
    assert (
        "length: 14 epochs x 1 optimizer steps = 14 steps (default: 10 epochs would be "
        "only 10 steps" in printed
    )
    saved = json.loads((out / "metrics.json").read_text())
    assert saved["epochs"] == 14
    # config.yaml records the epochs that ran, so --resume continues the same length
    assert "epochs: 14" in (out / "config.yaml").read_text()


def test_given_epochs_and_max_steps_work_as_given(tmp_path):
    m = finetune("--per_class", 2, "--epochs", 3, "--nc1", "false", "--output_dir", tmp_path / "a")
    assert (m["epochs"], m["optimizer_steps"], m["length_rule"]) == (3, 3, "given")
    m = finetune("--per_class", 5, "--max_steps", 1, "--nc1", "false", "--output_dir",
                 tmp_path / "b")  # fmt: skip
    assert (m["epochs"], m["optimizer_steps"], m["length_rule"]) == (10, 10, "max_steps")


def test_a_run_that_ends_with_most_of_its_loss_left_warns_with_the_flag(tmp_path, capsys):
    # lr 1e-5 for 10 steps: the loss hardly moves
    m = finetune("--per_class", 2, "--epochs", 10, "--lr", 1e-5, "--min_lr", 1e-6,
                 "--nc1", "false", "--output_dir", tmp_path / "slow")  # fmt: skip
    assert m["loss_left"] is not None and m["loss_left"] > 0.5
    printed = capsys.readouterr().out
    assert "the run may be undertrained. Train longer: --epochs 30" in printed
    m = finetune("--per_class", 2, "--epochs", 12, "--lr", 0.1, "--nc1", "false",
                 "--output_dir", tmp_path / "fast")  # fmt: skip
    assert m["loss_left"] is None and "undertrained" not in capsys.readouterr().out


def test_select_method_compares_the_candidates_at_the_default_length():
    from conftest import images, make_model

    from ncfinetune.selection import select_method

    x, y = images(60), torch.arange(60) % 3
    plan = select_method(make_model("test_resnet", num_classes=3), (x, y),
                         methods=["linear", "scl"], probe_steps=1, lr_grid=[0.1])  # fmt: skip
    assert plan.steps == default_steps(60) == MIN_STEPS  # 60 rows: one step an epoch
    assert all(c.steps == MIN_STEPS for c in plan.candidates)
