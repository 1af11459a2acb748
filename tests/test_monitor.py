"""The pretrain recipe's transfer monitor: target specs, the scores, metrics.json and TensorBoard,
the best-transferring backbone kept beside the last, and a monitor that changes no weight."""

from __future__ import annotations

import json

import numpy as np
import pytest
import safetensors.torch
import torch

from ncfinetune.backbones.hub import create_backbone
from ncfinetune.errors import ConfigError
from ncfinetune.recipes import pretrain as PRETRAIN
from ncfinetune.recipes.monitor import best_epochs, parse_target, target_problems
from ncfinetune.selection import transfer_scores

TINY = ["--model", "test_resnet", "--dataset", "digits", "--classes", "0,1,2,3,4", "--epochs",
        "3", "--max_steps", "2", "--batch_size", "32", "--nc1_samples", "100"]  # fmt: skip
MONITOR = ["--transfer_targets", "digits:5-9,digits:0-2+4", "--transfer_fit_per_class", "10",
           "--transfer_held_per_class", "20"]  # fmt: skip
SCORES = {"linear_probe_accuracy", "recall_at_1", "nmi", "nc1"}


def pretrain(*args):
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)
    return PRETRAIN.main([*TINY, *map(str, args)])


# ------------------------------------------------------------------ specs and config


@pytest.mark.parametrize(
    ("text", "spec", "classes"),
    [
        ("digits", "digits", None),
        ("fashion_mnist:5-9", "fashion_mnist", [5, 6, 7, 8, 9]),
        ("digits:0-2+7", "digits", [0, 1, 2, 7]),
        (" digits:3+1 ", "digits", [1, 3]),
        ("user/hub-name:v2", "user/hub-name:v2", None),  # not a class selection: kept whole
        ("/data/my folder", "/data/my folder", None),
    ],
)
def test_target_specs(text, spec, classes):
    assert parse_target(text) == (spec, classes)


def test_target_problems_name_every_bad_key():
    p = target_problems(["digits:9-5", "digits:3", "digits", "digits"], 0, 0, 1)
    text = "\n".join(p)
    assert "transfer_every must be >= 1, got 0" in text
    assert "transfer_fit_per_class must be >= 1, got 0" in text
    assert "transfer_held_per_class must be >= 2 (R@1 needs 2 per class), got 1" in text
    assert "'digits:9-5': class range 9-5 runs backwards; write it low-high (5-9)" in text
    assert "'digits:3' keeps 1 class; name at least 2" in text
    assert "'digits' is listed twice" in text


def test_bad_monitor_keys_stop_before_any_data(tmp_path):
    with pytest.raises(ConfigError, match="class range 9-5 runs backwards"):
        pretrain("--transfer_targets", "digits:9-5", "--output_dir", tmp_path / "a")
    with pytest.raises(ConfigError, match="save_every must be >= 1, got 0"):
        pretrain("--save_every", "0", "--output_dir", tmp_path / "b")
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_a_target_too_small_for_the_subsets_says_which_keys_to_lower(tmp_path):
    with pytest.raises(ConfigError, match=r"transfer target 'digits:5-9': its smallest class has "
                       r"1\d\d training rows.*transfer_fit_per_class \(200\) \+ at least 2 held-out"
                       r".*Lower transfer_fit_per_class to at most 1\d\d"):  # fmt: skip
        pretrain("--transfer_targets", "digits:5-9", "--transfer_fit_per_class", "200",
                 "--output_dir", tmp_path / "pt")  # fmt: skip


# ------------------------------------------------------------------ the scores


def blobs(n_per_class=30, k=3, d=8, sep=6.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n_per_class * k) % k
    return sep * torch.randn(k, d, generator=g)[y] + torch.randn(len(y), d, generator=g), y


def test_transfer_scores_on_separable_and_on_unusable_features():
    (xf, yf), (xh, yh) = blobs(seed=0), blobs(seed=0, n_per_class=20)
    xh = xh + 0.01  # held-out rows: same class means, other draws
    s = transfer_scores((xf, yf), (xh, yh), seed=0)
    assert set(s) == SCORES
    assert s["linear_probe_accuracy"] == 1.0 and s["recall_at_1"] == 1.0
    assert s["nmi"] == pytest.approx(1.0) and 0 < s["nc1"] < 0.1
    const = torch.ones_like(xh)
    s = transfer_scores((xf, yf), (const, yh))
    assert s["recall_at_1"] is None and s["nmi"] is None and s["nc1"] is None
    assert s["linear_probe_accuracy"] == pytest.approx(1 / 3)  # one prediction for every row
    nan = xh.clone()
    nan[0, 0] = float("nan")
    assert transfer_scores((xf, yf), (nan, yh)) == dict.fromkeys(SCORES)


def test_best_epochs_prefer_the_earlier_on_ties_and_skip_unmonitored_epochs():
    h = [
        {"epoch": 1, "test_accuracy": 0.5},
        {"epoch": 2, "test_accuracy": 0.7, "transfer_mean_probe_accuracy": 0.8},
        {"epoch": 3, "test_accuracy": 0.7, "transfer_mean_probe_accuracy": 0.8},
        {"epoch": 4, "test_accuracy": 0.6, "transfer_mean_probe_accuracy": None},
    ]
    assert best_epochs(h) == {
        "best_source_epoch": 2, "best_source_test_accuracy": 0.7,
        "best_transfer_epoch": 2, "best_transfer_mean_probe_accuracy": 0.8,
    }  # fmt: skip
    assert "best_transfer_epoch" not in best_epochs(h[:1])


# ------------------------------------------------------------------ the recipe


def test_monitor_logs_every_epoch_and_keeps_the_best_transferring_backbone(tmp_path):
    out = tmp_path / "pt"
    pretrain(*MONITOR, "--save_every", "1", "--output_dir", out)
    metrics = json.loads((out / "metrics.json").read_text())
    h = metrics["history"]
    assert [r["epoch"] for r in h] == [1, 2, 3]
    for r in h:
        assert set(r["transfer"]) == {"digits:5-9", "digits:0-2+4"}
        for scores in r["transfer"].values():
            assert set(scores) == SCORES and all(v is not None for v in scores.values())
        mean = np.mean([s["linear_probe_accuracy"] for s in r["transfer"].values()])
        assert r["transfer_mean_probe_accuracy"] == pytest.approx(mean)
    best = max(h, key=lambda r: (r["transfer_mean_probe_accuracy"], -r["epoch"]))["epoch"]
    assert metrics["best_transfer_epoch"] == best
    assert 0 < metrics["monitor_share_of_epoch"]
    # best_transfer/ holds exactly the weights of that epoch (save_every kept them all)
    kept = safetensors.torch.load_file(out / "best_transfer" / "backbone.safetensors")
    snap = safetensors.torch.load_file(out / "epochs" / f"epoch_{best}" / "backbone.safetensors")
    assert kept.keys() == snap.keys() and all(torch.equal(kept[k], snap[k]) for k in kept)
    last = safetensors.torch.load_file(out / "backbone.safetensors")
    final = safetensors.torch.load_file(out / "epochs" / "epoch_3" / "backbone.safetensors")
    assert all(torch.equal(last[k], final[k]) for k in last)
    card = json.loads((out / "best_transfer" / "backbone.json").read_text())
    assert card["epoch"] == best and card["best_transfer_epoch"] == best
    assert card["source_test_accuracy"] == h[best - 1]["test_accuracy"]
    assert json.loads((out / "backbone.json").read_text())["epoch"] == 3
    assert f"best mean linear-probe accuracy at epoch {best}" in (out / "backbone.md").read_text()
    assert create_backbone(str(out / "best_transfer"), 4).get_classifier().out_features == 4
    # TensorBoard has each target's scores
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    (events,) = (out / "pretrain").glob("events.out.tfevents.*")
    tags = EventAccumulator(str(events)).Reload().Tags()["scalars"]
    assert {f"transfer/digits:5-9/{s}" for s in SCORES} <= set(tags)
    assert {"transfer/mean_linear_probe_accuracy", "source/test_accuracy"} <= set(tags)


def test_the_monitor_changes_no_weight_and_every_n_epochs_plus_the_last(tmp_path):
    pretrain("--tracker", "none", "--output_dir", tmp_path / "plain")
    pretrain(*MONITOR, "--transfer_every", "2", "--tracker", "none", "--output_dir",
             tmp_path / "watched")  # fmt: skip
    plain = safetensors.torch.load_file(tmp_path / "plain" / "backbone.safetensors")
    watched = safetensors.torch.load_file(tmp_path / "watched" / "backbone.safetensors")
    assert all(torch.equal(plain[k], watched[k]) for k in plain)
    h = json.loads((tmp_path / "watched" / "metrics.json").read_text())["history"]
    assert ["transfer" in r for r in h] == [False, True, True]  # epoch 2, and the last (3)
    plain_h = json.loads((tmp_path / "plain" / "metrics.json").read_text())["history"]
    assert [r["train_loss"] for r in plain_h] == [r["train_loss"] for r in h]
    assert not (tmp_path / "plain" / "best_transfer").exists()
    assert not (tmp_path / "plain" / "pretrain").exists()  # --tracker none: no event files
