"""Where images come from: a dataset spec -> train/test splits; the built-in datasets.

`load_image_dataset` turns one spec string into an `ImageData`: a train and a test
`datasets.Dataset` with an image column and an integer `ClassLabel` column. Local folders and
tables are read by `ncfinetune.data.tables`, labels encoded and classes selected by
`ncfinetune.data.labels`; the loaders that turn the splits into tensors live in
`ncfinetune.data.loaders`. The package `ncfinetune.data` re-exports the public names of all four.

The two offline datasets (scikit-learn's digits and Fashion-MNIST from IDX files) are stored as
`datasets.Image` columns whose bytes are binary PGM (P5) files: a PGM is the raw uint8 pixels
behind a 15-byte header, so the whole column is built with NumPy in milliseconds (70,000 PNG
encodes take about 6 s), it decodes losslessly to a PIL "L" image through the same path as any
hub or imagefolder dataset, and per-item decoding is a little faster than PNG. A uint8 array
column (`datasets.Array2D`) was slower to transform: timm's transforms need PIL images anyway,
and reading one row as NumPy took 0.56 ms against 0.12 ms to decode one PGM/PNG image.

Bad inputs are caught at load time, before any training, with the rows and files they concern:
table paths outside the table's folder, empty path or label cells, missing, empty or
unidentifiable image files, one-class data. Images are not decoded at load time unless
`skip_unreadable=True` asks for it (see `load_image_dataset`); a file that only fails when
decoded (e.g. a truncated JPEG) raises a `DataError` naming its row and path in the loader.
"""

from __future__ import annotations

import gzip
import hashlib
import os

import datasets
import numpy as np
import pyarrow as pa

from ncfinetune.data.checks import check_label_cells, drop_unreadable, row_namer
from ncfinetune.data.labels import ImageData, check_classes, encode_labels, labels_of
from ncfinetune.data.subsets import stratified_rows
from ncfinetune.data.tables import TABLE_FORMATS, find_columns, load_local_dir, load_table_file
from ncfinetune.errors import DataError

FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"
FASHION_MNIST_CLASSES = [
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
]  # fmt: skip
OFFLINE_ALTERNATIVES = (
    "'digits' (scikit-learn, bundled), 'fashion_mnist' (local IDX files), a local folder of "
    "class subfolders, a folder written by Dataset.save_to_disk, or a .csv/.parquet file of "
    "image paths and labels"
)
_IDX_STEMS = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte",
              "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")  # fmt: skip


def load_image_dataset(
    spec: str,
    *,
    image_column: str | None = None,
    label_column: str | None = None,
    data_dir: str | None = None,
    test_fraction: float = 0.2,
    seed: int = 0,
    allow_outside_paths: bool = False,
    skip_unreadable: bool = False,
) -> ImageData:
    """Load an image classification dataset from a spec string.

    Specs: "digits" (scikit-learn, 1797 8x8 images scaled 0..16 -> 0..255); "fashion_mnist"
    (IDX files in `data_dir` or /usr/share/datasets/fashion-mnist, official 60000/10000 split,
    else the hub); a folder written by `save_to_disk`; a folder of class subfolders
    (imagefolder); a .csv/.parquet file of image paths relative to its folder and labels;
    anything else is a Hugging Face hub name.

    Checks before any training (each failure is one `DataError` quoting the first few rows or
    files and counting all of them; table rows are counted from 0 after the header, and a CSV
    row r is line r + 2): table paths are non-empty and, after resolving symlinks, inside the
    table's folder; no image is listed twice with two labels (listed twice with one label warns);
    label cells are not empty (blank, null or NaN); at least two classes have rows.

    Unreadable images: by default every image stored as a local file (folders, tables, saved
    datasets that reference files) is opened once at load time, which reads only its header:
    missing, empty and unidentifiable files (e.g. garbage bytes) are reported with their rows.
    That costs about 0.07 ms a file on the 2-core dev machine (140 ms for 2,000 JPEGs). Images
    are not decoded then, because decoding every image once costs as much as a training epoch
    on big datasets; a file that only fails when decoded (a truncated JPEG or PNG) raises a
    `DataError` naming its row and path when the loader reaches it. `skip_unreadable=True`
    instead checks every image thoroughly at load time (PNG chunk checksums, JPEG decoded at
    1/8 size, other formats fully: about 0.2 ms a 64x64 JPEG, 0.5 ms a 500x375 one; images
    stored as bytes too, so a hub dataset pays one pass over its bytes) and leaves out those
    that fail: `skipped` records them and `describe` counts them.

    Args:
        spec: which dataset (see above).
        image_column: the image column; default: first `datasets.Image` column, else the first
            of IMAGE_NAMES present (and PATH_NAMES for csv/parquet).
        label_column: the label column; default: first `ClassLabel` column, else the first of
            LABEL_NAMES present. String labels become ids of the sorted class names; integer
            labels that are not 0..K-1 become ids of their sorted distinct values.
        data_dir: folder of the Fashion-MNIST IDX files, or `data_dir` of a hub dataset.
        test_fraction: share of the data held out as test when the source has neither a
            "test" nor a "validation" split (ignored otherwise).
        seed: seed of that stratified split.
        allow_outside_paths: let a .csv/.parquet table name images outside its own folder
            (absolute paths, "../", symlinks leading out). Off by default so that a table from
            elsewhere cannot make the loader read arbitrary files.
        skip_unreadable: check every image at load time and leave out those that cannot be
            read (missing, empty, corrupt or truncated files), instead of raising.

    Returns:
        The two splits, their column names and the class names.

    Raises:
        DataError: the source cannot be found or read, its columns cannot be told apart, or
            it fails one of the checks above.
    """
    if not 0.0 < test_fraction < 1.0:
        raise DataError(
            f"test_fraction={test_fraction} is outside (0, 1); pass the share of the data to "
            "hold out for testing, e.g. 0.2."
        )
    path = os.path.expanduser(spec)
    table = None
    if spec == "digits":
        loaded = _load_digits()
    elif spec == "fashion_mnist":
        loaded = _load_fashion_mnist(data_dir)
    elif os.path.isdir(path):
        loaded = load_local_dir(path)
    elif os.path.isfile(path):
        table = path
        loaded = load_table_file(
            path, image_column, label_column, allow_outside_paths, skip_unreadable
        )
    elif spec.startswith(("/", "./", "../", "~")) or path.endswith(tuple(TABLE_FORMATS)):
        raise DataError(
            f"dataset path {spec!r} does not exist (resolved to {os.path.abspath(path)!r}). "
            f"Check the path, or use one of: {OFFLINE_ALTERNATIVES}."
        )
    else:
        loaded = _load_hub(spec, data_dir)
    # The bundled datasets are built here from known-good pixels: nothing to check.
    checked = spec not in ("digits", "fashion_mnist")
    return _to_image_data(
        spec,
        loaded,
        image_column,
        label_column,
        test_fraction,
        seed,
        table=table,
        check_images=checked,
        skip_unreadable=skip_unreadable,
    )


def _pgm_dataset(
    images: np.ndarray, labels: np.ndarray, class_names: list[str]
) -> datasets.Dataset:
    """uint8 images (N, H, W) -> Dataset with an Image column of PGM bytes and a ClassLabel."""
    n, h, w = images.shape
    header = np.frombuffer(f"P5\n{w} {h}\n255\n".encode(), dtype=np.uint8)
    rows = np.empty((n, header.size + h * w), dtype=np.uint8)
    rows[:, : header.size] = header
    rows[:, header.size :] = images.reshape(n, h * w)
    # One contiguous buffer plus offsets makes the Arrow binary array without a Python loop.
    offsets = np.arange(n + 1, dtype=np.int64) * rows.shape[1]
    blobs = pa.Array.from_buffers(
        pa.large_binary(), n, [None, pa.py_buffer(offsets), pa.py_buffer(rows)]
    ).cast(pa.binary())
    image = pa.StructArray.from_arrays([blobs, pa.nulls(n, pa.string())], names=["bytes", "path"])
    table = pa.table({"image": image, "label": pa.array(labels.astype(np.int64))})
    features = datasets.Features(
        {"image": datasets.Image(), "label": datasets.ClassLabel(names=class_names)}
    )
    # datasets would otherwise fingerprint by pickling the whole table (0.5 s for 70k images).
    digest = hashlib.blake2b(rows.data, digest_size=8)
    digest.update(labels.astype(np.int64).tobytes())
    digest.update("\n".join(class_names).encode())
    info = datasets.DatasetInfo(features=features)
    return datasets.Dataset(table, info=info, fingerprint=digest.hexdigest())


def _load_digits() -> datasets.DatasetDict:
    from sklearn.datasets import load_digits

    digits = load_digits()
    # Pixel values are counts 0..16; scale to the 0..255 range every image pipeline expects.
    images = np.round(digits.images * (255.0 / 16.0)).astype(np.uint8)
    names = [str(c) for c in range(10)]
    return datasets.DatasetDict({"train": _pgm_dataset(images, digits.target, names)})


def _read_idx(path: str) -> np.ndarray:
    """Read one IDX file (optionally gzipped) of unsigned bytes."""
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rb") as f:
        raw = f.read()
    if len(raw) < 4 or raw[:3] != b"\x00\x00\x08":
        raise DataError(
            f"{path} is not an IDX file of unsigned bytes (magic {raw[:4]!r}); expected the "
            "Fashion-MNIST files from `apt-get install dataset-fashion-mnist`."
        )
    ndim = raw[3]
    dims = [int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)]
    return np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim).reshape(dims)


def _load_fashion_mnist(data_dir: str | None) -> datasets.DatasetDict:
    folder = os.path.expanduser(data_dir or FASHION_MNIST_DIR)
    found: dict[str, str] = {}
    missing = []
    for stem in _IDX_STEMS:
        candidates = [os.path.join(folder, stem + ext) for ext in (".gz", "")]
        present = [c for c in candidates if os.path.isfile(c)]
        if present:
            found[stem] = present[0]
        else:
            missing.append(stem + "[.gz]")
    fix = "install them with `apt-get install dataset-fashion-mnist` or pass data_dir"
    if missing and data_dir is not None:
        # An explicit folder that lacks the files is a mistake to report, not to paper over
        # with a download.
        raise DataError(f"data_dir {folder!r} lacks the Fashion-MNIST files {missing}; {fix}.")
    if missing:
        try:
            return datasets.load_dataset("fashion_mnist")
        except Exception as exc:
            raise DataError(
                f"Fashion-MNIST files {missing} are not in {folder!r} and the hub copy could "
                f"not be loaded ({type(exc).__name__}: {exc}); {fix} (a folder holding "
                "train-images-idx3-ubyte.gz and the three other IDX files)."
            ) from exc
    splits = {}
    for split, prefix in (("train", "train"), ("test", "t10k")):
        images = _read_idx(found[f"{prefix}-images-idx3-ubyte"])
        labels = _read_idx(found[f"{prefix}-labels-idx1-ubyte"])
        splits[split] = _pgm_dataset(images, labels, FASHION_MNIST_CLASSES)
    return datasets.DatasetDict(splits)


def _load_hub(spec: str, data_dir: str | None) -> datasets.Dataset | datasets.DatasetDict:
    try:
        return datasets.load_dataset(spec, data_dir=data_dir)
    except Exception as exc:
        raise DataError(
            f"could not load {spec!r} as a Hugging Face hub dataset ({type(exc).__name__}: "
            f"{exc}). It is not a local path either. If the hub is unreachable (offline), use "
            f"an offline source instead: {OFFLINE_ALTERNATIVES}."
        ) from exc


def _to_image_data(
    spec: str,
    loaded: datasets.Dataset | datasets.DatasetDict,
    image_column: str | None,
    label_column: str | None,
    test_fraction: float,
    seed: int,
    *,
    table: str | None = None,
    check_images: bool = True,
    skip_unreadable: bool = False,
) -> ImageData:
    if isinstance(loaded, datasets.Dataset):
        loaded = datasets.DatasetDict({"train": loaded})
    names = list(loaded)
    if "train" in loaded:
        train_name = "train"
    elif len(names) == 1:
        train_name = names[0]
    else:
        raise DataError(
            f"{spec!r} has splits {names} and none is called 'train'; save the training "
            "split as 'train' (and the held-out one as 'test')."
        )
    test_name = next((n for n in ("test", "validation") if n in loaded and n != train_name), None)
    train = loaded[train_name]
    image_col, label_col = find_columns(
        train.features,
        image_column=image_column,
        label_column=label_column,
        paths_allowed=table is not None,
    )
    test = loaded[test_name] if test_name else None
    if test is not None:
        absent = [c for c in (image_col, label_col) if c not in test.features]
        if absent:
            raise DataError(
                f"the {test_name!r} split of {spec!r} lacks columns {absent} (it has "
                f"{list(test.features)}); give both splits the same columns."
            )
    row = row_namer(table)
    splits = {train_name: train, **({test_name: test} if test is not None else {})}

    def where(split: str) -> str:  # a table is one split, named after its file
        return repr(table) if table is not None else f"the {split!r} split of {spec!r}"

    # Row-numbered checks run before rows are dropped, so the numbers are the source's.
    for name, split in splits.items():
        check_label_cells(split, label_col, where(name), row)
    skipped: dict[str, str] = {}
    if check_images:
        for name, split in splits.items():
            splits[name] = drop_unreadable(
                split, image_col, where(name), name, row, skip_unreadable, skipped
            )
    train, test = splits[train_name], splits.get(test_name)
    train, test, class_names = encode_labels(spec, train, test, label_col, row)
    check_classes(repr(table or spec), train, test, label_col, class_names, skipped)
    if test is None:
        train, test = _stratified_split(spec, train, label_col, test_fraction, seed)
    return ImageData(spec, train, test, image_col, label_col, class_names, skipped)


def _stratified_split(
    spec: str, dataset: datasets.Dataset, column: str, test_fraction: float, seed: int
) -> tuple[datasets.Dataset, datasets.Dataset]:
    """A stratified train/test split of a dataset that has no test split.

    The rows come from datasets' stratified `Dataset.train_test_split` (via
    `subsets.stratified_rows`); before, from scikit-learn's `train_test_split`, which drew other
    rows for the same seed (e.g. digits' 360 test images changed, and two classes' test counts
    moved by one; every class still has its share to within one row).
    """
    labels = labels_of(dataset, column)
    try:
        train_idx, test_idx = stratified_rows(labels, test_fraction, seed)
    except ValueError as exc:
        raise DataError(
            f"cannot split {spec!r} ({labels.size} rows, class counts "
            f"{np.bincount(labels).tolist()}) into train/test with test_fraction={test_fraction}: "
            f"{str(exc).rstrip('.')}. Use a larger dataset or fraction, or provide a 'test' split."
        ) from exc
    # Sorted indices keep the source order, so the split reads the table front to back.
    return dataset.select(train_idx), dataset.select(test_idx)
