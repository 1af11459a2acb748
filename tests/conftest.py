"""Tiny timm models and synthetic images shared by the tests (offline, CPU)."""

from __future__ import annotations

import pytest
import timm
import torch

# name -> create_model kwargs; image size 32 keeps every forward pass to milliseconds.
TINY = {
    "test_resnet": {},
    "test_vit": {"img_size": 32},
}
# Real architectures, random init, where still cheap at 32 px.
CHEAP = {
    "resnet18": {},
    "vit_tiny_patch16_224": {"img_size": 32},
    "deit_tiny_distilled_patch16_224": {"img_size": 32},
}
NUM_CLASSES = 5
IMAGE_SIZE = 32


def make_model(name: str, seed: int = 0, num_classes: int = NUM_CLASSES) -> torch.nn.Module:
    """A randomly initialised timm model; the same seed gives the same weights."""
    torch.manual_seed(seed)
    kwargs = {**TINY, **CHEAP}.get(name, {})
    return timm.create_model(name, pretrained=False, num_classes=num_classes, **kwargs)


def images(n: int = 8, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, IMAGE_SIZE, IMAGE_SIZE, generator=g)


def labels(n: int = 8, seed: int = 2) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, NUM_CLASSES, (n,), generator=g)


# --- Test tiers ----------------------------------------------------------------------------
# `python -m pytest` runs everything (CI, the README); `python -m pytest -m "not slow"` is the
# fast tier for development. A test is slow when it carries one of the finer markers below (in
# its module, `@pytest.mark.e2e`, or here); each finer marker implies `slow`. The lists below
# mark the slow tests of modules that do not mark themselves, so that the tiers live in one
# place; tests/test_tiers.py checks that every name listed here still exists.
FINER_MARKERS = {
    "e2e": "runs a recipe end to end (a tiny fine-tune, pretrain, selection, eval or predict)",
    "multiprocess": "launches 2 gloo CPU processes with accelerate launch",
    "readme": "runs a README block as written",
    "results": "regenerates the committed benchmark tables from the committed records",
    "subprocess": "starts a fresh Python (about 10 s of imports on 2 cores: torch, timm, evaluate)",
}
# module -> the finer markers of every test in it
SLOW_MODULES: dict[str, tuple[str, ...]] = {
    "test_readme.py": ("readme", "e2e"),
    "test_committed_results.py": ("results",),
    "test_inference.py": ("e2e",),  # its module fixture fine-tunes once for every test
}
E2E, MULTI, SUB = ("e2e",), ("multiprocess",), ("subprocess",)
# module -> {test function name (without parameters): its finer markers}. Left fast on purpose:
# config and error tests that stop before loading data, and the unit tests of each layer.
SLOW_TESTS: dict[str, dict[str, tuple[str, ...]]] = {
    "test_recipes.py": {
        "test_finetune_smoke_writes_metrics_and_loadable_weights": E2E,
        "test_lora_block_recipe_run_saves_and_reloads_its_adapters": E2E,
        "test_prefix_cache_is_automatic_where_legal_and_changes_no_number": E2E,
        "test_prefix_cache_under_bf16_stays_within_bf16_rounding_of_uncached": E2E,
        "test_prefix_cache_true_where_illegal_says_why": E2E,
        "test_fast_defaults_are_recorded_and_can_be_turned_off": E2E,
        "test_compile_flag_compiles_the_training_step_and_saves_plain_weights": E2E,
        "test_interrupt_and_resume_gives_the_same_final_numbers": E2E,
        "test_two_process_block_and_lr_auto_select_once_and_agree": MULTI,
        "test_two_process_interrupt_and_resume_gives_the_same_history": MULTI,
        "test_pretrain_smoke_then_finetune_from_its_checkpoint": E2E,
        "test_pretrain_starts_from_a_pretrained_backbone_of_the_same_architecture": E2E,
        "test_pretrain_distils_from_a_teacher_whose_head_is_a_linear_probe": E2E,
        "test_block_auto_chooses_the_same_everywhere_and_tunes_the_choice": E2E,
        "test_lr_auto_for_full_fine_tuning_and_resume_keeps_the_choice": E2E,
        "test_select_block_recipe_writes_report_and_plot": E2E,
        "test_a_diverged_run_stops_with_an_error_naming_the_lr_and_step_and_saves_nothing": E2E,
        "test_evaluation_test_and_checkpoint_cadence": E2E,
    },
    "test_monitor.py": {
        "test_a_target_too_small_for_the_subsets_says_which_keys_to_lower": E2E,
        "test_monitor_logs_every_epoch_and_keeps_the_best_transferring_backbone": E2E,
        "test_the_monitor_changes_no_weight_and_every_n_epochs_plus_the_last": E2E,
    },
    "test_runs.py": {
        "test_a_run_is_never_started_over_and_resume_alone_reuses_its_config": E2E,
        "test_resume_lists_every_change_that_affects_training": E2E,
        "test_resume_override_trains_the_new_schedule_and_records_it": E2E,
    },
    "test_cli.py": {
        "test_python_m_ncfinetune_finetune_help": SUB,
        "test_errors_exit_2_with_the_message_and_a_traceback_only_with_debug": SUB,
        "test_two_processes_print_a_config_error_once": MULTI,
    },
    "test_select_method.py": {
        "test_finetune_method_auto_records_and_resumes_the_choice": E2E,
        "test_select_recipe_method_auto_prints_and_writes_the_plan": E2E,
    },
    "test_nothing_lost.py": {
        "test_a_run_whose_logits_overflow_with_finite_weights_is_divergence": E2E,
        "test_a_run_killed_after_its_last_checkpoint_finishes_its_outputs_on_resume": E2E,
        "test_a_second_run_on_a_busy_folder_is_refused_and_a_stale_lock_taken_over": E2E,
        "test_an_edited_config_yaml_is_refused_on_resume_naming_each_key": E2E,
        "test_a_corrupt_training_checkpoint_is_refused_before_anything_trains": E2E,
        "test_resume_with_another_launch_is_refused_or_rebuilt_with_the_override": E2E,
    },
    "test_train_length.py": {
        "test_a_small_run_trains_to_the_floor_and_records_its_length": E2E,
        "test_given_epochs_and_max_steps_work_as_given": E2E,
        "test_a_run_that_ends_with_most_of_its_loss_left_warns_with_the_flag": E2E,
    },
    "test_launch.py": {"test_an_accelerator_without_a_setting_takes_the_launchers_choice": SUB},
    "test_plotting.py": {"test_plotting_leaves_the_backend_alone_and_never_imports_pyplot": SUB},
    "test_bad_inputs.py": {
        "test_a_kill_at_any_moment_of_a_save_leaves_a_checkpoint_that_loads": SUB
    },
}


# Tests that launch 2 gloo processes without the multiprocess marker (a README line does); under
# pytest-xdist every such test runs on one worker, one at a time (accelerate's default port).
GLOO_TESTS = {"test_recipes_block_runs_top_to_bottom_and_the_default_prints_the_headline"}
# The longest tests (minutes, most of it fresh interpreters): started first.
FIRST = {
    *GLOO_TESTS,
    "test_two_process_interrupt_and_resume_gives_the_same_history",
    "test_the_installed_cli_runs_the_bundled_default_from_outside_the_repository",
}


def pytest_configure(config):
    """Under pytest-xdist each worker computes with one thread: two workers on two cores, not
    four threads fighting over them (the recipes' subprocesses set their own threads)."""
    import os

    if os.environ.get("PYTEST_XDIST_WORKER"):
        torch.set_num_threads(1)


@pytest.hookimpl(tryfirst=True)  # before `-m` deselects by marker
def pytest_collection_modifyitems(config, items):
    for item in items:
        module = item.path.name
        name = getattr(item, "originalname", item.name)
        for marker in SLOW_MODULES.get(module, ()) + SLOW_TESTS.get(module, {}).get(name, ()):
            item.add_marker(marker)
        if any(item.get_closest_marker(m) for m in FINER_MARKERS):
            item.add_marker("slow")
        if item.get_closest_marker("multiprocess") or name in GLOO_TESTS:
            item.add_marker(pytest.mark.xdist_group("gloo"))
    # the longest tests first, so that pytest-xdist starts them while the short ones fill the
    # other workers (in collection order otherwise: the README block would start last)
    items.sort(key=lambda it: getattr(it, "originalname", it.name) not in FIRST)
