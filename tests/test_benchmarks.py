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
    assert a.file == common.RUNS / "resnet18" / "digits.jsonl"  # one file per backbone/target
    quick = common.run_for("resnet18", "digits", "scl", 10, 0, 0.1, steps=20)
    assert "quick" in quick.file.parts and "runs" not in quick.file.parts
    timed = common.run_for("resnet18", "digits", "scl", 10, 0, 0.1, budget=1.0)
    grid = common.run_for("resnet18", "digits", "scl", 10, 0, 0.1, test_max=2000)
    assert timed.file.parts[-4:] == ("budget", "runs", "resnet18", "digits.jsonl")
    assert grid.file.parts[-4:] == ("selection_loto", "runs", "resnet18", "digits.jsonl")


@pytest.mark.slow  # trains, or regenerates the committed tables
def test_a_run_writes_its_record_and_is_not_redone(harness):
    run = common.run_for("tiny", "digits", "scl", 5, 0, 0.05, steps=3, batch=16, validate=True)
    rec = common.ensure(run)
    assert run.file.is_file() and not [p for p in harness.rglob("*") if ".tmp" in p.name]
    assert run.file.read_text().count("\n") == 1 and common.recorded(run)
    assert rec["num_train"] == 50 and rec["num_test"] == 360  # 5 per class x 10 classes
    m = rec["metrics"]
    assert 0 <= m["test_accuracy"] <= 1 and 0 <= m["val_accuracy"] <= 1 and m["nc1_train"] > 0
    assert rec["trainable_percent"] == pytest.approx(100 * 37_354 / 373_658)
    common.upsert_record(run.file, {**rec, "metrics": {**m, "test_accuracy": -1.0}})
    assert common.ensure(run)["metrics"]["test_accuracy"] == -1.0  # read back, not re-run
    assert common.ensure(run, force=True)["metrics"]["test_accuracy"] == m["test_accuracy"]
    assert [r["key"] for r in common.read_records(run.file)] == [run.key]  # replaced, not added


def _writer(path, prefix: str) -> None:
    for i in range(20):
        common.upsert_record(path, {"key": f"{prefix}{i:02d}"})


def test_records_are_upserted_sorted_by_key_and_survive_concurrent_writers(tmp_path):
    """upsert_record keeps one line per key, sorted (small diffs), and several processes
    writing the same file at once lose none of each other's records (the lock)."""
    import multiprocessing

    path = tmp_path / "b" / "t.jsonl"
    for key in ("c", "a", "b", "a"):
        common.upsert_record(path, {"key": key, "value": key.upper(), "nan": float("nan")})
    lines = path.read_text().splitlines()
    assert [json.loads(line)["key"] for line in lines] == ["a", "b", "c"]
    assert common.read_record(path, "b") == {"key": "b", "value": "B", "nan": None}  # strict
    assert common.read_record(path, "z") is None and common.read_records(tmp_path / "no") == []
    fork = multiprocessing.get_context("fork")  # the modules are loaded already: cheap
    procs = [fork.Process(target=_writer, args=(path, w)) for w in "pqr"]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=120)
    assert [p.exitcode for p in procs] == [0, 0, 0]
    keys = [rec["key"] for rec in common.read_records(path)]
    assert keys == sorted(["a", "b", "c", *(f"{w}{i:02d}" for w in "pqr" for i in range(20))])


@pytest.mark.slow  # trains, or regenerates the committed tables
def test_a_diverged_run_is_recorded_not_raised_and_ablation_keys_differ(harness):
    run = common.run_for("tiny", "digits", "layer", 5, 0, 1e30, steps=4, batch=16)
    rec = common.ensure(run)  # lr 1e30: the loss becomes non-finite
    assert "diverged" in rec["metrics"]["diverged"] and rec["metrics"]["test_accuracy"] is None
    assert common.saved(run)["metrics"]["diverged"] == rec["metrics"]["diverged"]
    base = common.run_for("vit_tiny", "digits", "scl", 10, 0, 0.03)
    raw = common.run_for("vit_tiny", "digits", "scl", 10, 0, 0.03, skip_norm=False)
    frozen = common.run_for("resnet18", "digits", "scl", 10, 0, 0.03, bn="frozen")
    assert base.key == "scl-b6-n10-s0-lr0.03-t150-bs32"  # defaults keep the old record names
    assert raw.key.endswith("-skipnorm0") and frozen.key.endswith("-bnfrozen")


def _fake(run, **metrics):
    base = {"test_accuracy": 0.5, "nc1_train": 1.0, "nc1_test": 1.0}
    rec = {
        "run": {**run.__dict__},
        "key": run.key,
        "metrics": {**base, **metrics},
        "trainable_percent": 8.0,
        "train_seconds": 1.0,
        "eval_seconds": 1.0,
    }
    common.upsert_record(run.file, rec)


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


def test_test_max_and_precision_name_their_records():
    a = common.run_for("resnet18", "fmnist59", "scl", 10, 0, 0.1)
    b = common.run_for("resnet18", "fmnist59", "scl", 10, 0, 0.1, test_max=2000)
    c = common.run_for("resnet18", "fmnist59", "scl", 10, 0, 0.1, precision="bf16")
    assert len({a.key, b.key, c.key}) == 3 and a.file == c.file != b.file  # b: selection_loto's
    assert b.key.endswith("-test2000") and c.key.endswith("-bf16")


def test_input_shifts():
    import torch

    x = torch.arange(2 * 3 * 4 * 4, dtype=torch.uint8).reshape(2, 3, 4, 4)
    assert torch.equal(common.apply_shift(x, "invert"), 255 - x)
    assert torch.equal(common.apply_shift(x, "rot90")[0, 0, 0], x[0, 0, :, -1])
    low = common.apply_shift(torch.zeros(1, 1, 5, 5, dtype=torch.uint8), "blur_lowc")
    assert int(low.max()) == int(low.min()) == 85  # 128 - 128/3, rounded
    assert common.apply_shift(x, None) is x
    with pytest.raises(ValueError, match="unknown shift 'flip'"):
        common.apply_shift(x, "flip")


def _subset(pair, seed, acc, probe_acc, lin):
    """A synthetic selection subset: 3 candidate blocks (0, 2, 4) of an 8-block net, lrs
    0.1/0.03/0.01; acc[(block, lr)] test accuracies; probe_acc[(block, lr)] held-out ones."""
    import selection_loto as L

    rows = [
        {
            "index": k,
            "name": f"b{k}",
            "channels": 8,
            "trainable_percent": 1.0 + k,
            "nc1_block": 1.0 / (1 + k),
            "linear_accuracy": lin[i],
            "probes": {
                f"{lr:g}": {"accuracy": probe_acc[(k, lr)], "nc1": 0.5, "seconds": 1.0}
                for lr in L.LR_GRID
            },
        }
        for i, k in enumerate((0, 2, 4))
    ]
    return {
        "pair": pair,
        "per_class": 10,
        "seed": seed,
        "signals": {"rows": rows, "num_blocks": 8, "probe_steps": 10, "base_seconds": 2.0},
        "full_lr": {"lr": 0.03},
        "acc": acc,
        "train_s": dict.fromkeys(acc, 10.0),
        "full_acc": {0.1: 0.5, 0.03: 0.6, 0.01: 0.55},
    }


def test_rules_on_records_and_leave_one_target_out_never_sees_the_held_out_pair():
    import selection_loto as L

    grid = [(k, lr) for k in (0, 2, 4) for lr in L.LR_GRID]
    # on pairs p0, p1 block 4 at lr 0.03 is best; the linear probe prefers block 0
    good = {key: (0.9 if key == (4, 0.03) else 0.7) for key in grid}
    probe = {key: (0.8 if key[0] == 4 and key[1] == 0.1 else 0.5) for key in grid}
    subs = [_subset(p, s, good, probe, lin=[0.9, 0.5, 0.5]) for p in ("p0", "p1") for s in (0, 1)]
    r = L.apply_rule(subs[0], "middle", 0.03)
    assert (r["block"], r["lr"], r["regret"]) == (4, 0.03, 0.0) and r["cost"] == 0.2
    r = L.apply_rule(subs[0], "linear", "auto")  # block 0; lr by its probes (all 0.5: larger)
    assert (r["block"], r["lr"]) == (0, 0.1) and r["regret"] == pytest.approx(0.0)
    assert r["cost"] == pytest.approx((2.0 + len(L.LR_GRID) * 1.0) / 10.0)
    r = L.apply_rule(subs[0], "probe_accuracy", "auto")  # the best probe: (4, 0.1)
    assert (r["block"], r["lr"]) == (4, 0.1) and r["regret_grid"] == pytest.approx(20.0)
    # the held-out pair p2 would favour lr 0.1 in-sample; its design must not see that
    held = {key: (0.95 if key == (0, 0.1) else 0.6) for key in grid}
    out = L.loto([*subs, _subset("p2", 0, held, probe, lin=[0.9, 0.5, 0.5])])
    assert out["p2"]["design"]["middle"] == 0.03 and out["p2"]["default"] == "middle"
    assert out["p2"]["results"]["middle"][0]["accuracy"] == 0.6
    assert out["p2"]["full"] == [0.6]  # full FT's procedure chosen on p0, p1: lr 0.03


@pytest.mark.slow  # trains, or regenerates the committed tables
def test_selection_report_regenerates_from_the_committed_records(tmp_path, monkeypatch):
    """results/selection_loto.md is made from committed records alone, byte for byte."""
    import selection_loto as L

    committed = Path(L.RESULTS) / "selection_loto.md"
    monkeypatch.setattr(L, "RESULTS", tmp_path)
    L.report(L.PAIRS)
    assert (tmp_path / "selection_loto.md").read_text() == committed.read_text()
    out = json.loads((tmp_path / "selection_loto.json").read_text())
    assert out["subsets"] == len(L.PAIRS) * len(L.SIZES) * len(L.SEEDS)


@pytest.mark.slow  # trains, or regenerates the committed tables
def test_budget_steps_follow_the_calibration_and_runs_are_recorded(harness, monkeypatch):
    import budget

    monkeypatch.setattr(budget, "OUT", harness / "budget")
    monkeypatch.setattr(budget, "RESULTS", harness)
    monkeypatch.setattr(budget, "TIMED_STEPS", 2)
    monkeypatch.setattr(budget, "BATCH", 8)  # the arithmetic, not the speed, is under test
    monkeypatch.setattr(budget, "lr_for", lambda b, t, m: 0.05)
    monkeypatch.setattr(budget, "BUDGETS", [0.05, 0.1])
    monkeypatch.setattr(common, "STEPS", 150)
    cal = budget.calibrate("tiny", "digits", 5)
    names = [v.name for v in budget.variants("tiny")]
    assert set(cal["variants"]) == set(names) and "SCL FT mid, bn frozen" not in names
    assert cal["selected"]["block"] in (0, 1, 2, 3)
    assert budget.saved_calibration("tiny", "digits", 5) == cal  # reused, not re-measured
    assert budget.calibrate("tiny", "digits", 5) == cal
    full_s = 0.1 * 150 * cal["variants"]["full FT"]["tau"]
    for name, v in cal["variants"].items():  # the budget's seconds, less the fill, in steps
        assert budget.steps_for(cal, name, 0.1) == max(1, round((full_s - v["fill"]) / v["tau"]))
    assert budget.steps_for(cal, "full FT", 0.1) == 15
    _, runs = budget.plan(["tiny"], ["digits"], [5], [0])
    assert {r.budget for r in runs} == {0.05, 0.1}
    assert {r.file for r in runs} == {harness / "budget" / "runs" / "tiny" / "digits.jsonl"}
    assert all("budget" in r.key for r in runs) and len({r.key for r in runs}) == len(runs)
    full = [r for r in runs if r.method == "full"]
    common.run_all(full)
    recs = budget.load_budget_records()
    assert len(recs) == 2 and all(r["run"]["steps"] in (7, 8, 15) for r in recs)
    out = budget.report()
    assert set(out["tiny/digits/5"]["full FT"]) == {"0.05", "0.1"}
    assert (harness / "budget" / "budget_tiny_digits_n5.png").is_file()
    assert "| full FT |" in (harness / "budget" / "budget.md").read_text()
    assert summarize.load_records() == []  # budget runs stay out of the main tables
    # a diverged run is reported as such: alone in its cell, or next to the runs that finished
    (short,) = [r for r in full if r.budget == 0.05]
    (long,) = [r for r in full if r.budget == 0.1]
    for run, seed in ((short, 0), (long, 1)):  # 0.05: the record replaced; 0.1: a second seed
        rec = common.saved(run)
        rec["run"]["seed"] = seed
        rec["key"] = common.Run(**rec["run"]).key
        rec["metrics"] = {"test_accuracy": None, "diverged": "the loss became nan at step 3"}
        common.upsert_record(run.file, rec)
    out = budget.report()["tiny/digits/5"]["full FT"]
    assert out["0.05"] == {"n": 0, "diverged": 1}
    assert (out["0.1"]["n"], out["0.1"]["diverged"]) == (1, 1)
    md = (harness / "budget" / "budget.md").read_text()
    assert "| full FT | diverged (1 of 1) | " in md and "steps, 1 of 2 diverged) |" in md
    full_ft, layer = {"1.0": {"mean": 80.0, "sd": 1.0, "n": 3}}, {"mean": 90.0, "sd": 2.0, "n": 3}
    ahead = budget.verdict({"full FT": full_ft, "Layer FT mid": {"1.0": layer}})
    assert ahead == "Ahead of full FT by more than one sd: Layer FT mid at 1x (90.0 vs 80.0)."
    layer["diverged"] = 1  # the mean of the survivors is no verdict
    assert budget.verdict({"full FT": full_ft, "Layer FT mid": {"1.0": layer}}).startswith("No ")


@pytest.mark.slow  # trains, or regenerates the committed tables
def test_summarize_regenerates_its_tables_byte_for_byte_from_the_records(harness, monkeypatch):
    """The committed tables are a pure function of the committed records: summarizing the same
    records in a fresh folder gives identical markdown, JSON and PNG bytes."""
    import shutil

    for key, value in (("MAIN_BACKBONES", ["tiny"]), ("MAIN_TARGETS", ["digits"]),
                       ("STEPS", 3), ("chosen_lr", lambda b, t, m: 0.05)):  # fmt: skip
        monkeypatch.setattr(summarize, key, value)
    monkeypatch.setattr(common, "STEPS", 3)  # records of 3-step runs count as full-budget ones
    runs = [common.run_for("tiny", "digits", m, n, s, 0.05, steps=3, batch=16)
            for m in ("linear", "full") for n in (2, 5) for s in (0, 1)]  # fmt: skip
    common.run_all(runs)
    summarize.main()
    made = {p.name: p.read_bytes() for p in harness.iterdir() if p.is_file()}
    assert {"summary.md", "summary.json", "small_data_tiny_digits.png"} <= set(made)
    assert "| 2 | " in made["summary.md"].decode()
    fresh = harness / "fresh"
    shutil.copytree(harness / "runs", fresh / "runs")  # a clone: the records alone
    monkeypatch.setattr(summarize, "RESULTS", fresh)
    monkeypatch.setattr(summarize, "RUNS", fresh / "runs")
    summarize.main()
    again = {p.name: p.read_bytes() for p in fresh.iterdir() if p.is_file()}
    assert again == made


def _state(pid: int, want: str) -> str:
    """The process's state letter, once it is one of ``want`` (signals arrive asynchronously)."""
    import time

    for _ in range(100):
        state = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[0]
        if state in want:
            break
        time.sleep(0.05)
    return state


def test_calibration_pauses_matching_processes_and_always_resumes_them():
    import subprocess
    import time

    import budget

    tag = "ncfinetune-pause-probe-17"  # a command line nothing else has
    child = subprocess.Popen(["sleep", "60"])
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)", tag])
    try:
        # exec may not have replaced the forked command line yet on a busy machine: wait for it
        deadline = time.monotonic() + 10
        while other.pid not in budget.matching_processes(tag) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert other.pid in budget.matching_processes(tag)
        assert child.pid not in budget.matching_processes(tag)  # its command line lacks the tag
        with pytest.raises(RuntimeError, match="inside"):
            with budget.paused(tag) as stopped:
                assert stopped == [other.pid] and _state(other.pid, "T") == "T"
                raise RuntimeError("inside")
        assert _state(other.pid, "SR") in "SR"  # resumed although the block raised
        with budget.paused(None) as stopped:
            assert stopped == []
        with pytest.raises(SystemExit, match=r"--pause '\(' is not a regular expression"):
            budget.matching_processes("(")
    finally:
        child.kill()
        other.kill()
