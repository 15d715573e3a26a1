"""Where the training monitor's numbers go: console, metrics.jsonl, TensorBoard and (optionally) W&B.

Owns one class per destination, each with one job and its own lock (the system-stats thread
writes concurrently with the training loop); the file and W&B sinks ignore calls once closed:
- `ConsoleSink`: console lines; rate-limited progress lines with the smoothed ETA (`StepRate`).
- `JsonlSink`: `metrics.jsonl`, one JSON object a line, flushed per line, non-finite numbers as
  null; on resume the file is first cut back to the resume step (`truncate_metrics_jsonl`).
- `TensorBoardSink`: a SummaryWriter for scalars, raw PR curves, images and the hparams summary;
  on resume events after the resume step are purged.
- `WandbSink`: a Weights & Biases run, only when asked for and the optional package imports.
- `RunSinks`: the last three as one, as the monitor uses them.
Failures that must not stop training (a closed console, a full disk, a W&B outage) are counted
through the `count_error(kind)` callback the monitor passes in. Also home of the value helpers
`as_real` and `plain_json` the monitor uses to vet and serialise what it is given.
"""

from __future__ import annotations

import json
import math
import numbers
import os
import sys
import threading
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import IO, Any

import numpy as np
import torch
from torch.utils.tensorboard import SummaryWriter
from torch.utils.tensorboard.summary import hparams as hparams_summary

from file_io import replace_with_retry
from monitor_progress import ReportedBest, StepRate, progress_line, validation_line

__all__ = ["ConsoleSink", "JsonlSink", "RunSinks", "TensorBoardSink", "WandbSink", "as_real", "plain_json", "truncate_metrics_jsonl"]

CountError = Callable[[str], None]


def as_real(value: object) -> float | None:
    """Return `value` as a float if it is a single real number (not bool), else None."""
    if isinstance(value, bool):
        return None
    if isinstance(value, numbers.Real):
        return float(value)
    if isinstance(value, torch.Tensor):
        if value.numel() == 1 and not value.is_complex() and value.dtype != torch.bool:
            return float(value.detach().reshape(()).item())
        return None
    if isinstance(value, np.ndarray):
        if value.size == 1 and value.dtype.kind in "iuf":
            return float(value.reshape(()))
        return None
    return None


def plain_json(value: Any) -> Any:
    """Convert `value` into plain JSON types; non-finite floats become None (strict JSON), others str()."""
    if isinstance(value, Mapping):
        return {str(k): plain_json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain_json(v) for v in value]
    if isinstance(value, (bool, str)) or value is None:
        return value
    if isinstance(value, numbers.Integral):
        return int(value)
    num = as_real(value)
    if num is not None:
        return num if math.isfinite(num) else None
    return str(value)  # paths, enums, anything else: readable text


def truncate_metrics_jsonl(path: Path, resume_step: int) -> tuple[int, int]:
    """Atomically rewrite `path` without records whose step > resume_step; returns (removed, malformed).

    Lines that are not JSON objects (e.g. a half-written last line from a kill) are dropped and
    counted as malformed. A missing file is left missing.
    """
    path = Path(path)
    if not path.exists():
        return 0, 0
    removed = malformed = 0
    tmp = path.with_name(path.name + ".tmp")
    replaced = False
    try:
        # Stream line by line: a multi-day run's log can be hundreds of MB.
        with path.open("r", encoding="utf-8", errors="replace") as src, tmp.open("w", encoding="utf-8", newline="\n") as dst:
            for line in src:
                text = line.strip()
                if not text:
                    continue
                try:
                    record = json.loads(text)
                except json.JSONDecodeError:
                    malformed += 1
                    continue
                if not isinstance(record, dict):
                    malformed += 1
                    continue
                step = record.get("step")
                if isinstance(step, int) and not isinstance(step, bool) and step > resume_step:
                    removed += 1
                    continue
                dst.write(text + "\n")
            dst.flush()
            os.fsync(dst.fileno())
        replace_with_retry(tmp, path)
        replaced = True
    finally:
        if not replaced:
            tmp.unlink(missing_ok=True)  # never leave a half-written copy behind
    return removed, malformed


class ConsoleSink:
    """Console lines: progress at most every `interval_s` (plus the last step), validations, events."""

    def __init__(self, stream: IO[str] | None, *, total_steps: int, interval_s: float, clock: Callable[[], float], count_error: CountError) -> None:
        """`stream` None means sys.stdout at write time; `clock` is monotonic seconds (rate limit, ETA)."""
        self._stream = stream
        self.total_steps = int(total_steps)
        self.interval_s = float(interval_s)
        self._clock = clock
        self._count_error = count_error
        self._lock = threading.Lock()
        self._last_progress_t: float | None = None
        self.rate = StepRate(self.total_steps)

    def write(self, line: str) -> None:
        """Print one line; a closed or narrow-charset terminal never stops training."""
        stream = self._stream if self._stream is not None else sys.stdout
        # Under the lock: events may come from other threads and lines must not interleave.
        with self._lock:
            try:
                stream.write(line + "\n")
            except UnicodeEncodeError:
                stream.write(line.encode("ascii", "backslashreplace").decode("ascii") + "\n")
            except (OSError, ValueError):  # ValueError: write to a closed file
                self._count_error("console")
                return
            try:
                stream.flush()
            except (OSError, ValueError):
                self._count_error("console")

    def progress(self, step: int, epoch: int, scalars: Mapping[str, float], perf: Mapping[str, float], lr: float) -> None:
        """Update the step rate; print a progress line when the interval has passed or at the last step."""
        now = self._clock()
        self.rate.update(step, now)
        is_last = self.total_steps > 0 and step >= self.total_steps
        due = self._last_progress_t is None or now - self._last_progress_t >= self.interval_s
        if due or is_last:
            self._last_progress_t = now
            eta = self.rate.eta_seconds()
            self.write(progress_line(step, epoch, self.total_steps, scalars, perf, lr, eta))

    def validation(self, step: int, scalars: Mapping[str, float], best: ReportedBest | None) -> None:
        """Print the one-line validation summary."""
        self.write(validation_line(step, scalars, best))

    def event(self, step: int, kind: str, fields: Mapping[str, Any], say: str | None = None) -> None:
        """Print `say`, the event's own sentence, or else '[kind] step N key=value ...': one line an event."""
        if say is not None:
            self.write(say)
            return
        detail = " ".join(f"{k}={plain_json(v)}" for k, v in fields.items())
        self.write(f"[{kind}] step {step}" + (f" {detail}" if detail else ""))


class JsonlSink:
    """metrics.jsonl: one JSON object a line, flushed at once so other programs can follow the run."""

    def __init__(self, path: Path, resume_step: int | None, count_error: CountError) -> None:
        """Open `path` for appending, first cutting it back to `resume_step` when resuming."""
        self.path = Path(path)
        self._count_error = count_error
        self._lock = threading.Lock()
        self.removed_lines = self.malformed_lines = 0
        if resume_step is not None:
            self.removed_lines, self.malformed_lines = truncate_metrics_jsonl(self.path, resume_step)
        self._file: IO[str] | None = self.path.open("a", encoding="utf-8", newline="\n")

    def write(self, record: Mapping[str, Any]) -> None:
        """Append one record (converted by plain_json) and flush it."""
        line = json.dumps(plain_json(record), ensure_ascii=False, allow_nan=False)
        with self._lock:
            if self._file is None:
                return
            try:
                self._file.write(line + "\n")
                self._file.flush()
            except OSError:
                self._count_error("jsonl_write")

    def flush(self) -> None:
        """Push buffered lines to the OS."""
        with self._lock:
            if self._file is not None:
                self._file.flush()

    def close(self) -> None:
        """Close the file; later writes are ignored."""
        with self._lock:
            if self._file is not None:
                self._file.close()
                self._file = None


class TensorBoardSink:
    """TensorBoard event files under `log_dir`: scalars, PR curves, images and the hparams summary."""

    def __init__(self, log_dir: Path, resume_step: int | None) -> None:
        """Open a SummaryWriter; when resuming, events after `resume_step` are purged."""
        self._lock = threading.Lock()
        self._writer: SummaryWriter | None = SummaryWriter(
            log_dir=str(log_dir),
            purge_step=None if resume_step is None else int(resume_step) + 1,
            flush_secs=15,
            max_queue=1000,  # a small queue makes the training thread wait on the writer thread
        )

    def scalars(self, values: Mapping[str, float], step: int) -> None:
        """One scalar event per tag at `step`."""
        with self._lock:
            if self._writer is not None:
                for tag, value in values.items():
                    self._writer.add_scalar(tag, value, step)

    def pr_curve(self, tag: str, curve: Mapping[str, np.ndarray], step: int) -> None:
        """A raw PR curve from pr_curve_from_histograms' counts (tp, fp, tn, fn, precision, recall)."""
        with self._lock:
            if self._writer is not None:
                self._writer.add_pr_curve_raw(
                    tag,
                    curve["tp"],
                    curve["fp"],
                    curve["tn"],
                    curve["fn"],
                    curve["precision"],
                    curve["recall"],
                    global_step=step,
                    num_thresholds=int(curve["tp"].size),
                )

    def image(self, tag: str, image: np.ndarray, step: int) -> None:
        """One uint8 image (H, W, 3)."""
        with self._lock:
            if self._writer is not None:
                self._writer.add_image(tag, image, step, dataformats="HWC")

    def hparams(self, flat: Mapping[str, Any], metric_values: Mapping[str, float], step: int) -> None:
        """The hparams plugin's summary: str/number/bool hyper-parameters and the metric tags they explain."""
        with self._lock:
            if self._writer is not None:
                exp, ssi, sei = hparams_summary(dict(flat), dict(metric_values))
                for summary in (exp, ssi, sei):
                    self._writer.file_writer.add_summary(summary, step)

    def flush(self) -> None:
        """Write pending events."""
        with self._lock:
            if self._writer is not None:
                self._writer.flush()

    def close(self) -> None:
        """Flush and close the writer; later calls are ignored."""
        with self._lock:
            if self._writer is not None:
                self._writer.flush()
                self._writer.close()
                self._writer = None


class WandbSink:
    """A Weights & Biases run receiving the same scalars; its failures are counted, never raised."""

    def __init__(self, run: Any, count_error: CountError) -> None:
        """Wrap a started wandb run."""
        self._run = run
        self._count_error = count_error
        self._lock = threading.Lock()

    @classmethod
    def open(
        cls, cfg: Mapping[str, Any], run_dir: Path, resume_step: int | None, say: Callable[[str], None], count_error: CountError
    ) -> WandbSink | None:
        """Start a run from wandb.init keyword arguments `cfg` unless cfg['enabled'] is false or wandb is missing."""
        kwargs = dict(cfg)
        if not kwargs.pop("enabled", True):
            return None
        try:
            import wandb  # optional dependency: imported only when a run asks for it
        except ImportError:
            say("wandb requested but not installed; logging to TensorBoard and metrics.jsonl only")
            return None
        kwargs.setdefault("dir", str(run_dir))
        if resume_step is not None:
            kwargs.setdefault("resume", "allow")
        try:
            return cls(wandb.init(**kwargs), count_error)
        except Exception as exc:  # noqa: BLE001 - wandb raises many types; a logger must not stop training
            count_error("wandb")
            say(f"wandb.init failed ({type(exc).__name__}: {exc}); continuing without it")
            return None

    def log(self, values: Mapping[str, float], step: int) -> None:
        """Log scalars at `step`."""
        with self._lock:
            if self._run is None:
                return
            try:
                self._run.log(dict(values), step=step)
            except Exception:  # noqa: BLE001 - wandb's errors vary by version and transport; counted
                self._count_error("wandb")

    def update_config(self, flat: Mapping[str, Any]) -> None:
        """Record hyper-parameters in the run's config."""
        with self._lock:
            if self._run is None:
                return
            try:
                self._run.config.update(dict(flat), allow_val_change=True)
            except Exception:  # noqa: BLE001 - as in log()
                self._count_error("wandb")

    def finish(self) -> None:
        """End the run; later calls are ignored."""
        with self._lock:
            if self._run is None:
                return
            try:
                self._run.finish()
            except Exception:  # noqa: BLE001 - as in log()
                self._count_error("wandb")
            self._run = None


class RunSinks:
    """The run's recording sinks as one: scalars go to TensorBoard and W&B, records to metrics.jsonl."""

    def __init__(self, jsonl: JsonlSink | None = None, tensorboard: TensorBoardSink | None = None, wandb: WandbSink | None = None) -> None:
        """Group the given sinks; a missing one is skipped (all missing: a disabled monitor)."""
        self.jsonl = jsonl
        self.tensorboard = tensorboard
        self.wandb = wandb

    @classmethod
    def open(
        cls,
        run_dir: Path,
        resume_step: int | None,
        *,
        tensorboard: bool,
        wandb: Mapping[str, Any] | None,
        say: Callable[[str], None],
        count_error: CountError,
    ) -> RunSinks:
        """Create run_dir, metrics.jsonl, tensorboard/ (when asked) and a W&B run (when configured)."""
        run_dir.mkdir(parents=True, exist_ok=True)
        jsonl = JsonlSink(run_dir / "metrics.jsonl", resume_step, count_error)
        board = TensorBoardSink(run_dir / "tensorboard", resume_step) if tensorboard else None
        remote = WandbSink.open(wandb, run_dir, resume_step, say, count_error) if wandb else None
        return cls(jsonl, board, remote)

    def truncated_lines(self) -> tuple[int, int]:
        """(removed, malformed) lines of metrics.jsonl when it was cut back for a resume."""
        if self.jsonl is None:
            return 0, 0
        return self.jsonl.removed_lines, self.jsonl.malformed_lines

    def scalars(self, values: Mapping[str, float], step: int) -> None:
        """Scalars by tag to TensorBoard and W&B."""
        if self.tensorboard is not None:
            self.tensorboard.scalars(values, step)
        if self.wandb is not None:
            self.wandb.log(values, step)

    def record(self, kind: str, step: int, fields: Mapping[str, Any]) -> None:
        """Append {"type": kind, "step": step, "time": unix seconds, **fields} to metrics.jsonl."""
        if self.jsonl is not None:
            self.jsonl.write({"type": kind, "step": step, "time": time.time(), **fields})

    def pr_curve(self, tag: str, curve: Mapping[str, np.ndarray], step: int) -> None:
        """A PR curve (pr_curve_from_histograms' counts) to TensorBoard."""
        if self.tensorboard is not None:
            self.tensorboard.pr_curve(tag, curve, step)

    def image(self, tag: str, image: np.ndarray, step: int) -> None:
        """A uint8 (H, W, 3) image to TensorBoard."""
        if self.tensorboard is not None:
            self.tensorboard.image(tag, image, step)

    def hparams(self, flat: Mapping[str, Any], metric_values: Mapping[str, float], step: int) -> None:
        """Hyper-parameters to TensorBoard's hparams plugin and the W&B config."""
        if self.tensorboard is not None:
            self.tensorboard.hparams(flat, metric_values, step)
        if self.wandb is not None:
            self.wandb.update_config(flat)

    def flush(self) -> None:
        """Push buffered TensorBoard events and JSON lines to disk."""
        if self.tensorboard is not None:
            self.tensorboard.flush()
        if self.jsonl is not None:
            self.jsonl.flush()

    def close(self) -> None:
        """Close TensorBoard, metrics.jsonl and the W&B run, in that order."""
        if self.tensorboard is not None:
            self.tensorboard.close()
        if self.jsonl is not None:
            self.jsonl.close()
        if self.wandb is not None:
            self.wandb.finish()
