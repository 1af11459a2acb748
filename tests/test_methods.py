"""Method configs and their registry: peft-shaped entry point, validation, one place per method."""

import dataclasses
import warnings

import pytest
import torch
from conftest import images, make_model
from torch import nn

from ncfinetune import (
    FullConfig,
    LayerConfig,
    LinearConfig,
    LoRABlockConfig,
    LoRAConfig,
    SCLConfig,
    get_tuned_model,
    load_tuned,
    scl_wrap,
)
from ncfinetune.errors import ConfigError
from ncfinetune.training import train_steps
from ncfinetune.tuning.features import collect_block_features
from ncfinetune.tuning.methods import METHODS, MethodConfig, method_config, register


def fetcher(n=24, k=5, seed=0):
    x = images(n, seed=seed)
    y = torch.arange(n) % k

    def fetch(rows):
        index = torch.as_tensor(rows)
        return x[index], y[index]

    return fetch


def test_registry_names_every_method_once_with_docs():
    assert list(METHODS) == ["linear", "layer", "scl", "full", "lora-block", "lora"]
    for name, cls in METHODS.items():
        assert cls.name == name and cls.title and cls.__doc__
        for f in dataclasses.fields(cls):  # every field says what it does
            assert f.metadata.get("help"), (name, f.name)


def test_config_object_and_shortcut_build_the_same_model():
    a = get_tuned_model(make_model("test_resnet", seed=0), SCLConfig(block=1, bn="frozen"))
    b = scl_wrap(make_model("test_resnet", seed=0), 1, bn="frozen")
    c = get_tuned_model(make_model("test_resnet", seed=0), "scl", block=1, bn="frozen")
    x = images(3)
    with torch.no_grad():
        assert torch.equal(a.eval()(x), b.eval()(x)) and torch.equal(a(x), c.eval()(x))
    assert a.describe() == b.describe() == c.describe()
    assert a.method == "scl" and a.block_index == 1 and a.bn == "frozen"


@pytest.mark.parametrize(
    "config,match",
    [
        (lambda: SCLConfig(), "method='scl' tunes one block: pass block=INDEX"),
        (lambda: LayerConfig(block=1.5), "block must be an int index or a module name, got float"),
        (lambda: LinearConfig(bn="sometimes"), "bn='sometimes' is not one of update, frozen"),
        (lambda: LoRAConfig(lora_rank=0), "lora_rank=0 must be an integer >= 1"),
        (
            lambda: LoRABlockConfig(block=1, lora_alpha=-1),
            r"lora_alpha=-1 must be a finite number in \(0, 10000\]",
        ),
        (lambda: method_config("adapter", bn="x"), "method='adapter' is not one of linear"),
        (lambda: method_config("scl", block=1, rank=4), "unknown method setting"),
    ],
)
def test_bad_configs_say_what_was_received_and_what_is_valid(config, match):
    with pytest.raises(ConfigError, match=match):
        config()


def test_every_problem_in_one_error():
    with pytest.raises(ConfigError) as e:
        LoRABlockConfig(bn="x", lora_rank=0)
    msg = str(e.value)
    assert "bn='x'" in msg and "lora_rank=0" in msg and "tunes one block" in msg


def test_settings_without_effect_warn_once_and_are_dropped():
    with pytest.warns(UserWarning, match="lora_rank=4 has no effect with method='scl'"):
        cfg = method_config("scl", block=1, lora_rank=4)
    assert cfg == SCLConfig(block=1)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # neutral values are silent
        method_config("layer", block=1, skip_norm=None, lora_skip=False, lora_rank=8)


def test_a_config_object_with_extra_settings_is_an_error():
    with pytest.raises(ConfigError, match="given with a config object"):
        get_tuned_model(make_model("test_resnet"), SCLConfig(block=1), bn="frozen")
    with pytest.raises(ConfigError, match="config must be a method config"):
        from ncfinetune.tuning import TunedModel

        TunedModel(make_model("test_resnet"), "scl")


@pytest.mark.parametrize(
    "config,uses_skip,prefix",
    [
        (LinearConfig(), False, "all"),
        (LayerConfig(block=1), False, 1),
        (SCLConfig(block=1), True, 1),
        (FullConfig(), False, None),
        (LoRABlockConfig(block=1), False, 1),
        (LoRABlockConfig(block=1, lora_skip=True), True, 1),
        (LoRAConfig(), False, None),
    ],
)
def test_the_method_object_answers_skip_and_prefix(config, uses_skip, prefix):
    tuned = get_tuned_model(make_model("test_resnet"), config)
    assert config.uses_skip is uses_skip
    n = len(tuned.adapter.blocks)
    assert tuned.prefix_stop == (n if prefix == "all" else prefix)


def test_lora_block_with_skip_gives_features_with_the_skip():
    """collect_block_features asks the method, so lora-block + lora_skip includes the skip."""
    tuned = get_tuned_model(make_model("test_resnet"), LoRABlockConfig(block=1, lora_skip=True))
    x, y = images(6), torch.arange(6) % 5
    got = collect_block_features(tuned, [(x, y)])
    with torch.no_grad():
        _, feats = tuned.eval().forward_with_features(x)
        plain = tuned.adapter.penultimate(tuned.adapter.forward_capture(x)[0])
    assert torch.allclose(got.features["penultimate"], feats, atol=1e-6)
    assert not torch.allclose(feats, plain)  # the skip is there


@dataclasses.dataclass
class NormsOnlyConfig(MethodConfig):
    """A toy method defined outside the package: the classifier and every BatchNorm train."""

    name = "norms-only"
    title = "norms only"

    def prefix_stop(self, num_blocks, block_index):
        return None  # norms everywhere: no frozen prefix

    def trainable_modules(self, tuned):
        norms = [m for m in tuned.model.modules() if isinstance(m, nn.BatchNorm2d)]
        return list(tuned.adapter.classifier_modules()) + norms


def test_a_new_method_is_one_class_and_one_registry_entry(tmp_path):
    register(NormsOnlyConfig)
    try:
        tuned = get_tuned_model(make_model("test_resnet", seed=0), "norms-only")
        modules = dict(tuned.model.named_modules())
        names = {n for n, p in tuned.model.named_parameters() if p.requires_grad}
        owners = {modules[n.rsplit(".", 1)[0]] for n in names}
        assert names and all(isinstance(m, (nn.BatchNorm2d, nn.Linear)) for m in owners)
        before = {n: p.detach().clone() for n, p in tuned.model.named_parameters()}
        train_steps(tuned, fetcher(), range(24), steps=2, batch_size=8)
        changed = {n for n, p in tuned.model.named_parameters() if not torch.equal(p, before[n])}
        assert changed and changed <= names
        tuned.save_pretrained(tmp_path)
        again = load_tuned(tmp_path, make_model("test_resnet", seed=0))
        x = images(3, seed=3)
        with torch.no_grad():
            assert torch.equal(again.eval()(x), tuned.eval()(x))
        assert "norms only of test_resnet" in again.describe()
        with pytest.raises(ValueError, match="registered twice"):
            register(NormsOnlyConfig)
    finally:
        METHODS.pop("norms-only", None)


def test_trainable_set_is_what_the_method_says():
    tuned = get_tuned_model(make_model("test_resnet"), LayerConfig(block=2))
    want = {id(p) for m in tuned.trainable_modules() for p in m.parameters()}
    got = {id(p) for p in tuned.trainable_parameters()}
    assert got == want
    assert all(isinstance(m, nn.Module) for m in tuned.trainable_modules())


def test_head_warmup_trains_the_classifier_alone_first_then_the_block():
    """LP-FT in train_steps: the warm-up steps are a linear probe's (same losses), the block
    changes only afterwards, and the trainable set is restored."""
    fetch = fetcher()
    kw = {"batch_size": 8, "lr": 0.05, "seed": 1}
    lp = get_tuned_model(make_model("test_vit", seed=0), "linear")
    lp_losses = train_steps(lp, fetch, range(24), steps=2, **kw)
    warm = get_tuned_model(make_model("test_vit", seed=0), "layer", block=1)
    block0 = [p.detach().clone() for p in warm.adapter.blocks[1].parameters()]
    head_only = get_tuned_model(make_model("test_vit", seed=0), "layer", block=1)
    train_steps(head_only, fetch, range(24), steps=3, head_warmup=2, **kw)
    losses = train_steps(warm, fetch, range(24), steps=4, head_warmup=2, **kw)
    assert losses.shape == (4,)
    torch.testing.assert_close(losses[:2], lp_losses)
    blocks = [warm.adapter.blocks[1], head_only.adapter.blocks[1]]
    assert all(
        any(not torch.equal(a, p) for a, p in zip(block0, b.parameters(), strict=True))
        for b in blocks
    )
    assert {id(p) for p in warm.trainable_parameters()} >= {
        id(p) for p in warm.adapter.blocks[1].parameters()
    }
    for bad in (4, 5, -1, 1.5, True):
        with pytest.raises(ConfigError, match=r"head_warmup must be an int in \[0, steps=4\)"):
            train_steps(warm, fetch, range(24), steps=4, head_warmup=bad, **kw)
