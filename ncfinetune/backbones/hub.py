"""Where backbones come from: the bundled offline backbones, a local weights file, or the hub.

Every path goes through ``timm.create_model``; local and bundled weights use timm's own
``pretrained_cfg_overlay=dict(file=...)`` loader, which drops a classifier of another size.
"""

from __future__ import annotations

import json
import sys
import zipfile
from pathlib import Path

import timm
from torch import nn

from ncfinetune.errors import ConfigError

ASSETS = Path(__file__).parents[1] / "assets"  # ncfinetune/assets (package data)
DEFAULT_BACKBONE = "resnet18_fmnist04"
BASE_ATTRIBUTE = "ncfinetune_base"
"""Attribute of a model made by :func:`create_backbone`: how it was made (name as passed,
pretrained, checkpoint), which ``TunedModel.save_pretrained`` records as the base model."""


def bundled_backbones() -> dict[str, dict]:
    """The backbones shipped inside the package: name -> its JSON card (architecture, kwargs,
    data config, provenance)."""
    return {n: json.loads((ASSETS / f"{n}.json").read_text()) for n in bundled_names()}


def bundled_names() -> list[str]:
    """Names of the bundled backbones (weights and card both present), without reading a card."""
    return sorted(p.stem for p in ASSETS.glob("*.safetensors") if p.with_suffix(".json").is_file())


def backbone_files(name: str) -> tuple[dict, Path] | None:
    """``(card, weights file)`` of a bundled backbone or of a ``recipes/pretrain.py`` folder
    (``backbone.json`` + ``backbone.safetensors``); None when ``name`` is neither."""
    if name in bundled_names():  # read this one card, not all of them
        return json.loads((ASSETS / f"{name}.json").read_text()), ASSETS / f"{name}.safetensors"
    folder = Path(name)
    if not (folder / "backbone.json").is_file():
        return None
    weights = folder / "backbone.safetensors"
    if not weights.is_file():
        raise ConfigError(f"{folder} has backbone.json but no backbone.safetensors.")
    return read_card(folder / "backbone.json"), weights


CARD_KEYS = ("architecture", "pretrained_cfg")


def read_card(path: Path) -> dict:
    """A backbone's JSON card, checked: valid JSON, an object with ``architecture`` (a timm
    name) and ``pretrained_cfg``.

    Raises:
        ConfigError: naming the file and what is wrong with it.
    """
    try:
        card = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as err:
        raise ConfigError(
            f"{path} is not a readable JSON backbone card ({type(err).__name__}: {err}); it is "
            "written by recipes/pretrain.py. Re-run the pretraining, or restore the file."
        ) from None
    missing = [k for k in CARD_KEYS if not isinstance(card, dict) or k not in card]
    if missing:
        raise ConfigError(
            f"{path} lacks {', '.join(missing)}: not a backbone card written by "
            "recipes/pretrain.py."
        )
    if not timm.is_model(card["architecture"]):
        raise ConfigError(
            f"{path} names architecture {card['architecture']!r}, which timm does not know."
        )
    return card


def create_backbone(
    name: str,
    num_classes: int,
    *,
    pretrained: bool = False,
    checkpoint: str | None = None,
    model_kwargs: dict | None = None,
) -> nn.Module:
    """A timm classifier with a fresh ``num_classes``-way head.

    Args:
        name: a bundled backbone (see :func:`bundled_backbones`), a folder written by
            ``recipes/pretrain.py`` (``backbone.json`` + ``backbone.safetensors``), or any timm
            model name.
        num_classes: downstream class count (the classifier is created anew).
        pretrained: download timm's pretrained weights from the hub (needs network).
        checkpoint: a local weights file (.safetensors, or a timm/torch checkpoint) for ``name``.
        model_kwargs: extra ``timm.create_model`` arguments (e.g. ``img_size``).
    """
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
        raise ConfigError(
            f"num_classes must be an int >= 1 (the new classifier's classes), got "
            f"{type(num_classes).__name__} {num_classes!r}. For features alone use a wrapper's "
            "forward_with_features or timm's forward_features."
        )
    model = _create(name, num_classes, pretrained, checkpoint, dict(model_kwargs or {}))
    setattr(
        model, BASE_ATTRIBUTE, {"name": name, "pretrained": pretrained, "checkpoint": checkpoint}
    )
    return model


def _create(
    name: str, num_classes: int, pretrained: bool, checkpoint: str | None, kwargs: dict
) -> nn.Module:
    found = backbone_files(name)
    if found is not None:
        if pretrained or checkpoint:
            kind = (
                "a bundled backbone"
                if found[1].parent == ASSETS
                else "a recipes/pretrain.py folder"
            )
            raise ConfigError(
                f"{name!r} is {kind} with its own weights; do not combine it with "
                "pretrained=True or a checkpoint (pass a timm architecture name for those)."
            )
        card, weights = found
        overlay = {**card["pretrained_cfg"], "file": str(weights)}
        try:
            return timm.create_model(
                card["architecture"],
                pretrained=True,
                num_classes=num_classes,
                pretrained_cfg_overlay=overlay,
                **{**card.get("model_kwargs", {}), **kwargs},
            )
        except Exception as err:  # safetensors, torch and timm each raise their own
            raise ConfigError(
                f"the weights {weights} do not load into {card['architecture']} as its card "
                f"describes ({type(err).__name__}: {str(err)[:200]}): the file is damaged or "
                "belongs to another model. Restore it, or re-run the pretraining."
            ) from err
    if not timm.is_model(name):
        raise ConfigError(
            f"unknown model {name!r}: not a bundled backbone ({', '.join(bundled_names()) or 'none'}), "
            "not a folder with backbone.json from recipes/pretrain.py, and not a timm "
            "architecture (see timm.list_models())."
        )
    if checkpoint:
        return _from_checkpoint(name, num_classes, Path(checkpoint), kwargs)
    if pretrained:
        try:
            return timm.create_model(name, pretrained=True, num_classes=num_classes, **kwargs)
        except (OSError, RuntimeError) as e:
            raise ConfigError(
                f"could not load pretrained weights for {name!r} from the Hugging Face hub "
                f"({type(e).__name__}: {str(e)[:160]}). Offline, use a bundled backbone "
                f"({', '.join(bundled_names()) or 'none'}) or --checkpoint PATH to a local weights file."
            ) from e
    return timm.create_model(name, pretrained=False, num_classes=num_classes, **kwargs)


def _from_checkpoint(name: str, num_classes: int, path: Path, kwargs: dict) -> nn.Module:
    """timm's ``name`` with the backbone weights of ``path`` (its classifier dropped: the head is
    new), checked strictly: every backbone weight must be in the file and fit, and the file may
    hold nothing else (timm's own loader would skip what does not fit with a warning)."""
    if not path.is_file():
        raise ConfigError(f"checkpoint file {path} does not exist.")
    model = timm.create_model(name, pretrained=False, num_classes=num_classes, **kwargs)
    try:  # safetensors, or a torch file read with weights_only=True (no code runs)
        state = timm.models.load_state_dict(str(path), use_ema=True, weights_only=True)
    except Exception as err:
        raise ConfigError(f"checkpoint {path} {_unreadable(path, err)}") from err
    convert = getattr(sys.modules[type(model).__module__], "checkpoint_filter_fn", None)
    if convert is not None:  # the family's own conversion of original-format checkpoints
        state = convert(state, model)
    heads = model.pretrained_cfg.get("classifier") or ()
    heads = (heads,) if isinstance(heads, str) else tuple(heads)
    is_head = lambda k: any(k == h or k.startswith(h + ".") for h in heads)  # noqa: E731
    state = {k: v for k, v in state.items() if not is_head(k)}
    try:
        result = model.load_state_dict(state, strict=False)
    except RuntimeError as err:  # a shape that does not fit
        first = next((ln.strip() for ln in str(err).splitlines() if "size mismatch" in ln), "")
        raise ConfigError(
            f"checkpoint {path} does not fit {name!r}: {first or str(err)[:200]}. Is it a "
            "checkpoint of another architecture? Pass the --model it was saved from."
        ) from err
    missing = [k for k in result.missing_keys if not is_head(k)]
    extra = list(result.unexpected_keys)
    found = []
    if missing:
        found.append(f"{len(missing)} of its weights are not in the file ({_some(missing)})")
    if extra:
        found.append(f"the file holds {len(extra)} weights it does not have ({_some(extra)})")
    if found:
        raise ConfigError(
            f"checkpoint {path} does not fit {name!r}: {'; '.join(found)}. Is it a checkpoint "
            "of another architecture? Pass the --model it was saved from."
        )
    return model


def _some(keys: list[str]) -> str:
    return ", ".join(keys[:3]) + (f" (+{len(keys) - 3} more)" if len(keys) > 3 else "")


def _unreadable(path: Path, err: Exception) -> str:
    """Why a checkpoint file could not be read, by what the file is."""
    first = f"{type(err).__name__}: {str(err).splitlines()[0][:160]}"
    if zipfile.is_zipfile(path):  # torch.save's format: it pickles more than tensors
        return (
            f"holds pickled objects besides tensors, which are never loaded (no code from a "
            f"file runs here; {first}). Where you trust the file, load its state dict with "
            "torch yourself, save that with safetensors.torch.save_file and pass the "
            ".safetensors file."
        )
    if path.suffix == ".safetensors":
        return f"is not a readable safetensors file ({first}): it is damaged or truncated."
    return (
        "is neither a safetensors file nor a torch checkpoint (torch.save's zip archive): "
        "damaged, truncated or another format. Pass a .safetensors file or a torch state dict."
    )
