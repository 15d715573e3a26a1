"""Training-run monitoring: the one object the training loop reports to, and a thread-safe tracker.

Owns `TrainingMonitor`, a facade that turns the loop's calls (train step, validation, PR curve,
example grid, hparams, event) into records and fans them out to the sinks of monitor_sinks
(console, metrics.jsonl, TensorBoard, optional W&B), with system statistics sampled on a
background thread (system_stats). Only rank 0 enables it; a disabled monitor does nothing.
Also owns `ThreadSafeMetricsTracker` (running sums/counts written from other threads) and
`flatten_dict`. It takes plain parameters, not the config.

Files it writes in `run_dir`:
- `metrics.jsonl`: one JSON object a line, `{"type": "train"|"val"|"system"|"event", "step": int,
  "time": unix seconds, ...values}`, flushed per line; non-finite numbers are written as null.
- `tensorboard/`: SummaryWriter event files (`train/...`, `perf/...`, `val/...`, `system/...`).
On resume both are cut back to `resume_step`, so the resumed run reads as one continuous run, and
`load_state_dict` restores what the monitor itself carries (error counts, ETA and data-wait
averages) from the checkpoint.
"""

from __future__ import annotations

import numbers
import threading
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from types import TracebackType
from typing import IO, Any

import numpy as np
import torch

from monitor_progress import ReportedBest, StarvationWatch, StepRate, format_duration
from monitor_render import pr_curve_from_histograms, render_image_grid
from monitor_sinks import ConsoleSink, RunSinks, as_real, truncate_metrics_jsonl
from system_stats import NvmlGpu, SystemStatsSampler, SystemStatsThread, cuda_memory_gib

__all__ = [
    "ThreadSafeMetricsTracker",
    "TrainingMonitor",
    "flatten_dict",
    "format_duration",
    "pr_curve_from_histograms",
    "render_image_grid",
    "truncate_metrics_jsonl",
]

# The entries of TrainingMonitor.state_dict().
_STATE_KEYS = ("error_counts", "step_rate", "starvation")


def flatten_dict(tree: Mapping[str, Any], sep: str = ".", prefix: str = "") -> dict[str, Any]:
    """Flatten nested mappings into one level, joining keys with `sep` ({'a': {'b': 1}} -> {'a.b': 1})."""
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        name = f"{prefix}{sep}{key}" if prefix else str(key)
        if isinstance(value, Mapping):
            flat.update(flatten_dict(value, sep, name))
        else:
            flat[name] = value
    return flat


def _is_count(value: object) -> bool:
    """True for a non-negative integer that is not a bool."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool) and value >= 0


def _best_metric(name: str | None, value: float | None, step: int | None) -> ReportedBest | None:
    """The best-so-far triple of log_validation, or None when not given; ValueError when half given."""
    if name is None:
        if value is not None or step is not None:
            raise ValueError("best_value and best_step need best_name (the selection metric's key)")
        return None
    if not isinstance(name, str) or not name:
        raise ValueError(f"best_name must be a metric key such as 'mAP', got {name!r}")
    number = as_real(value)
    if number is None:
        raise ValueError(f"best_value for {name!r} must be a real number, got {value!r}")
    if not _is_count(step):
        raise ValueError(f"best_step for {name!r} must be an integer >= 0, got {step!r}")
    return ReportedBest(name, number, int(step))


def _real_values(values: Mapping[str, object], what: str) -> dict[str, float]:
    """Every value as a float, or ValueError naming the first one that is not a real number."""
    out: dict[str, float] = {}
    for name, value in values.items():
        v = as_real(value)
        if v is None:
            raise ValueError(f"{what} {name!r} must be a real number, got {value!r}")
        out[name] = v
    return out


def _hparam_values(hparams: Mapping[str, Any]) -> dict[str, Any]:
    """Flatten with '.' and keep str/number/bool (all the hparams plugin takes); anything else as str()."""
    flat: dict[str, Any] = {}
    for key, value in flatten_dict(hparams).items():
        number = as_real(value)
        if isinstance(value, (bool, str)):
            flat[key] = value
        elif number is not None:
            flat[key] = number
        else:
            flat[key] = str(value)  # None, lists, paths
    return flat


def _checked_error_counts(errors: object) -> dict[str, int]:
    """A saved {kind: count} mapping, or ValueError when it is anything else (it was read from disk)."""
    if not isinstance(errors, Mapping) or not all(isinstance(k, str) and _is_count(v) for k, v in errors.items()):
        raise ValueError(f"monitor state 'error_counts' must map names to counts >= 0, got {errors!r}")
    return {k: int(v) for k, v in errors.items()}


class ThreadSafeMetricsTracker:
    """Lock-protected running means, counts, last values and counters, written from any thread."""

    def __init__(self) -> None:
        """Start with no names recorded."""
        self._lock = threading.Lock()
        self._sums: dict[str, float] = {}
        self._counts: dict[str, int] = {}
        self._last: dict[str, float] = {}
        self._counters: dict[str, float] = {}

    def update(self, name: str, value: float, n: int = 1) -> None:
        """Record `value` as the mean of `n` observations of `name` (n=1: one observation)."""
        v = as_real(value)
        if v is None:
            raise ValueError(f"value for {name!r} must be a real number, got {value!r}")
        if isinstance(n, bool) or not isinstance(n, numbers.Integral) or n < 1:
            raise ValueError(f"n for {name!r} must be a positive integer, got {n!r}")
        with self._lock:
            if name in self._counters:
                raise ValueError(f"{name!r} is already a counter (increment); use another name")
            self._sums[name] = self._sums.get(name, 0.0) + v * int(n)
            self._counts[name] = self._counts.get(name, 0) + int(n)
            self._last[name] = v

    def increment(self, name: str, n: float = 1) -> None:
        """Add `n` to the counter `name`."""
        v = as_real(n)
        if v is None:
            raise ValueError(f"increment for {name!r} must be a real number, got {n!r}")
        with self._lock:
            if name in self._sums:
                raise ValueError(f"{name!r} is already a running value (update); use another name")
            self._counters[name] = self._counters.get(name, 0.0) + v

    def snapshot(self, reset: bool = False) -> dict[str, float]:
        """Return {name: mean, name/count: n, name/last: last} for values and {name: total} for counters."""
        with self._lock:
            out: dict[str, float] = {}
            for name, total in self._sums.items():
                count = self._counts[name]
                out[name] = total / count
                out[f"{name}/count"] = float(count)
                out[f"{name}/last"] = self._last[name]
            for name, total in self._counters.items():
                out[name] = total
            if reset:
                self._clear()
        return out

    def reset(self) -> None:
        """Forget every name."""
        with self._lock:
            self._clear()

    def _clear(self) -> None:
        """Empty all tables; the caller holds the lock."""
        self._sums.clear()
        self._counts.clear()
        self._last.clear()
        self._counters.clear()


class TrainingMonitor:
    """Reports a run to the console, metrics.jsonl, TensorBoard (and optionally W&B); a no-op when disabled."""

    def __init__(
        self,
        run_dir: Path,
        *,
        enabled: bool = True,
        total_steps: int,
        console_interval_s: float = 10.0,
        tensorboard: bool = True,
        system_stats_interval_s: float = 15.0,
        wandb: dict | None = None,
        resume_step: int | None = None,
        stream: IO[str] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        """Open the run's logs (cut back to `resume_step` when resuming) and start the system-stats thread.

        `stream` receives console lines (default: sys.stdout at write time); `clock` is the
        monotonic clock used for rate limiting and the ETA (tests pass a fake one).
        """
        if not _is_count(total_steps):
            raise ValueError(f"total_steps must be an integer >= 0 (0 = unknown), got {total_steps!r}")
        if not (console_interval_s >= 0):
            raise ValueError(f"console_interval_s must be >= 0, got {console_interval_s!r}")
        if resume_step is not None and not _is_count(resume_step):
            raise ValueError(f"resume_step must be a non-negative integer or None, got {resume_step!r}")
        self.enabled = bool(enabled)
        self.run_dir = Path(run_dir)
        self.total_steps = int(total_steps)
        self.console_interval_s = float(console_interval_s)
        self.system_stats_interval_s = float(system_stats_interval_s)
        self.metrics_path = self.run_dir / "metrics.jsonl"
        # Guards _closed, _last_step and error_counts, which the system-stats thread and the sinks
        # (through _count_error) touch too; never held while calling a sink.
        self._lock = threading.Lock()
        self._closed = False
        self._last_step = int(resume_step) if resume_step is not None else 0
        # Counters of things that went wrong but must not stop training.
        self.error_counts: dict[str, int] = {}
        self.resume_removed_lines = self.resume_malformed_lines = 0
        self._console = ConsoleSink(
            stream, total_steps=self.total_steps, interval_s=self.console_interval_s, clock=clock, count_error=self._count_error
        )
        self._starvation = StarvationWatch()
        self._sinks = RunSinks()  # none until enabled
        self._sampler: SystemStatsSampler | None = None
        self._system: SystemStatsThread | None = None
        if self.enabled:
            self._open(resume_step, tensorboard, wandb)

    def _open(self, resume_step: int | None, tensorboard: bool, wandb: dict | None) -> None:
        """Open the sinks, note a truncation, start the system-stats thread."""
        self._sinks = RunSinks.open(
            self.run_dir, resume_step, tensorboard=tensorboard, wandb=wandb, say=self._console.write, count_error=self._count_error
        )
        self.resume_removed_lines, self.resume_malformed_lines = self._sinks.truncated_lines()
        if resume_step is not None and (self.resume_removed_lines or self.resume_malformed_lines):
            self.log_event(resume_step, "metrics_truncated", removed_lines=self.resume_removed_lines, malformed_lines=self.resume_malformed_lines)
        if self.system_stats_interval_s > 0:
            self._sampler = SystemStatsSampler(self.run_dir, self._count_error, NvmlGpu.open())
            self._system = SystemStatsThread(self._sampler, self.system_stats_interval_s, self._log_system)

    def __enter__(self) -> TrainingMonitor:
        """Return self."""
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        """Close the monitor."""
        self.close()

    # ---- fan-out ---------------------------------------------------------------------------

    def _count_error(self, kind: str) -> None:
        """Count a non-fatal failure by kind."""
        with self._lock:
            self.error_counts[kind] = self.error_counts.get(kind, 0) + 1

    def _active(self) -> bool:
        """Whether calls should be recorded: enabled and not closed."""
        return self.enabled and not self._closed

    # ---- public logging API ----------------------------------------------------------------

    def log_train(self, step: int, epoch: int, values: Mapping[str, float], *, images_per_s: float, data_wait_share: float, lr: float) -> None:
        """Log one training step's values (losses, grad_norm, ...), throughput, data-wait share and LR."""
        if not self._active():
            return
        step = int(step)
        scalars = _real_values(values, "train value")
        with self._lock:
            self._last_step = step
        starved_share = self._starvation.update(float(data_wait_share))
        perf = {"images_per_s": float(images_per_s), "data_wait_share": float(data_wait_share)}
        perf.update(cuda_memory_gib())
        tb = {f"train/{k}": v for k, v in scalars.items()}
        tb["train/lr"] = float(lr)
        tb.update({f"perf/{k}": v for k, v in perf.items()})
        self._sinks.scalars(tb, step)
        self._sinks.record("train", step, {"epoch": epoch, **scalars, "lr": float(lr), **perf})
        self._console.progress(step, epoch, scalars, perf, float(lr))
        if starved_share is not None:
            self.log_event(
                step,
                "data_starved",
                wait_share=round(starved_share, 3),
                hint="the model waits for data; raise data.num_workers or use the prepared cache",
            )

    def eta_seconds(self) -> float | None:
        """Estimated seconds to total_steps from the smoothed step rate (None until measurable)."""
        return self._console.rate.eta_seconds()

    def log_scalars(self, step: int, values: Mapping[str, float], *, prefix: str, kind: str = "train") -> None:
        """Log arbitrary numeric values as `prefix/name` (e.g. a tracker snapshot); non-numbers are skipped."""
        if not self._active():
            return
        scalars = {f"{prefix}/{k}": v for k, v in ((k, as_real(v)) for k, v in values.items()) if v is not None}
        if scalars:
            self._sinks.scalars(scalars, int(step))
            self._sinks.record(kind, int(step), scalars)

    def log_validation(
        self, step: int, metrics: Mapping[str, object], *, best_name: str | None = None, best_value: float | None = None, best_step: int | None = None
    ) -> None:
        """Log every numeric scalar of `metrics` under val/... (nested dicts flattened with '/'); one console line.

        The caller's best-so-far of its checkpoint-selection metric (`best_name` is its key in
        `metrics`, e.g. 'mAP' or 'f1_macro') is shown as 'best <label> <value> @ <step>' and
        recorded as val/best/<best_name> and val/best/step; without it no best is shown.
        """
        best = _best_metric(best_name, best_value, best_step)
        if not self._active():
            return
        step = int(step)
        scalars: dict[str, float] = {}
        for name, value in flatten_dict(metrics, sep="/").items():
            v = as_real(value)
            if v is not None:
                scalars[name] = v  # lists, per-tag arrays, strings: not scalars, skipped
        best_fields: dict[str, float | int] = {}
        if best is not None:
            best_fields = {f"best/{best.name}": best.value, "best/step": best.step}
        self._sinks.scalars({f"val/{k}": float(v) for k, v in {**scalars, **best_fields}.items()}, step)
        self._sinks.record("val", step, {**scalars, **best_fields})
        self._console.validation(step, scalars, best)

    def log_pr_curve(
        self, step: int, tag_name: str, pos_hist: object, neg_hist: object, *, bin_edges: object | None = None, num_thresholds: int | None = None
    ) -> None:
        """Write a PR curve for `tag_name` under val/pr/ from binned score histograms (see pr_curve_from_histograms)."""
        if not self._active():
            return
        curve = pr_curve_from_histograms(pos_hist, neg_hist, bin_edges, num_thresholds)
        self._sinks.pr_curve(f"val/pr/{tag_name}", curve, int(step))

    def log_image_grid(self, step: int, images: torch.Tensor | np.ndarray, captions: list[str]) -> None:
        """Write one grid image under val/examples: uint8 images (N, 3, H, W) with their captions below."""
        if not self._active():
            return
        grid = render_image_grid(images, captions)  # (H', W', 3) uint8
        self._sinks.image("val/examples", grid, int(step))

    def log_hparams(self, hparams: dict, metrics: dict) -> None:
        """Record the run's hyper-parameters (nested dicts flattened with '.') and metrics as hparams/<name>."""
        if not self._active():
            return
        flat = _hparam_values(hparams)
        given = _real_values(flatten_dict(metrics, sep="/"), "hparams metric")
        metric_values = {f"hparams/{k}": v for k, v in given.items()}
        step = self._last_step
        self._sinks.hparams(flat, metric_values, step)
        self._sinks.scalars(metric_values, step)
        self._sinks.record("event", step, {"kind": "hparams", "hparams": flat, "metrics": metric_values})

    def log_event(self, step: int, kind: str, *, say: str | None = None, **fields: Any) -> None:
        """Record a discrete event (checkpoint saved, skipped step, resumed, ...) in metrics.jsonl and the console.

        The console gets one line an event: `say` where the caller has a sentence for people (the
        event is then not printed a second time by the caller), else the fields as key=value.
        """
        if not self._active():
            return
        self._sinks.record("event", int(step), {"kind": str(kind), **fields})
        self._console.event(int(step), str(kind), fields, say)

    # ---- system statistics -----------------------------------------------------------------

    def sample_system_stats(self) -> dict[str, float]:
        """One reading of CPU, RAM, process and DataLoader-worker RSS, disk free and (NVML) GPU state."""
        if self._sampler is None:
            self._sampler = SystemStatsSampler(self.run_dir, self._count_error)
        return self._sampler.sample()

    def _log_system(self, stats: dict[str, float]) -> None:
        """Record one system reading at the latest training step (called on the sampling thread)."""
        with self._lock:
            if self._closed:
                return
            step = self._last_step
        self._sinks.scalars({f"system/{k}": v for k, v in stats.items()}, step)
        self._sinks.record("system", step, stats)

    # ---- resume ----------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """What a resumed run should continue (plain types): error counts, step-rate and data-wait averages.

        {"error_counts": {kind: int}, "step_rate": {"sec_per_step": float | None},
         "starvation": {"wait_ema": float | None, "calls": int, "reported": bool}}
        """
        with self._lock:
            errors = dict(self.error_counts)
        return {"error_counts": errors, "step_rate": self._console.rate.state_dict(), "starvation": self._starvation.state_dict()}

    def set_total_steps(self, total_steps: int) -> None:
        """The run's new last step (a resume that changed the schedule): progress lines and the ETA count to it."""
        if not _is_count(total_steps):
            raise ValueError(f"total_steps must be an integer >= 0 (0 = unknown), got {total_steps!r}")
        self.total_steps = self._console.total_steps = self._console.rate.total_steps = int(total_steps)

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore state_dict() from a checkpoint; ValueError naming the entry when it is malformed."""
        if not isinstance(state, Mapping) or not all(isinstance(state.get(k), Mapping) for k in _STATE_KEYS):
            raise ValueError(f"monitor state must be a mapping with mappings under {_STATE_KEYS}, got {state!r}")
        # Check every entry before replacing anything, so a bad state leaves the monitor as it was.
        errors = _checked_error_counts(state["error_counts"])
        rate = StepRate(self.total_steps)
        rate.load_state_dict(state["step_rate"])
        starvation = StarvationWatch()
        starvation.load_state_dict(state["starvation"])
        self._console.rate, self._starvation = rate, starvation
        with self._lock:
            self.error_counts = errors

    # ---- shutdown --------------------------------------------------------------------------

    def flush(self) -> None:
        """Push buffered TensorBoard events and JSON lines to disk."""
        self._sinks.flush()

    def close(self) -> None:
        """Stop the system thread, flush and close every sink; safe to call twice."""
        if not self._active():
            return
        if self._system is not None:
            self._system.stop()
        with self._lock:
            self._closed = True
        self._sinks.close()
        if self._sampler is not None:
            self._sampler.close()
