"""Datasets -> batches: timm transforms, balanced small-data subsets and fast loaders.

Loading dataset specs lives in :mod:`ncfinetune.data.sources`; the package
:mod:`ncfinetune.data` re-exports both.

A transform from `build_transforms` has two stages: a PIL stage (mode conversion, resize, crop,
augmentation; ends in a uint8 C x H x W tensor) and a normalization stage (x / 255 - mean) / std,
computed as one multiply-add (within 1e-6 of timm's own Normalize).
Without augmentation the PIL stage is deterministic, so `build_loader` runs it once per image
(`TensorCache`, uint8 in memory) and each batch only indexes and normalizes; both paths call
the same two functions, so their batches are identical bit for bit.

Loader speed on the 2-core dev machine (CPU shared with other jobs, load average 2-3; one torch
thread, test_resnet transforms at 32x32, batch 256, num_workers=0), images/s over one epoch,
best of 3, range over two runs:

    ==========================  =================  ===================
    path                        digits train 1437  Fashion-MNIST 10000
    ==========================  =================  ===================
    naive per item (ds[i])      3,300 - 3,700      3,900 - 4,100
    per item (predecode=False)  6,000 - 8,500      7,000 - 7,700
    pre-decode once             8,500 - 10,400     7,500 - 8,000
    pre-decoded, each epoch     410,000 - 690,000  500,000 - 650,000
    ==========================  =================  ===================

Measured with `python -m ncfinetune.data.loaders` (prints one line per dataset). Decoding once costs about one
per-item epoch, so pre-decoding pays off from the second epoch on and keeps the CPU free for the
model afterwards. It is chosen automatically when the transform does not augment and the cache
takes at most PREDECODE_MAX_BYTES (2 GiB of uint8: e.g. 14,000 RGB images at 224x224, or all
70,000 Fashion-MNIST images at 96x96 RGB; grayscale images for an RGB model are stored as
three equal channels); pass `predecode=False` to turn it off.

Images are decoded here, by datasets' own `Image.decode_example` called row by row, so that an
image that cannot be decoded (e.g. a truncated JPEG, which the load-time header check of
`load_image_dataset` lets through) raises a `DataError` naming its row and file, whether while
pre-decoding or in a training epoch.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence

import datasets
import numpy as np
import PIL.Image
import torch
from accelerate.data_loader import SeedableRandomSampler
from torch.utils.data import BatchSampler, DataLoader, Dataset, SequentialSampler

from ncfinetune.data.sources import (
    find_columns,
    labels_of,
    load_image_dataset,
)
from ncfinetune.errors import DataError

PREDECODE_MAX_BYTES = 2 * 1024**3


def _to_pil(value: object) -> PIL.Image.Image:
    if isinstance(value, PIL.Image.Image):
        return value
    array = np.asarray(value)
    if array.ndim not in (2, 3) or (array.ndim == 3 and array.shape[2] not in (1, 3, 4)):
        raise DataError(
            f"cannot read an image from an array of shape {array.shape}; expected H x W or "
            "H x W x C with C in (1, 3, 4), or a PIL image (a datasets.Image column)."
        )
    if array.dtype != np.uint8:
        if not (np.issubdtype(array.dtype, np.integer) and array.min() >= 0 and array.max() <= 255):
            raise DataError(
                f"image array of {array.dtype} in {array.min()}..{array.max()}; expected "
                "integers 0..255. Scale the column to uint8 or cast it to datasets.Image()."
            )
        array = array.astype(np.uint8)
    return PIL.Image.fromarray(
        array.squeeze(2) if array.ndim == 3 and array.shape[2] == 1 else array
    )


class ImageTransform:
    """Turns one image into the normalized float C x H x W tensor a timm model expects.

    Attributes:
        pil_stage: PIL image in `mode` -> uint8 C x H x W (timm's transform without the
            normalization, i.e. `use_prefetcher=True`); random when `augment`.
        mode: PIL mode the model wants ("RGB" for 3 input channels, "L" for 1).
        mean: per-channel mean in [0, 1] units, shape C x 1 x 1.
        std: per-channel std in [0, 1] units, shape C x 1 x 1.
        input_size: (C, H, W) of the output.
        augment: whether pil_stage is random (then it must run on every access).
    """

    def __init__(
        self,
        pil_stage: Callable[[PIL.Image.Image], torch.Tensor],
        *,
        mode: str,
        mean: Sequence[float],
        std: Sequence[float],
        input_size: tuple[int, int, int],
        augment: bool,
    ) -> None:
        self.pil_stage = pil_stage
        self.mode = mode
        self.mean = torch.tensor(mean, dtype=torch.float32).view(-1, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(-1, 1, 1)
        # (x / 255 - mean) / std as one multiply-add: 3x faster per batch, within 1e-6 of it.
        self._scale = 1.0 / (255.0 * self.std)
        self._shift = -self.mean / self.std
        self.input_size = input_size
        self.augment = augment

    def to_uint8(self, image: object) -> torch.Tensor:
        """PIL image or uint8 array -> uint8 C x H x W in the model's mode and size."""
        image = _to_pil(image)
        if image.mode != self.mode:
            image = image.convert(self.mode)
        return self.pil_stage(image)

    def normalize(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 (..., C, H, W) in 0..255 -> float32 (x / 255 - mean) / std."""
        return images.float().mul_(self._scale).add_(self._shift)

    def __call__(self, image: object) -> torch.Tensor:
        return self.normalize(self.to_uint8(image))

    def __repr__(self) -> str:
        return (
            f"ImageTransform(mode={self.mode}, input_size={self.input_size}, "
            f"augment={self.augment}, pil_stage={self.pil_stage})"
        )


def _model_in_chans(model: torch.nn.Module, default: int) -> int:
    # timm's data config always says 3 channels, even for in_chans=1; the first conv knows.
    first = getattr(model, "pretrained_cfg", {}).get("first_conv")
    try:
        return int(model.get_submodule(first).in_channels)
    except (AttributeError, TypeError):
        return int(getattr(model, "in_chans", default))


def build_transforms(
    model: torch.nn.Module,
    *,
    image_size: int | tuple[int, int] | None = None,
    augment: bool = False,
) -> ImageTransform:
    """Build the preprocessing a timm model expects, from its pretrained data config.

    Args:
        model: a timm model; its `pretrained_cfg` gives size, interpolation, crop and mean/std,
            its first convolution the number of input channels (images are converted to
            "RGB" for 3 and "L" for 1; mean/std are averaged over channels for 1).
        image_size: output height = width (int) or (height, width); default the model's.
        augment: timm's training transform (RandomResizedCrop, flip, colour jitter) instead of
            resize + centre crop.

    Returns:
        A callable image -> float tensor C x H x W, usable by `build_loader`.
    """
    from timm.data import create_transform, resolve_model_data_config

    cfg = dict(resolve_model_data_config(model))
    in_chans = _model_in_chans(model, cfg["input_size"][0])
    modes = {1: "L", 3: "RGB"}
    if in_chans not in modes:
        raise DataError(
            f"the model takes {in_chans} input channels; build_transforms supports 1 (grayscale)"
            " and 3 (RGB). Build the transform yourself for other inputs."
        )
    mean, std = tuple(cfg["mean"]), tuple(cfg["std"])
    if in_chans == 1 and len(mean) != 1:
        # timm adapts an RGB stem to 1 channel by summing its weights; the channel-averaged
        # statistics are the matching normalization.
        mean, std = (float(np.mean(mean)),), (float(np.mean(std)),)
    if image_size is None:
        size = tuple(cfg["input_size"][1:])
    else:
        size = (image_size, image_size) if isinstance(image_size, int) else tuple(image_size)
        if len(size) != 2 or not all(isinstance(s, int) and s > 0 for s in size):
            raise DataError(
                f"image_size={image_size!r} is invalid; pass a positive int or (height, width)."
            )
    cfg.update(input_size=(in_chans, *size), mean=mean, std=std)
    # use_prefetcher=True ends the pipeline in a uint8 tensor; normalization is ours, so it
    # can run once per batch on cached images too.
    pil_stage = create_transform(**cfg, is_training=augment, use_prefetcher=True)
    return ImageTransform(
        pil_stage,
        mode=modes[in_chans],
        mean=mean,
        std=std,
        input_size=(in_chans, *size),
        augment=augment,
    )


class _ImageReader:
    """Reads the images of some rows of an image column, naming the row and file of a failure.

    A `datasets.Image` column is gathered as raw {"bytes", "path"} structs (one Arrow gather)
    and each image is decoded by the column's own `decode_example`, as datasets' formatting
    would; any other column (e.g. uint8 arrays) is returned as datasets formats it.
    """

    def __init__(self, dataset: datasets.Dataset, column: str) -> None:
        feature = dataset.features[column]
        self.column = column
        self.decoder = None
        if isinstance(feature, datasets.Image):
            self.decoder = feature if feature.decode else datasets.Image(mode=feature.mode)
            self.source = dataset.with_format("arrow", columns=[column])
        else:
            self.source = dataset.select_columns([column])

    def __call__(self, rows: np.ndarray) -> list:
        """The images of `rows` (positions in the dataset), in order."""
        if self.decoder is None:
            return self.source[rows.tolist()][self.column]
        values = self.source[rows.tolist()][self.column].to_pylist()
        return [self._decode(value, int(row)) for value, row in zip(values, rows, strict=True)]

    def _decode(self, value: dict | None, row: int) -> PIL.Image.Image:
        path = (value or {}).get("path")
        try:
            if value is None or (value["bytes"] is None and path is None):
                raise ValueError("the cell holds no image")
            return self.decoder.decode_example(value)
        except Exception as exc:
            where = f"file {path!r}" if path else "image stored as bytes in the dataset"
            raise DataError(
                f"cannot read the image of row {row} of this split ({where}): "
                f"{type(exc).__name__}: {exc}. Replace or delete the file, or load the dataset "
                "with skip_unreadable=True, which checks every image once at load time and "
                "leaves out those that cannot be read."
            ) from exc


class TensorCache(Dataset):
    """Images decoded once by a deterministic transform, kept as uint8 in memory.

    Indexed with a list of positions, returns a whole batch: (float N x C x H x W normalized
    images, long N labels).
    """

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, transform: ImageTransform):
        self.images = images
        self.labels = labels
        self.transform = transform

    @classmethod
    def build(
        cls,
        dataset: datasets.Dataset,
        transform: ImageTransform,
        *,
        image_column: str,
        label_column: str,
        indices: np.ndarray | None = None,
        chunk_size: int = 512,
    ) -> TensorCache:
        """Decode rows `indices` (default all) of `dataset` through `transform.to_uint8`."""
        if transform.augment:
            raise DataError(
                "cannot pre-decode with an augmenting transform: one random crop would be "
                "frozen for every epoch. Pass predecode=False, or build_transforms(augment=False)."
            )
        rows = np.arange(len(dataset)) if indices is None else np.asarray(indices)
        images = torch.empty((rows.size, *transform.input_size), dtype=torch.uint8)
        read = _ImageReader(dataset, image_column)
        for start in range(0, rows.size, chunk_size):
            batch = [transform.to_uint8(image) for image in read(rows[start : start + chunk_size])]
            images[start : start + len(batch)] = torch.stack(batch)
        labels = torch.from_numpy(labels_of(dataset, label_column)[rows])
        return cls(images, labels, transform)

    @property
    def nbytes(self) -> int:
        """Memory held by the decoded images."""
        return self.images.numel() * self.images.element_size()

    def __len__(self) -> int:
        return self.images.shape[0]

    def __getitems__(self, positions: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        return self[positions]

    def __getitem__(self, positions: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        index = torch.as_tensor(positions, dtype=torch.long)
        # index_select copies whole rows; plain fancy indexing is ~5x slower here.
        images = self.images.index_select(0, index)
        return self.transform.normalize(images), self.labels.index_select(0, index)


class _DecodingDataset(Dataset):
    """Reads and transforms images on every access; returns whole batches like TensorCache."""

    def __init__(self, dataset, transform, image_column, label_column, rows):
        self.read = _ImageReader(dataset, image_column)
        self.labels = torch.from_numpy(labels_of(dataset, label_column))
        self.transform = transform
        self.rows = rows

    def __len__(self) -> int:
        return self.rows.size

    def __getitems__(self, positions: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        return self[positions]

    def __getitem__(self, positions: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        # One Arrow gather per batch; the transform itself still runs image by image.
        rows = self.rows[positions]
        images = torch.stack([self.transform(image) for image in self.read(rows)])
        return images, self.labels[torch.as_tensor(rows, dtype=torch.long)]


def build_loader(
    dataset: datasets.Dataset,
    transform: Callable[[object], torch.Tensor],
    *,
    batch_size: int,
    shuffle: bool,
    seed: int = 0,
    num_workers: int = 0,
    indices: Sequence[int] | np.ndarray | None = None,
    drop_last: bool = False,
    image_column: str | None = None,
    label_column: str | None = None,
    predecode: bool | None = None,
    max_predecode_bytes: int = PREDECODE_MAX_BYTES,
    pin_memory: bool | None = None,
) -> DataLoader:
    """Make a DataLoader of (float N x C x H x W images, long N labels) batches.

    Args:
        dataset: a split, e.g. `data.train`.
        transform: usually `build_transforms(model)`; any callable image -> C x H x W tensor
            works but is never pre-decoded.
        batch_size: images per batch.
        shuffle: reshuffle every epoch; the order of epoch e depends on (seed, e) only
            (accelerate's `SeedableRandomSampler`, which seeds a generator with seed + e, so
            seed s at epoch e + 1 repeats seed s + 1 at epoch e).
        seed: seed of the shuffling and of worker seeds (>= 0). A loader prepared by an
            `Accelerator` built with `DataLoaderConfiguration(use_seedable_sampler=True,
            data_seed=s)` shuffles by that `s` instead: pass the same seed to both.
        num_workers: worker processes; 0 reads in the main process.
        indices: rows of `dataset` to use (e.g. from `balanced_subset`); default all.
        drop_last: drop the last incomplete batch.
        image_column: default: detected by `find_columns`.
        label_column: default: detected by `find_columns`.
        predecode: True decodes all images once into a `TensorCache`; False transforms on every
            access; None (default) pre-decodes when `transform` is a non-augmenting
            `ImageTransform` and the cache fits in `max_predecode_bytes`.
        max_predecode_bytes: largest cache (uint8 bytes) chosen automatically.
        pin_memory: page-locked batches for fast asynchronous copies to a GPU; None (default)
            pins when CUDA is available. Workers, when asked for, persist across epochs.

    Returns:
        The loader. Each full pass advances the epoch; `loader.batch_sampler.sampler.set_epoch(e)`
        selects the order of epoch e (after `accelerator.prepare`: `loader.set_epoch(e)`, which
        reaches the sampler through accelerate's per-process shards).
    """
    if batch_size < 1 or seed < 0:
        raise DataError(f"batch_size={batch_size} and seed={seed}: both must be >= 1 / >= 0.")
    image_column, label_column = find_columns(
        dataset.features, image_column=image_column, label_column=label_column
    )
    rows = np.arange(len(dataset)) if indices is None else np.asarray(indices, dtype=np.int64)
    if rows.ndim != 1 or (rows.size and (rows.min() < 0 or rows.max() >= len(dataset))):
        raise DataError(
            f"indices must be 1-D row numbers in [0, {len(dataset)}); got shape {rows.shape}"
            + (f" spanning {rows.min()}..{rows.max()}." if rows.size else ".")
        )
    cacheable = isinstance(transform, ImageTransform) and not transform.augment
    if predecode and not isinstance(transform, ImageTransform):
        raise DataError(
            f"predecode=True needs a transform from build_transforms, got {transform!r}; "
            "pass predecode=False or use build_transforms."
        )
    if predecode is None:
        nbytes = rows.size * math.prod(transform.input_size) if cacheable else 0
        predecode = cacheable and nbytes <= max_predecode_bytes
    if predecode:
        source: Dataset = TensorCache.build(
            dataset, transform, image_column=image_column, label_column=label_column, indices=rows
        )
    else:
        source = _DecodingDataset(dataset, transform, image_column, label_column, rows)
    # Plain torch/accelerate samplers over positions 0..n-1 (a range: the sampler only needs the
    # length, so nothing heavy is referenced). `accelerator.prepare` recognises the seedable
    # sampler, shards the batch sampler across processes, and forwards `set_epoch` to it; every
    # process draws the same permutation from (seed, epoch), so the shards are disjoint and a
    # resumed epoch is shuffled as in an uninterrupted run, for any number of processes.
    positions = range(rows.size)
    order = (
        SeedableRandomSampler(positions, data_seed=seed)
        if shuffle
        else SequentialSampler(positions)
    )
    sampler = BatchSampler(order, batch_size, drop_last)
    # With the datasets' batched __getitems__ a batch is fetched and normalised in one call; the
    # collate function passes that batch through. A private generator seeds the workers without
    # drawing from (and so shifting) the global torch RNG.
    return DataLoader(
        source,
        batch_sampler=sampler,
        collate_fn=_pass_batch,
        num_workers=num_workers,
        persistent_workers=num_workers > 0,
        pin_memory=torch.cuda.is_available() if pin_memory is None else pin_memory,
        generator=torch.Generator().manual_seed(seed),
    )


def _pass_batch(batch: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Collate function for datasets whose ``__getitems__`` already returns a whole batch."""
    return batch


def _measure_loaders(repeats: int = 3) -> None:
    """Print images/s of each loader path, best of `repeats` (the table in the docstring)."""
    import timm

    torch.set_num_threads(1)  # one core; on a shared 2-core box two threads stall each other
    transform = build_transforms(timm.create_model("test_resnet", pretrained=False), image_size=32)
    cases = [("digits train", load_image_dataset("digits").train, None)]
    cases.append(("Fashion-MNIST", load_image_dataset("fashion_mnist").train, np.arange(10_000)))

    def best(make: Callable[[], object]) -> tuple[float, object]:
        times, result = [], None
        for _ in range(repeats):
            start = time.perf_counter()
            result = make()
            times.append(time.perf_counter() - start)
        return min(times), result

    def epoch(loader: DataLoader) -> None:
        for _ in loader:
            pass

    for name, ds, rows in cases:
        sub = ds if rows is None else ds.select(rows)
        n = len(sub)

        def naive(sub=sub) -> None:  # a plain map-style Dataset: ds[i] per item, then collate
            torch.stack([transform(sub[i]["image"]) for i in range(len(sub))])

        def make(predecode: bool, ds=ds, rows=rows) -> DataLoader:
            kw = dict(batch_size=256, shuffle=True, indices=rows, predecode=predecode)
            return build_loader(ds, transform, **kw)

        t_naive, _ = best(naive)
        t_item, _ = best(lambda: epoch(make(False)))
        t_build, loader = best(lambda: make(True))
        t_epoch, _ = best(lambda loader=loader: epoch(loader))
        print(
            f"{name} ({n} images, images/s): naive per item {n / t_naive:,.0f}, per item "
            f"{n / t_item:,.0f}, decode once {n / t_build:,.0f}, pre-decoded epoch "
            f"{n / t_epoch:,.0f}"
        )


if __name__ == "__main__":
    _measure_loaders()
