"""The benchmark harness: run records, resume-by-record, the learning-rate choice, summaries."""

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import common  # noqa: E402
import summarize  # noqa: E402


@pytest.fixture
def harness(tmp_path, monkeypatch):
    """The harness writing into tmp_path, with a tiny random-init backbone at 32 px."""
    monkeypatch.setattr(common, "RESULTS", tmp_path)
    monkeypatch.setattr(common, "RUNS", tmp_path / "runs")
    monkeypatch.setattr(common, "CACHE", tmp_path / "cache")
    monkeypatch.setattr(summarize, "RESULTS", tmp_path)
    monkeypatch.setattr(summarize, "RUNS", tmp_path / "runs")
    tiny = {"model": "test_resnet", "image_size": 32, "middle": 1, "blocks": [0, 1]}
    monkeypatch.setitem(common.BACKBONES, "tiny", tiny)
    monkeypatch.setitem(summarize.BACKBONES, "tiny", tiny)
    common._DATA.clear()
    yield tmp_path
    common._DATA.clear()


def test_run_keys_name_every_setting_and_normalise_the_block():
    a = common.run_for("resnet18", "digits", "scl", 10, 0, 0.1)
    assert a.block == 4 and a.key == "scl-b4-n10-s0-lr0.1-t150-bs32"
    assert common.run_for("resnet18", "digits", "full", 10, 0, 0.1, block=6).block is None
    keys = {
        common.run_for("vit_tiny", "digits", m, n, s, lr).key
        for m in common.METHODS
        for n in (5, 10)
        for s in (0, 1)
        for lr in common.LR_GRID
    }
    assert len(keys) == 4 * 2 * 2 * len(common.LR_GRID)
    quick = common.run_for("resnet18", "digits", "scl", 10, 0, 0.1, steps=20)
    assert "quick" in quick.path.parts and "runs" not in quick.path.parts


def test_a_run_writes_its_record_and_is_not_redone(harness):
    run = common.run_for("tiny", "digits", "scl", 5, 0, 0.05, steps=3, batch=16, validate=True)
    rec = common.ensure(run)
    assert run.path.is_file() and not list(harness.rglob("*.tmp"))
    assert rec["num_train"] == 50 and rec["num_test"] == 360  # 5 per class x 10 classes
    m = rec["metrics"]
    assert 0 <= m["test_accuracy"] <= 1 and 0 <= m["val_accuracy"] <= 1 and m["nc1_train"] > 0
    assert rec["trainable_percent"] == pytest.approx(100 * 37_354 / 373_658)
    run.path.write_text(json.dumps({**rec, "metrics": {**m, "test_accuracy": -1.0}}))
    assert common.ensure(run)["metrics"]["test_accuracy"] == -1.0  # read back, not re-run
    assert common.ensure(run, force=True)["metrics"]["test_accuracy"] == m["test_accuracy"]


def test_a_diverged_run_is_recorded_not_raised_and_ablation_keys_differ(harness):
    run = common.run_for("tiny", "digits", "layer", 5, 0, 1e30, steps=4, batch=16)
    rec = common.ensure(run)  # lr 1e30: the loss becomes non-finite
    assert "diverged" in rec["metrics"]["diverged"] and rec["metrics"]["test_accuracy"] is None
    assert json.loads(run.path.read_text())["metrics"]["diverged"] == rec["metrics"]["diverged"]
    base = common.run_for("vit_tiny", "digits", "scl", 10, 0, 0.03)
    raw = common.run_for("vit_tiny", "digits", "scl", 10, 0, 0.03, skip_norm=False)
    frozen = common.run_for("resnet18", "digits", "scl", 10, 0, 0.03, bn="frozen")
    assert base.key == "scl-b6-n10-s0-lr0.03-t150-bs32"  # defaults keep the old record names
    assert raw.key.endswith("-skipnorm0") and frozen.key.endswith("-bnfrozen")


def _fake(run, **metrics):
    run.path.parent.mkdir(parents=True, exist_ok=True)
    base = {"test_accuracy": 0.5, "nc1_train": 1.0, "nc1_test": 1.0}
    rec = {
        "run": {**run.__dict__},
        "key": run.key,
        "metrics": {**base, **metrics},
        "trainable_percent": 8.0,
        "train_seconds": 1.0,
        "eval_seconds": 1.0,
    }
    run.path.write_text(json.dumps(rec))


def test_chosen_lr_is_the_best_validation_accuracy_and_needs_the_whole_grid(harness):
    runs = common.lr_runs("tiny", "digits", "layer")
    assert [r.lr for r in runs] == common.LR_GRID and all(r.validate for r in runs)
    for r, acc in zip(runs[:-1], (0.6, 0.8, 0.8), strict=False):
        _fake(r, val_accuracy=acc)
    assert common.chosen_lr("tiny", "digits", "layer") is None  # grid incomplete
    _fake(runs[-1], val_accuracy=0.7)
    assert common.chosen_lr("tiny", "digits", "layer") == 0.03  # tie 0.03/0.01: the larger


def test_spearman_sees_lower_nc1_with_higher_accuracy(harness):
    for s, (acc, n) in enumerate([(0.9, 0.1), (0.8, 0.2), (0.7, 0.4), (0.6, 0.8)]):
        _fake(common.run_for("tiny", "digits", "scl", 10, s, 0.1), test_accuracy=acc, nc1_train=n)
    recs = summarize.load_records()
    assert len(recs) == 4
    assert summarize.spearman(recs)["rho"] == pytest.approx(-1.0)
