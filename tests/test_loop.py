"""The training loop's speed settings: mixed precision 'auto', channels_last, conv-net test."""

import pytest
import torch
from conftest import make_model

from ncfinetune.loop import (
    is_conv_net,
    launch_device_type,
    native_bf16,
    resolve_mixed_precision,
)
from ncfinetune.training import as_memory_format


def test_auto_mixed_precision_follows_native_bf16_and_explicit_settings_pass_through():
    assert resolve_mixed_precision("auto", "cpu") == ("bf16" if native_bf16("cpu") else "no")
    assert resolve_mixed_precision("auto", "mps") == "no"  # no native-bf16 check there
    for setting in ("no", "fp16", "bf16"):
        assert resolve_mixed_precision(setting, "cpu") == setting
    with pytest.raises(ValueError, match="mixed_precision 'fp8' is not one of auto, no, fp16"):
        resolve_mixed_precision("fp8", "cpu")


def test_launch_device_type_obeys_accelerate_use_cpu(monkeypatch):
    monkeypatch.setenv("ACCELERATE_USE_CPU", "true")
    assert launch_device_type() == "cpu"
    monkeypatch.delenv("ACCELERATE_USE_CPU")
    assert launch_device_type() == ("cuda" if torch.cuda.is_available() else "cpu")


def test_conv_nets_are_told_from_vits():
    assert is_conv_net(make_model("test_resnet"))
    assert not is_conv_net(make_model("test_vit"))  # its patch embedding is its one conv


def test_channels_last_applies_to_4d_batches_only():
    x = torch.randn(2, 3, 4, 5)
    y = as_memory_format(x, True)
    assert y.is_contiguous(memory_format=torch.channels_last) and torch.equal(x, y)
    assert as_memory_format(x, False) is x
    tokens = torch.randn(2, 7, 8)
    assert as_memory_format(tokens, True) is tokens
