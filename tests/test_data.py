"""Tests of ncfinetune.data (sources, tables, labels, subsets, loaders): offline, CPU."""

from __future__ import annotations

import os

import datasets
import numpy as np
import pandas as pd
import PIL.Image
import pytest
import timm
import torch

from ncfinetune.data import (
    ImageTransform,
    TensorCache,
    balanced_subset,
    build_loader,
    build_transforms,
    describe,
    find_columns,
    labels_of,
    load_image_dataset,
    select_classes,
    validation_split,
)
from ncfinetune.data import sources as data_sources
from ncfinetune.errors import DataError

CLASSES = ("cat", "dog", "eel")


@pytest.fixture(scope="module")
def digits():
    return load_image_dataset("digits")


def _write_pngs(root, per_class: int = 4) -> list[tuple[str, str]]:
    """Write per_class tiny grayscale PNGs per class under root/<class>/; return (path, class)."""
    rows = []
    for c, name in enumerate(CLASSES):
        os.makedirs(root / name, exist_ok=True)
        for i in range(per_class):
            pixels = np.full((6, 6), 40 * c + 5 * i, dtype=np.uint8)
            pixels[i, :] = 255  # makes every image distinct
            path = root / name / f"{i}.png"
            PIL.Image.fromarray(pixels).save(path)
            rows.append((str(path.relative_to(root)), name))
    return rows


def _class_counts(ds: datasets.Dataset, column: str = "label") -> np.ndarray:
    return np.bincount(labels_of(ds, column))


# --- loading -------------------------------------------------------------------------------


def test_digits_split_is_stratified(digits):
    assert (len(digits.train), len(digits.test)) == (1437, 360)
    assert digits.class_names == [str(c) for c in range(10)]
    total = _class_counts(digits.train) + _class_counts(digits.test)
    assert np.all(np.abs(_class_counts(digits.test) - 0.2 * total) <= 1)
    image = digits.train[0][digits.image_column]
    assert image.mode == "L" and image.size == (8, 8)
    levels = np.round(np.arange(17) * 255 / 16)  # counts 0..16 scaled to 0..255
    assert np.isin(np.asarray(image), levels).all() and np.asarray(image).max() > 16


def test_digits_split_depends_only_on_seed(digits):
    again = load_image_dataset("digits", seed=0)
    other = load_image_dataset("digits", seed=1)
    assert np.array_equal(again.labels("test"), digits.labels("test"))
    assert np.array_equal(np.asarray(again.test[5]["image"]), np.asarray(digits.test[5]["image"]))
    assert not np.array_equal(other.labels("test"), digits.labels("test"))


@pytest.mark.skipif(
    not os.path.isdir(data_sources.FASHION_MNIST_DIR),
    reason="Fashion-MNIST IDX files absent (apt-get install dataset-fashion-mnist)",
)
def test_fashion_mnist_from_idx_files():
    data = load_image_dataset("fashion_mnist")
    assert (len(data.train), len(data.test)) == (60000, 10000)
    assert data.num_classes == 10 and data.class_names[9] == "Ankle boot"
    assert data.train[0]["label"] == 9  # the first training image is an ankle boot
    assert data.train[0]["image"].size == (28, 28)
    assert describe(data).startswith("fashion_mnist: train 60000, test 10000, 10 classes")


def test_fashion_mnist_missing_files_says_how_to_install(tmp_path, monkeypatch):
    with pytest.raises(DataError, match="apt-get install dataset-fashion-mnist"):
        load_image_dataset("fashion_mnist", data_dir=str(tmp_path))

    def offline(*args, **kwargs):
        raise ConnectionError("no network")

    monkeypatch.setattr(data_sources, "FASHION_MNIST_DIR", str(tmp_path))
    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(DataError, match="apt-get install dataset-fashion-mnist.*data_dir"):
        load_image_dataset("fashion_mnist")


def test_imagefolder(tmp_path):
    _write_pngs(tmp_path, per_class=4)
    data = load_image_dataset(str(tmp_path), test_fraction=0.25)
    assert data.class_names == list(CLASSES)
    assert (len(data.train), len(data.test)) == (9, 3)
    assert _class_counts(data.test).tolist() == [1, 1, 1]
    picked = select_classes(data, [2, 0])  # on-disk (cached) rows take datasets' own path
    assert picked.class_names == ["eel", "cat"]
    assert _class_counts(picked.train).tolist() == [3, 3]


def test_save_to_disk_dict_and_dataset(tmp_path):
    rows = _write_pngs(tmp_path / "img", per_class=4)
    table = {
        "picture": [str(tmp_path / "img" / p) for p, _ in rows],
        "kind": [c for _, c in rows],
    }
    ds = datasets.Dataset.from_dict(table).cast_column("picture", datasets.Image())
    halves = ds.train_test_split(test_size=0.5, seed=0)
    datasets.DatasetDict({"train": halves["train"], "test": halves["test"]}).save_to_disk(
        str(tmp_path / "dd")
    )
    data = load_image_dataset(str(tmp_path / "dd"), label_column="kind")
    assert (data.image_column, data.label_column) == ("picture", "kind")
    assert (len(data.train), len(data.test)) == (6, 6)  # its own test split is kept
    assert data.class_names == list(CLASSES)  # strings -> sorted class ids
    ds.save_to_disk(str(tmp_path / "one"))
    single = load_image_dataset(str(tmp_path / "one"), label_column="kind", test_fraction=0.25)
    assert (len(single.train), len(single.test)) == (9, 3)
    assert isinstance(single.train.features["kind"], datasets.ClassLabel)


@pytest.mark.parametrize("fmt", ["csv", "parquet"])
def test_table_of_relative_paths(tmp_path, fmt):
    rows = _write_pngs(tmp_path / "images", per_class=4)
    frame = pd.DataFrame(
        {"image_path": [f"images/{p}" for p, _ in rows], "label": [c for _, c in rows]}
    )
    path = tmp_path / f"list.{fmt}"
    frame.to_csv(path, index=False) if fmt == "csv" else frame.to_parquet(path)
    data = load_image_dataset(str(path), test_fraction=0.25)
    assert data.image_column == "image_path"
    assert isinstance(data.train.features["image_path"], datasets.Image)
    assert data.train[0]["image_path"].size == (6, 6)
    assert data.class_names == list(CLASSES)


def test_table_with_missing_images_names_them(tmp_path):
    path = tmp_path / "list.csv"
    pd.DataFrame({"image": ["nope/a.png", "nope/b.png"], "label": [0, 1]}).to_csv(path)
    with pytest.raises(DataError, match="2 of 2 image paths.*nope/a.png"):
        load_image_dataset(str(path))


def test_integer_labels_are_renumbered(tmp_path):
    rows = _write_pngs(tmp_path / "img", per_class=3)
    ds = datasets.Dataset.from_dict(
        {
            "image": [str(tmp_path / "img" / p) for p, _ in rows],
            "target": [7, 7, 7, 3, 3, 3, 9, 9, 9],
        }
    ).cast_column("image", datasets.Image())
    ds.save_to_disk(str(tmp_path / "saved"))
    data = load_image_dataset(str(tmp_path / "saved"), test_fraction=1 / 3)
    assert data.class_names == ["3", "7", "9"]
    assert sorted(set(data.labels("train")) | set(data.labels("test"))) == [0, 1, 2]


def test_column_errors_list_the_columns(tmp_path):
    ds = datasets.Dataset.from_dict({"pixels": [[0, 1]] * 4, "y": [0, 1, 0, 1]})
    ds.save_to_disk(str(tmp_path / "saved"))
    with pytest.raises(DataError, match=r"no image column.*pixels.*y"):
        load_image_dataset(str(tmp_path / "saved"))
    with pytest.raises(DataError, match=r"label_column 'lbl' is not a column.*pixels.*y"):
        find_columns(ds.features, label_column="lbl")
    with pytest.raises(DataError, match="no label column"):
        find_columns(ds.features, image_column="pixels")


def test_hub_name_offline_lists_offline_alternatives(monkeypatch):
    def offline(*args, **kwargs):
        raise ConnectionError("Couldn't reach 'someone/cats' on the Hub")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(DataError) as info:
        load_image_dataset("someone/cats")
    message = str(info.value)
    for needed in ("someone/cats", "unreachable", "'digits'", "'fashion_mnist'", "save_to_disk"):
        assert needed in message
    assert ".csv/.parquet" in message


def test_missing_local_path_is_not_sent_to_the_hub(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        load_image_dataset(str(tmp_path / "absent.csv"))


# --- classes and subsets -------------------------------------------------------------------


def test_select_classes_remaps_in_given_order(digits):
    picked = select_classes(digits, [5, 3])
    assert picked.class_names == ["5", "3"] and picked.num_classes == 2
    for split in ("train", "test"):
        expected = np.bincount(digits.labels(split))[[5, 3]]
        assert np.bincount(picked.labels(split)).tolist() == expected.tolist()
    first_five = int(np.flatnonzero(digits.labels("train") == 5)[0])
    first_zero = int(np.flatnonzero(picked.labels("train") == 0)[0])
    assert np.array_equal(
        np.asarray(digits.train[first_five]["image"]), np.asarray(picked.train[first_zero]["image"])
    )
    with pytest.raises(DataError, match=r"unknown ids \[12\].*0\.\.9"):
        select_classes(digits, [1, 12])


def test_balanced_subset_is_balanced_deterministic_and_nested():
    labels = np.repeat(np.arange(5), [30, 40, 25, 50, 60])
    rng = np.random.default_rng(0)
    labels = labels[rng.permutation(labels.size)]
    ten = balanced_subset(labels, per_class=10, seed=1)
    twenty = balanced_subset(labels, per_class=20, seed=1)
    assert np.bincount(labels[ten]).tolist() == [10] * 5
    assert np.array_equal(ten, balanced_subset(labels, per_class=10, seed=1))
    assert not np.array_equal(ten, balanced_subset(labels, per_class=10, seed=2))
    assert np.isin(ten, twenty).all()
    small, large = (balanced_subset(labels, total=t, seed=1) for t in (12, 23))
    assert small.size == 12 and large.size == 23 and np.isin(small, large).all()
    assert set(np.bincount(labels[large]).tolist()) == {4, 5}


def test_balanced_subset_over_ask_names_class_and_maximum():
    labels = np.repeat(np.arange(3), [10, 7, 12])
    with pytest.raises(DataError, match="class 1 has 7 rows but 8.*largest valid per_class is 7"):
        balanced_subset(labels, per_class=8)
    with pytest.raises(DataError, match="largest valid total"):
        balanced_subset(labels, total=28)
    with pytest.raises(DataError, match="exactly one"):
        balanced_subset(labels)


def test_validation_split_stays_outside_the_subset():
    labels = np.repeat(np.arange(4), 50)
    subset = balanced_subset(labels, per_class=10, seed=0)
    train, val = validation_split(labels, 0.25, seed=0, exclude=subset)
    assert not set(val) & set(subset) and not set(train) & set(subset)
    assert not set(train) & set(val)
    assert train.size + val.size + subset.size == labels.size
    assert np.bincount(labels[val]).tolist() == [10] * 4  # 25% of the 40 left per class
    with pytest.raises(DataError, match="fraction"):
        validation_split(labels, 1.5)


def test_validation_split_is_datasets_stratified_split_and_seeded():
    labels = np.repeat(np.arange(4), [30, 41, 25, 57])
    labels = labels[np.random.default_rng(0).permutation(labels.size)]
    train, val = validation_split(labels, 0.3, seed=4)
    assert np.array_equal(np.sort(np.concatenate([train, val])), np.arange(labels.size))
    # stratified: every class gives its share of rows to within one
    assert np.all(np.abs(np.bincount(labels[val]) - 0.3 * np.bincount(labels)) <= 1)
    assert np.array_equal(val, validation_split(labels, 0.3, seed=4)[1])
    assert not np.array_equal(val, validation_split(labels, 0.3, seed=5)[1])
    # the reference: datasets' own split of a ClassLabel column, same seed
    table = datasets.Dataset.from_dict(
        {"row": np.arange(labels.size), "y": labels},
        features=datasets.Features(
            row=datasets.Value("int64"), y=datasets.ClassLabel(num_classes=4)
        ),
    )
    ref = table.train_test_split(test_size=0.3, stratify_by_column="y", seed=4)["test"]["row"]
    assert val.tolist() == sorted(ref)
    assert validation_split(labels, 20, seed=0)[1].size == 20  # an int is a number of rows
    with pytest.raises(DataError, match=r"cannot stratify 3 rows.*only 1 member"):
        validation_split(np.array([0, 0, 1]), 0.5)


# --- transforms and loaders ----------------------------------------------------------------


@pytest.mark.parametrize("name", ["test_resnet", "test_vit"])
def test_transform_makes_rgb_of_the_requested_size(digits, name):
    model = timm.create_model(name, pretrained=False)
    transform = build_transforms(model, image_size=32)
    x = transform(digits.train[0]["image"])
    assert x.shape == (3, 32, 32) and x.dtype == torch.float32
    assert torch.equal(x[0], x[1]) and torch.equal(x[1], x[2])  # grayscale copied to RGB
    assert build_transforms(model, image_size=(24, 40))(digits.train[0]["image"]).shape == (
        3,
        24,
        40,
    )
    augmented = build_transforms(model, image_size=32, augment=True)
    assert augmented(digits.train[0]["image"]).shape == (3, 32, 32)


def test_transform_follows_a_one_channel_model(digits):
    model = timm.create_model("test_resnet", pretrained=False, in_chans=1)
    transform = build_transforms(model, image_size=16)
    assert transform.mode == "L" and transform.mean.numel() == 1
    assert transform(digits.train[0]["image"]).shape == (1, 16, 16)
    with pytest.raises(DataError, match="image_size"):
        build_transforms(model, image_size=0)


def _batches(loader):
    return [(x.clone(), y.clone()) for x, y in loader]


def test_predecoded_and_per_item_loaders_are_identical(digits):
    transform = build_transforms(timm.create_model("test_resnet", pretrained=False), image_size=20)
    rows = balanced_subset(digits.labels("train"), per_class=5, seed=0)
    kw = dict(batch_size=16, shuffle=True, seed=3, indices=rows)
    cached = build_loader(digits.train, transform, **kw)
    per_item = build_loader(digits.train, transform, predecode=False, **kw)
    assert isinstance(cached.dataset, TensorCache)
    assert not isinstance(per_item.dataset, TensorCache)
    a, b = _batches(cached), _batches(per_item)
    assert len(a) == len(b) == 4
    for (xa, ya), (xb, yb) in zip(a, b, strict=True):
        assert xa.shape[1:] == (3, 20, 20) and xa.dtype == torch.float32 and ya.dtype == torch.long
        assert torch.equal(xa, xb) and torch.equal(ya, yb)
    seen = torch.cat([y for _, y in a])
    assert torch.equal(
        seen.sort().values, torch.from_numpy(digits.labels("train")[rows]).sort().values
    )


def test_loader_epochs_are_seeded_and_resumable(digits):
    transform = build_transforms(timm.create_model("test_resnet", pretrained=False), image_size=8)
    loader = build_loader(digits.test, transform, batch_size=64, shuffle=True, seed=0)
    first, second = _batches(loader), _batches(loader)
    assert not torch.equal(first[0][1], second[0][1])  # a new order every epoch
    loader.batch_sampler.sampler.set_epoch(1)
    assert all(torch.equal(x, y) for (x, _), (y, _) in zip(_batches(loader), second, strict=True))
    fixed = build_loader(digits.test, transform, batch_size=64, shuffle=False, drop_last=True)
    assert len(fixed) == len(digits.test) // 64


def test_prepared_shards_shuffle_by_seed_and_epoch_alone(digits):
    """accelerate shards the batch sampler per process; `set_epoch` on the prepared loader must
    reach the sampler, so that a resumed epoch (set directly, no earlier pass) is shuffled as in
    an uninterrupted run, and the shards of 2 processes split the 1-process order."""
    from accelerate.data_loader import prepare_data_loader

    transform = build_transforms(timm.create_model("test_resnet", pretrained=False), image_size=8)

    def shards(num_processes: int, epoch: int, seed: int = 0, earlier: int = 0) -> list:
        out = []
        for rank in range(num_processes):  # one loader per simulated process, as in a launch
            loader = build_loader(digits.test, transform, batch_size=36, shuffle=True, seed=seed)
            shard = prepare_data_loader(
                loader,
                num_processes=num_processes,
                process_index=rank,
                use_seedable_sampler=True,
                data_seed=seed,
            )
            for e in range(earlier):  # epochs run before, in an uninterrupted run
                shard.set_epoch(e)
                list(shard.batch_sampler)
            shard.set_epoch(epoch)
            out.append(list(shard.batch_sampler))
        return out

    (one,) = shards(1, epoch=1)
    assert len(one) == 10 and sorted(sum(one, [])) == list(range(len(digits.test)))
    assert shards(1, epoch=1, earlier=1) == [one]  # resumed == uninterrupted
    assert shards(1, epoch=0) != [one] and shards(1, epoch=1, seed=5) != [one]
    resumed, uninterrupted = shards(2, epoch=1), shards(2, epoch=1, earlier=1)
    assert resumed == uninterrupted == [one[0::2], one[1::2]]


def test_augmenting_transform_is_never_predecoded(digits):
    model = timm.create_model("test_resnet", pretrained=False)
    augment = build_transforms(model, image_size=16, augment=True)
    assert isinstance(augment, ImageTransform) and augment.augment
    loader = build_loader(digits.test, augment, batch_size=32, shuffle=True)
    assert not isinstance(loader.dataset, TensorCache)
    x, y = next(iter(loader))
    assert x.shape == (32, 3, 16, 16) and y.shape == (32,)
    with pytest.raises(DataError, match="augmenting"):
        build_loader(digits.test, augment, batch_size=32, shuffle=False, predecode=True)
    small = build_transforms(model, image_size=16)
    loader = build_loader(digits.test, small, batch_size=8, shuffle=False, max_predecode_bytes=10)
    assert not isinstance(loader.dataset, TensorCache)  # over the size bound


def test_describe_is_one_line(digits):
    line = describe(digits)
    assert "\n" not in line
    assert line.startswith("digits: train 1437, test 360, 10 classes")
