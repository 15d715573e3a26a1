"""Learning-rate schedules stepped once per optimizer update.

Owns `warmup_cosine_factor` (the pure closed-form multiplier) and the two
`torch.optim.lr_scheduler.LRScheduler`s built on it: `LinearWarmupCosineLR` (one warm-up, one
cosine decay) and `CosineAnnealingWarmupRestarts` (repeated warm-up and cosine cycles). Both are
closed forms of the step count, so they resume exactly from their state dicts. Bottom module: it
imports nothing from the project.
"""

from __future__ import annotations

import math
import numbers
from typing import Any

import torch
from torch.optim import Optimizer
from torch.optim.lr_scheduler import LRScheduler

__all__ = ["warmup_cosine_factor", "validate_warmup_cosine_args", "LinearWarmupCosineLR", "CosineAnnealingWarmupRestarts"]


def _check_int(name: str, value: object) -> int:
    """Return `value` as an int, or raise ValueError naming it (bools and floats are refused)."""
    # bool is an Integral subclass; True as a step count is always a bug upstream.
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise ValueError(f"{name} must be an integer, got {value!r}")
    return int(value)


def _check_ratio(name: str, value: object) -> float:
    """Return `value` as a float in [0, 1], or raise ValueError naming it."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ValueError(f"{name} must be a number in [0, 1], got {value!r}")
    ratio = float(value)
    if not (0.0 <= ratio <= 1.0):  # also rejects NaN
        raise ValueError(f"{name} must be in [0, 1], got {value!r}")
    return ratio


def validate_warmup_cosine_args(warmup_steps: int, total_steps: int, min_lr_ratio: float, warmup_start_ratio: float) -> tuple[int, int, float, float]:
    """Check the schedule's arguments and return them normalised, raising ValueError naming the bad one."""
    warmup = _check_int("warmup_steps", warmup_steps)
    total = _check_int("total_steps", total_steps)
    if warmup < 0:
        raise ValueError(f"warmup_steps must be >= 0, got {warmup}")
    if total <= 0:
        raise ValueError(f"total_steps must be > 0, got {total}")
    if warmup > total:
        raise ValueError(f"warmup_steps ({warmup}) must not exceed total_steps ({total})")
    return (warmup, total, _check_ratio("min_lr_ratio", min_lr_ratio), _check_ratio("warmup_start_ratio", warmup_start_ratio))


def warmup_cosine_factor(step: int, warmup_steps: int, total_steps: int, min_lr_ratio: float = 0.0, warmup_start_ratio: float = 0.0) -> float:
    """Multiplier of the base LR after `step` optimizer updates: linear warm-up, cosine decay, then held."""
    warmup, total, min_ratio, start_ratio = validate_warmup_cosine_args(warmup_steps, total_steps, min_lr_ratio, warmup_start_ratio)
    step = _check_int("step", step)
    if step < 0:
        raise ValueError(f"step must be >= 0, got {step}")
    if step < warmup:
        # Reaches exactly 1.0 at step == warmup, where the cosine branch takes over.
        return start_ratio + (1.0 - start_ratio) * (step / warmup)
    if step >= total:
        return min_ratio
    progress = (step - warmup) / (total - warmup)  # in [0, 1); total > warmup here
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


class LinearWarmupCosineLR(LRScheduler):
    """Per-update schedule: linear warm-up to each group's base LR, cosine decay to min_lr_ratio*base, then held."""

    def __init__(
        self,
        optimizer: Optimizer,
        *,
        warmup_steps: int,
        total_steps: int,
        min_lr_ratio: float = 0.0,
        warmup_start_ratio: float = 0.0,
        last_epoch: int = -1,
    ) -> None:
        """Validate the arguments and set every group's LR to its step-0 value (or `last_epoch`'s on resume)."""
        (self.warmup_steps, self.total_steps, self.min_lr_ratio, self.warmup_start_ratio) = validate_warmup_cosine_args(
            warmup_steps, total_steps, min_lr_ratio, warmup_start_ratio
        )
        last_epoch = _check_int("last_epoch", last_epoch)
        if last_epoch < -1:
            raise ValueError(f"last_epoch must be >= -1, got {last_epoch}")
        super().__init__(optimizer, last_epoch)

    def factor(self, step: int | None = None) -> float:
        """Multiplier of the base LR at `step` (default: the scheduler's current step)."""
        return warmup_cosine_factor(
            self.last_epoch if step is None else step, self.warmup_steps, self.total_steps, self.min_lr_ratio, self.warmup_start_ratio
        )

    def _lrs(self) -> list[float | torch.Tensor]:
        """Learning rates for every param group at `last_epoch`, computed in closed form."""
        # Always from base_lrs, never from the group's current lr: no drift over a million steps.
        f = self.factor(max(self.last_epoch, 0))
        return [base_lr * f for base_lr in self.base_lrs]

    def get_lr(self) -> list[float | torch.Tensor]:
        """LRs for the step `LRScheduler.step` just advanced to."""
        return self._lrs()

    def _get_closed_form_lr(self) -> list[float | torch.Tensor]:
        """LRs at `last_epoch` (used by torch when step(epoch) is given)."""
        return self._lrs()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore the state, re-check its schedule arguments and set every group's LR to match it."""
        super().load_state_dict(state_dict)
        # A hand-edited or foreign state dict must fail here, not deep inside a later step().
        (self.warmup_steps, self.total_steps, self.min_lr_ratio, self.warmup_start_ratio) = validate_warmup_cosine_args(
            self.warmup_steps, self.total_steps, self.min_lr_ratio, self.warmup_start_ratio
        )
        if len(self.base_lrs) != len(self.optimizer.param_groups):
            raise ValueError(
                f"scheduler state has {len(self.base_lrs)} base LRs but the optimizer has {len(self.optimizer.param_groups)} param groups"
            )
        # Whatever order the caller restores optimizer and scheduler in, the LR in use is the
        # schedule's value at the restored step.
        for group, lr in zip(self.optimizer.param_groups, self._lrs(), strict=True):
            if isinstance(group["lr"], torch.Tensor):
                group["lr"].fill_(lr)
            else:
                group["lr"] = lr
        self._last_lr = [g["lr"].clone() if isinstance(g["lr"], torch.Tensor) else g["lr"] for g in self.optimizer.param_groups]


class CosineAnnealingWarmupRestarts(LRScheduler):
    """Cosine cycles with a linear warm-up at the start of each, optionally growing and decaying.

    Cycle k lasts `first_cycle_steps * cycle_mult**k` steps; its peak is `base_lr * gamma**k`; each
    cycle warms up linearly over `warmup_steps` and then decays to `min_lr_ratio * peak`. Closed form
    from the step count, so it resumes exactly from its state dict.
    """

    def __init__(
        self,
        optimizer: Optimizer,
        *,
        first_cycle_steps: int,
        warmup_steps: int = 0,
        cycle_mult: float = 1.0,
        gamma: float = 1.0,
        min_lr_ratio: float = 0.0,
        last_epoch: int = -1,
    ) -> None:
        """Validate the cycle arguments and set every group's LR to its step-0 value."""
        if first_cycle_steps < 1:
            raise ValueError(f"first_cycle_steps must be >= 1, got {first_cycle_steps}")
        if not 0 <= warmup_steps < first_cycle_steps:
            raise ValueError(f"warmup_steps must be in [0, first_cycle_steps={first_cycle_steps}), got {warmup_steps}")
        if cycle_mult < 1.0:
            raise ValueError(f"cycle_mult must be >= 1, got {cycle_mult}")
        if not 0.0 < gamma <= 1.0:
            raise ValueError(f"gamma must be in (0, 1], got {gamma}")
        if not 0.0 <= min_lr_ratio <= 1.0:
            raise ValueError(f"min_lr_ratio must be in [0, 1], got {min_lr_ratio}")
        self.first_cycle_steps = first_cycle_steps
        self.warmup_steps = warmup_steps
        self.cycle_mult = cycle_mult
        self.gamma = gamma
        self.min_lr_ratio = min_lr_ratio
        super().__init__(optimizer, last_epoch)

    def cycle_position(self, step: int) -> tuple[int, int, int]:
        """(cycle index, step inside the cycle, cycle length) for an optimizer step."""
        cycle, start, length = 0, 0, self.first_cycle_steps
        while step >= start + length:
            start += length
            cycle += 1
            length = max(1, int(round(self.first_cycle_steps * self.cycle_mult**cycle)))
        return cycle, step - start, length

    def factor(self, step: int) -> float:
        """Learning-rate multiplier of base_lr at an optimizer step."""
        cycle, inside, length = self.cycle_position(step)
        warmup = min(self.warmup_steps, length - 1)
        return (self.gamma**cycle) * warmup_cosine_factor(inside, warmup, length, self.min_lr_ratio, 0.0)

    def get_lr(self) -> list[float]:
        """Learning rates for the current step (closed form)."""
        f = self.factor(max(self.last_epoch, 0))
        return [base * f for base in self.base_lrs]
