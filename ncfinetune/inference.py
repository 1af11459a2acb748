"""Using a tuned model: rebuild it from its folder, predict images, evaluate on a dataset.

A folder written by :meth:`~ncfinetune.tuning.model.TunedModel.save_pretrained` (``<output_dir>/tuned``
of ``recipes/finetune.py``) records the base backbone as it was named (``base_model``: a bundled
backbone, a ``recipes/pretrain.py`` folder or a timm name) and, when the recipe wrote it, the
class names, the image size and the dataset it was tuned on. :func:`load_tuned_folder` rebuilds
the model from the folder alone when the base is a bundled or local backbone; for a timm name
the base weights come from where they came when tuning (``pretrained`` from the hub, or a
``checkpoint`` file), and the recorded fingerprint checks them.

Both :func:`predict` and :func:`evaluate` run the one evaluation loop,
:func:`ncfinetune.training.loop.predict_batches`::

    from ncfinetune.inference import evaluate, predict

    rows = predict("runs/finetune/tuned", "my_images/")  # file, class, probability per image
    result = evaluate("runs/finetune/tuned")  # on the test split the run was tuned on
    print(result.accuracy, result.nc1)
    result.plot_confusion("confusion_matrix.png")
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import PIL.Image
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from ncfinetune.backbones.hub import bundled_backbones, create_backbone
from ncfinetune.data.checks import image_problem
from ncfinetune.data.labels import ImageData, select_classes
from ncfinetune.data.loaders import build_loader, build_transforms
from ncfinetune.data.sources import load_image_dataset
from ncfinetune.errors import CheckpointError, DataError
from ncfinetune.metrics.collapse import nc1_or_none
from ncfinetune.plotting import new_figure, save_figure
from ncfinetune.training.device import default_device
from ncfinetune.training.loop import predict_batches
from ncfinetune.tuning.checkpoint import read_tuned_config
from ncfinetune.tuning.model import TunedModel

TunedLike = TunedModel | str | os.PathLike


def load_tuned_folder(
    path: str | os.PathLike,
    *,
    base_model: str | nn.Module | None = None,
    pretrained: bool | None = None,
    checkpoint: str | None = None,
    verify_base: bool = True,
) -> TunedModel:
    """Rebuild the tuned model saved in ``path``.

    Args:
        path: a folder written by ``TunedModel.save_pretrained``.
        base_model: the base to load into: a name for :func:`ncfinetune.backbones.hub.create_backbone`,
            or a ready timm model; default: the ``base_model`` recorded in the folder, made
            with the recorded ``pretrained``/``checkpoint`` arguments.
        pretrained: override: download the timm name's hub weights.
        checkpoint: override: a local weights file for the timm name.
        verify_base: check the fingerprint of the base weights (a mismatch is an error).

    Raises:
        CheckpointError: the folder records no base model and none is given, or the base
            is not the one the folder was tuned from.
    """
    meta = read_tuned_config(path)
    if isinstance(base_model, nn.Module):
        return TunedModel.from_pretrained(path, base_model, verify_base=verify_base)
    name = base_model or meta.get("base_model")
    if name is None:
        raise CheckpointError(
            f"{path} does not record its base model (saved by an older ncfinetune, or from a "
            f"model not made by create_backbone). Pass base_model= a backbone name or a "
            f"timm.create_model({meta['architecture']!r}, num_classes={meta['num_classes']}) "
            "with the weights it was tuned from."
        )
    kwargs = dict(meta.get("base_model_kwargs") or {}) if base_model is None else {}
    if pretrained is not None:
        kwargs["pretrained"] = pretrained
    if checkpoint is not None:
        kwargs["checkpoint"] = checkpoint
    local = name in bundled_backbones() or (Path(name) / "backbone.json").is_file()
    if local:
        kwargs = {}  # bundled and pretrain-folder backbones carry their own weights
    try:
        model = create_backbone(name, meta["num_classes"], **kwargs)
        return TunedModel.from_pretrained(path, model, verify_base=verify_base)
    except CheckpointError as err:
        how = "" if local else f" with pretrained={kwargs.get('pretrained', False)}"
        how += f", checkpoint={kwargs['checkpoint']!r}" if kwargs.get("checkpoint") else ""
        if not (local or kwargs.get("pretrained") or kwargs.get("checkpoint")):
            how += (
                "; a timm architecture made without pretrained weights or a checkpoint is "
                "randomly initialised, so its base cannot be rebuilt: pass base_model= the "
                "model itself, or verify_base=False"
            )
        raise CheckpointError(f"{err} (base rebuilt as {name!r}{how})") from err


def _as_tuned(tuned: TunedLike, **load: Any) -> tuple[TunedModel, dict]:
    if isinstance(tuned, TunedModel):
        return tuned, {}
    return load_tuned_folder(tuned, **load), read_tuned_config(tuned)


# -- prediction ----------------------------------------------------------------------------------
def image_files(folder: str | os.PathLike) -> list[Path]:
    """The image files under ``folder`` (recursively; extensions PIL reads), sorted; hidden
    files and folders are skipped."""
    root = Path(folder)
    readable = {ext.lower() for ext in PIL.Image.registered_extensions()}
    found = [
        p
        for p in root.rglob("*")
        if p.is_file()
        and p.suffix.lower() in readable
        and not any(part.startswith(".") for part in p.relative_to(root).parts)
    ]
    return sorted(found)


class _Images(Dataset):
    """Images (paths or in-memory images) -> (transformed tensor, 0); read on access."""

    def __init__(self, items: Sequence[Any], transform):
        self.items, self.transform = list(items), transform

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int):
        item = self.items[i]
        if isinstance(item, (str, os.PathLike)):
            try:
                with PIL.Image.open(item) as im:
                    im.load()
                    item = im.copy()
            except (OSError, PIL.UnidentifiedImageError) as e:
                raise DataError(
                    f"cannot read image {item} (image {i} of {len(self.items)}): "
                    f"{type(e).__name__}: {e}. Replace or delete the file, or pass "
                    "skip_unreadable=True (recipes/predict.py --skip_unreadable true)."
                ) from e
        return self.transform(item), 0


@dataclass
class ImagePrediction:
    """One image's prediction: ``file`` (relative to the folder given, or the index of an
    in-memory image), the class (id and name) and its softmax probability."""

    file: str
    class_id: int
    class_name: str
    probability: float


def predict(
    tuned: TunedLike,
    images: str | os.PathLike | Sequence[Any],
    *,
    class_names: Sequence[str] | None = None,
    image_size: int | None = None,
    batch_size: int = 64,
    precision: str = "no",
    device: str | torch.device | None = None,
    skip_unreadable: bool = False,
    skipped: list[tuple[str, str]] | None = None,
    **load: Any,
) -> list[ImagePrediction]:
    """Predict the class of each image.

    Args:
        tuned: a tuned model, or a folder written by ``save_pretrained`` (rebuilt by
            :func:`load_tuned_folder`; ``**load`` goes there).
        images: a folder (searched recursively), one image file, or a sequence of paths, PIL
            images or uint8 arrays.
        class_names: names of the class ids; default: those recorded in the folder, else ids.
        image_size: input size; default: the one the model was tuned at (recorded), else the
            backbone's.
        precision: ``no`` (fp32) or ``bf16`` autocast.
        device: default CUDA when available, else CPU.
        skip_unreadable: decode every image file first and leave out those that cannot be
            read (default: the first one raises a ``DataError`` naming it).
        skipped: a list that receives ``(file, why)`` of every image left out.

    Returns:
        One row per image, in the order given (a folder: sorted paths); without the
        unreadable ones when ``skip_unreadable``.
    """
    model, meta = _as_tuned(tuned, **load)
    if isinstance(images, (str, os.PathLike)):
        root = Path(images)
        if root.is_dir():
            items = image_files(root)
            names = [str(p.relative_to(root)) for p in items]
            if not items:
                raise DataError(f"no image files under {root} (extensions PIL reads).")
        elif root.is_file():
            items, names = [root], [str(root)]
        else:
            raise DataError(f"images {str(root)!r} is neither a folder nor a file.")
    else:
        items = list(images)
        names = [
            str(p) if isinstance(p, (str, os.PathLike)) else str(i) for i, p in enumerate(items)
        ]
    if skip_unreadable:
        problems = [
            image_problem(str(p), deep=True) if isinstance(p, (str, os.PathLike)) else None
            for p in items
        ]
        for name, why in zip(names, problems, strict=True):
            if why is not None and skipped is not None:
                skipped.append((name, why))
        keep = [i for i, why in enumerate(problems) if why is None]
        if not keep:
            raise DataError(f"none of the {len(items)} images can be read (e.g. {names[0]}).")
        items, names = [items[i] for i in keep], [names[i] for i in keep]
    transform = build_transforms(model.model, image_size=image_size or meta.get("image_size"))
    loader = DataLoader(_Images(items, transform), batch_size=batch_size, shuffle=False)
    model.to(default_device(device))
    out = predict_batches(model, loader, precision=precision, logits=True)
    probs = torch.softmax(out["logits"], dim=1)
    best, ids = probs.max(dim=1)
    labels = list(class_names or meta.get("class_names") or [])
    return [
        ImagePrediction(name, int(k), labels[k] if k < len(labels) else str(int(k)), float(p))
        for name, k, p in zip(names, ids.tolist(), best.tolist(), strict=True)
    ]


# -- evaluation ----------------------------------------------------------------------------------
@dataclass
class Evaluation:
    """How a tuned model does on one split of a labelled dataset.

    Attributes:
        accuracy: share of samples predicted correctly.
        per_class_accuracy: class name -> accuracy on its samples (None: no samples).
        confusion: K x K counts, rows the true class, columns the predicted one.
        nc1: NC1 of the classifier-input features on these samples (None where not
            measurable, e.g. one class present).
        num_samples: samples evaluated.
        class_names: the model's classes, in id order.
    """

    accuracy: float
    per_class_accuracy: dict[str, float | None]
    confusion: np.ndarray
    nc1: float | None
    num_samples: int
    class_names: list[str]
    info: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        """The evaluation as JSON-ready values."""
        return {
            "accuracy": self.accuracy,
            "per_class_accuracy": self.per_class_accuracy,
            "nc1": self.nc1,
            "num_samples": self.num_samples,
            "class_names": self.class_names,
            "confusion_matrix": self.confusion.tolist(),
            **self.info,
        }

    def plot_confusion(self, path: str | os.PathLike) -> Path:
        """Write the confusion matrix (row-normalised colours, counts written in) as an image."""
        k = len(self.class_names)
        side = min(max(4.0, 0.45 * k + 2.0), 16.0)
        fig, ax = new_figure(figsize=(side + 1.0, side))
        rows = self.confusion.sum(axis=1, keepdims=True)
        shares = np.divide(self.confusion, rows, out=np.zeros(self.confusion.shape), where=rows > 0)
        image = ax.imshow(shares, cmap="Blues", vmin=0.0, vmax=1.0)
        fig.colorbar(image, ax=ax, fraction=0.046, label="share of the true class")
        ax.set_xticks(range(k), self.class_names, rotation=90 if k > 10 else 0)
        ax.set_yticks(range(k), self.class_names)
        ax.set_xlabel("predicted class")
        ax.set_ylabel("true class")
        ax.set_title(f"accuracy {100 * self.accuracy:.2f}% on {self.num_samples} samples")
        if k <= 20:
            for i in range(k):
                for j in range(k):
                    ax.text(j, i, int(self.confusion[i, j]), ha="center", va="center",
                            color="white" if shares[i, j] > 0.5 else "black", fontsize=8)  # fmt: skip
        return save_figure(fig, path)


def class_mapping(
    data_names: Sequence[str], model_names: Sequence[str] | None, k: int
) -> list[int]:
    """Model class id of each dataset class id: the same names in the same order, or in another
    order (mapped by name); without recorded names, the same number of classes.

    Raises:
        DataError: the dataset's classes are not the model's.
    """
    data_names = [str(n) for n in data_names]
    if model_names is None:
        if len(data_names) != k:
            raise DataError(
                f"the dataset has {len(data_names)} classes and the model {k}; pass the "
                f"classes it was tuned on (--classes with {k} ids)."
            )
        return list(range(k))
    model_names = [str(n) for n in model_names]
    if sorted(data_names) != sorted(model_names):
        raise DataError(
            f"the dataset's classes ({', '.join(data_names)}) are not the model's "
            f"({', '.join(model_names)}); pass the dataset and --classes it was tuned on."
        )
    return [model_names.index(n) for n in data_names]


def evaluate(
    tuned: TunedLike,
    data: ImageData | None = None,
    *,
    split: str = "test",
    rows: Sequence[int] | None = None,
    image_size: int | None = None,
    batch_size: int = 64,
    precision: str = "no",
    device: str | torch.device | None = None,
    **load: Any,
) -> Evaluation:
    """Accuracy, per-class accuracy, confusion matrix and NC1 of a tuned model on a dataset.

    Args:
        tuned: a tuned model, or a folder written by ``save_pretrained`` (``**load`` goes to
            :func:`load_tuned_folder`).
        data: the dataset (``ncfinetune.data.loaders.load_image_dataset``, with ``select_classes``);
            default: the one recorded in the folder by ``recipes/finetune.py``.
        split: ``test`` or ``train``.
        rows: evaluate only these rows of the split.
        image_size: default: the recorded one, else the backbone's.
        precision: ``no`` (fp32) or ``bf16`` autocast.
    """
    model, meta = _as_tuned(tuned, **load)
    if data is None:
        data = recorded_data(meta)
    if split not in ("train", "test"):
        raise DataError(f"split {split!r} does not exist; pass 'train' or 'test'.")
    k = int(model.model.num_classes)
    to_model = torch.tensor(class_mapping(data.class_names, meta.get("class_names"), k))
    names = [str(n) for n in (meta.get("class_names") or data.class_names)]
    transform = build_transforms(model.model, image_size=image_size or meta.get("image_size"))
    loader = build_loader(
        getattr(data, split),
        transform,
        batch_size=batch_size,
        shuffle=False,
        indices=rows,
        image_column=data.image_column,
        label_column=data.label_column,
    )
    model.to(default_device(device))
    out = predict_batches(model, loader, precision=precision, features=True)
    preds, labels = out["preds"].long(), to_model[out["labels"].long()]
    confusion = np.zeros((k, k), dtype=np.int64)
    np.add.at(confusion, (labels.numpy(), preds.numpy()), 1)
    counts = confusion.sum(axis=1)
    return Evaluation(
        accuracy=float((preds == labels).float().mean()) if len(labels) else float("nan"),
        per_class_accuracy={
            names[c]: (float(confusion[c, c] / counts[c]) if counts[c] else None) for c in range(k)
        },
        confusion=confusion,
        nc1=nc1_or_none(out["features"], labels) if len(set(labels.tolist())) > 1 else None,
        num_samples=int(len(labels)),
        class_names=names,
        info={"model": model.describe(), "dataset": data.name, "split": split},
    )


def recorded_data(meta: dict, **changes: Any) -> ImageData:
    """The dataset a folder records it was tuned on (``data`` in ``tuned_config.json``), with
    any of its keys replaced by ``changes``."""
    recorded = meta.get("data")
    if not recorded and "dataset" not in changes:
        raise DataError(
            "the tuned folder does not record its dataset (not written by recipes/finetune.py); "
            "pass the dataset to evaluate on."
        )
    same = changes.get("dataset") in (None, (recorded or {}).get("dataset"))
    spec = {**(recorded or {}), **changes} if same else dict(changes)
    loaded = load_image_dataset(
        spec["dataset"],
        image_column=spec.get("image_column"),
        label_column=spec.get("label_column"),
        data_dir=spec.get("data_dir"),
        test_fraction=spec.get("test_fraction") or 0.2,
        seed=spec.get("seed") or 0,
        allow_outside_paths=bool(spec.get("allow_outside_paths")),
        skip_unreadable=bool(spec.get("skip_unreadable")),
    )
    if spec.get("classes"):
        loaded = select_classes(loaded, spec["classes"])
    return loaded
