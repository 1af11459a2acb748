import warnings

import pytest
import timm
import torch
import torch.nn.functional as F
from conftest import TINY, images, labels, make_model

from ncfinetune import TunedModel, full_wrap, layer_wrap, linear_wrap, scl_wrap
from ncfinetune.errors import ConfigError
from ncfinetune.training import build_optimizer
from ncfinetune.tuning import get_tuned_model, lora_block_wrap

FAMILIES = list(TINY) + ["resnet18", "deit_tiny_distilled_patch16_224"]
METHODS = [
    ("linear", None),
    ("layer", 1),
    ("scl", 1),
    ("full", None),
    ("lora-block", 1),
    ("lora", None),
]


def train_steps(tuned, steps=3, lr=0.1):
    opt = build_optimizer(tuned, lr=lr)
    tuned.train()
    for i in range(steps):
        loss = F.cross_entropy(tuned(images(8, seed=10 + i)), labels(8, seed=20 + i))
        opt.zero_grad()
        loss.backward()
        opt.step()


@pytest.mark.parametrize("name", FAMILIES)
@pytest.mark.parametrize("method,block", METHODS)
def test_only_the_trainable_set_changes(name, method, block):
    tuned = get_tuned_model(make_model(name), method, block=block)
    before = {n: p.detach().clone() for n, p in tuned.model.named_parameters()}
    trainable = {n for n, p in tuned.model.named_parameters() if p.requires_grad}
    train_steps(tuned)
    changed = set()
    for n, p in tuned.model.named_parameters():
        if n in trainable:
            assert p.grad is not None, f"{n} is trainable but got no gradient"
            changed |= {n} if not torch.equal(p, before[n]) else set()
        else:
            assert p.grad is None, f"frozen {n} received a gradient"
            assert torch.equal(p, before[n]), f"frozen {n} changed"
    clf = {n for n in trainable if n.startswith(("fc.", "head.", "head_dist."))}
    assert clf and clf <= changed
    if block is not None:
        name_b = tuned.block_name
        assert any(n.startswith(name_b + ".") for n in changed), "tuned block did not change"
        assert all(n.startswith((name_b + ".", "fc.", "head.", "head_dist.")) for n in trainable)


@pytest.mark.parametrize("name", ["test_resnet", "resnet18"])
def test_bn_update_adapts_running_stats_everywhere(name):
    tuned = layer_wrap(make_model(name), 1)
    stem_bn = tuned.model.bn1
    mean0 = stem_bn.running_mean.clone()
    train_steps(tuned, steps=1)
    assert not torch.equal(stem_bn.running_mean, mean0)
    assert tuned.bn == "update"


@pytest.mark.parametrize("name", ["test_resnet", "resnet18"])
def test_bn_frozen_keeps_pretrained_stats_outside_the_block(name):
    tuned = layer_wrap(make_model(name), 1, bn="frozen")
    buffers = {n: b.clone() for n, b in tuned.model.named_buffers()}
    train_steps(tuned)
    block = tuned.block_name + "."
    for n, b in tuned.model.named_buffers():
        if n.startswith(block):
            if n.endswith("num_batches_tracked"):
                assert b.item() == buffers[n].item() + 3
        else:
            assert torch.equal(b, buffers[n]), f"frozen buffer {n} changed"
    assert tuned.model.bn1.training is False
    assert tuned.adapter.blocks[1].bn1.training is True


def _frozen_buffers(tuned):
    block = tuned.block_name + "."
    return {n: b.clone() for n, b in tuned.model.named_buffers() if not n.startswith(block)}


@pytest.mark.parametrize("via", ["tuned", "model", "a frozen block"])
def test_bn_frozen_holds_whichever_modules_train_is_called(via):
    """bn="frozen" is the wrapper's promise, not a property of ``TunedModel.train()``: the
    running statistics outside the tuned block stay put after a forward in train mode set
    through the wrapper, the wrapped timm model, or one of its blocks."""
    tuned = layer_wrap(make_model("test_resnet"), 1, bn="frozen")
    target = {"tuned": tuned, "model": tuned.model, "a frozen block": tuned.adapter.blocks[0]}
    tuned.eval()
    target[via].train()
    before = _frozen_buffers(tuned)
    with torch.no_grad():
        tuned(images(8, seed=3))
    after = _frozen_buffers(tuned)
    assert all(torch.equal(after[n], before[n]) for n in before), via
    assert tuned.model.bn1.training is False and tuned.adapter.blocks[0].bn1.training is False
    if via != "a frozen block":
        assert tuned.adapter.blocks[1].bn1.training is True  # the tuned block's BN trains
        assert tuned.model.training is True


def test_bn_holds_go_with_the_wrapper():
    import copy
    import gc

    model = make_model("test_resnet")
    tuned = layer_wrap(model, 1, bn="frozen")
    twin = copy.deepcopy(model)  # not this wrapper's: its BatchNorms train as usual
    twin.train()
    assert twin.bn1.training is True
    del tuned
    gc.collect()
    model.train()  # the wrapper is gone: its holds are released
    assert model.bn1.training is True
    again = layer_wrap(model, 1)  # bn="update": nothing held
    again.model.train()
    assert model.bn1.training is True
    del again
    gc.collect()
    held = layer_wrap(model, 2, bn="frozen")  # a new frozen wrapper holds again
    model.train()
    assert model.bn1.training is False and held.adapter.blocks[2].bn1.training is True


def test_bn_policy_on_a_model_without_bn_warns_once():
    with pytest.warns(UserWarning, match="bn='frozen' has no effect: test_vit has no BatchNorm"):
        layer_wrap(make_model("test_vit"), 0, bn="frozen")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        layer_wrap(make_model("test_vit"), 0, bn="frozen")  # second time: silent
        layer_wrap(make_model("test_vit"), 0)  # default policy: silent


@pytest.mark.parametrize("name", FAMILIES)
@pytest.mark.parametrize("method,block", METHODS)
def test_prefix_builds_no_autograd_graph(name, method, block):
    tuned = get_tuned_model(make_model(name), method, block=block).train()
    x = images(2)
    h = tuned.forward_prefix(x)
    assert not h.requires_grad and h.grad_fn is None
    if method == "full":
        assert h is x
    logits, feats = tuned.forward_suffix(h)
    assert logits.requires_grad


@pytest.mark.parametrize("name,block", [("test_resnet", 1), ("resnet18", 4), ("test_vit", 2)])
def test_scl_skip_is_padded_pooled_block_output(name, block):
    tuned = scl_wrap(make_model(name), block, skip_norm=False).eval()
    a = tuned.adapter
    x = images(3)
    with torch.no_grad():
        h = a.blocks[block](tuned.forward_prefix(x))
        skip = tuned.skip(h)
        c = a.block_channels(block)
        assert skip.shape == (3, tuned.feature_dim)
        assert torch.equal(skip[:, :c], a.pool(h))
        assert torch.count_nonzero(skip[:, c:]) == 0
        # The classifier input of SCL FT is phi(x) + skip, with phi(x) the plain backbone's.
        logits, feats = tuned.forward_suffix(tuned.forward_prefix(x))
        phi = tuned.model.forward_head(tuned.model.forward_features(x), pre_logits=True)
        torch.testing.assert_close(feats, phi + skip, rtol=0, atol=1e-6)
        torch.testing.assert_close(logits, tuned.model.get_classifier()(phi + skip))


def test_vit_skip_norm_uses_the_final_norms():
    tuned = scl_wrap(make_model("test_vit"), 2).eval()
    assert tuned.skip_norm is True
    m = tuned.model
    with torch.no_grad():
        h = tuned.adapter.blocks[2](tuned.forward_prefix(images(2)))
        torch.testing.assert_close(tuned.skip(h), m.fc_norm(m.pool(m.norm(h))))


def test_scl_without_skip_equals_layer_ft_plus_nothing():
    layer = layer_wrap(make_model("resnet18"), 4).eval()
    x = images(2)
    with torch.no_grad():
        assert torch.equal(layer(x), layer.model(x))


def test_scl_block_wider_than_features_is_an_error():
    with pytest.raises(ConfigError) as e:
        scl_wrap(make_model("test_resnet"), 2)
    msg = str(e.value)
    assert "block 2 (layer3.0) has 192 channels, more than the 96 penultimate features" in msg
    assert "Blocks that fit: 0 layer1.0, 1 layer2.0, 3 layer4.0" in msg
    layer_wrap(make_model("test_resnet"), 2)  # Layer FT has no skip: fine


def test_config_errors_list_every_problem():
    with pytest.raises(ConfigError) as e:
        get_tuned_model(make_model("test_resnet"), "adapter", bn="sometimes")
    assert "method='adapter' is not one of linear, layer, scl, full, lora-block, lora" in str(
        e.value
    )
    assert "bn='sometimes' is not one of update, frozen" in str(e.value)
    with pytest.raises(ConfigError, match="method='scl' tunes one block: pass block=INDEX"):
        get_tuned_model(make_model("test_resnet"), "scl")
    with pytest.raises(ConfigError, match="already a TunedModel"):
        TunedModel(linear_wrap(make_model("test_resnet")), None)


def test_block_with_linear_probe_warns_and_is_ignored():
    with pytest.warns(UserWarning, match="block=3 has no effect with method='linear'"):
        tuned = get_tuned_model(make_model("test_resnet"), "linear", block=3)
    assert tuned.block_index is None


def test_paper_parameter_percentages():
    # SPEC section 2 / paper Table 3 (10 classes): random init, no download needed.
    r18 = scl_wrap(timm.create_model("resnet18", num_classes=10), 4)
    assert r18.parameter_counts() == (924_170, 11_181_642)
    assert r18.parameter_report() == "trainable 924,170 of 11,181,642 (8.27%)"
    r50 = scl_wrap(timm.create_model("resnet50", num_classes=10), 7)
    assert f"{r50.trainable_share:.2f}" == "6.52"
    assert r50.parameter_report() == "trainable 1,532,938 of 23,528,522 (6.52%)"
    lp = linear_wrap(timm.create_model("resnet18", num_classes=10))
    assert f"{lp.trainable_share:.2f}" == "0.05"
    full = full_wrap(timm.create_model("resnet18", num_classes=10))
    assert full.trainable_share == 100.0


def test_optimizer_sees_only_trainable_parameters():
    tuned = scl_wrap(make_model("resnet18"), 4)
    opt = build_optimizer(tuned)
    params = [p for g in opt.param_groups for p in g["params"]]
    assert sum(p.numel() for p in params) == tuned.parameter_counts()[0]
    assert all(p.requires_grad for p in params)
    with pytest.raises(ConfigError, match="optimizer 'rmsprop' is not one of sgd, adamw"):
        build_optimizer(tuned, "rmsprop")
    with pytest.raises(ConfigError, match="lr must be a positive finite number, got nan"):
        build_optimizer(tuned, lr=float("nan"))


def test_print_trainable_parameters(capsys):
    linear_wrap(make_model("test_resnet")).print_trainable_parameters()
    out = capsys.readouterr().out
    assert out.startswith("trainable 485 of ") and out.rstrip().endswith("%)")


@pytest.mark.parametrize("name", ["test_resnet", "test_vit"])
def test_lora_block_trains_low_rank_factors_only_and_starts_at_the_base_model(name):
    base = make_model(name, seed=0).eval()
    x = images(3)
    with torch.no_grad():
        ref = base(x)
    tuned = lora_block_wrap(make_model(name, seed=0), 1, rank=4, alpha=8).eval()
    with torch.no_grad():
        assert torch.equal(tuned(x), ref)  # B = 0 at init: the update starts at zero
    trainable = [n for n, p in tuned.model.named_parameters() if p.requires_grad]
    block = tuned.block_name + "."
    lora = [n for n in trainable if ".lora_" in n]
    assert lora and all(n.startswith(block) for n in lora)
    rest = set(trainable) - set(lora)  # the classifier, nothing else
    assert rest and all(n.startswith(("fc.", "head.")) for n in rest)
    for n, p in tuned.model.named_parameters():
        if ".lora_A." in n:
            assert p.shape[0] == 4, n
    assert "LoRA r=4 alpha=8" in tuned.describe()
    # with the skip, the classifier input is phi(x) + the SCL skip of the block output
    skipped = lora_block_wrap(make_model(name, seed=0), 1, skip=True, skip_norm=False).eval()
    with torch.no_grad():
        h = skipped.adapter.blocks[1](skipped.forward_prefix(x))
        _, feats = skipped.forward_suffix(skipped.forward_prefix(x))
        phi = skipped.model.forward_head(skipped.model.forward_features(x), pre_logits=True)
    torch.testing.assert_close(feats, phi + skipped.skip(h), rtol=0, atol=1e-6)


def test_lora_config_errors():
    with pytest.raises(ConfigError, match="lora_rank=0 must be an integer >= 1"):
        get_tuned_model(make_model("test_vit"), "lora-block", block=1, lora_rank=0)
    with pytest.raises(ConfigError, match="method='lora-block' tunes one block"):
        get_tuned_model(make_model("test_vit"), "lora-block")
    with pytest.warns(UserWarning, match="lora_skip=True has no effect with method='lora'"):
        get_tuned_model(make_model("test_vit"), "lora", lora_skip=True)
