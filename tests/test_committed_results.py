"""The committed benchmark tables are made from the committed run records, and nothing else.

``summarize.py``, ``lr_grid.py``, ``ablations.py``, ``budget.py report`` and
``selection_loto.py report`` (in ``test_benchmarks.py``) run here on the JSON Lines records
under ``benchmarks/results`` (as a fresh clone has them) and write into a temporary folder; the
markdown and JSON they write must equal the committed files byte for byte, and every plot the
committed markdown refers to must be made again. A table edited by hand, or made from a record
that was never committed, fails here.
"""

import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
sys.path.insert(0, str(ROOT / "benchmarks"))
import budget  # noqa: E402
import common  # noqa: E402
import summarize  # noqa: E402

pytestmark = pytest.mark.slow  # reads ~1,900 records and redraws the plots


def test_records_are_json_lines_sorted_by_key_and_under_the_size_cap():
    """One JSON Lines file per benchmark and backbone/target, one record per line, each line
    named by a unique "key" and sorted by it; a run record lies where ``Run.file`` looks."""
    files = sorted(RESULTS.rglob("*.jsonl"))
    total = sum(p.stat().st_size for p in files)
    assert total < 20 * 2**20, f"{total / 2**20:.1f} MiB of records (cap 20 MiB)"
    runs = 0
    for path in files:
        lines = path.read_text().splitlines()
        recs = [json.loads(line) for line in lines]
        keys = [rec["key"] for rec in recs]
        assert keys == sorted(set(keys)), f"{path}: keys not unique and sorted"
        assert common.read_records(path) == recs
        for rec in recs:
            if "run" in rec:
                run = common.Run(**rec["run"])
                assert (run.key, run.file) == (rec["key"], path), (path, rec["key"])
                runs += 1
    assert runs > 1800, runs  # 1,905 when the records became JSON Lines
    per_run = [
        p for p in RESULTS.rglob("*.json") if {"runs", "signals", "calibration"} & set(p.parts)
    ]
    assert not per_run, f"one file per record is back: {per_run[:3]}"


def test_no_weights_under_results():
    """A backbone worth keeping is bundled (ncfinetune/assets) or rebuilt by a command that
    benchmarks/README.md gives."""
    heavy = [
        p
        for p in RESULTS.rglob("*")
        if p.suffix in {".safetensors", ".pt", ".pth", ".bin", ".ckpt"}
    ]
    assert not heavy, heavy


def test_summary_tables_are_regenerated_byte_for_byte(tmp_path, monkeypatch):
    monkeypatch.setattr(summarize, "RESULTS", tmp_path)
    summarize.main()
    for name in ("summary.md", "summary.json"):
        assert (tmp_path / name).read_text() == (RESULTS / name).read_text(), name
    pngs = {p.name for p in tmp_path.glob("*.png")}
    assert pngs == {p.name for p in RESULTS.glob("small_data_*.png")}  # none stale
    md = (RESULTS / "summary.md").read_text()
    assert f"{summarize.load_records().__len__()} runs" in md
    for b in common.MAIN_BACKBONES:  # every main backbone has its learning rates and rows
        assert f"### {b} on fmnist59 (learning rates: linear probe " in md
        assert all(common.chosen_lr(b, t, m) for t in common.MAIN_TARGETS for m in common.METHODS)


def test_learning_rate_tables_are_regenerated_byte_for_byte(tmp_path):
    import lr_grid

    lr_grid.report(common.MAIN_BACKBONES, common.MAIN_TARGETS, tmp_path)
    for name in ("lr_grid.md", "lr_grid.json"):
        assert (tmp_path / name).read_text() == (RESULTS / name).read_text(), name
    assert "| chosen |" in (tmp_path / "lr_grid.md").read_text()


def test_budget_tables_are_regenerated_byte_for_byte(tmp_path):
    summary = budget.report(tmp_path)
    for name in ("budget.md", "budget.json"):
        committed = RESULTS / "budget" / name
        assert (tmp_path / name).read_text() == committed.read_text(), name
    assert {p.name for p in tmp_path.glob("*.png")} == {
        p.name for p in (RESULTS / "budget").glob("budget_*.png")
    }
    assert summary, "no budget records"


def test_ablation_tables_are_regenerated_byte_for_byte(tmp_path):
    import ablations

    rows = ablations.report(tmp_path)
    for name in ("ablations.md", "ablations.json"):
        assert (tmp_path / name).read_text() == (RESULTS / name).read_text(), name
    assert {r["backbone"] for r in rows} == {"resnet18", "vit_p4"}, rows


def test_mean_sd_is_the_sample_standard_deviation():
    assert common.mean_sd([1.0, 2.0, 3.0]) == (2.0, 1.0)  # ddof 1 (population sd: 0.816)
    assert common.mean_sd([5.0]) == (5.0, 0.0)
    with pytest.raises(ValueError, match="no values"):
        common.mean_sd([])


@pytest.mark.parametrize("name", common.MAIN_BACKBONES)
def test_a_few_records_reproduce_their_summary_cells(name):
    """A cell of the committed summary is the mean of its records' test accuracies."""
    data = json.loads((RESULTS / "summary.json").read_text())
    cells = {k: v for k, v in data["small_data"].items() if k.startswith(f"{name}/")}
    if not cells:
        pytest.skip(f"{name} is not a main backbone of the committed summary")
    recs, checked = summarize.load_records(), 0
    for key, table in sorted(cells.items()):
        b, t = key.split("/")
        for m, by_size in table.items():
            for n, cell in [kv for kv in by_size.items() if kv[1] is not None][:2]:
                rs = summarize.group(recs, b, t, m, int(n), common.chosen_lr(b, t, m))
                accs = [r["metrics"]["test_accuracy"] for r in rs]
                assert len(accs) == cell["n"]
                assert sum(accs) / len(accs) == pytest.approx(cell["mean"])
                checked += 1
    if not checked:
        pytest.skip(f"{name}: no cell of the committed summary has records yet")


# -- the READMEs quote the committed tables ------------------------------------------------------
NUM = r"\**([\d.]+) ± ([\d.]+)\**"  # a "mean ± sd" cell, bold or not


def _cell(summary: dict, key: str, method: str, size: int):
    cell = summary["small_data"][key][method][str(size)]
    assert cell is not None, f"{key}/{method}/{size}: no records for a number the README quotes"
    return round(100 * cell["mean"], 1), round(100 * cell["std"], 1)


def test_the_readmes_quote_the_small_data_table():
    """README.md's "SCL FT vs full FT" rows and benchmarks/README.md's table of the same are
    the committed summary's means (and sds), rounded to one decimal."""
    import re

    summary = json.loads((RESULTS / "summary.json").read_text())
    rows = re.findall(
        r"^\| (\w+) -> (\w+) \| ([\d.]+) vs ([\d.]+) \| ([\d.]+) vs ([\d.]+) \|$",
        (ROOT / "README.md").read_text(),
        flags=re.M,
    )
    assert len(rows) >= 4, rows
    for b, t, *quoted in rows:
        cells = [_cell(summary, f"{b}/{t}", m, n)[0] for n in (10, 100) for m in ("scl", "full")]
        assert [float(q) for q in quoted] == cells, (b, t)
    rows = re.findall(
        rf"^\| (\w+) \| (\w+) \| {NUM} \| {NUM} \| {NUM} \| {NUM} \|$",
        (ROOT / "benchmarks" / "README.md").read_text(),
        flags=re.M,
    )
    assert len(rows) >= 4, rows
    for b, t, *quoted in rows:
        cells = [
            x for n in (10, 100) for m in ("scl", "full") for x in _cell(summary, f"{b}/{t}", m, n)
        ]
        assert [float(q) for q in quoted] == cells, (b, t)


def test_the_benchmark_readme_quotes_the_budget_tables():
    """Every "backbone -> target[, N/class]" budget table in benchmarks/README.md (10 per class
    unless the header says otherwise): each cell is budget.json's (method names as in budget.md,
    less a parenthesis or "+ cache" note)."""
    import re

    table = json.loads((RESULTS / "budget" / "budget.json").read_text())
    text = (ROOT / "benchmarks" / "README.md").read_text()
    pattern = (
        r"^\| (\w+) -> (\w+)(?:, (\d+)/class)? \|((?: [\d.]+x \|)+)\n\|[-|:]+\|\n((?:\|.*\|\n)+)"
    )
    blocks = re.findall(pattern, text, re.M)
    assert len(blocks) >= 8, [b[:3] for b in blocks]  # 10 and 100 per class, 4 pairs each
    for b, t, n, header, body in blocks:
        budgets = [h.strip()[:-1] for h in header.split("|") if h.strip()]
        rec = table[f"{b}/{t}/{n or 10}"]
        for line in body.strip().splitlines():
            name, *cells = [c.strip() for c in line.strip("|").split("|")]
            name = re.sub(r" \(.*?\)| \+ cache", "", name)
            assert name in rec, f"{b}/{t}: {name!r} is not a method of budget.json"
            for budget_, cell in zip(budgets, cells, strict=True):
                got = rec[name].get(str(float(budget_)))
                m = re.fullmatch(NUM, cell)
                assert m and got, f"{b}/{t}/{name}/{budget_}x: {cell!r} vs {got}"
                assert (float(m[1]), float(m[2])) == (round(got["mean"], 1), round(got["sd"], 1)), (
                    b,
                    t,
                    name,
                    budget_,
                )
