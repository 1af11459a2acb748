"""The frozen-prefix cache: legal only when the prefix is pure, equal to the uncached path,
bounded in memory, and refused for the wrong model."""

import pytest
import torch
from conftest import images, labels, make_model

import ncfinetune
from ncfinetune.errors import ConfigError
from ncfinetune.training import evaluate_rows, train_steps
from ncfinetune.tuning import get_tuned_model
from ncfinetune.tuning.prefix_cache import CacheTooLarge, PrefixCache, prefix_blocker

N = 24


def data_fetch():
    x, y = images(N, seed=3), labels(N, seed=4)

    def fetch(rows):
        index = torch.as_tensor(rows, dtype=torch.long)
        return x[index], y[index]

    return fetch


def tuned_pair(arch, method, block, bn):
    """Two identically initialised wrapped models (the uncached and the cached run)."""
    return [get_tuned_model(make_model(arch, seed=0), method, block=block, bn=bn) for _ in range(2)]


@pytest.mark.parametrize(
    "arch,method,block,bn",
    [
        ("test_vit", "scl", 1, None),
        ("test_vit", "linear", None, None),
        ("test_resnet", "layer", 2, "frozen"),
        ("test_resnet", "scl", 1, "frozen"),
        ("test_vit", "lora-block", 2, None),
    ],
)
def test_cached_training_equals_uncached(arch, method, block, bn):
    fetch = data_fetch()
    plain, cached = tuned_pair(arch, method, block, bn)
    rows = list(range(N))
    l0 = train_steps(plain, fetch, rows, steps=6, batch_size=8, lr=0.05, seed=1)
    cache = PrefixCache(cached, fetch, batch_size=5)
    l1 = train_steps(cached, fetch, rows, steps=6, batch_size=8, lr=0.05, seed=1, prefix=cache)
    torch.testing.assert_close(l1, l0, rtol=1e-4, atol=1e-5)
    for (name, p0), p1 in zip(
        plain.model.named_parameters(), cached.model.parameters(), strict=True
    ):
        torch.testing.assert_close(p1, p0, rtol=1e-4, atol=1e-5, msg=name)
    assert cache.computed == N  # every row ran through the prefix exactly once
    e0 = evaluate_rows(plain, fetch, rows)
    e1 = evaluate_rows(cached, fetch, rows, prefix=cache)
    assert e1["accuracy"] == e0["accuracy"]
    torch.testing.assert_close(e1["features"], e0["features"], rtol=1e-4, atol=1e-5)
    assert cache.computed == N


def test_blockers_name_the_reason():
    resnet = make_model("test_resnet")
    assert "bn='frozen'" in prefix_blocker(ncfinetune.scl_wrap(resnet, 1))
    assert "no frozen prefix" in prefix_blocker(ncfinetune.full_wrap(make_model("test_vit")))
    assert "no frozen prefix" in prefix_blocker(get_tuned_model(make_model("test_vit"), "lora"))
    vit = make_model("test_vit")
    vit.blocks[0].drop_path1 = torch.nn.Dropout(0.1)
    assert "random in train mode" in prefix_blocker(ncfinetune.layer_wrap(vit, 1))
    # a drop layer inside the tuned block itself is fine: it is not part of the prefix
    assert prefix_blocker(ncfinetune.layer_wrap(vit, 0)) is None
    with pytest.raises(ConfigError, match="bn='frozen'"):
        PrefixCache(ncfinetune.layer_wrap(make_model("test_resnet"), 1), data_fetch())


def test_cache_refuses_another_block_and_respects_its_bound():
    fetch = data_fetch()
    a = ncfinetune.scl_wrap(make_model("test_vit"), 1)
    b = ncfinetune.scl_wrap(make_model("test_vit"), 2)
    cache = PrefixCache(a, fetch)
    with pytest.raises(
        ConfigError, match="input of block 1 but the model's frozen prefix ends at block 2"
    ):
        train_steps(b, fetch, [0, 1], steps=1, prefix=cache)
    row_bytes = cache.fetch([0])[0][0].numel() * 4
    small = PrefixCache(a, fetch, max_bytes=3 * row_bytes)
    small.fill([0, 1, 2])
    assert len(small) == 3 and small.nbytes <= 3 * row_bytes
    with pytest.raises(CacheTooLarge, match="would pass max_bytes"):
        small.fill([3])
