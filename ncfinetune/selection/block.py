"""Which block to fine-tune (and at which learning rate), chosen on the downstream training data.

The paper's principle (seeds/002, section 3): fine-tune the block that makes the penultimate
features of the downstream training data most collapsed (lowest NC1); on small data the lowest
*training* NC1 can overfit (its Appendix C.2), so the default rule scores a held-out split.

Every selection makes one inference pass of the pretrained model over the training data and
reports, for each candidate block, the NC1 of its pooled output and the cross-validated accuracy
of a linear (ridge) classifier on that output (stage-wise linear evaluation, seeds/001). Then a
rule (``rule=``) picks the block:

- ``"probe"`` (default): a short fine-tune (``probe_steps`` = 10 SGD steps, batch 32, at
  ``lr``) of ``method`` at each candidate on 70% of the training data; the lowest penultimate
  NC1 on the held-out 30%.
- ``"probe_accuracy"``: the same probes; the highest held-out accuracy (ties: the lower
  held-out NC1).
- ``"middle"``: the fixed middle block (index ``n_blocks // 2``: resnet18 4, ViT-Tiny 6), or
  the deepest candidate before it when it is not a candidate. Measures nothing.
- ``"curve"``: the lowest NC1 of the block's own pooled output (the bottom of the layer-wise
  NC1 curve, paper Fig. 9/10).
- ``"linear"``: the highest cross-validated linear-probe accuracy on the block's pooled output;
  ties go to the deeper block.

With ``lr="auto"`` the learning rate is chosen with the block: the probe rules probe every
(block, lr) pair of ``lr_grid`` and pick the pair; the other rules sweep ``lr_grid`` on the
chosen block with the same short probes (highest held-out accuracy; ties: the lower held-out
NC1, then the larger lr). The test split is never an input.

The default candidates respect a parameter budget (``max_trainable_percent``, default 10%) and
are at most ``MAX_CANDIDATES`` = 3 blocks evenly spaced in depth (resnet18: 0, 2, 4; ViT-Tiny:
0, 6, 11). Every design choice (rule, probe lr) was measured leave one target out over 8
(backbone, target) pairs in ``benchmarks/selection_loto.py`` (results/selection_loto.md): the
default ``probe`` rule at lr 0.03 had a mean regret of 1.10 accuracy points against the best
candidate in hindsight, was on no pair more than 0.26 point below the fixed middle block and
1.77 points above it on average; no rule met every goal of the issue (see the README).
"""

from __future__ import annotations

import copy
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ncfinetune.backbones import get_adapter
from ncfinetune.backbones.base import arch_name
from ncfinetune.errors import ConfigError
from ncfinetune.tuning.features import collect_block_features
from ncfinetune.files import write_json
from ncfinetune.messages import warn_once
from ncfinetune.tuning.methods import method_class, method_config
from ncfinetune.metrics.collapse import nc1_or_none
from ncfinetune.tuning.prefix_cache import CacheTooLarge, PrefixCache, fill_shared, prefix_blocker
from ncfinetune.data.subsets import balanced_subset, validation_split
from ncfinetune.training.loop import PRECISIONS, evaluate_rows, train_steps
from ncfinetune.tuning.model import TunedModel, wrap

RULES = ("middle", "curve", "linear", "probe", "probe_accuracy")
PROBE_RULES = ("probe", "probe_accuracy")
DEFAULT_RULE = "probe"  # measured leave-one-target-out: benchmarks/results/selection_loto.md
LR_GRID = (0.1, 0.03)  # lr="auto" chooses among these (as measured: selection_loto.md)
PROBE_LR = 0.03  # the probes' lr by default: chosen leave-one-target-out over 0.1, 0.03, auto
PROBE_STEPS = 10  # per probe; as measured (benchmarks/results/selection_loto.md)
MAX_TRAINABLE_PERCENT = 10.0  # default parameter budget of the candidates
MAX_CANDIDATES = 3  # first, middle and deepest block within the budget
HELDOUT_FRACTION = 0.3
LINEAR_FOLDS = 5
PROBE_BATCH = 32


@dataclass
class CandidateRow:
    """One candidate block in a :class:`BlockSelection`.

    Attributes:
        index, name, channels: the block (see :func:`ncfinetune.list_blocks`).
        trainable_percent: % of the model's parameters trained by ``method`` at this block.
        nc1_block: NC1 of the block's pooled output (pretrained model, all the training data).
        linear_accuracy: cross-validated accuracy of a ridge linear classifier on that output.
        probes: short fine-tunes at this block, one per learning rate (key: the lr as text):
            held-out ``accuracy``, held-out penultimate ``nc1`` and ``seconds``.
    """

    index: int
    name: str
    channels: int
    trainable_percent: float
    nc1_block: float | None = None
    linear_accuracy: float | None = None
    probes: dict[str, dict[str, float | None]] = field(default_factory=dict)


@dataclass
class BlockSelection:
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

    def row(self, index: int) -> CandidateRow:
        return next(r for r in self.rows if r.index == index)

    def score(self, r: CandidateRow) -> float | None:
        """The quantity the rule chose by, for candidate ``r`` (None where not measured)."""
        if self.rule == "curve":
            return r.nc1_block
        if self.rule in ("linear", "middle"):
            return r.linear_accuracy
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
        }[self.rule]

    def table(self) -> str:
        """The report as aligned text, the chosen row marked with ``*``."""
        lrs = sorted({k for r in self.rows for k in r.probes}, key=float, reverse=True)
        head = f"   {'idx':>3}  {'block':<12} {'ch':>5} {'train %':>8} {'NC1 block':>10} {'linear acc':>11}"
        head += "".join(f" {'probe lr ' + k:>14}" for k in lrs)
        lines = [head]
        for r in self.rows:
            mark = "*" if r.index == self.chosen else " "
            nc = "-" if r.nc1_block is None else f"{r.nc1_block:.4f}"
            la = "-" if r.linear_accuracy is None else f"{100 * r.linear_accuracy:.1f}%"
            line = f" {mark} {r.index:>3}  {r.name:<12} {r.channels:>5} {r.trainable_percent:>7.2f}% {nc:>10} {la:>11}"
            for k in lrs:
                p = r.probes.get(k)
                line += f" {'-':>14}" if p is None else f" {100 * p['accuracy']:>13.1f}%"
            lines.append(line)
        if lrs:
            lines.append(
                "(probe columns: held-out accuracy after a "
                f"{self.probe_steps}-step fine-tune at that lr)"
            )
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

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def save_json(self, path: str | Path) -> Path:
        """Write the report as JSON (atomically)."""
        return write_json(path, self.to_dict(), indent=1)

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
        scale = 1 if self.rule in ("curve", "probe") else 100  # accuracies in %
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


def select_block_on_split(
    model: nn.Module,
    data: Any,
    transform: Any,
    rows: Sequence[int] | np.ndarray | None = None,
    *,
    max_images: int | None = None,
    seed: int = 0,
    **kwargs: Any,
) -> BlockSelection:
    """:func:`select_block` on rows of a loaded dataset's *training* split, decoded once.

    Used by ``recipes/select_block.py`` and ``recipes/finetune.py --block auto`` alike, so both
    give the choice :func:`select_block` gives on the same rows and seed.

    Args:
        model: as for :func:`select_block`.
        data: a ``ncfinetune.data.loaders.ImageData`` (``load_image_dataset``); only ``data.train`` is
            read.
        transform: a deterministic ``ncfinetune.data.loaders.build_transforms(model, augment=False)``.
        rows: training-split rows to select on (default: all).
        max_images: cap on the images used: a seeded class-balanced sample of ``rows``.
        seed, kwargs: passed to :func:`select_block` (rule, method, bn, lr, ...).
    """
    cache = _training_cache(data, transform, rows, max_images, seed)
    return select_block(model, cache, seed=seed, **kwargs)


def select_lr_on_split(
    model: nn.Module,
    data: Any,
    transform: Any,
    rows: Sequence[int] | np.ndarray | None = None,
    *,
    max_images: int | None = None,
    seed: int = 0,
    **kwargs: Any,
) -> LRSelection:
    """:func:`select_lr` on rows of a loaded dataset's *training* split (``--lr auto``); the
    arguments are those of :func:`select_block_on_split`."""
    cache = _training_cache(data, transform, rows, max_images, seed)
    return select_lr(model, cache, seed=seed, **kwargs)


def _training_cache(data, transform, rows, max_images, seed):
    from ncfinetune.data.loaders import TensorCache

    labels = data.labels("train")
    rows = np.arange(labels.size) if rows is None else np.asarray(rows)
    if max_images is not None and rows.size > max_images:
        rows = rows[balanced_subset(labels[rows], total=max_images, seed=seed)]
    return TensorCache.build(
        data.train,
        transform,
        image_column=data.image_column,
        label_column=data.label_column,
        indices=rows,
    )


def _as_fetch(data: Any) -> tuple[Any, np.ndarray]:
    """(fetch(list of rows) -> (x, y), all labels) for a (images, labels) pair or a dataset."""
    if isinstance(data, (tuple, list)) and len(data) == 2 and torch.is_tensor(data[0]):
        images, labels = data
        labels = torch.as_tensor(labels)
        if images.shape[0] != labels.shape[0]:
            raise ConfigError(
                f"train_data has {images.shape[0]} images but {labels.shape[0]} labels; "
                "pass (images N x C x H x W, labels N) of the same length."
            )

        def fetch(rows: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
            index = torch.as_tensor(rows, dtype=torch.long)
            return images.index_select(0, index), labels.index_select(0, index)

        return fetch, labels.numpy()
    if hasattr(data, "__getitems__") and hasattr(data, "labels"):  # e.g. data.TensorCache
        return data.__getitems__, np.asarray(data.labels)
    if hasattr(data, "__getitem__") and hasattr(data, "__len__"):

        def fetch(rows: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
            items = [data[i] for i in rows]
            return torch.stack([x for x, _ in items]), torch.as_tensor([int(y) for _, y in items])

        return fetch, np.asarray([int(data[i][1]) for i in range(len(data))])
    raise ConfigError(
        f"train_data of type {type(data).__name__} is not supported; pass (images, labels) "
        "tensors, a ncfinetune.data.loaders.TensorCache, or a map-style dataset of (image, label) pairs."
    )


def _trainable_percent(adapter, index: int) -> float:
    # layer and scl train the same modules (the skip has no parameters)
    model = adapter.model  # one adapter per call site: the generic one runs a dummy forward
    head = sum(p.numel() for m in adapter.classifier_modules() for p in m.parameters())
    block = sum(p.numel() for m in adapter.block_modules(index) for p in m.parameters())
    total = sum(p.numel() for p in model.parameters())
    return 100.0 * (head + block) / total


def _uses_skip(method: str) -> bool:
    """Whether ``method`` (a one-block method name) adds the SCL skip, so blocks must fit it."""
    cls = method_class(method)
    return cls.tunes_block and cls(block=0).uses_skip


def default_candidates(
    model: nn.Module,
    method: str = "scl",
    max_trainable_percent: float | None = MAX_TRAINABLE_PERCENT,
    max_candidates: int = MAX_CANDIDATES,
) -> list[int]:
    """The blocks :func:`select_block` considers by default: those that ``method`` can use (for
    scl, whose width fits the skip) within the parameter budget, at most ``max_candidates`` of
    them evenly spaced in depth (the first and the deepest always included)."""
    adapter = get_adapter(model)
    idx = [i for i in range(len(adapter.blocks)) if not _uses_skip(method) or _fits(adapter, i)]
    if max_trainable_percent is not None:
        idx = [i for i in idx if _trainable_percent(adapter, i) <= max_trainable_percent]
    if len(idx) > max_candidates:
        pick = np.unique(np.round(np.linspace(0, len(idx) - 1, max_candidates)).astype(int))
        idx = [idx[p] for p in pick]
    return idx


def min_per_class(
    rule: str, lr: float | str = "auto", heldout_fraction: float = HELDOUT_FRACTION
) -> int:
    """The fewest training samples per class ``rule`` (with ``lr``; rule ``"lr"``: the lr sweep
    alone) can work with: 2 for the
    curve and linear rules (NC1 and cross-validation need two samples of a class), and for the
    probe rules or ``lr="auto"`` enough to hold ``heldout_fraction`` of each class out (>= 1
    held out, >= 2 to fit)."""
    need = 1 if rule in ("middle", "lr") else 2
    if rule in PROBE_RULES or lr == "auto":
        f = heldout_fraction
        need = max(need, 3, int(np.ceil(1 / min(f, 1 - f))) + 1)
    return need


def select_block(
    model: nn.Module,
    train_data: Any,
    *,
    rule: str = DEFAULT_RULE,
    method: str = "scl",
    candidates: Sequence[int | str] | None = None,
    max_trainable_percent: float | None = MAX_TRAINABLE_PERCENT,
    lr: float | str = PROBE_LR,
    lr_grid: Sequence[float] = LR_GRID,
    heldout_fraction: float = HELDOUT_FRACTION,
    probe_steps: int = PROBE_STEPS,
    batch_size: int = PROBE_BATCH,
    bn: str | None = None,
    precision: str = "auto",
    seed: int = 0,
    probe_all: bool = False,
) -> BlockSelection:
    """Choose the block (and with ``lr="auto"`` the learning rate) to fine-tune.

    Args:
        model: the pretrained timm model with its downstream classifier (not modified: the
            probes train copies, starting from its classifier as it is: create the model under
            the same seed, as the recipes do, for the same choice).
        train_data: the downstream *training* data: (images, labels) tensors, a
            ``ncfinetune.data.loaders.TensorCache``, or a map-style dataset of (image tensor, label).
        rule: ``"middle"``, ``"curve"``, ``"linear"``, ``"probe"`` or ``"probe_accuracy"``
            (see the module docstring).
        method: ``"scl"`` or ``"layer"``: what will be fine-tuned (the probes train it; it also
            sets the trainable share and, for scl, which blocks fit the skip).
        candidates: block indices or names (default: :func:`default_candidates`).
        max_trainable_percent: parameter budget: drop candidates that would train more than
            this share (default 10%; None: no budget).
        lr: the learning rate of the probes (default 0.03, the best measured; pass the lr you
            will fine-tune with if it differs), or ``"auto"``: chosen from ``lr_grid`` with the
            block by short probes on held-out training rows (returned as ``.lr``).
        lr_grid: the learning rates ``lr="auto"`` chooses among.
        heldout_fraction: probes: stratified share of ``train_data`` held out.
        probe_steps, batch_size, bn, seed: the probe fine-tunes (SGD, cosine schedule).
        precision: probes: ``"auto"`` (bf16 autocast where the device computes it natively, as
            the finetune recipe's default), ``"bf16"`` or ``"no"``.
        probe_all: probe every (candidate, lr) pair whatever the rule (for benchmarks).

    Returns:
        A :class:`BlockSelection`; print it for the table, ``.save()`` for JSON + plot.

    Raises:
        ConfigError: unknown rule or method, bad lr, an empty candidate list, a budget no
            candidate meets, or fewer training samples per class than the rule needs (the
            message names the minimum, see :func:`min_per_class`).
    """
    t0 = time.perf_counter()
    if rule not in RULES:
        raise ConfigError(f"rule {rule!r} is not one of {', '.join(RULES)}.")
    if not method_class(method).tunes_block:
        raise ConfigError(
            f"method {method!r} does not tune one block, so no block can be selected for it; "
            "use a one-block method such as 'scl' or 'layer'."
        )
    if not (lr == "auto" or _positive(lr)):
        raise ConfigError(f"lr must be 'auto' or a positive number, got {lr!r}.")
    if lr == "auto":
        _check_grid(lr_grid)
    _check_probe(probe_steps, batch_size)
    precision = _resolve_precision(model, precision)
    adapter = get_adapter(model)
    names = adapter.block_names
    if candidates is None:
        idx = default_candidates(model, method, max_trainable_percent)
        if not idx:
            allowed = [i for i in range(len(names)) if not _uses_skip(method) or _fits(adapter, i)]
            least = min(allowed, key=lambda i: _trainable_percent(adapter, i))
            raise ConfigError(
                f"no block of {arch_name(model)} trains at most {max_trainable_percent}% of the "
                f"parameters with {method}; the smallest is block {least} ({names[least]}) at "
                f"{_trainable_percent(adapter, least):.2f}%. Raise max_trainable_percent or pass "
                "candidates."
            )
    else:
        idx = _explicit_candidates(model, adapter, method, candidates, max_trainable_percent)
    rows = [
        CandidateRow(i, names[i], adapter.block_channels(i), _trainable_percent(adapter, i))
        for i in idx
    ]
    fetch, labels = _as_fetch(train_data)
    _check_samples(labels, rule, lr, heldout_fraction)
    all_rows = np.arange(labels.size)

    # one pass of the pretrained model: NC1 and a linear probe of every candidate's output
    was_training = model.training
    model.eval()
    feats = collect_block_features(
        model,
        (fetch(all_rows[s : s + 256].tolist()) for s in range(0, labels.size, 256)),
    )
    model.train(was_training)
    curve = [
        {
            "index": i,
            "name": n,
            "channels": feats.channels[i],
            "nc1": nc1_or_none(feats.features[n], feats.labels),
        }
        for i, n in enumerate(feats.names[:-1])
    ]
    y = feats.labels.numpy()
    measurable = np.unique(y, return_counts=True)[1].min() >= 2  # else NC1 is 0, CV impossible
    for r in rows:
        if measurable:
            r.nc1_block = curve[r.index]["nc1"]
            r.linear_accuracy = linear_probe_accuracy(feats.features[r.name].numpy(), y, seed)
    images = labels.size

    probe = _Prober(
        model, fetch, labels, method, bn, seed, heldout_fraction, probe_steps, batch_size, precision
    )
    grid = [float(v) for v in lr_grid] if lr == "auto" else [float(lr)]
    if rule in PROBE_RULES or probe_all:
        images += probe.run(rows, grid)
    chosen, chosen_lr, reason = choose(rule, rows, len(names), probe_steps)
    if lr == "auto" and chosen_lr is None:
        row = next(r for r in rows if r.index == chosen)
        if not row.probes:
            images += probe.run([row], grid)
        chosen_lr, lr_reason = choose_lr(row)
        reason += " " + lr_reason
    return BlockSelection(
        rule=rule,
        method=method,
        arch=arch_name(model),
        rows=rows,
        chosen=chosen,
        chosen_name=names[chosen],
        lr=chosen_lr if lr == "auto" else None,
        reason=reason,
        seconds=time.perf_counter() - t0,
        images_processed=int(images),
        probe_steps=probe_steps,
        num_blocks=len(names),
        curve=curve,
    )


def choose(
    rule: str, rows: Sequence[CandidateRow], num_blocks: int, probe_steps: int = PROBE_STEPS
) -> tuple[int, float | None, str]:
    """Apply ``rule`` to measured candidate rows: (chosen block, chosen lr or None, reason).

    The probe rules pick a (block, lr) pair among the probes measured; the other rules pick a
    block only. The one place a rule is decided: :func:`select_block` and the benchmarks both
    call it.
    """
    if rule == "middle":
        mid = num_blocks // 2
        before = [r for r in rows if r.index <= mid]
        best = max(before, key=lambda r: r.index) if before else min(rows, key=lambda r: r.index)
        return (
            best.index,
            None,
            (
                f"The fixed middle block (index {mid} of {num_blocks})"
                + (
                    "."
                    if best.index == mid
                    else " is not a candidate; the deepest candidate before it."
                )
            ),
        )
    if rule == "curve":
        scored = [r for r in rows if r.nc1_block is not None]
        if not scored:
            raise ConfigError("rule 'curve': no candidate has a finite NC1 on this data.")
        best = min(scored, key=lambda r: (r.nc1_block, -r.index))
        return (
            best.index,
            None,
            (
                f"Its pooled output has the lowest NC1 on the training data ({best.nc1_block:.3f}) "
                f"among {len(rows)} candidates."
            ),
        )
    if rule == "linear":
        best = max(rows, key=lambda r: (r.linear_accuracy or 0.0, r.index))
        return (
            best.index,
            None,
            (
                f"A linear probe on its pooled output has the highest cross-validated accuracy "
                f"({100 * (best.linear_accuracy or 0):.1f}%) among {len(rows)} candidates "
                "(ties: the deeper block)."
            ),
        )
    pairs = [(r, lr, p) for r in rows for lr, p in r.probes.items()]
    if not pairs:
        raise ConfigError(f"rule {rule!r} needs probes; none were measured.")
    if rule == "probe":
        r, lr, p = min(pairs, key=lambda t: (t[2]["nc1"] is None, t[2]["nc1"] or 0.0, -float(t[1])))
        why = (
            f"the lowest held-out penultimate NC1 ({p['nc1']:.3f})"
            if p["nc1"] is not None
            else "no finite NC1 anywhere"
        )
    else:
        r, lr, p = max(pairs, key=lambda t: _accuracy_key(t[2], t[1]))
        why = (
            f"the highest held-out accuracy ({100 * p['accuracy']:.1f}%; ties: lower held-out NC1)"
        )
    return (
        r.index,
        float(lr),
        (
            f"After a {probe_steps}-step probe at lr {lr}, {why} among {len(pairs)} (block, lr) pairs."
        ),
    )


def choose_lr(row: CandidateRow) -> tuple[float, str]:
    """The lr of ``row``'s probes with the highest held-out accuracy (ties: the lower held-out
    NC1, then the larger lr), and why."""
    lr, p = max(row.probes.items(), key=lambda kv: _accuracy_key(kv[1], kv[0]))
    return float(lr), (
        f"Learning rate {lr}: the highest held-out accuracy ({100 * p['accuracy']:.1f}%) of "
        f"short probes at {', '.join(row.probes)}."
    )


def _accuracy_key(p: dict, lr: str) -> tuple:
    return (p["accuracy"], p["nc1"] is not None, -(p["nc1"] or 0.0), float(lr))


def linear_probe_accuracy(features: np.ndarray, labels: np.ndarray, seed: int = 0) -> float:
    """Stratified k-fold (k = min(5, smallest class)) accuracy of a ridge linear classifier on
    standardised features: stage-wise linear evaluation in closed form (milliseconds a block)."""
    from sklearn.linear_model import RidgeClassifier
    from sklearn.model_selection import StratifiedKFold, cross_val_score
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    k = int(min(LINEAR_FOLDS, np.unique(labels, return_counts=True)[1].min()))
    folds = StratifiedKFold(n_splits=k, shuffle=True, random_state=seed)
    clf = make_pipeline(StandardScaler(), RidgeClassifier(alpha=1.0))
    return float(cross_val_score(clf, features.astype(np.float64), labels, cv=folds).mean())


class _Prober:
    """Short fine-tunes of copies of the model on the fit part, scored on the held-out part;
    prefix caches are shared across blocks where the frozen prefix is cacheable."""

    def __init__(self, model, fetch, labels, method, bn, seed, fraction, steps, batch, precision):
        self.model, self.fetch, self.labels = model, fetch, labels
        self.method, self.bn, self.seed = method, bn, seed
        self.fraction, self.steps, self.batch, self.precision = fraction, steps, batch, precision
        self.fit = self.held = None
        self.caches: dict[int | None, PrefixCache | None] = {}
        self.frozen: nn.Module | None = None  # one copy serves every cache: only its prefix runs
        self.images = 0

    def run(self, rows: list[CandidateRow], grid: list[float]) -> int:
        """Probe every (row, lr) into ``row.probes``; return the images processed."""
        before = self.images
        for r in rows:
            for lr in grid:
                r.probes[f"{lr:g}"] = self.probe(r.index, lr)
        return self.images - before

    def probe(self, block: int | None, lr: float) -> dict[str, float | None]:
        """One short fine-tune of ``method`` at ``block`` (None: linear/full) at ``lr``."""
        from ncfinetune.recipes.engine import is_conv_net

        if self.fit is None:
            self.fit, self.held = _holdout(self.labels, self.fraction, self.seed)
        if block not in self.caches:
            self.caches[block] = self._cache(block)
        cache = self.caches[block]
        t1 = time.perf_counter()
        torch.manual_seed(self.seed)
        tuned = wrap(copy.deepcopy(self.model), self.method, block, bn=self.bn)
        if cache is None and is_conv_net(self.model):
            tuned.to(memory_format=torch.channels_last)
        try:
            train_steps(
                tuned,
                self.fetch,
                self.fit,
                steps=self.steps,
                batch_size=self.batch,
                lr=lr,
                seed=self.seed,
                prefix=cache,
                precision=self.precision,
            )
            ev = evaluate_rows(tuned, self.fetch, self.held, prefix=cache, precision=self.precision)
            acc, nc = ev["accuracy"], nc1_or_none(ev["features"], ev["labels"])
        except FloatingPointError:  # diverged at this lr: ranks last
            acc, nc = 0.0, None
        self.images += self.steps * min(self.batch, self.fit.size) + self.held.size
        return {"accuracy": acc, "nc1": nc, "seconds": time.perf_counter() - t1}

    def _cache(self, block: int | None) -> PrefixCache | None:
        """A filled prefix cache for probes at ``block``, or None where not legal."""
        if self.frozen is None:
            self.frozen = copy.deepcopy(self.model)
        # one frozen copy serves every block's cache: these wrappers only run its prefix
        config = method_config(self.method, block=block, bn=self.bn)
        tuned = TunedModel(self.frozen, config, owns_model=False)
        if prefix_blocker(tuned) is not None:
            return None
        cache = PrefixCache(tuned, self.fetch)
        try:
            self.images += fill_shared([cache], np.arange(self.labels.size))
        except CacheTooLarge as err:
            warn_once(f"block selection: {err} The probes run without the prefix cache.")
            return None
        return cache


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


def select_lr(
    model: nn.Module,
    train_data: Any,
    *,
    method: str,
    block: int | str | None = None,
    lr_grid: Sequence[float] = LR_GRID,
    heldout_fraction: float = HELDOUT_FRACTION,
    probe_steps: int = PROBE_STEPS,
    batch_size: int = PROBE_BATCH,
    bn: str | None = None,
    precision: str = "auto",
    seed: int = 0,
) -> LRSelection:
    """Choose the learning rate of any method (``--lr auto``) by the short probes of
    :func:`select_block`: ``probe_steps`` SGD steps at each lr of ``lr_grid`` on a stratified
    part of the training data, the highest accuracy on the held-out rest (ties: the lower
    held-out NC1, then the larger lr). The test split is never an input.

    Raises:
        ConfigError: bad lr_grid or probe settings, or fewer training samples per class than
            holding some out needs (the message names the minimum).
    """
    t0 = time.perf_counter()
    method_class(method)  # a clear error for an unknown name
    _check_grid(lr_grid)
    _check_probe(probe_steps, batch_size)
    fetch, labels = _as_fetch(train_data)
    _check_samples(labels, "lr", "auto", heldout_fraction)
    index = None if block is None else get_adapter(model).resolve(block)
    prober = _Prober(
        model,
        fetch,
        labels,
        method,
        bn,
        seed,
        heldout_fraction,
        probe_steps,
        batch_size,
        _resolve_precision(model, precision),
    )
    probes = {f"{v:g}": prober.probe(index, float(v)) for v in lr_grid}
    lr, reason = choose_lr(CandidateRow(-1, "", 0, 0.0, probes=probes))
    return LRSelection(
        method, index, lr, probes, reason, time.perf_counter() - t0, prober.images, probe_steps
    )


def _positive(v: Any) -> bool:
    """A finite positive number (not a bool)."""
    return (
        isinstance(v, (int, float)) and not isinstance(v, bool) and bool(np.isfinite(v)) and v > 0
    )


def _check_grid(lr_grid: Sequence[float]) -> None:
    if len(lr_grid) == 0 or not all(_positive(v) for v in lr_grid):
        raise ConfigError(
            f"lr_grid must hold positive learning rates, got {list(lr_grid)}; e.g. (0.1, 0.03)."
        )


def _check_probe(probe_steps: int, batch_size: int) -> None:
    for name, v in (("probe_steps", probe_steps), ("batch_size", batch_size)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ConfigError(f"{name} must be an integer >= 1, got {v!r}.")


def _resolve_precision(model: nn.Module, precision: str) -> str:
    from ncfinetune.recipes.engine import resolve_mixed_precision

    device = next(model.parameters()).device.type
    if precision == "auto":
        return resolve_mixed_precision("auto", device)
    if precision not in PRECISIONS:
        raise ConfigError(f"precision {precision!r} is not one of auto, {', '.join(PRECISIONS)}.")
    return precision


def _explicit_candidates(model, adapter, method, candidates, max_trainable_percent) -> list[int]:
    names = adapter.block_names
    if len(candidates) == 0:
        raise ConfigError(
            f"candidates is empty; pass block indices or names of {arch_name(model)} "
            f"(0..{len(names) - 1}) or None for the default candidates."
        )
    idx = sorted({adapter.resolve(c) for c in candidates})
    wide = [i for i in idx if _uses_skip(method) and not _fits(adapter, i)]
    if wide:
        raise ConfigError(
            f"SCL skip cannot fit candidate block(s) "
            f"{', '.join(f'{i} ({names[i]}, {adapter.block_channels(i)} channels)' for i in wide)}: "
            f"wider than the {adapter.feature_dim} penultimate features. Drop them, or use "
            "method='layer'."
        )
    if max_trainable_percent is not None:
        over = [i for i in idx if _trainable_percent(adapter, i) > max_trainable_percent]
        if len(over) == len(idx):
            least = min(idx, key=lambda i: _trainable_percent(adapter, i))
            raise ConfigError(
                f"no candidate block trains at most {max_trainable_percent}% of the parameters; "
                f"the smallest is block {least} ({names[least]}) at "
                f"{_trainable_percent(adapter, least):.2f}%. Raise max_trainable_percent "
                "(None: no budget) or add candidates."
            )
        idx = [i for i in idx if i not in over]
    return idx


def _check_samples(labels: np.ndarray, rule: str, lr: float | str, fraction: float) -> None:
    if not 0 < fraction < 1:
        raise ConfigError(f"heldout_fraction must be in (0, 1), got {fraction}.")
    classes, counts = np.unique(labels, return_counts=True)
    if classes.size < 2:
        raise ConfigError(
            f"block selection needs at least 2 classes in the training data, got {classes.size}."
        )
    need = min_per_class(rule, lr, fraction)
    if counts.min() < need:
        worst = classes[counts.argmin()]
        why = (
            "to hold some out for the probes"
            if need > 2
            else "(NC1 and cross-validation need two samples of a class)"
        )
        what = "lr 'auto'" if rule == "lr" else f"rule {rule!r} with lr {lr!r}"
        raise ConfigError(
            f"class {worst} has {counts.min()} training samples; {what} "
            f"needs at least {need} per class {why}. Use more data"
            + (", rule='curve' or 'linear' with a fixed lr" if need > 2 and rule != "lr" else "")
            + (", or rule='middle' with a fixed lr" if rule != "middle" else "")
            + "."
        )


def _fits(adapter, index: int) -> bool:
    return adapter.block_channels(index) <= adapter.feature_dim


def _holdout(labels: np.ndarray, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Stratified (fit, held-out) rows; the caller checked :func:`min_per_class`."""
    return validation_split(labels, fraction, seed=seed)
