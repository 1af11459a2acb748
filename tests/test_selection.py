"""Block selection: the rules pick what their reports say, the model is left untouched,
the report prints/saves/plots, and bad input fails clearly."""

import json

import pytest
import torch
from conftest import IMAGE_SIZE, NUM_CLASSES, make_model

import ncfinetune
from ncfinetune import ConfigError
from ncfinetune.selection import select_block


def class_data(per_class: int = 8, seed: int = 0):
    """Images whose class shifts the mean of a few channels: NC1 is finite and varies by block."""
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(NUM_CLASSES).repeat_interleave(per_class)
    x = torch.randn(y.numel(), 3, IMAGE_SIZE, IMAGE_SIZE, generator=g)
    x[:, 0] += y[:, None, None].float() * 0.5
    return x, y


@pytest.mark.parametrize("arch", ["test_resnet", "test_vit"])
def test_curve_rule_picks_the_lowest_block_nc1(arch):
    model = make_model(arch)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    sel = select_block(model, class_data(), rule="curve")
    assert sel.chosen == min(sel.rows, key=lambda r: r.nc1_block).index
    assert [c["index"] for c in sel.curve] == list(range(len(ncfinetune.list_blocks(model))))
    assert sel.images_processed == NUM_CLASSES * 8 and sel.seconds > 0
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert f"chosen: block {sel.chosen} ({sel.chosen_name})" in str(sel)


def test_trainable_share_matches_the_wrapped_model():
    model = make_model("test_resnet")
    sel = select_block(model, class_data(), rule="curve", method="layer")
    for row in sel.rows:
        trainable, total = ncfinetune.layer_wrap(
            make_model("test_resnet"), row.index
        ).parameter_counts()
        assert row.trainable_percent == pytest.approx(100 * trainable / total)


def test_probe_rules_score_a_held_out_split_and_leave_the_model_alone(tmp_path):
    model = make_model("test_resnet")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    data = class_data(per_class=10)
    sel = select_block(model, data, rule="probe", candidates=[0, "layer4.0"], probe_steps=3)
    assert [r.index for r in sel.rows] == [0, 3]
    assert sel.chosen == min(sel.rows, key=lambda r: r.nc1_heldout).index
    assert all(r.nc1_train is not None and 0 <= r.heldout_accuracy <= 1 for r in sel.rows)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    # 30% of 10 per class held out: 15 images; 2 probes of 3 steps x batch 32 (35 fit images),
    # each evaluated on the 15 held-out images and on 15 of the fit images (training NC1)
    assert sel.images_processed == 50 + 2 * (3 * 32 + 15 + 15)
    acc = select_block(model, data, rule="probe_accuracy", candidates=[0, 3], probe_steps=3)
    assert (
        acc.chosen
        == max(acc.rows, key=lambda r: (r.heldout_accuracy, -r.nc1_heldout, -r.index)).index
    )
    saved = json.loads(sel.save_json(tmp_path / "sel.json").read_text())
    assert saved["chosen"] == sel.chosen and len(saved["rows"]) == 2
    png = sel.plot(tmp_path / "sel.png")
    assert png.read_bytes()[:4] == b"\x89PNG"


def test_vit_probes_share_one_prefix_pass_and_match_uncached(monkeypatch):
    import ncfinetune.selection as sel_mod

    model = make_model("test_vit")
    data = class_data(per_class=10)
    kw = dict(rule="probe", candidates=[0, 1, 2], probe_steps=3, seed=0)
    cached = select_block(model, data, **kw)
    # one shared pass of the 50 images through the prefix, not one per candidate
    assert cached.images_processed == 50 + 50 + 3 * (3 * 32 + 15 + 15)
    monkeypatch.setattr(sel_mod, "_probe_caches", lambda *a: {})
    plain = select_block(model, data, **kw)
    assert plain.images_processed == 50 + 3 * (3 * 32 + 15 + 15)
    assert cached.chosen == plain.chosen
    for a, b in zip(cached.rows, plain.rows, strict=True):
        assert a.heldout_accuracy == b.heldout_accuracy
        assert a.nc1_heldout == pytest.approx(b.nc1_heldout, rel=1e-4)


def test_accuracy_ties_go_to_the_lower_held_out_nc1_then_the_earlier_block():
    from ncfinetune.selection import CandidateRow, _choose_by_accuracy

    def row(i, acc, nc1):
        return CandidateRow(i, f"b{i}", 8, 1.0, heldout_accuracy=acc, nc1_heldout=nc1)

    assert _choose_by_accuracy([row(0, 0.8, 0.5), row(2, 0.8, 0.3), row(4, 0.7, 0.1)]).index == 2
    assert _choose_by_accuracy([row(0, 0.8, 0.5), row(2, 0.9, 0.9)]).index == 2
    assert _choose_by_accuracy([row(0, 0.8, 0.4), row(2, 0.8, 0.4)]).index == 0
    assert _choose_by_accuracy([row(0, 0.8, None), row(2, 0.8, 2.0)]).index == 2


def test_budget_keeps_only_cheap_candidates():
    model = make_model("test_resnet")
    full = select_block(model, class_data(), rule="curve")
    cap = sorted(r.trainable_percent for r in full.rows)[1]
    sel = select_block(model, class_data(), rule="curve", max_trainable_percent=cap)
    assert sel.rows and all(r.trainable_percent <= cap for r in sel.rows)
    assert len(sel.rows) < len(full.rows)


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
        select_block(model, data, max_trainable_percent=0.01)
    with pytest.raises(ConfigError, match="rule 'best' is not one of curve, probe, probe_accuracy"):
        select_block(model, data, rule="best")
    with pytest.raises(ConfigError, match="method 'full' cannot be placed at a block"):
        select_block(model, data, method="full")
    with pytest.raises(
        ConfigError, match=r"class 0 has 2 training samples; a probe rule needs at least 5"
    ):
        select_block(model, class_data(per_class=2), rule="probe")
    with pytest.raises(ConfigError, match="has 40 images but 3 labels"):
        select_block(model, (data[0], data[1][:3]))
