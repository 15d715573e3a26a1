"""Training-run monitoring: TensorBoard, console progress, metrics.jsonl and system statistics.

Owns `TrainingMonitor` (the one object the training loop reports to; only rank 0 enables it),
`ThreadSafeMetricsTracker` (running sums/counts written from other threads), and the pure helpers
they use (`format_duration`, `pr_curve_from_histograms`, `render_image_grid`, `flatten_dict`).
Middle module: it imports only Configuration_System (for atomic file replacement) and takes plain
parameters, not the config.

Files it writes in `run_dir`:
- `metrics.jsonl`: one JSON object a line, `{"type": "train"|"val"|"system"|"event", "step": int,
  "time": unix seconds, ...values}`, flushed per line; non-finite numbers are written as null.
- `tensorboard/`: SummaryWriter event files (`train/...`, `perf/...`, `val/...`, `system/...`).
On resume both are cut back to `resume_step`, so the resumed run reads as one continuous run.
"""

from __future__ import annotations

import json
import math
import numbers
import os
import sys
import threading
import time
from pathlib import Path
from types import TracebackType
from typing import IO, Any, Callable, Mapping, Sequence

import numpy as np
import psutil
import torch

from Configuration_System import replace_with_retry

__all__ = [
    "TrainingMonitor",
    "ThreadSafeMetricsTracker",
    "format_duration",
    "pr_curve_from_histograms",
    "render_image_grid",
    "flatten_dict",
    "truncate_metrics_jsonl",
]

_GIB = float(1 << 30)
# Seconds of wall time over which the step rate is smoothed for the ETA.
_ETA_TIME_CONSTANT_S = 30.0
# The data-starvation hint fires once when the smoothed wait share stays above this.
_STARVED_WAIT_SHARE = 0.3
_STARVED_MIN_CALLS = 20


# --------------------------------------------------------------------------------------------
# Small pure helpers
# --------------------------------------------------------------------------------------------


def _scalar(value: object) -> float | None:
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


def _json_safe(value: Any) -> Any:
    """Convert `value` into plain JSON types; non-finite floats become None (strict JSON)."""
    if isinstance(value, Mapping):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    if isinstance(value, (bool, str)) or value is None:
        return value
    if isinstance(value, numbers.Integral):
        return int(value)
    num = _scalar(value)
    if num is not None:
        return num if math.isfinite(num) else None
    if isinstance(value, Path):
        return str(value)
    return str(value)


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


def _as_hist(name: str, hist: object) -> np.ndarray:
    """Return a histogram as a 1-D float64 array of non-negative counts, or raise ValueError."""
    if isinstance(hist, torch.Tensor):
        hist = hist.detach().cpu().numpy()
    arr = np.asarray(hist, dtype=np.float64)
    if arr.ndim != 1 or arr.size == 0:
        raise ValueError(f"{name} must be a non-empty 1-D histogram, got shape {arr.shape}")
    if not np.all(np.isfinite(arr)) or np.any(arr < 0):
        raise ValueError(f"{name} must hold finite non-negative counts, got {arr.tolist()[:8]}...")
    return arr


def pr_curve_from_histograms(
    pos_hist: object,
    neg_hist: object,
    bin_edges: object | None = None,
    num_thresholds: int | None = None,
) -> dict[str, np.ndarray]:
    """Cumulative PR-curve counts at evenly spaced thresholds from score histograms of positives/negatives.

    `bin_edges` is the lower score edge (a probability) of each bin, ascending, as
    `MetricComputer.bin_edges()` returns it; None means B equal bins over [0, 1] (edge i = i/B).
    Thresholds are t_k = k/(K-1), k = 0..K-1 (TensorBoard's PR-curve convention); at t_k a bin
    counts as predicted positive when its lower edge is >= t_k, so a bin straddling t_k counts as
    below it. K defaults to min(B + 1, 127): with equal bins and B <= 126 the thresholds are the
    bin edges themselves and the counts are exact. Returns tp, fp, tn, fn, precision, recall (K,).
    """
    pos = _as_hist("pos_hist", pos_hist)
    neg = _as_hist("neg_hist", neg_hist)
    if pos.shape != neg.shape:
        raise ValueError(f"pos_hist and neg_hist differ in length: {pos.size} vs {neg.size}")
    bins = pos.size
    if bin_edges is None:
        edges = np.arange(bins, dtype=np.float64) / bins
    else:
        if isinstance(bin_edges, torch.Tensor):
            bin_edges = bin_edges.detach().cpu().numpy()
        edges = np.asarray(bin_edges, dtype=np.float64)
        if edges.shape != (bins,):
            raise ValueError(f"bin_edges must hold one lower edge per bin ({bins}), got shape {edges.shape}")
        if not (np.all(np.diff(edges) >= 0) and edges[0] >= 0.0 and edges[-1] <= 1.0):
            raise ValueError("bin_edges must be ascending probabilities in [0, 1]")
    k = min(bins + 1, 127) if num_thresholds is None else int(num_thresholds)
    if k < 2:
        raise ValueError(f"num_thresholds must be >= 2, got {num_thresholds!r}")
    thresholds = np.arange(k, dtype=np.float64) / (k - 1)  # (K,), same arithmetic as edges i/B
    first_bin = np.searchsorted(edges, thresholds, side="left")  # (K,) first bin with edge >= t
    # Counts at or above each bin, plus a trailing 0 for "no bin qualifies".
    pos_at_or_above = np.concatenate([np.cumsum(pos[::-1])[::-1], [0.0]])  # (B+1,)
    neg_at_or_above = np.concatenate([np.cumsum(neg[::-1])[::-1], [0.0]])  # (B+1,)
    tp = pos_at_or_above[first_bin]  # (K,)
    fp = neg_at_or_above[first_bin]  # (K,)
    fn = pos.sum() - tp
    tn = neg.sum() - fp
    # Same guard TensorBoard's own pr_curve summary uses: 0/0 reads as 0, not NaN.
    min_count = 1e-7
    precision = tp / np.maximum(min_count, tp + fp)
    recall = tp / np.maximum(min_count, tp + fn)
    return {"tp": tp, "fp": fp, "tn": tn, "fn": fn, "precision": precision, "recall": recall}


def _load_font(size: int) -> Any:
    """PIL's default font at `size` where Pillow supports sizing it (>= 10.1), else the bitmap one."""
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=size)
    except (TypeError, ImportError, OSError):
        # Older Pillow or no FreeType: the fixed bitmap font still renders ASCII.
        return ImageFont.load_default()


def _wrap_text(text: str, width_px: int, measure: Callable[[str], float], max_lines: int) -> list[str]:
    """Greedy word wrap of `text` to `width_px`, honouring explicit newlines, at most `max_lines`."""
    lines: list[str] = []
    for paragraph in text.split("\n"):
        current = ""
        for word in paragraph.split(" "):
            candidate = f"{current} {word}" if current else word
            if measure(candidate) <= width_px:
                current = candidate
                continue
            if current:
                lines.append(current)
            # A single word wider than the tile is cut by characters.
            while word and measure(word) > width_px:
                cut = len(word) - 1
                while cut > 1 and measure(word[:cut]) > width_px:
                    cut -= 1
                lines.append(word[:cut])
                word = word[cut:]
            current = word
        lines.append(current)
    if len(lines) > max_lines:
        lines = lines[: max_lines - 1] + [lines[max_lines - 1] + " ..."]
    return lines


def render_image_grid(
    images: torch.Tensor | np.ndarray,
    captions: Sequence[str],
    *,
    columns: int | None = None,
    min_tile_width: int = 224,
    max_caption_lines: int = 10,
    font_size: int = 12,
    max_image_side: int = 256,
) -> np.ndarray:
    """Lay uint8 images (N, 3, H, W) out in a grid, each with its caption below; returns (H', W', 3) uint8.

    Tile k sits at row k // columns, column k % columns; inside a tile the image is centred
    horizontally at the top and the caption (wrapped, PIL's default font) fills the space below.
    Images larger than `max_image_side` are shrunk (aspect kept) so that a validation grid stays
    a few MB in the event file however large the training resolution is.
    """
    from PIL import Image, ImageDraw

    if isinstance(images, torch.Tensor):
        images = images.detach().cpu().numpy()
    arr = np.asarray(images)
    if arr.dtype != np.uint8:
        raise ValueError(f"images must be uint8, got dtype {arr.dtype}")
    if arr.ndim != 4 or arr.shape[1] not in (1, 3) or arr.shape[0] == 0:
        raise ValueError(f"images must have shape (N, 3, H, W) with N >= 1, got {arr.shape}")
    if len(captions) != arr.shape[0]:
        raise ValueError(f"got {len(captions)} captions for {arr.shape[0]} images")
    if arr.shape[1] == 1:
        arr = np.repeat(arr, 3, axis=1)  # grey -> RGB
    n, _, h, w = arr.shape
    tiles = [Image.fromarray(np.ascontiguousarray(arr[k].transpose(1, 2, 0))) for k in range(n)]  # (H, W, 3)
    if max(h, w) > max_image_side:
        scale = max_image_side / max(h, w)
        h, w = max(1, round(h * scale)), max(1, round(w * scale))
        tiles = [t.resize((w, h), Image.Resampling.BILINEAR) for t in tiles]
    cols = columns if columns is not None else math.ceil(math.sqrt(n))
    if cols < 1:
        raise ValueError(f"columns must be >= 1, got {cols}")
    rows = math.ceil(n / cols)

    font = _load_font(font_size)
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))

    def measure(text: str) -> float:
        """Pixel width of `text` in the caption font."""
        return probe.textlength(text, font=font)

    pad, gap = 4, 2
    tile_w = max(w, min_tile_width)
    left, top, right, bottom = probe.textbbox((0, 0), "Ag|", font=font)
    line_h = (bottom - top) + 3
    safe = [_ascii_fallback(c, font) for c in captions]
    wrapped = [_wrap_text(c, tile_w - 2 * pad, measure, max_caption_lines) for c in safe]
    caption_h = max(len(lines) for lines in wrapped) * line_h + 2 * pad
    tile_h = h + caption_h

    canvas = Image.new(
        "RGB", (cols * tile_w + (cols - 1) * gap, rows * tile_h + (rows - 1) * gap), (20, 20, 20)
    )
    draw = ImageDraw.Draw(canvas)
    for k in range(n):
        x0 = (k % cols) * (tile_w + gap)
        y0 = (k // cols) * (tile_h + gap)
        canvas.paste(tiles[k], (x0 + (tile_w - w) // 2, y0))
        for i, line in enumerate(wrapped[k]):
            draw.text((x0 + pad, y0 + h + pad + i * line_h - top), line, fill=(235, 235, 235), font=font)
    return np.asarray(canvas, dtype=np.uint8)  # (H', W', 3)


def _ascii_fallback(text: str, font: Any) -> str:
    """Return `text`, or its ASCII-escaped form if the font cannot encode it (bitmap fallback font)."""
    from PIL import ImageFont

    if isinstance(font, ImageFont.FreeTypeFont):
        return text
    try:
        text.encode("latin-1")
    except UnicodeEncodeError:
        return text.encode("ascii", "backslashreplace").decode("ascii")
    return text


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
        with (
            path.open("r", encoding="utf-8", errors="replace") as src,
            tmp.open("w", encoding="utf-8", newline="\n") as dst,
        ):
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


# --------------------------------------------------------------------------------------------
# ThreadSafeMetricsTracker
# --------------------------------------------------------------------------------------------


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
        v = _scalar(value)
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
        v = _scalar(n)
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


# --------------------------------------------------------------------------------------------
# TrainingMonitor
# --------------------------------------------------------------------------------------------


class _NvmlGpu:
    """One GPU read through NVML (nvidia-ml-py); constructed only when pynvml imports."""

    def __init__(self, pynvml: Any, handle: Any) -> None:
        """Keep the module and device handle."""
        self._nvml = pynvml
        self._handle = handle

    @classmethod
    def open(cls) -> "_NvmlGpu | None":
        """Open the GPU this process uses, or return None when NVML or a GPU is unavailable."""
        try:
            import pynvml
        except ImportError:
            return None
        try:
            pynvml.nvmlInit()
        except pynvml.NVMLError:
            return None
        try:
            return cls(pynvml, cls._handle_for_current_device(pynvml))
        except (pynvml.NVMLError, ValueError):
            pynvml.nvmlShutdown()
            return None

    @staticmethod
    def _handle_for_current_device(pynvml: Any) -> Any:
        """NVML handle of torch's current CUDA device, mapped through CUDA_VISIBLE_DEVICES."""
        # Never initialise CUDA from the monitor: only ask torch when it is already set up.
        ordinal = torch.cuda.current_device() if torch.cuda.is_initialized() else 0
        visible = [v.strip() for v in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if v.strip()]
        if ordinal < len(visible):
            entry = visible[ordinal]
            if entry.isdigit():
                return pynvml.nvmlDeviceGetHandleByIndex(int(entry))
            return pynvml.nvmlDeviceGetHandleByUUID(entry)
        return pynvml.nvmlDeviceGetHandleByIndex(ordinal)

    def sample(self) -> tuple[dict[str, float], int]:
        """Read utilisation, memory, temperature and power; returns (values, number of failed reads)."""
        nv, h = self._nvml, self._handle
        out: dict[str, float] = {}
        failures = 0
        try:
            util = nv.nvmlDeviceGetUtilizationRates(h)
            out["gpu_util_percent"] = float(util.gpu)
            out["gpu_mem_util_percent"] = float(util.memory)
        except nv.NVMLError:
            failures += 1
        try:
            mem = nv.nvmlDeviceGetMemoryInfo(h)
            out["gpu_mem_used_gb"] = mem.used / _GIB
            out["gpu_mem_total_gb"] = mem.total / _GIB
        except nv.NVMLError:
            failures += 1
        try:
            out["gpu_temperature_c"] = float(nv.nvmlDeviceGetTemperature(h, nv.NVML_TEMPERATURE_GPU))
        except nv.NVMLError:
            failures += 1
        try:
            out["gpu_power_w"] = nv.nvmlDeviceGetPowerUsage(h) / 1000.0
        except nv.NVMLError:
            failures += 1  # many consumer boards do not report power
        return out, failures

    def close(self) -> None:
        """Shut NVML down."""
        try:
            self._nvml.nvmlShutdown()
        except self._nvml.NVMLError:
            pass  # already shut down: nothing left to release


class TrainingMonitor:
    """Reports a run to TensorBoard, the console, metrics.jsonl (and optionally W&B); a no-op when disabled."""

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
        if isinstance(total_steps, bool) or not isinstance(total_steps, numbers.Integral) or total_steps < 0:
            raise ValueError(f"total_steps must be an integer >= 0 (0 = unknown), got {total_steps!r}")
        if not (console_interval_s >= 0):
            raise ValueError(f"console_interval_s must be >= 0, got {console_interval_s!r}")
        if resume_step is not None and (
            isinstance(resume_step, bool) or not isinstance(resume_step, numbers.Integral) or resume_step < 0
        ):
            raise ValueError(f"resume_step must be a non-negative integer or None, got {resume_step!r}")
        self.enabled = bool(enabled)
        self.run_dir = Path(run_dir)
        self.total_steps = int(total_steps)
        self.console_interval_s = float(console_interval_s)
        self._stream = stream
        self._clock = clock
        self._closed = False
        self._lock = threading.RLock()
        self._jsonl: IO[str] | None = None
        self._writer: Any = None
        self._wandb_run: Any = None
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self._gpu: _NvmlGpu | None = None
        # Counters of things that went wrong but must not stop training.
        self.error_counts: dict[str, int] = {}
        self.resume_removed_lines = 0
        self.resume_malformed_lines = 0
        self._last_step = int(resume_step) if resume_step is not None else 0
        self._last_console_t: float | None = None
        self._rate_ref: tuple[int, float] | None = None
        self._sec_per_step: float | None = None
        self._wait_ema: float | None = None
        self._train_calls = 0
        self._starved_reported = False
        self._best_map: tuple[float, int] | None = None
        self.metrics_path = self.run_dir / "metrics.jsonl"
        self.system_stats_interval_s = float(system_stats_interval_s)
        if not self.enabled:
            return

        self.run_dir.mkdir(parents=True, exist_ok=True)
        if resume_step is not None:
            self.resume_removed_lines, self.resume_malformed_lines = truncate_metrics_jsonl(
                self.metrics_path, int(resume_step)
            )
        self._jsonl = self.metrics_path.open("a", encoding="utf-8", newline="\n")

        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self._writer = SummaryWriter(
                log_dir=str(self.run_dir / "tensorboard"),
                purge_step=None if resume_step is None else int(resume_step) + 1,
                flush_secs=15,
                max_queue=1000,  # a small queue makes the training thread wait on the writer thread
            )
        if wandb:
            self._wandb_run = self._open_wandb(dict(wandb), resume_step)

        if resume_step is not None and (self.resume_removed_lines or self.resume_malformed_lines):
            self.log_event(
                int(resume_step),
                "metrics_truncated",
                removed_lines=self.resume_removed_lines,
                malformed_lines=self.resume_malformed_lines,
            )

        if self.system_stats_interval_s > 0:
            self._process = psutil.Process()
            self._process.cpu_percent(None)  # prime: the first reading is always 0.0
            psutil.cpu_percent(None)
            self._gpu = _NvmlGpu.open()
            self._thread = threading.Thread(
                target=self._system_loop, name="TrainingMonitor-system", daemon=True
            )
            self._thread.start()

    # ---- context manager -------------------------------------------------------------------

    def __enter__(self) -> "TrainingMonitor":
        """Return self."""
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        """Close the monitor."""
        self.close()

    # ---- sinks -----------------------------------------------------------------------------

    def _count_error(self, kind: str) -> None:
        """Count a non-fatal failure by kind."""
        with self._lock:
            self.error_counts[kind] = self.error_counts.get(kind, 0) + 1

    def _open_wandb(self, cfg: dict, resume_step: int | None) -> Any:
        """Start a W&B run from `cfg` when it is enabled and wandb imports; else None."""
        if not cfg.pop("enabled", True):
            return None
        try:
            import wandb as wandb_module  # optional; imported only when asked for
        except ImportError:
            self._console("wandb requested but not installed; logging to TensorBoard and metrics.jsonl only")
            return None
        cfg.setdefault("dir", str(self.run_dir))
        if resume_step is not None:
            cfg.setdefault("resume", "allow")
        try:
            return wandb_module.init(**cfg)
        except Exception as exc:  # noqa: BLE001 - wandb raises many types; a logger must not stop training
            self._count_error("wandb")
            self._console(f"wandb.init failed ({type(exc).__name__}: {exc}); continuing without it")
            return None

    def _write_record(self, record: dict[str, Any]) -> None:
        """Append one JSON line to metrics.jsonl and flush it."""
        line = json.dumps(_json_safe(record), ensure_ascii=False, allow_nan=False)
        with self._lock:
            if self._jsonl is None:
                return
            try:
                self._jsonl.write(line + "\n")
                self._jsonl.flush()
            except OSError:
                self._count_error("jsonl_write")

    def _add_scalars(self, scalars: Mapping[str, float], step: int) -> None:
        """Write scalars to TensorBoard (and W&B)."""
        with self._lock:
            if self._writer is not None:
                for tag, value in scalars.items():
                    self._writer.add_scalar(tag, value, step)
            if self._wandb_run is not None:
                try:
                    self._wandb_run.log(dict(scalars), step=step)
                except Exception:  # noqa: BLE001 - see _open_wandb
                    self._count_error("wandb")

    def _console(self, line: str) -> None:
        """Print one console line; a closed or narrow-charset terminal never stops training."""
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

    # ---- public logging API ----------------------------------------------------------------

    def log_train(
        self,
        step: int,
        epoch: int,
        values: Mapping[str, float],
        *,
        images_per_s: float,
        data_wait_share: float,
        lr: float,
    ) -> None:
        """Log one training step's values (losses, grad_norm, ...), throughput, data-wait share and LR."""
        if not self.enabled or self._closed:
            return
        step = int(step)
        scalars: dict[str, float] = {}
        for name, value in values.items():
            v = _scalar(value)
            if v is None:
                raise ValueError(f"train value {name!r} must be a real number, got {value!r}")
            scalars[name] = v
        now = self._clock()
        with self._lock:
            self._last_step = step
        self._update_rate(step, now)
        self._train_calls += 1
        wait = float(data_wait_share)
        self._wait_ema = wait if self._wait_ema is None else 0.9 * self._wait_ema + 0.1 * wait

        perf = {"images_per_s": float(images_per_s), "data_wait_share": wait}
        perf.update(self._cuda_memory())
        tb = {f"train/{k}": v for k, v in scalars.items()}
        tb["train/lr"] = float(lr)
        tb.update({f"perf/{k}": v for k, v in perf.items()})
        self._add_scalars(tb, step)
        self._write_record(
            {"type": "train", "step": step, "time": time.time(), "epoch": epoch, **scalars, "lr": float(lr), **perf}
        )

        is_last = self.total_steps > 0 and step >= self.total_steps
        due = self._last_console_t is None or now - self._last_console_t >= self.console_interval_s
        if due or is_last:
            self._last_console_t = now
            self._console(self._progress_line(step, epoch, scalars, perf, float(lr)))
        self._maybe_report_starvation(step)

    def _update_rate(self, step: int, now: float) -> None:
        """Fold the time since the previous log into the smoothed seconds-per-step."""
        ref = self._rate_ref
        self._rate_ref = (step, now)
        if ref is None:
            # The first interval holds start-up (compile, warm caches): start measuring after it.
            return
        d_steps, dt = step - ref[0], now - ref[1]
        if d_steps <= 0 or dt < 0:
            return
        sps = dt / d_steps
        if self._sec_per_step is None:
            self._sec_per_step = sps
        else:
            # Time-based weight: the estimate follows the last ~30 s whatever the log cadence.
            alpha = 1.0 - math.exp(-dt / _ETA_TIME_CONSTANT_S)
            self._sec_per_step += alpha * (sps - self._sec_per_step)

    def eta_seconds(self) -> float | None:
        """Estimated seconds to total_steps from the smoothed step rate (None until measurable)."""
        if self.total_steps <= 0 or self._sec_per_step is None or self._rate_ref is None:
            return None
        return max(0, self.total_steps - self._rate_ref[0]) * self._sec_per_step

    @staticmethod
    def _cuda_memory() -> dict[str, float]:
        """Peak allocated and reserved CUDA memory in GiB, only when this process already uses CUDA."""
        if not (torch.cuda.is_available() and torch.cuda.is_initialized()):
            return {}
        return {
            "gpu_mem_max_allocated_gb": torch.cuda.max_memory_allocated() / _GIB,
            "gpu_mem_reserved_gb": torch.cuda.memory_reserved() / _GIB,
        }

    def _progress_line(
        self, step: int, epoch: int, scalars: Mapping[str, float], perf: Mapping[str, float], lr: float
    ) -> str:
        """'ep 1 step 120/2000 loss 12.345 lr 3.0e-04 412 img/s wait 3% ETA 4m12s' (+ GPU memory)."""
        parts = [f"ep {epoch}", f"step {step}/{self.total_steps}" if self.total_steps > 0 else f"step {step}"]
        if "loss" in scalars:
            parts.append(f"loss {scalars['loss']:.5g}")
        parts.append(f"lr {lr:.1e}")
        parts.append(f"{perf['images_per_s']:.0f} img/s")
        parts.append(f"wait {perf['data_wait_share'] * 100:.0f}%")
        eta = self.eta_seconds()
        if self.total_steps > 0:
            parts.append(f"ETA {format_duration(eta) if eta is not None else '--'}")
        if "gpu_mem_max_allocated_gb" in perf:
            parts.append(f"mem {perf['gpu_mem_max_allocated_gb']:.1f}/{perf['gpu_mem_reserved_gb']:.1f}GB")
        return " ".join(parts)

    def _maybe_report_starvation(self, step: int) -> None:
        """Once per run, say so when the GPU spends a large share of its time waiting for data."""
        if self._starved_reported or self._train_calls < _STARVED_MIN_CALLS or self._wait_ema is None:
            return
        if self._wait_ema > _STARVED_WAIT_SHARE:
            self._starved_reported = True
            self.log_event(
                step,
                "data_starved",
                wait_share=round(self._wait_ema, 3),
                hint="the model waits for data; raise data.num_workers or use the prepared cache",
            )

    def log_scalars(self, step: int, values: Mapping[str, float], *, prefix: str, kind: str = "train") -> None:
        """Log arbitrary numeric values as `prefix/name` (e.g. a tracker snapshot); non-numbers are skipped."""
        if not self.enabled or self._closed:
            return
        scalars = {k: v for k, v in ((k, _scalar(v)) for k, v in values.items()) if v is not None}
        if not scalars:
            return
        self._add_scalars({f"{prefix}/{k}": v for k, v in scalars.items()}, int(step))
        self._write_record(
            {"type": kind, "step": int(step), "time": time.time(), **{f"{prefix}/{k}": v for k, v in scalars.items()}}
        )

    def log_validation(self, step: int, metrics: Mapping[str, object]) -> None:
        """Log every numeric scalar of `metrics` under val/... (nested dicts flattened with '/'); one console line."""
        if not self.enabled or self._closed:
            return
        step = int(step)
        scalars: dict[str, float] = {}
        for name, value in flatten_dict(metrics, sep="/").items():
            v = _scalar(value)
            if v is not None:
                scalars[name] = v  # lists, per-tag arrays, strings: not scalars, skipped
        self._add_scalars({f"val/{k}": v for k, v in scalars.items()}, step)
        self._write_record({"type": "val", "step": step, "time": time.time(), **scalars})
        self._console(self._validation_line(step, scalars))

    def _validation_line(self, step: int, scalars: Mapping[str, float]) -> str:
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
        m = scalars.get("mAP")
        if m is not None and math.isfinite(m):
            if self._best_map is None or m > self._best_map[0]:
                self._best_map = (m, step)
        if self._best_map is not None:
            parts.append(f"best mAP {self._best_map[0]:.4f} @ {self._best_map[1]}")
        return " ".join(parts)

    def log_pr_curve(
        self,
        step: int,
        tag_name: str,
        pos_hist: object,
        neg_hist: object,
        *,
        bin_edges: object | None = None,
        num_thresholds: int | None = None,
    ) -> None:
        """Write a PR curve for `tag_name` under val/pr/ from binned score histograms (see pr_curve_from_histograms)."""
        if not self.enabled or self._closed:
            return
        curve = pr_curve_from_histograms(pos_hist, neg_hist, bin_edges, num_thresholds)
        with self._lock:
            if self._writer is None:
                return
            self._writer.add_pr_curve_raw(
                f"val/pr/{tag_name}",
                curve["tp"],
                curve["fp"],
                curve["tn"],
                curve["fn"],
                curve["precision"],
                curve["recall"],
                global_step=int(step),
                num_thresholds=int(curve["tp"].size),
            )

    def log_image_grid(self, step: int, images: torch.Tensor | np.ndarray, captions: list[str]) -> None:
        """Write one grid image under val/examples: uint8 images (N, 3, H, W) with their captions below."""
        if not self.enabled or self._closed:
            return
        grid = render_image_grid(images, captions)  # (H', W', 3) uint8
        with self._lock:
            if self._writer is not None:
                self._writer.add_image("val/examples", grid, int(step), dataformats="HWC")

    def log_hparams(self, hparams: dict, metrics: dict) -> None:
        """Record the run's hyper-parameters (nested dicts flattened with '.') and metrics as hparams/<name>."""
        if not self.enabled or self._closed:
            return
        flat: dict[str, Any] = {}
        for key, value in flatten_dict(hparams).items():
            if isinstance(value, (bool, str)):
                flat[key] = value
            elif _scalar(value) is not None:
                flat[key] = _scalar(value)
            else:
                flat[key] = str(value)  # None, lists, paths: the hparams plugin only takes str/num/bool
        metric_values: dict[str, float] = {}
        for key, value in flatten_dict(metrics, sep="/").items():
            v = _scalar(value)
            if v is None:
                raise ValueError(f"hparams metric {key!r} must be a real number, got {value!r}")
            metric_values[f"hparams/{key}"] = v
        step = self._last_step
        with self._lock:
            if self._writer is not None:
                from torch.utils.tensorboard.summary import hparams as hparams_summary

                exp, ssi, sei = hparams_summary(flat, metric_values)
                for summary in (exp, ssi, sei):
                    self._writer.file_writer.add_summary(summary, step)
            if self._wandb_run is not None:
                try:
                    self._wandb_run.config.update(flat, allow_val_change=True)
                except Exception:  # noqa: BLE001 - see _open_wandb
                    self._count_error("wandb")
        self._add_scalars(metric_values, step)
        self._write_record({"type": "event", "step": step, "time": time.time(), "kind": "hparams",
                            "hparams": flat, "metrics": metric_values})

    def log_event(self, step: int, kind: str, **fields: Any) -> None:
        """Record a discrete event (checkpoint saved, skipped step, resumed, ...) in metrics.jsonl and the console."""
        if not self.enabled or self._closed:
            return
        record = {"type": "event", "step": int(step), "time": time.time(), "kind": str(kind), **fields}
        self._write_record(record)
        detail = " ".join(f"{k}={_json_safe(v)}" for k, v in fields.items())
        self._console(f"[{kind}] step {int(step)}" + (f" {detail}" if detail else ""))

    # ---- system statistics -----------------------------------------------------------------

    def sample_system_stats(self) -> dict[str, float]:
        """One reading of CPU, RAM, process and DataLoader-worker RSS, disk free and (NVML) GPU state."""
        out: dict[str, float] = {}
        try:
            out["cpu_percent"] = float(psutil.cpu_percent(None))
            vm = psutil.virtual_memory()
            out["ram_percent"] = float(vm.percent)
            out["ram_used_gb"] = (vm.total - vm.available) / _GIB
        except (psutil.Error, OSError):
            self._count_error("system_stats")
        proc = getattr(self, "_process", None) or psutil.Process()
        try:
            with proc.oneshot():
                out["process_rss_gb"] = proc.memory_info().rss / _GIB
                out["process_cpu_percent"] = float(proc.cpu_percent(None))
        except (psutil.Error, OSError):
            self._count_error("system_stats")
        workers_rss = 0
        try:
            children = proc.children(recursive=True)
        except (psutil.Error, OSError):
            children = []
            self._count_error("system_stats")
        for child in children:
            try:
                workers_rss += child.memory_info().rss
            except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
                continue  # workers come and go between listing and reading
        out["workers_rss_gb"] = workers_rss / _GIB
        out["workers"] = float(len(children))
        try:
            out["disk_free_gb"] = psutil.disk_usage(str(self.run_dir)).free / _GIB
        except (psutil.Error, OSError):
            self._count_error("system_stats")
        if self._gpu is not None:
            gpu_values, failures = self._gpu.sample()
            out.update(gpu_values)
            for _ in range(failures):
                self._count_error("nvml")
        return out

    def _system_loop(self) -> None:
        """Daemon thread body: sample at once (so every run has a reading), then every interval until close()."""
        while True:
            stats = self.sample_system_stats()
            with self._lock:
                if self._closed:
                    return
                step = self._last_step
                self._add_scalars({f"system/{k}": v for k, v in stats.items()}, step)
            self._write_record({"type": "system", "step": step, "time": time.time(), **stats})
            if self._stop.wait(self.system_stats_interval_s):
                return

    # ---- shutdown --------------------------------------------------------------------------

    def flush(self) -> None:
        """Push buffered TensorBoard events and JSON lines to disk."""
        if not self.enabled:
            return
        with self._lock:
            if self._writer is not None:
                self._writer.flush()
            if self._jsonl is not None:
                self._jsonl.flush()

    def close(self) -> None:
        """Stop the system thread, flush and close every writer; safe to call twice."""
        if not self.enabled or self._closed:
            return
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=max(5.0, self.system_stats_interval_s))
        with self._lock:
            self._closed = True
            if self._writer is not None:
                self._writer.flush()
                self._writer.close()
                self._writer = None
            if self._jsonl is not None:
                self._jsonl.close()
                self._jsonl = None
            if self._wandb_run is not None:
                try:
                    self._wandb_run.finish()
                except Exception:  # noqa: BLE001 - see _open_wandb
                    self._count_error("wandb")
                self._wandb_run = None
        if self._gpu is not None:
            self._gpu.close()
            self._gpu = None
