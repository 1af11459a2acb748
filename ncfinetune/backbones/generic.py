"""Any timm classifier, through timm's own model contract (ConvNeXt, EfficientNet, ByobNet, NFNet,
MaxViT/CoAtNet, MambaOut, Swin, EVA, relpos ViT, ...), with no per-family code.

Blocks come from timm's parameter grouping, ``model.group_matcher(coarse=False)`` fed to
``timm.models.group_parameters``: the fine-grained groups timm itself uses for layer-wise lr
decay, in timm's order. That grouping (rather than ``feature_info``, which only marks stage ends,
or ``forward_intermediates``, whose indices are stages for most CNNs) is the only contract that
names every block of every family and says which extra modules go with it. From the groups:

- The **trained set** of a block is every module of its group: the maximal submodules whose
  parameters all fall in that group. A ConvNeXt/MambaOut/Swin stage's ``downsample`` is grouped
  with the stage's first block, and the modules timm attaches to the last group (the final
  ``norm``, EfficientNet's ``conv_head``/``bn2``, NFNet's ``final_conv``) train with the last
  block. The classifier is left out of every group: it always trains.
- A group must be whole modules: a parameter grouped with a block but held by a module with
  parameters of other groups (CoaT's ``cls_token1``, NesT's ``levels.0.pos_embed``) cannot be
  trained through ``requires_grad`` on modules, and the model is rejected.
- Every group is a block except timm's stem (the ``stem`` pattern of a dict matcher, ordinal 0
  of a function matcher) and the classifier's group (timm's unmatched head, which also holds
  e.g. DenseNet's final ``features.norm5``).
- The **block** of a group (its name, and the module whose output is captured) is the group's
  most block-like module: an element of a container (``blocks.3.1``, ``stages.2``), else a
  composite module whose name ends in a number (RegNet's ``s1.b2``), else any; timm numbers its
  blocks, which is what the ``(\\d+)`` of every matcher captures, while a single layer such as
  EfficientNet's ``bn2`` attached to the last group is not a block. A wrapper holding a single
  block is looked through, and a stage whose output is its single block's output (the same
  tensor) is named by that block, so ``stages.1.blocks.0`` reads the same whether or not a
  ``stages.1.downsample`` shares its group; a group of several blocks (CoAtNet's ``stages.2``)
  keeps the stage's name. Among equals, the one that finishes last in the forward pass is the
  block (a block run twice in one pass is captured at its last call). Groups that never run
  inside ``forward_features`` are dropped.

One dummy forward at construction (batch 1, eval mode, no autograd, every module's train flag
restored, a private random generator so the global RNG is untouched) puts the blocks in forward
order, records each block's pooled width (:meth:`TimmAdapter.block_channels`) and checks the
contract :meth:`classify` relies on: inside ``forward_head`` the classifier receives exactly
``forward_head(h, pre_logits=True)`` and its output is the logits. Distilled two-head models,
heads with a norm after the pre-logits (EfficientViT-MSRA, SHViT) and models whose
``get_classifier()`` is the whole head (Sequencer) fail it and are rejected. Its input size
is the ``img_size`` of the model's timm ``PatchEmbed`` when it has one (a model created with
``img_size=...`` keeps the pretrained cfg's size), else ``pretrained_cfg["input_size"]``; its
channels the cfg's, else the first conv's (``in_chans=1``).

Layout of a block output, decided from the tensor alone, the way timm's own feature extraction
decides it: rank 3 is a token sequence N x L x C; rank 4 is NHWC when the model declares
``output_fmt = "NHWC"`` (Swin, MambaOut, Sequencer: timm's ``features_only`` wrapper reads the
same attribute) and NCHW otherwise; rank 2 is already pooled. Pooling (SPEC section 2): feature
maps are averaged over space per channel; token sequences use the model's own token pooling,
``timm.layers.global_pool_nlc`` with its ``global_pool`` (class token, mean, max, avgmax; an
attention pool falls back to the mean of the non-prefix tokens) and ``num_prefix_tokens``. The
skip is the raw pooled block output: this adapter does not know which module is a model's final
norm, so it offers no ``pool_normed``.

The adapter cannot run a range of blocks on its own (``splittable = False``): the frozen prefix
of a tuned block cannot be cached. It runs ``forward_features`` whole and captures block outputs
with forward hooks that live for one call.
"""

from __future__ import annotations

import itertools
import re
from collections import defaultdict
from collections.abc import Collection
from dataclasses import dataclass

import torch
from timm.layers import PatchEmbed, global_pool_nlc
from timm.models import group_parameters
from torch import nn

from ncfinetune.backbones.base import BackboneAdapter, BlockInfo, arch_name
from ncfinetune.errors import UnsupportedModelError

_CONTRACT = ("forward_features", "forward_head", "get_classifier", "group_matcher")
_TOKEN_POOLS = ("token", "avg", "max", "avgmax")


@dataclass
class _Group:
    """One timm parameter group that holds a block."""

    modules: list[str]
    """Every module of the group (maximal submodules whose parameters are all in it)."""
    outer: list[str]
    """The group's most block-like modules; the block is (in) the one that finishes last."""
    inner: dict[str, list[str]]
    """For each of ``outer``, the single blocks of its containers (candidate names)."""
    block: str = ""
    channels: int = 0
    order: int = 0


class TimmAdapter(BackboneAdapter):
    """Blocks are timm's fine-grained parameter groups (see the module docstring)."""

    family = "timm (generic)"
    splittable = False

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self._groups = _probe(self, _block_groups(model))
        super().__init__(model)

    @classmethod
    def matches(cls, model: nn.Module) -> bool:
        """True for a timm classifier (``forward_features``, ``forward_head``,
        ``get_classifier``, ``group_matcher``) whose groups hold at least one block."""
        if not all(callable(getattr(model, a, None)) for a in _CONTRACT):
            return False
        try:
            return bool(_block_groups(model))
        except UnsupportedModelError:
            return True  # a timm classifier after all: the constructor says what is wrong
        except Exception:  # a matcher or classifier outside timm's contract (a tuple of heads)
            return False

    @classmethod
    def why_not(cls, model: nn.Module) -> str:
        """Which part of the contract ``model`` misses (for the error of ``get_adapter``)."""
        missing = [a for a in _CONTRACT if not callable(getattr(model, a, None))]
        if missing:
            return f"it has no {', '.join(f'{a}()' for a in missing)}"
        try:
            head = model.get_classifier()
            if not isinstance(head, nn.Linear):
                return (
                    f"get_classifier() returns a {type(head).__name__}, not one nn.Linear "
                    "(a distilled or multi-head classifier)"
                )
            if not _block_groups(model):
                return "group_matcher() puts no block in a group of its own"
        except Exception as err:  # noqa: BLE001 - the reason is the message
            return f"its group_matcher()/get_classifier() failed: {type(err).__name__}: {err}"
        return "its forward does not split at the groups group_matcher() names"

    def _named_blocks(self) -> list[tuple[str, nn.Module]]:
        return [(g.block, self.model.get_submodule(g.block)) for g in self._groups]

    def block_channels(self, index: int) -> int:
        return self._groups[index].channels

    def block_modules(self, index: int) -> list[nn.Module]:
        """Every module of the block's timm group: the block, plus e.g. the stage's
        ``downsample`` before it, or the final norm attached to the last block."""
        # looked up by name at each use: SyncBatchNorm conversion or timm's freeze may swap a
        # module of the group (EfficientNet's bn2) after construction
        return [self.model.get_submodule(n) for n in self._groups[index].modules]

    def describe_blocks(self) -> list[BlockInfo]:
        """One :class:`BlockInfo` per block; ``num_params`` counts the whole timm group."""
        return [
            BlockInfo(i, name, self.block_channels(i), _num_params(self.block_modules(i)))
            for i, name in enumerate(self.block_names)
        ]

    def stem(self, x: torch.Tensor) -> torch.Tensor:
        raise self._not_splittable()

    def forward_blocks(
        self, h: torch.Tensor, start: int = 0, stop: int | None = None
    ) -> torch.Tensor:
        raise self._not_splittable()

    def _not_splittable(self) -> UnsupportedModelError:
        return UnsupportedModelError(
            f"{arch_name(self.model)} goes through the generic timm adapter, which cannot run "
            "a range of blocks on its own (splittable=False). Run the whole feature extractor "
            "with adapter.forward_capture(x, capture) instead."
        )

    def forward_capture(
        self, x: torch.Tensor, capture: Collection[int] = ()
    ) -> tuple[torch.Tensor, dict[int, torch.Tensor]]:
        """``model.forward_features(x)`` and the raw output of every block index in ``capture``,
        taken by forward hooks registered for this call only (removed even on an exception)."""
        outputs: dict[int, torch.Tensor] = {}
        handles = []
        try:
            for i in set(capture):
                block = self.model.get_submodule(self._groups[i].block)
                handles.append(block.register_forward_hook(_store(outputs, i)))
            h = self.model.forward_features(x)
        finally:
            for handle in handles:
                handle.remove()
        return h, outputs

    def pool(self, h: torch.Tensor) -> torch.Tensor:
        if h.ndim == 2:
            return h
        if h.ndim == 3:
            pool_type = getattr(self.model, "global_pool", "avg")
            if pool_type not in _TOKEN_POOLS:  # '', 'map' (attention pool), a module
                pool_type = "avg"
            prefix = int(getattr(self.model, "num_prefix_tokens", 0) or 0)
            return global_pool_nlc(h, pool_type=pool_type, num_prefix_tokens=prefix)
        if h.ndim == 4:
            nhwc = str(getattr(self.model, "output_fmt", "NCHW")) == "NHWC"
            return h.mean(dim=(1, 2) if nhwc else (2, 3))
        raise UnsupportedModelError(
            f"cannot pool a block output of shape {tuple(h.shape)} from {arch_name(self.model)}: "
            "the generic adapter pools N x C, N x L x C tokens and N x C x H x W (or NHWC) maps."
        )

    def penultimate(self, h: torch.Tensor) -> torch.Tensor:
        return self.model.forward_head(h, pre_logits=True)


def _store(outputs: dict[int, torch.Tensor], index: int):
    def hook(module: nn.Module, args: tuple, output: torch.Tensor) -> None:
        outputs[index] = output

    return hook


def _num_params(modules: list[nn.Module]) -> int:
    seen = {id(p): p.numel() for m in modules for p in m.parameters()}
    return sum(seen.values())


def _block_groups(model: nn.Module) -> list[_Group]:
    """timm's fine-grained parameter groups that hold a block, in timm's order."""
    matcher = model.group_matcher(coarse=False)
    classifier = {id(p) for p in model.get_classifier().parameters()}
    params = dict(model.named_parameters())
    all_groups = group_parameters(model, matcher, reverse=True)  # parameter name -> group id
    head = {g for n, g in all_groups.items() if id(params[n]) in classifier}
    # the classifier is left out (it always trains); its group (timm's head) holds no block
    group_of = {n: g for n, g in all_groups.items() if id(params[n]) not in classifier}
    # the groups each module's parameters fall in; a module belongs to group g when all do
    module_groups: dict[str, set[int]] = defaultdict(set)
    for name, g in group_of.items():
        parts = name.split(".")
        for k in range(len(parts)):
            module_groups[".".join(parts[:k])].add(g)

    def sole_group(name: str) -> int | None:
        gs = module_groups.get(name, set())
        return next(iter(gs)) if len(gs) == 1 else None

    modules: dict[int, list[str]] = defaultdict(list)
    for name, _ in model.named_modules():
        g = sole_group(name) if name else None
        if g is not None and sole_group(name.rpartition(".")[0]) is None:
            modules[g].append(name)
    groups = []
    for g in sorted(set(group_of.values())):
        names = [n for n, gg in group_of.items() if gg == g]
        if g in head or all(_is_stem(matcher, n) for n in names):
            continue  # timm's stem, or the head (e.g. DenseNet's final features.norm5)
        loose = [n for n in names if sole_group(n.rpartition(".")[0]) != g]
        if loose:
            raise UnsupportedModelError(
                f"timm's parameter group of {modules[g][:2]} in {arch_name(model)} also holds "
                f"{loose[:3]}, whose module holds parameters of other groups too, so the block's "
                "trained set cannot be expressed as whole modules. Use a model of another family "
                "(hand-written adapters: ResNet, VisionTransformer)."
            )
        ranked = [_descend(model, n) for n in modules[g]]
        best = max(r for r, _ in ranked)
        outer = [n for r, n in ranked if r == best]
        groups.append(_Group(modules[g], outer, {o: _sole_blocks(model, o) for o in outer}))
    return groups


def _is_stem(matcher: object, name: str) -> bool:
    """Whether timm's matcher puts parameter ``name`` in the stem: the ``stem`` pattern of a
    dict matcher, ordinal 0 of a function matcher (timm's convention for both)."""
    if isinstance(matcher, dict):
        stem = matcher.get("stem")
        return isinstance(stem, str) and re.match(stem, name) is not None
    ordinal = matcher(name)
    first = next(iter(ordinal), None) if isinstance(ordinal, (tuple, list)) else ordinal
    return first == 0


def _holders(mod: nn.Module) -> list[tuple[str, nn.Module]]:
    """Children that hold parameters."""
    return [(n, c) for n, c in mod.named_children() if next(c.parameters(), None) is not None]


def _rank(name: str, mod: nn.Module) -> int:
    """How surely module ``name`` is a block: 2 for an element of a container (``blocks.3``),
    1 for a composite module whose name ends in a number (RegNet's ``s1.b2``, DenseNet's
    ``denselayer5``; not a single layer such as EfficientNet's ``bn2``), else 0. Block numbers
    are what the ``(\\d+)`` of timm's matchers capture."""
    last = name.rpartition(".")[2]
    if last.isdigit():
        return 2
    return int(last[-1:].isdigit() and bool(_holders(mod)))


def _descend(model: nn.Module, name: str) -> tuple[int, str]:
    """``(rank, name)`` of the first ranked module down the chain of sole parameter-holding
    children from ``name`` (a wrapper holding one block gives the block), else of ``name``."""
    mod = model.get_submodule(name)
    here = name
    while not _rank(here, mod):
        holders = _holders(mod)
        if next(mod.parameters(recurse=False), None) is not None or len(holders) != 1:
            return 0, name
        here, mod = f"{here}.{holders[0][0]}", holders[0][1]
    return _rank(here, mod), here


def _sole_blocks(model: nn.Module, name: str) -> list[str]:
    """Numbered descendants of ``name`` that are the only parameter-holding child of their
    parent (a stage's single block), shallowest first."""
    found = []
    for sub, mod in model.get_submodule(name).named_modules(prefix=name):
        holders = _holders(mod)
        if len(holders) == 1 and _rank(f"{sub}.{holders[0][0]}", holders[0][1]):
            found.append(f"{sub}.{holders[0][0]}")
    return sorted(found, key=lambda n: n.count("."))


def _probe(adapter: TimmAdapter, groups: list[_Group]) -> list[_Group]:
    """One dummy forward: put the groups in forward order, fill in each block and its width,
    check the head contract. Returns the groups whose block runs in ``forward_features``."""
    model = adapter.model
    arch = arch_name(model)
    events: list[tuple[str, object]] = []  # (module name, output) in the order they finish
    hooked = {n for g in groups for o in g.outer for n in (o, *g.inner[o])}
    handles = [
        model.get_submodule(n).register_forward_hook(lambda m, a, out, n=n: events.append((n, out)))
        for n in sorted(hooked)
    ]
    classifier = model.get_classifier()
    inputs: list[object] = []  # what the classifier receives inside model.forward_head
    handles.append(classifier.register_forward_hook(lambda m, a, out: inputs.append(a[0])))
    modes = [(m, m.training) for m in model.modules()]
    try:
        model.eval()
        with torch.no_grad():
            feats = _dummy_features(model, events)
            logits = model.forward_head(feats)
            handles.pop().remove()
            try:
                phi = model.forward_head(feats, pre_logits=True)
                rebuilt = classifier(phi)
            except Exception:  # e.g. get_classifier() is the whole head: reported just below
                phi = rebuilt = None
    finally:
        for handle in handles:
            handle.remove()
        for m, training in modes:
            m.training = training
    # phi(x) must be exactly the classifier's input (a head norm after pre_logits, as in
    # EfficientViT-MSRA, fails this), and the logits the classifier's output
    if not (
        len(inputs) == 1
        and isinstance(phi, torch.Tensor)
        and isinstance(inputs[0], torch.Tensor)
        and torch.equal(inputs[0], phi)
        and isinstance(logits, torch.Tensor)
        and isinstance(rebuilt, torch.Tensor)
        and logits.shape == rebuilt.shape
        and torch.allclose(logits, rebuilt, rtol=1e-4, atol=1e-5)
    ):
        raise UnsupportedModelError(
            f"{arch}'s logits are not get_classifier() applied to forward_head(x, "
            "pre_logits=True) (e.g. a distilled model with two heads, or a norm between "
            "pre-logits and the classifier), so the generic adapter cannot add the SCL skip to "
            "the classifier's input."
        )
    finish = {n: (i, out) for i, (n, out) in enumerate(events)}  # last call wins
    kept = []
    for g in groups:
        ran = [o for o in g.outer if o in finish]
        if not ran:
            continue  # the block runs outside forward_features (or not at all)
        outer = max(ran, key=lambda o: finish[o][0])
        out = finish[outer][1]
        # a stage that only runs its single block is named by the block: same output tensor
        same = [n for n in g.inner[outer] if n in finish and finish[n][1] is out]
        g.block = same[0] if same else outer
        if not isinstance(out, torch.Tensor) or out.ndim not in (2, 3, 4):
            raise UnsupportedModelError(
                f"block {g.block} of {arch} returns "
                f"{tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__}; the "
                "generic adapter needs one tensor N x C, N x L x C or N x C x H x W (or NHWC)."
            )
        g.channels = int(adapter.pool(out).shape[1])
        g.order = finish[outer][0]
        kept.append(g)
    kept.sort(key=lambda g: g.order)
    return kept


def _dummy_features(model: nn.Module, events: list) -> torch.Tensor:
    """``forward_features`` on one random image of the size the model was built for."""
    param = next(model.parameters())
    cfg = getattr(model, "pretrained_cfg", None) or {}
    cfg_size = tuple(cfg.get("input_size", (3, 224, 224)))
    sizes = [tuple(m.img_size) for m in model.modules() if isinstance(m, PatchEmbed) and m.img_size]
    sizes = list(dict.fromkeys(sizes[:1] + [tuple(cfg_size[1:])]))
    # timm's cfg says 3 channels even for in_chans=1; the first conv's in_channels says 1, but
    # is 48 behind TResNet's space-to-depth stem: try the cfg's first
    chans = list(dict.fromkeys([cfg_size[0], _first_conv_channels(model, cfg_size[0])]))
    gen = torch.Generator().manual_seed(0)  # private: the global RNG stays untouched
    errors = []
    for size, c in itertools.product(sizes, chans):
        x = torch.randn(1, c, *size, generator=gen).to(param.device, param.dtype)
        events.clear()
        try:
            return model.forward_features(x)
        except Exception as e:  # the wrong size for this model: try the next candidate
            errors.append(f"{(c, *size)}: {type(e).__name__}: {e}")
    raise UnsupportedModelError(
        f"the generic adapter runs one dummy forward to learn {arch_name(model)}'s block shapes, "
        f"and it failed at every input size it tried ({'; '.join(errors)}). Create the model "
        "with its input size in the pretrained cfg, e.g. timm.create_model(name, img_size=S, "
        "pretrained_cfg_overlay=dict(input_size=(3, S, S)))."
    )


def _first_conv_channels(model: nn.Module, default: int) -> int:
    first = (getattr(model, "pretrained_cfg", None) or {}).get("first_conv")
    try:
        return int(model.get_submodule(first).in_channels)
    except (AttributeError, TypeError):
        return int(getattr(model, "in_chans", default))
