"""The transfer monitor of the pretrain recipe: how well the backbone transfers, every few epochs.

CTC (seed 000) found transfer peaking mid-pretraining while source accuracy keeps rising, so
the last checkpoint need not be the one to ship. Each target is a dataset spec with an optional
class selection (``fashion_mnist:5-9``); from its *training* split (never its test split) a
fixed class-balanced ``fit`` set and disjoint ``held`` set are decoded once with the backbone's
transform. At a monitored epoch the frozen backbone (eval mode, no gradients) embeds both, and
:func:`ncfinetune.selection.transfer_scores` gives the linear-probe accuracy (fit on ``fit``,
scored on ``held``), R@1, NMI and NC1 of the held-out features.
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

import ncfinetune.data as nd
from ncfinetune.errors import ConfigError
from ncfinetune.recipes.config import key
from ncfinetune.selection.probe import transfer_scores
from ncfinetune.training.device import model_device

# "spec:classes" where classes are ids and ranges joined by "+", e.g. "fashion_mnist:5-9",
# "digits:0-2+7"; the spec itself may hold ":" (a hub name, a path) when the tail is not that.
_CLASSES = re.compile(r"^(?P<spec>.+):(?P<classes>\d+(?:-\d+)?(?:\+\d+(?:-\d+)?)*)$")
SCORES = ("linear_probe_accuracy", "recall_at_1", "nmi", "nc1")


def parse_target(text: str) -> tuple[str, list[int] | None]:
    """``"fashion_mnist:5-9"`` -> ``("fashion_mnist", [5, 6, 7, 8, 9])``; ``"digits"`` ->
    ``("digits", None)`` (every class). Raises ConfigError on a reversed range."""
    text = text.strip()
    match = _CLASSES.match(text)
    if not match:
        return text, None
    classes: list[int] = []
    for part in match["classes"].split("+"):
        lo, _, hi = part.partition("-")
        lo_i, hi_i = int(lo), int(hi or lo)
        if hi_i < lo_i:
            raise ConfigError(
                f"transfer target {text!r}: class range {part} runs backwards; write it low-high "
                f"({hi_i}-{lo_i})."
            )
        classes += range(lo_i, hi_i + 1)
    return match["spec"], sorted(set(classes))


def target_problems(targets: list[str], every: int, fit: int, held: int) -> list[str]:
    """Config problems of the monitor keys (before any data is read)."""
    p = []
    for name, value in (("transfer_every", every), ("transfer_fit_per_class", fit)):
        if value < 1:
            p.append(f"{name} must be >= 1, got {value}")
    if held < 2:
        p.append(f"transfer_held_per_class must be >= 2 (R@1 needs 2 per class), got {held}")
    seen = set()
    for t in targets:
        try:
            spec, classes = parse_target(t)
        except ConfigError as err:
            p.append(str(err))
            continue
        if not spec:
            p.append(f"transfer target {t!r} names no dataset")
        if classes is not None and len(classes) < 2:
            p.append(f"transfer target {t!r} keeps {len(classes)} class; name at least 2")
        if t.strip() in seen:
            p.append(f"transfer target {t!r} is listed twice")
        seen.add(t.strip())
    return p


@dataclass
class TransferMonitor:
    """The transfer monitor: every ``transfer_every`` epochs, the frozen backbone's linear-probe
    accuracy, R@1, NMI and NC1 on each target's held-out training rows; the best-transferring
    backbone is kept in ``output_dir/best_transfer/`` beside the last."""

    transfer_targets: list[str] = key(
        [],
        "targets, comma-separated dataset specs with an optional class selection, e.g. "
        "digits,fashion_mnist:5-9 (ids and ranges joined by +); empty = monitor off",
    )
    transfer_every: int = key(1, "monitor every this many epochs (and always the last)")
    transfer_fit_per_class: int = key(50, "training rows per class the linear probe is fit on")
    transfer_held_per_class: int = key(
        100,
        "other training rows per class it is scored on (also R@1, NMI, NC1; fewer where a "
        "class has fewer); never the test split",
    )

    def validate(self) -> list[str]:
        return target_problems(
            self.transfer_targets,
            self.transfer_every,
            self.transfer_fit_per_class,
            self.transfer_held_per_class,
        )

    def due(self, epoch: int, epochs: int) -> bool:
        """Whether epoch ``epoch`` (1-based) of ``epochs`` is monitored."""
        return bool(self.transfer_targets) and (epoch % self.transfer_every == 0 or epoch == epochs)


@dataclass
class TransferTarget:
    """One target: its name as written, the decoded fit and held-out rows, its class count."""

    name: str
    fit: nd.TensorCache
    held: nd.TensorCache
    num_classes: int


def load_target(
    text: str, transform, *, fit_per_class: int, held_per_class: int, seed: int
) -> TransferTarget:
    """Read ``text``'s training split, draw the fit and held-out rows, decode them once."""
    spec, classes = parse_target(text)
    data = nd.load_image_dataset(spec)
    if classes is not None:
        data = nd.select_classes(data, classes)
    labels = data.labels("train")
    smallest = int(np.unique(labels, return_counts=True)[1].min())
    # every class gives fit_per_class rows to the fit set and the same number (up to
    # held_per_class, at least 2) of its other rows to the held-out set
    held_n = min(held_per_class, smallest - fit_per_class)
    if held_n < 2:
        raise ConfigError(
            f"transfer target {text!r}: its smallest class has {smallest} training rows, but the "
            f"monitor needs transfer_fit_per_class ({fit_per_class}) + at least 2 held-out rows "
            f"of every class. Lower transfer_fit_per_class to at most {smallest - 2}, or drop "
            "that class with a class selection (name:0-4)."
        )
    both = nd.balanced_subset(labels, per_class=fit_per_class + held_n, seed=seed)
    # balanced_subset is nested for one seed: the first fit_per_class of each class are `fit`
    fit = nd.balanced_subset(labels, per_class=fit_per_class, seed=seed)
    held = np.setdiff1d(both, fit)

    def cache(rows: np.ndarray) -> nd.TensorCache:
        return nd.TensorCache.build(
            data.train, transform, image_column=data.image_column,
            label_column=data.label_column, indices=rows,
        )  # fmt: skip

    return TransferTarget(text, cache(fit), cache(held), data.num_classes)


@torch.no_grad()
def embed(backbone: nn.Module, images: nd.TensorCache, autocast, batch: int = 256) -> torch.Tensor:
    """The backbone's pooled features of every cached image (float32, on the CPU)."""
    device = model_device(backbone)
    out = []
    for s in range(0, len(images), batch):
        x, _ = images[list(range(s, min(len(images), s + batch)))]
        with autocast():
            out.append(backbone(x.to(device)).float().cpu())
    return torch.cat(out)


def measure(
    backbone: nn.Module, targets: list[TransferTarget], autocast, seed: int
) -> tuple[dict[str, dict], float]:
    """Every target's scores for the backbone as it is now, and the seconds they took. The
    backbone runs in eval mode and is put back in the mode it was in."""
    t0 = time.perf_counter()
    mode = backbone.training
    backbone.eval()
    try:
        scores = {
            t.name: transfer_scores(
                (embed(backbone, t.fit, autocast), t.fit.labels),
                (embed(backbone, t.held, autocast), t.held.labels),
                seed=seed,
            )
            for t in targets
        }
    finally:
        backbone.train(mode)
    return scores, time.perf_counter() - t0


def mean_probe_accuracy(transfer: dict[str, dict]) -> float | None:
    """The monitor's ranking score: the mean linear-probe accuracy over targets (None if any
    target could not be scored)."""
    values = [s["linear_probe_accuracy"] for s in transfer.values()]
    return None if not values or None in values else float(np.mean(values))


def best_epochs(history: list[dict]) -> dict:
    """The epoch that transferred best (highest mean probe accuracy; the earlier on a tie) and
    the epoch with the best source test accuracy (the earlier on a tie)."""
    scored = [(r["transfer_mean_probe_accuracy"], -r["epoch"], r) for r in history
              if r.get("transfer_mean_probe_accuracy") is not None]  # fmt: skip
    best_source = max(history, key=lambda r: (r["test_accuracy"], -r["epoch"]))
    out = {
        "best_source_epoch": best_source["epoch"],
        "best_source_test_accuracy": best_source["test_accuracy"],
    }
    if scored:
        score, _, row = max(scored, key=lambda t: t[:2])
        out |= {"best_transfer_epoch": row["epoch"], "best_transfer_mean_probe_accuracy": score}
    return out


def epoch_scalars(row: dict) -> dict[str, float]:
    """An epoch's numbers for the tracker: source/..., transfer/<target>/<score>."""
    out = {f"source/{k}": row[k] for k in ("train_loss", "lr", "test_accuracy", "nc1_train")
           if row.get(k) is not None}  # fmt: skip
    for target, scores in row.get("transfer", {}).items():
        out |= {f"transfer/{target}/{k}": v for k, v in scores.items() if v is not None}
    if row.get("transfer_mean_probe_accuracy") is not None:
        out["transfer/mean_linear_probe_accuracy"] = row["transfer_mean_probe_accuracy"]
    return out


def run_metrics(h: list[dict], m: TransferMonitor) -> dict:
    """The pretrain run's ``metrics.json``: the per-epoch history ``h`` (with ``transfer`` where
    monitored), the best epochs, and the monitor's share of the time."""
    monitor_s = sum(r.get("transfer_seconds", 0.0) for r in h)
    epoch_s = sum(r["epoch_seconds"] for r in h)
    return {
        "history": h,
        **best_epochs(h),
        "transfer_targets": m.transfer_targets,
        "transfer_every": m.transfer_every,
        "monitor_seconds": round(monitor_s, 2),
        "monitor_share_of_epoch": round(monitor_s / epoch_s, 4) if epoch_s else None,
    }
