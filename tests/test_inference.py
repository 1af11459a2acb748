"""Evaluate and predict with a tuned folder alone: recipes/eval.py, recipes/predict.py and
ncfinetune.inference (one eval loop: training.predict_batches)."""

import csv
import json
from pathlib import Path

import pytest
import safetensors.torch
import timm
import torch
from test_recipes import finetune

from ncfinetune import data as nd
from ncfinetune import scl_wrap
from ncfinetune.backbones.hub import create_backbone
from ncfinetune.errors import CheckpointError, DataError
from ncfinetune.inference import evaluate, load_tuned_folder, predict
from ncfinetune.recipes import eval as EVAL
from ncfinetune.recipes import predict as PREDICT
from ncfinetune.tuning.checkpoint import read_tuned_config


def local_backbone(folder: Path) -> Path:
    """A recipes/pretrain.py-style folder (backbone.json + backbone.safetensors) of a seeded
    test_resnet: a local backbone whose weights the tuned folder's fingerprint can check."""
    folder.mkdir(parents=True)
    torch.manual_seed(0)
    model = timm.create_model("test_resnet", num_classes=0)
    safetensors.torch.save_file(
        {k: v.contiguous() for k, v in model.state_dict().items()}, folder / "backbone.safetensors"
    )
    cfg = {"input_size": [3, 32, 32], "mean": [0.3] * 3, "std": [0.3] * 3, "crop_pct": 1.0,
           "interpolation": "bilinear", "num_classes": 0}  # fmt: skip
    card = {"architecture": "test_resnet", "model_kwargs": {}, "pretrained_cfg": cfg}
    (folder / "backbone.json").write_text(json.dumps(card))
    return folder


@pytest.fixture(scope="module")
def tuned_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("inference")
    backbone = local_backbone(root / "backbone")
    metrics = finetune("--model", backbone, "--epochs", 1, "--max_steps", 4, "--per_class", 10,
                       "--mixed_precision", "no", "--channels_last", "false",
                       "--output_dir", root / "run")  # fmt: skip
    return root / "run" / "tuned", backbone, metrics


def test_the_tuned_folder_records_its_base_and_rebuilds_from_the_folder_alone(tuned_run):
    tuned_dir, backbone, _ = tuned_run
    meta = read_tuned_config(tuned_dir)
    assert meta["base_model"] == str(backbone)  # as the user passed it
    assert meta["base_model_kwargs"] == {"pretrained": False, "checkpoint": None}
    assert (meta["image_size"], meta["class_names"]) == (32, [str(c) for c in range(10)])
    assert meta["data"]["dataset"] == "digits" and meta["data"]["test_fraction"] == 0.2
    tuned = load_tuned_folder(tuned_dir)  # fingerprint verified against the local backbone
    assert (tuned.method, tuned.block_index) == ("scl", 1)


def test_eval_recipe_reproduces_the_runs_test_accuracy_and_writes_its_report(tuned_run, tmp_path):
    tuned_dir, _, metrics = tuned_run
    result = EVAL.main(["--tuned", str(tuned_dir), "--output_dir", str(tmp_path)])
    saved = json.loads((tmp_path / "evaluation.json").read_text())
    assert saved["num_samples"] == 360 and saved["split"] == "test"  # the run's test split
    assert abs(saved["accuracy"] - metrics["test_accuracy"]) <= 1 / 360 + 1e-9
    confusion = torch.tensor(saved["confusion_matrix"])
    assert confusion.sum() == 360 and confusion.diag().sum() / 360 == pytest.approx(result.accuracy)
    for c, name in enumerate(saved["class_names"]):
        want = (confusion[c, c] / confusion[c].sum()).item()
        assert saved["per_class_accuracy"][name] == pytest.approx(want)
    assert saved["nc1"] is not None and saved["nc1"] > 0
    assert (tmp_path / "confusion_matrix.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    again = evaluate(tuned_dir)  # the Python API: the same numbers
    assert again.accuracy == result.accuracy and again.nc1 == pytest.approx(result.nc1)
    train = EVAL.main(["--tuned", str(tuned_dir), "--split", "train", "--output_dir",
                          str(tmp_path / "train")])  # fmt: skip
    assert train.num_samples == 1437
    with pytest.raises(DataError, match=r"dataset's classes \(0, 1, 2\) are not the model's"):
        EVAL.main(["--tuned", str(tuned_dir), "--classes", "0,1,2", "--output_dir",
                      str(tmp_path / "x")])  # fmt: skip


def test_predict_recipe_writes_a_properly_quoted_csv(tuned_run, tmp_path):
    tuned_dir, _, _ = tuned_run
    data = nd.load_image_dataset("digits")
    images = [data.test[i]["image"] for i in range(5)]
    folder = tmp_path / "images"
    (folder / "sub").mkdir(parents=True)
    names = ['a, "quoted" name.png', "plain.png", "sub/b.png", "été.png", "=cmd|' calc'!A0.png"]
    for name, image in zip(names, images, strict=True):
        image.save(folder / name)
    (folder / "notes.txt").write_text("not an image")
    (folder / ".hidden.png").write_bytes(b"not read")
    out = tmp_path / "out" / "predictions.csv"
    PREDICT.main(["--tuned", str(tuned_dir), "--images", str(folder), "--output", str(out)])
    with open(out, newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    # a cell a spreadsheet would evaluate is written with a leading apostrophe
    assert [r["file"] for r in rows] == sorted("'" + n if n[0] == "=" else n for n in names)
    in_memory = {n: p for n, p in zip(names, predict(tuned_dir, images), strict=True)}
    for r in rows:
        want = in_memory[r["file"].removeprefix("'")]
        assert (r["class"], int(r["class_id"])) == (want.class_name, want.class_id)
        assert float(r["probability"]) == pytest.approx(want.probability, abs=1e-6)
        assert 0.1 <= float(r["probability"]) <= 1  # the argmax of 10 classes
    with pytest.raises(DataError, match="neither a folder nor a file"):
        predict(tuned_dir, tmp_path / "missing")


def test_predict_names_an_unreadable_image_or_leaves_it_out_when_asked(tuned_run, tmp_path):
    tuned_dir, _, _ = tuned_run
    data = nd.load_image_dataset("digits")
    folder = tmp_path / "images"
    folder.mkdir()
    for i in range(2):
        data.test[i]["image"].save(folder / f"{i}.png")
    (folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    with pytest.raises(
        DataError, match=r"cannot read image .*broken.png \(image 2 of 3\).*skip_unreadable"
    ):
        predict(tuned_dir, folder)
    skipped = []
    rows = predict(tuned_dir, folder, skip_unreadable=True, skipped=skipped)
    assert [r.file for r in rows] == ["0.png", "1.png"]
    assert [name for name, _ in skipped] == ["broken.png"]
    out = tmp_path / "p.csv"
    PREDICT.main(["--tuned", str(tuned_dir), "--images", str(folder), "--output", str(out),
                     "--skip_unreadable", "true"])  # fmt: skip
    assert out.read_text().count("\n") == 3  # header + 2 rows


def test_a_folder_without_a_recorded_base_asks_for_one(tuned_run, tmp_path):
    _, backbone, _ = tuned_run
    torch.manual_seed(1)
    plain = timm.create_model("test_resnet", num_classes=3)  # not made by create_backbone
    scl_wrap(plain, 1).save_pretrained(tmp_path / "plain")
    with pytest.raises(CheckpointError, match="does not record its base model.*base_model="):
        load_tuned_folder(tmp_path / "plain")
    torch.manual_seed(1)
    again = load_tuned_folder(
        tmp_path / "plain", base_model=timm.create_model("test_resnet", num_classes=3)
    )
    assert again.block_index == 1
    # create_backbone records how the base was made; save_pretrained writes it by default
    scl_wrap(create_backbone(str(backbone), 3), 1).save_pretrained(tmp_path / "made")
    assert read_tuned_config(tmp_path / "made")["base_model"] == str(backbone)
    assert load_tuned_folder(tmp_path / "made").model.num_classes == 3
