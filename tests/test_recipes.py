"""End-to-end recipe runs on tiny models and bundled data (CPU, offline)."""

import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import safetensors.torch
import torch
import yaml
from conftest import make_model

from ncfinetune import load_tuned
from ncfinetune.backbones.hub import create_backbone
from ncfinetune.errors import BlockError, ConfigError, DataError, TrainingDiverged
from ncfinetune.recipes import finetune as FINETUNE
from ncfinetune.recipes import finetune_setup
from ncfinetune.recipes import pretrain as PRETRAIN
from ncfinetune.recipes.config import parse_config

ROOT = Path(__file__).resolve().parents[1]

TINY_RUN = [
    "--model",
    "test_resnet",
    "--image_size",
    "32",
    "--block",
    "1",
    "--batch_size",
    "64",
    "--tracker",
    "none",
    "--lr",
    "0.05",
    # the old default length (10 epochs) keeps these runs short; the floor has its own tests
    # (test_train_length.py), where a later --min_steps overrides this one
    "--min_steps",
    "0",
]


def checkout_env(**extra: str) -> dict[str, str]:
    """The environment for a child process that imports this checkout's ncfinetune (not
    whatever the interpreter has installed), plus ``extra``."""
    path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p)
    return {**os.environ, "PYTHONPATH": path, **extra}


def fresh_accelerate():
    """accelerate keeps one AcceleratorState per process (mixed precision, dynamo backend):
    reset it so that each in-process recipe run configures its own, as a new launch would."""
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)


def finetune(*args):
    fresh_accelerate()
    return FINETUNE.main([*TINY_RUN, *map(str, args)])


def strict_json(path: Path) -> dict:
    def refuse(name):
        raise ValueError(f"{path} holds a bare {name}: not strict JSON")

    return json.loads(path.read_text(), parse_constant=refuse)


def test_finetune_smoke_writes_metrics_and_loadable_weights(tmp_path):
    m = finetune(
        "--epochs", 2, "--max_steps", 2, "--output_dir", tmp_path, "--tracker", "tensorboard"
    )
    saved = strict_json(tmp_path / "metrics.json")
    assert saved["test_samples_evaluated"] == saved["num_test"] == 360  # digits: 20% of 1797
    assert saved["num_train"] == 1437 and len(saved["history"]) == 2
    assert saved["trainable_percent"] == pytest.approx(100 * 37_354 / 373_658)
    assert m["nc1_train"] > 0 and 0 <= m["test_accuracy"] <= 1
    tuned = load_tuned(
        tmp_path / "tuned", make_model("test_resnet", num_classes=10, seed=99), verify_base=False
    )
    assert tuned.method == "scl" and tuned.block_index == 1
    assert (tmp_path / "config.yaml").is_file()
    assert saved["cpu_threads"] == len(os.sched_getaffinity(0))  # auto: all cores, 1 process
    assert not list(tmp_path.rglob("*.tmp"))
    # 2 epochs x 2 batches, one step each: the cosine ends at min_lr on the last step
    assert (saved["optimizer_steps"], saved["final_lr"]) == (4, pytest.approx(1e-4))
    assert saved["num_val"] == 0 and saved["val_accuracy"] is None  # no rows outside the split
    # TensorBoard: the loss and lr of every optimizer step, the epoch's numbers at its last step
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(tmp_path / "finetune"))
    events.Reload()

    def series(tag):
        return [(e.step, e.value) for e in events.Scalars(tag)]

    assert (
        [s for s, _ in series("train/loss")] == [s for s, _ in series("train/lr")] == [1, 2, 3, 4]
    )
    assert series("train/lr")[0][1] == pytest.approx(0.05)  # step 1 trains at the configured lr
    assert [s for s, _ in series("train_loss")] == [s for s, _ in series("nc1_train")] == [2, 4]
    assert series("test_accuracy") == [(4, pytest.approx(m["test_accuracy"]))]  # once, at the end


def test_lora_block_recipe_run_saves_and_reloads_its_adapters(tmp_path):
    m = finetune(
        "--method", "lora-block", "--lora_rank", 2, "--lora_skip", "true",
        "--epochs", 1, "--max_steps", 2, "--output_dir", tmp_path,
    )  # fmt: skip
    assert 0 <= m["test_accuracy"] <= 1
    tuned = load_tuned(
        tmp_path / "tuned", make_model("test_resnet", num_classes=10, seed=99), verify_base=False
    )
    assert (tuned.method, tuned.block_index, tuned.config.lora_rank) == ("lora-block", 1, 2)
    assert tuned.config.uses_skip
    names = safetensors.torch.load_file(tmp_path / "tuned" / "tuned.safetensors").keys()
    adapter = safetensors.torch.load_file(tmp_path / "tuned" / "adapter_model.safetensors").keys()
    assert any(".lora_A." in n for n in adapter) and not any("lora_" in n for n in names)
    assert not any(n.endswith("conv1.weight") for n in [*names, *adapter])


@pytest.mark.parametrize("model,extra", [("test_vit", []), ("test_resnet", ["--bn", "frozen"])])
def test_prefix_cache_is_automatic_where_legal_and_changes_no_number(tmp_path, model, extra):
    # in fp32; under bf16 autocast the cache keeps the prefix's fp32 outputs, while the uncached
    # path recomputes them in bf16 (see the bf16 test below)
    args = ["--model", model, *extra, "--epochs", 2, "--max_steps", 3, "--per_class", 10]
    args += ["--mixed_precision", "no"]
    cached = finetune(*args, "--output_dir", tmp_path / "a")
    plain = finetune(*args, "--prefix_cache", "false", "--output_dir", tmp_path / "b")
    a = json.loads((tmp_path / "a" / "metrics.json").read_text())
    b = json.loads((tmp_path / "b" / "metrics.json").read_text())
    assert (a["prefix_cache"], b["prefix_cache"]) == (True, False)
    assert cached["test_accuracy"] == plain["test_accuracy"]
    assert cached["nc1_train"] == pytest.approx(plain["nc1_train"], rel=1e-4)
    for ra, rb in zip(a["history"], b["history"], strict=True):
        assert ra["train_loss"] == pytest.approx(rb["train_loss"], rel=1e-5)


def test_prefix_cache_under_bf16_stays_within_bf16_rounding_of_uncached(tmp_path):
    args = ["--model", "test_vit", "--epochs", 2, "--max_steps", 3, "--per_class", 10]
    args += ["--mixed_precision", "bf16"]
    cached = finetune(*args, "--output_dir", tmp_path / "a")
    plain = finetune(*args, "--prefix_cache", "false", "--output_dir", tmp_path / "b")
    assert (cached["prefix_cache"], plain["prefix_cache"]) == (True, False)
    assert cached["mixed_precision"] == plain["mixed_precision"] == "bf16"
    for ra, rb in zip(cached["history"], plain["history"], strict=True):
        assert ra["train_loss"] == pytest.approx(rb["train_loss"], rel=0.02)
    assert abs(cached["test_accuracy"] - plain["test_accuracy"]) <= 0.05


def test_prefix_cache_true_where_illegal_says_why(tmp_path):
    with pytest.raises(ConfigError, match="prefix_cache: true, but BatchNorm .* bn='frozen'"):
        finetune("--prefix_cache", "true", "--epochs", 1, "--output_dir", tmp_path)
    m = finetune("--epochs", 1, "--max_steps", 1, "--output_dir", tmp_path)  # auto: falls back
    assert json.loads((tmp_path / "metrics.json").read_text())["prefix_cache"] is False
    assert 0 <= m["test_accuracy"] <= 1


def test_fast_defaults_are_recorded_and_can_be_turned_off(tmp_path, monkeypatch):
    args = ["--epochs", 1, "--max_steps", 2, "--per_class", 10]
    fast = finetune(*args, "--output_dir", tmp_path / "a")
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "bf16")  # as `accelerate launch` exports
    plain = finetune(
        *args, "--mixed_precision", "no", "--channels_last", "false", "--output_dir", tmp_path / "b"
    )
    # no mixed_precision key: accelerate's choice, fp32 when nothing chose (no launcher here)
    assert (fast["mixed_precision"], fast["mixed_precision_from"]) == ("no", "accelerate")
    assert plain["mixed_precision_from"] == "recipe"  # the recipe's key wins over accelerate's
    assert (fast["channels_last"], plain["channels_last"]) == (True, False)  # auto: conv net
    assert (plain["mixed_precision"], fast["compile"]) == ("no", "no")
    # both train and evaluate the same rows; bf16 rounds the same computation differently
    assert fast["test_samples_evaluated"] == plain["test_samples_evaluated"] == 360
    loss_a, loss_b = fast["history"][0]["train_loss"], plain["history"][0]["train_loss"]
    assert loss_a == pytest.approx(loss_b, rel=0.05)
    vit = finetune("--model", "test_vit", *args, "--output_dir", tmp_path / "c")
    assert vit["channels_last"] is False  # auto: off for a ViT (one convolution)
    assert (vit["mixed_precision"], vit["mixed_precision_from"]) == ("bf16", "accelerate")


def test_compile_flag_compiles_the_training_step_and_saves_plain_weights(tmp_path):
    import torch._dynamo

    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    args = ["--epochs", 1, "--max_steps", 2, "--per_class", 10, "--mixed_precision", "no"]
    m = finetune(*args, "--compile", "aot_eager", "--output_dir", tmp_path / "a")
    assert m["compile"] == "aot_eager"
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] >= 1
    eager = finetune(*args, "--output_dir", tmp_path / "b")
    assert m["history"][0]["train_loss"] == pytest.approx(
        eager["history"][0]["train_loss"], rel=1e-3
    )
    names = safetensors.torch.load_file(tmp_path / "a" / "tuned" / "tuned.safetensors").keys()
    assert names and not any("_orig_mod" in n for n in names)
    torch._dynamo.reset()


def test_interrupt_and_resume_gives_the_same_final_numbers(tmp_path):
    args = ["--epochs", 3, "--max_steps", 4, "--per_class", 12, "--seed", 3]
    full = finetune(*args, "--output_dir", tmp_path / "a")
    first = finetune(*args, "--output_dir", tmp_path / "b", "--stop_after", 1)
    assert first["stopped"] and len(first["history"]) == 1
    resumed = finetune(*args, "--output_dir", tmp_path / "b", "--resume")
    for key in ("test_accuracy", "nc1_train"):
        assert resumed[key] == full[key]
    assert [h["train_loss"] for h in resumed["history"]] == [
        h["train_loss"] for h in full["history"]
    ]
    wa = safetensors.torch.load_file(tmp_path / "a" / "tuned" / "tuned.safetensors")
    wb = safetensors.torch.load_file(tmp_path / "b" / "tuned" / "tuned.safetensors")
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


def test_two_process_block_and_lr_auto_select_once_and_agree(tmp_path):
    """With 2 gloo processes the main process selects and the other trains its choice; the
    test split is counted once (one launch checks both: each costs ~15 s of imports)."""
    env = checkout_env(ACCELERATE_USE_CPU="true", OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes",
           "2", "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
           str(ROOT / "recipes" / "finetune.py"), *TINY_RUN, "--block", "auto", "--lr", "auto",
           "--per_class", "6", "--epochs", "1", "--max_steps", "2", "--output_dir",
           str(tmp_path)]  # fmt: skip
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("chosen: block") == 1  # selected once, on the main process
    saved = json.loads((tmp_path / "metrics.json").read_text())
    chosen = json.loads((tmp_path / "selection.json").read_text())
    assert saved["num_processes"] == 2
    assert (saved["block"], saved["lr"]) == (chosen["block"], chosen["lr"])
    assert chosen["lr"] in (0.1, 0.03)
    # no mixed_precision key: what the launcher was given (--mixed_precision no) runs
    assert (saved["mixed_precision"], saved["mixed_precision_from"]) == ("no", "accelerate")
    # OMP_NUM_THREADS=1 from the environment is overridden: cores split between the 2 processes
    assert saved["cpu_threads"] == max(1, len(os.sched_getaffinity(0)) // 2)
    # 360 test images in batches of 64 over 2 processes: the last round is padded, and the
    # padding must not be counted.
    assert saved["test_samples_evaluated"] == saved["num_test"] == 360


def launch_two_processes(*args, check: bool = True) -> subprocess.CompletedProcess:
    """Run recipes/finetune.py on 2 gloo CPU processes (as `accelerate launch` would); with
    ``check``, assert it succeeded."""
    env = checkout_env(ACCELERATE_USE_CPU="true", OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes",
           "2", "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
           str(ROOT / "recipes" / "finetune.py"), *TINY_RUN, *map(str, args)]  # fmt: skip
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 or not check, proc.stderr[-3000:]
    return proc


def test_two_process_interrupt_and_resume_gives_the_same_history(tmp_path):
    """Each process trains its shard of epoch 2's shuffle after a resume, not epoch 1's again:
    batches of 8 from 60 images, 3 per process and epoch (max_steps) accumulated 2 + 1 into 2
    optimizer steps (grad_accum 2), so the order decides the loss. The cosine schedule is
    counted on the prepared loader: it ends at min_lr after 2 x 2 optimizer steps."""
    args = ["--epochs", 2, "--max_steps", 3, "--grad_accum", 2, "--per_class", 6,
            "--batch_size", 8, "--seed", 3, "--mixed_precision", "no", "--cpu_threads", 1,
            "--min_lr", 0.001]  # fmt: skip
    launch_two_processes(*args, "--output_dir", tmp_path / "a")
    launch_two_processes(*args, "--output_dir", tmp_path / "b", "--stop_after", 1)
    assert not (tmp_path / "b" / "metrics.json").exists()  # stopped after epoch 1
    # resumed by one process: refused (the schedule counts steps of the 2-process batch)
    with pytest.raises(ConfigError, match=r"trained with 2 process\(es\) and a global batch of "
                       r"32; this launch has 1 process\(es\) and a global batch of 16"):  # fmt: skip
        finetune(*args, "--output_dir", tmp_path / "b", "--resume", "true")
    launch_two_processes(*args, "--output_dir", tmp_path / "b", "--resume")
    full, resumed = (json.loads((tmp_path / d / "metrics.json").read_text()) for d in "ab")
    assert resumed["num_processes"] == full["num_processes"] == 2

    def numbers(rows):  # every recorded number but the throughput (wall-clock timing)
        return [{k: v for k, v in r.items() if k != "train_images_per_s"} for r in rows]

    assert numbers(resumed["history"]) == numbers(full["history"])
    assert full["history"][0]["train_loss"] != full["history"][1]["train_loss"]
    # epochs x ceil(min(batches per process, max_steps) / grad_accum) = 2 x ceil(3 / 2)
    assert (full["optimizer_steps"], full["steps_per_epoch"]) == (4, 2)
    assert full["final_lr"] == resumed["final_lr"] == pytest.approx(0.001)
    assert [r["step"] for r in full["history"]] == [2, 4]
    assert full["num_val"] == 100 and full["val_accuracy"] is not None  # auto: rows outside
    wa = safetensors.torch.load_file(tmp_path / "a" / "tuned" / "tuned.safetensors")
    wb = safetensors.torch.load_file(tmp_path / "b" / "tuned" / "tuned.safetensors")
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


def test_bad_config_lists_every_problem():
    with pytest.raises(ConfigError) as e:
        finetune(
            "--method",
            "adapter",
            "--bn",
            "sometimes",
            "--epochs",
            0,
            "--per_class",
            5,
            "--train_size",
            50,
            "--cpu_threads",
            0,
            "--mixed_precision",
            "fp8",
            "--compile",
            "fast",
        )
    msg = str(e.value)
    for part in (
        "method 'adapter' is not one of",
        "bn 'sometimes'",
        "epochs must be >= 1",
        "give per_class or train_size, not both",
        "cpu_threads must be >= 1 or null (auto), got 0",
        "mixed_precision 'fp8' is not one of auto, no, fp16, bf16",
        "compile 'fast' is not a torch.compile backend; use one of inductor, aot_eager",
    ):
        assert part in msg


def test_bad_block_and_dataset_errors(tmp_path, monkeypatch):
    with pytest.raises(BlockError, match="block 9 is out of range for test_resnet"):
        finetune("--block", 9, "--output_dir", tmp_path)
    with pytest.raises(DataError, match="Valid keys|valid|classes"):
        finetune("--classes", "3,42", "--output_dir", tmp_path)
    import datasets

    def offline(*args, **kwargs):
        raise ConnectionError("Couldn't reach the Hugging Face Hub")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(DataError, match="digits"):
        finetune("--dataset", "no_such_dataset_xyz", "--output_dir", tmp_path)


def test_every_config_file_loads():
    files = sorted((ROOT / "recipes" / "configs").rglob("*.yaml"))
    assert len(files) == 11, [f.name for f in files]
    for f in files:
        cls = PRETRAIN.PretrainConfig if "pretrain" in f.parts else FINETUNE.FinetuneConfig
        text = f.read_text()
        assert text.startswith("#") and "\nrun:\n" in text  # explained, written by section
        args = ["--config", str(f)]
        start = yaml.safe_load(text).get("backbone", {}).get("init_from")
        if start and not (Path(start) / "backbone.safetensors").is_file():
            # a second stage whose first stage is rebuilt, not committed: says what is missing
            with pytest.raises(ConfigError, match=rf"(?s)1 problem.*{start}"):
                parse_config(cls, args)
            args += ["--init_from", "null"]
        assert parse_config(cls, args).run.output_dir


def test_pretrain_smoke_then_finetune_from_its_checkpoint(tmp_path):
    fresh_accelerate()
    PRETRAIN.main(
        [
            "--model",
            "test_resnet",
            "--dataset",
            "digits",
            "--classes",
            "0,1,2",
            "--epochs",
            "1",
            "--max_steps",
            "2",
            "--batch_size",
            "32",
            "--nc1_samples",
            "100",
            "--output_dir",
            str(tmp_path / "pt"),
        ]
    )
    card = json.loads((tmp_path / "pt" / "backbone.json").read_text())
    assert card["source"]["classes"] == [0, 1, 2] and len(card["history"]) == 1
    assert card["final_lr"] == pytest.approx(0.0, abs=1e-12)  # the cosine's end (min_lr 0)
    weights = safetensors.torch.load_file(tmp_path / "pt" / "backbone.safetensors")
    assert all(v.dtype == torch.float16 for v in weights.values()) and "fc.weight" not in weights
    model = create_backbone(
        "test_resnet", 4, checkpoint=str(tmp_path / "pt" / "backbone.safetensors")
    )
    state = model.state_dict()
    assert all(torch.equal(state[k], v.to(state[k].dtype)) for k, v in weights.items())
    assert model.get_classifier().out_features == 4


def test_pretrain_starts_from_a_pretrained_backbone_of_the_same_architecture(tmp_path):
    fresh_accelerate()
    base = ["--model", "test_resnet", "--dataset", "digits", "--classes", "0,1,2", "--epochs", "1",
            "--max_steps", "2", "--batch_size", "32", "--nc1_samples", "100"]  # fmt: skip
    PRETRAIN.main(base + ["--output_dir", str(tmp_path / "first")])
    first = json.loads((tmp_path / "first" / "backbone.json").read_text())
    fresh_accelerate()
    # lr 1e-12: the second run's weights are the first's (fp16) unless it started elsewhere
    PRETRAIN.main(
        base
        + [
            "--init_from",
            str(tmp_path / "first"),
            "--lr",
            "1e-12",
            "--optimizer",
            "adamw",
            "--weight_decay",
            "0",
            "--output_dir",
            str(tmp_path / "second"),
        ]  # fmt: skip
    )
    second = json.loads((tmp_path / "second" / "backbone.json").read_text())
    assert second["pretrained_cfg"]["mean"] == first["pretrained_cfg"]["mean"]
    assert second["training"]["init_from"] == str(tmp_path / "first")
    card_md = (tmp_path / "second" / "backbone.md").read_text()
    assert f"Trained from the weights of `{tmp_path / 'first'}`" in card_md
    a = safetensors.torch.load_file(tmp_path / "first" / "backbone.safetensors")
    b = safetensors.torch.load_file(tmp_path / "second" / "backbone.safetensors")
    convs = [k for k in a if k.endswith("conv1.weight")]
    assert convs and all(torch.equal(a[k], b[k]) for k in convs)
    with pytest.raises(
        ConfigError, match=r"init_from .* is test_resnet with \{\}, this run builds test_vit"
    ):
        PRETRAIN.main(
            [
                "--model",
                "test_vit",
                "--init_from",
                str(tmp_path / "first"),
                "--dataset",
                "no_such_dataset",
                "--output_dir",
                str(tmp_path / "x"),
            ]  # fmt: skip
        )
    with pytest.raises(ConfigError, match="init_from 'nowhere' is neither a bundled backbone"):
        PRETRAIN.main(
            [
                "--init_from",
                "nowhere",
                "--dataset",
                "no_such_dataset",
                "--output_dir",
                str(tmp_path / "x"),
            ]  # fmt: skip
        )


def test_pretrain_distils_from_a_teacher_whose_head_is_a_linear_probe(tmp_path, monkeypatch):
    fresh_accelerate()
    seen = []
    original = PRETRAIN.Targets.__iter__

    def spy(self):  # the targets the student trains on
        for x, y in original(self):
            seen.append(y)
            yield x, y

    monkeypatch.setattr(PRETRAIN.Targets, "__iter__", spy)
    args = ["--model", "test_vit", "--img_size", "32", "--model_kwargs", "{depth: 2}",
            "--dataset", "digits", "--classes", "0,1,2", "--epochs", "1", "--max_steps", "2",
            "--batch_size", "16", "--nc1_samples", "60", "--teacher", "resnet18_fmnist04",
            "--distill_alpha", "0.25", "--output_dir", str(tmp_path / "pt")]  # fmt: skip
    PRETRAIN.main(args)
    card = json.loads((tmp_path / "pt" / "backbone.json").read_text())
    assert card["model_kwargs"] == {"img_size": 32, "depth": 2}
    # the card's command is quoted so that it pastes back into a shell: the same arguments
    assert card["command"].startswith("accelerate launch recipes/pretrain.py ")
    assert shlex.split(card["command"])[3:] == args and "'{depth: 2}'" in card["command"]
    teacher = card["teacher"]
    assert teacher["backbone"] == "resnet18_fmnist04" and teacher["distill_alpha"] == 0.25
    assert teacher["source_test_accuracy"] > 0.9  # a probe on its features separates digits 0-2
    y = seen[0]
    assert y.shape == (16, 3) and torch.allclose(y.sum(1), torch.ones(16))
    assert bool((y.max(1).values >= 0.75).all())  # (1 - alpha) of the label plus the teacher's
    assert "distilled from `resnet18_fmnist04`" in (tmp_path / "pt" / "backbone.md").read_text()
    assert create_backbone(str(tmp_path / "pt"), 3).blocks.__len__() == 2


def test_unknown_model_and_offline_hub_errors(monkeypatch):
    with pytest.raises(ConfigError, match="unknown model 'resnet_nope'"):
        create_backbone("resnet_nope", 3)
    import timm

    def offline(*args, **kwargs):
        raise OSError("We couldn't connect to the hub")

    monkeypatch.setattr(timm.models._builder, "load_pretrained", offline)
    with pytest.raises(ConfigError, match="Offline, use a bundled backbone"):
        create_backbone("resnet18", 3, pretrained=True)


def test_block_auto_chooses_the_same_everywhere_and_tunes_the_choice(tmp_path):
    """select_block (API), recipes/select_block.py and finetune.py --block auto: one code path,
    the same defaults, the same choice on the same data and seed; with lr auto as well."""
    import ncfinetune
    from ncfinetune import data as nd

    data_args = ["--model", "test_resnet", "--image_size", "32", "--per_class", "6",
                 "--seed", "1"]  # fmt: skip
    from ncfinetune.recipes import select as recipe

    cfg = parse_config(recipe.SelectConfig, data_args)
    torch.manual_seed(1)  # as the recipes do: the new classifier's init follows the seed
    data = cfg.load_data()
    model = cfg.load_model(data.num_classes)
    rows = nd.balanced_subset(data.labels("train"), per_class=6, seed=1)
    tf = nd.build_transforms(model, image_size=32)
    for lr_args, api_kw in (([], {}), (["--lr", "auto"], {"lr": "auto"})):
        out = tmp_path / f"ft{len(lr_args)}"
        m = finetune(*data_args, "--block", "auto", *lr_args, "--epochs", 1, "--max_steps", 1,
                     "--output_dir", out)  # fmt: skip
        from_ft = json.loads((out / "block_selection.json").read_text())
        assert (out / "block_selection.png").is_file()
        assert m["block"] == from_ft["chosen"] and m["selection"]["rule"] == "probe"
        # lr auto: the run trains at the chosen lr; else at its own (0.05), probes at 0.03
        assert m["lr"] == (from_ft["lr"] if lr_args else 0.05)
        from_recipe = recipe.main([*data_args, *lr_args, "--output_dir", str(out / "sel")])
        from_api = ncfinetune.selection.select_block_on_split(
            model, data, tf, rows, seed=1, **api_kw
        )
        for sel in (from_recipe, from_api):
            assert (sel.chosen, sel.lr) == (from_ft["chosen"], from_ft["lr"])
            got = {(r.index, k): v["accuracy"] for r in sel.rows for k, v in r.probes.items()}
            want = {
                (r["index"], k): v["accuracy"]
                for r in from_ft["rows"]
                for k, v in r["probes"].items()
            }
            assert got == want and got
    # the 60-image training subset only: 30% held out (18), never the 360 test images; one
    # inference pass + 2 candidates (test_resnet within 10%) x 2 lrs x (10 steps of 32 + 18)
    assert from_ft["images_processed"] == 60 + 2 * 2 * (10 * 32 + 18)


def test_lr_auto_for_full_fine_tuning_and_resume_keeps_the_choice(tmp_path):
    args = ["--method", "full", "--block", "null", "--lr", "auto", "--per_class", 5,
            "--epochs", 2, "--max_steps", 1, "--output_dir", tmp_path]  # fmt: skip
    first = finetune(*args, "--stop_after", 1)
    assert first["stopped"]
    saved = json.loads((tmp_path / "selection.json").read_text())
    assert saved["lr"] in (0.1, 0.03, 0.01) and saved["block"] is None
    (tmp_path / "selection.json").rename(tmp_path / "kept.json")
    with pytest.raises(ConfigError, match="selection.json, written when the choice was made"):
        finetune(*args, "--resume", "true")
    (tmp_path / "kept.json").rename(tmp_path / "selection.json")
    m = finetune(*args, "--resume", "true")
    assert m["lr"] == saved["lr"] and m["selection"] is None  # reused, not chosen again


def test_select_block_recipe_writes_report_and_plot(tmp_path, capsys):
    from ncfinetune.recipes import select as recipe

    sel = recipe.main(
        [
            "--model",
            "test_resnet",
            "--image_size",
            "32",
            "--per_class",
            "5",
            "--candidates",
            "0,layer4.0",
            "--max_trainable_percent",
            "null",
            "--rule",
            "curve",
            "--lr",
            "0.05",
            "--output_dir",
            str(tmp_path),
        ]
    )
    assert [r.index for r in sel.rows] == [0, 3] and sel.chosen in (0, 3)
    assert sel.chosen == min(sel.rows, key=lambda r: r.nc1_block).index
    assert json.loads((tmp_path / "block_selection.json").read_text())["chosen"] == sel.chosen
    out = capsys.readouterr().out
    assert "chosen: block" in out
    # the select command reports R@1 and the MLP gap of every candidate (--diagnostics true)
    assert "R@1" in out and "MLP gap" in out and all(r.recall_at_1 is not None for r in sel.rows)
    with pytest.raises(ConfigError, match="rule 'best' is not one of middle, curve, linear"):
        recipe.main(["--rule", "best"])


def test_a_diverged_run_stops_with_an_error_naming_the_lr_and_step_and_saves_nothing(tmp_path):
    args = ["--lr", "1e12", "--batch_size", 16, "--epochs", 2, "--max_steps", 3,
            "--per_class", 5, "--output_dir", tmp_path]  # fmt: skip
    with pytest.raises(TrainingDiverged) as err:  # an ncfinetune error: the CLI exits with 2
        finetune(*args)
    assert err.value.step == 3 and "the loss became nan at optimizer step 3 (epoch 1/2)" in str(
        err.value
    )
    assert str(err.value).startswith(f"training diverged at lr {err.value.lr:g}: ")
    # nothing written after the first non-finite step (epoch 1): only the config of the start
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.yaml"]


def test_evaluation_test_and_checkpoint_cadence(tmp_path):
    m = finetune("--epochs", 4, "--max_steps", 1, "--per_class", 5, "--eval_every", 2,
                 "--test_every", 3, "--save_every", 2, "--keep_last", 2,
                 "--output_dir", tmp_path)  # fmt: skip
    kinds = [("val_accuracy" in r, "nc1_train" in r, "test_accuracy" in r) for r in m["history"]]
    assert kinds == [(False,) * 3, (True, True, False), (False, False, True), (True,) * 3]
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["epoch_2", "epoch_4"]
    assert (m["eval_every"], m["save_every"], m["optimizer_steps"]) == (2, 2, 4)
    # validation by default: 100 rows of the training split outside the 50-image subset
    assert m["num_val"] == 100 and 0 <= m["val_accuracy"] <= 1
    labels = parse_config(FINETUNE.FinetuneConfig, TINY_RUN).load_data().labels("train")
    train, val = finetune_setup.validation_rows(labels, np.arange(0, 1437, 10), None, 0)
    assert len(val) == 144 and not set(val) & set(train)  # as many as the subset (144 > 100)
    assert finetune_setup.validation_rows(labels, None, None, 0) == (None, None)
