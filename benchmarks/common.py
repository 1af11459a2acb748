"""Shared settings and the one fine-tuning run every benchmark question is made of.

Each run is a record: one line of a JSON Lines file per benchmark, backbone and target
(``Run.file``: ``benchmarks/results/runs/<backbone>/<target>.jsonl`` for the method benchmarks),
keyed by its settings (``Run.key``), holding the config, the metrics, trainable parameters, wall
time, images/s, package versions and the seed. Lines are sorted by key, so a new run is a
one-line diff. A run whose record exists is skipped (``force=True`` redoes it), so every script
can be stopped and started again and only the missing runs are done; records are written with
``upsert_record`` (atomic, under a lock, so benchmark processes may run side by side). Full
fine-tuning is just another method.

Protocol (SPEC section 5): class-balanced nested subsets of the downstream training split
(``ncfinetune.data.balanced_subset``), the full test split, SGD momentum 0.9, weight decay 1e-4,
cosine schedule from the learning rate down to 1e-4, images at the backbone's 32 px. Every
run gets the same budget of optimizer steps whatever the subset size, so methods and sizes
are compared at equal compute. Images are decoded once per backbone and target and cached as
uint8 tensors under ``benchmarks/.cache`` (not committed); no augmentation.

Where the frozen prefix is a pure function of the input (the ViT: no BatchNorm, no dropout;
``ncfinetune.tuning.prefix_cache.prefix_blocker``), runs train and evaluate from a
``PrefixCache`` shared by every run of the same backbone, target and block in the process:
each image's prefix is computed once. Results equal the uncached path up to float rounding
(``tests/test_prefix_cache.py``); the record says whether the cache was used. The resnet18 runs
keep the paper's BN policy (statistics adapt, ``bn="update"``), so they never use it.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import platform
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

import ncfinetune
from ncfinetune import data as nd
from ncfinetune.backbones.hub import create_backbone
from ncfinetune.files import atomic_write, finite_json
from ncfinetune.metrics import nc1_or_none
from ncfinetune.training import evaluate_rows, train_steps
from ncfinetune.training.device import is_conv_net
from ncfinetune.tuning.methods import method_class
from ncfinetune.tuning.prefix_cache import PrefixCache, prefix_blocker, prefix_stop

ROOT = Path(__file__).resolve().parent
RESULTS = ROOT / "results"
RUNS = RESULTS / "runs"
CACHE = ROOT / ".cache"

# -- shared settings ------------------------------------------------------------------------------
BACKBONES = {
    # the paper's middle block of resnet18 is index 4 (layer3.0); stage-first blocks 0, 2, 4, 6
    "resnet18": {"model": "resnet18_fmnist04", "middle": 4, "blocks": [0, 2, 4, 6]},
    # ViT-Tiny, 12 blocks: the same depth fractions 0, 1/4, 1/2, 3/4 as resnet18's 0, 2, 4, 6
    "vit_tiny": {"model": "vit_tiny_fmnist04", "middle": 6, "blocks": [0, 3, 6, 9]},
    # issue 17: ViT-Tiny width 192, 6 blocks, 4x4 patches, distilled from resnet18 (bundled
    # vit_tiny_p4_fmnist04); blocks at depth fractions 0, 1/4, 1/2, 3/4 (floor of 6 x fraction)
    # one of its 6 blocks is 16.6% of the parameters, so block selection may train up to 20%
    "vit_p4": {
        "model": "vit_tiny_p4_fmnist04",
        "middle": 3,
        "blocks": [0, 1, 3, 4],
        "select_max_percent": 20.0,
    },
    # a second source split (issue 13): resnet18 pretrained here on Fashion-MNIST classes 5-9
    # (recipes/configs/pretrain/resnet18_fmnist59.yaml; not shipped, built by the benchmark)
    "resnet18_src59": {
        "model": str(ROOT / ".cache" / "pretrain_resnet18_fmnist59"),
        "middle": 4,
        "blocks": [0, 2, 4, 6],
    },
}
TARGETS = {
    "fmnist59": {"dataset": "fashion_mnist", "classes": [5, 6, 7, 8, 9]},
    "digits": {"dataset": "digits", "classes": None},  # ~143 training images per class
    # input shifts of the same data (applied to the decoded uint8 images, train and test alike)
    "fmnist59_inv": {"dataset": "fashion_mnist", "classes": [5, 6, 7, 8, 9], "shift": "invert"},
    "digits_rot90": {"dataset": "digits", "classes": None, "shift": "rot90"},
    "fmnist59_lowc": {"dataset": "fashion_mnist", "classes": [5, 6, 7, 8, 9], "shift": "blur_lowc"},
    # the source classes of the bundled backbones: a target for the classes 5-9 backbone
    "fmnist04": {"dataset": "fashion_mnist", "classes": [0, 1, 2, 3, 4]},
}


def apply_shift(images: torch.Tensor, shift: str | None) -> torch.Tensor:
    """An input shift on uint8 N x C x H x W images: inverted intensities, rotation by 90
    degrees, or a 3x3 blur at a third of the contrast (around mid-grey)."""
    if shift is None:
        return images
    if shift == "invert":
        return 255 - images
    if shift == "rot90":
        return torch.rot90(images, 1, dims=(2, 3)).contiguous()
    if shift == "blur_lowc":
        x = torch.nn.functional.avg_pool2d(
            images.float(), 3, stride=1, padding=1, count_include_pad=False
        )
        return (128 + (x - 128) / 3).round().clamp(0, 255).to(torch.uint8)
    raise ValueError(f"unknown shift {shift!r}")


# the backbones and targets of the method benchmarks (small_data, method_block, lr_grid, the
# summary); the others serve block selection (selection_loto.py)
MAIN_BACKBONES = ["resnet18", "vit_p4"]
MAIN_TARGETS = ["fmnist59", "digits"]
SIZES = {"fmnist59": [2, 5, 10, 20, 50, 100, 500], "digits": [2, 5, 10, 20, 50, 100]}
METHODS = ["linear", "layer", "scl", "full"]
SEEDS = [0, 1, 2]
LR_GRID = [0.1, 0.03, 0.01, 0.003]
PAPER_LR = 0.1  # SGD lr 0.1 for every method (paper App. B)
LR_SELECT_SIZE = 20  # per class: the size the learning rate is chosen at, reused for all sizes
TABLE_SIZES = [10, 20, 100]  # per class: the method x block table (and selection regret)
PAPER_LR_SIZES = [10, 100]  # per class: the table at the paper's fixed lr
STEPS = 150  # optimizer steps per run, every size
BATCH = 32
VAL_MAX = 1000  # validation images for the learning-rate choice, outside the subset


@dataclass(frozen=True)
class Run:
    """One fine-tuning run; its fields name its record."""

    backbone: str
    target: str
    method: str
    block: int | None
    per_class: int
    seed: int
    lr: float
    steps: int = STEPS
    batch: int = BATCH
    validate: bool = False  # also measure accuracy on a validation split outside the subset
    bn: str | None = None  # BatchNorm policy; None = the paper's "update"
    skip_norm: bool | None = None  # ViT SCL: None = the library default (skip through the norm)
    precision: str = "no"  # "bf16": autocast (+ channels_last for conv nets); see training.device
    test_max: int | None = None  # evaluate on a fixed class-balanced sample of the test split
    # budget.py: the wall-clock budget (a multiple of full FT's 150 steps) that set ``steps``;
    # such a run fills its own prefix cache, so its training time includes the prefix outputs
    budget: float | None = None
    optimizer: str = "sgd"  # issue 27's ViT question: "adamw" (timm's, as build_optimizer)
    # a benchmark whose records live apart (results/<bench>/runs), e.g. "train_length"
    bench: str | None = None
    head_warmup: int = 0  # LP-FT (issue 27): the first steps train the classifier alone

    @property
    def key(self) -> str:
        block = f"-b{self.block}" if method_class(self.method).tunes_block else ""
        val = "-val" if self.validate else ""
        extra = (
            (f"-bn{self.bn}" if self.bn else "")
            + ("" if self.skip_norm is None else f"-skipnorm{int(self.skip_norm)}")
            + ("" if self.precision == "no" else f"-{self.precision}")
            + ("" if self.test_max is None else f"-test{self.test_max}")
            + ("" if self.budget is None else f"-budget{self.budget:g}")
            + ("" if self.optimizer == "sgd" else f"-{self.optimizer}")
            + (f"-lp{self.head_warmup}" if self.head_warmup else "")
        )
        return (
            f"{self.method}{block}-n{self.per_class}-s{self.seed}-lr{self.lr:g}"
            f"-t{self.steps}-bs{self.batch}{val}{extra}"
        )

    @property
    def file(self) -> Path:
        """The JSON Lines file that holds this run's record, one per benchmark, backbone and
        target: ``budget.py``'s runs, ``selection_loto.py``'s grid (scored on ``test_max``
        test images), ``--quick`` runs (a shorter budget, not committed), and the rest (the
        method benchmarks) under ``RUNS``."""
        if self.bench is not None:
            root = RESULTS / self.bench / "runs"
        elif self.budget is not None:
            root = RESULTS / "budget" / "runs"
        elif self.optimizer != "sgd":
            root = RESULTS / "vit_gap" / "runs"
        elif self.steps != STEPS:
            root = RESULTS / "quick"
        elif self.test_max is not None:
            root = RESULTS / "selection_loto" / "runs"
        else:
            root = RUNS
        return root / self.backbone / f"{self.target}.jsonl"


def run_for(backbone, target, method, per_class, seed, lr, block=None, **kw) -> Run:
    """A Run with the block normalised: none for linear/full, the middle block by default."""
    if not method_class(method).tunes_block:
        block = None
    elif block is None:
        block = BACKBONES[backbone]["middle"]
    return Run(backbone, target, method, block, per_class, seed, lr, **kw)


# -- data, decoded once -----------------------------------------------------------------------------
_DATA: dict[tuple[str, str], dict] = {}


def load_data(backbone: str, target: str) -> dict:
    """Decoded train/test tensors of a target in the backbone's input format (memory + disk cache)."""
    if (backbone, target) in _DATA:
        return _DATA[(backbone, target)]
    spec = BACKBONES[backbone]
    model = create_backbone(spec["model"], 10)
    tf = nd.build_transforms(model, image_size=spec.get("image_size"), augment=False)
    tag = hashlib.sha256(repr(tf).encode()).hexdigest()[:10]  # what decoding depends on
    path = CACHE / f"{target}-{'x'.join(map(str, tf.input_size))}-{tag}.pt"
    shift = TARGETS[target].get("shift")
    if path.is_file():
        saved = torch.load(path, weights_only=True)
    else:
        tspec = TARGETS[target]
        data = nd.load_image_dataset(tspec["dataset"], seed=0)
        if tspec["classes"]:
            data = nd.select_classes(data, tspec["classes"])
        saved = {}
        for split in ("train", "test"):
            dataset = getattr(data, split)
            cache = nd.TensorCache.build(
                dataset, tf, image_column=data.image_column, label_column=data.label_column
            )
            saved[split] = (apply_shift(cache.images, shift), cache.labels)
        saved["num_classes"] = data.num_classes
        atomic_write(path, lambda tmp: torch.save(saved, tmp))
    out = {
        "train": nd.TensorCache(*saved["train"], tf),
        "test": nd.TensorCache(*saved["test"], tf),
        "num_classes": saved["num_classes"],
    }
    _DATA[(backbone, target)] = out
    return out


def subset(data: dict, per_class: int, seed: int) -> np.ndarray:
    return nd.balanced_subset(data["train"].labels.numpy(), per_class=per_class, seed=seed)


def val_split(data: dict, train_idx: np.ndarray, seed: int) -> np.ndarray:
    """Validation rows from the training split outside the subset (never the test split)."""
    labels = data["train"].labels.numpy()
    rest = len(labels) - len(train_idx)
    fraction = min(0.5, VAL_MAX / rest)
    return nd.validation_split(labels, fraction, seed=seed, exclude=train_idx)[1]


# frozen-prefix caches shared by the runs of this process: (backbone, target, split, stop)
_PREFIX: dict[tuple, PrefixCache] = {}


def shared_prefix(run: Run, tuned, split: str, fetch) -> PrefixCache | None:
    """The process-wide prefix cache for ``tuned`` on ``split``, or None where not legal."""
    if prefix_blocker(tuned) is not None:
        return None
    key = (run.backbone, run.target, split, prefix_stop(tuned))
    if key not in _PREFIX:
        _PREFIX[key] = PrefixCache(tuned, fetch)
    return _PREFIX[key]


# -- records: JSON Lines files of one record per line, each with a unique "key" --------------------
_LINES: dict[Path, tuple[tuple, dict[str, str]]] = {}  # file -> (its stat, key -> line)


def _lines(path: Path, fresh: bool = False) -> dict[str, str]:
    """The lines of a records file by key, in file order; re-read when its stat changed (or
    ``fresh``), so a script that checks hundreds of runs parses each file once."""
    try:
        st = path.stat()
    except FileNotFoundError:
        return {}
    stamp = (st.st_ino, st.st_mtime_ns, st.st_size)
    if fresh or path not in _LINES or _LINES[path][0] != stamp:
        lines = {}
        for line in path.read_text().splitlines():
            if line.strip():
                lines[json.loads(line)["key"]] = line
        _LINES[path] = (stamp, lines)
    return _LINES[path][1]


def read_records(path: Path) -> list[dict]:
    """Every record of the JSON Lines file ``path``, in file order (by key, as
    :func:`upsert_record` writes them); [] when there is no file."""
    return [json.loads(line) for line in _lines(Path(path)).values()]


def read_record(path: Path, key: str) -> dict | None:
    """The record named ``key`` in the JSON Lines file ``path``, or None."""
    line = _lines(Path(path)).get(key)
    return None if line is None else json.loads(line)


def upsert_record(path: Path, record: dict) -> None:
    """Put ``record`` into the JSON Lines file ``path``: replace the line with its ``"key"`` or
    add one, lines sorted by key (a new record is a one-line diff). The file is rewritten
    atomically (``atomic_write``) under an exclusive lock on its folder, so benchmark processes
    running side by side never drop each other's records. Strict JSON (NaN becomes null)."""
    path = Path(path)
    line = json.dumps(finite_json(record), allow_nan=False)  # one line: no indent
    path.parent.mkdir(parents=True, exist_ok=True)
    folder = os.open(path.parent, os.O_RDONLY)
    try:
        fcntl.flock(folder, fcntl.LOCK_EX)  # released when the descriptor closes
        lines = {**_lines(path, fresh=True), record["key"]: line}  # with other writers' lines
        text = "".join(lines[k] + "\n" for k in sorted(lines))
        atomic_write(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))
    finally:
        os.close(folder)


# -- one run ------------------------------------------------------------------------------------------
def write_report(name: str, lines: list[str], data) -> None:
    """``results/<name>.md`` (the lines) and ``results/<name>.json`` (the data), then print."""
    (RESULTS / f"{name}.md").write_text("\n".join(lines) + "\n")
    (RESULTS / f"{name}.json").write_text(json.dumps(data, indent=1, sort_keys=True) + "\n")
    print("\n".join(lines))


def versions() -> dict:
    import accelerate
    import timm

    return {
        "ncfinetune": ncfinetune.__version__,
        "torch": torch.__version__,
        "timm": timm.__version__,
        "accelerate": accelerate.__version__,
        "numpy": np.__version__,
        "python": platform.python_version(),
        "cpu_threads": torch.get_num_threads(),
        "machine": platform.machine(),
    }


def execute(run: Run) -> dict:
    """Train and evaluate one run; return its record (not saved)."""
    data = load_data(run.backbone, run.target)
    train = data["train"]
    idx = subset(data, run.per_class, run.seed)
    torch.manual_seed(run.seed)
    model = create_backbone(BACKBONES[run.backbone]["model"], data["num_classes"])
    tuned = ncfinetune.get_tuned_model(
        model, run.method, block=run.block, bn=run.bn, skip_norm=run.skip_norm
    )
    if run.precision == "bf16" and is_conv_net(model):
        tuned.to(memory_format=torch.channels_last)
    if run.budget is None:
        pre_train = shared_prefix(run, tuned, "train", train.__getitems__)
    else:  # a budget run pays for its own prefix outputs: a private cache, filled while training
        pre_train = None if prefix_blocker(tuned) else PrefixCache(tuned, train.__getitems__)
    pre_test = shared_prefix(run, tuned, "test", data["test"].__getitems__)
    computed = 0 if pre_train is None else pre_train.computed
    trainable, total = tuned.parameter_counts()
    record = {  # what every record holds, diverged or not
        "run": asdict(run),
        "key": run.key,
        "model": BACKBONES[run.backbone]["model"],
        "num_train": len(idx),
        "num_test": len(data["test"]),
        "trainable_params": trainable,
        "total_params": total,
        "trainable_percent": 100 * trainable / total,
        "versions": versions(),
    }
    t0 = time.perf_counter()
    try:
        losses = train_steps(
            tuned,
            train.__getitems__,
            idx,
            steps=run.steps,
            batch_size=run.batch,
            lr=run.lr,
            seed=run.seed,
            prefix=pre_train,
            precision=run.precision,
            optimizer=run.optimizer,
            head_warmup=run.head_warmup,
        )
    except FloatingPointError as err:  # a diverged run is a result, recorded as such
        none = dict.fromkeys(("test_accuracy", "train_accuracy", "nc1_train", "nc1_test"))
        return {
            **record,
            "metrics": {**none, "diverged": str(err)},
            "train_seconds": time.perf_counter() - t0,
            "eval_seconds": 0.0,
            "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        }
    train_s = time.perf_counter() - t0
    t1 = time.perf_counter()
    test_rows = np.arange(len(data["test"]))
    if run.test_max is not None and test_rows.size > run.test_max:  # the same rows every run
        test_rows = nd.balanced_subset(data["test"].labels.numpy(), total=run.test_max, seed=0)
    test = evaluate_rows(
        tuned, data["test"].__getitems__, test_rows, prefix=pre_test, precision=run.precision
    )
    tr = evaluate_rows(tuned, train.__getitems__, idx, prefix=pre_train, precision=run.precision)
    metrics = {
        "test_accuracy": test["accuracy"],
        "train_accuracy": tr["accuracy"],
        "nc1_train": nc1_or_none(tr["features"], tr["labels"]),
        "nc1_test": nc1_or_none(test["features"], test["labels"]),
        "final_train_loss": float(losses[-10:].mean()),
    }
    if run.validate:
        val = val_split(data, idx, run.seed)
        metrics["val_accuracy"] = evaluate_rows(
            tuned, train.__getitems__, val, prefix=pre_train, precision=run.precision
        )["accuracy"]
    return {
        **record,
        "metrics": metrics,
        "train_seconds": train_s,
        "eval_seconds": time.perf_counter() - t1,
        "train_images_per_s": run.steps * min(run.batch, len(idx)) / train_s,
        # prefix outputs cached: train_seconds then includes only the rows first seen here
        "prefix_cache": pre_train is not None,
        "prefix_rows_computed_in_training": (
            None if pre_train is None else pre_train.computed - computed
        ),
        "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


def saved(run: Run) -> dict | None:
    """The saved record of ``run``, or None when it has not been run."""
    return read_record(run.file, run.key)


def recorded(run: Run) -> bool:
    """Whether ``run`` has a saved record (finished or diverged)."""
    return run.key in _lines(run.file)


def diverged(rec: dict) -> bool:
    """Whether the record's training diverged (a result: it has no accuracy)."""
    return bool(rec["metrics"].get("diverged"))


def ensure(run: Run, *, force: bool = False, log=print) -> dict:
    """The record of ``run``: read it if it exists (unless ``force``), else execute and save it."""
    if not force and (rec := saved(run)) is not None:
        return rec
    rec = execute(run)
    upsert_record(run.file, rec)
    m = rec["metrics"]
    if diverged(rec):
        log(f"{run.backbone}/{run.target}/{run.key}: diverged ({m['diverged']})")
        return rec
    log(
        f"{run.backbone}/{run.target}/{run.key}: test {100 * m['test_accuracy']:.2f}%  "
        f"nc1 train {m['nc1_train'] if m['nc1_train'] is None else round(m['nc1_train'], 3)}  "
        f"{rec['train_seconds']:.1f}s train"
    )
    return rec


def run_all(runs: list[Run], *, force: bool = False) -> list[dict]:
    """Ensure every run, in order, with a progress line per run; returns the records."""
    todo = sum(1 for r in runs if force or not recorded(r))
    print(f"{len(runs)} runs, {todo} to do", flush=True)
    out, done, t0 = [], 0, time.time()
    for r in runs:
        fresh = force or not recorded(r)
        out.append(ensure(r, force=force, log=lambda s: print(s, flush=True)))
        if fresh:
            done += 1
            left = (time.time() - t0) / done * (todo - done)
            print(f"  [{done}/{todo}] about {left / 60:.0f} min left", flush=True)
    return out


# -- learning rate choice (claim 4's fair hyperparameters) ----------------------------------------------
def lr_runs(backbone: str, target: str, method: str) -> list[Run]:
    return [
        run_for(backbone, target, method, LR_SELECT_SIZE, 0, lr, validate=True) for lr in LR_GRID
    ]


def chosen_lr(backbone: str, target: str, method: str) -> float | None:
    """The grid learning rate with the best validation accuracy (ties: the larger), or None if
    the grid has not been run yet (run benchmarks/lr_grid.py)."""
    recs = [rec for r in lr_runs(backbone, target, method) if (rec := saved(r)) is not None]
    if len(recs) < len(LR_GRID):
        return None
    # a diverged run has no validation accuracy: it ranks last
    best = max(recs, key=lambda r: (r["metrics"].get("val_accuracy") or -1.0, r["run"]["lr"]))
    return best["run"]["lr"]


def mean_sd(values) -> tuple[float, float]:
    """Mean and *sample* standard deviation (ddof 1; 0.0 for one value): the "mean ± sd" of every
    table here."""
    a = np.asarray(list(values), dtype=float)
    if a.size == 0:
        raise ValueError("mean_sd of no values")
    return float(a.mean()), float(a.std(ddof=1)) if a.size > 1 else 0.0


def parse_common(parser):
    # the method benchmarks run on the bundled backbones and the two original targets; the
    # other backbones and targets serve block selection (selection_loto.py)
    parser.add_argument("--backbones", nargs="+", default=MAIN_BACKBONES, choices=list(BACKBONES))
    parser.add_argument("--targets", nargs="+", default=MAIN_TARGETS, choices=list(TARGETS))
    parser.add_argument("--force", action="store_true", help="redo runs whose record exists")
    parser.add_argument("--quick", action="store_true", help="a few short runs, a smoke check")
    return parser
