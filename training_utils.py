"""Training machinery: checkpoints (sync and async), mixed precision, schedules with restarts,
early stopping, weight EMA and reproducible RNG state.

A checkpoint is a folder `checkpoints/step_<N>/` holding `model.safetensors` (and
`ema.safetensors`), `training_state.pt` (tensors and plain types only, read back with
`weights_only=True`), `config.yaml`, `vocabulary.json`, `model_config.json`, `preprocess.json`
and a `COMPLETE` marker written last. It is written into a hidden temporary folder and moved into
place with `os.replace`, so a crash mid-write never leaves a folder that looks complete.
`checkpoints/last` and `checkpoints/best` are text files naming a step folder (no symlinks).
"""

from __future__ import annotations

import contextlib
import os
import pickle
import random
import shutil
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from Configuration_System import atomic_write_text, load_json_file, replace_with_retry
from schedulers import warmup_cosine_factor

CHECKPOINT_FORMAT_VERSION = 1
COMPLETE_MARKER = "COMPLETE"


# --------------------------------------------------------------------------------------------
# Reproducibility
# --------------------------------------------------------------------------------------------

def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (all devices)."""
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


def capture_rng_state() -> dict[str, Any]:
    """Every global RNG state as tensors and plain types (loadable with weights_only=True)."""
    version, py_state, gauss = random.getstate()
    np_name, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    state: dict[str, Any] = {
        "python": {"version": version, "state": torch.tensor(py_state, dtype=torch.int64), "gauss": gauss},
        "numpy": {"name": np_name, "keys": torch.from_numpy(np_keys.astype(np.int64)), "pos": int(np_pos),
                  "has_gauss": int(np_has_gauss), "gauss": float(np_gauss)},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: Mapping[str, Any]) -> None:
    """Restore what capture_rng_state returned."""
    py = state["python"]
    random.setstate((py["version"], tuple(int(v) for v in py["state"].tolist()), py["gauss"]))
    nps = state["numpy"]
    np.random.set_state((nps["name"], nps["keys"].numpy().astype(np.uint32), nps["pos"], nps["has_gauss"], nps["gauss"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# --------------------------------------------------------------------------------------------
# Schedules and early stopping
# --------------------------------------------------------------------------------------------

class CosineAnnealingWarmupRestarts(torch.optim.lr_scheduler.LRScheduler):
    """Cosine cycles with a linear warm-up at the start of each, optionally growing and decaying.

    Cycle k lasts `first_cycle_steps * cycle_mult**k` steps; its peak is `base_lr * gamma**k`; each
    cycle warms up linearly over `warmup_steps` and then decays to `min_lr_ratio * peak`. Closed form
    from the step count, so it resumes exactly from its state dict.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, *, first_cycle_steps: int, warmup_steps: int = 0,
                 cycle_mult: float = 1.0, gamma: float = 1.0, min_lr_ratio: float = 0.0,
                 last_epoch: int = -1) -> None:
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


class EarlyStopping:
    """Stops when a higher-is-better metric has not improved by min_delta for `patience` checks."""

    def __init__(self, patience: int, min_delta: float = 0.0) -> None:
        if patience < 0:
            raise ValueError(f"patience must be >= 0, got {patience}")
        self.patience = patience
        self.min_delta = min_delta
        self.best: float | None = None
        self.bad_checks = 0

    def update(self, value: float) -> bool:
        """Record a metric; returns True when the run should stop."""
        if self.best is None or value > self.best + self.min_delta:
            self.best = value
            self.bad_checks = 0
        else:
            self.bad_checks += 1
        return self.patience > 0 and self.bad_checks >= self.patience

    def state_dict(self) -> dict[str, Any]:
        """Plain-type state for checkpoints."""
        return {"best": self.best, "bad_checks": self.bad_checks}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore state_dict()."""
        self.best = state["best"]
        self.bad_checks = int(state["bad_checks"])


# --------------------------------------------------------------------------------------------
# EMA
# --------------------------------------------------------------------------------------------

class ModelEma:
    """Exponential moving average of a model's floating-point parameters and buffers.

    The update runs on the device without host syncs; a step flagged as skipped (non-finite)
    leaves the average untouched. Decay ramps up as `min(decay, (1 + s) / (warmup + s))` when a
    warm-up is set, so early averages are not dominated by the random initialisation.
    """

    def __init__(self, model: torch.nn.Module, decay: float, warmup_steps: int = 0) -> None:
        if not 0.0 < decay < 1.0:
            raise ValueError(f"EMA decay must be in (0, 1), got {decay}")
        self.decay = decay
        self.warmup_steps = warmup_steps
        self.names = [n for n, t in model.state_dict().items() if t.is_floating_point()]
        self.shadow = {n: t.detach().clone().float() for n, t in model.state_dict().items() if n in self.names}

    def decay_at(self, step: int) -> float:
        """The decay used for the update after optimizer step `step` (0-based)."""
        if self.warmup_steps <= 0:
            return self.decay
        return min(self.decay, (1.0 + step) / (self.warmup_steps + step))

    @torch.no_grad()
    def update(self, model: torch.nn.Module, step: int, skipped: torch.Tensor | None = None) -> None:
        """Move the average towards the model; `skipped` (0-dim bool tensor) turns it off on device."""
        weight = torch.tensor(1.0 - self.decay_at(step), dtype=torch.float32)
        state = model.state_dict()
        ema = [self.shadow[n] for n in self.names]
        current = [state[n].detach().float() for n in self.names]
        w = weight.to(ema[0].device)
        if skipped is not None:
            w = w * (~skipped).to(w.dtype)
        diffs = torch._foreach_sub(current, ema)
        torch._foreach_mul_(diffs, w)
        torch._foreach_add_(ema, diffs)

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The averaged tensors (float32), keyed like the model's state dict."""
        return dict(self.shadow)

    def load_state_dict(self, state: Mapping[str, torch.Tensor]) -> None:
        """Restore averaged tensors saved with state_dict()."""
        missing = [n for n in self.names if n not in state]
        if missing:
            raise ValueError(f"EMA state is missing {len(missing)} tensors, e.g. {missing[:3]}")
        for n in self.names:
            self.shadow[n].copy_(state[n])

    def copy_to(self, model: torch.nn.Module) -> None:
        """Load the averaged weights into a model of the same architecture."""
        model_state = model.state_dict()
        with torch.no_grad():
            for n in self.names:
                model_state[n].copy_(self.shadow[n])


# --------------------------------------------------------------------------------------------
# Mixed precision and the optimizer update
# --------------------------------------------------------------------------------------------

PRECISION_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def autocast_context(precision: str, device: torch.device) -> contextlib.AbstractContextManager:
    """The autocast context of a resolved precision (no autocast for fp32)."""
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=PRECISION_DTYPES[precision])


def resolve_precision(precision: str, device: torch.device) -> str:
    """'auto' becomes bf16 on CUDA and fp32 elsewhere; bf16/fp16 on CPU fall back to fp32 for fp16."""
    if precision == "auto":
        return "bf16" if device.type == "cuda" else "fp32"
    if precision == "fp16" and device.type != "cuda":
        raise ValueError("training.precision=fp16 needs a CUDA device; use bf16 or fp32 on CPU")
    return precision


class MixedPrecisionTrainer:
    """Autocast, loss scaling, gradient accumulation, clipping and the guarded optimizer step.

    The update is refused on the device when the loss or the gradient norm is not finite: the
    fused AdamW kernel reads a `found_inf` flag and leaves weights and moments untouched, so there
    is no host sync in the step. Skips are counted on the device and read at log time.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, device: torch.device, precision: str,
                 grad_clip: float = 0.0) -> None:
        if not getattr(optimizer, "_step_supports_amp_scaling", False):
            raise ValueError(f"{type(optimizer).__name__} cannot skip a step on the device; use a fused optimizer (AdamW(fused=True))")
        self.optimizer = optimizer
        self.device = device
        self.precision = resolve_precision(precision, device)
        self.grad_clip = grad_clip
        self.dtype = PRECISION_DTYPES[self.precision]
        self.scaler = torch.amp.GradScaler("cuda") if self.precision == "fp16" else None
        self.skipped_total = torch.zeros((), dtype=torch.int64, device=device)
        self.consecutive_skips = torch.zeros((), dtype=torch.int64, device=device)
        self.max_consecutive_skips = torch.zeros((), dtype=torch.int64, device=device)
        self._loss_ok = torch.ones((), dtype=torch.bool, device=device)

    def autocast(self) -> contextlib.AbstractContextManager:
        """The autocast context for forward and loss."""
        return autocast_context(self.precision, self.device)

    def backward(self, loss: torch.Tensor, window: int) -> None:
        """Backward of one micro-batch of an accumulation window of `window` micro-batches."""
        self._loss_ok = self._loss_ok & torch.isfinite(loss.detach())
        scaled = loss / window
        if self.scaler is not None:
            scaled = self.scaler.scale(scaled)
        scaled.backward()

    def step(self, parameters: list[torch.nn.Parameter]) -> tuple[torch.Tensor, torch.Tensor]:
        """Clip and apply the update unless non-finite; returns (grad_norm, skipped) device tensors."""
        if self.scaler is not None:
            self.scaler.unscale_(self.optimizer)
        if self.grad_clip > 0:
            grad_norm = torch.nn.utils.clip_grad_norm_(parameters, self.grad_clip, foreach=True)
        else:
            grad_norm = torch.nn.utils.get_total_norm([p.grad for p in parameters if p.grad is not None], foreach=True)
        skipped = ~(self._loss_ok & torch.isfinite(grad_norm))
        if self.scaler is not None:
            # A non-finite loss gives non-finite gradients, which GradScaler already skips on.
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.found_inf = skipped.to(torch.float32)
            self.optimizer.grad_scale = None
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self._count(skipped)
        self._loss_ok = torch.ones((), dtype=torch.bool, device=self.device)
        return grad_norm.detach(), skipped

    def _count(self, skipped: torch.Tensor) -> None:
        s = skipped.to(torch.int64)
        self.skipped_total += s
        self.consecutive_skips = (self.consecutive_skips + 1) * s
        self.max_consecutive_skips = torch.maximum(self.max_consecutive_skips, self.consecutive_skips)

    def state_dict(self) -> dict[str, Any]:
        """Scaler and skip counters."""
        return {
            "precision": self.precision,
            "scaler": self.scaler.state_dict() if self.scaler is not None else None,
            "skipped_total": int(self.skipped_total.item()),
            "consecutive_skips": int(self.consecutive_skips.item()),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore state_dict() (the precision itself comes from the config)."""
        if self.scaler is not None and state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
        self.skipped_total.fill_(int(state.get("skipped_total", 0)))
        self.consecutive_skips.fill_(int(state.get("consecutive_skips", 0)))
        self.max_consecutive_skips.fill_(int(state.get("consecutive_skips", 0)))


# --------------------------------------------------------------------------------------------
# Checkpoints
# --------------------------------------------------------------------------------------------

def _to_cpu(obj: Any) -> Any:
    """Deep copy of nested containers with every tensor copied to the CPU."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().to("cpu", copy=True)
    if isinstance(obj, dict):
        return {k: _to_cpu(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_to_cpu(v) for v in obj)
    return obj


@dataclass
class CheckpointPayload:
    """Everything one checkpoint folder holds, already on the CPU."""

    step: int
    model_state: dict[str, torch.Tensor]
    training_state: dict[str, Any]
    files: dict[str, str]                       # extra text files: name -> content
    ema_state: dict[str, torch.Tensor] | None = None
    is_best: bool = False


def _save_safetensors(tensors: Mapping[str, torch.Tensor], path: Path) -> None:
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path))


def _fsync_dir_files(folder: Path) -> None:
    for p in folder.iterdir():
        # "r+b": Windows flushes only handles opened for writing
        with open(p, "r+b") as fh:
            os.fsync(fh.fileno())


class CheckpointManager:
    """Writes, lists, resolves and prunes the checkpoint folders of one run."""

    def __init__(self, checkpoint_dir: str | Path, keep_last: int = 3) -> None:
        if keep_last < 1:
            raise ValueError(f"keep_last must be >= 1, got {keep_last}")
        self.dir = Path(checkpoint_dir)
        self.keep_last = keep_last

    # ---- writing -----------------------------------------------------------------------
    def write(self, payload: CheckpointPayload) -> Path:
        """Write one checkpoint folder atomically, update pointers, prune; returns the folder."""
        self.dir.mkdir(parents=True, exist_ok=True)
        name = f"step_{payload.step}"
        final = self.dir / name
        tmp = self.dir / f".tmp_{name}_{os.getpid()}"
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir()
        try:
            _save_safetensors(payload.model_state, tmp / "model.safetensors")
            if payload.ema_state is not None:
                _save_safetensors(payload.ema_state, tmp / "ema.safetensors")
            torch.save(payload.training_state, tmp / "training_state.pt")
            for fname, text in payload.files.items():
                (tmp / fname).write_text(text, encoding="utf-8")
            _fsync_dir_files(tmp)
            (tmp / COMPLETE_MARKER).write_text(f"step {payload.step}\n", encoding="utf-8")
            if final.exists():  # a rewrite of the same step (e.g. final save after a periodic one)
                shutil.rmtree(final)
            replace_with_retry(tmp, final)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        atomic_write_text(self.dir / "last", name + "\n")
        if payload.is_best:
            atomic_write_text(self.dir / "best", name + "\n")
        self.prune()
        return final

    def prune(self) -> None:
        """Delete complete step folders beyond the newest keep_last, never the best or last."""
        keep = {self._pointer("best"), self._pointer("last")}
        steps = self.complete_steps()
        for step, path in steps[:-self.keep_last]:
            if path.name not in keep:
                shutil.rmtree(path, ignore_errors=True)

    # ---- reading -----------------------------------------------------------------------
    def _pointer(self, name: str) -> str | None:
        p = self.dir / name
        if not p.is_file():
            return None
        return p.read_text(encoding="utf-8").strip() or None

    def complete_steps(self) -> list[tuple[int, Path]]:
        """(step, folder) of every complete checkpoint, oldest first."""
        found = []
        if not self.dir.is_dir():
            return found
        for p in self.dir.iterdir():
            if p.is_dir() and p.name.startswith("step_") and (p / COMPLETE_MARKER).is_file():
                try:
                    found.append((int(p.name[5:]), p))
                except ValueError:
                    continue  # a user's folder like step_old: not ours
        return sorted(found)

    def latest(self) -> Path | None:
        """The newest complete checkpoint folder (folders without COMPLETE are ignored)."""
        steps = self.complete_steps()
        return steps[-1][1] if steps else None

    @staticmethod
    def resolve(path: str | Path) -> Path:
        """A step folder, or a `last`/`best` pointer file, to a complete step folder."""
        path = Path(path)
        if path.is_file():
            target = path.read_text(encoding="utf-8").strip()
            path = path.parent / target
        if not path.is_dir():
            raise FileNotFoundError(f"checkpoint not found: {path}")
        if not (path / COMPLETE_MARKER).is_file():
            raise FileNotFoundError(f"checkpoint {path} is incomplete (no {COMPLETE_MARKER} marker): it was not fully written")
        return path

    @staticmethod
    def load_model_state(folder: str | Path, ema: bool = False) -> dict[str, torch.Tensor]:
        """Weights from a checkpoint folder (ema=True: the EMA weights)."""
        name = "ema.safetensors" if ema else "model.safetensors"
        path = Path(folder) / name
        if not path.is_file():
            raise FileNotFoundError(f"{path} not found" + (" (the run had no EMA)" if ema else ""))
        return load_file(str(path))

    @staticmethod
    def load_training_state(folder: str | Path) -> dict[str, Any]:
        """training_state.pt, refusing anything but tensors and plain types."""
        path = Path(folder) / "training_state.pt"
        if not path.is_file():
            raise FileNotFoundError(f"{path} not found")
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as exc:
            raise ValueError(f"{path} holds objects other than tensors and plain types; refusing to load it ({str(exc).splitlines()[0]})") from exc
        if not isinstance(state, dict) or state.get("format_version") != CHECKPOINT_FORMAT_VERSION:
            raise ValueError(f"{path} is not a training state of format {CHECKPOINT_FORMAT_VERSION}")
        return state

    @staticmethod
    def read_json(folder: str | Path, name: str) -> dict[str, Any]:
        """A JSON file of a checkpoint folder."""
        return load_json_file(Path(folder) / name, name)


class AsyncCheckpointWriter:
    """Writes checkpoints on a background thread; errors surface in the training loop.

    `submit` takes a payload already copied to the CPU (so training can go on mutating the live
    tensors) and returns at once; at most one write is in flight, a second submit waits for the
    first. A failed write (disk full, permission) is raised by the next `submit`, `check` or
    `wait` call; the earlier checkpoints are untouched because a write only replaces its own
    folder.
    """

    def __init__(self, manager: CheckpointManager, enabled: bool = True,
                 on_written: Callable[[Path, float], None] | None = None) -> None:
        self.manager = manager
        self.enabled = enabled
        self.on_written = on_written
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None

    def _run(self, payload: CheckpointPayload) -> None:
        import time

        start = time.perf_counter()
        try:
            folder = self.manager.write(payload)
        except BaseException as exc:  # re-raised in the training thread by check()
            self._error = exc
            return
        if self.on_written is not None:
            self.on_written(folder, time.perf_counter() - start)

    def submit(self, payload: CheckpointPayload) -> None:
        """Queue a write (waits for the previous one first)."""
        self.wait()
        if not self.enabled:
            self._run(payload)
            self.check()
            return
        self._thread = threading.Thread(target=self._run, args=(payload,), name="checkpoint-writer", daemon=True)
        self._thread.start()

    def check(self) -> None:
        """Raise the error of a failed background write, once."""
        if self._error is not None:
            err, self._error = self._error, None
            raise RuntimeError(f"writing a checkpoint failed: {err}") from err

    def wait(self) -> None:
        """Block until the write in flight is done, then raise its error if any."""
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        self.check()


def snapshot_state(model_state: Mapping[str, torch.Tensor], training_state: Mapping[str, Any],
                   ema_state: Mapping[str, torch.Tensor] | None) -> tuple[dict, dict, dict | None]:
    """Copy model, training and EMA state to the CPU at a step boundary (for async writes)."""
    return (_to_cpu(dict(model_state)), _to_cpu(dict(training_state)),
            _to_cpu(dict(ema_state)) if ema_state is not None else None)


class GracefulStopper:
    """Turns the first Ctrl+C / SIGTERM, or a `STOP` file in the run folder, into a stop request.

    The loop polls `requested` at step boundaries, writes a checkpoint and exits cleanly. A second
    Ctrl+C raises KeyboardInterrupt at once. SIGTERM is hooked where the platform has it (on
    Windows only SIGINT and SIGBREAK reach a console program).
    """

    def __init__(self, stop_file: Path | None = None) -> None:
        import signal

        self.stop_file = stop_file
        self.reason: str | None = None
        self._previous: dict[int, Any] = {}
        self._signals = [signal.SIGINT] + [getattr(signal, n) for n in ("SIGTERM", "SIGBREAK") if hasattr(signal, n)]

    def install(self) -> "GracefulStopper":
        """Hook the signals (main thread only)."""
        import signal

        for sig in self._signals:
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def uninstall(self) -> None:
        """Restore the previous handlers."""
        import signal

        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def _handle(self, signum: int, frame: Any) -> None:
        import signal

        if self.reason is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt  # second Ctrl+C: abort now
        self.reason = signal.Signals(signum).name

    @property
    def requested(self) -> bool:
        """True once a stop was asked for (checks the STOP file too)."""
        if self.reason is None and self.stop_file is not None and self.stop_file.exists():
            self.reason = f"{self.stop_file.name} file"
        return self.reason is not None


class TrainStep:
    """The per-step work of training: forward, loss, backward, guarded update, schedule, EMA.

    `train_direct.py` runs exactly this, and so does `benchmarks/bench_train_step.py`, so the
    benchmark measures the real step. Loss parts and the gradient norm are summed on the device
    (no host sync); `read_and_reset_sums` reads them once per log line.
    """

    def __init__(self, model: torch.nn.Module, raw_model: torch.nn.Module, loss_fn: torch.nn.Module,
                 amp: MixedPrecisionTrainer, scheduler: torch.optim.lr_scheduler.LRScheduler,
                 ema: ModelEma | None, device: torch.device) -> None:
        self.model = model            # what forward runs (maybe DDP and/or compiled)
        self.raw_model = raw_model    # the module whose parameters are updated and saved
        self.loss_fn = loss_fn
        self.amp = amp
        self.scheduler = scheduler
        self.ema = ema
        self.device = device
        self.params = [p for p in raw_model.parameters() if p.requires_grad]
        self.sums: dict[str, torch.Tensor] = {}

    def forward_backward(self, images: torch.Tensor, tag_targets: torch.Tensor, ratings: torch.Tensor,
                         window: int, sync: bool = True) -> None:
        """One micro-batch of a `window`-long accumulation window; `sync=False` skips the DDP
        gradient all-reduce (every micro-batch but the window's last)."""
        ddp = isinstance(self.model, torch.nn.parallel.DistributedDataParallel) or \
            isinstance(getattr(self.model, "_orig_mod", None), torch.nn.parallel.DistributedDataParallel)
        ctx = self.model.no_sync() if (ddp and not sync) else contextlib.nullcontext()
        with ctx:
            with self.amp.autocast():
                outputs = self.model(images)  # {"tag_logits": (B, T), "rating_logits": (B, 4)}
            total, parts = self.loss_fn(outputs, tag_targets, ratings)
            self.amp.backward(total, window)
        self._accumulate("loss", total.detach())
        for name, value in parts.items():
            self._accumulate(f"loss/{name}", value.detach())

    def optimizer_step(self, step: int) -> None:
        """Clip, update unless non-finite, advance the schedule, update the EMA (`step` is the
        number of updates before this one)."""
        grad_norm, skipped = self.amp.step(self.params)
        self.scheduler.step()
        if self.ema is not None:
            self.ema.update(self.raw_model, step, skipped)
        self._accumulate("grad_norm", torch.where(skipped, torch.zeros_like(grad_norm), grad_norm.float()),
                         count=(~skipped).float())

    def _accumulate(self, name: str, value: torch.Tensor, count: torch.Tensor | float = 1.0) -> None:
        s = self.sums.get(name)
        if s is None:
            s = self.sums[name] = torch.zeros(2, dtype=torch.float64, device=self.device)  # sum, count
        s[0] += value.double()
        s[1] += count

    def read_and_reset_sums(self, world_size: int = 1) -> dict[str, float]:
        """Means since the last call, over every rank under DDP (one host sync)."""
        if not self.sums:
            return {}
        names = list(self.sums)
        stacked = torch.stack([self.sums[n] for n in names])  # (K, 2)
        if world_size > 1:
            torch.distributed.all_reduce(stacked)  # every rank's micro-batches: the same numbers as one process
        stacked = stacked.cpu()
        self.sums.clear()
        return {n: (float(s) / float(c) if c > 0 else float("nan")) for n, (s, c) in zip(names, stacked.tolist())}
