"""The recipes' loop: speed settings (device type, channels_last, conv-net test), the
run's step count and schedule, NC1 across processes, divergence, strict JSON, checkpoints."""

import json

import pytest
import torch
from conftest import make_model
from torch.utils.data import DataLoader, TensorDataset

from ncfinetune.errors import ConfigError, TrainingDiverged
from ncfinetune.files import finite_json, write_json
from ncfinetune.recipes.engine import (
    accumulate_nc1,
    build_schedule,
    collect_nc1,
    latest_training_state,
    load_training_state,
    merge_nc1,
    plan_steps,
    save_training_state,
    shard_loader,
    train_epoch,
)
from ncfinetune.training import as_memory_format
from ncfinetune.training.device import is_conv_net, launch_device_type


def test_launch_device_type_obeys_accelerate_use_cpu(monkeypatch):
    monkeypatch.setenv("ACCELERATE_USE_CPU", "true")
    assert launch_device_type() == "cpu"
    monkeypatch.delenv("ACCELERATE_USE_CPU")
    assert launch_device_type() == ("cuda" if torch.cuda.is_available() else "cpu")


def test_conv_nets_are_told_from_vits():
    assert is_conv_net(make_model("test_resnet"))
    assert not is_conv_net(make_model("test_vit"))  # its patch embedding is its one conv


def test_channels_last_applies_to_4d_batches_only():
    x = torch.randn(2, 3, 4, 5)
    y = as_memory_format(x, True)
    assert y.is_contiguous(memory_format=torch.channels_last) and torch.equal(x, y)
    assert as_memory_format(x, False) is x
    tokens = torch.randn(2, 7, 8)
    assert as_memory_format(tokens, True) is tokens


# -- the run's step count, NC1 across processes, strict JSON, checkpoints ---------------------------
def fresh_accelerator(**kw):
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)
    return Accelerator(cpu=True, mixed_precision="no", **kw)


def test_plan_steps_counts_optimizer_steps_of_the_loader_it_is_given():
    loader = list(range(7))  # 7 batches per process
    assert plan_steps(loader, 3).total_steps == 21
    plan = plan_steps(loader, 3, grad_accum=2)  # (2)(2)(2)(1) per epoch
    assert (plan.steps_per_epoch, plan.total_steps) == (4, 12)
    assert plan_steps(loader, 2, grad_accum=2, max_steps=5).total_steps == 6  # (2)(2)(1)
    assert plan_steps(loader, 1, max_steps=100).batches_per_epoch == 7
    with pytest.raises(ValueError, match="grad_accum >= 1"):
        plan_steps([], 1)


def test_build_schedule_ends_at_min_lr_and_is_checkpointed_as_json(tmp_path):
    acc = fresh_accelerator()
    model = torch.nn.Linear(2, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    model, opt = acc.prepare(model, opt)
    sched, plan = build_schedule(acc, opt, list(range(5)), epochs=2, min_lr=1e-4, grad_accum=2)
    # not accelerate's custom object: that one is pickled, and unpickled with weights_only=False
    assert plan.total_steps == 6 and sched not in acc._custom_objects
    for _ in range(3):
        opt.step()
        sched.step()
    path = save_training_state(acc, tmp_path, 1, [], scheduler=sched)
    assert not list(path.glob("custom_checkpoint_*"))
    saved = json.loads((path / "scheduler.json").read_text())
    assert saved["last_epoch"] == 3
    again, _ = build_schedule(acc, opt, list(range(5)), epochs=2, min_lr=1e-4, grad_accum=2)
    load_training_state(acc, path, again)
    assert again.last_epoch == 3 and again.get_last_lr() == sched.get_last_lr()
    for _ in range(plan.total_steps - 3):
        opt.step()
        again.step()
    assert opt.param_groups[0]["lr"] == pytest.approx(1e-4)
    (path / "scheduler.json").unlink()  # an incomplete checkpoint
    with pytest.raises(ConfigError, match="scheduler.json is missing.*corrupt"):
        load_training_state(acc, path, again)  # the manifest names the missing file
    (path / "manifest.json").unlink()  # one without a manifest: the schedule's own check
    with pytest.raises(ConfigError, match="no scheduler.json.*incomplete.*new run"):
        load_training_state(acc, path, again)


def test_collect_nc1_shards_rows_once_and_merges_to_the_one_shot_value():
    from ncfinetune.metrics import nc1
    from ncfinetune.training import predict_batches
    from ncfinetune.tuning import get_tuned_model

    tuned = get_tuned_model(make_model("test_resnet", num_classes=3), "scl", block=1)
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(23, 3, 32, 32, generator=g), torch.arange(23) % 3
    loader = DataLoader(TensorDataset(x, y), batch_size=4, shuffle=False)
    shards = [shard_loader(loader, i, 2) for i in range(2)]
    rows = [r for s in shards for r in s.batch_sampler.sampler]
    assert sorted(rows) == list(range(23))  # each row once, none padded
    parts = []
    for shard in shards:
        stats = accumulate_nc1(tuned, shard)
        parts.append({k: getattr(stats, k) for k in ("counts", "means", "sq_dev", "scatter")})
    ref = predict_batches(tuned, loader, features=True)
    assert merge_nc1(parts) == pytest.approx(nc1(ref["features"], ref["labels"]), rel=1e-6)
    acc = fresh_accelerator()
    assert collect_nc1(acc, tuned, loader) == pytest.approx(merge_nc1(parts), rel=1e-9)
    # classes without a sample are left out; fewer than 2 with one: None
    two = DataLoader(TensorDataset(x[y < 2], y[y < 2]), batch_size=4)
    ref2 = predict_batches(tuned, two, features=True)
    assert collect_nc1(acc, tuned, two) == pytest.approx(nc1(ref2["features"], ref2["labels"]))
    assert collect_nc1(acc, tuned, DataLoader(TensorDataset(x[y == 0], y[y == 0]))) is None


def test_train_epoch_stops_every_process_on_a_non_finite_loss_before_anything_is_saved():
    acc = fresh_accelerator()
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(4, 2))
    opt = torch.optim.SGD(model.parameters(), lr=0.3)
    x, y = torch.randn(8, 1, 2, 2), torch.arange(8) % 2
    x[5] = float("inf")
    loader = DataLoader(TensorDataset(x, y), batch_size=2)
    model, opt, loader = acc.prepare(model, opt, loader)
    sched, _ = build_schedule(acc, opt, loader, epochs=2, min_lr=0.0)
    with pytest.raises(TrainingDiverged, match=r"at optimizer step 13 \(epoch 2/2\)") as err:
        train_epoch(acc, model, loader, opt, sched, desc="epoch 2/2", steps_before=10)
    assert err.value.step == 13 and "lr 0.3" not in str(err.value)  # the lr of that step


def test_json_is_strict_non_finite_numbers_become_null(tmp_path):
    data = {"a": float("nan"), "b": [1.0, float("inf"), {"c": -float("inf")}], "d": "x", "e": 2}
    assert finite_json(data) == {"a": None, "b": [1.0, None, {"c": None}], "d": "x", "e": 2}
    write_json(tmp_path / "m.json", data)

    def refuse(name):
        raise ValueError(f"bare {name} in strict JSON")

    text = (tmp_path / "m.json").read_text()
    assert json.loads(text, parse_constant=refuse)["b"] == [1.0, None, {"c": None}]
    assert not list(tmp_path.glob("*.tmp"))


def test_checkpoints_keep_the_newest_n_and_are_written_atomically(tmp_path):
    acc = fresh_accelerator()
    model = acc.prepare(torch.nn.Linear(2, 2))
    (tmp_path / ".epoch_9.tmp").mkdir()  # left by a write that was interrupted
    for epoch in (2, 4, 6):
        save_training_state(acc, tmp_path, epoch, [{"epoch": epoch}], keep_last=2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["epoch_4", "epoch_6"]
    path, epoch, history = latest_training_state(tmp_path)
    assert (path.name, epoch, history) == ("epoch_6", 6, [{"epoch": 6}])
    assert model is not None
