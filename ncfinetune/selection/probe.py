"""The measurements of a selection: short probe fine-tunes of copies of the model, scored on
held-out training rows, and the closed-form linear probe of a block's output.

Probes run where the selection runs (the model's device, or ``device=``), in the precision
the fine-tune will use, and draw their randomness from their own seed: rows are ordered by
their own ``torch.Generator`` (:func:`ncfinetune.training.loop.train_steps`), held-out rows by a
NumPy ``Generator`` (:func:`ncfinetune.data.subsets.validation_split`), and what must use torch's
global RNG (a method's initialisation, dropout) runs inside :func:`own_rng`, which restores it.
"""

from __future__ import annotations

import contextlib
import copy
import time
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
from torch import nn

from ncfinetune.data.subsets import balanced_subset, validation_split
from ncfinetune.errors import ConfigError, DataError
from ncfinetune.messages import warn_once
from ncfinetune.metrics.collapse import nc1_or_none
from ncfinetune.selection.report import CandidateRow
from ncfinetune.selection.rules import LINEAR_FOLDS
from ncfinetune.training.device import (
    LOOP_PRECISIONS,
    loop_precision,
    model_device,
    resolve_precision,
    use_channels_last,
)
from ncfinetune.training.loop import evaluate_rows, train_steps
from ncfinetune.tuning.inputs import image_problem
from ncfinetune.tuning.methods import method_config
from ncfinetune.tuning.model import TunedModel, get_tuned_model
from ncfinetune.tuning.prefix_cache import (
    CacheTooLarge,
    PrefixCache,
    fill_shared,
    prefix_blocker,
    prefix_stop,
)


@contextlib.contextmanager
def own_rng(seed: int, device: torch.device) -> Iterator[None]:
    """Run the block with torch's global RNG (CPU, and ``device`` when it is a CUDA device)
    seeded by ``seed``, and restore the caller's state afterwards: a selection never reseeds
    the global RNG, and the same seed gives the same probes."""
    cuda = device.type == "cuda"
    index = (torch.cuda.current_device() if device.index is None else device.index) if cuda else 0
    with torch.random.fork_rng(devices=[index] if cuda else []):
        torch.random.default_generator.manual_seed(seed)
        if cuda:
            with torch.cuda.device(index):
                torch.cuda.manual_seed(seed)
        yield


def on_device(model: nn.Module, device: str | torch.device | None) -> nn.Module:
    """``model`` itself when it is on ``device`` (default: where it is), else a copy moved
    there: a selection never modifies the caller's model."""
    if device is None:
        return model
    want, have = torch.device(device), model_device(model)
    if want.type == "cuda" and want.index is None:
        want = torch.device("cuda", torch.cuda.current_device())
    if (want.type, want.index or 0) == (have.type, have.index or 0):
        return model
    return copy.deepcopy(model).to(want)


def probe_precision(precision: str | None, device: torch.device) -> str:
    """The precision the probes run in: ``precision`` (``auto``, ``no``, ``bf16``; None:
    accelerate's choice, as a fine-tune launched now would take it) resolved for ``device``;
    fp16 runs in fp32 (the library loop has no loss scaler)."""
    allowed = ("auto", *LOOP_PRECISIONS)
    return loop_precision(resolve_precision(precision, device, allowed, key="precision"))


def _linear_classifier():
    """The linear probe of every measurement here: a ridge classifier on standardised features
    (closed form, milliseconds for a few thousand rows)."""
    from sklearn.linear_model import RidgeClassifier
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    return make_pipeline(StandardScaler(), RidgeClassifier(alpha=1.0))


def linear_probe_accuracy(features: np.ndarray, labels: np.ndarray, seed: int = 0) -> float:
    """Stratified k-fold (k = min(5, smallest class)) accuracy of the linear probe (a ridge
    classifier on standardised features): stage-wise linear evaluation in closed form
    (milliseconds a block)."""
    from sklearn.model_selection import StratifiedKFold, cross_val_score

    k = int(min(LINEAR_FOLDS, np.unique(labels, return_counts=True)[1].min()))
    folds = StratifiedKFold(n_splits=k, shuffle=True, random_state=seed)
    clf = _linear_classifier()
    return float(cross_val_score(clf, features.astype(np.float64), labels, cv=folds).mean())


def mlp_gap(
    features: np.ndarray, labels: np.ndarray, seed: int = 0
) -> tuple[float | None, float | None]:
    """Is a block's information linearly usable (seed 004)? Held-out accuracy of a one-hidden-
    layer MLP probe (256 ReLU units) minus that of a linear probe, both trained the same way
    (standardised features, full-batch Adam lr 0.01, weight decay 1e-3, 100 steps, float32, on
    the CPU) on one stratified split (``HELDOUT_FRACTION`` held out, seeded). Returns
    (MLP accuracy, gap), or (None, None) when a class has fewer than 4 rows. A large gap says the classes are separable but not linearly; near 0,
    that a linear head (or one block) can use what is there. About 0.2-0.5 s a block for 1,000
    rows of 512 channels on 2 CPU cores."""
    from ncfinetune.selection.rules import HELDOUT_FRACTION

    if np.unique(labels, return_counts=True)[1].min() < 4:  # >= 1 held out and >= 2 to fit
        return None, None
    fit, held = validation_split(labels, HELDOUT_FRACTION, seed=seed)
    x = torch.as_tensor(np.asarray(features), dtype=torch.float32).cpu()
    y = torch.as_tensor(np.unique(labels, return_inverse=True)[1])
    mean, std = x[fit].mean(0), x[fit].std(0).clamp_min(1e-6)
    x = (x - mean) / std
    k = int(y.max()) + 1
    accs = []
    for hidden in (None, 256):
        with own_rng(seed, torch.device("cpu")):  # the init draws from torch's RNG: restored
            net = (nn.Linear(x.shape[1], k) if hidden is None
                   else nn.Sequential(nn.Linear(x.shape[1], hidden), nn.ReLU(), nn.Linear(hidden, k)))  # fmt: skip
        opt = torch.optim.Adam(net.parameters(), lr=0.01, weight_decay=1e-3)
        xf, yf = x[fit], y[fit]
        with torch.enable_grad():
            for _ in range(100):
                loss = nn.functional.cross_entropy(net(xf), yf)
                opt.zero_grad()
                loss.backward()
                opt.step()
        with torch.no_grad():
            accs.append(float((net(x[held]).argmax(1) == y[held]).float().mean()))
    return accs[1], accs[1] - accs[0]


def transfer_scores(
    fit: tuple[Any, Any], held: tuple[Any, Any], seed: int = 0
) -> dict[str, float | None]:
    """How well frozen features transfer to a target: the linear probe fitted on ``fit``
    (features, labels) and scored on ``held``, then R@1, NMI (k-means seeded by ``seed``) and NC1
    of the held-out features. A metric the features cannot support (for example constant
    features from a collapsed network) is None rather than an error, so a monitor never stops
    the run it watches."""
    from ncfinetune.errors import MetricInputError
    from ncfinetune.metrics.transfer import nmi, recall_at_1

    (xf, yf), (xh, yh) = (
        (torch.as_tensor(x).double().cpu().numpy(), np.asarray(y)) for x, y in (fit, held)
    )
    if not (np.isfinite(xf).all() and np.isfinite(xh).all()):
        return dict.fromkeys(("linear_probe_accuracy", "recall_at_1", "nmi", "nc1"))
    clf = _linear_classifier().fit(xf, yf)
    scores: dict[str, float | None] = {"linear_probe_accuracy": float(clf.score(xh, yh))}
    for name, fn in (("recall_at_1", recall_at_1), ("nmi", lambda h, y: nmi(h, y, seed=seed))):
        try:
            scores[name] = fn(xh, yh)
        except MetricInputError:
            scores[name] = None
    scores["nc1"] = nc1_or_none(xh, yh)
    return scores


def training_cache(data, transform, rows, max_images, seed):
    """``rows`` of ``data``'s training split (all by default; a seeded class-balanced sample of
    ``max_images`` when more), decoded once into a ``TensorCache``."""
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


def as_fetch(data: Any, model: nn.Module | None = None) -> tuple[Any, np.ndarray]:
    """(fetch(list of rows) -> (x, y), all labels) for a (images, labels) pair or a dataset;
    with ``model``, the data is checked against it first (:func:`check_train_data`)."""
    if isinstance(data, (tuple, list)) and len(data) == 2 and torch.is_tensor(data[0]):
        images, labels = data
        labels = torch.as_tensor(labels)
        if images.shape[0] != labels.shape[0]:
            raise ConfigError(
                f"train_data has {images.shape[0]} images but {labels.shape[0]} labels; "
                "pass (images N x C x H x W, labels N) of the same length."
            )
        labels = class_indices(labels.numpy())

        def fetch(rows: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
            index = torch.as_tensor(rows, dtype=torch.long)
            return images.index_select(0, index), torch.as_tensor(labels[rows])

    elif hasattr(data, "__getitems__") and hasattr(data, "labels"):  # e.g. data.TensorCache
        fetch, labels = data.__getitems__, class_indices(np.asarray(data.labels))
    elif hasattr(data, "__getitem__") and hasattr(data, "__len__"):

        def fetch(rows: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
            items = [data[i] for i in rows]
            return torch.stack([x for x, _ in items]), torch.as_tensor([int(y) for _, y in items])

        labels = class_indices(np.asarray([np.asarray(data[i][1]) for i in range(len(data))]))
    else:
        raise ConfigError(
            f"train_data of type {type(data).__name__} is not supported; pass (images, labels) "
            "tensors, a ncfinetune.data.loaders.TensorCache, or a map-style dataset of (image, "
            "label) pairs."
        )
    if model is not None:
        check_train_data(model, fetch, labels)
    return fetch, labels


def class_indices(labels: np.ndarray) -> np.ndarray:
    """``labels`` as int64 class indices; float labels are refused unless whole numbers."""
    if labels.dtype.kind in "iub":
        return labels.astype(np.int64)
    if labels.dtype.kind == "f" and np.isfinite(labels).all() and (labels == labels.round()).all():
        return labels.astype(np.int64)
    odd = [v for v in labels.ravel()[:1000] if not (np.isfinite(v) and float(v).is_integer())]
    raise DataError(
        f"labels must be integer class indices 0..C-1, got {labels.dtype} values such as "
        f"{(odd or labels.ravel().tolist())[0]}; pass integer labels (one-hot or soft labels: "
        "argmax them first)."
    )


def check_train_data(model: nn.Module, fetch, labels: np.ndarray, sample: int = 64) -> None:
    """Refuse data that no selection can be made on, before any probe: labels outside the
    model's classes, a batch the model cannot take (channels, dtype, size), non-finite pixels,
    or images that are all identical (every candidate would score the same)."""
    classes = getattr(model, "num_classes", None)
    if classes and labels.size and (labels.min() < 0 or labels.max() >= classes):
        found = np.unique(labels)
        shown = ", ".join(map(str, found[:10])) + (", ..." if found.size > 10 else "")
        raise DataError(
            f"labels must be class indices 0..{classes - 1} for this model's {classes}-class "
            f"head; got {shown}. Remap them to 0..K-1 (np.unique(labels, return_inverse=True)"
            "[1]) and create the model with num_classes=K."
        )
    rows = np.unique(np.linspace(0, labels.size - 1, min(labels.size, sample)).astype(int))
    x, _ = fetch(rows.tolist())
    problem = image_problem(model, x)
    if problem is not None:
        raise DataError(f"train_data: {problem}.")
    if not torch.isfinite(x).all():
        bad = int((~torch.isfinite(x.flatten(1))).any(1).sum())
        raise DataError(
            f"train_data: {bad} of {len(rows)} sampled images hold NaN or infinite pixels; "
            "check the loading and normalisation of the images."
        )
    if len(rows) > 1 and bool((x == x[:1]).all()):
        raise DataError(
            f"train_data: all {len(rows)} sampled images are identical, so every candidate "
            "would score the same and no choice could be made; check the loading of the images."
        )


def _holdout(labels: np.ndarray, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Stratified (fit, held-out) rows; the caller checked :func:`min_per_class`."""
    return validation_split(labels, fraction, seed=seed)


class Prober:
    """Short fine-tunes of copies of the model on the fit part, scored on the held-out part;
    prefix caches are shared across blocks where the frozen prefix is cacheable. Everything
    runs on the model's device."""

    def __init__(
        self, model, fetch, labels, *, method, bn, seed, fraction, steps, batch, precision
    ) -> None:
        self.model, self.fetch, self.labels = model, fetch, labels
        self.method, self.bn, self.seed = method, bn, seed
        self.fraction, self.steps, self.batch, self.precision = fraction, steps, batch, precision
        self.fit = self.held = None
        self.caches: dict[tuple[str, int | None], PrefixCache | None] = {}
        self.frozen: nn.Module | None = None  # one copy serves every cache: only its prefix runs
        self.images = 0

    def run(self, rows: list[CandidateRow], grid: list[float]) -> int:
        """Probe every (row, lr) into ``row.probes``; return the images processed."""
        before = self.images
        for r in rows:
            for lr in grid:
                r.probes[f"{lr:g}"] = self.probe(r.index, lr)
        return self.images - before

    def probe(
        self, block: int | None, lr: float, method: str | None = None, steps: int | None = None
    ) -> dict[str, float | None]:
        """One short fine-tune of ``method`` (default: the prober's) at ``block`` (None:
        linear/full) at ``lr``, for ``steps`` (default: the prober's)."""
        method = self.method if method is None else method
        steps = self.steps if steps is None else steps
        if self.fit is None:
            self.fit, self.held = _holdout(self.labels, self.fraction, self.seed)
        device = model_device(self.model)
        with own_rng(self.seed, device):  # a LoRA method's wrapper draws its init
            cache = self._cache(block, method)
        t1 = time.perf_counter()
        with own_rng(self.seed, device):
            tuned = get_tuned_model(copy.deepcopy(self.model), method, block=block, bn=self.bn)
            if cache is None and use_channels_last(self.model):
                tuned.to(memory_format=torch.channels_last)
            acc, nc, train_s, rise = self._train_and_score(tuned, lr, cache, steps)
        self.images += steps * min(self.batch, self.fit.size) + self.held.size
        trainable, total = tuned.parameter_counts()
        return {
            "accuracy": acc, "nc1": nc, "seconds": time.perf_counter() - t1,
            "train_seconds": train_s, "steps": steps,
            "trainable_percent": 100.0 * trainable / total, "loss_rise": rise,
        }  # fmt: skip

    def _train_and_score(self, tuned, lr, cache, steps) -> tuple:
        """Held-out (accuracy, NC1) after the probe's steps, the training seconds and the
        training loss's rise (its highest after the first step / the first; None: one step or
        diverged); a diverged probe ranks last."""
        t0 = time.perf_counter()
        try:
            losses = train_steps(
                tuned, self.fetch, self.fit, steps=steps, batch_size=self.batch, lr=lr,
                seed=self.seed, prefix=cache, precision=self.precision,
            )  # fmt: skip
            train_s = time.perf_counter() - t0
            ev = evaluate_rows(tuned, self.fetch, self.held, prefix=cache, precision=self.precision)
        except FloatingPointError:  # diverged at this lr
            return 0.0, None, time.perf_counter() - t0, None
        rise = float(losses[1:].max() / losses[0]) if len(losses) > 1 and losses[0] > 0 else None
        return ev["accuracy"], nc1_or_none(ev["features"], ev["labels"]), train_s, rise

    def _cache(self, block: int | None, method: str) -> PrefixCache | None:
        """A filled prefix cache for probes of ``method`` at ``block``, or None where not
        legal. Methods whose frozen prefix ends at the same block share one cache."""
        if (method, block) in self.caches:
            return self.caches[(method, block)]
        if self.frozen is None:
            self.frozen = copy.deepcopy(self.model)
        # one frozen copy serves every block's cache: these wrappers only run its prefix
        config = method_config(method, block=block, bn=self.bn)
        tuned = TunedModel(self.frozen, config, owns_model=False)
        cache = None
        if prefix_blocker(tuned) is None:
            stop = prefix_stop(tuned)
            cache = next((c for c in self.caches.values() if c and c.stop == stop), None)
            if cache is None:
                cache = PrefixCache(tuned, self.fetch)
                try:
                    self.images += fill_shared([cache], np.arange(self.labels.size))
                except CacheTooLarge as err:
                    warn_once(f"selection: {err} The probes run without the prefix cache.")
                    cache = None
        self.caches[(method, block)] = cache
        return cache
