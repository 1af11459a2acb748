"""The committed benchmark tables are made from the committed run records, and nothing else.

``summarize.py`` and ``budget.py report`` run here on the records under
``benchmarks/results/runs`` (as a fresh clone has them) and write into a temporary folder; the
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


def test_records_are_compact_and_under_the_size_cap():
    files = sorted((RESULTS / "runs").rglob("*.json"))
    assert len(files) > 500, len(files)
    total = sum(p.stat().st_size for p in files)
    assert total < 20 * 2**20, f"{total / 2**20:.1f} MiB of records (cap 20 MiB)"
    for p in files[::50]:  # compact: one line, no indentation
        text = p.read_text()
        assert text.count("\n") <= 1 and json.loads(text)["run"], p


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
