"""Issue 7: training speed and peak memory of every method, as ratios to full fine-tuning, each
against its FLOP bound.

    python benchmarks/speed.py            # results/speed.{json,md,png}; run on a quiet machine
    python benchmarks/speed.py --models resnet18   # results/speed_resnet18.{json,md,png}
    python benchmarks/speed.py --quick    # tiny models, a smoke check (results/quick/)
    python benchmarks/speed.py --precision  # fp32/bf16 x NCHW/channels_last (results/precision.*)

For timm resnet18 and vit_small_patch16_224 (random init: speed does not depend on the
weights), at 224 px batch 32 and 32 px batch 128: images/s of one SGD training step and peak
memory for linear probe, Layer FT and SCL FT at every stage-first block, full FT, LoRA on every
block and LoRA-in-block at the middle block (peft, rank 8); and, where the frozen prefix is
cacheable (``bn="frozen"``), the time of one epoch at epochs >= 2 trained from the
``PrefixCache``. Each configuration runs in a fresh process (peak RSS is a per-process figure);
its steps are repeated and the median and range reported. Ratios to full FT come from the same
run of this script.

FLOP bound. With F_i the forward FLOPs of part i (stem, blocks, head; counted by
``torch.utils.flop_counter``, convolutions and matmuls only) a step costs about
- full FT: 3 sum F (forward, input gradients, weight gradients);
- Layer/SCL FT at block k, uncached: sum F + sum_{i>=k} F_i + F_head (forward of everything;
  backward of the suffix: input gradients after block k, weight gradients in block k only);
- the same from the cache: 2 (sum_{i>=k} F_i + F_head);
- linear probe: sum F + 2 F_head; LoRA on all blocks: about 2 sum F (input gradients through
  every block, negligible low-rank weight gradients); LoRA-in-block at k: like Layer FT at k.
The bound on a method's speed-up is cost(full) / cost(method); each measured ratio is reported
as a fraction of its bound.
"""

from __future__ import annotations

import argparse
import itertools
import json
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import timm
import torch
from torch.utils.flop_counter import FlopCounterMode

import ncfinetune
from ncfinetune.training import build_cosine_schedule, build_optimizer, fit_batches
from ncfinetune.tuning.prefix_cache import PrefixCache, prefix_blocker

OUT = Path(__file__).resolve().parent / "results"
MODELS = {
    "resnet18": {"kwargs": {}, "blocks": [0, 2, 4, 6], "middle": 4},
    "vit_small_patch16_224": {"kwargs": {}, "blocks": [0, 3, 6, 9], "middle": 6},
}
SETTINGS = [(224, 32), (32, 128)]  # (image px, batch)
QUICK_MODELS = {
    "test_resnet": {"kwargs": {}, "blocks": [0, 2], "middle": 1},
    "test_vit": {"kwargs": {}, "blocks": [0, 1], "middle": 1},
}
QUICK_SETTINGS = [(32, 16)]
REPEATS = 5
NUM_CLASSES = 10


def methods_of(spec: dict) -> list[tuple[str, int | None]]:
    out = [("full", None), ("linear", None)]
    out += [(m, b) for m in ("layer", "scl") for b in spec["blocks"]]
    return out + [("lora", None), ("lora-block", spec["middle"])]


def build(name: str, px: int, method: str, block: int | None, bn: str | None = None):
    kwargs = dict(MODELS.get(name, QUICK_MODELS.get(name))["kwargs"])
    if "vit" in name:
        kwargs["img_size"] = px
    model = timm.create_model(name, num_classes=NUM_CLASSES, **kwargs)
    return ncfinetune.get_tuned_model(model, method, block=block, bn=bn)


def part_flops(name: str, px: int) -> dict:
    """Forward FLOPs per image of the stem, each block and the head; and each block's width
    against the penultimate features (where the SCL skip fits)."""
    tuned = build(name, px, "full", None).eval()
    a = tuned.adapter
    x = torch.randn(1, 3, px, px)
    flops = {}
    with torch.no_grad():
        with FlopCounterMode(display=False) as fc:
            h = a.stem(x)
        flops["stem"] = fc.get_total_flops()
        blocks = []
        for blk in a.blocks:
            with FlopCounterMode(display=False) as fc:
                h = blk(h)
            blocks.append(fc.get_total_flops())
        with FlopCounterMode(display=False) as fc:
            a.classify(h, None)
        flops["head"] = fc.get_total_flops()
    flops["blocks"] = blocks
    flops["skip_fits"] = [a.block_channels(i) <= a.feature_dim for i in range(len(a.blocks))]
    return flops


def step_cost(flops: dict, method: str, block: int | None, cached: bool = False) -> float:
    """Relative FLOPs of one training step (see the module docstring)."""
    total = flops["stem"] + sum(flops["blocks"]) + flops["head"]
    head = flops["head"]
    if method == "full":
        return 3 * total
    if method == "linear":
        return 2 * head if cached else total + 2 * head
    if method == "lora":
        return 2 * total
    suffix = sum(flops["blocks"][block:]) + head
    return 2 * suffix if cached else total + suffix


def rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2**20


def measure(
    name: str,
    px: int,
    batch: int,
    method: str,
    block: int | None,
    quick: bool,
    precision: str = "fp32",
    memory_format: str = "nchw",
    cached_epochs: bool = True,
) -> dict:
    """One configuration, in this process: step images/s, peak RSS, cached epoch time.

    ``precision`` fp32 or bf16 (CPU autocast, as accelerate's ``mixed_precision="bf16"``);
    ``memory_format`` nchw or channels_last (model and input).
    """
    torch.manual_seed(0)
    tuned = build(name, px, method, block)
    x = torch.randn(batch, 3, px, px)
    if memory_format == "channels_last":
        tuned.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
    y = torch.arange(batch) % NUM_CLASSES
    opt = build_optimizer(tuned, lr=0.01)
    sched = build_cosine_schedule(opt, 10_000)  # the users' loop steps a schedule too
    autocast = "bf16" if precision == "bf16" else "no"

    def train(model, batches, opt, sched):
        """The loop users run (recipes, selection): ncfinetune.training.fit_batches."""
        return fit_batches(model, batches, opt, sched, precision=autocast).seconds

    steps = 1 if px >= 128 else 3
    base_rss = rss_mib()
    train(tuned, [(x, y)], opt, sched)  # warm-up (allocations, lazy init)
    rates = []
    for _ in range(2 if quick else REPEATS):
        t = time.perf_counter()
        train(tuned, itertools.repeat((x, y), steps), opt, sched)
        rates.append(steps * batch / (time.perf_counter() - t))
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB -> MiB on Linux
    row = {
        "model": name,
        "px": px,
        "batch": batch,
        "method": method,
        "block": block,
        "precision": precision,
        "memory_format": memory_format,
        "trainable_percent": tuned.trainable_share,
        "images_per_s": statistics.median(rates),
        "images_per_s_min": min(rates),
        "images_per_s_max": max(rates),
        "rss_before_training_mib": base_rss,
        "peak_rss_mib": peak,
        "training_rss_mib": peak - base_rss,
    }
    # the cached path: bn="frozen" makes the prefix a pure function of the input
    cached = build(name, px, method, block, bn="frozen") if cached_epochs else None
    if cached is not None and prefix_blocker(cached) is None:
        n = 2 * batch if quick else 4 * batch
        data = torch.randn(n, 3, px, px)
        labels = torch.arange(n) % NUM_CLASSES

        def fetch(rows):
            index = torch.as_tensor(rows)
            return data[index], labels[index]

        cache = PrefixCache(cached, fetch, batch_size=batch)
        opt = build_optimizer(cached, lr=0.01)
        sched = build_cosine_schedule(opt, 10_000)
        t = time.perf_counter()
        cache.fill(range(n))  # epoch 1 pays for the prefix once
        row["cache_fill_s"] = time.perf_counter() - t
        epochs = []
        cached.prefix_inputs = True  # batches are prefix outputs
        for _ in range(2 if quick else 3):
            t = time.perf_counter()
            epoch = (cache.fetch(list(range(s, s + batch))) for s in range(0, n, batch))
            train(cached, epoch, opt, sched)
            epochs.append(n / (time.perf_counter() - t))
        row["cached_images_per_s"] = statistics.median(epochs)
        row["cached_images_per_s_range"] = [min(epochs), max(epochs)]
        row["cache_mib"] = cache.nbytes / 2**20
    return row


def run_child(kwargs: dict) -> dict:
    """``measure(**kwargs)`` in a fresh process (peak RSS is per process)."""
    out = subprocess.run(
        [sys.executable, __file__, "--child", json.dumps(kwargs)],
        capture_output=True,
        text=True,
        check=False,
    )
    if out.returncode != 0:
        raise RuntimeError(f"speed.py child {kwargs} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def report(rows: list[dict], flops: dict, dest: Path, meta: dict, stem: str = "speed") -> None:
    full = {(r["model"], r["px"]): r for r in rows if r["method"] == "full"}
    for r in rows:
        f = flops[f"{r['model']}@{r['px']}"]
        ref = full[(r["model"], r["px"])]
        r["speedup"] = r["images_per_s"] / ref["images_per_s"]
        r["bound"] = step_cost(f, "full", None) / step_cost(f, r["method"], r["block"])
        r["fraction_of_bound"] = r["speedup"] / r["bound"]
        r["memory_vs_full"] = r["peak_rss_mib"] / ref["peak_rss_mib"]
        r["training_memory_vs_full"] = r["training_rss_mib"] / max(ref["training_rss_mib"], 1e-9)
        if "cached_images_per_s" in r:
            r["cached_speedup"] = r["cached_images_per_s"] / ref["images_per_s"]
            r["cached_bound"] = step_cost(f, "full", None) / step_cost(
                f, r["method"], r["block"], cached=True
            )
            r["cached_fraction_of_bound"] = r["cached_speedup"] / r["cached_bound"]
    dest.mkdir(parents=True, exist_ok=True)
    (dest / f"{stem}.json").write_text(
        json.dumps({"rows": rows, "flops": flops, **meta}, indent=1) + "\n"
    )
    lines = [
        "# Training speed and memory: ratios to full FT, and their FLOP bounds",
        "",
        f"`{meta['command']}` on {meta['machine']}; {meta['versions']}. Random init; SGD; "
        f"median of {meta['repeats']} timed repeats (range in brackets). `x full` = images/s "
        "ratio to full FT in the same run; `bound` = FLOP bound on that ratio; `cached` = one "
        "epoch at epochs >= 2 from the prefix cache (`bn=frozen`); memory = peak RSS of the "
        "process, and its growth during training.",
    ]
    for (model, px), ref in full.items():
        lines += [
            "",
            f"## {model}, {px} px, batch {ref['batch']}",
            "",
            "| method | block | trainable | img/s [range] | x full | bound | of bound | cached "
            "img/s | cached x full | cached bound | of bound | peak RSS MiB | vs full | training "
            "RSS MiB | vs full |",
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for r in rows:
            if (r["model"], r["px"]) != (model, px):
                continue
            c = r.get("cached_images_per_s")
            cached = (
                f"{c:.1f} | {r['cached_speedup']:.2f}x | {r['cached_bound']:.2f}x | "
                f"{100 * r['cached_fraction_of_bound']:.0f}%"
                if c
                else "- | - | - | -"
            )
            lines.append(
                f"| {r['method']} | {'' if r['block'] is None else r['block']} | "
                f"{r['trainable_percent']:.2f}% | {r['images_per_s']:.1f} "
                f"[{r['images_per_s_min']:.1f}-{r['images_per_s_max']:.1f}] | "
                f"{r['speedup']:.2f}x | {r['bound']:.2f}x | {100 * r['fraction_of_bound']:.0f}% | "
                f"{cached} | {r['peak_rss_mib']:.0f} | {100 * r['memory_vs_full']:.0f}% | "
                f"{r['training_rss_mib']:.0f} | {100 * r['training_memory_vs_full']:.0f}% |"
            )
    (dest / f"{stem}.md").write_text("\n".join(lines) + "\n")
    plot(rows, dest / f"{stem}.png")
    print("\n".join(lines))


def plot(rows: list[dict], path: Path) -> None:
    from ncfinetune.plotting import new_figure, save_figure

    groups = sorted({(r["model"], r["px"]) for r in rows})
    fig, axes = new_figure(1, len(groups), figsize=(6 * len(groups), 4), squeeze=False)
    for ax, g in zip(axes[0], groups, strict=True):
        rs = [r for r in rows if (r["model"], r["px"]) == g]
        names = [r["method"] + ("" if r["block"] is None else f"@{r['block']}") for r in rs]
        pos = np.arange(len(rs))
        ax.bar(pos - 0.2, [r["speedup"] for r in rs], 0.4, label="measured")
        ax.bar(pos + 0.2, [r["bound"] for r in rs], 0.4, label="FLOP bound", alpha=0.5)
        ax.scatter(
            [p for p, r in zip(pos, rs, strict=True) if "cached_speedup" in r],
            [r["cached_speedup"] for r in rs if "cached_speedup" in r],
            marker="*",
            color="k",
            label="cached epoch",
            zorder=3,
        )
        ax.set_xticks(pos, names, rotation=60, ha="right", fontsize=7)
        ax.set_yscale("log")  # the linear probe's cached epoch (head only) is ~1000x the rest
        ax.set_ylabel("images/s relative to full FT (log)")
        ax.set_title(f"{g[0]}, {g[1]} px")
        ax.axhline(1, color="grey", lw=0.5)
        ax.legend(fontsize=7)
    save_figure(fig, path, dpi=120)


PRECISIONS = [
    (p, m) for p in ("fp32", "bf16") for m in ("nchw", "channels_last")
]  # (precision, memory format): the --precision table


def precision_table(
    models: dict, settings: list, quick: bool, meta: dict, dest: Path, t0: float
) -> None:
    """Full FT and SCL FT at the middle block under fp32/bf16 autocast x NCHW/channels_last:
    images/s and the ratio to fp32 NCHW of the same method (what the recipe's defaults follow)."""
    rows = []
    for name, spec in models.items():
        for px, batch in settings:
            for method, block in (("full", None), ("scl", spec["middle"])):
                for precision, fmt in PRECISIONS:
                    row = run_child(
                        dict(
                            name=name,
                            px=px,
                            batch=batch,
                            method=method,
                            block=block,
                            quick=quick,
                            precision=precision,
                            memory_format=fmt,
                            cached_epochs=False,
                        )
                    )
                    rows.append(row)
                    print(
                        f"{name} {px}px {method} {precision} {fmt}: "
                        f"{row['images_per_s']:.1f} img/s",
                        flush=True,
                    )
    base = {
        (r["model"], r["px"], r["method"]): r["images_per_s"]
        for r in rows
        if (r["precision"], r["memory_format"]) == ("fp32", "nchw")
    }
    for r in rows:
        r["vs_fp32_nchw"] = r["images_per_s"] / base[(r["model"], r["px"], r["method"])]
    meta = meta | {"command": meta["command"] + " --precision", "seconds": time.time() - t0}
    dest.mkdir(parents=True, exist_ok=True)
    (dest / "precision.json").write_text(json.dumps({"rows": rows, **meta}, indent=1) + "\n")
    lines = [
        "# bf16 autocast and channels_last on this CPU",
        "",
        f"`{meta['command']}` on {meta['machine']}; {meta['versions']}. One SGD training step, "
        f"random init, median of {meta['repeats']} repeats (range); `x fp32` = images/s ratio "
        "to fp32 NCHW of the same method and model in the same run.",
        "",
        "| model | px | batch | method | precision | memory format | img/s [range] | x fp32 NCHW |",
        "|---|---:|---:|---|---|---|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['model']} | {r['px']} | {r['batch']} | {r['method']}"
            f"{'' if r['block'] is None else '@' + str(r['block'])} | {r['precision']} | "
            f"{r['memory_format']} | {r['images_per_s']:.1f} [{r['images_per_s_min']:.1f}-"
            f"{r['images_per_s_max']:.1f}] | {r['vs_fp32_nchw']:.2f}x |"
        )
    (dest / "precision.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--quick", action="store_true", help="tiny models, a smoke check")
    p.add_argument("--models", nargs="+", choices=list(MODELS), help="default: all")
    p.add_argument(
        "--precision",
        action="store_true",
        help="only the fp32/bf16 x NCHW/channels_last table (results/precision.{json,md})",
    )
    p.add_argument(
        "--methods",
        nargs="+",
        choices=["full", "linear", "layer", "scl", "lora", "lora-block"],
        help="only these methods (full FT is always run: ratios are to it); default: all",
    )
    p.add_argument("--px", nargs="+", type=int, help="only these image sizes; default: all")
    p.add_argument("--child", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        print(json.dumps(measure(**json.loads(args.child))))
        return
    models = QUICK_MODELS if args.quick else {m: MODELS[m] for m in args.models or MODELS}
    settings = QUICK_SETTINGS if args.quick else SETTINGS
    if args.px:
        settings = [(px, b) for px, b in settings if px in args.px]
    keep = None if not args.methods else {"full", *args.methods}
    t0 = time.time()
    meta = {
        "command": "python benchmarks/speed.py"
        + (" --quick" if args.quick else "")
        + (f" --models {' '.join(args.models)}" if args.models else "")
        + (f" --methods {' '.join(args.methods)}" if args.methods else "")
        + (f" --px {' '.join(map(str, args.px))}" if args.px else ""),
        "machine": f"{platform.machine()}, {torch.get_num_threads()} threads",
        "versions": f"torch {torch.__version__}, timm {timm.__version__}",
        "repeats": 2 if args.quick else REPEATS,
    }
    dest = OUT / "quick" if args.quick else OUT
    if args.precision:
        precision_table(models, settings, args.quick, meta, dest, t0)
        return
    rows, flops = [], {}
    for name, spec in models.items():
        for px, batch in settings:
            flops[f"{name}@{px}"] = part_flops(name, px)
            for method, block in methods_of(spec):
                if keep is not None and method not in keep:
                    continue
                if method == "scl" and not flops[f"{name}@{px}"]["skip_fits"][block]:
                    continue  # the block is wider than the penultimate features
                row = run_child(
                    dict(
                        name=name, px=px, batch=batch, method=method, block=block, quick=args.quick
                    )
                )
                rows.append(row)
                print(
                    f"{name} {px}px {method}@{block}: {row['images_per_s']:.1f} img/s, "
                    f"peak {row['peak_rss_mib']:.0f} MiB"
                    + (
                        f", cached {row['cached_images_per_s']:.1f}"
                        if "cached_images_per_s" in row
                        else ""
                    ),
                    flush=True,
                )
    meta["seconds"] = time.time() - t0
    # one table per run: a run over some models writes speed_<models>.*, over all speed.*
    subset = [*(args.methods or []), *(f"{px}px" for px in args.px or [])]
    report(rows, flops, dest, meta, "_".join(["speed", *(args.models or []), *subset]))


if __name__ == "__main__":
    main()
