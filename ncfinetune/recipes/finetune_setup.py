"""The finetune recipe's setup, piece by piece: the training and validation rows (from the
training split only), the loaders (as frozen-prefix outputs where that is legal), the block and
lr choice of ``--block auto`` / ``--lr auto`` (the same code path as the select recipe), and
what the tuned folder records beside the weights."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import ncfinetune.data as nd
import ncfinetune.selection
from ncfinetune.errors import ConfigError, DataError
from ncfinetune.recipes import launch
from ncfinetune.recipes.config import flat_config
from ncfinetune.recipes.engine import latest_training_state
from ncfinetune.training.device import loop_precision
from ncfinetune.training.length import Length, run_length
from ncfinetune.tuning.model import get_tuned_model
from ncfinetune.tuning.prefix_cache import CacheTooLarge, prefix_blocker, prefix_loader

if TYPE_CHECKING:
    from ncfinetune.recipes.finetune import FinetuneConfig


def training_rows(cfg: FinetuneConfig, data):
    """(training rows or None for all, validation rows or None), from the training split only:
    the test split stays whole."""
    labels = data.labels("train")
    train_idx = None
    if cfg.data.per_class or cfg.data.train_size:
        train_idx = nd.balanced_subset(
            labels, per_class=cfg.data.per_class, total=cfg.data.train_size, seed=cfg.run.seed
        )
    return validation_rows(labels, train_idx, cfg.data.val_fraction, cfg.run.seed)


def validation_rows(labels, train_idx, fraction: float | None, seed: int):
    """(training rows, validation rows or None), both from the training split (never the test
    split). ``fraction`` None (auto): with a subset, as many rows outside it as it holds (at
    least 100, as available; none when fewer than 2 per class remain); without, none."""
    if fraction == 0 or (fraction is None and train_idx is None):
        return train_idx, None
    if train_idx is None:  # the whole split: hold the share out of training
        return nd.validation_split(labels, fraction, seed=seed)
    if fraction is None:
        free = len(labels) - len(train_idx)
        if free < 2 * len(set(labels.tolist())):
            return train_idx, None
        fraction = min(max(len(train_idx), 100), free - 1)
    return train_idx, nd.validation_split(labels, fraction, seed=seed, exclude=train_idx)[1]


@dataclass
class Loaders:
    """The run's loaders: training (shuffled), the training rows in order (NC1), test and
    validation (None without validation rows)."""

    train: Any
    train_eval: Any
    test: Any
    val: Any


def build_loaders(cfg: FinetuneConfig, model, tuned, data, train_idx, val_idx, batch_size):
    """The run's :class:`Loaders` (as frozen-prefix outputs where that is legal and not turned
    off) and a note saying whether the prefix cache is on and why."""
    eval_tf = nd.build_transforms(model, image_size=cfg.data.image_size, augment=False)
    train_tf = nd.build_transforms(model, image_size=cfg.data.image_size, augment=cfg.data.augment)
    kw = {"batch_size": batch_size, "num_workers": cfg.run.num_workers}
    loaders = Loaders(
        nd.build_loader(
            data.train, train_tf, shuffle=True, seed=cfg.run.seed, indices=train_idx, **kw
        ),
        nd.build_loader(data.train, eval_tf, shuffle=False, indices=train_idx, **kw),
        nd.build_loader(data.test, eval_tf, shuffle=False, **kw),
        None
        if val_idx is None
        else nd.build_loader(data.train, eval_tf, shuffle=False, indices=val_idx, **kw),
    )
    if cfg.run.prefix_cache is False:
        return loaders, "off (prefix_cache: false)"
    try:
        return cached_loaders(tuned, loaders), "on: the frozen prefix runs once per image"
    except (ConfigError, DataError, CacheTooLarge) as err:
        if cfg.run.prefix_cache:
            raise ConfigError(f"prefix_cache: true, but {err}") from err
        return loaders, f"off ({err})"


def cached_loaders(tuned, loaders: Loaders) -> Loaders:
    """The loaders as prefix outputs computed once per image (raises where that is not legal:
    a BatchNorm adapting in the prefix, augmentation, data too large)."""
    blocker = prefix_blocker(tuned)
    if blocker is not None:
        raise ConfigError(blocker)
    train = prefix_loader(loaders.train, tuned)
    cached = Loaders(
        train,
        prefix_loader(loaders.train_eval, tuned, share_with=train),  # same rows, same positions
        prefix_loader(loaders.test, tuned),
        None if loaders.val is None else prefix_loader(loaders.val, tuned),
    )
    tuned.prefix_inputs = True
    return cached


def build_tuned(acc, cfg: FinetuneConfig, data, train_idx, precision: str):
    """The backbone on the accelerator's device and the tuned model, the method, block and lr
    chosen first where they are auto (or read back when resuming). Returns (model, tuned,
    block, lr, selection record or None)."""
    out = Path(cfg.run.output_dir)
    model = cfg.load_model(data.num_classes).to(acc.device)  # selection probes run there too
    eval_tf = nd.build_transforms(model, image_size=cfg.data.image_size, augment=False)
    t = cfg.tuning
    method, block, lr, selection = t.method, t.tuned_block(), cfg.optim.lr, None
    auto = "auto" in (method, block, lr)
    resuming = cfg.run.resume and latest_training_state(out / "checkpoints")
    if auto and not resuming and method == "auto":
        method, block, lr, selection = choose_method(
            acc, cfg, model, data, train_idx, eval_tf, precision, out
        )
    elif auto and not resuming:
        block, lr, selection = choose_block_and_lr(
            acc, cfg, model, data, train_idx, eval_tf, precision, out
        )
    elif auto:  # resuming: the choice made before the interruption
        method, block, lr = read_selection(out, method, block, lr)
    settings = {k: v for k, v in t.settings_for(method).items() if k != "block"}
    tuned = get_tuned_model(model, method, block=block, **settings)
    return model, tuned, block, lr, selection


def run_length_for(acc, cfg: FinetuneConfig, num_train: int) -> Length:
    """The run's length (``ncfinetune.training.length.run_length``: the given epochs, else the
    default rule), with its optimizer steps per epoch counted as ``engine.build_schedule``
    counts them on the prepared loaders, before they exist: each process takes
    ceil(rows / (batch x processes)) batches, at most ``max_steps``, in groups of grad_accum."""
    o = cfg.optim
    per_step = launch.per_process_batch(
        o.batch_size, o.global_batch_size, acc.num_processes, o.grad_accum
    )
    batches = -(-num_train // (per_step * acc.num_processes))
    if o.max_steps is not None:
        batches = min(batches, o.max_steps)
    return run_length(
        -(-batches // o.grad_accum), o.epochs, min_steps=o.min_steps,
        capped=o.max_steps is not None,
    )  # fmt: skip


def choose_method(acc, cfg, model, data, train_idx, eval_tf, precision, out: Path):
    """--method auto: method, block and lr by ``ncfinetune.selection.select_method`` on (a
    class-balanced sample of) the training subset, compared at the run's own steps; the main
    process selects, the others receive its choice. Writes ``method_selection.json``. Returns
    (method, block, lr, record)."""
    from accelerate.utils import broadcast_object_list

    found = [None, None, None, None]
    if acc.is_main_process:
        num_train = data.num_training_rows(train_idx)
        plan = ncfinetune.selection.select_method_on_split(
            model, data, eval_tf, train_idx,
            steps=run_length_for(acc, cfg, num_train).steps,
            max_images=cfg.tuning.select_max_images,
            max_trainable_percent=cfg.tuning.select_max_percent,
            bn=cfg.tuning.bn,
            seed=cfg.run.seed,
            precision=loop_precision(precision),
            device=acc.device,
        )  # fmt: skip
        plan.save_json(out / "method_selection.json")
        print(plan, flush=True)
        record = {
            "method": plan.method, "block": plan.block, "lr": plan.lr, "reason": plan.reason,
            "seconds": plan.seconds, "images_processed": plan.images_processed,
            "budget_note": plan.budget_note,
        }  # fmt: skip
        found = [plan.method, plan.block, plan.lr, record]
    if acc.num_processes > 1:
        broadcast_object_list(found)
    return found


def choose_block_and_lr(acc, cfg, model, data, train_idx, eval_tf, precision, out: Path):
    """--block auto and/or --lr auto, on (a class-balanced sample of) the training subset only,
    through the same code path as ``ncfinetune.select_block`` and ``recipes/select_block.py``.
    The main process selects; the others receive its choice. Returns (block, lr, record)."""
    from accelerate.utils import broadcast_object_list

    block = cfg.tuning.tuned_block()
    found = [block, cfg.optim.lr, None]
    if acc.is_main_process:
        common = {
            "max_images": cfg.tuning.select_max_images,
            "method": cfg.tuning.method,
            "bn": cfg.tuning.bn,
            "seed": cfg.run.seed,
            "precision": loop_precision(precision),  # the probes: as the fine-tune runs
            "device": acc.device,  # where the fine-tune runs
        }
        if block == "auto":  # the probes run at the selection's default lr unless lr: auto
            sel = ncfinetune.selection.select_block_on_split(
                model,
                data,
                eval_tf,
                train_idx,
                rule=cfg.tuning.select_rule,
                lr="auto" if cfg.optim.lr == "auto" else ncfinetune.selection.PROBE_LR,
                max_trainable_percent=cfg.tuning.select_max_percent,
                **common,
            )
            sel.save(out)
            found = [
                sel.chosen,
                cfg.optim.lr if sel.lr is None else sel.lr,
                {
                    "rule": sel.rule,
                    "block": sel.chosen,
                    "lr": sel.lr,
                    "seconds": sel.seconds,
                    "images_processed": sel.images_processed,
                },
            ]
        else:
            sel = ncfinetune.selection.select_lr_on_split(
                model, data, eval_tf, train_idx, block=block, **common
            )
            found = [
                block,
                sel.lr,
                {"lr": sel.lr, "seconds": sel.seconds, "images_processed": sel.images_processed},
            ]
        print(sel, flush=True)
    if acc.num_processes > 1:
        broadcast_object_list(found)
    return found


def read_selection(out: Path, method, block, lr):
    """The method, block and lr chosen before an interruption (``selection.json``)."""
    path = out / "selection.json"
    if not path.is_file():
        raise ConfigError(
            f"--resume with method/block/lr auto needs {path}, written when the choice was "
            "made; it is missing. Start afresh (without --resume) or pass the method, block and lr."
        )
    saved = json.loads(path.read_text())
    if method == "auto":  # the method chose its block and lr too
        return saved["method"], saved["block"], saved["lr"]
    return (
        method,
        saved["block"] if block == "auto" else block,
        saved["lr"] if lr == "auto" else lr,
    )


def tuned_metadata(cfg: FinetuneConfig, data) -> dict:
    """What ``tuned/tuned_config.json`` records beside the weights so that the folder alone
    rebuilds the model and its inputs (``ncfinetune.inference``, ``recipes/eval.py``)."""
    keys = flat_config(cfg)
    return {
        "base_model_kwargs": {"pretrained": keys["pretrained"], "checkpoint": keys["checkpoint"]},
        "image_size": cfg.data.image_size,
        "class_names": list(data.class_names),
        "data": {
            k: keys[k]
            for k in ("dataset", "data_dir", "image_column", "label_column", "classes")
            + ("test_fraction", "seed", "allow_outside_paths", "skip_unreadable")
        },
    }
