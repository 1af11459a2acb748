"""Tuned-weight checkpoints: only what was tuned, in safetensors, plus JSON metadata.

A checkpoint directory holds ``tuned.safetensors`` (trained parameters and the buffers training
changed, under the timm model's own names) and ``tuned_config.json`` (how to rebuild the wrapper
and how to recognise the base model). LoRA methods keep their adapter in peft's own format
beside it (``adapter_model.safetensors`` + ``adapter_config.json``), so peft's
``set_peft_model_state_dict`` loads it into any model injected with that config. Every file is
written to a temporary name and renamed, and the JSON, written last, records the SHA-256 of the
tensor files: a directory holding a torn set is detected at load time. Nothing is ever unpickled.

The base fingerprint is a SHA-256 of every base tensor the checkpoint does *not* contain. Those
tensors are bit-identical before and after tuning (they are frozen), so the fingerprint can be
computed at save time from the tuned model and at load time from a fresh base model.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import safetensors.torch
import timm
import torch
from safetensors import safe_open
from torch import nn

from ncfinetune._version import __version__
from ncfinetune.errors import CheckpointError
from ncfinetune.files import atomic_write, write_json
from ncfinetune.messages import warn_once

WEIGHTS_NAME = "tuned.safetensors"
CONFIG_NAME = "tuned_config.json"
FORMAT = "ncfinetune-tuned"
FORMAT_VERSION = 2
"""2: method config under "config", LoRA adapters in peft's format. 1 is still read."""
PEFT_WEIGHTS_NAME = "adapter_model.safetensors"
PEFT_CONFIG_NAME = "adapter_config.json"


def base_fingerprint(model: nn.Module, exclude: set[str]) -> str:
    """SHA-256 over the model's state tensors whose names are not in ``exclude``."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        if name in exclude:
            continue
        t = tensor.detach().to("cpu").contiguous().reshape(-1)
        digest.update(f"{name}|{t.dtype}|{tuple(tensor.shape)}|".encode())
        digest.update(t.view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def _file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _is_lora_key(key: str) -> bool:
    # peft's own rule for what belongs to a LoRA adapter (get_peft_model_state_dict)
    return "lora_" in key


def write_checkpoint(
    path: str | os.PathLike,
    tensors: dict[str, torch.Tensor],
    meta: dict,
    model: nn.Module,
    *,
    peft_config: Any = None,
) -> Path:
    """Write a tuned checkpoint to directory ``path`` (created if needed); returns the path.

    Args:
        tensors: the tuned tensors under the timm model's names.
        meta: what to rebuild the wrapper from (method, config, block, ...); the format,
            versions, hashes and base fingerprint are added here.
        model: the tuned timm model (for the base fingerprint and the peft adapter).
        peft_config: for LoRA methods, the ``peft.LoraConfig`` injected into ``model``: the
            adapter is then written in peft's own format (``adapter_model.safetensors`` from
            ``get_peft_model_state_dict``, ``adapter_config.json``) and the rest of the tuned
            tensors (classifier, BatchNorm statistics) to ``tuned.safetensors``.
    """
    out = Path(path)
    if out.exists() and not out.is_dir():
        raise CheckpointError(f"cannot save to {out}: it exists and is not a directory.")
    out.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    meta = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "ncfinetune_version": __version__,
        "timm_version": timm.__version__,
        "torch_version": torch.__version__,
        **meta,
        "num_tensors": len(tensors),
        "base_fingerprint": base_fingerprint(model, set(tensors)),
    }
    if peft_config is not None:
        from peft import get_peft_model_state_dict

        adapter = {
            k: v.detach().to("cpu").contiguous()
            for k, v in get_peft_model_state_dict(model).items()
        }
        tensors = {k: v for k, v in tensors.items() if not _is_lora_key(k)}
        adapter_file = out / PEFT_WEIGHTS_NAME
        atomic_write(
            adapter_file, lambda tmp: safetensors.torch.save_file(adapter, tmp, {"format": "pt"})
        )
        write_json(out / PEFT_CONFIG_NAME, peft_config.to_dict())
        meta["peft_adapter_sha256"] = _file_sha256(adapter_file)
    weights = out / WEIGHTS_NAME
    atomic_write(weights, lambda tmp: safetensors.torch.save_file(tensors, tmp, {"format": "pt"}))
    meta["weights_sha256"] = _file_sha256(weights)
    write_json(out / CONFIG_NAME, meta)  # last: its hashes vouch for the files above
    return out


def read_tuned_config(path: str | os.PathLike) -> dict:
    """The metadata of the checkpoint at ``path``, validated."""
    config = Path(path) / CONFIG_NAME
    if not config.is_file():
        raise CheckpointError(
            f"no ncfinetune checkpoint at {path}: {CONFIG_NAME} is missing. Pass the directory "
            "given to TunedModel.save_pretrained()."
        )
    try:
        meta = json.loads(config.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(
            f"{config} is not valid JSON ({e}); the checkpoint is damaged."
        ) from e
    if meta.get("format") != FORMAT or not isinstance(meta.get("format_version"), int):
        raise CheckpointError(f"{config} is not an ncfinetune tuned-weights config.")
    if meta["format_version"] > FORMAT_VERSION:
        raise CheckpointError(
            f"{config} has format version {meta['format_version']}, newer than this ncfinetune "
            f"({__version__}) reads (<= {FORMAT_VERSION}). Upgrade ncfinetune."
        )
    return meta


def flat_settings(meta: dict) -> dict:
    """The method settings of a format-1 checkpoint (flat keys, before method configs)."""
    settings = {"block": meta.get("block"), "bn": meta.get("bn_requested", meta.get("bn"))}
    for key in ("skip_norm", "lora_rank", "lora_alpha", "lora_skip"):
        if meta.get(key) is not None:
            settings[key] = meta[key]
    return settings


def check_base(path: str | os.PathLike, meta: dict, arch: str, base_model: nn.Module) -> None:
    """Raise when ``base_model`` is not the architecture and class count of the checkpoint."""
    if arch != meta["architecture"]:
        raise CheckpointError(
            f"checkpoint {path} was tuned from {meta['architecture']}, but the base model given is "
            f"{arch}. Create timm.create_model({meta['architecture']!r}, "
            f"num_classes={meta['num_classes']}, ...) with the original pretrained weights."
        )
    num_classes = getattr(base_model, "num_classes", None)
    if num_classes != meta["num_classes"]:
        raise CheckpointError(
            f"checkpoint {path} has a {meta['num_classes']}-class classifier, but the base model "
            f"has num_classes={num_classes}. Create it with num_classes={meta['num_classes']}."
        )


def _verified(path: Path, name: str, sha: str | None) -> Path:
    file = path / name
    if not file.is_file():
        raise CheckpointError(f"checkpoint {path} has {CONFIG_NAME} but no {name}.")
    if sha is not None and _file_sha256(file) != sha:
        raise CheckpointError(
            f"{file} does not match the SHA-256 recorded in {CONFIG_NAME}: the checkpoint was "
            "partly overwritten or damaged. Save it again."
        )
    return file


def load_weights(
    path: str | os.PathLike, meta: dict, model: nn.Module, *, verify_base: bool = True
) -> None:
    """Load a checkpoint's tensors into ``model`` (already wrapped the way it was saved).

    Every file is checked against the SHA-256 in the metadata, every tensor's name and shape
    against the model before anything is copied, and the base fingerprint against the model's
    frozen tensors. Then safetensors' ``load_model`` copies the tuned tensors and peft's
    ``set_peft_model_state_dict`` the LoRA adapter.
    """
    root = Path(path)
    weights = _verified(root, WEIGHTS_NAME, meta["weights_sha256"])
    adapter_file = None
    if "peft_adapter_sha256" in meta:
        adapter_file = _verified(root, PEFT_WEIGHTS_NAME, meta["peft_adapter_sha256"])
    state = model.state_dict()
    with safe_open(weights, framework="pt") as f:
        shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}  # noqa: SIM118
    bad = [
        f"{k} {shape} vs {tuple(state[k].shape) if k in state else 'missing'}"
        for k, shape in shapes.items()
        if k not in state or tuple(state[k].shape) != shape
    ]
    if bad:
        raise CheckpointError(
            f"checkpoint {path} does not fit the base {meta['architecture']}: {len(bad)} tensors "
            f"differ (checkpoint vs model: {'; '.join(bad[:3])}). Use the architecture it was "
            "saved from."
        )
    exclude = set(shapes)
    if adapter_file is not None:
        exclude |= {k for k in state if _is_lora_key(k)}
    if base_fingerprint(model, exclude) != meta["base_fingerprint"]:
        msg = (
            f"the base weights of this {meta['architecture']} differ from those checkpoint {path} "
            "was tuned from (fingerprint mismatch): the result will not reproduce the saved "
            "model. Load the same pretrained weights, or pass verify_base=False to accept this."
        )
        if verify_base:
            raise CheckpointError(msg)
        warn_once(msg)
    device = next(iter(state.values())).device if state else "cpu"
    missing, unexpected = safetensors.torch.load_model(
        model, weights, strict=False, device=str(device)
    )
    if unexpected:  # excluded by the shape check above; kept as the strict key check
        raise CheckpointError(f"checkpoint {path} has tensors the model lacks: {unexpected[:3]}")
    if adapter_file is not None:
        from peft import set_peft_model_state_dict

        result = set_peft_model_state_dict(model, safetensors.torch.load_file(adapter_file))
        if result.unexpected_keys:
            raise CheckpointError(
                f"the LoRA adapter of {path} does not fit the model: unexpected "
                f"{result.unexpected_keys[:3]}."
            )
