"""Pooled features of every block in one pass, and the layer-wise NC1 curve (paper Fig. 9/10).

``collect_block_features`` runs a timm model (plain or wrapped in a
:class:`~ncfinetune.tuning.model.TunedModel`) over a DataLoader once, through the backbone adapter's
``forward_capture``: each block's output is pooled as SPEC section 2 defines (conv maps: channel
averages; token models: the model's own token pooling, without the final norm, like the paper's
per-layer class token). ResNet/ViT adapters run their explicit ``stem -> blocks`` split; the
generic adapter captures block outputs with forward hooks that are removed when the pass ends,
also when a batch fails. The extra cost over a plain inference pass is the pooling (a few % of
the block FLOPs) and the metric maths.

With ``stream=True`` nothing per-sample is kept: each block's pooled batch goes straight into an
:class:`~ncfinetune.metrics.stream.NC1Accumulator` (memory O(sum of C_b^2), independent of N).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from ncfinetune.backbones import get_adapter
from ncfinetune.errors import ConfigError, MetricInputError
from ncfinetune.metrics.collapse import (
    cdnv,
    class_separation_r2,
    nc1,
    numerical_rank,
)
from ncfinetune.metrics.stream import NC1Accumulator
from ncfinetune.tuning.model import TunedModel

PENULTIMATE = "penultimate"
EXTRA_METRICS = {
    "cdnv": cdnv,
    "numerical_rank": numerical_rank,
    "class_separation_r2": class_separation_r2,
}


@dataclass
class BlockFeatures:
    """What :func:`collect_block_features` returns.

    Attributes:
        names: block names in forward order, then ``"penultimate"``.
        channels: the width of each entry of ``names``.
        labels: the labels of every sample (N,), in loader order.
        features: name -> pooled features (N x C), unless streamed.
        accumulators: name -> NC1Accumulator, when streamed.
        num_samples: N.
    """

    names: list[str]
    channels: list[int]
    labels: torch.Tensor
    features: dict[str, torch.Tensor] = field(default_factory=dict)
    accumulators: dict[str, NC1Accumulator] = field(default_factory=dict)
    num_samples: int = 0


def _split(model: nn.Module):
    """(adapter, tuned or None) for a plain timm model or a TunedModel."""
    if isinstance(model, TunedModel):
        return model.adapter, model
    return get_adapter(model), None


@torch.no_grad()
def collect_block_features(
    model: nn.Module,
    loader: Iterable,
    *,
    blocks: Sequence[int | str] | None = None,
    stream: bool = False,
    num_classes: int | None = None,
    device: torch.device | str | None = None,
    max_batches: int | None = None,
) -> BlockFeatures:
    """Pooled output of every (or the chosen) block, plus the penultimate features, in one pass.

    Args:
        model: a timm ResNet/ViT or a TunedModel (then "penultimate" is the classifier input,
            including the SCL skip). Evaluated in eval mode; its mode is restored afterwards.
        loader: yields ``(images, labels)`` batches.
        blocks: which blocks to record (indices or names); default all. The forward pass always
            stops after the last block needed... except that the penultimate features need all.
        stream: accumulate NC1 statistics per block instead of keeping the features.
        num_classes: required with ``stream=True`` (the accumulators need K up front).
        device: where to run; default the model's device.
        max_batches: stop after this many batches.
    """
    adapter, tuned = _split(model)
    wanted = (
        sorted({adapter.resolve(b) for b in blocks})
        if blocks is not None
        else list(range(len(adapter.blocks)))
    )
    if stream and not num_classes:
        raise ConfigError(
            "stream=True needs num_classes (the NC1 accumulators are sized up front)."
        )
    device = torch.device(device) if device is not None else next(model.parameters()).device
    names = [adapter.block_names[i] for i in wanted] + [PENULTIMATE]
    channels = [adapter.block_channels(i) for i in wanted] + [adapter.feature_dim]
    skip_from = tuned is not None and tuned.config.uses_skip
    capture = set(wanted) | ({tuned.block_index} if skip_from else set())
    store: dict[str, list[torch.Tensor]] = {n: [] for n in names}
    accs = (
        {n: NC1Accumulator(num_classes, c) for n, c in zip(names, channels, strict=True)}
        if stream
        else {}
    )
    labels_all = []
    was_training = model.training
    model.eval()
    try:
        for b, (x, y) in enumerate(loader):
            if max_batches is not None and b >= max_batches:
                break
            h, outputs = adapter.forward_capture(x.to(device), capture)
            pooled = {adapter.block_names[i]: adapter.pool(outputs[i]) for i in wanted}
            skip = tuned.skip(outputs[tuned.block_index]) if skip_from else None
            pooled[PENULTIMATE] = adapter.classify(h, skip).features
            y = y.cpu()
            labels_all.append(y)
            for name, value in pooled.items():
                value = value.float().cpu()
                if stream:
                    accs[name].update(value, y)
                else:
                    store[name].append(value)
    finally:
        model.train(was_training)
    if not labels_all:
        raise MetricInputError(
            "the loader yielded no batches: there are no features to measure. Pass a loader "
            "(or list) of (images, labels) batches holding examples of at least 2 classes."
        )
    labels = torch.cat(labels_all)
    feats = {} if stream else {n: torch.cat(v) for n, v in store.items()}
    return BlockFeatures(names, channels, labels, feats, accs, len(labels))


def layerwise_nc1(
    model: nn.Module,
    loader: Iterable,
    *,
    metrics: Sequence[str] = (),
    blocks: Sequence[int | str] | None = None,
    stream: bool = False,
    num_classes: int | None = None,
    max_batches: int | None = None,
) -> list[dict]:
    """The NC1 curve over depth: one row per block (index, name, channels, nc1, ...) and a last
    row for the penultimate features (index None). ``metrics`` adds any of ``cdnv``,
    ``numerical_rank``, ``class_separation_r2`` (not available with ``stream=True``, except
    ``cdnv``)."""
    unknown = [m for m in metrics if m not in EXTRA_METRICS]
    if unknown:
        raise ConfigError(f"unknown metrics {unknown}; valid: {', '.join(EXTRA_METRICS)}.")
    if stream and set(metrics) - {"cdnv"}:
        raise ConfigError(
            "with stream=True only nc1 and cdnv are available (the others need all features)."
        )
    adapter, _ = _split(model)
    collected = collect_block_features(
        model,
        loader,
        blocks=blocks,
        stream=stream,
        num_classes=num_classes,
        max_batches=max_batches,
    )
    rows = []
    for name, ch in zip(collected.names, collected.channels, strict=True):
        row = {
            "index": adapter.block_names.index(name) if name != PENULTIMATE else None,
            "name": name,
            "channels": ch,
        }
        if stream:
            row["nc1"] = collected.accumulators[name].compute()
            if "cdnv" in metrics:
                row["cdnv"] = collected.accumulators[name].cdnv()
        else:
            h = collected.features[name]
            row["nc1"] = nc1(h, collected.labels)
            for m in metrics:
                row[m] = EXTRA_METRICS[m](h, collected.labels)
        rows.append(row)
    return rows


def plot_layerwise_nc1(
    curves: dict[str, list[dict]],
    path: str | Path,
    *,
    title: str = "Layer-wise NC1",
    mark: int | None = None,
) -> Path:
    """Plot NC1 over depth (log y) for one or more labelled curves to a PNG; ``mark`` highlights a
    block index (e.g. the chosen block)."""
    from ncfinetune.plotting import new_figure, save_figure

    fig, ax = new_figure(figsize=(7, 4))
    for label, rows in curves.items():
        blocks = [r for r in rows if r["index"] is not None]
        ax.plot(
            [r["index"] + 1 for r in blocks], [r["nc1"] for r in blocks], marker="o", label=label
        )
        pen = [r for r in rows if r["index"] is None]
        if pen:
            ax.scatter([len(blocks) + 1], [pen[0]["nc1"]], marker="*", s=120)
    if mark is not None:
        ax.axvline(mark + 1, color="grey", linestyle="--", linewidth=1)
    ax.set_yscale("log")
    ax.set_xlabel("block (1-based, as in the paper; * = penultimate)")
    ax.set_ylabel("NC1 (log scale)")
    ax.set_title(title)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    return save_figure(fig, path, dpi=120)
