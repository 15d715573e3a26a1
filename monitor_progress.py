"""Progress bookkeeping and console text for the training monitor: step rate, ETA, data starvation, lines.

Owns what the console shows and the little state behind it: `StepRate` (seconds per step smoothed
over wall time, hence the ETA), `StarvationWatch` (notices when the GPU keeps waiting for data),
`ReportedBest` (the checkpoint-selection best the training loop reports), and the pure formatters
`format_duration`, `progress_line`, `validation_line` and `metric_label`. Both stateful classes
round-trip through plain-type `state_dict()`s so a resumed run continues their estimates.
No I/O and no project imports.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

__all__ = ["ReportedBest", "StarvationWatch", "StepRate", "format_duration", "metric_label", "progress_line", "validation_line"]

# Seconds of wall time over which the step rate is smoothed for the ETA.
_ETA_TIME_CONSTANT_S = 30.0
# The data-starvation hint fires once when the smoothed wait share stays above this ...
_STARVED_WAIT_SHARE = 0.3
# ... after at least this many training logs (the first ones include start-up waits).
_STARVED_MIN_CALLS = 20
# Weight of the newest wait share in its exponential moving average.
_WAIT_EMA_WEIGHT = 0.1

# How the console names the metrics a run can select checkpoints by (as in the validation line).
_METRIC_LABELS = {"mAP": "mAP", "f1_micro": "F1 micro", "f1_macro": "F1 macro", "rating_accuracy": "rating acc"}


def format_duration(seconds: float) -> str:
    """Format a duration compactly: '42s', '4m12s', '3h05m', '2d07h'."""
    if not math.isfinite(seconds) or seconds < 0:
        return "--"
    s = int(round(seconds))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    if s < 86400:
        return f"{s // 3600}h{(s % 3600) // 60:02d}m"
    return f"{s // 86400}d{(s % 86400) // 3600:02d}h"


def metric_label(name: str) -> str:
    """Console name of a metrics key: 'f1_micro' -> 'F1 micro', 'mAP' -> 'mAP'; unknown keys as they are."""
    return _METRIC_LABELS.get(name, name)


def _optional_float(state: Mapping[str, Any], key: str, owner: str) -> float | None:
    """state[key] as a finite float >= 0 or None, else ValueError naming owner.key (state comes from disk)."""
    if key not in state:
        raise ValueError(f"{owner} state has no {key!r} entry (keys: {sorted(state)})")
    value = state[key]
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
        raise ValueError(f"{owner} state {key!r} must be a finite number >= 0 or None, got {value!r}")
    return float(value)


class StepRate:
    """Seconds per optimizer step, smoothed over the last ~30 s of wall time whatever the log cadence."""

    def __init__(self, total_steps: int) -> None:
        """No measurement yet; `total_steps` 0 means unknown (no ETA)."""
        self.total_steps = int(total_steps)
        self._ref: tuple[int, float] | None = None  # (step, clock) of the previous update
        self.sec_per_step: float | None = None

    def update(self, step: int, now: float) -> None:
        """Fold the time since the previous update into the smoothed seconds-per-step."""
        ref = self._ref
        self._ref = (step, now)
        if ref is None:
            # The first interval holds start-up (compile, warm caches): start measuring after it.
            return
        d_steps, dt = step - ref[0], now - ref[1]
        if d_steps <= 0 or dt < 0:
            return
        sps = dt / d_steps
        if self.sec_per_step is None:
            self.sec_per_step = sps
        else:
            # Time-based weight: the estimate follows the last ~30 s whatever the log cadence.
            alpha = 1.0 - math.exp(-dt / _ETA_TIME_CONSTANT_S)
            self.sec_per_step += alpha * (sps - self.sec_per_step)

    def eta_seconds(self) -> float | None:
        """Estimated seconds to total_steps (None until a rate is measured or when total is unknown)."""
        if self.total_steps <= 0 or self.sec_per_step is None or self._ref is None:
            return None
        return max(0, self.total_steps - self._ref[0]) * self.sec_per_step

    def state_dict(self) -> dict[str, Any]:
        """The smoothed rate; the clock reference is not kept (monotonic clocks differ between processes)."""
        return {"sec_per_step": self.sec_per_step}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Continue from a saved rate; the first interval after a resume is skipped like any start-up."""
        self.sec_per_step = _optional_float(state, "sec_per_step", "step_rate")


class StarvationWatch:
    """Smoothed share of step time spent waiting for data; says once per run when it stays high."""

    def __init__(self) -> None:
        """Nothing observed yet."""
        self.wait_ema: float | None = None
        self.calls = 0
        self.reported = False

    def update(self, wait_share: float) -> float | None:
        """Fold in one log's wait share; returns the smoothed share the one time it should be reported."""
        self.calls += 1
        w = _WAIT_EMA_WEIGHT
        self.wait_ema = wait_share if self.wait_ema is None else (1.0 - w) * self.wait_ema + w * wait_share
        if self.reported or self.calls < _STARVED_MIN_CALLS or self.wait_ema <= _STARVED_WAIT_SHARE:
            return None
        self.reported = True
        return self.wait_ema

    def state_dict(self) -> dict[str, Any]:
        """Plain-type state: the average, the number of logs seen and whether the hint was given."""
        return {"wait_ema": self.wait_ema, "calls": self.calls, "reported": self.reported}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore state_dict(); ValueError naming the entry when a value has the wrong type."""
        wait_ema = _optional_float(state, "wait_ema", "starvation")
        calls, reported = state.get("calls"), state.get("reported")
        if isinstance(calls, bool) or not isinstance(calls, int) or calls < 0:
            raise ValueError(f"starvation state 'calls' must be an integer >= 0, got {calls!r}")
        if not isinstance(reported, bool):
            raise ValueError(f"starvation state 'reported' must be true or false, got {reported!r}")
        self.wait_ema, self.calls, self.reported = wait_ema, calls, reported


@dataclass(frozen=True)
class ReportedBest:
    """The best value so far of the metric that selects checkpoints, and the step it was reached at."""

    name: str
    value: float
    step: int


def progress_line(
    step: int, epoch: int, total_steps: int, scalars: Mapping[str, float], perf: Mapping[str, float], lr: float, eta: float | None
) -> str:
    """'ep 1 step 120/2000 loss 12.345 lr 3.0e-04 412 img/s wait 3% ETA 4m12s' (+ GPU memory)."""
    parts = [f"ep {epoch}", f"step {step}/{total_steps}" if total_steps > 0 else f"step {step}"]
    if "loss" in scalars:
        parts.append(f"loss {scalars['loss']:.5g}")
    parts.append(f"lr {lr:.1e}")
    parts.append(f"{perf['images_per_s']:.0f} img/s")
    parts.append(f"wait {perf['data_wait_share'] * 100:.0f}%")
    if total_steps > 0:
        parts.append(f"ETA {format_duration(eta) if eta is not None else '--'}")
    if "gpu_mem_max_allocated_gb" in perf:
        parts.append(f"mem {perf['gpu_mem_max_allocated_gb']:.1f}/{perf['gpu_mem_reserved_gb']:.1f}GB")
    return " ".join(parts)


def validation_line(step: int, scalars: Mapping[str, float], best: ReportedBest | None) -> str:
    """'val step 1200 mAP 0.4123 F1 micro 0.5120 macro 0.3010 rating acc 0.8800 best mAP 0.4123 @ 1200'."""
    parts = [f"val step {step}"]
    if "mAP" in scalars:
        parts.append(f"mAP {scalars['mAP']:.4f}")
    if "f1_micro" in scalars or "f1_macro" in scalars:
        parts.append("F1")
        if "f1_micro" in scalars:
            parts.append(f"micro {scalars['f1_micro']:.4f}")
        if "f1_macro" in scalars:
            parts.append(f"macro {scalars['f1_macro']:.4f}")
    if "rating_accuracy" in scalars:
        parts.append(f"rating acc {scalars['rating_accuracy']:.4f}")
    if best is not None:
        parts.append(f"best {metric_label(best.name)} {best.value:.4f} @ {best.step}")
    return " ".join(parts)
