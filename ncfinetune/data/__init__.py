"""Images in, batches out: dataset specs -> checked splits -> balanced subsets -> loaders.

``sources`` turns a spec string (a built-in dataset, an image folder, a table, a hub name) into
an :class:`ImageData`, reading local folders and tables through ``tables`` and encoding labels
and selecting classes through ``labels``; ``checks`` holds the load-time checks; ``subsets`` the class-balanced,
seeded small-data subsets; ``loaders`` the timm transforms and fast loaders.
"""

from ncfinetune.data.labels import ImageData, describe, labels_of, select_classes
from ncfinetune.data.loaders import (
    PREDECODE_MAX_BYTES,
    ImageTransform,
    TensorCache,
    build_loader,
    build_transforms,
)
from ncfinetune.data.sources import FASHION_MNIST_CLASSES, FASHION_MNIST_DIR, load_image_dataset
from ncfinetune.data.subsets import balanced_subset, validation_split
from ncfinetune.data.tables import find_columns

__all__ = [
    "FASHION_MNIST_CLASSES",
    "FASHION_MNIST_DIR",
    "PREDECODE_MAX_BYTES",
    "ImageData",
    "ImageTransform",
    "TensorCache",
    "balanced_subset",
    "build_loader",
    "build_transforms",
    "describe",
    "find_columns",
    "labels_of",
    "load_image_dataset",
    "select_classes",
    "validation_split",
]
