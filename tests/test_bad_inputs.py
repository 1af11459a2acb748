"""Bad inputs and faults, one test per kind (issue 16): checkpoint folders that must survive a
kill, loads that must verify what they rebuild, one wrapper per model, files that must never be
unpickled, and recipe settings that must be refused before any data or model is loaded.

Each case asserts the error type and the key words of its message: what was received, what is
valid, how to fix it.
"""

from __future__ import annotations

import copy
import gc
import json
import os
import re
import signal
import subprocess
import sys
import textwrap
import time
import warnings
from pathlib import Path

import pytest
import safetensors.torch
import torch
from conftest import images, make_model
from test_recipes import checkout_env
from test_tuning import train_steps

from ncfinetune import layer_wrap, load_tuned, scl_wrap
from ncfinetune.errors import CheckpointError, ConfigError, NcFinetuneError
from ncfinetune.files import install_folder, staging_folder
from ncfinetune.recipes import eval as EVAL
from ncfinetune.recipes import finetune as FINETUNE
from ncfinetune.recipes import predict as PREDICT
from ncfinetune.recipes import pretrain as PRETRAIN
from ncfinetune.recipes import select as SELECT
from ncfinetune.tuning import lora_block_wrap
from ncfinetune.tuning.checkpoint import CONFIG_NAME, PEFT_WEIGHTS_NAME, WEIGHTS_NAME

ROOT = Path(__file__).resolve().parents[1]


def saved(tmp_path, method="scl", block=1, name="test_resnet", folder="ckpt"):
    tuned = {"scl": scl_wrap, "layer": layer_wrap, "lora-block": lora_block_wrap}[method](
        make_model(name, seed=0), block
    )
    train_steps(tuned)
    path = tuned.save_pretrained(tmp_path / folder)
    return tuned, path


def logits(tuned):
    with torch.no_grad():
        return tuned.eval()(images(4, seed=7))


def rewrite_json(path, change):
    meta = json.loads((path / CONFIG_NAME).read_text())
    change(meta)
    (path / CONFIG_NAME).write_text(json.dumps(meta))


def rewrite_weights(path, change, name=WEIGHTS_NAME, fix_sha=True):
    """Re-save a tensor file after ``change(tensors)``, keeping its metadata; with ``fix_sha``
    the config's hash is updated too (an edit made on purpose, not damage)."""
    from safetensors import safe_open

    file = path / name
    with safe_open(file, framework="pt") as f:
        metadata = f.metadata()
    tensors = safetensors.torch.load_file(file)
    change(tensors)
    safetensors.torch.save_file(tensors, file, metadata)
    if fix_sha:
        import hashlib

        key = "weights_sha256" if name == WEIGHTS_NAME else "peft_adapter_sha256"
        digest = hashlib.sha256(file.read_bytes()).hexdigest()
        rewrite_json(path, lambda m: m.update({key: digest}))


# -- 1. atomic checkpoint folders ---------------------------------------------------------------
KILLER = textwrap.dedent(
    """
    import sys, timm, torch
    sys.path.insert(0, {tests!r})
    from ncfinetune import scl_wrap
    torch.manual_seed(0)
    tuned = scl_wrap(timm.create_model("resnet18", num_classes=5), 4)
    print("ready", flush=True)
    i = 0
    while True:  # every save changes the classifier: old and new checkpoints differ
        i += 1
        with torch.no_grad():
            tuned.model.fc.bias.fill_(float(i))
        tuned.save_pretrained({path!r})
        print(i, flush=True)
    """
)


def test_a_kill_at_any_moment_of_a_save_leaves_a_checkpoint_that_loads(tmp_path):
    import timm

    path = tmp_path / "ckpt"
    script = KILLER.format(tests=str(ROOT / "tests"), path=str(path))
    proc = subprocess.Popen(
        [sys.executable, "-c", script], stdout=subprocess.PIPE, text=True, cwd=tmp_path,
        env=checkout_env(),
    )  # fmt: skip
    assert proc.stdout.readline().strip() == "ready"
    assert proc.stdout.readline().strip() == "1"  # one complete checkpoint exists
    loads = []
    for delay in (0.0, 0.013, 0.029, 0.047, 0.071, 0.11, 0.16):
        time.sleep(delay)
        proc.send_signal(signal.SIGSTOP)  # freeze it mid-save, wherever it is ...
        torch.manual_seed(0)
        base = timm.create_model("resnet18", num_classes=5)
        tuned = load_tuned(path, base)  # ... and the folder must load, old or new
        bias = tuned.model.fc.bias.detach()
        assert bool((bias == bias[0]).all()) and bias[0] >= 1
        loads.append(int(bias[0]))
        proc.send_signal(signal.SIGCONT)
    proc.send_signal(signal.SIGKILL)  # the real kill, wherever it lands
    proc.wait()
    torch.manual_seed(0)
    last = load_tuned(path, timm.create_model("resnet18", num_classes=5))
    assert int(last.model.fc.bias[0]) >= loads[-1]
    # the next save removes what the killed one left beside the folder
    torch.manual_seed(0)
    again = scl_wrap(timm.create_model("resnet18", num_classes=5), 4)
    again.save_pretrained(path)
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".ckpt")] == []


def test_leftovers_of_an_interrupted_save_are_removed_by_the_next(tmp_path):
    _, path = saved(tmp_path)
    dead = tmp_path / ".ckpt.staging-999999999-abcdef12"  # no such process
    dead.mkdir()
    (dead / WEIGHTS_NAME).write_bytes(b"x" * 1000)
    live = staging_folder(path)  # this process's own, in use: kept
    saved(tmp_path)
    assert not dead.exists() and live.exists()


def test_an_old_version_set_aside_by_an_interrupted_swap_still_loads(tmp_path):
    tuned, path = saved(tmp_path)
    os.rename(path, tmp_path / ".ckpt.old-999999999-abcdef12")  # killed between the renames
    with pytest.warns(UserWarning, match="save was interrupted.*previous version"):
        again = load_tuned(path, make_model("test_resnet", seed=0))
    assert torch.equal(logits(again), logits(tuned))


@pytest.mark.parametrize("umask,mode", [(0o022, 0o644), (0o077, 0o600), (0o002, 0o664)])
def test_checkpoint_files_get_the_users_umask(tmp_path, umask, mode):
    old = os.umask(umask)
    try:
        _, path = saved(tmp_path)
    finally:
        os.umask(old)
    modes = {p.name: p.stat().st_mode & 0o777 for p in path.iterdir()}
    assert modes == {WEIGHTS_NAME: mode, CONFIG_NAME: mode}
    assert path.stat().st_mode & 0o777 == (0o777 & ~umask)


def test_saving_into_a_folder_with_other_files_is_refused_and_deletes_nothing(tmp_path):
    (tmp_path / "ckpt").mkdir()
    (tmp_path / "ckpt" / "notes.txt").write_text("mine")
    with pytest.raises(CheckpointError, match=r"holds 1 other entries \(notes.txt\).*new or empty"):
        saved(tmp_path)
    assert (tmp_path / "ckpt" / "notes.txt").read_text() == "mine"


def test_saving_to_a_file_path_is_refused(tmp_path):
    (tmp_path / "ckpt").write_text("x")
    with pytest.raises(CheckpointError, match="exists and is not a directory.*folder path"):
        saved(tmp_path)


def test_non_finite_weights_are_refused_on_save_and_the_old_checkpoint_stays(tmp_path):
    tuned, path = saved(tmp_path)
    before = (path / WEIGHTS_NAME).read_bytes()
    with torch.no_grad():
        tuned.model.fc.weight[0, 0] = float("nan")
    with pytest.raises(CheckpointError, match=r"1 tuned tensors hold NaN.*fc.weight.*diverged"):
        tuned.save_pretrained(path)
    assert (path / WEIGHTS_NAME).read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt"]


def test_install_folder_replaces_a_folder_as_a_whole(tmp_path):
    target = tmp_path / "t"
    for content in ("old", "new"):
        staging = staging_folder(target)
        (staging / content).write_text(content)
        install_folder(staging, target)
    assert [p.name for p in tmp_path.iterdir()] == ["t"]
    assert [p.name for p in target.iterdir()] == ["new"]


# -- 2. verified loads ----------------------------------------------------------------------------
def test_an_edited_method_is_detected_even_when_the_tensors_fit(tmp_path):
    # scl and layer train the same tensors: only the recipe stored in the weights tells them apart
    _, path = saved(tmp_path, method="scl")

    rewrite_json(path, lambda m: m.update(method="layer"))
    with pytest.raises(CheckpointError, match=r"method: 'scl' -> 'layer'.*config was edited"):
        load_tuned(path, make_model("test_resnet", seed=0))


def test_an_edited_block_names_the_change_and_the_tensors(tmp_path):
    _, path = saved(tmp_path, method="layer", block=1)
    rewrite_json(path, lambda m: m.update(block=2))
    with pytest.raises(CheckpointError, match=r"block: 1 -> 2.*Restore the file"):
        load_tuned(path, make_model("test_resnet", seed=0))


def test_weights_without_their_recipe_are_refused(tmp_path):
    _, path = saved(tmp_path)
    tensors = safetensors.torch.load_file(path / WEIGHTS_NAME)
    safetensors.torch.save_file(tensors, path / WEIGHTS_NAME, {"format": "pt"})
    rewrite_weights(path, lambda t: None)  # fix the recorded hash: only the recipe is gone
    with pytest.raises(CheckpointError, match=r"carries no ncfinetune recipe.*Save it again"):
        load_tuned(path, make_model("test_resnet", seed=0))


@pytest.mark.parametrize(
    "change,words",
    [
        (lambda t: t.pop("fc.bias"), r"missing 1: fc.bias"),
        (lambda t: t.update(extra=torch.zeros(2)), r"extra 1: extra"),
        (lambda t: t.update({"fc.bias": torch.zeros(7)}), r"other shape 1: fc.bias \(7,\)"),
    ],
    ids=["removed", "added", "reshaped"],
)
def test_tensor_names_and_shapes_must_be_what_the_config_rebuilds(tmp_path, change, words):
    _, path = saved(tmp_path)
    rewrite_weights(path, change)  # the recipe inside the weights stays: the names decide
    with pytest.raises(CheckpointError, match=r"method 'scl' \(block 1\) on test_resnet.*" + words):
        load_tuned(path, make_model("test_resnet", seed=0))


def test_a_tensor_removed_without_updating_the_hash_is_reported_as_damage(tmp_path):
    _, path = saved(tmp_path)
    rewrite_weights(path, lambda t: t.pop("fc.bias"), fix_sha=False)
    with pytest.raises(CheckpointError, match=r"does not match the SHA-256.*edited or damaged"):
        load_tuned(path, make_model("test_resnet", seed=0))


def test_non_finite_tensors_are_refused_on_load(tmp_path):
    _, path = saved(tmp_path)
    rewrite_weights(path, lambda t: t["fc.weight"].fill_(float("inf")))
    with pytest.raises(CheckpointError, match=r"NaN or infinite values in 1 tensors \(fc.weight\)"):
        load_tuned(path, make_model("test_resnet", seed=0))


def test_a_lora_adapter_with_a_tensor_removed_names_it(tmp_path):
    _, path = saved(tmp_path, method="lora-block", block=1)
    first = sorted(safetensors.torch.load_file(path / PEFT_WEIGHTS_NAME))[0]
    rewrite_weights(path, lambda t: t.pop(first), name=PEFT_WEIGHTS_NAME)
    with pytest.raises(
        CheckpointError, match=rf"LoRA adapter tensors.*missing 1: {re.escape(first)}"
    ):
        load_tuned(path, make_model("test_resnet", seed=0))


@pytest.mark.parametrize(
    "edit,words",
    [
        (lambda m: m.pop("num_classes"), r"required key 'num_classes' is missing"),
        (lambda m: m.update(num_classes="5"), r"'num_classes' must be int, got '5' \(str\)"),
        (lambda m: m.update(num_classes=0), r"'num_classes' must be >= 1, got 0"),
        (lambda m: m.update(block=-1), r"'block' must be an int >= 0 or null, got -1"),
        (lambda m: m.update(block="1"), r"'block' must be an int >= 0 or null, got '1'"),
        (lambda m: m.update(method="foo"), r"'method' 'foo' is not a registered method \(linear"),
        (lambda m: m.update(config=[]), r"'config' must be dict, got \[\] \(list\)"),
        (lambda m: m.update(class_names=["a"]), r"'class_names' has 1 names for num_classes=5"),
        (  # an edited class count blames the config, not the base model
            lambda m: m.update(num_classes=3),
            r"does not describe the weights saved beside it \(weights file -> config: "
            r"num_classes: 5 -> 3\): the config was edited",
        ),
        (lambda m: m.update(skip_norm="yes"), r"'skip_norm' must be true, false or null"),
        (lambda m: m.update(architecture=None), r"'architecture' must be str, got None"),
    ],
)
def test_an_invalid_tuned_config_lists_the_problem_and_the_fix(tmp_path, edit, words):
    _, path = saved(tmp_path)
    rewrite_json(path, edit)
    with pytest.raises(CheckpointError, match=words + r".*Restore the file"):
        load_tuned(path, make_model("test_resnet", seed=0))


@pytest.mark.parametrize(
    "text,words",
    [
        ("{not json", r"is not valid JSON.*damaged"),
        ("[1, 2]", r"holds a JSON list, not an object"),
        ('{"format": "other", "format_version": 1}', r"its 'format' is 'other', expected"),
        ('{"format": "ncfinetune-tuned", "format_version": 99}', r"format version 99.*Upgrade"),
    ],
)
def test_a_config_that_is_not_a_tuned_config_says_so(tmp_path, text, words):
    _, path = saved(tmp_path)
    (path / CONFIG_NAME).write_text(text)
    with pytest.raises(CheckpointError, match=words):
        load_tuned(path, make_model("test_resnet", seed=0))


def test_a_folder_without_a_checkpoint_names_what_to_pass(tmp_path):
    with pytest.raises(CheckpointError, match=r"tuned_config.json is missing.*save_pretrained"):
        load_tuned(tmp_path, make_model("test_resnet", seed=0))


# -- 3. one model, one wrapper --------------------------------------------------------------------
def test_wrapping_a_model_a_live_wrapper_owns_is_an_error_that_says_what_to_do():
    model = make_model("test_resnet")
    first = scl_wrap(model, 1)
    with pytest.raises(
        ConfigError, match=r"already wrapped by a live TunedModel \(SCL FT.*block 1"
    ):
        layer_wrap(model, 2)
    with pytest.raises(ConfigError, match=r"copy.deepcopy\(model\).*del tuned"):
        scl_wrap(model, 1)
    assert first.block_index == 1 and first.model.layer2[0].conv1.weight.requires_grad


def test_a_copy_or_a_dropped_wrapper_frees_the_model():
    model = make_model("test_resnet")
    first = scl_wrap(model, 1)
    second = layer_wrap(copy.deepcopy(model), 2)  # a copy is a new model
    assert second.block_index == 2 and first.block_index == 1
    del first
    gc.collect()
    again = layer_wrap(model, 2)
    assert again.block_index == 2
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(n.startswith(("layer3.", "fc.")) for n in trainable)


def test_a_model_a_lora_wrapper_changed_cannot_be_wrapped_again():
    model = make_model("test_resnet")
    lora_block_wrap(model, 1)
    gc.collect()  # the wrapper is gone, its LoRA layers are not
    with pytest.raises(ConfigError, match=r"LoRA layers into it; wrap a fresh model"):
        scl_wrap(model, 1)


def test_a_failed_wrap_does_not_claim_the_model():
    model = make_model("test_resnet")
    with pytest.raises(NcFinetuneError, match="block 99 is out of range"):
        scl_wrap(model, 99)
    assert scl_wrap(model, 1).block_index == 1


# -- 8. nothing is ever unpickled -----------------------------------------------------------------
class Evil:
    """Unpickling this creates the marker file: a loader that unpickles fails the test."""

    marker = ""

    def __reduce__(self):
        return (Path.touch, (Path(self.marker),))


def evil_file(tmp_path, name="evil.pt"):
    marker = tmp_path / "UNPICKLED"
    Evil.marker = str(marker)
    torch.save({"state_dict": {"x": torch.zeros(1)}, "payload": Evil()}, tmp_path / name)
    return tmp_path / name, marker


def test_the_torch_floor_loads_weights_only_by_default(tmp_path):
    import pickle

    spec = (ROOT / "pyproject.toml").read_text()
    floor = re.search(r'"torch>=([\d.]+)"', spec).group(1)
    assert tuple(int(v) for v in floor.split(".")[:2]) >= (2, 6)  # weights_only=True default
    path, marker = evil_file(tmp_path)
    with pytest.raises(pickle.UnpicklingError, match="Weights only load failed"):
        torch.load(path)
    assert not marker.exists()


def test_every_torch_load_in_the_repository_passes_weights_only_true():
    calls = []
    for folder in ("ncfinetune", "recipes", "benchmarks", "tools"):
        for file in (ROOT / folder).rglob("*.py"):
            text = file.read_text()
            assert not re.search(r"^\s*import pickle|pickle\.loads?\(", text, re.M), file
            for m in re.finditer(r"torch\.load\(([^()]|\([^()]*\))*\)", text):
                calls.append((file.name, m.group(0)))
    assert calls, "the scan found no torch.load call: the pattern is broken"
    unsafe = [c for c in calls if "weights_only=True" not in c[1]]
    assert unsafe == []


def test_a_pickled_backbone_checkpoint_is_refused_without_running_it(tmp_path):
    from ncfinetune.backbones.hub import create_backbone

    path, marker = evil_file(tmp_path)
    with pytest.raises(Exception, match="(?i)weights.only|unpickl"):
        create_backbone("test_resnet", 3, checkpoint=str(path))
    assert not marker.exists()


def test_a_training_state_with_a_pickle_is_refused_and_custom_pickles_are_ignored(tmp_path):
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    from ncfinetune.recipes.engine import build_schedule, load_training_state, save_training_state

    AcceleratorState._reset_state(reset_partial_state=True)
    acc = Accelerator(cpu=True, mixed_precision="no")
    model = torch.nn.Linear(2, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    model, opt = acc.prepare(model, opt)
    sched, _ = build_schedule(acc, opt, [0, 1], epochs=1, min_lr=0.0)
    state = save_training_state(acc, tmp_path / "ck", 1, [], scheduler=sched)
    evil, marker = evil_file(tmp_path)
    os.replace(evil, state / "custom_checkpoint_0.pkl")
    # the manifest written with the checkpoint refuses any file it did not list
    with pytest.raises(ConfigError, match=r"custom_checkpoint_0.pkl was not written with it"):
        load_training_state(acc, state, sched)
    manifest = (state / "manifest.json").read_bytes()
    (state / "manifest.json").unlink()  # a checkpoint without one: the pickle itself is refused
    with pytest.raises(
        ConfigError, match=r"pickled objects \(custom_checkpoint_0.pkl\).*not unpickle"
    ):
        load_training_state(acc, state, sched)
    assert not marker.exists()
    (state / "custom_checkpoint_0.pkl").unlink()
    load_training_state(acc, state, sched)  # the state as written loads
    (state / "manifest.json").write_bytes(manifest)
    load_training_state(acc, state, sched)
    evil, marker = evil_file(tmp_path)
    optimizer_file = next(p for p in state.iterdir() if p.name.startswith("optimizer"))
    os.replace(evil, optimizer_file)
    with pytest.raises(ConfigError, match=rf"{optimizer_file.name} differs from what was written"):
        load_training_state(acc, state, sched)
    (state / "manifest.json").unlink()
    with pytest.raises(Exception, match="(?i)weights.only"):
        load_training_state(acc, state, sched)
    assert not marker.exists()


# -- 5. recipes validate before they load ---------------------------------------------------------
# a dataset that would fail to load: the config error must come first
NO_DATA = ["--dataset", "/nonexistent/data"]


def a_file(tmp_path):
    (tmp_path / "f").write_text("x")
    return str(tmp_path / "f")


@pytest.mark.parametrize(
    "recipe,args,words",
    [
        (
            FINETUNE,
            lambda t: ["--output_dir", a_file(t)],
            r"output_dir .*/f is a file, not a folder",
        ),
        (
            FINETUNE,
            lambda t: ["--output_dir", a_file(t) + "/run"],
            r"cannot be created: .*/f is a file",
        ),
        (FINETUNE, lambda t: ["--seed", "-1"], r"seed must be in \[0, 2\*\*32 - 1\].*got -1"),
        (FINETUNE, lambda t: ["--seed", str(2**32)], r"seed must be in \[0, 2\*\*32 - 1\]"),
        (
            FINETUNE,
            lambda t: ["--tracker", "tensorbord"],
            r"tracker 'tensorbord' is not one of none, .*tensorboard",
        ),
        (FINETUNE, lambda t: ["--tracker", "all"], r"tracker 'all' is not one of"),
        (FINETUNE, lambda t: ["--max_steps", "0"], r"max_steps must be >= 1 or null, got 0"),
        (FINETUNE, lambda t: ["--epochs", "0"], r"epochs must be >= 1 or null, got 0"),
        (
            FINETUNE,
            lambda t: ["--method", "linear", "--block", "auto"],
            r"block 'auto' needs a one-block method",
        ),
        (
            PRETRAIN,
            lambda t: ["--bundle_as", "mine"],
            r"bundle_as \('mine'\) was removed.*tools/bundle_backbone.py",
        ),
        (PRETRAIN, lambda t: ["--output_dir", a_file(t)], r"output_dir .* is a file"),
        (PRETRAIN, lambda t: ["--seed", "-5"], r"seed must be in"),
        (PRETRAIN, lambda t: ["--max_steps", "0"], r"max_steps must be >= 1"),
        (PRETRAIN, lambda t: ["--distill_alpha", "0"], r"distill_alpha must be in \(0, 1\]"),
        (
            PRETRAIN,
            lambda t: ["--model_kwargs", "{num_classes: 3}"],
            r"model_kwargs may not set \['num_classes'\]",
        ),
        (PRETRAIN, lambda t: ["--model_kwargs", "[1, 2]"], r"expected a mapping .*depth: 6"),
        (SELECT, lambda t: ["--output_dir", a_file(t)], r"output_dir .* is a file"),
        (SELECT, lambda t: ["--seed", "-1"], r"seed must be in"),
    ],
)
def test_recipes_refuse_bad_settings_before_loading_anything(tmp_path, recipe, args, words):
    with pytest.raises(ConfigError, match=words):
        recipe.main([*NO_DATA, *args(tmp_path)])


def test_eval_and_predict_check_their_paths_before_loading(tmp_path):
    with pytest.raises(ConfigError, match=r"tuned .*/nope is not a folder: pass the tuned/"):
        EVAL.main(["--tuned", str(tmp_path / "nope")])
    (tmp_path / "tuned").mkdir()
    (tmp_path / "imgs").mkdir()
    with pytest.raises(ConfigError, match=r"output .* is a folder: pass a file path"):
        PREDICT.main(["--tuned", str(tmp_path / "tuned"), "--images", str(tmp_path / "imgs"),
                         "--output", str(tmp_path)])  # fmt: skip
    with pytest.raises(ConfigError, match=r"images .*/none does not exist"):
        PREDICT.main(["--tuned", str(tmp_path / "tuned"), "--images", str(tmp_path / "none")])


def test_a_method_setting_with_no_effect_warns_once_and_is_recorded_as_unset():
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        cfg = FINETUNE.load_config(["--method", "linear", "--block", "3", "--lora_skip", "true"])
    said = [str(w.message) for w in caught if "no effect" in str(w.message)]
    assert len(said) == 1
    assert re.search(r"method 'linear' has no block, lora_skip setting.*block=None", said[0])
    assert (cfg.tuning.block, cfg.tuning.lora_skip) == (None, False)  # what config.yaml will record
    cfg = FINETUNE.load_config(["--method", "scl", "--block", "3"])
    assert cfg.tuning.block == "3"


def test_tracker_none_is_accepted():
    cfg = FINETUNE.load_config(["--tracker", "none"])
    assert cfg.run.tracker is None  # "none" on the command line is null


# -- the Python API: wrong types and values --------------------------------------------------------
@pytest.mark.parametrize(
    "call,error,words",
    [
        (
            lambda: scl_wrap("resnet18", 1),
            ConfigError,
            r"must be a timm model \(torch nn.Module\), got str 'resnet18'.*create_backbone",
        ),
        (
            lambda: scl_wrap(make_model("test_resnet"), 1, skip_norm="yes"),
            ConfigError,
            r"skip_norm must be True, False or None \(auto\), got str 'yes'",
        ),
        (
            lambda: scl_wrap(make_model("test_resnet"), 1.5),
            ConfigError,
            r"block must be an int index or a module name, got float 1.5",
        ),
        (
            lambda: scl_wrap(make_model("test_resnet"), "layer9"),
            NcFinetuneError,
            r"'layer9' is not a block of test_resnet.*0 layer1.0",
        ),
        (
            lambda: scl_wrap(make_model("test_resnet"), 1, bn="x"),
            ConfigError,
            r"bn='x' is not one of update, frozen",
        ),
    ],
)
def test_wrappers_reject_wrong_arguments_with_what_is_valid(call, error, words):
    with pytest.raises(error, match=words):
        call()


@pytest.mark.parametrize("num_classes", [0, -1, 2.0, True])
def test_create_backbone_needs_a_positive_class_count(num_classes):
    from ncfinetune.backbones.hub import create_backbone

    with pytest.raises(
        ConfigError, match=rf"num_classes must be an int >= 1.*got \w+ {num_classes!r}"
    ):
        create_backbone("test_resnet", num_classes)


def test_layerwise_nc1_of_an_empty_loader_says_so():
    from ncfinetune import layerwise_nc1

    with pytest.raises(NcFinetuneError, match=r"loader yielded no batches.*at least 2 classes"):
        layerwise_nc1(make_model("test_resnet"), [])


@pytest.mark.parametrize(
    "text,words",
    [
        (
            "epochs: 3\nlr: 0.1\nepochs: 30\n",
            r"key 'epochs' is given twice \(lines 1 and 3\); keep one",
        ),
        ("- 1\n- 2\n", r"must be a mapping of key: value, got a YAML list"),
        ("method: [scl\n", r"is not valid YAML"),
    ],
)
def test_a_config_file_with_a_repeated_key_or_another_shape_is_refused(tmp_path, text, words):
    (tmp_path / "c.yaml").write_text(text)
    with pytest.raises(ConfigError, match=words):
        FINETUNE.load_config(["--config", str(tmp_path / "c.yaml")])


def test_a_prefix_only_wrapper_neither_checks_nor_claims_ownership():
    from ncfinetune.tuning import TunedModel
    from ncfinetune.tuning.methods import method_config

    model = make_model("test_resnet")
    shared = [TunedModel(model, method_config("layer", block=b), owns_model=False) for b in (1, 2)]
    owner = layer_wrap(model, 3)  # the read-only wrappers do not own it
    assert [t.block_index for t in shared] == [1, 2] and owner.block_index == 3


def test_saving_through_a_symlinked_folder_replaces_the_folder_and_keeps_the_link(tmp_path):
    _, real = saved(tmp_path, folder="real")
    (tmp_path / "link").symlink_to(real)
    tuned, _ = saved(tmp_path, method="layer", folder="link")
    assert (tmp_path / "link").is_symlink() and json.loads((real / CONFIG_NAME).read_text())[
        "method"
    ] == "layer"
    assert torch.equal(
        logits(load_tuned(tmp_path / "link", make_model("test_resnet", seed=0))), logits(tuned)
    )
