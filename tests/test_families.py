"""Every timm family through the generic adapter (backbones/generic.py) and the tuning wrapper.

Tiny random-init models at 32 px; the pretrained cfg's input size is overlaid to match, as a user
creating a model with img_size=... would do for timm's data pipeline as well.
"""

from __future__ import annotations

import functools

import pytest
import timm
import torch
import torch.nn.functional as F
from conftest import NUM_CLASSES, images, labels
from torch import nn

from ncfinetune import load_tuned
from ncfinetune.backbones import TimmAdapter, get_adapter
from ncfinetune.errors import ConfigError, UnsupportedModelError
from ncfinetune.tuning import get_tuned_model

SIZE = 32
_VIT = dict(depth=2, embed_dim=64, num_heads=2, img_size=SIZE, patch_size=8)
FAMILIES = {
    "convnext": ("test_convnext", {}),
    "efficientnet": ("test_efficientnet", {}),
    "byobnet": ("test_byobnet", {}),
    "nfnet": ("test_nfnet", {}),
    "maxvit": ("test_maxvit", {"img_size": SIZE}),
    "coatnet": ("test_coatnet", {"img_size": SIZE}),
    "mambaout": ("test_mambaout", {}),
    "vit_relpos": ("test_vit_relpos", {"img_size": SIZE}),
    "swin": (
        "swin_tiny_patch4_window7_224",
        dict(embed_dim=32, depths=(2, 2), num_heads=(1, 2), img_size=SIZE, window_size=4),
    ),
    "eva": ("eva02_tiny_patch14_224", _VIT),
    "deit3": ("deit3_small_patch16_224", _VIT),
}
HAND_WRITTEN = {"deit3"}  # a VisionTransformer: get_adapter picks the ViT adapter


def _tokens(prefix_mean: bool):
    # class token, or mean of the tokens after num_prefix_tokens
    return lambda m, h: h[:, m.num_prefix_tokens :].mean(1) if prefix_mean else h[:, 0]


# how a block output is laid out, and its pooling written out independently of the adapter
NCHW = ("NCHW", lambda m, h: h.mean((2, 3)), 1)
NHWC = ("NHWC", lambda m, h: h.mean((1, 2)), 3)
LAYOUT = {
    **dict.fromkeys(["convnext", "efficientnet", "byobnet", "nfnet", "maxvit", "coatnet"], NCHW),
    **dict.fromkeys(["mambaout", "swin"], NHWC),
    "vit_relpos": ("NLC", _tokens(prefix_mean=True), 2),
    "eva": ("NLC", _tokens(prefix_mean=True), 2),
    "deit3": ("NLC", _tokens(prefix_mean=False), 2),
}
BLOCKS = {  # timm's fine-grained groups: number of blocks, names of the second and the last
    "convnext": (9, "stages.1.blocks.0", "stages.3.blocks.1"),
    "efficientnet": (5, "blocks.1.0", "blocks.4.0"),
    "byobnet": (4, "stages.1.0", "stages.3.0"),
    "nfnet": (4, "stages.1.0", "stages.3.0"),
    "maxvit": (4, "stages.1.blocks.0", "stages.3.blocks.0"),
    "coatnet": (4, "stages.1.blocks.0", "stages.3.blocks.0"),
    "mambaout": (6, "stages.1.blocks.0", "stages.3.blocks.0"),
    "vit_relpos": (9, "blocks.1", "blocks.8"),
    "swin": (4, "layers.0.blocks.1", "layers.1.blocks.1"),
    "eva": (2, "blocks.1", "blocks.1"),
    "deit3": (2, "blocks.1", "blocks.1"),
}


def make(family: str, seed: int = 0, **extra) -> nn.Module:
    name, kwargs = FAMILIES[family]
    torch.manual_seed(seed)
    return timm.create_model(
        name,
        pretrained=False,
        num_classes=NUM_CLASSES,
        pretrained_cfg_overlay=dict(input_size=(3, SIZE, SIZE)),
        **{**kwargs, **extra},
    )


def _hooks(model: nn.Module) -> int:
    return sum(len(m._forward_hooks) for m in model.modules())


def _names(model: nn.Module, modules: list[nn.Module]) -> set[str]:
    """Parameter names inside ``modules``."""
    ids = {id(p) for m in modules for p in m.parameters()}
    return {n for n, p in model.named_parameters() if id(p) in ids}


# -- the adapter ------------------------------------------------------------------------------
@pytest.mark.parametrize("family", FAMILIES)
def test_adapter_reproduces_timm(family):
    model = make(family).eval()
    expected = get_adapter(model)
    assert isinstance(expected, TimmAdapter) == (family not in HAND_WRITTEN)
    adapter = TimmAdapter(model)  # the generic adapter works on the hand-written families too
    n, second, last = BLOCKS[family]
    names = adapter.block_names
    assert (len(names), names[1], names[-1]) == (n, second, last) and len(set(names)) == n
    for i, name in enumerate(names):
        assert model.get_submodule(name) is adapter.blocks[i]
        assert adapter.resolve(name) == i
    trained = [_names(model, adapter.block_modules(i)) for i in range(n)]
    assert all(trained) and sum(map(len, trained)) == len(set().union(*trained))  # disjoint
    assert not set().union(*trained) & _names(model, adapter.classifier_modules())
    assert [b.num_params for b in adapter.describe_blocks()] == [
        sum(model.get_parameter(p).numel() for p in t) for t in trained
    ]

    x = images(2)
    with torch.no_grad():
        h, outs = adapter.forward_capture(x, range(n))
        assert _hooks(model) == 0
        assert torch.equal(h, model.forward_features(x))
        pred = adapter.classify(h, None)
        assert torch.equal(pred.logits, model(x))
        assert torch.equal(pred.features, model.forward_head(h, pre_logits=True))
    layout, pool, channel_dim = LAYOUT[family]
    assert sorted(outs) == list(range(n))
    for i, out in outs.items():
        assert out.shape[channel_dim] == adapter.block_channels(i), (layout, out.shape)
        assert torch.equal(adapter.pool(out), pool(model, out))


@pytest.mark.parametrize("family", ["convnext", "swin"])
def test_hooks_removed_after_an_exception_in_forward(family):
    model = make(family)
    adapter = TimmAdapter(model)

    def boom(module, args, output):
        raise RuntimeError("boom")

    mine = adapter.blocks[-1].register_forward_hook(boom)
    with pytest.raises(RuntimeError, match="boom"):
        adapter.forward_capture(images(2), range(len(adapter.blocks)))
    assert _hooks(model) == 1  # only the test's own hook is left
    mine.remove()
    assert _hooks(model) == 0


def test_construction_leaves_modes_and_rng_alone():
    model = make("efficientnet").train()
    model.blocks[1].eval()
    modes = [m.training for m in model.modules()]
    state = torch.random.get_rng_state()
    TimmAdapter(model)
    assert [m.training for m in model.modules()] == modes
    assert torch.equal(torch.random.get_rng_state(), state)


def test_input_size_from_pretrained_cfg_or_patch_embed():
    # test_convnext: the pretrained cfg's 160 px; swin built for 32 px: its PatchEmbed's img_size
    torch.manual_seed(0)
    convnext = timm.create_model("test_convnext", num_classes=NUM_CLASSES)
    swin = timm.create_model(FAMILIES["swin"][0], num_classes=NUM_CLASSES, **FAMILIES["swin"][1])
    assert swin.pretrained_cfg["input_size"] == (3, 224, 224)
    assert [TimmAdapter(m).block_channels(-1) for m in (convnext, swin)] == [64, 64]


def test_blocks_named_like_regnet_and_densenet():
    # blocks named s1.b1 / denselayer5 (numbered, not container elements); DenseNet's final
    # features.norm5 sits in timm's head group with the classifier: not a block
    torch.manual_seed(0)
    overlay = dict(pretrained_cfg_overlay=dict(input_size=(3, SIZE, SIZE)))
    regnet = timm.create_model("regnetx_002", num_classes=NUM_CLASSES, **overlay).eval()
    densenet = timm.create_model("densenet121", num_classes=NUM_CLASSES, **overlay).eval()
    names = get_adapter(regnet).block_names
    assert (len(names), names[:2], names[-1]) == (13, ["s1.b1", "s2.b1"], "s4.b7")
    adapter = get_adapter(densenet)
    names = adapter.block_names
    assert (len(names), names[0], names[-1]) == (
        58,
        "features.denseblock1.denselayer1",
        "features.denseblock4.denselayer16",
    )
    assert densenet.features.norm5 not in [m for i in range(58) for m in adapter.block_modules(i)]
    x = images(2)
    with torch.no_grad():
        for model in (regnet, densenet):
            adapter = get_adapter(model)
            assert torch.equal(
                adapter.classify(adapter.forward_capture(x)[0], None).logits, model(x)
            )


def test_unsupported_models_say_what_is_required():
    for model in (nn.Linear(3, 3), timm.create_model("test_convnext", features_only=True)):
        with pytest.raises(UnsupportedModelError, match=r"forward_head\(x, pre_logits=True\)"):
            get_adapter(model)


def test_head_that_is_not_the_classifier_is_rejected():
    model = make("convnext")
    head = model.forward_head
    model.forward_head = lambda h, pre_logits=False: head(h, pre_logits) * (1 if pre_logits else 2)
    with pytest.raises(UnsupportedModelError, match="not get_classifier"):
        get_adapter(model)


def test_block_wider_than_penultimate_features_names_blocks_that_fit():
    model = make("convnext", head_hidden_size=40)  # pre-logits 64 -> 40: stages 2-3 are wider
    with pytest.raises(ConfigError) as err:
        get_tuned_model(model, "scl", block="stages.3.blocks.0")
    msg = str(err.value)
    assert "64 channels" in msg and "2 stages.1.blocks.1" in msg and "stages.2.blocks.0" not in msg
    get_tuned_model(make("convnext", head_hidden_size=40), "scl", block="stages.1.blocks.1")  # fits


# -- the methods through the wrapper ----------------------------------------------------------
METHODS = ["layer", "scl", "lora-block"]


@functools.cache
def _block(family: str) -> int:
    """A block whose timm group holds more than the block itself where one fits the skip."""
    adapter = get_adapter(make(family))
    fits = [
        i for i in range(len(adapter.blocks)) if adapter.block_channels(i) <= adapter.feature_dim
    ]
    grouped = [i for i in fits if len(adapter.block_modules(i)) > 1 and i < len(fits) - 1]
    return grouped[0] if grouped else fits[len(fits) // 2]


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("family", FAMILIES)
def test_methods(family, method, tmp_path):
    model = make(family)
    has_bn = any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())
    block = _block(family)
    tuned = get_tuned_model(model, method, block=block, bn="frozen" if has_bn else None)
    adapter = tuned.adapter
    x, y = images(4), labels(4)

    # the trained set is exactly timm's group (or the LoRA factors) plus the classifier
    head = _names(model, adapter.classifier_modules())
    if method == "lora-block":
        group = {n for n, _ in model.named_parameters() if "lora_" in n}
    else:
        group = _names(model, adapter.block_modules(block))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert group and trainable == group | head
    before = {k: v.clone() for k, v in model.state_dict().items()}
    trained_modules = {id(s) for m in tuned.trainable_modules() for s in m.modules()}
    inside = {
        f"{name}.{b}" if name else b
        for name, m in model.named_modules()
        if id(m) in trained_modules
        for b, _ in m.named_buffers(recurse=False)
    }

    opt = torch.optim.SGD(tuned.trainable_parameters(), lr=0.1)
    tuned.train()
    for _ in range(2):
        opt.zero_grad()
        F.cross_entropy(tuned(x), y).backward()
        opt.step()
    after = model.state_dict()
    changed = {k for k in after if not torch.equal(after[k], before[k])}
    # frozen parameters bit-identical; with frozen BN (or none) frozen buffers too. Some trained
    # tensors may legitimately stay put (zero-initialised branches get zero grads at first).
    assert changed <= trainable | inside, sorted(changed - trainable - inside)[:5]
    assert changed & head

    tuned.eval()
    with torch.no_grad():
        logits = tuned(x)
        if method == "layer":  # Layer FT's forward is the backbone's
            assert torch.equal(logits, model(x))
        if method == "scl":
            h, outs = adapter.forward_capture(x, [block])
            pooled = tuned.adapter.pool_normed(outs[block]) if tuned.skip_norm else None
            pooled = adapter.pool(outs[block]) if pooled is None else pooled
            skip = tuned.skip(outs[block])
            c = adapter.block_channels(block)
            assert pooled.shape[1] == c
            assert torch.equal(skip, F.pad(pooled, (0, adapter.feature_dim - c)))
            phi = adapter.penultimate(h)
            assert torch.equal(logits, model.get_classifier()(phi + skip))

    tuned.save_pretrained(tmp_path / "ckpt")
    loaded = load_tuned(tmp_path / "ckpt", make(family)).eval()
    with torch.no_grad():
        assert torch.equal(loaded(x), logits)
