"""Which block to fine-tune, chosen from neural collapse on the downstream training data.

The paper's principle (seeds/002, section 3): fine-tune the block that makes the penultimate
features of the downstream training data most collapsed (lowest NC1); on small data the lowest
*training* NC1 can overfit (its Appendix C.2), so the probe rules score a held-out split.

Rules (``rule=``):

- ``"curve"`` (zero training): one inference pass of the pretrained model over the training
  data; pick the candidate whose own pooled output has the lowest NC1 (the bottom of the
  layer-wise NC1 curve, paper Fig. 9/10). Cost: one forward pass.
- ``"probe"``: for each candidate, a short fine-tune (``probe_steps`` SGD steps) of the model
  wrapped with ``method`` at that block on a stratified part of the training data; pick the
  lowest penultimate NC1 on the held-out rest. Cost: candidates x probe_steps steps plus
  evaluation, reported in the result.
- ``"probe_accuracy"``: the same probes, picking the highest held-out accuracy; with a few
  held-out images per class ties are common, and among tied candidates the lowest held-out NC1
  wins.

The test split is never an input: selection sees only the training data it is given.

Default: ``"probe_accuracy"`` with 15 probe steps, the rule with the lowest measured regret
(``benchmarks/selection_regret.py``, SCL FT, 36 selections over resnet18 and ViT-Tiny, two
targets, 10-100 images per class, 3 seeds): mean regret 0.95 accuracy points against the best
block in hindsight, at 23% of the time of one 150-step full fine-tuning run. ``"probe"`` with
the same probes: 1.35 points. 50-step probes were no better (1.52 and 1.38 points) at 70% of
a run; 10-step probes were worse (1.85 and 1.78 points) at 21-22%. The NC1 tie-break was
chosen after the 15-step records had been seen (by index instead: 1.07 points), so 0.95 is an
optimistic figure. ``"curve"`` costs about 2% of a run and was nearly exact on resnet18 (mean
regret 0.05 points) but poor on the ViT (6.22 points), whose best block is the first and
least collapsed: pass ``rule="curve"`` for a conv net when selection time matters more.
"""

from __future__ import annotations

import copy
import json
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ncfinetune._warn import warn_once
from ncfinetune.backbones import get_adapter
from ncfinetune.backbones.base import _arch_name
from ncfinetune.errors import ConfigError
from ncfinetune.features import collect_block_features, plot_layerwise_nc1
from ncfinetune.metrics import nc1_or_none
from ncfinetune.prefix_cache import CacheTooLarge, PrefixCache, fill_shared, prefix_blocker
from ncfinetune.subsets import balanced_subset, validation_split
from ncfinetune.training import evaluate_rows, train_steps
from ncfinetune.tuning import wrap

RULES = ("curve", "probe", "probe_accuracy")
PROBE_STEPS = 15  # per candidate; as measured (benchmarks/results/selection_regret.md)
DEFAULT_RULE = "probe_accuracy"


@dataclass
class CandidateRow:
    """One candidate block in a :class:`BlockSelection`.

    Attributes:
        index, name, channels: the block (see :func:`ncfinetune.list_blocks`).
        trainable_percent: % of the model's parameters trained by ``method`` at this block.
        nc1_block: NC1 of the block's pooled output of the pretrained model on all the data.
        nc1_train, nc1_heldout, heldout_accuracy: probe rules only: penultimate NC1 after the
            probe on its training part (a class-balanced sample as large as the held-out part)
            and on the held-out part, and its held-out accuracy.
        probe_seconds: wall time of this candidate's probe (training + evaluation).
    """

    index: int
    name: str
    channels: int
    trainable_percent: float
    nc1_block: float | None = None
    nc1_train: float | None = None
    nc1_heldout: float | None = None
    heldout_accuracy: float | None = None
    probe_seconds: float | None = None


@dataclass
class BlockSelection:
    """The result of :func:`select_block`: one row per candidate, the choice and why."""

    rule: str
    method: str
    arch: str
    rows: list[CandidateRow]
    chosen: int
    chosen_name: str
    reason: str
    seconds: float
    images_processed: int
    curve: list[dict] = field(default_factory=list)  # every block's NC1, for the plot

    def table(self) -> str:
        """The report as aligned text, the chosen row marked with ``*``."""
        cols = [("nc1_block", "NC1 block")]
        if self.rule != "curve":
            cols += [
                ("nc1_train", "NC1 train"),
                ("nc1_heldout", "NC1 held-out"),
                ("heldout_accuracy", "acc held-out"),
            ]
        head = f"   {'idx':>3}  {'block':<12} {'ch':>5} {'train %':>8}" + "".join(
            f" {t:>13}" for _, t in cols
        )
        lines = [head]
        for r in self.rows:
            mark = "*" if r.index == self.chosen else " "
            vals = []
            for key, _ in cols:
                v = getattr(r, key)
                vals.append(
                    f" {'-':>13}"
                    if v is None
                    else f" {100 * v:>12.1f}%"
                    if key == "heldout_accuracy"
                    else f" {v:>13.4f}"
                )
            lines.append(
                f" {mark} {r.index:>3}  {r.name:<12} {r.channels:>5} "
                f"{r.trainable_percent:>7.2f}%" + "".join(vals)
            )
        lines.append(
            f"chosen: block {self.chosen} ({self.chosen_name}). {self.reason} "
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
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(path.suffix + ".tmp")
        tmp.write_text(json.dumps(self.to_dict(), indent=1) + "\n")
        tmp.replace(path)
        return path

    def save(self, output_dir: str | Path) -> tuple[Path, Path]:
        """Write ``block_selection.json`` and ``block_selection.png`` under ``output_dir``."""
        out = Path(output_dir)
        return self.save_json(out / "block_selection.json"), self.plot(out / "block_selection.png")

    def plot(self, path: str | Path) -> Path:
        """NC1 over depth of the pretrained model (log scale) with the chosen block marked."""
        return plot_layerwise_nc1(
            {"pretrained, training data": self.curve},
            path,
            title=f"{self.arch}: {self.rule} rule chose index {self.chosen} ({self.chosen_name}), "
            f"plotted as block {self.chosen + 1}",
            mark=self.chosen,
        )


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

    Args:
        model: as for :func:`select_block`.
        data: a ``ncfinetune.data.ImageData`` (``load_image_dataset``); only ``data.train`` is
            read.
        transform: a deterministic ``ncfinetune.data.build_transforms(model, augment=False)``.
        rows: training-split rows to select on (default: all).
        max_images: cap on the images used: a seeded class-balanced sample of ``rows``.
        seed, kwargs: passed to :func:`select_block` (rule, method, bn, ...).
    """
    from ncfinetune.data import TensorCache

    labels = data.labels("train")
    rows = np.arange(labels.size) if rows is None else np.asarray(rows)
    if max_images is not None and rows.size > max_images:
        rows = rows[balanced_subset(labels[rows], total=max_images, seed=seed)]
    cache = TensorCache.build(
        data.train,
        transform,
        image_column=data.image_column,
        label_column=data.label_column,
        indices=rows,
    )
    return select_block(model, cache, seed=seed, **kwargs)


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
        "tensors, a ncfinetune.data.TensorCache, or a map-style dataset of (image, label) pairs."
    )


def _trainable_percent(model: nn.Module, index: int) -> float:
    # layer and scl train the same modules (the skip has no parameters)
    adapter = get_adapter(model)
    head = sum(p.numel() for m in adapter.classifier_modules() for p in m.parameters())
    block = sum(p.numel() for p in adapter.blocks[index].parameters())
    total = sum(p.numel() for p in model.parameters())
    return 100.0 * (head + block) / total


def select_block(
    model: nn.Module,
    train_data: Any,
    *,
    rule: str = DEFAULT_RULE,
    method: str = "scl",
    candidates: Sequence[int | str] | None = None,
    max_trainable_percent: float | None = None,
    heldout_fraction: float = 0.3,
    probe_steps: int = PROBE_STEPS,
    batch_size: int = 32,
    lr: float = 0.03,
    bn: str | None = None,
    seed: int = 0,
) -> BlockSelection:
    """Choose the block to fine-tune from NC1 on the downstream training data.

    Args:
        model: the pretrained timm model with its downstream classifier (not modified: the
            probes train copies).
        train_data: the downstream *training* data: (images, labels) tensors, a
            ``ncfinetune.data.TensorCache``, or a map-style dataset of (image tensor, label).
        rule: ``"curve"``, ``"probe"`` or ``"probe_accuracy"`` (see the module docstring).
        method: ``"scl"`` or ``"layer"``: what will be fine-tuned (the probes train it; it also
            sets the trainable share and, for scl, which blocks fit the skip).
        candidates: block indices or names (default: every block, for scl every block whose
            width fits the skip).
        max_trainable_percent: drop candidates that would train more than this share.
        heldout_fraction: probe rules: stratified share of ``train_data`` held out.
        probe_steps, batch_size, lr, bn, seed: the probe fine-tunes (SGD, cosine schedule).

    Returns:
        A :class:`BlockSelection`; print it for the table, ``.save_json()``, ``.plot()``.

    Raises:
        ConfigError: unknown rule or method, an empty candidate list, a budget no candidate
            meets, or (probe rules) too few samples per class to hold some out.
    """
    t0 = time.perf_counter()
    if rule not in RULES:
        raise ConfigError(f"rule {rule!r} is not one of {', '.join(RULES)}.")
    if method not in ("layer", "scl"):
        raise ConfigError(f"method {method!r} cannot be placed at a block; use 'layer' or 'scl'.")
    adapter = get_adapter(model)
    names = adapter.block_names
    if candidates is None:
        idx = [i for i in range(len(names)) if method == "layer" or _fits(adapter, i)]
    else:
        if len(candidates) == 0:
            raise ConfigError(
                f"candidates is empty; pass block indices or names of {_arch_name(model)} "
                f"(0..{len(names) - 1}) or None for every block."
            )
        idx = sorted({adapter.resolve(c) for c in candidates})
        wide = [i for i in idx if method == "scl" and not _fits(adapter, i)]
        if wide:
            raise ConfigError(
                f"SCL skip cannot fit candidate block(s) "
                f"{', '.join(f'{i} ({names[i]}, {adapter.block_channels(i)} channels)' for i in wide)}: "
                f"wider than the {adapter.feature_dim} penultimate features. Drop them, or use "
                "method='layer'."
            )
    rows = [
        CandidateRow(i, names[i], adapter.block_channels(i), _trainable_percent(model, i))
        for i in idx
    ]
    if max_trainable_percent is not None:
        kept = [r for r in rows if r.trainable_percent <= max_trainable_percent]
        if not kept:
            least = min(rows, key=lambda r: r.trainable_percent)
            raise ConfigError(
                f"no candidate block trains at most {max_trainable_percent}% of the parameters; "
                f"the smallest is block {least.index} ({least.name}) at "
                f"{least.trainable_percent:.2f}%. Raise max_trainable_percent or add candidates."
            )
        rows = kept
    fetch, labels = _as_fetch(train_data)
    all_rows = np.arange(labels.size)

    # the pretrained layer-wise curve: one pass over all the training data
    was_training = model.training
    model.eval()
    feats = collect_block_features(
        model,
        (fetch(all_rows[s : s + 256].tolist()) for s in range(0, labels.size, 256)),
    )
    model.train(was_training)
    curve = []
    for i, name in enumerate(feats.names[:-1]):
        curve.append(
            {
                "index": i,
                "name": name,
                "channels": feats.channels[i],
                "nc1": nc1_or_none(feats.features[name], feats.labels),
            }
        )
    for r in rows:
        r.nc1_block = curve[r.index]["nc1"]
    images = labels.size

    if rule == "curve":
        scored = [r for r in rows if r.nc1_block is not None]
        best = min(scored, key=lambda r: r.nc1_block)
        second = sorted(r.nc1_block for r in scored)[1] if len(scored) > 1 else None
        reason = (
            f"Its pooled output has the lowest NC1 on the training data ({best.nc1_block:.3f}"
            + (f"; next best {second:.3f}" if second is not None else "")
            + f") among {len(rows)} candidates: the pretrained features are most collapsed there."
        )
    else:
        fit, held = _holdout(labels, heldout_fraction, seed)
        # training NC1 (reported, not scored) on a class-balanced sample of the fit part as
        # large as the held-out part: evaluating all of it cost about a fifth of the probes
        fit_eval = (
            fit[balanced_subset(labels[fit], total=held.size, seed=seed)]
            if fit.size > held.size
            else fit
        )
        caches = _probe_caches(model, fetch, method, [r.index for r in rows], bn)
        try:
            images += fill_shared(list(caches.values()), all_rows)
        except CacheTooLarge as err:
            warn_once(f"block selection: {err} The probes run without the prefix cache.")
            caches = {}
        for r in rows:
            t1 = time.perf_counter()
            torch.manual_seed(seed)
            tuned = wrap(copy.deepcopy(model), method, r.index, bn=bn)
            cache = caches.get(r.index)
            train_steps(
                tuned,
                fetch,
                fit,
                steps=probe_steps,
                batch_size=batch_size,
                lr=lr,
                seed=seed,
                prefix=cache,
            )
            ev_fit = evaluate_rows(tuned, fetch, fit_eval, prefix=cache)
            ev_held = evaluate_rows(tuned, fetch, held, prefix=cache)
            r.nc1_train = nc1_or_none(ev_fit["features"], ev_fit["labels"])
            r.nc1_heldout = nc1_or_none(ev_held["features"], ev_held["labels"])
            r.heldout_accuracy = ev_held["accuracy"]
            r.probe_seconds = time.perf_counter() - t1
            images += probe_steps * min(batch_size, fit.size) + fit_eval.size + held.size
        if rule == "probe":
            best = min(rows, key=lambda r: (r.nc1_heldout is None, r.nc1_heldout or 0.0))
            reason = (
                f"After a {probe_steps}-step {method} probe its penultimate NC1 on the held-out "
                f"{held.size} images is the lowest ({best.nc1_heldout:.3f}) among {len(rows)} "
                "candidates (training NC1 alone can overfit on small data)."
            )
        else:
            best = _choose_by_accuracy(rows)
            tied = sum(r.heldout_accuracy == best.heldout_accuracy for r in rows)
            reason = (
                f"After a {probe_steps}-step {method} probe it has the highest accuracy on the "
                f"held-out {held.size} images ({100 * best.heldout_accuracy:.1f}%) among "
                f"{len(rows)} candidates"
                + (
                    f"; of the {tied} tied, its held-out NC1 is the lowest ({best.nc1_heldout:.3f})."
                    if tied > 1 and best.nc1_heldout is not None
                    else "."
                )
            )
    return BlockSelection(
        rule=rule,
        method=method,
        arch=_arch_name(model),
        rows=rows,
        chosen=best.index,
        chosen_name=best.name,
        reason=reason,
        seconds=time.perf_counter() - t0,
        images_processed=int(images),
        curve=curve,
    )


def _choose_by_accuracy(rows: list[CandidateRow]) -> CandidateRow:
    """The highest held-out accuracy; a few held-out images per class make ties common, and
    among tied candidates the lowest held-out NC1 (the paper's criterion) wins, then the
    earlier block."""
    return max(
        rows,
        key=lambda r: (
            r.heldout_accuracy,
            r.nc1_heldout is not None,
            -(r.nc1_heldout or 0.0),
            -r.index,
        ),
    )


def _probe_caches(model, fetch, method, indices, bn) -> dict[int, PrefixCache]:
    """Prefix caches for the probes, one per candidate, filled later in one shared pass;
    empty where the frozen prefix is not a pure function of the input (e.g. bn='update')."""
    frozen = copy.deepcopy(model)  # one copy serves every cache: only its frozen part runs
    caches = {}
    for i in indices:
        tuned = wrap(frozen, method, i, bn=bn)
        if prefix_blocker(tuned) is not None:
            return {}
        caches[i] = PrefixCache(tuned, fetch)
    return caches


def _fits(adapter, index: int) -> bool:
    return adapter.block_channels(index) <= adapter.feature_dim


def _holdout(labels: np.ndarray, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Stratified (fit, held-out) rows; each class needs >= 2 fit rows and >= 1 held out."""
    if not 0 < fraction < 1:
        raise ConfigError(f"heldout_fraction must be in (0, 1), got {fraction}.")
    classes, counts = np.unique(labels, return_counts=True)
    need = max(3, int(np.ceil(1 / min(fraction, 1 - fraction))) + 1)
    if counts.min() < need:
        worst = classes[counts.argmin()]
        raise ConfigError(
            f"class {worst} has {counts.min()} training samples; a probe rule needs at least "
            f"{need} per class to hold out {fraction:.0%} of each (>= 1 held out, >= 2 to fit). "
            "Use rule='curve' (no held-out split) or more data."
        )
    return validation_split(labels, fraction, seed=seed)
