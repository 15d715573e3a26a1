"""Training machinery: the guarded optimizer step (autocast, loss scaling, non-finite skip), the
per-step work, weight EMA, the best-metric record, early stopping, stop requests and
reproducible RNG state.

TrainStep runs each batch as equal micro-batches when a split is planned (micro_batching.py: the
same gradient as the unsplit batch) and, when allowed, reacts to an out-of-memory error by
splitting further and running the accumulation window again from its first batch.

Every piece with state that an exact resume needs has `state_dict()` / `load_state_dict()`
returning and accepting tensors and plain types only, so `training_state.pt` loads with
`weights_only=True`. Writing and reading checkpoint folders is `checkpoint_store`'s job.

The seed's names resolve here (OppaiOracle's documented layout; one implementation each, owned
where it says):

* ``CheckpointManager``, ``AsyncCheckpointWriter``: ``checkpoint_store`` (the folder layout,
  pointers, pruning; the background writer);
* ``MixedPrecisionTrainer``: ``GuardedOptimizerStep`` below (autocast, loss scaling, accumulation,
  the non-finite skip);
* ``CosineAnnealingWarmupRestarts``: ``schedulers``.

It imports micro_batching, and checkpoint_store and schedulers for those names only.
"""

from __future__ import annotations

import contextlib
import copy
import gc
import random
import signal
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
import torch.distributed as tdist

from checkpoint_store import AsyncCheckpointWriter, CheckpointManager
from micro_batching import MicroBatchPlan, MicroBatchPlanError, forward_backward_split, is_out_of_memory, micro_batch_candidates
from schedulers import CosineAnnealingWarmupRestarts


class Stateful(Protocol):
    """A piece of a run whose state a checkpoint carries (tensors and plain types only)."""

    def state_dict(self) -> Any:
        """The state to save."""

    def load_state_dict(self, state: Any) -> None:
        """Restore what state_dict() returned."""


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
        "numpy": {
            "name": np_name,
            "keys": torch.from_numpy(np_keys.astype(np.int64)),
            "pos": int(np_pos),
            "has_gauss": int(np_has_gauss),
            "gauss": float(np_gauss),
        },
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


class RankRngStates:
    """The global RNG states of every rank of a job, as one checkpointable component."""

    def __init__(self, rank: int = 0, world_size: int = 1) -> None:
        """This process's rank in a job of `world_size` processes."""
        self.rank = rank
        self.world_size = world_size

    def state_dict(self) -> list[dict[str, Any]]:
        """Every rank's RNG state, index = rank (a collective call under DDP: call it on every rank)."""
        mine = capture_rng_state()
        if self.world_size == 1:
            return [mine]
        gathered: list[Any] = [None] * self.world_size
        tdist.all_gather_object(gathered, mine)
        return gathered

    def load_state_dict(self, states: list[Mapping[str, Any]]) -> None:
        """Restore this rank's entry; ValueError when the job had another number of ranks."""
        if len(states) != self.world_size:
            raise ValueError(f"RNG states of {len(states)} ranks cannot be restored in a job of {self.world_size}")
        restore_rng_state(states[self.rank])


# --------------------------------------------------------------------------------------------
# Best metric and early stopping
# --------------------------------------------------------------------------------------------


class BestMetric:
    """The best value so far of the run's selection metric (higher is better) and its step.

    The run's one record of "best": it picks `checkpoints/best`, and the monitor shows it, so
    the two agree, also after a resume (it is checkpointed). A NaN never beats a number.
    """

    def __init__(self, name: str) -> None:
        """Track the metric called `name` (e.g. mAP)."""
        self.name = name
        self.value: float | None = None
        self.step: int | None = None

    def update(self, step: int, value: float) -> bool:
        """Record one validation result; True when it is a new best."""
        if self.value is None or value > self.value:
            self.value, self.step = float(value), int(step)
            return True
        return False

    def state_dict(self) -> dict[str, Any]:
        """Plain-type state for checkpoints."""
        return {"metric": self.name, "value": self.value, "step": self.step}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore state_dict(); ValueError when it was measured on another metric.

        `metric` None is a checkpoint written before the metric's name was stored: its best was
        by the same validation.selection_metric that the resumed run must use anyway.
        """
        saved = state.get("metric")
        if saved is not None and saved != self.name:
            raise ValueError(
                f"the checkpoint's best is by {saved} but this run selects by {self.name} (validation.selection_metric); resume with {saved}"
            )
        value, step = state.get("value"), state.get("step")
        self.value = None if value is None else float(value)
        self.step = None if step is None else int(step)


class EarlyStopping:
    """Stops when a higher-is-better metric has not improved by min_delta for `patience` checks.

    `baseline` is the last value that improved on its predecessor by more than min_delta: with
    min_delta > 0 it can lag the best value (BestMetric), since smaller gains make a new best
    but do not reset the patience count.
    """

    def __init__(self, patience: int, min_delta: float = 0.0) -> None:
        """Stop after `patience` checks without a gain above `min_delta` (patience 0: never)."""
        if patience < 0:
            raise ValueError(f"patience must be >= 0, got {patience}")
        self.patience = patience
        self.min_delta = min_delta
        self.baseline: float | None = None
        self.bad_checks = 0

    def update(self, value: float) -> bool:
        """Record a metric; returns True when the run should stop."""
        if self.baseline is None or value > self.baseline + self.min_delta:
            self.baseline = value
            self.bad_checks = 0
        else:
            self.bad_checks += 1
        return self.patience > 0 and self.bad_checks >= self.patience

    def state_dict(self) -> dict[str, Any]:
        """Plain-type state for checkpoints (the baseline under the key "best", as format 1 has it)."""
        return {"best": self.baseline, "bad_checks": self.bad_checks}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore state_dict()."""
        self.baseline = state["best"]
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
        """Start the average at the model's current floating-point tensors."""
        if not 0.0 < decay < 1.0:
            raise ValueError(f"EMA decay must be in (0, 1), got {decay}")
        self.decay = decay
        self.warmup_steps = warmup_steps
        # The average lives in a copy of the model, so validating it builds nothing (an EVA02-L takes
        # seconds to build): its float32 tensors are averaged in place; any other tensor, or a second
        # name for a tied one, keeps a float32 copy that averaged_model() loads.
        self.module = copy.deepcopy(model).eval().requires_grad_(False)
        state = self.module.state_dict()
        self.names = [n for n, t in state.items() if t.is_floating_point()]
        self.shadow: dict[str, torch.Tensor] = {}
        self.copied: list[str] = []
        aliased: set[int] = set()
        for n in self.names:
            t = state[n]
            if t.dtype == torch.float32 and t.data_ptr() not in aliased:
                aliased.add(t.data_ptr())
                self.shadow[n] = t
            else:
                self.shadow[n] = t.detach().clone().float()
                self.copied.append(n)

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

    def averaged_model(self) -> torch.nn.Module:
        """The model with the averaged weights (the one copy kept by this EMA, in eval mode)."""
        state = self.module.state_dict()
        with torch.no_grad():
            for n in self.copied:
                state[n].copy_(self.shadow[n])
        return self.module

    def copy_to(self, model: torch.nn.Module) -> None:
        """Load the averaged weights into a model of the same architecture."""
        model_state = model.state_dict()
        with torch.no_grad():
            for n in self.names:
                model_state[n].copy_(self.shadow[n])


# --------------------------------------------------------------------------------------------
# The guarded optimizer step
# --------------------------------------------------------------------------------------------

PRECISION_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def autocast_context(precision: str, device: torch.device) -> contextlib.AbstractContextManager:
    """The autocast context of a resolved precision (no autocast for fp32)."""
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=PRECISION_DTYPES[precision])


def resolve_precision(precision: str, device: torch.device) -> str:
    """'auto' becomes bf16 on CUDA and fp32 elsewhere; fp16 (loss scaling) needs CUDA."""
    if precision == "auto":
        return "bf16" if device.type == "cuda" else "fp32"
    if precision == "fp16" and device.type != "cuda":
        raise ValueError("training.precision=fp16 needs a CUDA device; use bf16 or fp32 on CPU")
    return precision


class GuardedOptimizerStep:
    """The optimizer update with its guards: autocast, loss scaling, gradient accumulation,
    clipping, and no update when the loss or the gradient norm is not finite.

    The update is refused on the device: the fused AdamW kernel reads a `found_inf` flag and
    leaves weights and moments untouched, so there is no host sync in the step. Skips are counted
    on the device and read at log time.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, device: torch.device, precision: str, grad_clip: float = 0.0) -> None:
        """Guard `optimizer` (a fused one: it must skip on the device); precision as in the config."""
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

    def discard_window(self) -> None:
        """Forget the gradients and the loss check of the window so far (no update was made):
        the window is run again, e.g. in smaller micro-batches after an out-of-memory error."""
        self.optimizer.zero_grad(set_to_none=True)
        self._loss_ok = torch.ones((), dtype=torch.bool, device=self.device)

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


class GracefulStopper:
    """Turns the first Ctrl+C / SIGTERM, or a `STOP` file in the run folder, into a stop request.

    The loop polls `requested` at step boundaries, writes a checkpoint and exits cleanly. A second
    Ctrl+C raises KeyboardInterrupt at once. SIGTERM is hooked where the platform has it (on
    Windows only SIGINT and SIGBREAK reach a console program).
    """

    def __init__(self, stop_file: Path | None = None) -> None:
        """Also count `stop_file` appearing as a stop request (None: signals only)."""
        self.stop_file = stop_file
        self.reason: str | None = None
        self._previous: dict[int, Any] = {}
        self._signals = [signal.SIGINT] + [getattr(signal, n) for n in ("SIGTERM", "SIGBREAK") if hasattr(signal, n)]

    def install(self) -> GracefulStopper:
        """Hook the signals (main thread only)."""
        for sig in self._signals:
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def uninstall(self) -> None:
        """Restore the previous handlers."""
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def _handle(self, signum: int, frame: Any) -> None:
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

    `plan` splits each batch into equal micro-batches (None: unsplit). With `adaptive`, an
    out-of-memory error in forward/backward discards the window's gradients (no update was made),
    moves to the next smaller equal split, calls `on_replan(plan, reason)` and runs the window's
    batches again; the window's inputs are kept until its optimizer step for that. One process
    only: under DDP the ranks would have to agree on every retry.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        raw_model: torch.nn.Module,
        loss_fn: torch.nn.Module,
        amp: GuardedOptimizerStep,
        scheduler: torch.optim.lr_scheduler.LRScheduler,
        ema: ModelEma | None,
        device: torch.device,
        *,
        plan: MicroBatchPlan | None = None,
        adaptive: bool = False,
        fault_limit: int | None = None,
        on_replan: Callable[[MicroBatchPlan, str], None] | None = None,
    ) -> None:
        """The pieces of one step; `model` may wrap `raw_model` in DDP and/or torch.compile."""
        self.model = model  # what forward runs (maybe DDP and/or compiled)
        self.raw_model = raw_model  # the module whose parameters are updated and saved
        self.loss_fn = loss_fn
        self.amp = amp
        self.scheduler = scheduler
        self.ema = ema
        self.device = device
        self.params = [p for p in raw_model.parameters() if p.requires_grad]
        self.sums: dict[str, torch.Tensor] = {}
        self.plan = plan
        self.adaptive = adaptive
        self.fault_limit = fault_limit  # micro_batching's injected test fault (None in real runs)
        self.on_replan = on_replan
        self.replans = 0
        self._window: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor, int, bool]] = []
        self._pending: list[tuple[torch.Tensor, dict[str, torch.Tensor]]] = []  # losses of the window so far

    def micro_batch(self, batch_size: int) -> int:
        """Images per forward/backward pass for a batch of `batch_size`."""
        return batch_size if self.plan is None else self.plan.micro_batch

    def forward_backward(self, images: torch.Tensor, tag_targets: torch.Tensor, ratings: torch.Tensor, window: int, sync: bool = True) -> None:
        """One batch of a `window`-long accumulation window; `sync=False` skips the DDP gradient
        all-reduce (every batch but the window's last)."""
        if self.adaptive:
            self._window.append((images, tag_targets, ratings, window, sync))
        failure = None
        try:
            self._pending.append(self._pass(images, tag_targets, ratings, window, sync))
        except RuntimeError as exc:  # torch.cuda.OutOfMemoryError is a RuntimeError
            if not (self.adaptive and is_out_of_memory(exc)):
                raise
            failure = _first_line(exc)
        if failure is not None:  # outside the except block: the failed pass's tensors are freed
            self._run_window_again(images.shape[0], failure)

    def _pass(
        self, images: torch.Tensor, tag_targets: torch.Tensor, ratings: torch.Tensor, window: int, sync: bool
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        return forward_backward_split(
            self.model,
            self.loss_fn,
            self.amp,
            images,
            tag_targets,
            ratings,
            micro_batch=self.micro_batch(images.shape[0]),
            window=window,
            sync=sync,
            fault_limit=self.fault_limit,
        )

    def _run_window_again(self, batch_size: int, failure: str) -> None:
        """Split further after an out-of-memory error and redo the window's batches until they fit."""
        while True:
            current = self.micro_batch(batch_size)
            smaller = [m for m in micro_batch_candidates(batch_size) if m < current]
            if not smaller:
                raise MicroBatchPlanError(
                    f"data.batch_size={batch_size}: out of memory even in micro-batches of 1 image ({failure}); "
                    "use a smaller model (model.preset) or image size (data.image_size), "
                    "or set model.grad_checkpoint_every=1"
                )
            self.plan = MicroBatchPlan(batch_size, smaller[0])
            self.replans += 1
            self.amp.discard_window()
            self._pending.clear()
            _free_memory()
            if self.on_replan is not None:
                self.on_replan(self.plan, failure)
            failure = None
            try:
                for images, tag_targets, ratings, window, sync in self._window:
                    self._pending.append(self._pass(images, tag_targets, ratings, window, sync))
                return
            except RuntimeError as exc:
                if not is_out_of_memory(exc):
                    raise
                failure = _first_line(exc)

    def optimizer_step(self, step: int) -> None:
        """Clip, update unless non-finite, advance the schedule, update the EMA (`step` is the
        number of updates before this one)."""
        for total, parts in self._pending:  # the window's losses, in batch order
            self._accumulate("loss", total)
            for name, value in parts.items():
                self._accumulate(f"loss/{name}", value)
        self._pending.clear()
        self._window.clear()
        grad_norm, skipped = self.amp.step(self.params)
        self.scheduler.step()
        if self.ema is not None:
            self.ema.update(self.raw_model, step, skipped)
        self._accumulate("grad_norm", torch.where(skipped, torch.zeros_like(grad_norm), grad_norm.float()), count=(~skipped).float())

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


def _first_line(exc: BaseException) -> str:
    """An exception's first line, for a one-line log."""
    text = str(exc).strip()
    return text.splitlines()[0][:300] if text else type(exc).__name__


def _free_memory() -> None:
    """Return a failed pass's blocks to the device before trying again."""
    gc.collect()
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.empty_cache()


# The seed's name for the mixed-precision optimizer step (see the module docstring).
MixedPrecisionTrainer = GuardedOptimizerStep

__all__ = [
    "AsyncCheckpointWriter",
    "BestMetric",
    "CheckpointManager",
    "CosineAnnealingWarmupRestarts",
    "EarlyStopping",
    "GracefulStopper",
    "GuardedOptimizerStep",
    "MixedPrecisionTrainer",
    "ModelEma",
    "RankRngStates",
    "Stateful",
    "TrainStep",
    "autocast_context",
    "capture_rng_state",
    "resolve_precision",
    "restore_rng_state",
    "seed_everything",
]
