"""Tuned-weight checkpoints: only what was tuned, in safetensors, plus JSON metadata.

A checkpoint directory holds ``tuned.safetensors`` (trained parameters and the buffers training
changed, under the timm model's own names) and ``tuned_config.json`` (how to rebuild the wrapper
and how to recognise the base model). Both files are written to a temporary name and renamed, and
the JSON, written last, records the SHA-256 of the weights file: a directory holding a torn pair
is detected at load time. Nothing is ever unpickled.

The base fingerprint is a SHA-256 of every base tensor the checkpoint does *not* contain. Those
tensors are bit-identical before and after tuning (they are frozen), so the fingerprint can be
computed at save time from the tuned model and at load time from a fresh base model.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path

import safetensors.torch
import timm
import torch
from torch import nn

from ncfinetune._version import __version__
from ncfinetune._warn import warn_once
from ncfinetune.backbones.base import _arch_name
from ncfinetune.errors import CheckpointError
from ncfinetune.tuning import TunedModel, TuningConfig

WEIGHTS_NAME = "tuned.safetensors"
CONFIG_NAME = "tuned_config.json"
FORMAT = "ncfinetune-tuned"
FORMAT_VERSION = 1


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


def _atomic_write(path: Path, write) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def save_tuned(tuned: TunedModel, path: str | os.PathLike) -> Path:
    """Write ``tuned``'s checkpoint to directory ``path`` (created if needed); returns the path."""
    out = Path(path)
    if out.exists() and not out.is_dir():
        raise CheckpointError(f"cannot save to {out}: it exists and is not a directory.")
    out.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.to("cpu").contiguous() for k, v in tuned.tuned_state_dict().items()}
    weights = out / WEIGHTS_NAME
    _atomic_write(weights, lambda tmp: safetensors.torch.save_file(tensors, tmp, {"format": "pt"}))
    trainable, total = tuned.parameter_counts()
    meta = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "ncfinetune_version": __version__,
        "timm_version": timm.__version__,
        "torch_version": torch.__version__,
        "architecture": tuned.arch,
        "model_class": type(tuned.model).__name__,
        "num_classes": int(tuned.model.num_classes),
        "method": tuned.method,
        "block": tuned.block_index,
        "block_name": tuned.block_name,
        "bn": tuned.bn,
        "bn_requested": tuned.config.bn,
        "skip_norm": tuned.skip_norm if tuned.config.uses_skip else None,
        "lora_rank": tuned.config.lora_rank if tuned.method.startswith("lora") else None,
        "lora_alpha": tuned.config.lora_alpha,
        "lora_skip": tuned.config.lora_skip,
        "trainable_params": trainable,
        "total_params": total,
        "num_tensors": len(tensors),
        "weights_sha256": _file_sha256(weights),
        "base_fingerprint": base_fingerprint(tuned.model, set(tensors)),
    }
    config = out / CONFIG_NAME

    def write_json(tmp: str) -> None:
        Path(tmp).write_text(json.dumps(meta, indent=2) + "\n")

    _atomic_write(config, write_json)
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


def load_tuned(
    path: str | os.PathLike, base_model: nn.Module, *, verify_base: bool = True
) -> TunedModel:
    """Rebuild a tuned model from a checkpoint and a fresh copy of its base model.

    Args:
        path: the directory written by :meth:`TunedModel.save_pretrained`.
        base_model: the same timm architecture, created with the same ``num_classes`` and the same
            pretrained weights as when tuning started. It is modified in place and wrapped.
        verify_base: check the fingerprint of the base weights; a mismatch is an error. With
            False a mismatch only warns (use it when you know the base weights differ on purpose).

    Returns:
        A :class:`TunedModel` whose logits equal those of the model that was saved.
    """
    meta = read_tuned_config(path)
    arch = _arch_name(base_model)
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
    weights = Path(path) / WEIGHTS_NAME
    if not weights.is_file():
        raise CheckpointError(f"checkpoint {path} has {CONFIG_NAME} but no {WEIGHTS_NAME}.")
    if _file_sha256(weights) != meta["weights_sha256"]:
        raise CheckpointError(
            f"{weights} does not match the SHA-256 recorded in {CONFIG_NAME}: the checkpoint was "
            "partly overwritten or damaged. Save it again."
        )
    tensors = safetensors.torch.load_file(weights)
    # wrap first: the LoRA methods add modules (and state keys) the checkpoint fills
    tuned = TunedModel(
        base_model,
        TuningConfig(
            method=meta["method"],
            block=meta["block"],
            bn=meta.get("bn_requested", meta["bn"]),
            skip_norm=meta["skip_norm"],
            lora_rank=meta.get("lora_rank") or 8,
            lora_alpha=meta.get("lora_alpha"),
            lora_skip=bool(meta.get("lora_skip", False)),
        ),
    )
    state = tuned.model.state_dict()
    bad = [
        f"{k} {tuple(v.shape)} vs {tuple(state[k].shape) if k in state else 'missing'}"
        for k, v in tensors.items()
        if k not in state or state[k].shape != v.shape
    ]
    if bad:
        raise CheckpointError(
            f"checkpoint {path} does not fit the base {arch}: {len(bad)} tensors differ "
            f"(checkpoint vs model: {'; '.join(bad[:3])}). Use the architecture it was saved from."
        )
    fingerprint = base_fingerprint(tuned.model, set(tensors))
    if fingerprint != meta["base_fingerprint"]:
        msg = (
            f"the base weights of this {arch} differ from those checkpoint {path} was tuned from "
            "(fingerprint mismatch): the result will not reproduce the saved model. Load the same "
            "pretrained weights, or pass verify_base=False to accept this."
        )
        if verify_base:
            raise CheckpointError(msg)
        warn_once(msg)
    with torch.no_grad():
        for k, v in tensors.items():
            state[k].copy_(v)
    return tuned
