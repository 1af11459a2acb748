"""What a selection reports: one row per candidate block, the choice and why, as a table,
JSON and a plot (:class:`BlockSelection`), and the lr sweep of ``--lr auto``
(:class:`LRSelection`)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from ncfinetune.files import write_json


@dataclass
class CandidateRow:
    """One candidate block in a :class:`BlockSelection`.

    Attributes:
        index, name, channels: the block (see :func:`ncfinetune.list_blocks`).
        trainable_percent: % of the model's parameters trained by ``method`` at this block.
        nc1_block: NC1 of the block's pooled output (pretrained model, all the training data).
        linear_accuracy: cross-validated accuracy of a ridge linear classifier on that output.
        recall_at_1: leave-one-out nearest-neighbour (cosine) retrieval on that output (R@1).
        mlp_accuracy, mlp_gap: held-out accuracy of an MLP probe on that output, and its lead
            over a linear probe trained the same way (:func:`ncfinetune.selection.mlp_gap`).
        probes: short fine-tunes at this block, one per learning rate (key: the lr as text):
            held-out ``accuracy``, held-out penultimate ``nc1`` and ``seconds``.
    """

    index: int
    name: str
    channels: int
    trainable_percent: float
    nc1_block: float | None = None
    linear_accuracy: float | None = None
    recall_at_1: float | None = None
    mlp_accuracy: float | None = None
    mlp_gap: float | None = None
    probes: dict[str, dict[str, float | None]] = field(default_factory=dict)


class JsonReport:
    """A dataclass report written as JSON: ``to_dict`` (override to add fields) and
    ``save_json`` (atomic), shared by :class:`BlockSelection` and ``MethodPlan``."""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def save_json(self, path: str | Path) -> Path:
        """Write the report as JSON (atomically)."""
        return write_json(path, self.to_dict(), indent=1)


@dataclass
class BlockSelection(JsonReport):
    """The result of :func:`select_block`: one row per candidate, the choice and why."""

    rule: str
    method: str
    arch: str
    rows: list[CandidateRow]
    chosen: int
    chosen_name: str
    lr: float | None  # the chosen learning rate (None: lr was given, not chosen)
    reason: str
    seconds: float
    images_processed: int
    probe_steps: int
    num_blocks: int
    curve: list[dict] = field(default_factory=list)  # every block's NC1, for the plot
    budget_note: str | None = None  # no block fitted the budget: what it was raised to

    def row(self, index: int) -> CandidateRow:
        return next(r for r in self.rows if r.index == index)

    def score(self, r: CandidateRow) -> float | None:
        """The quantity the rule chose by, for candidate ``r`` (None where not measured)."""
        if self.rule == "curve":
            return r.nc1_block
        if self.rule in ("linear", "middle"):
            return r.linear_accuracy
        if self.rule in ("recall", "mlp"):
            return r.recall_at_1 if self.rule == "recall" else r.mlp_accuracy
        key = "nc1" if self.rule == "probe" else "accuracy"
        vals = [p[key] for p in r.probes.values() if p.get(key) is not None]
        if not vals:
            return None
        return min(vals) if self.rule == "probe" else max(vals)

    @property
    def score_name(self) -> str:
        return {
            "curve": "NC1 of the block output (lower chooses)",
            "linear": "linear-probe CV accuracy, % (higher chooses)",
            "middle": "linear-probe CV accuracy, % (reported; the middle rule measures nothing)",
            "probe": "probe held-out NC1, best lr (lower chooses)",
            "probe_accuracy": "probe held-out accuracy, %, best lr (higher chooses)",
            "recall": "R@1 of the block output, % (higher chooses)",
            "mlp": "MLP-probe held-out accuracy, % (higher chooses)",
        }[self.rule]

    def table(self) -> str:
        """The report as aligned text, the chosen row marked with ``*``."""
        lrs = sorted({k for r in self.rows for k in r.probes}, key=float, reverse=True)
        diag = any(r.recall_at_1 is not None or r.mlp_gap is not None for r in self.rows)
        head = f"   {'idx':>3}  {'block':<12} {'ch':>5} {'train %':>8} {'NC1 block':>10} {'linear acc':>11}"
        head += f" {'R@1':>6} {'MLP gap':>8}" if diag else ""
        head += "".join(f" {'probe lr ' + k:>14}" for k in lrs)
        lines = [head]
        for r in self.rows:
            mark = "*" if r.index == self.chosen else " "
            nc = "-" if r.nc1_block is None else f"{r.nc1_block:.4f}"
            la = "-" if r.linear_accuracy is None else f"{100 * r.linear_accuracy:.1f}%"
            r1 = "-" if r.recall_at_1 is None else f"{100 * r.recall_at_1:.1f}%"
            gap = "-" if r.mlp_gap is None else f"{100 * r.mlp_gap:+.1f}"
            line = f" {mark} {r.index:>3}  {r.name:<12} {r.channels:>5} {r.trainable_percent:>7.2f}% {nc:>10} {la:>11}"
            line += f" {r1:>6} {gap:>8}" if diag else ""
            for k in lrs:
                p = r.probes.get(k)
                line += f" {'-':>14}" if p is None else f" {100 * p['accuracy']:>13.1f}%"
            lines.append(line)
        notes = ["R@1: nearest-neighbour retrieval on the block output; MLP gap: MLP-probe minus "
                 "linear-probe held-out accuracy, points"] if diag else []  # fmt: skip
        if lrs:
            notes.append(
                f"probe columns: held-out accuracy after a {self.probe_steps}-step fine-tune "
                "at that lr"
            )
        if notes:
            lines.append(f"({'; '.join(notes)})")
        if self.budget_note:
            lines.append(self.budget_note)
        lr = "" if self.lr is None else f", lr {self.lr:g}"
        lines.append(
            f"chosen: block {self.chosen} ({self.chosen_name}){lr}. {self.reason} "
            f"Cost: {self.seconds:.1f} s, {self.images_processed:,} images processed."
        )
        return "\n".join(lines)

    def __str__(self) -> str:
        return f"block selection for {self.method} FT of {self.arch}, rule {self.rule!r}\n" + (
            self.table()
        )

    def save(self, output_dir: str | Path) -> tuple[Path, Path]:
        """Write ``block_selection.json`` and ``block_selection.png`` under ``output_dir``."""
        out = Path(output_dir)
        return self.save_json(out / "block_selection.json"), self.plot(out / "block_selection.png")

    def plot(self, path: str | Path) -> Path:
        """Left: the quantity the rule chose by, per candidate, the choice marked. Right:
        accuracy against trainable share for the candidates (linear probe; probe fine-tunes at
        the chosen lr where measured)."""
        from ncfinetune.plotting import new_figure, save_figure

        fig, (a, b) = new_figure(1, 2, figsize=(11, 4))
        xs = [r.index for r in self.rows]
        scale = 1 if self.rule in ("curve", "probe") else 100  # accuracies (and R@1) in %
        ys = [None if (v := self.score(r)) is None else scale * v for r in self.rows]
        ok = [(x, y) for x, y in zip(xs, ys, strict=True) if y is not None]
        if ok:
            a.plot(*zip(*ok, strict=True), "o-", color="C0")
        chosen = self.score(self.row(self.chosen))
        if chosen is not None:
            chosen *= scale
            a.plot([self.chosen], [chosen], "r*", ms=16, label=f"chosen: block {self.chosen}")
        else:
            a.axvline(self.chosen, color="r", ls="--", label=f"chosen: block {self.chosen}")
        if self.rule == "curve":
            a.set_yscale("log")
        a.set_xticks(xs, [f"{r.index}\n{r.name}" for r in self.rows], fontsize=7)
        a.set_xlabel("candidate block")
        a.set_ylabel(self.score_name, fontsize=8)
        a.legend(fontsize=8)
        a.set_title(
            f"{self.arch}: rule {self.rule!r} chose block {self.chosen} ({self.chosen_name})",
            fontsize=9,
        )
        share = [r.trainable_percent for r in self.rows]
        lin = [r.linear_accuracy for r in self.rows]
        if any(v is not None for v in lin):
            b.plot(share, [100 * (v or 0) for v in lin], "s-", label="linear probe (CV)")
        key = None if self.lr is None else f"{self.lr:g}"
        probe = [r.probes.get(key, {}).get("accuracy") for r in self.rows] if key else []
        if any(v is not None for v in probe):
            pts = [(s, 100 * v) for s, v in zip(share, probe, strict=True) if v is not None]
            b.plot(*zip(*pts, strict=True), "o-", label=f"probe fine-tune, lr {key} (held-out)")
        c = self.row(self.chosen)
        b.axvline(c.trainable_percent, color="r", ls="--", label=f"chosen: block {self.chosen}")
        b.set_xlabel("trainable parameters (%)")
        b.set_ylabel("accuracy (%)")
        b.legend(fontsize=8)
        b.set_title("accuracy against trainable share (training data only)", fontsize=9)
        return save_figure(fig, path)


@dataclass
class LRSelection:
    """The result of :func:`select_lr`: the probes per learning rate, the choice and why."""

    method: str
    block: int | None
    lr: float
    probes: dict[str, dict[str, float | None]]
    reason: str
    seconds: float
    images_processed: int
    probe_steps: int

    def __str__(self) -> str:
        lines = [
            f"learning rate for {self.method} FT"
            + ("" if self.block is None else f" at block {self.block}")
            + ":"
        ]
        for k, p in self.probes.items():
            mark = "*" if float(k) == self.lr else " "
            lines.append(
                f" {mark} lr {k:>8}: held-out accuracy {100 * p['accuracy']:.1f}% after "
                f"{self.probe_steps} steps"
            )
        lines.append(f"{self.reason} Cost: {self.seconds:.1f} s, {self.images_processed:,} images.")
        return "\n".join(lines)
