"""Fine-tune a timm backbone with linear probe, Layer FT, SCL FT or full FT.

    accelerate launch recipes/finetune.py                      # bundled default, offline
    accelerate launch recipes/finetune.py --config recipes/configs/fmnist59_scl.yaml --epochs 5

With no arguments: SCL FT of the bundled resnet18 (pretrained here on Fashion-MNIST classes 0-4)
at block 4 on scikit-learn's digits. Any config key can be overridden as ``--key value``.
Writes ``config.yaml``, TensorBoard logs (loss and lr per optimizer step), checkpoints every
``save_every`` epochs and after the last (``--resume`` continues from the newest), ``metrics.json``
and the tuned weights (``tuned/``) under ``output_dir``. Validation and NC1 run every
``eval_every`` epochs, the test split once at the end.
"""

from __future__ import annotations

import dataclasses
import json
import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import DataLoaderConfiguration, set_seed

import ncfinetune.data as nd
from ncfinetune.errors import NonFiniteOutputs
from ncfinetune.files import finite_json, write_json
from ncfinetune.metrics.modules import load_metric
from ncfinetune.recipes import launch, runs
from ncfinetune.recipes.config import (
    config_file_arg,
    config_text,
    flat_config,
    is_main_process,
    parse_config,
    run_cli,
    save_config,
    section,
)
from ncfinetune.recipes.engine import (
    Stopwatch,
    build_schedule,
    collect_nc1,
    load_training_state,
    save_training_state,
    set_cpu_threads,
    train_epoch,
)
from ncfinetune.recipes.finetune_setup import (
    build_loaders,
    build_tuned,
    run_length_for,
    training_rows,
    tuned_metadata,
)
from ncfinetune.recipes.sections import (
    DownstreamConfig,
    FinetuneData,
    FinetuneRun,
    OptimSection,
    TuningSection,
)
from ncfinetune.training.device import (
    choose_precision,
    launch_device_type,
    use_channels_last,
)
from ncfinetune.training.length import still_high, undertrained_warning
from ncfinetune.training.loop import build_optimizer, diverged, predict_batches

DEFAULTS = Path(__file__).parent / "configs" / "default.yaml"


@dataclass
class FinetuneConfig(DownstreamConfig):
    """The finetune recipe's keys by section (``--help`` lists them; YAML files may group them
    the same way or list them flat)."""

    data: FinetuneData = section(FinetuneData)
    tuning: TuningSection = section(TuningSection)
    optim: OptimSection = section(OptimSection)
    run: FinetuneRun = section(FinetuneRun)


# keys that do not change what is trained (output, evaluation, logging, speed): --resume
# accepts new values for them; every other key must keep its saved value
RESUME_FREE = ("output_dir", "resume", "resume_override", "stop_after", "tracker", "metric", "nc1",
               "eval_every", "test_every", "save_every", "keep_last", "num_workers",
               "cpu_threads", "compile", "channels_last", "prefix_cache")  # fmt: skip
# keys of one invocation: --resume does not take them from the saved config
PER_INVOCATION = ("resume", "resume_override", "stop_after")


def load_config(argv: list[str]) -> FinetuneConfig:
    """The config from the command line over ``--config`` (or ``configs/default.yaml``); with
    ``--resume`` and no ``--config``, over the run's saved ``config.yaml`` instead. Method
    settings the method does not have are reset (with a warning): the record is what ran."""
    defaults = str(DEFAULTS) if DEFAULTS.is_file() else None
    cfg = parse_config(FinetuneConfig, argv, defaults_file=defaults)
    if cfg.run.resume and config_file_arg(argv) is None:
        base = runs.resume_base(Path(cfg.run.output_dir), FinetuneConfig, PER_INVOCATION)
        if base is not None:
            cfg = parse_config(FinetuneConfig, argv, defaults_file=defaults, base=base)
    return dataclasses.replace(cfg, tuning=cfg.tuning.without_unused())


def evaluate(acc, tuned, loader, metric, name: str, split: str, channels_last: bool) -> dict:
    """``{split}_{name}`` (the metric) and ``{split}_samples`` over every sample of a prepared
    ``loader``, each counted once over all processes."""
    res = predict_batches(
        tuned, loader, accelerator=acc, channels_last=channels_last, progress=split
    )  # NaN or infinite logits raise NonFiniteOutputs (train turns it into TrainingDiverged)
    score = metric.compute(predictions=res["preds"], references=res["labels"])[name]
    return {f"{split}_{name}": score, f"{split}_samples": len(res["labels"])}


@dataclass
class Run:
    """A fine-tuning run between :func:`setup`, :func:`train` and :func:`finish`: the config,
    the accelerator, the prepared model, optimizer, schedule and loaders, and the record."""

    cfg: FinetuneConfig
    acc: Accelerator
    precision: str
    precision_source: str
    threads: int
    batch_size: int
    data: Any
    train_idx: Any
    tuned: Any
    opt: Any
    sched: Any
    plan: Any
    loaders: Any  # finetune_setup.Loaders
    channels_last: bool
    block: Any
    lr: float
    selection: dict | None
    history: list = field(default_factory=list)
    start_epoch: int = 0
    steps: int = 0  # optimizer steps done
    overrides: list = field(default_factory=list)
    clock: Stopwatch = field(default_factory=Stopwatch)
    seconds: float = 0.0  # this invocation's wall time in train()
    metric: Any = None  # the test metric (an evaluate module)
    checkpoint_files: dict = field(default_factory=dict)  # the config and launch, per checkpoint
    logit_batch: Any = None  # check_logits' fixed batch, read once
    length: Any = None  # training.length.Length: epochs, steps per epoch and the rule that set them
    step_losses: list = field(default_factory=list)  # this invocation's, for the end-of-run check

    @property
    def out(self) -> Path:
        return Path(self.cfg.run.output_dir)

    @property
    def net(self):
        """The tuned model, unwrapped from accelerate (and torch.compile)."""
        return self.acc.unwrap_model(self.tuned, keep_torch_compile=False)

    @property
    def eval_every(self) -> int:
        return self.cfg.run.eval_every or -(-self.cfg.optim.epochs // 10)  # about 10 a run

    @property
    def save_every(self) -> int:
        return self.cfg.run.save_every or self.eval_every


def main(argv: list[str] | None = None) -> dict:
    cfg = load_config(sys.argv[1:] if argv is None else argv)
    # one run per folder at a time: the main process holds the lock (a refusal there ends the
    # launch; the launcher stops the other processes)
    with runs.run_lock(Path(cfg.run.output_dir), take=is_main_process()):
        run = setup(cfg)
        if not train(run):
            return {"history": run.history, "stopped": True}
        return finish(run)


def start_accelerator(cfg: FinetuneConfig) -> tuple[Accelerator, str, int]:
    """The Accelerator (precision, compilation, tracker, seeded sampler), the seeds set and the
    CPU threads; returns it, where its precision came from, and the threads."""
    # the recipe's mixed_precision when set, else accelerate's own choice (None)
    precision, precision_source = choose_precision(cfg.run.mixed_precision, launch_device_type())
    acc = Accelerator(
        mixed_precision=precision,
        # None leaves accelerate's own setting (`accelerate launch --dynamo_backend`) in charge
        dynamo_backend=cfg.run.compile,
        # no gradient_accumulation_steps: the loop accumulates grad_accum batches itself
        # (ncfinetune.training.loop.fit_batches), which also closes a partial group at max_steps
        log_with=None if cfg.run.tracker in (None, "none") else cfg.run.tracker,
        project_dir=cfg.run.output_dir,
        # accelerate's seedable sampler: `train_dl.set_epoch(e)` reaches it through the
        # per-process shards, so epoch e is shuffled by (seed, e) alone, resumed or not
        dataloader_config=DataLoaderConfiguration(
            use_seedable_sampler=True, data_seed=cfg.run.seed
        ),
    )
    set_seed(cfg.run.seed)
    return acc, precision_source, set_cpu_threads(acc, cfg.run.cpu_threads)


def setup(cfg: FinetuneConfig) -> Run:
    """Everything before the first epoch: the output folder checked (a run never overwrites
    another; --resume continues one only with the config it trained with), accelerate started,
    data and model loaded (block and lr chosen where auto), loaders, optimizer and schedule
    prepared, a resumed run's state restored, and the config saved."""
    out = Path(cfg.run.output_dir)
    resume = None
    if cfg.run.resume:
        resume = runs.check_resume(
            out, cfg, ignore=RESUME_FREE, override=cfg.run.resume_override or ()
        )
    else:
        runs.check_fresh_start(out)
    acc, precision_source, threads = start_accelerator(cfg)
    precision = acc.mixed_precision  # what runs, whoever chose it
    # batch_size is per process; a global batch is split over processes and accumulation
    o = cfg.optim
    batch_size = launch.per_process_batch(
        o.batch_size, o.global_batch_size, acc.num_processes, o.grad_accum
    )
    global_batch = batch_size * acc.num_processes * o.grad_accum
    if resume is not None:  # another launch: refused, or with --resume_override launch recorded
        relaunch = runs.check_launch(
            resume.checkpoint, acc.num_processes, global_batch,
            allow="launch" in (cfg.run.resume_override or ()),
        )  # fmt: skip
        resume.changed.update(relaunch or {})
    data = cfg.load_data()
    train_idx, val_idx = training_rows(cfg, data)
    # epochs null: the default length for this much data; config.yaml records the epochs run
    num_train = data.num_training_rows(train_idx)
    length = run_length_for(acc, cfg, num_train)
    cfg = dataclasses.replace(cfg, optim=dataclasses.replace(o, epochs=length.epochs))
    o = cfg.optim
    model, tuned, block, lr, selection = build_tuned(acc, cfg, data, train_idx, precision)
    channels_last = use_channels_last(model, cfg.run.channels_last)
    if channels_last:
        tuned.to(memory_format=torch.channels_last)
    loaders, cache_note = build_loaders(cfg, model, tuned, data, train_idx, val_idx, batch_size)
    opt = build_optimizer(tuned, o.optimizer, lr, o.momentum, o.weight_decay)
    # train_eval stays unprepared: NC1 takes each process's share of it (loop.collect_nc1)
    tuned, opt, loaders.train, loaders.test = acc.prepare(tuned, opt, loaders.train, loaders.test)
    if loaders.val is not None:
        loaders.val = acc.prepare(loaders.val)
    # as long as the run's optimizer steps, counted on the prepared (per-process) loader: the
    # lr reaches min_lr at the end for any number of processes, grad_accum and max_steps
    sched, plan = build_schedule(
        acc, opt, loaders.train, epochs=o.epochs, min_lr=o.min_lr,
        grad_accum=o.grad_accum, max_steps=o.max_steps,
    )  # fmt: skip
    run = Run(
        cfg, acc, precision, precision_source, threads, batch_size, data, train_idx, tuned,
        opt, sched, plan, loaders, channels_last, block, lr, selection,
    )  # fmt: skip
    run.metric = load_metric(cfg.run.metric)
    # as counted on the prepared loaders (run_length_for predicts the same count)
    run.length = dataclasses.replace(length, steps_per_epoch=plan.steps_per_epoch)
    run.checkpoint_files = runs.checkpoint_files(config_text(cfg), acc.num_processes, global_batch)
    if resume is not None:  # checked above: it continues with the saved config
        restore(run, resume)
    record_start(run, cache_note)
    return run


def restore(run: Run, resume: runs.Resume) -> None:
    """Load a resumed run's checkpoint into ``run``; with resume_override, retarget the
    schedule to the new epochs/lr and record the change."""
    acc, sched = run.acc, run.sched
    fresh = getattr(sched, "scheduler", sched).state_dict()  # the current config's schedule
    load_training_state(acc, resume.checkpoint, sched)
    run.start_epoch, run.history = resume.epoch, resume.history
    # the optimizer steps done (under the launch that did them)
    run.steps = (resume.history or [{}])[-1].get("step", resume.epoch * run.plan.steps_per_epoch)
    acc.print(f"resumed from {resume.checkpoint} (epoch {resume.epoch})")
    if resume.epoch >= run.cfg.optim.epochs:
        acc.print(
            f"every epoch ({resume.epoch}) was checkpointed but the outputs were not written: "
            "writing tuned/ and metrics.json from the last checkpoint"
        )
    if resume.changed:  # resume_override: the schedule the new epochs/lr/launch ask for
        left = (run.cfg.optim.epochs - resume.epoch) * run.plan.steps_per_epoch
        runs.retarget_schedule(sched, {**fresh, "T_max": run.steps + left})
        acc.print(
            "resume_override: "
            + ", ".join(f"{k} {a} -> {b}" for k, (a, b) in resume.changed.items())
            + "; the cosine schedule continues as the new one from this step"
        )
    if acc.is_main_process:
        run.overrides = runs.record_override(run.out, resume)


def record_start(run: Run, cache_note: str) -> None:
    """Save config.yaml (and selection.json: what --resume reuses), start the tracker and
    print what is trained, on what, how."""
    cfg, acc, out = run.cfg, run.acc, run.out
    if acc.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
        save_config(cfg, out / "config.yaml")  # each checkpoint keeps its own copy too
        if run.selection is not None:
            record = {"method": run.net.method, "block": run.block, "lr": run.lr, **run.selection}
            write_json(out / "selection.json", record, None)
    if cfg.run.tracker not in (None, "none"):
        acc.init_trackers("finetune", config={k: str(v) for k, v in flat_config(cfg).items()})
    acc.print(
        f"{run.net.describe()}\ndata: {nd.describe(run.data)}; training on "
        f"{len(run.loaders.train.dataset)} images\nlength: {run.length.describe()}"
        f"\nprefix cache: {cache_note}"
        f"\nmixed precision: {run.precision}; channels_last: {run.channels_last}; "
        f"compile: {compiled(acc)}"
        + (f"; {run.threads} CPU threads per process" if acc.device.type == "cpu" else "")
    )


def compiled(acc: Accelerator) -> str:
    """The torch.compile backend accelerate uses ("no" unless one was set)."""
    return acc.state.dynamo_plugin.backend.value.lower()


def train(run: Run) -> bool:
    """The epochs from ``run.start_epoch``: train, evaluate at the cadence, log, checkpoint.
    Returns False when stopped early by stop_after (the run can be resumed)."""
    cfg, acc = run.cfg, run.acc
    start = time.time()
    for epoch in range(run.start_epoch, cfg.optim.epochs):
        n, last = epoch + 1, epoch + 1 == cfg.optim.epochs
        stop = bool(cfg.run.stop_after) and n >= cfg.run.stop_after and not last
        row = train_one_epoch(run, epoch)
        try:  # NaN/inf logits: on a fixed batch after every epoch, and at every evaluation
            check_logits(run)
            evaluate_epoch(run, row, n, last)
        except NonFiniteOutputs as err:
            what = f"the logits became NaN or infinite on {err.rows} of {err.total} images"
            raise diverged(what, run.steps, row["lr"], f" (evaluated after epoch {n})") from err
        run.history.append(row)
        scalars = {k: v for k, v in row.items() if k != "step" and isinstance(v, int | float)}
        acc.log(scalars, run.steps)
        shown = {k: round(v, 4) if isinstance(v, float) else v for k, v in row.items()}
        acc.print(json.dumps(finite_json(shown)))
        if n % run.save_every == 0 or last or stop:
            with run.clock("checkpoints"):
                save_training_state(
                    acc, run.out / "checkpoints", n, run.history, scheduler=run.sched,
                    keep_last=cfg.run.keep_last, extra=run.checkpoint_files,
                )  # fmt: skip
        if stop:
            acc.print(f"stopping after epoch {n} (stop_after); continue with --resume")
            acc.end_training()
            return False
    run.seconds = time.time() - start
    return True


def check_logits(run: Run) -> None:
    """Raise NonFiniteOutputs (on every process) when the logits of a small fixed batch, the
    first batch of the training rows in order, are NaN or infinite: finite weights can still
    overflow, and a loss that was finite before the last step does not show it."""
    if run.logit_batch is None:
        x, y = next(iter(run.loaders.train_eval))
        run.logit_batch = (x[:8], y[:8])
    predict_batches(
        run.tuned, [run.logit_batch], accelerator=run.acc, channels_last=run.channels_last
    )


def train_one_epoch(run: Run, epoch: int) -> dict:
    """One epoch of optimizer steps (a NaN/inf loss raises TrainingDiverged: nothing of the
    epoch is logged or saved); returns the epoch's row of the history."""
    cfg, acc = run.cfg, run.acc
    run.loaders.train.set_epoch(epoch)  # resumes at an epoch boundary: no batches to skip
    stats = train_epoch(
        acc, run.tuned, run.loaders.train, run.opt, run.sched, grad_accum=cfg.optim.grad_accum,
        max_steps=cfg.optim.max_steps, desc=f"epoch {epoch + 1}/{cfg.optim.epochs}",
        channels_last=run.channels_last, steps_before=run.steps,
    )  # fmt: skip
    run.clock.add("train", stats.seconds)
    run.step_losses += [float(v) for v in stats.step_losses]
    for i, (loss, step_lr) in enumerate(zip(stats.step_losses, stats.lrs, strict=True)):
        acc.log({"train/loss": loss, "train/lr": step_lr}, step=run.steps + i + 1)
    run.steps += stats.steps
    return {"epoch": epoch + 1, "step": run.steps, "train_loss": stats.loss,
            "lr": stats.lrs[-1], "train_images_per_s": stats.images_per_s}  # fmt: skip


def evaluate_epoch(run: Run, row: dict, n: int, last: bool) -> None:
    """Validation and NC1 every eval_every epochs and after the last, the test split after the
    last (and every test_every), into ``row``."""
    cfg, acc, metric, name = run.cfg, run.acc, run.metric, run.cfg.run.metric
    if n % run.eval_every == 0 or last:
        if run.loaders.val is not None:
            with run.clock("validation"):
                row |= evaluate(
                    acc, run.tuned, run.loaders.val, metric, name, "val", run.channels_last
                )
        if cfg.run.nc1:
            with run.clock("nc1"):
                row["nc1_train"] = collect_nc1(
                    acc, run.tuned, run.loaders.train_eval, channels_last=run.channels_last,
                    progress="NC1",
                )  # fmt: skip
            if row["nc1_train"] is not None and math.isnan(row["nc1_train"]):  # all agree
                what = "the training images' penultimate features became NaN or infinite"
                raise diverged(what, run.steps, row["lr"], f" (evaluated after epoch {n})")
    if last or (cfg.run.test_every and n % cfg.run.test_every == 0):  # the test split: at the end
        with run.clock("test"):
            row |= evaluate(
                acc, run.tuned, run.loaders.test, metric, name, "test", run.channels_last
            )


def run_metrics(run: Run) -> dict:
    """What ``metrics.json`` records of a finished run."""
    cfg, acc, net, last, name = run.cfg, run.acc, run.net, run.history[-1], run.cfg.run.metric
    trainable, total = net.parameter_counts()
    num_train = run.data.num_training_rows(run.train_idx)
    return {
        "test_" + name: last["test_" + name],
        "nc1_train": last.get("nc1_train"),
        "trainable_params": trainable,
        "total_params": total,
        "trainable_percent": 100 * trainable / total,
        "method": net.method,  # what ran (--method auto: the chosen one)
        "block": net.block_index,
        "block_name": net.block_name,
        "bn": net.bn,
        "model": cfg.backbone.model,
        "dataset": cfg.data.dataset,
        "num_train": num_train,
        "num_test": len(run.data.test),
        "test_samples_evaluated": last["test_samples"],
        "val_" + name: last.get("val_" + name),  # null: no validation rows
        "num_val": last.get("val_samples", 0),
        "epochs": cfg.optim.epochs,
        "length_rule": run.length.rule,  # given | epochs | min_steps | max_steps (length.py)
        "min_steps": cfg.optim.min_steps,
        "grad_accum": cfg.optim.grad_accum,
        "optimizer_steps": run.steps,  # epochs x ceil(min(batches, max_steps) / grad_accum)
        "steps_per_epoch": run.plan.steps_per_epoch,
        "final_lr": run.opt.param_groups[0]["lr"],  # where the schedule ended: min_lr
        "eval_every": run.eval_every,
        "save_every": run.save_every,
        "wall_time_s": run.seconds,
        "time_s": run.clock.seconds,  # this invocation's training, evaluations, checkpoints
        "train_images_per_s": sum(h["train_images_per_s"] for h in run.history) / len(run.history),
        "num_processes": acc.num_processes,
        "cpu_threads": run.threads if acc.device.type == "cpu" else None,
        "prefix_cache": net.prefix_inputs,
        "mixed_precision": run.precision,
        "mixed_precision_from": run.precision_source,  # recipe (its key) | accelerate
        "batch_size_per_process": run.batch_size,
        "global_batch_size": run.batch_size * acc.num_processes * cfg.optim.grad_accum,
        "channels_last": run.channels_last,
        "compile": compiled(acc),
        "lr": run.lr,
        "selection": run.selection,  # --block auto / --lr auto: what was chosen, at what cost
        "resume_overrides": run.overrides,  # --resume_override: what changed, at which epoch
        # the training loss left at the end (last tenth / first tenth of this invocation's
        # steps) when it is high: an undertrained run (null: it is not)
        "loss_left": still_high(run.step_losses),
        "history": run.history,
    }


def finish(run: Run) -> dict:
    """Save the tuned weights and metrics.json, print the summary, end accelerate; returns the
    metrics."""
    cfg, acc, net, out = run.cfg, run.acc, run.net, run.out
    metrics = run_metrics(run)
    if acc.is_main_process:
        net.save_pretrained(
            out / "tuned", base_model=cfg.backbone.model, metadata=tuned_metadata(cfg, run.data)
        )
        write_json(out / "metrics.json", metrics)  # strict JSON: a NaN/inf is written as null
        nc = f"{metrics['nc1_train']:.3f}" if metrics["nc1_train"] is not None else "n/a"
        name = cfg.run.metric
        print(
            f"\n== {net.describe()}\n"
            f"   {cfg.data.dataset}: {metrics['num_train']} training images, "
            f"{metrics['num_test']} test images\n"
            f"   test {name} {100 * metrics['test_' + name]:.2f}%   penultimate NC1 (train) {nc}"
            f"   trainable {metrics['trainable_percent']:.2f}%\n"
            f"   {cfg.optim.epochs - run.start_epoch} epochs in {run.seconds:.1f}s "
            f"({metrics['train_images_per_s']:.0f} img/s); outputs in {out}/"
            + undertrained_warning(metrics["loss_left"], cfg.optim.epochs, run.steps)
        )
    acc.end_training()
    return metrics


if __name__ == "__main__":
    run_cli(main)
