"""Bad dataset inputs get errors that say what was received, what is valid and how to fix it.

Each test builds a tiny dataset in tmp_path (8x8 PNGs, CSV tables); offline, CPU, a few seconds.
"""

from __future__ import annotations

import io
import os

import numpy as np
import pandas as pd
import PIL.Image
import pytest
import torch

from ncfinetune.data import (
    ImageTransform,
    TensorCache,
    build_loader,
    describe,
    load_image_dataset,
    select_classes,
)
from ncfinetune.errors import DataError


def _png(path, value: int = 0) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.full((8, 8), value, dtype=np.uint8)
    pixels[value % 8, :] = 255  # every image distinct
    PIL.Image.fromarray(pixels).save(path)


def _folder(root, classes=("cat", "dog"), per_class: int = 3) -> list[tuple[str, str]]:
    """per_class PNGs in root/<class>/; returns (path relative to root, class) per image."""
    rows = []
    for c, name in enumerate(classes):
        for i in range(per_class):
            _png(root / name / f"{i}.png", 40 * c + i)
            rows.append((f"{name}/{i}.png", name))
    return rows


def _table(tmp_path, rows, name: str = "list.csv", columns=("image_path", "label")) -> str:
    path = tmp_path / name
    pd.DataFrame(list(rows), columns=list(columns)).to_csv(path, index=False)
    return str(path)


def _truncated_jpeg(path) -> None:
    """A JPEG whose header is intact (PIL opens it) but whose pixel data is cut short."""
    pixels = np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    PIL.Image.fromarray(pixels).save(buffer, "JPEG")
    path.write_bytes(buffer.getvalue()[:-400])


def _message(call, *args, **kwargs) -> str:
    with pytest.raises(DataError) as info:
        call(*args, **kwargs)
    return str(info.value)


# --- table paths stay inside the table's folder --------------------------------------------


def test_relative_path_escaping_the_folder_is_refused(tmp_path):
    rows = _folder(tmp_path)
    escape = "../" * 20 + "etc/passwd"  # deeper than tmp_path: resolves to /etc/passwd
    table = _table(tmp_path, [*rows, (escape, "cat")])
    message = _message(load_image_dataset, table)
    for needed in (
        "1 of 7 image paths",
        "row 6 (line 8)",
        f"{escape!r} -> '/etc/passwd'",
        f"outside the table's folder {os.path.realpath(tmp_path)!r}",
        "allow_outside_paths=True",
    ):
        assert needed in message


@pytest.mark.parametrize("kind", ["absolute", "symlink"])
def test_paths_leading_outside_are_refused_unless_allowed(tmp_path, kind):
    rows = _folder(tmp_path / "data")
    _png(tmp_path / "elsewhere" / "x.png", 200)
    if kind == "absolute":
        extra = str(tmp_path / "elsewhere" / "x.png")
    else:  # a link inside the folder whose target lies outside: resolved, so refused
        os.symlink(tmp_path / "elsewhere" / "x.png", tmp_path / "data" / "link.png")
        extra = "link.png"
    table = _table(tmp_path / "data", [*rows, (extra, "dog")])
    message = _message(load_image_dataset, table)
    assert f"row 6 (line 8) {extra!r} -> {str(tmp_path / 'elsewhere' / 'x.png')!r}" in message
    assert "allow_outside_paths=True" in message
    data = load_image_dataset(table, allow_outside_paths=True, test_fraction=0.3)
    assert len(data.train) + len(data.test) == 7


def test_every_outside_row_is_counted_and_the_first_few_shown(tmp_path):
    rows = _folder(tmp_path)
    outside = [(f"../x{i}.png", "cat") for i in range(5)]
    message = _message(load_image_dataset, _table(tmp_path, [*outside, *rows]))
    assert "5 of 11 image paths" in message
    assert "row 0 (line 2) '../x0.png'" in message and "row 2 (line 4)" in message
    assert "'../x3.png'" not in message and "and 2 more" in message


def test_absolute_paths_inside_the_folder_are_fine(tmp_path):
    rows = [(str(tmp_path / p), c) for p, c in _folder(tmp_path)]
    data = load_image_dataset(_table(tmp_path, rows), test_fraction=0.34)
    assert data.class_names == ["cat", "dog"] and not data.skipped


# --- unreadable images ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("content", "reason"),
    [(b"", "empty (0 bytes)"), (b"garbage, not a PNG", "not an image format PIL can read")],
)
def test_unreadable_file_in_a_table_names_row_path_and_skip_option(tmp_path, content, reason):
    rows = _folder(tmp_path)
    (tmp_path / "bad.png").write_bytes(content)
    message = _message(
        load_image_dataset, _table(tmp_path, [*rows[:4], ("bad.png", "dog"), *rows[4:]])
    )
    assert "1 of 7 images of" in message and "list.csv" in message
    assert f"row 4 (line 6) {str(tmp_path / 'bad.png')!r}: " in message and reason in message
    assert "skip_unreadable=True" in message


def test_missing_file_in_a_table_can_be_skipped(tmp_path):
    rows = _folder(tmp_path)
    table = _table(tmp_path, [*rows, ("gone.png", "cat")])
    message = _message(load_image_dataset, table)
    assert "1 of 7 image paths" in message and "row 6 (line 8) 'gone.png'" in message
    assert "skip_unreadable=True" in message
    data = load_image_dataset(table, skip_unreadable=True, test_fraction=0.34)
    assert len(data.train) + len(data.test) == 6
    assert data.skipped == {str(tmp_path / "gone.png"): "the file does not exist"}
    assert describe(data).endswith(f"; skipped 1 unreadable image ({str(tmp_path / 'gone.png')!r})")


def test_unreadable_images_in_a_folder_are_skipped_and_counted(tmp_path):
    _folder(tmp_path, per_class=4)
    (tmp_path / "cat" / "empty.png").write_bytes(b"")
    (tmp_path / "dog" / "junk.png").write_bytes(b"<!DOCTYPE html>")
    _truncated_jpeg(tmp_path / "dog" / "cut.jpg")
    message = _message(load_image_dataset, str(tmp_path))
    assert "2 of 11 images of the 'train' split" in message  # the header check misses the cut
    assert "empty.png" in message and "junk.png" in message and "<!DOCTYPE" in message
    data = load_image_dataset(str(tmp_path), skip_unreadable=True, test_fraction=0.25)
    assert len(data.train) + len(data.test) == 8
    assert sorted(os.path.basename(p) for p in data.skipped) == ["cut.jpg", "empty.png", "junk.png"]
    assert "truncated" in data.skipped[str(tmp_path / "dog" / "cut.jpg")]
    line = describe(data)
    assert "\n" not in line and "; skipped 3 unreadable images (" in line and "cut.jpg" in line


@pytest.mark.parametrize("predecode", [True, False])
def test_image_failing_only_when_decoded_names_its_file(tmp_path, predecode):
    rows = _folder(tmp_path)
    _truncated_jpeg(tmp_path / "cut.jpg")
    data = load_image_dataset(_table(tmp_path, [*rows, ("cut.jpg", "cat")]), test_fraction=0.5)
    split = data.train if str(tmp_path / "cut.jpg") in data.train["image_path"] else data.test
    split = split.cast_column("image_path", split.features["image_path"])
    transform = ImageTransform(
        lambda image: torch.from_numpy(np.array(image.resize((8, 8)))).unsqueeze(0),
        mode="L",
        mean=(0.5,),
        std=(0.5,),
        input_size=(1, 8, 8),
        augment=False,
    )
    with pytest.raises(DataError) as info:
        loader = build_loader(split, transform, batch_size=4, shuffle=False, predecode=predecode)
        assert isinstance(loader.dataset, TensorCache) == predecode
        list(loader)
    message = str(info.value)
    assert str(tmp_path / "cut.jpg") in message and "row " in message
    assert "truncated" in message and "skip_unreadable=True" in message


def test_skipping_every_image_or_a_whole_class_is_an_error(tmp_path):
    for i in range(3):
        (tmp_path / "all" / "cat").mkdir(parents=True, exist_ok=True)
        (tmp_path / "all" / "cat" / f"{i}.png").write_bytes(b"x")
        (tmp_path / "all" / "dog").mkdir(parents=True, exist_ok=True)
        (tmp_path / "all" / "dog" / f"{i}.png").write_bytes(b"x")
    message = _message(load_image_dataset, str(tmp_path / "all"), skip_unreadable=True)
    assert "none of the 6 images" in message
    _folder(tmp_path / "part", classes=("cat", "dog", "eel"))
    for i in range(3):
        (tmp_path / "part" / "eel" / f"{i}.png").write_bytes(b"")
    message = _message(load_image_dataset, str(tmp_path / "part"), skip_unreadable=True)
    assert "classes ['eel']" in message and "no readable images left" in message


# --- one class, empty labels ---------------------------------------------------------------


def test_folder_with_one_class_subfolder(tmp_path):
    _folder(tmp_path, classes=("cat",))
    message = _message(load_image_dataset, str(tmp_path))
    assert f"found 1 class: 'cat' in {str(tmp_path)!r}" in message
    assert ">= 2 classes" in message and "subfolder" in message


def test_folder_with_images_but_no_class_subfolders(tmp_path):
    for i in range(3):
        _png(tmp_path / f"{i}.png", i)
    message = _message(load_image_dataset, str(tmp_path))
    assert f"found 3 images directly in {str(tmp_path)!r}" in message
    assert "no class subfolders" in message and f"{tmp_path}/cat/1.png" in message


def test_folder_mixing_loose_images_and_class_subfolders(tmp_path):
    _folder(tmp_path)
    _png(tmp_path / "stray.png", 9)
    message = _message(load_image_dataset, str(tmp_path))
    assert "different folder depths" in message
    assert "1 directly in it (e.g. 'stray.png')" in message
    assert "6 one folder down (e.g. 'cat/0.png')" in message


def test_table_with_one_class(tmp_path):
    rows = [(p, "cat") for p, _ in _folder(tmp_path)]
    message = _message(load_image_dataset, _table(tmp_path, rows))
    assert "found 1 class: 'cat' (6 rows) in label column 'label'" in message
    assert ">= 2 classes" in message and "label_column=<name>" in message


@pytest.mark.parametrize("blank", ["", "   ", None])
def test_empty_label_cells_name_their_rows(tmp_path, blank):
    rows = _folder(tmp_path)
    rows[1] = (rows[1][0], blank)
    rows[4] = (rows[4][0], blank)
    message = _message(load_image_dataset, _table(tmp_path, rows))
    assert "label column 'label'" in message and "is empty in 2 of 6 rows" in message
    assert "row 1 (line 3); row 4 (line 6)" in message and "fill in" in message


def test_empty_cell_in_a_numeric_label_column(tmp_path):
    rows = [(p, 0 if c == "cat" else 1) for p, c in _folder(tmp_path)]
    rows[2] = (rows[2][0], float("nan"))
    message = _message(load_image_dataset, _table(tmp_path, rows))
    assert "is empty in 1 of 6 rows: row 2 (line 4)" in message


def test_class_selection_must_leave_two_classes(tmp_path):
    _folder(tmp_path, classes=("cat", "dog", "eel"))
    data = load_image_dataset(str(tmp_path), test_fraction=0.34)
    message = _message(select_classes, data, [2])
    assert "1 class ('eel')" in message and ">= 2 classes" in message and "0..2" in message
    assert "repeated ids [1]" in _message(select_classes, data, [1, 0, 1])
    named = select_classes(data, ["eel", "cat"])
    assert named.class_names == ["eel", "cat"]
    message = _message(select_classes, data, ["cta", "dog"])
    assert "unknown class names ['cta']" in message and "did you mean 'cat'" in message


def test_unknown_id_that_is_a_class_name_gets_a_hint(tmp_path):
    rows = [(p, 7 if c == "cat" else 9) for p, c in _folder(tmp_path)]
    data = load_image_dataset(_table(tmp_path, rows), test_fraction=0.34)
    assert data.class_names == ["7", "9"]
    message = _message(select_classes, data, [7, 9])
    assert "unknown ids [7, 9]" in message and "7 is the name of class id 0" in message


# --- other malformed inputs ----------------------------------------------------------------


@pytest.mark.parametrize("content", ["empty", "text"])
def test_folder_without_images(tmp_path, content):
    if content == "text":
        (tmp_path / "cat").mkdir()
        (tmp_path / "cat" / "notes.txt").write_text("hi")
    message = _message(load_image_dataset, str(tmp_path))
    assert f"found no images in {str(tmp_path)!r}" in message
    assert ("cat/notes.txt" in message) == (content == "text")
    assert f"{tmp_path}/cat/1.png" in message


@pytest.mark.parametrize(
    ("text", "needed"),
    [
        ("", "is empty (0 bytes)"),
        ("image_path,label\n", "has a header line but no rows"),
        ("cat/0.png,cat\ndog/0.png,dog\n", "looks like a row"),
        ("image_path,label\ncat/0.png,cat,extra\ndog/0.png,dog\n", "more fields than its header"),
        ("picture,label\ncat/0.png,cat\n", "no image column found"),
        ("image_path,kind\ncat/0.png,cat\n", "no label column found"),
        ("image_path,label\n,cat\ndog/0.png,dog\n", "has no image path in 1 of 2 rows: row 0"),
        ("file,label\n1,cat\n2,dog\n", "holds int64 values, not image paths"),
    ],
)
def test_malformed_tables(tmp_path, text, needed):
    _folder(tmp_path)
    (tmp_path / "list.csv").write_text(text)
    message = _message(load_image_dataset, str(tmp_path / "list.csv"))
    assert needed in message


def test_unknown_column_name_suggests_the_closest(tmp_path):
    table = _table(tmp_path, _folder(tmp_path))
    message = _message(load_image_dataset, table, label_column="lable")
    assert "label_column 'lable' is not a column (did you mean 'label'?)" in message
    assert "image_path (large_string), label (large_string)" in message


def test_repeated_images(tmp_path):
    rows = _folder(tmp_path)
    message = _message(load_image_dataset, _table(tmp_path, [*rows, ("./cat/0.png", "dog")]))
    assert "1 image listed in" in message and "more than once with different labels" in message
    assert "row 0 (line 2) and row 6 (line 8) list 'cat/0.png' as 'cat', 'dog'" in message
    with pytest.warns(UserWarning, match=r"1 row of .* repeat an image.*row 6 \(line 8\) repeats"):
        load_image_dataset(_table(tmp_path, [*rows, ("cat/0.png", "cat")], "again.csv"))


def test_numeric_labels(tmp_path):
    rows = [(p, 1.0 if c == "cat" else 4.0) for p, c in _folder(tmp_path)]
    data = load_image_dataset(_table(tmp_path, rows), test_fraction=0.34)
    assert data.class_names == ["1", "4"]  # whole floats are integer ids
    rows[3] = (rows[3][0], 2.5)
    message = _message(load_image_dataset, _table(tmp_path, rows, "half.csv"))
    assert "not whole (row 3 (line 5): 2.5)" in message and "integer class ids" in message
    mixed = [(p, "cat" if c == "cat" else "2") for p, c in _folder(tmp_path)]
    data = load_image_dataset(_table(tmp_path, mixed, "mixed.csv"), test_fraction=0.34)
    assert data.class_names == ["2", "cat"]  # a column holding any name is all names
