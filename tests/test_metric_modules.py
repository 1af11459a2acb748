"""The shipped evaluate metric scripts load offline by path and agree with the direct functions."""

from __future__ import annotations

import os

import evaluate
import numpy as np
import pytest

from ncfinetune.errors import ConfigError
from ncfinetune.metrics import nc1
from ncfinetune.metrics.modules import SHIPPED_METRICS, load_metric, metric_path


@pytest.mark.parametrize("name", SHIPPED_METRICS)
def test_metric_path_holds_a_script_named_like_its_directory(name):
    path = metric_path(name)
    assert os.path.isfile(os.path.join(path, f"{name}.py"))


def test_nc1_module_matches_direct_call(tmp_path):
    rng = np.random.default_rng(0)
    y = np.concatenate([np.arange(4), rng.integers(0, 4, 96)])
    h = (rng.normal(size=(4, 16))[y] * 3 + rng.normal(size=(100, 16))).astype(np.float32)
    metric = evaluate.load(metric_path("nc1"), cache_dir=str(tmp_path))
    metric.add_batch(features=h[:40], labels=y[:40])
    metric.add_batch(features=list(h[40:]), labels=y[40:].tolist())  # lists work too
    assert metric.compute() == {"nc1": nc1(h, y)}
    again = load_metric("nc1", cache_dir=str(tmp_path), keep_in_memory=True)
    again.add_batch(features=h, labels=y)
    assert again.compute(num_classes=4)["nc1"] == nc1(h, y, num_classes=4)


def test_accuracy_module(tmp_path):
    metric = load_metric("accuracy", cache_dir=str(tmp_path))
    metric.add_batch(predictions=[0, 1, 2, 2], references=[0, 1, 1, 2])
    metric.add_batch(predictions=np.array([3, 3]), references=np.array([3, 0]))
    assert metric.compute() == {"accuracy": 4 / 6}


def test_unknown_names(monkeypatch):
    with pytest.raises(ConfigError, match="'bleu' is not shipped .* shipped: accuracy, nc1"):
        metric_path("bleu")

    def offline(name, **kwargs):
        raise ConnectionError("no network")

    monkeypatch.setattr(evaluate, "load", offline)
    with pytest.raises(ConfigError, match="could not load metric 'bleu' .*ConnectionError"):
        load_metric("bleu")
