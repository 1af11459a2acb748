"""Block (and lr) selection: each rule picks what its report says through the one `choose`, the
model is left untouched, the report prints/saves/plots, the minimum samples per rule are
enforced with clear errors, and bad input fails clearly."""

import json

import numpy as np
import pytest
import torch
from conftest import IMAGE_SIZE, NUM_CLASSES, make_model

import ncfinetune
from ncfinetune.errors import ConfigError
from ncfinetune.selection import (
    LR_GRID,
    CandidateRow,
    choose,
    choose_lr,
    default_candidates,
    linear_probe_accuracy,
    min_per_class,
    mlp_gap,
    select_block,
    select_lr,
)

FP32 = {"precision": "no"}


def class_data(per_class: int = 8, seed: int = 0):
    """Images whose class shifts the mean of a few channels: NC1 is finite and varies by block."""
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(NUM_CLASSES).repeat_interleave(per_class)
    x = torch.randn(y.numel(), 3, IMAGE_SIZE, IMAGE_SIZE, generator=g)
    x[:, 0] += y[:, None, None].float() * 0.5
    return x, y


@pytest.mark.parametrize("arch", ["test_resnet", "test_vit"])
def test_curve_rule_picks_the_lowest_block_nc1_and_leaves_the_model_alone(arch):
    model = make_model(arch)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    sel = select_block(
        model, class_data(), rule="curve", lr=0.1, max_trainable_percent=None, **FP32
    )
    assert sel.chosen == min(sel.rows, key=lambda r: r.nc1_block).index
    assert [c["index"] for c in sel.curve] == list(range(len(ncfinetune.list_blocks(model))))
    # one inference pass, no probes (the lr was given)
    assert sel.images_processed == NUM_CLASSES * 8 and sel.seconds > 0 and sel.lr is None
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert f"chosen: block {sel.chosen} ({sel.chosen_name})" in str(sel)
    # R@1 and the MLP gap only when asked for (or for the rules that need them)
    assert all(r.recall_at_1 is None and r.mlp_gap is None for r in sel.rows)
    assert "R@1" not in str(sel) and "MLP gap" not in str(sel)


def test_linear_rule_is_the_cross_validated_ridge_probe_of_each_block():
    model = make_model("test_resnet")
    x, y = class_data(per_class=10)
    sel = select_block(
        model, (x, y), rule="linear", lr=0.1, method="layer", max_trainable_percent=None, **FP32
    )
    feats = ncfinetune.tuning.features.collect_block_features(model, [(x, y)])
    for r in sel.rows:  # the report's number is the probe on that block's pooled output
        assert r.linear_accuracy == pytest.approx(
            linear_probe_accuracy(feats.features[r.name].numpy(), y.numpy(), seed=0)
        )
    best = max(r.linear_accuracy for r in sel.rows)
    assert sel.chosen == max(r.index for r in sel.rows if r.linear_accuracy == best)


def test_recall_and_mlp_columns_are_the_block_outputs_diagnostics_and_rules():
    model = make_model("test_resnet")
    x, y = class_data(per_class=10)
    sel = select_block(model, (x, y), rule="recall", lr=0.1, max_trainable_percent=None, **FP32)
    feats = ncfinetune.tuning.features.collect_block_features(model, [(x, y)])
    for r in sel.rows:
        h = feats.features[r.name]
        assert r.recall_at_1 == ncfinetune.metrics.recall_at_1(h, y)
        assert (r.mlp_accuracy, r.mlp_gap) == mlp_gap(h.numpy(), y.numpy(), seed=0)
        assert 0 <= r.mlp_accuracy <= 1 and -1 <= r.mlp_gap <= 1
    best = max(r.recall_at_1 for r in sel.rows)
    assert sel.chosen == max(r.index for r in sel.rows if r.recall_at_1 == best)
    table = str(sel)
    assert "R@1" in table and "MLP gap" in table
    chosen = sel.row(sel.chosen)
    assert f"{100 * chosen.recall_at_1:.1f}%" in table and f"{100 * chosen.mlp_gap:+.1f}" in table
    mlp = select_block(model, (x, y), rule="mlp", lr=0.1, max_trainable_percent=None, **FP32)
    top = max(r.mlp_accuracy for r in mlp.rows)
    assert mlp.chosen == max(r.index for r in mlp.rows if r.mlp_accuracy == top)
    assert "MLP-probe held-out accuracy" in mlp.reason


def test_mlp_gap_sees_a_nonlinear_code_a_linear_probe_misses():
    rng = np.random.default_rng(0)
    y = np.repeat(np.arange(2), 100)
    # class = XOR of the signs of two coordinates: no linear probe beats chance, an MLP does
    x = rng.normal(size=(200, 2))
    x[:, 1] = np.abs(x[:, 1]) * np.where((x[:, 0] > 0) ^ (y == 1), 1, -1)
    x = np.hstack([x, 0.1 * rng.normal(size=(200, 6))])
    acc, gap = mlp_gap(x, y, seed=0)
    assert acc > 0.85 and gap > 0.25
    linear = np.hstack([np.eye(2)[y] * 3, rng.normal(size=(200, 6))])
    assert abs(mlp_gap(linear, y, seed=0)[1]) <= 0.05
    assert mlp_gap(x[:6], np.array([0, 0, 0, 1, 1, 1])) == (None, None)  # < 4 per class


def test_linear_probe_accuracy_separates_separable_from_noise():
    rng = np.random.default_rng(0)
    y = np.repeat(np.arange(4), 10)
    noise = rng.normal(size=(40, 16))
    signal = noise * 0.1 + np.eye(4)[y] @ rng.normal(size=(4, 16)) * 3
    assert linear_probe_accuracy(signal, y) == 1.0
    assert linear_probe_accuracy(noise, y) < 0.6


def test_middle_rule_and_its_fallback_before_the_middle():
    rows = [CandidateRow(i, f"b{i}", 8, 1.0) for i in (0, 1, 3)]
    assert choose("middle", rows, num_blocks=4)[0] == 1  # middle 2 absent: deepest before it
    assert choose("middle", rows, num_blocks=6)[0] == 3
    assert choose("middle", [CandidateRow(5, "b5", 8, 1.0)], num_blocks=8)[0] == 5


def test_choose_tie_breaks():
    def row(i, acc, linear=None, nc=None, probes=None):
        return CandidateRow(
            i, f"b{i}", 8, 1.0, nc1_block=nc, linear_accuracy=linear, probes=probes or {}
        )

    # linear: ties go to the deeper block
    assert choose("linear", [row(0, 0, linear=0.8), row(2, 0, linear=0.8)], 4)[0] == 2
    # curve: the lowest NC1
    assert choose("curve", [row(0, 0, nc=0.5), row(2, 0, nc=0.3), row(3, 0, nc=None)], 4)[0] == 2

    def p(acc, nc):
        return {"accuracy": acc, "nc1": nc, "seconds": 0.0}

    rows = [
        row(0, 0, probes={"0.1": p(0.8, 0.5), "0.01": p(0.8, 0.2)}),
        row(2, 0, probes={"0.1": p(0.7, 0.1), "0.01": p(0.6, 0.05)}),
    ]
    # probe_accuracy: the best (block, lr) pair; ties by the lower held-out NC1
    assert choose("probe_accuracy", rows, 4)[:2] == (0, 0.01)
    # probe: the lowest held-out NC1 over every pair
    assert choose("probe", rows, 4)[:2] == (2, 0.01)
    # lr of one block: ties by NC1, then the larger lr
    assert choose_lr(rows[0])[0] == 0.01
    assert choose_lr(row(0, 0, probes={"0.1": p(0.8, None), "0.03": p(0.8, None)}))[0] == 0.1


def test_probe_rules_probe_every_block_and_lr_and_leave_the_model_alone(tmp_path):
    model = make_model("test_resnet")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    data = class_data(per_class=10)
    sel = select_block(
        model,
        data,
        rule="probe_accuracy",
        candidates=[0, "layer4.0"],
        max_trainable_percent=None,
        probe_steps=3,
        lr="auto",
        **FP32,
    )
    assert [r.index for r in sel.rows] == [0, 3]
    assert all(set(r.probes) == {f"{v:g}" for v in LR_GRID} for r in sel.rows)
    assert (sel.chosen, sel.lr) == choose("probe_accuracy", sel.rows, 4)[:2]
    assert sel.row(sel.chosen).probes[f"{sel.lr:g}"]["accuracy"] == max(
        v["accuracy"] for r in sel.rows for v in r.probes.values()
    )
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    # 30% of 10 per class held out: 15; 2 blocks x 2 lrs x (3 steps x batch 32 + 15 held out)
    assert sel.images_processed == 50 + 2 * len(LR_GRID) * (3 * 32 + 15)
    saved = json.loads(sel.save_json(tmp_path / "sel.json").read_text())
    assert saved["chosen"] == sel.chosen and saved["lr"] == sel.lr and len(saved["rows"]) == 2
    png = sel.plot(tmp_path / "sel.png")
    assert png.read_bytes()[:4] == b"\x89PNG"


def test_lr_auto_with_a_block_rule_sweeps_only_the_chosen_block():
    model = make_model("test_resnet")
    sel = select_block(
        model,
        class_data(per_class=10),
        rule="middle",
        method="layer",
        probe_steps=2,
        lr="auto",
        **FP32,
    )
    probed = [r for r in sel.rows if r.probes]
    assert [r.index for r in probed] == [sel.chosen] and sel.chosen == 1  # middle within budget
    assert sel.lr == choose_lr(probed[0])[0]
    assert sel.images_processed == 50 + len(LR_GRID) * (2 * 32 + 15)
    assert "Learning rate" in sel.reason


def test_select_lr_for_full_fine_tuning():
    model = make_model("test_resnet")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    res = select_lr(
        model, class_data(per_class=10), method="full", lr_grid=(0.1, 0.01), probe_steps=2, **FP32
    )
    assert set(res.probes) == {"0.1", "0.01"} and res.lr in (0.1, 0.01) and res.block is None
    assert res.lr == choose_lr(CandidateRow(0, "", 0, 0.0, probes=res.probes))[0]
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert "learning rate for full FT" in str(res)


def test_vit_probes_from_the_prefix_cache_match_uncached(monkeypatch):
    from ncfinetune.selection.probe import Prober

    model = make_model("test_vit")
    data = class_data(per_class=10)
    kw = dict(
        rule="probe",
        candidates=[1, 2],
        probe_steps=3,
        lr=0.1,
        max_trainable_percent=None,
        seed=0,
        **FP32,
    )
    cached = select_block(model, data, **kw)
    # each candidate's prefix computed once for the 50 images, then 3-step probes
    assert cached.images_processed == 50 + 2 * 50 + 2 * (3 * 32 + 15)
    monkeypatch.setattr(Prober, "_cache", lambda self, block, method: None)
    plain = select_block(model, data, **kw)
    assert plain.images_processed == 50 + 2 * (3 * 32 + 15)
    assert cached.chosen == plain.chosen
    for a, b in zip(cached.rows, plain.rows, strict=True):
        assert a.probes["0.1"]["accuracy"] == b.probes["0.1"]["accuracy"]
        assert a.probes["0.1"]["nc1"] == pytest.approx(b.probes["0.1"]["nc1"], rel=1e-4)


def test_the_default_is_the_probe_rule_at_the_measured_lr():
    model = make_model("test_resnet")
    sel = select_block(model, class_data(per_class=10), probe_steps=2, **FP32)
    assert sel.rule == "probe" and sel.lr is None  # the lr was given (0.03), not chosen
    assert all(set(r.probes) == {"0.03"} for r in sel.rows)
    assert sel.chosen == min(sel.rows, key=lambda r: r.probes["0.03"]["nc1"]).index


def test_default_candidates_respect_the_budget_and_are_evenly_spaced():
    r18 = make_model("resnet18", num_classes=10)
    assert default_candidates(r18, "scl") == [0, 2, 4]  # <= 10%: blocks 0-4; block 4 = 8.27%
    assert default_candidates(r18, "scl", None) == [0, 4, 7]  # all 8 fit the skip
    vit = make_model("vit_tiny_patch16_224", num_classes=10)
    assert default_candidates(vit, "scl") == [0, 6, 11]
    model = make_model("test_resnet")
    full = select_block(
        model, class_data(), rule="curve", lr=0.1, max_trainable_percent=None, **FP32
    )
    cap = sorted(r.trainable_percent for r in full.rows)[0]
    sel = select_block(model, class_data(), rule="curve", lr=0.1, max_trainable_percent=cap, **FP32)
    assert [r.index for r in sel.rows] == [0] and len(full.rows) > 1


@pytest.mark.parametrize(
    ("rule", "lr", "need"),
    [
        ("curve", 0.1, 2),
        ("linear", 0.1, 2),
        ("recall", 0.1, 2),
        ("mlp", 0.1, 4),
        ("probe", 0.1, 5),
        ("probe_accuracy", "auto", 5),
        ("middle", "auto", 5),
        ("curve", "auto", 5),
    ],
)
def test_too_few_samples_name_the_minimum_for_the_rule(rule, lr, need):
    assert min_per_class(rule, lr) == need
    model = make_model("test_resnet")
    with pytest.raises(
        ConfigError,
        match=rf"class 0 has {need - 1} training samples; rule '{rule}' with lr .* needs at "
        rf"least {need} per class",
    ):
        select_block(model, class_data(per_class=need - 1), rule=rule, lr=lr, **FP32)


def test_one_sample_per_class_is_an_error_for_the_curve_not_a_choice():
    # with one sample per class every block's NC1 is 0: nothing to choose by
    model = make_model("test_resnet")
    with pytest.raises(ConfigError, match="has 1 training samples; rule 'curve' .* at least 2"):
        select_block(model, class_data(per_class=1), rule="curve", lr=0.1, **FP32)
    # the middle block with a fixed lr measures nothing and works with one per class
    sel = select_block(model, class_data(per_class=1), rule="middle", lr=0.1, **FP32)
    assert sel.chosen == 1
    with pytest.raises(ConfigError, match=r"lr 'auto' needs at least 5 per class"):
        select_lr(model, class_data(per_class=4), method="full")


def test_bad_input_errors():
    model = make_model("test_resnet")
    data = class_data()
    with pytest.raises(
        ConfigError, match=r"cannot fit candidate block\(s\) 2 \(layer3.0, 192 channels\)"
    ):
        select_block(model, data, candidates=[0, 2])
    with pytest.raises(ConfigError, match="candidates is empty"):
        select_block(model, data, candidates=[])
    with pytest.raises(
        ConfigError, match=r"no candidate block trains at most 0.01% .* smallest is block"
    ):
        select_block(model, data, candidates=[0, 1], max_trainable_percent=0.01)
    # no *default* candidate fits: the budget adapts to the smallest block and the report says so
    with pytest.warns(UserWarning, match=r"No block of test_resnet trains at most 0.01%"):
        sel = select_block(model, data, max_trainable_percent=0.01, rule="middle")
    assert len(sel.rows) == 1
    smallest = sel.rows[0].trainable_percent
    assert f"raised to the smallest block's {smallest:.2f}%" in sel.budget_note
    assert sel.budget_note in str(sel)
    # that share as the budget: the same block, no note; every other block trains more
    same = select_block(model, data, max_trainable_percent=smallest + 1e-6, rule="middle")
    assert [r.index for r in same.rows] == [sel.rows[0].index] and same.budget_note is None
    with pytest.raises(
        ConfigError,
        match="rule 'best' is not one of middle, curve, linear, recall, mlp, probe, probe_accuracy",
    ):
        select_block(model, data, rule="best")
    with pytest.raises(
        ConfigError, match="method 'full' does not tune one block, so no block can be selected"
    ):
        select_block(model, data, method="full")
    with pytest.raises(ConfigError, match="lr must be 'auto' or a positive number, got -1"):
        select_block(model, data, lr=-1)
    with pytest.raises(ConfigError, match=r"lr_grid must hold positive learning rates, got \[\]"):
        select_block(model, data, lr="auto", lr_grid=[])
    with pytest.raises(ConfigError, match="lr must be 'auto' or a positive number, got True"):
        select_block(model, data, lr=True)
    with pytest.raises(ConfigError, match="lr must be 'auto' or a positive number, got nan"):
        select_block(model, data, lr=float("nan"))
    with pytest.raises(ConfigError, match="batch_size must be an integer >= 1, got 0"):
        select_block(model, data, batch_size=0)
    with pytest.raises(ConfigError, match="probe_steps must be an integer >= 1, got 0"):
        select_lr(model, data, method="full", probe_steps=0)
    with pytest.raises(
        ConfigError, match=r"lr_grid must hold positive learning rates, got \[0.1, -1\]"
    ):
        select_lr(model, data, method="full", lr_grid=[0.1, -1])
    with pytest.raises(ConfigError, match="method='bitfit' is not one of linear, layer, scl, full"):
        select_lr(model, data, method="bitfit")
    with pytest.raises(ConfigError, match="precision 'fp8' is not one of auto, no, bf16"):
        select_block(model, data, precision="fp8")
    with pytest.raises(ConfigError, match="needs at least 2 classes"):
        select_block(model, (data[0], torch.zeros_like(data[1])), rule="curve", lr=0.1)
    with pytest.raises(ConfigError, match="has 40 images but 3 labels"):
        select_block(model, (data[0], data[1][:3]))


# -- device, precision and RNG ---------------------------------------------------------------
def test_selection_never_reseeds_the_global_rng_and_is_deterministic_for_a_seed():
    model = make_model("test_resnet")
    data = class_data(per_class=10)
    kw = dict(rule="probe", candidates=[0, 1], probe_steps=2, lr="auto", lr_grid=(0.1, 0.03))
    torch.manual_seed(123)
    torch.rand(3)  # a state no seed call gives back
    before = torch.get_rng_state()
    np_before = np.random.get_state()[1].copy()
    first = select_block(model, data, seed=5, **kw, **FP32)
    assert torch.equal(torch.get_rng_state(), before)
    assert np.array_equal(np.random.get_state()[1], np_before)
    lr = select_lr(model, data, method="lora-block", block=1, probe_steps=2, seed=5, **FP32)
    assert torch.equal(torch.get_rng_state(), before)
    torch.manual_seed(999)  # another global state: the same choice, the same numbers
    again = select_block(model, data, seed=5, **kw, **FP32)
    assert (again.chosen, again.lr) == (first.chosen, first.lr)
    for a, b in zip(again.rows, first.rows, strict=True):  # "seconds" differs, nothing else
        assert {k: (p["accuracy"], p["nc1"]) for k, p in a.probes.items()} == {
            k: (p["accuracy"], p["nc1"]) for k, p in b.probes.items()
        }
    lr_again = select_lr(model, data, method="lora-block", block=1, probe_steps=2, seed=5, **FP32)
    assert lr_again.lr == lr.lr
    assert {k: p["accuracy"] for k, p in lr_again.probes.items()} == {
        k: p["accuracy"] for k, p in lr.probes.items()
    }


def test_probes_run_on_the_given_device_in_the_given_precision(monkeypatch):
    import ncfinetune.selection.probe as probe_mod

    seen = []
    real = probe_mod.train_steps

    def spy(tuned, *args, **kwargs):
        seen.append((next(tuned.parameters()).device, kwargs["precision"]))
        return real(tuned, *args, **kwargs)

    monkeypatch.setattr(probe_mod, "train_steps", spy)
    model = make_model("test_resnet")
    data = class_data(per_class=10)
    select_block(model, data, candidates=[1], probe_steps=1, device="cpu", precision="bf16")
    assert seen == [(torch.device("cpu"), "bf16")]
    # no precision: accelerate's choice, as a fine-tune launched now takes it (fp16 runs fp32)
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "fp16")
    select_lr(model, data, method="full", lr_grid=(0.1,), probe_steps=1)
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "bf16")
    select_lr(model, data, method="full", lr_grid=(0.1,), probe_steps=1)
    assert [p for _, p in seen[1:]] == ["no", "bf16"]


def test_a_model_elsewhere_is_copied_to_the_device_never_moved():
    from ncfinetune.selection.probe import on_device

    model = make_model("test_resnet")
    assert on_device(model, None) is model and on_device(model, "cpu") is model
    meta = on_device(model, "meta")
    assert meta is not model and next(meta.parameters()).is_meta
    assert next(model.parameters()).device.type == "cpu"
