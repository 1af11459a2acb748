"""Local sources: image folders, folders written by `save_to_disk`, .csv/.parquet tables of
image paths and labels; and `find_columns`, which picks the image and label columns of any source.

A table's rows are checked before any training (paths non-empty and inside the table's folder
unless allowed, no image listed twice with two labels, files present unless `skip_unreadable`);
see `ncfinetune.data.sources.load_image_dataset` for the whole list.
"""

from __future__ import annotations

import difflib
import os

import datasets

from ncfinetune.data.checks import (
    SKIP_HINT,
    check_class_folders,
    check_inside,
    check_repeats,
    image_extensions,
    no_images_problem,
    row_namer,
    some,
    type_name,
)
from ncfinetune.errors import DataError

# Column names tried, in order, when no column has the datasets feature type.
IMAGE_NAMES = ("image", "img", "pixel_values")
PATH_NAMES = ("image_path", "path", "file", "filename", "file_name")  # csv/parquet only
LABEL_NAMES = ("label", "labels", "fine_label", "target")
TABLE_FORMATS = {".csv": "csv", ".parquet": "parquet", ".pq": "parquet"}


def load_local_dir(path: str) -> datasets.Dataset | datasets.DatasetDict:
    saved = any(os.path.isfile(os.path.join(path, f)) for f in ("dataset_dict.json", "state.json"))
    try:
        if saved:
            return datasets.load_from_disk(path)
        loaded = datasets.load_dataset("imagefolder", data_dir=path)
    except Exception as exc:
        if not saved and (problem := no_images_problem(path)):
            raise DataError(problem) from exc
        kind = "a saved dataset" if saved else "an imagefolder (one subfolder of images per class)"
        raise DataError(
            f"could not read {path!r} as {kind}: {type(exc).__name__}: {exc}. Check the folder, "
            "or pass a .csv/.parquet file of image paths and labels."
        ) from exc
    check_class_folders(path, loaded)
    return loaded


def _read_table(path: str, fmt: str) -> datasets.Dataset:
    try:
        train = datasets.load_dataset(fmt, data_files=path)["train"]
    except Exception as exc:
        if os.path.getsize(path) == 0:
            problem = "is empty (0 bytes)"
        elif fmt == "csv" and _csv_data_lines(path) == 0:
            problem = "has a header line but no rows"
        else:
            cause = f" ({type(exc.__cause__).__name__}: {exc.__cause__})" if exc.__cause__ else ""
            problem = f"cannot be read as {fmt}: {type(exc).__name__}: {exc}{cause}"
        raise DataError(
            f"dataset file {path!r} {problem}. Write one row per image: its path (relative to "
            "the file's folder) and its label, under a header such as 'image_path,label'."
        ) from exc
    if len(train) == 0:
        raise DataError(
            f"dataset file {path!r} has no rows; write one row per image: its path and its label."
        )
    if fmt == "csv" and "__index_level_0__" in train.features:
        # pandas makes the surplus leading fields of longer rows an index.
        raise DataError(
            f"rows of {path!r} have more fields than its header line "
            f"({list(train.features)[:-1]} plus an unnamed one); quote fields that contain "
            "commas (paths, class names), or name every column in the header."
        )
    return train


def _csv_data_lines(path: str) -> int:
    with open(path, encoding="utf-8", errors="replace") as f:
        return max(0, sum(1 for line in f if line.strip()) - 1)


def load_table_file(
    path: str,
    image_column: str | None,
    label_column: str | None,
    allow_outside_paths: bool,
    skip_unreadable: bool,
) -> datasets.DatasetDict:
    ext = os.path.splitext(path)[1].lower()
    if ext not in TABLE_FORMATS:
        raise DataError(
            f"cannot read dataset file {path!r}: extension {ext!r} is not one of "
            f"{sorted(TABLE_FORMATS)}. Pass a .csv/.parquet file, or a folder."
        )
    train = _read_table(path, TABLE_FORMATS[ext])
    try:
        column, label = find_columns(
            train.features,
            image_column=image_column,
            label_column=label_column,
            paths_allowed=True,
        )
    except DataError as exc:
        looks_like_row = any(
            os.path.splitext(c)[1].lower() in image_extensions() for c in train.features
        )
        if ext == ".csv" and looks_like_row:
            raise DataError(
                f"{exc} The first line of {path!r} looks like a row ({list(train.features)}), "
                "not a header: add a header line such as 'image_path,label'."
            ) from None
        raise
    if isinstance(train.features[column], datasets.Image):
        return datasets.DatasetDict({"train": train})  # parquet written by datasets: bytes
    feature = train.features[column]
    if not (isinstance(feature, datasets.Value) and feature.dtype in ("string", "large_string")):
        raise DataError(
            f"image column {column!r} of {path!r} holds {type_name(feature)} values, not "
            "image paths; pass image_column=<name> of the column of paths (relative to the "
            "file's folder)."
        )
    row = row_namer(path)
    cells = train.with_format("arrow", columns=[column])[:][column].to_pylist()
    n = len(cells)
    empty = [i for i, p in enumerate(cells) if p is None or not p.strip()]
    if empty:
        raise DataError(
            f"column {column!r} of {path!r} has no image path in {len(empty)} of {n} rows: "
            f"{some(row(i) for i in empty)}. Fill in each image's path (relative to the "
            "file's folder) or delete those rows."
        )
    folder = os.path.dirname(os.path.abspath(path))
    paths = [p if os.path.isabs(p) else os.path.join(folder, p) for p in cells]
    real = [os.path.realpath(p) for p in paths]
    if not allow_outside_paths:
        check_inside(path, column, folder, cells, real, row)
    labels = train.with_format("arrow", columns=[label])[:][label].to_pylist()
    check_repeats(path, column, cells, real, labels, row)
    missing = [i for i, p in enumerate(paths) if not os.path.isfile(p)]
    if missing and not skip_unreadable:
        shown = some(f"{row(i)} {cells[i]!r}" for i in missing)
        raise DataError(
            f"{len(missing)} of {n} image paths in column {column!r} of {path!r} do not "
            f"exist: {shown}. Paths are read relative to the file's folder {folder!r}; fix the "
            f"paths or move the file, or {SKIP_HINT}."
        )
    # Missing files left in (skip_unreadable) are counted and dropped with the unreadable ones.
    order = list(train.features)
    train = train.remove_columns(column).add_column(column, paths).select_columns(order)
    return datasets.DatasetDict({"train": train.cast_column(column, datasets.Image())})


def find_columns(
    features: datasets.Features,
    *,
    image_column: str | None = None,
    label_column: str | None = None,
    paths_allowed: bool = False,
) -> tuple[str, str]:
    """Pick the image and label columns of a dataset.

    Args:
        features: the dataset's `features`.
        image_column: use this column as the image column (checked to exist).
        label_column: use this column as the label column (checked to exist).
        paths_allowed: also accept PATH_NAMES for the image column (csv/parquet of paths).

    Returns:
        (image column, label column).

    Raises:
        DataError: a column is missing or both roles fall on one column; lists the columns.
    """
    found = ", ".join(f"{k} ({type_name(v)})" for k, v in features.items())
    for role, given in (("image", image_column), ("label", label_column)):
        if given is not None and given not in features:
            close = difflib.get_close_matches(given, list(features), n=1)
            guess = f" (did you mean {close[0]!r}?)" if close else ""
            raise DataError(
                f"{role}_column {given!r} is not a column{guess}; the columns are: {found}. "
                f"Pass one of them as {role}_column."
            )
    names = IMAGE_NAMES + (PATH_NAMES if paths_allowed else ())
    if image_column is None:
        typed = [k for k, v in features.items() if isinstance(v, datasets.Image)]
        image_column = (typed or [n for n in names if n in features] or [None])[0]
    if label_column is None:
        typed = [k for k, v in features.items() if isinstance(v, datasets.ClassLabel)]
        label_column = (typed or [n for n in LABEL_NAMES if n in features] or [None])[0]
    roles = (("image", image_column, names), ("label", label_column, LABEL_NAMES))
    for role, column, tried in roles:
        if column is None:
            kind = "datasets.Image" if role == "image" else "datasets.ClassLabel"
            raise DataError(
                f"no {role} column found: none is of type {kind} or named one of {list(tried)}; "
                f"the columns are: {found}. Pass {role}_column=<name>."
            )
    if image_column == label_column:
        raise DataError(
            f"image and label column are both {image_column!r}; the columns are: {found}. "
            "Pass image_column and label_column explicitly."
        )
    return image_column, label_column
