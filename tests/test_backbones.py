import pytest
import timm
import torch
from conftest import CHEAP, TINY, images, make_model

from ncfinetune import list_blocks
from ncfinetune.backbones import get_adapter
from ncfinetune.errors import BlockError, UnsupportedModelError

ALL = list(TINY) + list(CHEAP)


@pytest.mark.parametrize("name", ALL)
def test_decomposition_reproduces_timm_forward(name):
    model = make_model(name).eval()
    adapter = get_adapter(model)
    x = images(4)
    with torch.no_grad():
        logits, feats = adapter.classify(adapter.forward_blocks(adapter.stem(x)), None)
        assert torch.equal(logits, model(x))
        ref = model.forward_head(model.forward_features(x), pre_logits=True)
        assert torch.equal(feats, ref)


@pytest.mark.parametrize("name", ALL)
def test_block_channels_match_pooled_outputs(name):
    model = make_model(name).eval()
    adapter = get_adapter(model)
    h = adapter.stem(images(2))
    for i, blk in enumerate(adapter.blocks):
        h = blk(h)
        assert adapter.pool(h).shape == (2, adapter.block_channels(i))


def test_resnet18_blocks():
    blocks = list_blocks(timm.create_model("resnet18", num_classes=10))
    assert [b.name for b in blocks] == [f"layer{s}.{j}" for s in range(1, 5) for j in range(2)]
    assert [b.channels for b in blocks] == [64, 64, 128, 128, 256, 256, 512, 512]
    assert blocks[4].num_params == 919_040
    assert "layer3.0" in str(blocks[4]) and "919,040" in str(blocks[4])


def test_vit_blocks():
    blocks = list_blocks(make_model("test_vit"))
    assert [b.name for b in blocks] == [f"blocks.{i}" for i in range(6)]
    assert {b.channels for b in blocks} == {64}


def test_resolve_index_negative_name_and_digit_string():
    adapter = get_adapter(timm.create_model("resnet18"))
    assert adapter.resolve(4) == 4
    assert adapter.resolve(-1) == 7
    assert adapter.resolve(-8) == 0
    assert adapter.resolve("layer3.0") == 4
    assert adapter.resolve("-2") == 6


def test_out_of_range_block_message():
    adapter = get_adapter(timm.create_model("resnet18"))
    with pytest.raises(BlockError) as e:
        adapter.resolve(9)
    assert str(e.value) == (
        "block 9 is out of range for resnet18 (8 blocks: 0 layer1.0, 1 layer1.1 ... 7 layer4.1). "
        "Pass an index in [-8, 7] or a block name."
    )
    with pytest.raises(BlockError, match=r"\[-8, 7\]"):
        adapter.resolve(-9)


def test_unknown_block_name_lists_valid_ones():
    adapter = get_adapter(make_model("test_resnet"))
    with pytest.raises(
        BlockError,
        match=r"'layer9.0' is not a block of test_resnet \(4 blocks: "
        r"0 layer1.0, 1 layer2.0, 2 layer3.0, 3 layer4.0\)",
    ):
        adapter.resolve("layer9.0")
    with pytest.raises(BlockError, match="must be an int index or a module name, got float"):
        adapter.resolve(1.0)


@pytest.mark.parametrize(
    "model", [torch.nn.Linear(3, 3), timm.create_model("test_convnext", features_only=True)]
)
def test_unsupported_family_names_supported_ones(model):
    with pytest.raises(UnsupportedModelError) as e:
        get_adapter(model)
    msg = str(e.value)
    assert "Supported timm families: ResNet, VisionTransformer, VisionTransformerDistilled" in msg
    assert "forward_head(x, pre_logits=True)" in msg and "group_matcher()" in msg
