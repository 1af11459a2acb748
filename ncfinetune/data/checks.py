"""Checks of image datasets at load time, each failure one `DataError` quoting the rows or files
it concerns (the first few, all counted): image folders without class subfolders or with one
class, table paths leading outside the table's folder, images listed twice, empty label cells,
missing, empty or unreadable image files (`unreadable_rows`, `drop_unreadable`).

Used by `ncfinetune.data.sources` and `ncfinetune.data.tables`, which load the datasets.
"""

from __future__ import annotations

import io
import os
import stat
from collections import Counter, defaultdict
from collections.abc import Callable

import datasets
import numpy as np
import PIL.Image
import pyarrow.compute as pc

from ncfinetune.errors import DataError
from ncfinetune.messages import warn_once

SHOWN = 3  # offending rows or files quoted in one message (all of them are counted)


# Folder names that datasets' imagefolder reads as splits, not as classes.
SPLIT_DIRS = {"train", "training", "test", "testing", "validation", "valid", "val", "dev", "eval"}


SKIP_HINT = (
    "pass skip_unreadable=True to leave out every unreadable image (they are counted in the "
    "dataset's description)"
)


def image_extensions() -> set[str]:
    try:  # the list imagefolder itself uses
        from datasets.packaged_modules.imagefolder.imagefolder import ImageFolder

        return {e.lower() for e in ImageFolder.EXTENSIONS}
    except (ImportError, AttributeError):
        return set(PIL.Image.registered_extensions())


FOLDER_FIX = (
    "Put each class's images in a subfolder named after the class (e.g. {p}/cat/1.png and "
    "{p}/dog/2.png), or pass a .csv/.parquet file of image paths and labels."
)


def no_images_problem(path: str) -> str | None:
    """Why imagefolder found nothing in `path`, or None when it holds image files."""
    extensions = image_extensions()
    files = [os.path.join(d, f) for d, _, names in os.walk(path) for f in sorted(names)]
    if any(os.path.splitext(f)[1].lower() in extensions for f in files):
        return None
    fix = FOLDER_FIX.format(p=path)
    if not files:
        return f"found no images in {path!r}: the folder holds no files. {fix}"
    shown = [os.path.relpath(f, path) for f in files[:SHOWN]]
    return (
        f"found no images in {path!r}: its {len(files)} files (e.g. {shown}) have none of the "
        f"image extensions ({', '.join(sorted(extensions)[:8])}, ...). {fix}"
    )


def check_class_folders(path: str, loaded: datasets.DatasetDict) -> None:
    """Explain why imagefolder gave no labels: one class folder, or images at the wrong depth.

    imagefolder labels each image by its parent folder only when there are at least two such
    folders and every image lies equally deep; otherwise it silently drops the labels, and the
    error would only say that there is no label column.
    """
    if any(set(split.features) != {"image"} for split in loaded.values()):
        return  # labelled, or metadata columns: find_columns reports what is missing
    root = os.path.abspath(path)
    files = []
    for split in loaded.values():
        column = split.with_format("arrow", columns=["image"])[:]["image"]
        files += [os.path.abspath(f) for f in pc.struct_field(column, "path").to_pylist() if f]
    if not files:
        return
    parents = Counter(os.path.dirname(f) for f in files)
    classes = sorted({os.path.basename(d) for d in parents})
    fix = FOLDER_FIX.format(p=path)

    def top_level(folder: str) -> bool:  # directly in the root, or in a split folder of it
        parent = os.path.dirname(folder)
        return folder == root or (parent == root and os.path.basename(folder) in SPLIT_DIRS)

    loose = [f for f in files if top_level(os.path.dirname(f))]
    if loose and len(loose) == len(files):
        raise DataError(
            f"found {len(files)} images directly in {path!r} (e.g. "
            f"{os.path.relpath(loose[0], root)!r}) but no class subfolders, so there are no "
            f"labels; a classifier needs >= 2 classes. {fix}"
        )
    if len(classes) == 1:
        where = ", ".join(repr(d) for d in sorted(parents))
        raise DataError(
            f"found 1 class: {classes[0]!r} in {path!r} ({len(files)} images in {where}); a "
            "classifier needs >= 2 classes, one subfolder each. Add a subfolder of images for "
            "every other class next to it, or pass a dataset with at least two classes."
        )
    by_depth: dict[int, list[str]] = defaultdict(list)
    for f in files:
        relative = os.path.relpath(f, root)
        by_depth[relative.count(os.sep)].append(relative)
    if len(by_depth) < 2:
        return  # not a layout this function can explain; find_columns reports the columns
    depth_names = {0: "directly in it", 1: "one folder down"}
    examples = ", ".join(
        f"{len(fs)} {depth_names.get(d, f'{d} folders down')} (e.g. {fs[0]!r})"
        for d, fs in sorted(by_depth.items())
    )
    raise DataError(
        f"found images at different folder depths in {path!r}: {examples}. imagefolder labels "
        "an image by its parent folder only when all images lie equally deep, so it found no "
        "labels. Move every image into a subfolder named after its class (e.g. "
        f"{os.path.join(path, 'cat', '1.png')}), and delete the others."
    )


def row_namer(table: str | None) -> Callable[[int], str]:
    """How messages name row i: with its line number for a CSV (header on line 1)."""
    if table is not None and table.lower().endswith(".csv"):
        return lambda i: f"row {i} (line {i + 2})"
    return lambda i: f"row {i}"


def type_name(feature: object) -> str:
    """A datasets feature's type for messages: the dtype of a `Value`, else its class name."""
    if isinstance(feature, datasets.Value):
        return feature.dtype
    return type(feature).__name__


def plural(n: int, noun: str) -> str:
    return f"{n} {noun}" + ("" if n == 1 else "s")


def some(items, limit: int = SHOWN) -> str:
    """The first `limit` items joined, with how many more there are."""
    items = list(items)
    more = f" and {len(items) - limit} more" if len(items) > limit else ""
    return "; ".join(items[:limit]) + more


def check_inside(
    path: str,
    column: str,
    folder: str,
    cells: list[str],
    real: list[str],
    row: Callable[[int], str],
) -> None:
    root = os.path.realpath(folder)

    def inside(p: str) -> bool:
        try:
            return os.path.commonpath([root, p]) == root
        except ValueError:  # another drive (Windows)
            return False

    outside = [i for i, p in enumerate(real) if not inside(p)]
    if outside:
        shown = some(f"{row(i)} {cells[i]!r} -> {real[i]!r}" for i in outside)
        raise DataError(
            f"{len(outside)} of {len(real)} image paths in column {column!r} of {path!r} lead "
            f"outside the table's folder {root!r}: {shown}. A table may only name images "
            "inside its own folder (symlinks resolved), so that a table from elsewhere cannot "
            "make the loader read any file. Move the images under that folder, or pass "
            "allow_outside_paths=True if you trust this table."
        )


def check_repeats(
    path: str,
    column: str,
    cells: list[str],
    real: list[str],
    labels: list[object],
    row: Callable[[int], str],
) -> None:
    """An image listed twice with two labels is an error; with one label, a warning."""
    rows_of: dict[str, list[int]] = defaultdict(list)
    for i, p in enumerate(real):
        rows_of[p].append(i)
    repeated = [rows for rows in rows_of.values() if len(rows) > 1]
    if not repeated:
        return
    conflicts = [r for r in repeated if len({labels[i] for i in r if labels[i] is not None}) > 1]
    if conflicts:
        shown = some(
            f"{' and '.join(row(i) for i in r)} list {cells[r[0]]!r} as "
            f"{', '.join(repr(labels[i]) for i in r)}"
            for r in conflicts
        )
        raise DataError(
            f"{plural(len(conflicts), 'image')} listed in {path!r} more than once with different "
            f"labels: {shown}. Each image has one class: keep one row per image, with its "
            f"correct label (e.g. pandas drop_duplicates({column!r}))."
        )
    extra = sum(len(r) - 1 for r in repeated)
    first = repeated[0]
    warn_once(
        f"{plural(extra, 'row')} of {path!r} repeat an image listed in an earlier row (e.g. "
        f"{row(first[1])} repeats {row(first[0])}: {cells[first[0]]!r}); a repeated image "
        "counts more than once and may land in both the train and the test split. Drop the "
        "repeated rows."
    )


def check_label_cells(
    split: datasets.Dataset, column: str, where: str, row: Callable[[int], str]
) -> None:
    """Raise when label cells are blank, null or NaN, naming their rows."""
    feature = split.features[column]
    if not isinstance(feature, datasets.Value):
        return  # ClassLabel: -1 (unlabelled) is reported by labels.encode_labels
    values = split.with_format("arrow", columns=[column])[:][column]
    empty = values.is_null()
    if feature.dtype in ("string", "large_string"):
        empty = pc.or_kleene(empty, pc.equal(pc.utf8_trim_whitespace(values), ""))
    elif feature.dtype.startswith("float"):
        empty = pc.or_kleene(empty, pc.is_nan(values))
    rows = np.flatnonzero(empty.fill_null(True).to_numpy())
    if rows.size:
        raise DataError(
            f"label column {column!r} of {where} is empty in {rows.size} of {len(split)} rows: "
            f"{some(row(int(i)) for i in rows)}. Every image needs a class: fill in these "
            "cells, or delete those rows."
        )


def image_problem(source: str | io.BytesIO, *, deep: bool = False) -> str | None:
    """Why an image file (a path, or its bytes) cannot be read; None when it can.

    Without `deep`, only its header is read (about 0.03 ms): missing, empty and unidentifiable
    files fail. With `deep`, a PNG's chunks are read and checksummed (PIL `verify`, about
    0.1 ms for 500x375), a JPEG is decoded at 1/8 size (which still reads every byte: 0.5 ms
    against 1.2 ms in full) and other formats are decoded fully, so truncated files fail too.
    """
    if isinstance(source, str):
        try:
            status = os.stat(source)
        except FileNotFoundError:
            return "the file does not exist"
        except OSError as exc:
            return f"{type(exc).__name__}: {exc}"
        if stat.S_ISDIR(status.st_mode):
            return "it is a folder, not an image file"
        if status.st_size == 0:
            return "the file is empty (0 bytes)"
    elif source.getbuffer().nbytes == 0:
        return "the image is empty (0 bytes)"
    try:
        with PIL.Image.open(source) as image:
            if deep and image.format == "PNG":
                image.verify()
            elif deep:
                if image.format == "JPEG":
                    image.draft(image.mode, (1, 1))  # scale 1/8 while decoding
                image.load()
    except PIL.UnidentifiedImageError:
        if isinstance(source, str):
            with open(source, "rb") as f:
                head = f.read(12)
        else:
            head = source.getvalue()[:12]
        return f"not an image format PIL can read (it starts with {head!r})"
    except Exception as exc:  # PIL raises OSError, SyntaxError, EOFError, ValueError, ...
        return f"{type(exc).__name__}: {exc}"
    return None


def unreadable_rows(
    split: datasets.Dataset, column: str, *, deep: bool, chunk_size: int = 1024
) -> dict[int, tuple[str | None, str]]:
    """Rows of `split` whose image cannot be read: row -> (file path or None, why).

    Images stored as local files are checked by `image_problem`; images stored as bytes only
    with `deep` (they never miss, and reading every blob costs a pass over the data); remote
    files (URLs) never.
    """
    if not isinstance(split.features[column], datasets.Image):
        return {}
    source = split.with_format("arrow", columns=[column])
    bad = {}
    for start in range(0, len(split), chunk_size):
        chunk = source[start : start + chunk_size][column].combine_chunks()
        paths = chunk.field("path").to_pylist()
        blobs = chunk.field("bytes")
        stored = blobs.is_valid().to_pylist()
        absent = chunk.is_null().to_pylist()
        for k, path in enumerate(paths):
            if absent[k] or (path is None and not stored[k]):
                why = "the cell holds no image"
            elif stored[k]:
                why = image_problem(io.BytesIO(blobs[k].as_py()), deep=True) if deep else None
            elif "://" in path:
                why = None  # remote: read, and checked, only when decoded
            else:
                why = image_problem(path, deep=deep)
            if why:
                bad[start + k] = (None if absent[k] else path, why)
    return bad


def drop_unreadable(
    split: datasets.Dataset,
    column: str,
    where: str,
    split_name: str,
    row: Callable[[int], str],
    skip: bool,
    skipped: dict[str, str],
) -> datasets.Dataset:
    """Raise on unreadable images, or (with `skip`) leave them out and add them to `skipped`."""
    bad = unreadable_rows(split, column, deep=skip)
    if not bad:
        return split
    shown = some(
        f"{row(i)} {path!r}: {why}" if path else f"{row(i)}: {why}"
        for i, (path, why) in bad.items()
    )
    if not skip:
        raise DataError(
            f"{len(bad)} of {len(split)} images of {where} cannot be read: {shown}. Replace or "
            f"delete these files, or {SKIP_HINT}."
        )
    if len(bad) == len(split):
        raise DataError(
            f"none of the {len(split)} images of {where} can be read: {shown}. Check that the "
            "files are images (open one with PIL.Image.open) and that the paths are right."
        )
    for i, (path, why) in bad.items():
        skipped[path or f"{split_name} row {i}"] = why
    return split.select(np.setdiff1d(np.arange(len(split)), list(bad)))
