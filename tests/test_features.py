import pytest
import torch
from conftest import make_model

from ncfinetune import scl_wrap
from ncfinetune.errors import ConfigError
from ncfinetune.metrics import nc1
from ncfinetune.tuning.features import (
    collect_block_features,
    layerwise_nc1,
    plot_layerwise_nc1,
)


def batches(n_batches=4, bs=10, k=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [
        (torch.randn(bs, 3, 32, 32, generator=g), torch.arange(bs) % k) for _ in range(n_batches)
    ]


@pytest.mark.parametrize("name", ["test_resnet", "test_vit"])
def test_block_features_equal_a_per_block_forward(name):
    model = make_model(name).eval()
    data = batches()
    got = collect_block_features(model, data)
    assert got.names[-1] == "penultimate" and got.num_samples == 40
    x = torch.cat([b[0] for b in data])
    a = got  # reference: pooled outputs from forward_intermediates-free manual pass
    from ncfinetune.backbones import get_adapter

    ad = get_adapter(model)
    with torch.no_grad():
        h = ad.stem(x)
        for i, blk in enumerate(ad.blocks):
            h = blk(h)
            torch.testing.assert_close(
                a.features[ad.block_names[i]], ad.pool(h), rtol=1e-5, atol=1e-5
            )
        pen = model.forward_head(model.forward_features(x), pre_logits=True)
    torch.testing.assert_close(a.features["penultimate"], pen, rtol=1e-5, atol=1e-5)


def test_streamed_nc1_equals_kept_features():
    model = make_model("test_resnet")
    data = batches()
    kept = layerwise_nc1(model, data, metrics=["cdnv"])
    streamed = layerwise_nc1(model, data, stream=True, num_classes=3, metrics=["cdnv"])
    for a, b in zip(kept, streamed, strict=True):
        assert a["name"] == b["name"]
        assert b["nc1"] == pytest.approx(a["nc1"], rel=1e-9)
        assert b["cdnv"] == pytest.approx(a["cdnv"], rel=1e-9)


def test_wrapped_scl_penultimate_includes_the_skip():
    tuned = scl_wrap(make_model("test_resnet"), 1).eval()
    data = batches(2)
    got = collect_block_features(tuned, data, blocks=[1])
    x = torch.cat([b[0] for b in data])
    with torch.no_grad():
        _, feats = tuned.forward_with_features(x)
    torch.testing.assert_close(got.features["penultimate"], feats, rtol=1e-5, atol=1e-5)
    assert got.names == ["layer2.0", "penultimate"]


def test_mode_is_restored_even_on_error():
    model = make_model("test_resnet").train()

    def broken():
        yield batches(1)[0]
        raise RuntimeError("loader died")

    with pytest.raises(RuntimeError, match="loader died"):
        collect_block_features(model, broken())
    assert model.training


def test_rows_plot_and_errors(tmp_path):
    model = make_model("test_vit")
    rows = layerwise_nc1(model, batches(), metrics=["numerical_rank", "class_separation_r2"])
    assert [r["index"] for r in rows] == [0, 1, 2, 3, 4, 5, None]
    got = collect_block_features(model, batches())
    assert rows[2]["nc1"] == pytest.approx(nc1(got.features["blocks.2"], got.labels), rel=1e-12)
    assert rows[5]["name"] == "blocks.5" and rows[6]["name"] == "penultimate"
    assert set(rows[0]) >= {"nc1", "numerical_rank", "class_separation_r2"}
    png = plot_layerwise_nc1({"test_vit": rows}, tmp_path / "nc1.png", mark=2)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(ConfigError, match="unknown metrics \\['nc2'\\]"):
        layerwise_nc1(model, batches(), metrics=["nc2"])
    with pytest.raises(ConfigError, match="needs num_classes"):
        layerwise_nc1(model, batches(), stream=True)
