"""Tuned-weight checkpoints: only what was tuned, in safetensors, plus JSON metadata.

A checkpoint directory holds ``tuned.safetensors`` (trained parameters and the buffers training
changed, under the timm model's own names) and ``tuned_config.json`` (how to rebuild the wrapper
and how to recognise the base model). LoRA methods keep their adapter in peft's own format
beside it (``adapter_model.safetensors`` + ``adapter_config.json``), so peft's
``set_peft_model_state_dict`` loads it into any model injected with that config. Every file is
written to a temporary name and renamed, and the JSON, written last, records the SHA-256 of the
tensor files. The folder is written beside its target and moved into place as a whole
(:func:`ncfinetune.files.install_folder`), and loading verifies hashes, the recipe stored in the
weights file, tensor names, shapes and finiteness before anything is copied. Nothing is ever
unpickled.

The base fingerprint is a SHA-256 of every base tensor the checkpoint does *not* contain. Those
tensors are bit-identical before and after tuning (they are frozen), so the fingerprint can be
computed at save time from the tuned model and at load time from a fresh base model.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Any

import safetensors.torch
import timm
import torch
from safetensors import safe_open
from torch import nn

from ncfinetune._version import __version__
from ncfinetune.errors import CheckpointError
from ncfinetune.files import install_folder, set_aside, sha256_file, staging_folder, write_json
from ncfinetune.messages import warn_once

WEIGHTS_NAME = "tuned.safetensors"
CONFIG_NAME = "tuned_config.json"
FORMAT = "ncfinetune-tuned"
FORMAT_VERSION = 1
"""The one format so far: the method config under "config", the recipe inside the weights
file, LoRA adapters in peft's format. A newer version is refused with "upgrade ncfinetune"."""
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


def _is_lora_key(key: str) -> bool:
    # peft's own rule for what belongs to a LoRA adapter (get_peft_model_state_dict)
    return "lora_" in key


CHECKPOINT_FILES = (WEIGHTS_NAME, CONFIG_NAME, PEFT_WEIGHTS_NAME, PEFT_CONFIG_NAME)
RECIPE_KEYS = ("architecture", "num_classes", "method", "config", "block", "bn", "skip_norm")
"""What rebuilds the wrapper. Also stored inside ``tuned.safetensors`` (its metadata), so that
an edited ``tuned_config.json`` is detected at load time instead of rebuilding another model."""
_EMBEDDED = "ncfinetune_recipe"


def non_finite(tensors: dict[str, torch.Tensor]) -> list[str]:
    """Names of the floating-point tensors holding NaN or infinite values."""
    return [
        k for k, v in tensors.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())
    ]


def write_checkpoint(
    path: str | os.PathLike,
    tensors: dict[str, torch.Tensor],
    meta: dict,
    model: nn.Module,
    *,
    peft_config: Any = None,
) -> Path:
    """Write a tuned checkpoint to directory ``path``; returns the path.

    The whole folder is written beside ``path`` and then moved into place
    (:func:`ncfinetune.files.install_folder`): after a crash at any moment the folder holds the
    previous checkpoint or the new one, complete; leftovers of an interrupted save are removed
    by the next one. An existing ``path`` is replaced as a whole, so it may only hold checkpoint
    files.

    Args:
        tensors: the tuned tensors under the timm model's names.
        meta: what to rebuild the wrapper from (method, config, block, ...); the format,
            versions, hashes and base fingerprint are added here.
        model: the tuned timm model (for the base fingerprint and the peft adapter).
        peft_config: for LoRA methods, the ``peft.LoraConfig`` injected into ``model``: the
            adapter is then written in peft's own format (``adapter_model.safetensors`` from
            ``get_peft_model_state_dict``, ``adapter_config.json``) and the rest of the tuned
            tensors (classifier, BatchNorm statistics) to ``tuned.safetensors``.

    Raises:
        CheckpointError: ``path`` is a file, or a folder holding other files; a tensor holds
            NaN or infinite values (nothing is written).
    """
    out = Path(path)
    if out.is_symlink():  # replace the folder it points to, not the link
        out = out.resolve()
    if out.exists() and not out.is_dir():
        raise CheckpointError(
            f"cannot save to {out}: it exists and is not a directory. Pass a folder path."
        )
    if out.is_dir():
        foreign = sorted(p.name for p in out.iterdir() if p.name not in CHECKPOINT_FILES)
        if foreign:
            raise CheckpointError(
                f"cannot save to {out}: a checkpoint replaces its folder as a whole, and this "
                f"folder holds {len(foreign)} other entries ({', '.join(foreign[:5])}). Save "
                "into a new or empty folder, or into an earlier checkpoint's folder."
            )
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    adapter = None
    if peft_config is not None:
        from peft import get_peft_model_state_dict

        adapter = {
            k: v.detach().to("cpu").contiguous()
            for k, v in get_peft_model_state_dict(model).items()
        }
    bad = non_finite({**tensors, **(adapter or {})})
    if bad:
        raise CheckpointError(
            f"refusing to save to {out}: {len(bad)} tuned tensors hold NaN or infinite values "
            f"({', '.join(bad[:4])}): training diverged. Nothing was written; lower the lr, or "
            "save the last good model."
        )
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
    recipe = json.dumps({k: meta.get(k) for k in RECIPE_KEYS}, sort_keys=True)
    staging = staging_folder(out)
    try:
        if adapter is not None:
            tensors = {k: v for k, v in tensors.items() if not _is_lora_key(k)}
            safetensors.torch.save_file(adapter, staging / PEFT_WEIGHTS_NAME, {"format": "pt"})
            (staging / PEFT_CONFIG_NAME).write_text(
                json.dumps(peft_config.to_dict(), indent=2, default=list) + "\n"
            )
            meta["peft_adapter_sha256"] = sha256_file(staging / PEFT_WEIGHTS_NAME)
        safetensors.torch.save_file(
            tensors, staging / WEIGHTS_NAME, {"format": "pt", _EMBEDDED: recipe}
        )
        meta["weights_sha256"] = sha256_file(staging / WEIGHTS_NAME)
        write_json(staging / CONFIG_NAME, meta)
        install_folder(staging, out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return out


def checkpoint_dir(path: str | os.PathLike) -> Path:
    """The folder to read the checkpoint at ``path`` from: ``path`` itself, or, when a save was
    interrupted between setting the old version aside and moving the new one in (platforms
    without an atomic folder swap), the old version (with a warning)."""
    root = Path(path)
    if (root / CONFIG_NAME).is_file():
        return root
    old = set_aside(root)
    if old is not None and (old / CONFIG_NAME).is_file():
        warn_once(
            f"{root} holds no complete checkpoint: a save was interrupted. Loading the previous "
            f"version, kept at {old}; the next save to {root} replaces it."
        )
        return old
    return root


def _schema_problems(meta: dict) -> list[str]:
    """What is wrong with the keys and types of a tuned_config.json."""
    from ncfinetune.tuning.methods import METHODS

    def kind(v):
        return f"{v!r} ({type(v).__name__})"

    problems = []
    expect = {
        "architecture": (str,),
        "num_classes": (int,),
        "method": (str,),
        "weights_sha256": (str,),
        "base_fingerprint": (str,),
        "config": (dict,),
    }
    for key, types in expect.items():
        if key not in meta:
            problems.append(f"required key {key!r} is missing")
        elif isinstance(meta[key], bool) or not isinstance(meta[key], types):
            problems.append(f"{key!r} must be {types[0].__name__}, got {kind(meta[key])}")
    if "block" not in meta:
        problems.append("required key 'block' is missing (null for methods without a block)")
    elif meta["block"] is not None and (
        isinstance(meta["block"], bool) or not isinstance(meta["block"], int) or meta["block"] < 0
    ):
        problems.append(f"'block' must be an int >= 0 or null, got {kind(meta['block'])}")
    if isinstance(meta.get("num_classes"), int) and meta["num_classes"] < 1:
        problems.append(f"'num_classes' must be >= 1, got {meta['num_classes']}")
    if isinstance(meta.get("method"), str) and meta["method"] not in METHODS:
        problems.append(
            f"'method' {meta['method']!r} is not a registered method ({', '.join(METHODS)})"
        )
    for key in ("bn", "base_model"):
        if meta.get(key) is not None and not isinstance(meta[key], str):
            problems.append(f"{key!r} must be a string or null, got {kind(meta[key])}")
    if meta.get("skip_norm") is not None and not isinstance(meta["skip_norm"], bool):
        problems.append(f"'skip_norm' must be true, false or null, got {kind(meta['skip_norm'])}")
    names = meta.get("class_names")
    if names is not None and (
        not isinstance(names, list) or not all(isinstance(n, str) for n in names)
    ):
        problems.append(f"'class_names' must be a list of strings, got {kind(names)}")
    elif names is not None and isinstance(meta.get("num_classes"), int):
        if len(names) != meta["num_classes"]:
            problems.append(
                f"'class_names' has {len(names)} names for num_classes={meta['num_classes']}"
            )
    return problems


def read_tuned_config(path: str | os.PathLike) -> dict:
    """The metadata of the checkpoint at ``path``, validated (keys and types).

    Raises:
        CheckpointError: no checkpoint there, invalid JSON, another format, a newer format
            version, or missing keys / wrong types (all listed).
    """
    root = checkpoint_dir(path)
    config = root / CONFIG_NAME
    if not config.is_file():
        raise CheckpointError(
            f"no ncfinetune checkpoint at {path}: {CONFIG_NAME} is missing. Pass the directory "
            "given to TunedModel.save_pretrained()."
        )
    try:
        meta = json.loads(config.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(
            f"{config} is not valid JSON ({e}); the checkpoint is damaged. Save it again."
        ) from e
    if not isinstance(meta, dict):
        raise CheckpointError(
            f"{config} holds a JSON {type(meta).__name__}, not an object: not an ncfinetune "
            "tuned-weights config."
        )
    if meta.get("format") != FORMAT or not isinstance(meta.get("format_version"), int):
        raise CheckpointError(
            f"{config} is not an ncfinetune tuned-weights config (its 'format' is "
            f"{meta.get('format')!r}, expected {FORMAT!r} with an integer 'format_version')."
        )
    if meta["format_version"] > FORMAT_VERSION:
        raise CheckpointError(
            f"{config} has format version {meta['format_version']}, newer than this ncfinetune "
            f"({__version__}) reads (<= {FORMAT_VERSION}). Upgrade ncfinetune."
        )
    problems = _schema_problems(meta)
    if problems:
        raise CheckpointError(
            f"{config} is not a valid tuned config ({len(problems)} problems): "
            + "; ".join(problems)
            + ". Was it edited? Restore the file written with the checkpoint, or save again."
        )
    return meta


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
        edited = _edited_recipe(checkpoint_dir(path), meta)  # the config, not the base, is off
        if edited:
            raise CheckpointError(edited)
        raise CheckpointError(
            f"checkpoint {path} has a {meta['num_classes']}-class classifier, but the base model "
            f"has num_classes={num_classes}. Create it with num_classes={meta['num_classes']}."
        )


def _verified(path: Path, name: str, sha: str | None) -> Path:
    file = path / name
    if not file.is_file():
        raise CheckpointError(f"checkpoint {path} has {CONFIG_NAME} but no {name}.")
    if sha is not None and sha256_file(file) != sha:
        raise CheckpointError(
            f"{file} does not match the SHA-256 recorded in {CONFIG_NAME}: the checkpoint was "
            "partly overwritten, edited or damaged. Save it again."
        )
    return file


def _mismatch(path, what: str, found: dict, expected: dict, meta: dict) -> str | None:
    """A message naming the tensors that are missing, extra or of another shape, or None."""
    missing = sorted(set(expected) - set(found))
    extra = sorted(set(found) - set(expected))
    shapes = [
        f"{k} {tuple(found[k])} (expected {tuple(expected[k])})"
        for k in sorted(set(found) & set(expected))
        if tuple(found[k]) != tuple(expected[k])
    ]
    if not (missing or extra or shapes):
        return None
    parts = [
        f"{label} {len(items)}: {', '.join(items[:4])}{' ...' if len(items) > 4 else ''}"
        for label, items in (("missing", missing), ("extra", extra), ("other shape", shapes))
        if items
    ]
    return (
        f"the {what} of checkpoint {path} are not the set that method {meta['method']!r} "
        f"(block {meta['block']}) on {meta['architecture']} rebuilds: {'; '.join(parts)}. The "
        "file or its config was edited, or it belongs to another model; save it again."
    )


def _recipe_diff(root: Path, saved: dict, meta: dict) -> str | None:
    """The error when the config's recipe keys differ from those the weights were saved with."""
    now = {k: meta.get(k) for k in RECIPE_KEYS}
    diff = [f"{k}: {saved.get(k)!r} -> {now[k]!r}" for k in RECIPE_KEYS if saved.get(k) != now[k]]
    if not diff:
        return None
    return (
        f"{root / CONFIG_NAME} does not describe the weights saved beside it "
        f"(weights file -> config: {'; '.join(diff)}): the config was edited. Restore the "
        "file written with the weights, or tune the model again with the new settings."
    )


def _edited_recipe(root: Path, meta: dict) -> str | None:
    """:func:`_recipe_diff` from the weights file's metadata alone (no tensors read); None
    when the file or its metadata is missing (the full load says so)."""
    try:
        with safe_open(root / WEIGHTS_NAME, framework="pt") as f:
            embedded = (f.metadata() or {}).get(_EMBEDDED)
        return None if embedded is None else _recipe_diff(root, json.loads(embedded), meta)
    except Exception:  # noqa: BLE001 - unreadable here: load_weights names the problem
        return None


def _read_tensors(file: Path, device) -> tuple[dict[str, torch.Tensor], dict]:
    with safe_open(file, framework="pt") as f:
        metadata = f.metadata() or {}
    return safetensors.torch.load_file(file, device=str(device)), metadata


def load_weights(
    path: str | os.PathLike,
    meta: dict,
    model: nn.Module,
    *,
    expected: dict[str, torch.Size],
    verify_base: bool = True,
) -> None:
    """Load a checkpoint's tensors into ``model`` (already wrapped the way it was saved).

    Every file is checked against the SHA-256 in the metadata; the recipe stored inside the
    weights file against ``tuned_config.json`` (an edited method or block is an error); the
    tensor names and shapes against ``expected`` (what the rebuilt wrapper tunes: missing,
    extra and reshaped tensors are named); every tensor must be finite; and the base
    fingerprint must match the model's frozen tensors. Only then are tensors copied, and
    peft's ``set_peft_model_state_dict`` loads the LoRA adapter.

    Args:
        expected: name -> shape of the tuned tensors (``TunedModel.tuned_state_dict()``).

    Raises:
        CheckpointError: any check above failed (nothing is copied into the model).
    """
    root = checkpoint_dir(path)
    weights = _verified(root, WEIGHTS_NAME, meta["weights_sha256"])
    adapter_file = None
    if "peft_adapter_sha256" in meta:
        adapter_file = _verified(root, PEFT_WEIGHTS_NAME, meta["peft_adapter_sha256"])
    state = model.state_dict()
    device = next(iter(state.values())).device if state else "cpu"
    tensors, metadata = _read_tensors(weights, device)
    if _EMBEDDED not in metadata:
        raise CheckpointError(
            f"{weights} carries no ncfinetune recipe in its metadata: it was not written by "
            "TunedModel.save_pretrained (or was re-saved without its metadata). Save it again."
        )
    edited = _recipe_diff(root, json.loads(metadata[_EMBEDDED]), meta)
    if edited:
        raise CheckpointError(edited)
    wanted = {k: tuple(v.shape) for k, v in expected.items() if not _is_lora_key(k)}
    if adapter_file is None:
        wanted = {k: tuple(v.shape) for k, v in expected.items()}
    problem = _mismatch(path, "tensors", {k: v.shape for k, v in tensors.items()}, wanted, meta)
    if problem:
        raise CheckpointError(problem)
    adapter = None
    if adapter_file is not None:
        from peft import get_peft_model_state_dict, set_peft_model_state_dict

        adapter, _ = _read_tensors(adapter_file, device)
        lora = {k: v.shape for k, v in get_peft_model_state_dict(model).items()}
        problem = _mismatch(
            path, "LoRA adapter tensors", {k: v.shape for k, v in adapter.items()}, lora, meta
        )
        if problem:
            raise CheckpointError(problem)
    bad = non_finite({**tensors, **(adapter or {})})
    if bad:
        raise CheckpointError(
            f"checkpoint {path} holds NaN or infinite values in {len(bad)} tensors "
            f"({', '.join(bad[:4])}); it cannot give meaningful predictions. Save a finite model."
        )
    exclude = set(tensors)
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
    result = model.load_state_dict(tensors, strict=False)
    if result.unexpected_keys:  # excluded by the name check above; kept as the strict check
        raise CheckpointError(
            f"checkpoint {path} has tensors the model lacks: {result.unexpected_keys[:3]}"
        )
    if adapter is not None:
        result = set_peft_model_state_dict(model, adapter)
        if result.unexpected_keys:
            raise CheckpointError(
                f"the LoRA adapter of {path} does not fit the model: unexpected "
                f"{result.unexpected_keys[:3]}."
            )
