"""Claim 3-4 context (paper Fig. 9, section 3.2): the pretrained backbones' layer-wise NC1 on the
downstream data, and how well a linear probe on each block's pooled output does.

    python benchmarks/nc1_curve.py [--backbones ...] [--targets ...] [--per-class 100]

For each backbone and target: one inference pass over a seeded ``--per-class`` training subset
and over the test split, pooled features of every block (``collect_block_features``); per block
NC1 on the training subset and the test accuracy of a logistic-regression probe (scikit-learn,
standardised features) trained on that subset. Writes ``results/nc1_curve_<backbone>.{json,md,png}``. The
Spearman correlation between NC1 after fine-tuning and accuracy is in ``summarize.py``.
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch
from common import BACKBONES, RESULTS, load_data, parse_common, subset, versions
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from ncfinetune.backbones.hub import create_backbone
from ncfinetune.metrics import nc1
from ncfinetune.tuning.features import collect_block_features, plot_layerwise_nc1


def batches(cache, rows, size=500):
    for s in range(0, len(rows), size):
        yield cache[rows[s : s + size].tolist()]


def curve(backbone: str, target: str, per_class: int) -> list[dict]:
    data = load_data(backbone, target)
    model = create_backbone(BACKBONES[backbone]["model"], data["num_classes"]).eval()
    idx = subset(data, per_class, 0)
    test_rows = np.arange(len(data["test"]))
    tr = collect_block_features(model, list(batches(data["train"], idx)))
    te = collect_block_features(model, list(batches(data["test"], test_rows)))
    rows = []
    for i, name in enumerate(tr.names):
        x_tr, x_te = tr.features[name].numpy(), te.features[name].numpy()
        probe = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000, C=1.0))
        probe.fit(x_tr, tr.labels.numpy())
        rows.append(
            {
                "index": None if name == "penultimate" else i,
                "name": name,
                "channels": int(x_tr.shape[1]),
                "nc1": nc1(tr.features[name], tr.labels),
                "nc1_test": nc1(te.features[name], te.labels),
                "probe_test_accuracy": float(probe.score(x_te, te.labels.numpy())),
            }
        )
    return rows


def main(argv=None) -> None:
    parser = parse_common(argparse.ArgumentParser(description=__doc__))
    parser.add_argument("--per-class", type=int, default=100)
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    for b in args.backbones:  # one file set per backbone, so backbones can be run separately
        out = {"per_class": args.per_class, "versions": versions(), "curves": {}}
        lines = [
            f"# Layer-wise NC1 of {BACKBONES[b]['model']} on the downstream data",
            "",
            f"`python benchmarks/nc1_curve.py --backbones {b} --per-class {args.per_class}`: NC1 of "
            f"each block's pooled output on a {args.per_class}-per-class training subset (seed 0) "
            "and on the test split; probe = logistic regression on that block's standardised "
            "features (trained on the subset), test accuracy.",
        ]
        curves = {}
        for t in args.targets:
            t0 = time.time()
            rows = curve(b, t, args.per_class)
            curves[t] = rows
            out["curves"][t] = {"rows": rows, "seconds": time.time() - t0}
            lines += [
                "",
                f"## {t}",
                "",
                "| block | name | ch | NC1 train | NC1 test | probe acc |",
                "|---:|---|---:|---:|---:|---:|",
            ]
            lines += [
                f"| {'' if r['index'] is None else r['index']} | {r['name']} | {r['channels']} | "
                f"{r['nc1']:.3f} | {r['nc1_test']:.3f} | {100 * r['probe_test_accuracy']:.1f} |"
                for r in rows
            ]
        plot_layerwise_nc1(
            {f"{t} (train {args.per_class}/class)": c for t, c in curves.items()},
            RESULTS / f"nc1_curve_{b}.png",
            title=f"{BACKBONES[b]['model']}: layer-wise NC1 on downstream data",
        )
        (RESULTS / f"nc1_curve_{b}.json").write_text(json.dumps(out, indent=1) + "\n")
        (RESULTS / f"nc1_curve_{b}.md").write_text("\n".join(lines) + "\n")
        print("\n".join(lines))


if __name__ == "__main__":
    main()
