"""Which block to fine-tune (and at which learning rate), chosen on the downstream training data.

The paper's principle (seeds/002, section 3): fine-tune the block that makes the penultimate
features of the downstream training data most collapsed (lowest NC1); on small data the lowest
*training* NC1 can overfit (its Appendix C.2), so the default rule scores a held-out split.

Every selection makes one inference pass of the pretrained model over the training data and
reports, for each candidate block, the NC1 of its pooled output, the cross-validated accuracy
of a linear (ridge) classifier on that output (stage-wise linear evaluation, seeds/001), its R@1
(leave-one-out nearest-neighbour retrieval, seed 000) and the lead of an MLP probe over a linear
one (seed 004: is the block's information linearly usable?). Then a rule (``rule=``) picks the
block:

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
- ``"recall"`` / ``"mlp"``: the highest R@1 / MLP-probe held-out accuracy of the block's pooled
  output (ties: the deeper block). Measured leave one target out beside the others
  (results/selection_loto_diagnostics.md); neither is the default.

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

import time
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from ncfinetune.backbones import get_adapter
from ncfinetune.backbones.base import arch_name
from ncfinetune.errors import ConfigError, MetricInputError
from ncfinetune.messages import warn_once
from ncfinetune.metrics.collapse import nc1_or_none
from ncfinetune.metrics.transfer import recall_at_1
from ncfinetune.selection.probe import (
    Prober,
    as_fetch,
    linear_probe_accuracy,
    mlp_gap,
    on_device,
    probe_precision,
    training_cache,
)
from ncfinetune.selection.report import BlockSelection, CandidateRow
from ncfinetune.selection.rules import (
    DEFAULT_RULE,
    HELDOUT_FRACTION,
    LR_GRID,
    MAX_CANDIDATES,
    MAX_TRAINABLE_PERCENT,
    PROBE_BATCH,
    PROBE_LR,
    PROBE_RULES,
    PROBE_STEPS,
    RULES,
    check_grid,
    check_probe,
    check_samples,
    choose,
    choose_lr,
    positive,
)
from ncfinetune.training.device import model_device
from ncfinetune.tuning.features import collect_block_features
from ncfinetune.tuning.methods import method_class


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
    cache = training_cache(data, transform, rows, max_images, seed)
    return select_block(model, cache, seed=seed, **kwargs)


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


def fits_skip(adapter, index: int) -> bool:
    """Whether block ``index``'s output is no wider than the penultimate features, as the SCL
    skip (zero-padded to them) needs."""
    return adapter.block_channels(index) <= adapter.feature_dim


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
    idx = [i for i in range(len(adapter.blocks)) if not _uses_skip(method) or fits_skip(adapter, i)]
    if max_trainable_percent is not None:
        idx = [i for i in idx if _trainable_percent(adapter, i) <= max_trainable_percent]
    if len(idx) > max_candidates:
        pick = np.unique(np.round(np.linspace(0, len(idx) - 1, max_candidates)).astype(int))
        idx = [idx[p] for p in pick]
    return idx


def budget_candidates(
    model: nn.Module,
    method: str = "scl",
    max_trainable_percent: float | None = MAX_TRAINABLE_PERCENT,
) -> tuple[list[int], str | None]:
    """:func:`default_candidates`, and where no block fits ``max_trainable_percent``, those
    within the smallest block's share instead, with a note (also warned once) that says so and
    what to pass: the budget adapts to the backbone rather than failing."""
    idx = default_candidates(model, method, max_trainable_percent)
    if idx or max_trainable_percent is None:
        return idx, None
    adapter = get_adapter(model)
    names = adapter.block_names
    allowed = [i for i in range(len(names)) if not _uses_skip(method) or fits_skip(adapter, i)]
    least = min(allowed, key=lambda i: _trainable_percent(adapter, i))
    share = _trainable_percent(adapter, least)
    note = (
        f"No block of {arch_name(model)} trains at most {max_trainable_percent:g}% of the "
        f"parameters with {method}; the budget was raised to the smallest block's {share:.2f}% "
        f"(block {least}, {names[least]}). Pass max_trainable_percent (--select_max_percent) "
        "to set it."
    )
    warn_once(note)
    return default_candidates(model, method, share + 1e-9), note


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
    precision: str | None = None,
    device: str | torch.device | None = None,
    seed: int = 0,
    probe_all: bool = False,
    diagnostics: bool | None = None,
) -> BlockSelection:
    """Choose the block (and with ``lr="auto"`` the learning rate) to fine-tune.

    Args:
        model: the pretrained timm model with its downstream classifier (not modified: the
            probes train copies, starting from its classifier as it is: create the model under
            the same seed, as the recipes do, for the same choice).
        train_data: the downstream *training* data: (images, labels) tensors, a
            ``ncfinetune.data.loaders.TensorCache``, or a map-style dataset of (image tensor, label).
        rule: ``"middle"``, ``"curve"``, ``"linear"``, ``"recall"``, ``"mlp"``, ``"probe"`` or
            ``"probe_accuracy"`` (see the module docstring).
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
        probe_steps, batch_size, bn, seed: the probe fine-tunes (SGD, cosine schedule); the
            seed drives the selection's own RNG (torch's global RNG is left as it was).
        precision: probes: None (default: accelerate's choice, as a fine-tune launched now
            takes it; fp16 runs as fp32), ``"auto"`` (bf16 autocast where the device computes
            it natively), ``"bf16"`` or ``"no"``. Pass the precision the fine-tune runs in.
        device: where the probes run (default: the model's device); a model elsewhere is
            copied there, never moved. Pass the device the fine-tune will use.
        probe_all: probe every (candidate, lr) pair whatever the rule (for benchmarks).
        diagnostics: also measure each candidate's R@1 and MLP-probe gap (report columns; the
            ``recall`` / ``mlp`` rules need them). None (default): only for those rules. They
            cost about as much again as the inference pass and linear probes (the MLP trains
            per candidate), so ``--block auto`` leaves them out; the ``select`` command keeps
            them.

    Returns:
        A :class:`BlockSelection`; print it for the table, ``.save()`` for JSON + plot.

    Raises:
        ConfigError: unknown rule or method, bad lr, an empty candidate list, a budget no
            given candidate meets (when no *default* candidate fits, the budget is raised to the
            smallest block and ``.budget_note`` says so), or fewer training samples per class than the rule needs (the
            message names the minimum, see :func:`min_per_class`).
    """
    t0 = time.perf_counter()
    _check_settings(rule, method, lr, lr_grid, probe_steps, batch_size)
    model = on_device(model, device)
    precision = probe_precision(precision, model_device(model))
    adapter = get_adapter(model)
    names = adapter.block_names
    rows, note = _candidate_rows(model, adapter, method, candidates, max_trainable_percent)
    fetch, labels = as_fetch(train_data, model)
    check_samples(labels, rule, lr, heldout_fraction)
    diagnostics = rule in ("recall", "mlp") if diagnostics is None else diagnostics
    curve = _measure_blocks(model, fetch, labels, rows, seed, diagnostics)
    images = labels.size
    prober = Prober(
        model, fetch, labels, method=method, bn=bn, seed=seed, fraction=heldout_fraction,
        steps=probe_steps, batch=batch_size, precision=precision,
    )  # fmt: skip
    grid = [float(v) for v in lr_grid] if lr == "auto" else [float(lr)]
    if rule in PROBE_RULES or probe_all:
        images += prober.run(rows, grid)
    chosen, chosen_lr, reason = choose(rule, rows, len(names), probe_steps)
    if lr == "auto" and chosen_lr is None:  # a rule that chose no lr: sweep the chosen block
        row = next(r for r in rows if r.index == chosen)
        if not row.probes:
            images += prober.run([row], grid)
        chosen_lr, lr_reason = choose_lr(row)
        reason += " " + lr_reason
    return BlockSelection(
        rule=rule, method=method, arch=arch_name(model), rows=rows, chosen=chosen,
        chosen_name=names[chosen], lr=chosen_lr if lr == "auto" else None, reason=reason,
        seconds=time.perf_counter() - t0, images_processed=int(images),
        probe_steps=probe_steps, num_blocks=len(names), curve=curve, budget_note=note,
    )  # fmt: skip


def _check_settings(rule, method, lr, lr_grid, probe_steps, batch_size) -> None:
    if rule not in RULES:
        raise ConfigError(f"rule {rule!r} is not one of {', '.join(RULES)}.")
    if not method_class(method).tunes_block:
        raise ConfigError(
            f"method {method!r} does not tune one block, so no block can be selected for it; "
            "use a one-block method such as 'scl' or 'layer'."
        )
    if not (lr == "auto" or positive(lr)):
        raise ConfigError(f"lr must be 'auto' or a positive number, got {lr!r}.")
    if lr == "auto":
        check_grid(lr_grid)
    check_probe(probe_steps, batch_size)


def _candidate_rows(
    model, adapter, method, candidates, max_trainable_percent
) -> tuple[list[CandidateRow], str | None]:
    """The rows of the candidate blocks (``candidates``, or :func:`default_candidates`) and a
    note when no block fitted the budget and it was raised to the smallest block."""
    names = adapter.block_names
    note = None
    if candidates is not None:
        idx = _explicit_candidates(model, adapter, method, candidates, max_trainable_percent)
    else:
        idx, note = budget_candidates(model, method, max_trainable_percent)
    rows = [
        CandidateRow(i, names[i], adapter.block_channels(i), _trainable_percent(adapter, i))
        for i in idx
    ]
    return rows, note


def _measure_blocks(model, fetch, labels, rows, seed, diagnostics) -> list[dict]:
    """One pass of the pretrained model: every block's NC1 (the curve, returned) and, into
    ``rows``, each candidate's NC1 and linear-probe accuracy (with ``diagnostics``, also its R@1
    and MLP-probe gap)."""
    all_rows = np.arange(labels.size)
    was_training = model.training
    model.eval()
    feats = collect_block_features(
        model, (fetch(all_rows[s : s + 256].tolist()) for s in range(0, labels.size, 256))
    )
    model.train(was_training)
    curve = [
        {"index": i, "name": n, "channels": feats.channels[i],
         "nc1": nc1_or_none(feats.features[n], feats.labels)}
        for i, n in enumerate(feats.names[:-1])
    ]  # fmt: skip
    y = feats.labels.numpy()
    if np.unique(y, return_counts=True)[1].min() >= 2:  # else NC1 is 0, CV impossible
        for r in rows:
            h = feats.features[r.name]
            r.nc1_block = curve[r.index]["nc1"]
            r.linear_accuracy = linear_probe_accuracy(h.numpy(), y, seed)
            if not diagnostics:
                continue
            try:
                r.recall_at_1 = recall_at_1(h, y)
            except MetricInputError:  # e.g. identical outputs: not measurable, not a choice
                r.recall_at_1 = None
            r.mlp_accuracy, r.mlp_gap = mlp_gap(h.numpy(), y, seed)
    return curve


def _explicit_candidates(model, adapter, method, candidates, max_trainable_percent) -> list[int]:
    names = adapter.block_names
    if len(candidates) == 0:
        raise ConfigError(
            f"candidates is empty; pass block indices or names of {arch_name(model)} "
            f"(0..{len(names) - 1}) or None for the default candidates."
        )
    idx = sorted({adapter.resolve(c) for c in candidates})
    wide = [i for i in idx if _uses_skip(method) and not fits_skip(adapter, i)]
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
