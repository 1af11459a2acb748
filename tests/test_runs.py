"""A run's output folder: never started over, resumed only with the config it trained with
(resume_override: epochs and lr, with the schedule rebuilt), a global batch size."""

import math
import re

import pytest
import torch
from test_recipes import FINETUNE, finetune, fresh_accelerate

from ncfinetune.errors import ConfigError
from ncfinetune.recipes.runs import retarget_schedule


def run(*args):
    """The recipe with these arguments only (no TINY_RUN): as a user types them."""
    fresh_accelerate()
    return FINETUNE.main(list(map(str, args)))


def test_a_run_is_never_started_over_and_resume_alone_reuses_its_config(tmp_path):
    args = ["--epochs", 2, "--max_steps", 1, "--per_class", 4, "--global_batch_size", 8,
            "--mixed_precision", "no", "--output_dir", tmp_path]  # fmt: skip
    assert finetune(*args, "--stop_after", 1)["stopped"]
    with pytest.raises(ConfigError, match=r"already holds an unfinished run \(checkpoint after "
                       r"epoch 1\); a run never overwrites another.*--resume to continue it"):  # fmt: skip
        finetune(*args)
    m = run("--output_dir", tmp_path, "--resume")  # the saved config.yaml supplies the rest
    assert (m["epochs"], m["method"], m["lr"], len(m["history"])) == (2, "scl", 0.05, 2)
    # batch_size (per process) follows the global batch: 8 images per update / 1 process
    assert (m["batch_size_per_process"], m["global_batch_size"]) == (8, 8)
    assert m["mixed_precision_from"] == "recipe" and m["resume_overrides"] == []
    with pytest.raises(ConfigError, match=r"already holds a finished run \(metrics.json\).*new "
                       r"--output_dir, or --resume --resume_override epochs --epochs N"):  # fmt: skip
        finetune(*args)
    with pytest.raises(ConfigError, match="nothing to train .*: it finished all 2 epochs"):
        run("--output_dir", tmp_path, "--resume")


def test_resume_lists_every_change_that_affects_training(tmp_path):
    args = ["--epochs", 2, "--max_steps", 1, "--per_class", 4, "--output_dir", tmp_path]
    finetune(*args, "--stop_after", 1)
    with pytest.raises(ConfigError) as e:
        finetune(*args, "--resume", "--method", "full", "--block", "null", "--lr", 0.02,
                 "--batch_size", 32, "--min_lr", 0.001, "--nc1", "false")  # fmt: skip
    msg = str(e.value)
    assert "in 5 key(s) that change training:" in msg
    for line in ("method: scl -> full", "block: 1 -> null", "lr: 0.05 -> 0.02",
                 "batch_size: 64 -> 32", "min_lr: 0.0001 -> 0.001"):  # fmt: skip
        assert f"  - {line}\n" in msg
    assert "nc1" not in msg and "stop_after" not in msg  # they do not change what is trained
    assert "add --resume_override lr." in msg
    with pytest.raises(ConfigError, match="resume_override batch_size: only epochs, lr"):
        finetune(*args, "--resume", "--resume_override", "batch_size")
    with pytest.raises(ConfigError, match="resume_override only applies with --resume"):
        finetune(*args, "--resume_override", "lr")
    new = tmp_path / "new"
    where = re.escape(str(new / "checkpoints"))
    with pytest.raises(ConfigError, match=f"looked for {where}/epoch_N.*no run was started"):
        finetune("--output_dir", new, "--resume")


def test_resume_override_trains_the_new_schedule_and_records_it(tmp_path):
    common = ["--max_steps", 2, "--per_class", 4, "--mixed_precision", "no"]
    finetune(*common, "--epochs", 2, "--output_dir", tmp_path / "a", "--stop_after", 1)
    m = run("--output_dir", tmp_path / "a", "--resume", "--resume_override", "epochs,lr",
            "--epochs", 3, "--lr", 0.02)  # fmt: skip
    assert (m["lr"], m["epochs"], len(m["history"])) == (0.02, 3, 3)
    assert m["resume_overrides"] == [
        {"at_epoch": 1, "epochs": {"saved": 2, "now": 3}, "lr": {"saved": 0.05, "now": 0.02}}
    ]
    # after the resume the lr follows a 3-epoch schedule from 0.02, as a run planned that way
    planned = finetune(*common, "--epochs", 3, "--lr", 0.02, "--output_dir", tmp_path / "b")
    assert [h["lr"] for h in m["history"][1:]] == pytest.approx(
        [h["lr"] for h in planned["history"][1:]], rel=1e-12
    )
    assert m["final_lr"] == pytest.approx(1e-4)


def test_retarget_schedule_continues_as_the_new_cosine():
    def cosine(lr, t_max):
        p = torch.nn.Parameter(torch.zeros(1))
        opt = torch.optim.SGD([p], lr=lr, momentum=0.9)
        return opt, torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=t_max, eta_min=1e-3)

    opt, sched = cosine(0.1, 10)
    for _ in range(4):
        opt.step()
        sched.step()
    opt2, sched2 = cosine(0.05, 20)  # the current config: lr 0.05 over 20 steps
    fresh = sched2.state_dict()
    opt2.load_state_dict(opt.state_dict())  # what load_state does
    sched2.load_state_dict(sched.state_dict())
    retarget_schedule(sched2, fresh)

    def closed(t):
        return 1e-3 + (0.05 - 1e-3) * (1 + math.cos(math.pi * t / 20)) / 2

    assert opt2.param_groups[0]["lr"] == pytest.approx(closed(4))
    for t in range(5, 21):
        opt2.step()
        sched2.step()
        assert opt2.param_groups[0]["lr"] == pytest.approx(closed(t))
    assert opt2.param_groups[0]["initial_lr"] == 0.05


def test_pretrain_never_overwrites_a_pretrained_backbone(tmp_path):
    from test_recipes import PRETRAIN

    (tmp_path / "backbone.json").write_text("{}")
    with pytest.raises(ConfigError, match="already holds a pretrained backbone.*new --output_dir"):
        PRETRAIN.main(["--model", "test_resnet", "--output_dir", str(tmp_path)])
