"""The one training loop (fit_batches): gradient accumulation, the partial last group, the
scheduler stepped once per optimizer step, divergence; alone and under an Accelerator."""

import math

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from ncfinetune.errors import ConfigError, TrainingDiverged
from ncfinetune.training import build_cosine_schedule, fit_batches


def fresh_accelerator():
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)
    return Accelerator(cpu=True, mixed_precision="no")


def mlp(seed: int = 0) -> nn.Module:
    """No batch statistics: one step on 2b images equals two accumulated steps on b."""
    torch.manual_seed(seed)
    return nn.Sequential(nn.Flatten(), nn.Linear(12, 16), nn.Tanh(), nn.Linear(16, 3))


def data(n: int = 20, seed: int = 1) -> TensorDataset:
    g = torch.Generator().manual_seed(seed)
    return TensorDataset(
        torch.randn(n, 3, 2, 2, generator=g), torch.randint(0, 3, (n,), generator=g)
    )


def train(batch: int, grad_accum: int, *, accelerate: bool, steps: int, **kw):
    """Two passes over 20 samples (in order); returns (model, lrs of every optimizer step)."""
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.5, momentum=0.9, weight_decay=1e-2)
    sched = build_cosine_schedule(opt, steps, min_lr=0.01)
    loader = DataLoader(data(), batch_size=batch, shuffle=False)
    acc = None
    if accelerate:
        acc = fresh_accelerator()
        model, opt, loader = acc.prepare(model, opt, loader)
    lrs = []
    for _ in range(2):
        fit = fit_batches(model, loader, opt, sched, accelerator=acc, grad_accum=grad_accum, **kw)
        lrs += fit.lrs
    assert all(p.grad is None for p in model.parameters())  # nothing left for the next pass
    return model, lrs, sched


@pytest.mark.parametrize("accelerate", [False, True])
def test_grad_accum_2_of_batch_b_equals_batch_2b_including_the_partial_last_group(accelerate):
    # 20 samples: batches of 6 accumulated in pairs are (6+6), (6+2); batches of 12 are 12, 8
    big, lrs_big, _ = train(12, 1, accelerate=accelerate, steps=4)
    acc2, lrs_acc, sched = train(6, 2, accelerate=accelerate, steps=4)
    assert lrs_acc == lrs_big and len(lrs_acc) == 4  # one scheduler step per optimizer step
    assert sched.get_last_lr()[0] == pytest.approx(0.01)  # the schedule ended where counted
    for a, b in zip(big.parameters(), acc2.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    plain, _, _ = train(6, 1, accelerate=accelerate, steps=8)  # a different update
    assert not torch.allclose(next(plain.parameters()), next(big.parameters()))


def test_max_steps_mid_accumulation_steps_the_partial_group_and_leaves_no_gradient():
    # max_steps=3 batches with grad_accum=2: steps (2 batches) + (1 batch), per pass
    capped, lrs, _ = train(4, 2, accelerate=False, steps=4, max_steps=3)
    assert len(lrs) == 4
    # the same as stepping on 8 then 4 images of the first 12 (batches of 4, in order)
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.5, momentum=0.9, weight_decay=1e-2)
    sched = build_cosine_schedule(opt, 4, min_lr=0.01)
    x, y = data().tensors
    for _ in range(2):
        fit_batches(model, [(x[:8], y[:8]), (x[8:12], y[8:12])], opt, sched)
    for a, b in zip(model.parameters(), capped.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_a_non_finite_loss_raises_naming_the_step_and_its_lr():
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    sched = build_cosine_schedule(opt, 10, min_lr=0.01)
    x, y = data().tensors
    batches = [(x[i : i + 4], y[i : i + 4]) for i in range(0, 20, 4)]
    batches[4] = (torch.full_like(batches[4][0], float("nan")), batches[4][1])  # 5th batch
    with pytest.raises(TrainingDiverged, match="training diverged at lr") as err:
        fit_batches(model, batches, opt, sched, grad_accum=2)  # steps (1,2) (3,4) (5)
    third = 0.01 + 0.49 * (1 + math.cos(math.pi * 2 / 10)) / 2  # the lr after 2 cosine steps
    assert err.value.step == 3 and err.value.lr == pytest.approx(third)
    assert f"lr {err.value.lr:g}" in str(err.value) and "optimizer step 3" in str(err.value)
    assert isinstance(err.value, FloatingPointError)  # what selection and benchmarks catch


def test_grad_accum_is_validated_and_an_accumulating_accelerator_is_refused():
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    sched = build_cosine_schedule(opt, 10)
    with pytest.raises(ConfigError, match="grad_accum must be an int >= 1, got 0"):
        fit_batches(model, [], opt, sched, grad_accum=0)
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)
    acc = Accelerator(cpu=True, gradient_accumulation_steps=2)
    with pytest.raises(ConfigError, match="build it with gradient_accumulation_steps=1"):
        fit_batches(model, [], opt, sched, accelerator=acc)
    AcceleratorState._reset_state(reset_partial_state=True)


def test_the_library_loop_runs_fp32_or_bf16_and_says_so_for_anything_else():
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    sched = build_cosine_schedule(opt, 10)
    loader = DataLoader(data(8), batch_size=4)
    with pytest.raises(
        ConfigError, match=r"precision 'fp16' is not one of no, bf16; .*loss scaler"
    ):
        fit_batches(model, loader, opt, sched, precision="fp16")
    fit = fit_batches(model, loader, opt, sched, precision="bf16")  # CPU bf16 autocast
    assert fit.steps == 2 and torch.isfinite(fit.losses).all()
