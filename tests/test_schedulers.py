"""Tests for schedulers.py: closed-form values against direct formulas, validation, resume."""

from __future__ import annotations

import io
import math
import warnings
from pathlib import Path

import pytest
import torch

from schedulers import CosineAnnealingWarmupRestarts, LinearWarmupCosineLR, warmup_cosine_factor

BASE_LR = 3e-4


def reference_lr(step: int, base: float, warmup: int, total: int, min_r: float, start_r: float) -> float:
    """Schedule written out independently of the module, for comparison."""
    if step < warmup:
        lo = start_r * base
        return lo + (base - lo) * step / warmup
    if step >= total:
        return min_r * base
    t = (step - warmup) / (total - warmup)
    lo = min_r * base
    return lo + (base - lo) * (1 + math.cos(math.pi * t)) / 2


def make_opt(lrs: tuple[float, ...] = (BASE_LR,)) -> torch.optim.Optimizer:
    """An AdamW with one tiny parameter per group."""
    groups = [{"params": [torch.nn.Parameter(torch.zeros(2))], "lr": lr} for lr in lrs]
    return torch.optim.AdamW(groups)


def run_steps(opt: torch.optim.Optimizer, sched: LinearWarmupCosineLR, n: int) -> list[list[float]]:
    """Do n (optimizer.step, scheduler.step) updates, returning the LRs in use at each update."""
    used = []
    for _ in range(n):
        used.append([g["lr"] for g in opt.param_groups])
        opt.step()
        sched.step()
    return used


@pytest.mark.parametrize(
    "warmup,total,min_r,start_r", [(10, 100, 0.0, 0.0), (10, 100, 0.1, 0.01), (0, 50, 0.05, 0.0), (7, 7, 0.2, 0.5), (1, 3, 0.0, 0.0)]
)
def test_factor_matches_reference_everywhere(warmup: int, total: int, min_r: float, start_r: float) -> None:
    """warmup_cosine_factor equals the written-out schedule at every step and past the end."""
    for step in range(total + 20):
        want = reference_lr(step, 1.0, warmup, total, min_r, start_r)
        assert warmup_cosine_factor(step, warmup, total, min_r, start_r) == pytest.approx(want, abs=1e-12)


def test_key_points_of_the_schedule() -> None:
    """Step 0, end of warm-up, middle of the decay, last step, and after the last step."""
    warmup, total, min_r, start_r = 10, 110, 0.1, 0.02
    opt = make_opt()
    sched = LinearWarmupCosineLR(opt, warmup_steps=warmup, total_steps=total, min_lr_ratio=min_r, warmup_start_ratio=start_r)
    used = run_steps(opt, sched, total + 5)
    lr = [u[0] for u in used]
    assert lr[0] == pytest.approx(start_r * BASE_LR, rel=1e-12)
    assert lr[5] == pytest.approx(BASE_LR * (start_r + (1 - start_r) * 0.5), rel=1e-12)
    assert lr[warmup] == pytest.approx(BASE_LR, rel=1e-12)  # peak exactly at the end of warm-up
    assert max(lr) == pytest.approx(BASE_LR, rel=1e-12)
    mid = warmup + (total - warmup) // 2
    assert lr[mid] == pytest.approx(BASE_LR * (min_r + (1 - min_r) * 0.5), rel=1e-12)
    last = total - 1
    assert lr[last] == pytest.approx(reference_lr(last, BASE_LR, warmup, total, min_r, start_r), rel=1e-12)
    assert min_r * BASE_LR < lr[last] < min_r * BASE_LR * 1.01
    for step in range(total, total + 5):
        assert lr[step] == pytest.approx(min_r * BASE_LR, rel=1e-12)
    # Monotone up during warm-up, monotone down after it.
    assert all(a < b for a, b in zip(lr[:warmup], lr[1 : warmup + 1]))
    assert all(a >= b for a, b in zip(lr[warmup:total], lr[warmup + 1 : total + 1]))
    assert sched.get_last_lr()[0] == pytest.approx(min_r * BASE_LR)


def test_each_param_group_scaled_from_its_own_base() -> None:
    """Two groups with different base LRs follow the same factor."""
    opt = make_opt((1e-3, 1e-5))
    sched = LinearWarmupCosineLR(opt, warmup_steps=4, total_steps=20, min_lr_ratio=0.0)
    used = run_steps(opt, sched, 25)
    for step, (a, b) in enumerate(used):
        f = reference_lr(step, 1.0, 4, 20, 0.0, 0.0)
        assert a == pytest.approx(1e-3 * f, abs=1e-15)
        assert b == pytest.approx(1e-5 * f, abs=1e-17)


def test_no_float_drift_over_many_steps() -> None:
    """After 200k updates the LR equals the closed form exactly (no accumulation)."""
    opt = make_opt()
    total = 200_000
    sched = LinearWarmupCosineLR(opt, warmup_steps=1000, total_steps=total, min_lr_ratio=0.0)
    target = 150_000
    # step() without optimizer.step() warns once; the value path is the same.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        for _ in range(target):
            sched.step()
    assert opt.param_groups[0]["lr"] == BASE_LR * warmup_cosine_factor(target, 1000, total)


def test_state_dict_round_trip_continues_identically(tmp_path: Path) -> None:
    """Saving mid-schedule (through torch.save, weights_only load) and resuming gives the same LRs."""
    kwargs = dict(warmup_steps=5, total_steps=40, min_lr_ratio=0.05, warmup_start_ratio=0.1)
    opt_a = make_opt((1e-3, 2e-4))
    sched_a = LinearWarmupCosineLR(opt_a, **kwargs)
    run_steps(opt_a, sched_a, 17)
    path = tmp_path / "state.pt"
    torch.save({"optimizer": opt_a.state_dict(), "scheduler": sched_a.state_dict()}, path)
    reference = run_steps(opt_a, sched_a, 30)

    state = torch.load(path, weights_only=True)
    opt_b = make_opt((1e-3, 2e-4))
    # Deliberately different arguments: the stored state must win.
    sched_b = LinearWarmupCosineLR(opt_b, warmup_steps=1, total_steps=2)
    opt_b.load_state_dict(state["optimizer"])
    sched_b.load_state_dict(state["scheduler"])
    assert sched_b.last_epoch == 17
    assert (sched_b.warmup_steps, sched_b.total_steps) == (5, 40)
    resumed = run_steps(opt_b, sched_b, 30)
    assert resumed == reference  # bit-identical: both are closed form from the same step


def test_load_state_dict_sets_lr_even_without_optimizer_state() -> None:
    """Restoring only the scheduler puts the optimizer on the restored step's LR at once."""
    opt_a = make_opt()
    sched_a = LinearWarmupCosineLR(opt_a, warmup_steps=3, total_steps=30)
    run_steps(opt_a, sched_a, 12)
    opt_b = make_opt()
    sched_b = LinearWarmupCosineLR(opt_b, warmup_steps=3, total_steps=30)
    assert opt_b.param_groups[0]["lr"] == 0.0
    sched_b.load_state_dict(sched_a.state_dict())
    assert opt_b.param_groups[0]["lr"] == opt_a.param_groups[0]["lr"]
    assert sched_b.get_last_lr() == sched_a.get_last_lr()


def test_load_state_dict_rejects_group_count_mismatch() -> None:
    """A state with a different number of param groups fails with ValueError."""
    sched_a = LinearWarmupCosineLR(make_opt((1e-3, 1e-4)), warmup_steps=1, total_steps=5)
    sched_b = LinearWarmupCosineLR(make_opt(), warmup_steps=1, total_steps=5)
    with pytest.raises(ValueError, match="param groups"):
        sched_b.load_state_dict(sched_a.state_dict())


def test_resume_via_last_epoch_argument() -> None:
    """Constructing with last_epoch=k (after the optimizer state is loaded) gives step k+1's LR."""
    opt_a = make_opt()
    sched_a = LinearWarmupCosineLR(opt_a, warmup_steps=4, total_steps=20)
    run_steps(opt_a, sched_a, 9)
    opt_b = make_opt()
    opt_b.load_state_dict(opt_a.state_dict())
    LinearWarmupCosineLR(opt_b, warmup_steps=4, total_steps=20, last_epoch=8)
    assert opt_b.param_groups[0]["lr"] == pytest.approx(BASE_LR * warmup_cosine_factor(9, 4, 20))
    assert opt_b.param_groups[0]["lr"] == opt_a.param_groups[0]["lr"]


@pytest.mark.parametrize(
    "kwargs,needle",
    [
        (dict(warmup_steps=11, total_steps=10), "11"),
        (dict(warmup_steps=-1, total_steps=10), "-1"),
        (dict(warmup_steps=0, total_steps=0), "total_steps"),
        (dict(warmup_steps=0, total_steps=-5), "-5"),
        (dict(warmup_steps=1, total_steps=10, min_lr_ratio=1.5), "1.5"),
        (dict(warmup_steps=1, total_steps=10, min_lr_ratio=-0.1), "-0.1"),
        (dict(warmup_steps=1, total_steps=10, warmup_start_ratio=2.0), "2.0"),
        (dict(warmup_steps=1, total_steps=10, warmup_start_ratio=float("nan")), "nan"),
        (dict(warmup_steps=2.5, total_steps=10), "2.5"),
        (dict(warmup_steps=True, total_steps=10), "True"),
    ],
)
def test_invalid_arguments_raise_value_error_naming_value(kwargs: dict, needle: str) -> None:
    """Bad arguments are refused with a ValueError whose message names the value."""
    with pytest.raises(ValueError, match=needle):
        LinearWarmupCosineLR(make_opt(), **kwargs)
    with pytest.raises(ValueError, match=needle):
        warmup_cosine_factor(0, kwargs["warmup_steps"], kwargs["total_steps"], kwargs.get("min_lr_ratio", 0.0), kwargs.get("warmup_start_ratio", 0.0))


def test_factor_rejects_negative_step() -> None:
    """A negative step is a ValueError naming it."""
    with pytest.raises(ValueError, match="-3"):
        warmup_cosine_factor(-3, 1, 10)


def test_construction_sets_step_zero_lr_and_keeps_initial_lr() -> None:
    """Construction sets group lr to the step-0 value and keeps initial_lr as the base."""
    opt = make_opt()
    LinearWarmupCosineLR(opt, warmup_steps=10, total_steps=100, warmup_start_ratio=0.25)
    assert opt.param_groups[0]["initial_lr"] == BASE_LR
    assert opt.param_groups[0]["lr"] == pytest.approx(0.25 * BASE_LR)


def test_state_dict_is_plain_types() -> None:
    """The state dict holds only plain Python types (safe for weights_only=True loading)."""
    sched = LinearWarmupCosineLR(make_opt(), warmup_steps=2, total_steps=8)
    buf = io.BytesIO()
    torch.save(sched.state_dict(), buf)
    buf.seek(0)
    state = torch.load(buf, weights_only=True)
    assert state["warmup_steps"] == 2 and state["total_steps"] == 8


def test_restarts_schedule_points() -> None:
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    sched = CosineAnnealingWarmupRestarts(opt, first_cycle_steps=10, warmup_steps=2, cycle_mult=2.0, gamma=0.5, min_lr_ratio=0.1)
    lrs = []
    for _ in range(40):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs[0] == pytest.approx(0.0)  # warm-up starts at 0
    assert lrs[2] == pytest.approx(1.0)  # end of warm-up: the peak
    assert lrs[9] > 0.1 and lrs[9] < 0.2  # end of the first cycle: near the floor
    assert lrs[10] == pytest.approx(0.0)  # restart: warm-up again
    assert lrs[12] == pytest.approx(0.5)  # second peak decayed by gamma
    assert lrs[30] == pytest.approx(0.0)  # third cycle starts after 10 + 20 steps
    assert lrs[32] == pytest.approx(0.25)
    # resume from a state dict mid-cycle continues identically
    opt2 = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    s2 = CosineAnnealingWarmupRestarts(opt2, first_cycle_steps=10, warmup_steps=2, cycle_mult=2.0, gamma=0.5, min_lr_ratio=0.1)
    s2.load_state_dict(sched.state_dict())
    assert s2.factor(17) == pytest.approx(sched.factor(17))
