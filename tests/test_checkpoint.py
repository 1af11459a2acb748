import json

import pytest
import safetensors.torch
import torch
from conftest import images, make_model
from test_tuning import train_steps

import ncfinetune
from ncfinetune import load_tuned
from ncfinetune.errors import CheckpointError
from ncfinetune.tuning import get_tuned_model
from ncfinetune.tuning.checkpoint import (
    CONFIG_NAME,
    PEFT_CONFIG_NAME,
    PEFT_WEIGHTS_NAME,
    WEIGHTS_NAME,
)

CASES = [
    ("test_resnet", "scl", 1, None),
    ("test_resnet", "layer", 3, "frozen"),
    ("test_resnet", "linear", None, None),
    ("test_vit", "scl", 2, None),
    ("test_vit", "full", None, None),
    ("deit_tiny_distilled_patch16_224", "scl", 5, None),
    ("test_resnet", "lora-block", 1, None),
    ("test_vit", "lora", None, None),
]


def tuned_and_fresh_base(name, method, block, bn):
    base = make_model(name, seed=0)
    tuned = get_tuned_model(base, method, block=block, bn=bn)
    train_steps(tuned)
    return tuned, make_model(name, seed=0)


@pytest.mark.parametrize("name,method,block,bn", CASES)
def test_save_load_reproduces_logits_exactly(tmp_path, name, method, block, bn):
    tuned, fresh = tuned_and_fresh_base(name, method, block, bn)
    tuned.save_pretrained(tmp_path / "ckpt")
    again = load_tuned(tmp_path / "ckpt", fresh)
    assert (again.method, again.block_index, again.bn) == (
        tuned.method,
        tuned.block_index,
        tuned.bn,
    )
    x = images(4, seed=7)
    with torch.no_grad():
        assert torch.equal(again.eval()(x), tuned.eval()(x))
    files = [WEIGHTS_NAME, CONFIG_NAME]
    if method.startswith("lora"):  # the adapter in peft's own format
        files += [PEFT_WEIGHTS_NAME, PEFT_CONFIG_NAME]
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == sorted(files)


@pytest.mark.parametrize(
    "name,method,block", [("test_resnet", "lora-block", 1), ("test_vit", "lora", None)]
)
def test_lora_adapter_loads_with_peft_itself(tmp_path, name, method, block):
    """peft's own inject + set_peft_model_state_dict restores the adapter from the checkpoint;
    with the classifier from tuned.safetensors, the logits are the tuned model's."""
    from peft import LoraConfig, inject_adapter_in_model, set_peft_model_state_dict

    tuned, fresh = tuned_and_fresh_base(name, method, block, None)
    tuned.save_pretrained(tmp_path)
    adapter = safetensors.torch.load_file(tmp_path / PEFT_WEIGHTS_NAME)
    assert adapter and all(".lora_A." in k or ".lora_B." in k for k in adapter)
    assert not any(".default." in k for k in adapter)  # peft's adapter-name-free keys
    rest = safetensors.torch.load_file(tmp_path / WEIGHTS_NAME)
    assert not any("lora_" in k for k in rest)
    config = LoraConfig(**json.loads((tmp_path / PEFT_CONFIG_NAME).read_text()))
    inject_adapter_in_model(config, fresh)
    result = set_peft_model_state_dict(fresh, adapter)
    assert not result.unexpected_keys
    fresh.load_state_dict(rest, strict=False)
    lora_b = [k for k in adapter if ".lora_B." in k]
    assert any(adapter[k].abs().sum() > 0 for k in lora_b)  # trained: B moved away from 0
    x = images(3, seed=5)
    with torch.no_grad():
        assert torch.equal(fresh.eval()(x), tuned.eval()(x))


def test_checkpoint_holds_only_what_was_tuned(tmp_path):
    tuned, _ = tuned_and_fresh_base("test_resnet", "layer", 1, "frozen")
    tuned.save_pretrained(tmp_path)
    keys = set(safetensors.torch.load_file(tmp_path / WEIGHTS_NAME))
    assert keys == {k for k in tuned.model.state_dict() if k.startswith(("layer2.0.", "fc."))}
    meta = json.loads((tmp_path / CONFIG_NAME).read_text())
    assert meta["architecture"] == "test_resnet" and meta["num_classes"] == 5
    assert meta["method"] == "layer" and meta["block"] == 1 and meta["block_name"] == "layer2.0"
    assert meta["bn"] == "frozen" and meta["ncfinetune_version"] == ncfinetune.__version__
    # bn="update": running statistics of every BatchNorm are saved as well
    tuned, _ = tuned_and_fresh_base("test_resnet", "layer", 1, None)
    tuned.save_pretrained(tmp_path / "u")
    keys = set(safetensors.torch.load_file(tmp_path / "u" / WEIGHTS_NAME))
    assert "bn1.running_mean" in keys and "layer1.0.bn1.running_var" in keys
    assert "layer1.0.conv1.weight" not in keys


def test_wrong_architecture_class_count_or_base_weights(tmp_path):
    tuned, _ = tuned_and_fresh_base("test_resnet", "scl", 1, None)
    tuned.save_pretrained(tmp_path)
    with pytest.raises(
        CheckpointError, match="tuned from test_resnet, but the base model given is test_vit"
    ):
        load_tuned(tmp_path, make_model("test_vit"))
    with pytest.raises(
        CheckpointError, match="5-class classifier, but the base model has num_classes=7"
    ):
        load_tuned(tmp_path, make_model("test_resnet", num_classes=7))
    with pytest.raises(CheckpointError, match="fingerprint mismatch.*verify_base=False"):
        load_tuned(tmp_path, make_model("test_resnet", seed=1))
    with pytest.warns(UserWarning, match="fingerprint mismatch"):
        load_tuned(tmp_path, make_model("test_resnet", seed=1), verify_base=False)


def test_damaged_or_missing_checkpoint(tmp_path):
    with pytest.raises(CheckpointError, match="tuned_config.json is missing"):
        load_tuned(tmp_path, make_model("test_resnet"))
    tuned, fresh = tuned_and_fresh_base("test_resnet", "linear", None, None)
    tuned.save_pretrained(tmp_path)
    weights = tmp_path / WEIGHTS_NAME
    weights.write_bytes(weights.read_bytes()[:-4] + b"\0\0\0\0")
    with pytest.raises(CheckpointError, match="does not match the SHA-256"):
        load_tuned(tmp_path, fresh)
    (tmp_path / CONFIG_NAME).write_text("{not json")
    with pytest.raises(CheckpointError, match="not valid JSON"):
        load_tuned(tmp_path, fresh)


def test_failed_save_leaves_previous_checkpoint_intact(tmp_path, monkeypatch):
    tuned, fresh = tuned_and_fresh_base("test_resnet", "linear", None, None)
    tuned.save_pretrained(tmp_path)
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    train_steps(tuned)

    def crash(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(safetensors.torch, "save_file", crash)
    with pytest.raises(OSError, match="disk full"):
        tuned.save_pretrained(tmp_path)
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before
    load_tuned(tmp_path, fresh)  # still loads
