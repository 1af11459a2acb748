"""select_method (issue 27): which method, block and lr; the plan round-trips through
get_tuned_model, the test split is never read, a budget is respected, bad input is refused;
--method auto in the finetune and select recipes."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import make_model
from test_recipes import finetune
from test_selection import class_data

from ncfinetune import get_tuned_model
from ncfinetune.errors import ConfigError
from ncfinetune.selection import (
    METHOD_CANDIDATES,
    MethodCandidate,
    choose_method,
    default_candidates,
    select_method,
    select_method_on_split,
)

FAST = {"probe_steps": 2, "lr_grid": (0.1,), "precision": "no"}


def cand(method, block, share, acc, budget_acc=None, nc1=1.0):
    c = MethodCandidate(method, block, None if block is None else f"b{block}", share)
    c.lr, c.accuracy = 0.1, acc
    c.probes = {"0.1": {"accuracy": acc / 100, "nc1": nc1}}
    if budget_acc is not None:
        c.budget_probe = {"accuracy": budget_acc / 100, "nc1": nc1}
    return c


def test_choose_method_prefers_fewer_parameters_within_the_margin():
    cs = [cand("linear", None, 0.1, 60.0), cand("scl", 4, 8.0, 80.0), cand("full", None, 100, 81.5)]
    c, why = choose_method(cs, margin=2.0, tiebreak="params")
    assert (c.method, c.block) == ("scl", 4)
    assert why == (
        "Held-out accuracy 80.0% (within 2 points of the best, 81.5%); of those (full) the "
        "fewest trainable parameters (8.00%)."
    )
    c, why = choose_method(cs, margin=1.0, tiebreak="params")  # full leads by more than the margin
    assert c.method == "full" and why.startswith("The highest held-out accuracy (81.5%)")
    c, _ = choose_method(
        cs, margin=25.0, tiebreak="params"
    )  # everything within: the fewest parameters
    assert c.method == "linear"
    # a budget probe's score replaces the equal-steps one
    cs[0].budget_probe = {"accuracy": 0.9, "nc1": None}
    assert choose_method(cs, margin=0.0, tiebreak="params")[0].method == "linear"
    with pytest.raises(ConfigError, match="no method candidate has a probe score"):
        choose_method([MethodCandidate("full", None, None, 100.0)])


def test_stable_first_sets_aside_probes_whose_training_loss_rose():
    from ncfinetune.selection import CandidateRow, choose_lr
    from ncfinetune.selection.rules import unstable

    assert not unstable({"loss_rise": 1.0}) and unstable({"loss_rise": 1.01})
    assert not unstable({"loss_rise": None}) and not unstable({})
    probes = {
        "0.1": {"accuracy": 0.8, "nc1": 0.5, "loss_rise": 25.0},  # overshot, not yet visible
        "0.03": {"accuracy": 0.7, "nc1": 0.9, "loss_rise": 0.6},
    }
    row = CandidateRow(-1, "", 0, 0.0, probes=probes)
    assert choose_lr(row)[0] == 0.1 and choose_lr(row, stable_first=True)[0] == 0.03
    cs = [cand("full", None, 100, 82.0), cand("scl", 4, 8.0, 75.0)]
    cs[0].probes["0.1"]["loss_rise"] = 3.0
    assert choose_method(cs, 0.0, stable_first=False)[0].method == "full"
    c, why = choose_method(cs, 0.0, stable_first=True)
    assert c.method == "scl" and why == (
        "The highest held-out accuracy (75.0%) among 1 candidates. Set aside: full (the probe's "
        "training loss rose above its first step's)."
    )
    cs[1].probes["0.1"]["loss_rise"] = 2.0  # nothing stable: all stay in
    assert choose_method(cs, 0.0, stable_first=True)[0].method == "full"


def test_choose_method_breaks_ties_by_held_out_nc1_when_asked():
    cs = [
        cand("linear", None, 0.1, 80.0, nc1=2.0),
        cand("scl", 4, 8.0, 80.0, nc1=0.5),
        cand("full", None, 100, 80.0, nc1=0.5),
        cand("layer", 4, 8.0, 79.0, nc1=0.1),
    ]
    assert choose_method(cs, 0.0, "params")[0].method == "linear"
    c, why = choose_method(cs, 0.0, "nc1")  # equal NC1: the fewer parameters
    assert (c.method, why) == (
        "scl",
        "Held-out accuracy 80.0% (tied with the best, 80.0%); of those (linear, full) the "
        "lowest held-out NC1 (0.5).",
    )
    assert choose_method(cs, 1.0, "nc1")[0].method == "layer"  # within 1 point: its NC1 wins
    cs[1].probes["0.1"]["nc1"] = None  # no NC1 (e.g. a class of one row) ranks last
    assert choose_method(cs, 0.0, "nc1")[0].method == "full"
    with pytest.raises(ConfigError, match="tiebreak must be one of nc1, params, got 'acc'"):
        choose_method(cs, 0.0, "acc")
    with pytest.raises(ConfigError, match="tiebreak must be one of nc1, params, got 'x'"):
        select_method(make_model("test_resnet"), class_data(), tiebreak="x", **FAST)


def test_the_plan_round_trips_through_get_tuned_model_and_leaves_the_rng_alone():
    model = make_model("test_resnet")
    before_weights = {k: v.clone() for k, v in model.state_dict().items()}
    rng = torch.get_rng_state()
    plan = select_method(model, class_data(), steps=20, seed=3, blocks=None, **FAST)
    assert torch.equal(torch.get_rng_state(), rng)
    assert all(torch.equal(v, before_weights[k]) for k, v in model.state_dict().items())
    blocks = default_candidates(model, "scl")
    expected = {("linear", None), ("full", None), ("lora-block", blocks[len(blocks) // 2])}
    expected |= {(m, b) for m in ("layer", "scl") for b in blocks}
    assert {(c.method, c.block) for c in plan.candidates} == expected
    assert {c.method for c in plan.candidates} == set(METHOD_CANDIDATES)
    # every candidate probed at every lr, its best lr and step time recorded
    for c in plan.candidates:
        assert set(c.probes) == {"0.1"} and c.lr == 0.1 and c.steps == 20
        assert 0 <= c.accuracy <= 100 and c.step_seconds > 0
        assert c.probes["0.1"]["loss_rise"] > 0  # highest loss after the first step / the first
    full = next(c for c in plan.candidates if c.method == "full")
    assert full.trainable_percent == pytest.approx(100.0)
    assert all(c.trainable_percent < 100 for c in plan.candidates if c is not full)
    # the choice is what choose_method says of the candidates, and builds as configured
    c, _ = choose_method(plan.candidates, plan.margin, plan.tiebreak, plan.stable_first)
    assert (plan.method, plan.block, plan.lr) == (c.method, c.block, c.lr)
    tuned = get_tuned_model(make_model("test_resnet"), plan.config)
    assert tuned.method == plan.method and tuned.block_index == plan.block
    assert plan.config.name == plan.method
    # the plan as JSON, and the same seed gives the same numbers
    d = json.loads(json.dumps(plan.to_dict()))
    assert d["config"]["method"] == plan.method and len(d["candidates"]) == len(expected)
    again = select_method(model, class_data(), steps=20, seed=3, blocks=None, **FAST)
    assert [c.accuracy for c in again.candidates] == [c.accuracy for c in plan.candidates]
    assert f"chosen: {plan.method}" in str(plan)


def test_blocks_middle_probes_the_one_block_methods_at_the_middle_candidate_only():
    model = make_model("test_resnet")
    blocks = default_candidates(model, "scl")
    plan = select_method(model, class_data(), steps=5, blocks="middle", **FAST)
    mid = blocks[len(blocks) // 2]
    assert {(c.method, c.block) for c in plan.candidates} == {
        ("linear", None),
        ("layer", mid),
        ("scl", mid),
        ("lora-block", mid),
        ("full", None),
    }


def test_a_budget_gives_each_candidate_the_steps_that_fit_it():
    model = make_model("test_resnet")
    kw = {"steps": 10, "methods": ["linear", "scl", "full"], "blocks": [1], **FAST}
    plan = select_method(model, class_data(), budget=0.5, **kw)
    assert plan.budget_seconds == 0.5
    for c in plan.candidates:
        assert c.steps == max(1, int(0.5 / c.step_seconds))
        assert c.budget_probe is not None and c.budget_probe["steps"] >= 1
    assert plan.steps == plan.chosen.steps
    rel = select_method(model, class_data(), budget="1x", **kw)
    full = next(c for c in rel.candidates if c.method == "full")
    assert rel.budget_seconds == pytest.approx(10 * full.step_seconds)
    assert full.steps in (9, 10)  # int() of 10 x t / t, up to float rounding
    assert "equal wall-clock" in str(rel)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"methods": ["banana"]}, "banana"),
        ({"methods": []}, "methods is empty"),
        ({"methods": ["scl", "scl"]}, "lists a method twice"),
        ({"steps": 0}, "steps must be a positive integer"),
        ({"steps": 1.5}, "steps must be a positive integer"),
        ({"margin": -1}, "margin must be a finite number"),
        ({"margin": float("nan")}, "margin must be a finite number"),
        ({"budget": "fast"}, r"budget must be a positive number of seconds or '<k>x'"),
        ({"budget": 0}, "budget must be a positive"),
        ({"budget": "-2x"}, "budget must be a positive"),
        ({"lr_grid": ()}, "lr_grid"),
        ({"probe_steps": 0}, "probe_steps"),
        ({"blocks": []}, "blocks is empty"),
        ({"blocks": "layer1"}, "blocks must be None, 'middle' or a list"),
    ],
)
def test_bad_input_is_refused_before_any_probe(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        select_method(make_model("test_resnet"), class_data(), **{**FAST, **kwargs})


def test_too_few_rows_per_class_names_the_minimum():
    x, y = class_data(per_class=1)
    with pytest.raises(
        ConfigError,
        match=r"class 0 has 1 training samples; method selection .* "
        r"needs at least 5 per class .* or name the method, block and lr\.",
    ):
        select_method(make_model("test_resnet"), (x, y), **FAST)


def test_no_block_in_the_budget_raises_it_and_says_so():
    model = make_model("test_vit")
    with pytest.warns(UserWarning, match="the budget was raised to the smallest block"):
        plan = select_method(
            model, class_data(), steps=5, methods=["scl"], max_trainable_percent=0.01, **FAST
        )
    assert "No block of test_vit trains at most 0.01%" in plan.budget_note
    assert plan.budget_note in str(plan)
    assert len(plan.candidates) >= 1


class Identity:
    def normalize(self, x):
        return x


class TrainOnly:
    """A loaded dataset whose test split must never be read."""

    def __init__(self, x, y):
        from ncfinetune.data.loaders import TensorCache

        self.cache = TensorCache(x, y, Identity())
        self.image_column, self.label_column = "image", "label"
        self._y = y.numpy()

    def labels(self, split):
        assert split == "train", f"select_method read the {split} split"
        return self._y

    @property
    def train(self):
        return self.cache

    @property
    def test(self):
        raise AssertionError("select_method read the test split")


def test_the_test_split_is_never_read(monkeypatch):
    from ncfinetune.data import loaders
    from ncfinetune.selection import probe

    x, y = class_data(per_class=12)
    data = TrainOnly(x, y)
    seen = {}

    def build(train, transform, *, image_column, label_column, indices):
        seen["rows"] = np.asarray(indices)
        assert train is data.cache
        return loaders.TensorCache(x[indices], y[indices], Identity())

    monkeypatch.setattr(loaders.TensorCache, "build", staticmethod(build))
    rows = np.arange(0, y.numel(), 2)  # 6 per class
    plan = select_method_on_split(
        make_model("test_resnet"), data, None, rows, seed=1, steps=5, methods=["linear", "full"],
        **FAST,
    )  # fmt: skip
    assert np.array_equal(seen["rows"], rows)
    assert plan.method in ("linear", "full")
    assert probe  # the module the split goes through


def test_finetune_method_auto_records_and_resumes_the_choice(tmp_path):
    args = ["--method", "auto", "--per_class", 5, "--epochs", 2, "--max_steps", 1,
            "--output_dir", tmp_path]  # fmt: skip
    first = finetune(*args, "--stop_after", 1)
    assert first["stopped"]
    saved = json.loads((tmp_path / "selection.json").read_text())
    plan = json.loads((tmp_path / "method_selection.json").read_text())
    assert saved["method"] == plan["method"] in METHOD_CANDIDATES
    assert (saved["block"], saved["lr"]) == (plan["block"], plan["lr"])
    assert "method: auto" in (tmp_path / "config.yaml").read_text()
    m = finetune(*args, "--resume", "true")
    assert (m["method"], m["block"], m["lr"]) == (saved["method"], saved["block"], saved["lr"])
    assert m["selection"] is None  # reused, not chosen again


def test_select_recipe_method_auto_prints_and_writes_the_plan(tmp_path, capsys):
    from ncfinetune.recipes import select as recipe

    plan = recipe.main(
        ["--model", "test_resnet", "--image_size", "32", "--per_class", "5", "--method", "auto",
         "--steps", "20", "--probe_steps", "2", "--output_dir", str(tmp_path)]
    )  # fmt: skip
    out = capsys.readouterr().out
    assert f"chosen: {plan.method}" in out and "method_selection.json" in out
    saved = json.loads((tmp_path / "method_selection.json").read_text())
    assert saved["method"] == plan.method and saved["candidates"][0]["steps"] == 20
