"""The bundled offline backbones: size budget, model cards, and weights that really load."""

import pytest
import safetensors.torch
import torch

import ncfinetune
from ncfinetune.backbones.hub import ASSETS, bundled_backbones, create_backbone
from ncfinetune.errors import ConfigError

BUNDLED = ["resnet18_fmnist04", "vit_tiny_fmnist04", "vit_tiny_p4_fmnist04"]


def test_every_backbone_is_bundled_within_the_size_budget():
    assert sorted(bundled_backbones()) == sorted(BUNDLED)
    for name in BUNDLED:
        assert (ASSETS / f"{name}.safetensors").stat().st_size <= 25 * 1024**2
        card = (ASSETS / f"{name}.md").read_text()
        for part in (
            "source test accuracy",
            "command: `accelerate launch recipes/pretrain.py",
            "classes [0, 1, 2, 3, 4]",
            ", seed ",
        ):
            assert part in card, (name, part)


@pytest.mark.parametrize("name", BUNDLED)
def test_bundled_weights_load_into_the_backbone_with_a_fresh_head(name):
    model = create_backbone(name, num_classes=7).eval()
    stored = safetensors.torch.load_file(ASSETS / f"{name}.safetensors")
    state = model.state_dict()
    assert stored and all(k in state for k in stored)  # every stored tensor is used
    for key, value in stored.items():
        torch.testing.assert_close(state[key], value.to(state[key].dtype), rtol=0, atol=0)
    assert model.get_classifier().out_features == 7
    assert not any(k.startswith(("fc.", "head.")) for k in stored)  # no source classifier
    x = torch.randn(2, *model.pretrained_cfg["input_size"])
    assert model(x).shape == (2, 7)
    assert ncfinetune.list_blocks(model)  # an adapter exists for it


def test_the_patch4_vit_meets_its_source_accuracy_and_says_how_it_was_made():
    """Issue 17: a ViT with at least 90% on Fashion-MNIST 0-4 at 32 px, its card complete."""
    import json

    card = json.loads((ASSETS / "vit_tiny_p4_fmnist04.json").read_text())
    assert card["source_test_accuracy"] >= 0.90
    assert card["model_kwargs"] == {"img_size": 32, "patch_size": 4, "depth": 6}
    assert card["teacher"]["backbone"] == "resnet18_fmnist04"
    assert card["training"]["init_from"] == "benchmarks/results/pretrain/vit_tiny_p4_fmnist04"
    md = (ASSETS / "vit_tiny_p4_fmnist04.md").read_text()
    assert "Trained from the weights of `benchmarks/results/pretrain/vit_tiny_p4_fmnist04`" in md
    assert f"source test accuracy: {card['source_test_accuracy']:.4f}" in md


def test_bundled_backbone_rejects_other_weight_sources():
    with pytest.raises(ConfigError, match="is a bundled backbone with its own weights"):
        create_backbone("resnet18_fmnist04", 5, pretrained=True)


def test_a_pretrain_folder_loads_as_a_backbone(tmp_path):
    """A folder written by recipes/pretrain.py (backbone.json + backbone.safetensors) is a
    backbone: its weights, its data config, a fresh classifier."""
    import json

    import safetensors.torch
    import timm
    import torch

    torch.manual_seed(0)
    src = timm.create_model("test_resnet", num_classes=0)
    safetensors.torch.save_file(src.state_dict(), tmp_path / "backbone.safetensors")
    cfg = {"input_size": [3, 32, 32], "mean": [0.5] * 3, "std": [0.25] * 3, "num_classes": 0}
    card = {"architecture": "test_resnet", "model_kwargs": {}, "pretrained_cfg": cfg}
    (tmp_path / "backbone.json").write_text(json.dumps(card))
    model = create_backbone(str(tmp_path), 7)
    assert model.num_classes == 7 and tuple(model.pretrained_cfg["mean"]) == (0.5, 0.5, 0.5)
    assert torch.equal(model.layer1[0].conv1.weight, src.layer1[0].conv1.weight)
    with pytest.raises(ConfigError, match="is a recipes/pretrain.py folder with its own weights"):
        create_backbone(str(tmp_path), 7, pretrained=True)
    (tmp_path / "backbone.safetensors").unlink()
    with pytest.raises(ConfigError, match="has backbone.json but no backbone.safetensors"):
        create_backbone(str(tmp_path), 7)


def test_bundling_a_pretrain_folder_is_a_separate_maintainer_step(tmp_path, monkeypatch):
    import runpy
    import shutil

    from ncfinetune.backbones.hub import ASSETS as REAL

    tool = runpy.run_path(str(REAL.parents[1] / "tools" / "bundle_backbone.py"), run_name="tool")
    assets = tmp_path / "assets"
    monkeypatch.setitem(tool["main"].__globals__, "ASSETS", assets)
    run = tmp_path / "run"
    run.mkdir()
    for ext in ("safetensors", "json", "md"):  # a real backbone folder: the bundled one's files
        shutil.copyfile(REAL / f"resnet18_fmnist04.{ext}", run / f"backbone.{ext}")
    assert tool["main"]([str(run), "mine"]) == 0
    assert sorted(p.name for p in assets.iterdir()) == ["mine.json", "mine.md", "mine.safetensors"]
    with pytest.raises(SystemExit):  # already bundled: --replace needed
        tool["main"]([str(run), "mine"])
    assert tool["main"]([str(run), "mine", "--replace"]) == 0
    for bad in (["Bad Name"], ["resnet18"], ["vit_tiny_patch16_224"]):  # not a name, timm's own
        with pytest.raises(SystemExit):
            tool["main"]([str(run), *bad])
    assert sorted(p.name for p in assets.iterdir()) == ["mine.json", "mine.md", "mine.safetensors"]
    card = (run / "backbone.json").read_text()
    (run / "backbone.json").write_text("{not json")  # the card: refused before anything is copied
    with pytest.raises(SystemExit):
        tool["main"]([str(run), "other"])
    with pytest.raises(ConfigError, match=r"backbone.json is not a readable JSON backbone card"):
        create_backbone(str(run), 3)
    (run / "backbone.json").write_text(card)
    (run / "backbone.safetensors").write_bytes(b"junk")  # weights that do not load
    with pytest.raises(SystemExit):
        tool["main"]([str(run), "other"])
    with pytest.raises(ConfigError, match=r"backbone.safetensors do not load into resnet18"):
        create_backbone(str(run), 3)
    assert not (assets / "other.json").exists()
    (run / "backbone.md").unlink()
    with pytest.raises(SystemExit):
        tool["main"]([str(run), "ok"])
