"""Fit a run to the machine before it starts: DataLoader workers, CPU memory and the micro-batch split.

- `default_num_workers`: the cores this process may use (os.sched_getaffinity where it exists,
  else os.cpu_count: the count torch.utils.data.DataLoader compares num_workers with before it
  warns), shared by the local processes of a torchrun job (LOCAL_WORLD_SIZE), one core left to each
  main process, at most DEFAULT_WORKER_CAP.
- `check_cpu_memory`: on a CPU the operating system kills a process that runs out of memory
  (signal 9, no message, no checkpoint), so the run is checked before it starts. A child process
  runs one real training step (what a process gains for good by training: imported code, thread
  pools), then measures the peak resident memory of forward+backward passes of the configured
  network (same width, heads, image size, tags, precision, gradient checkpointing) with one and
  two images at one block (one checkpointing period) and two images at two. Memory grows linearly
  with depth and batch, so the full depth and batch follow by extrapolation. Either backbone
  family: a timm model with a plain stack of blocks (ViT, EVA02: its `depth` argument) is
  extrapolated the same way; a staged one (SwinV2, ConvNeXt) is measured whole at one and two
  images. A frozen body (training.freeze_body_steps) is not assumed: the estimate is of the
  unfrozen step, the larger one. Parameters,
  gradients, AdamW moments, the EMA and the checkpoint snapshot are added from the parameter
  count; DataLoader workers at the measured size of a fresh interpreter each (an upper bound for
  forked workers, which share pages at first), plus the batches they hold. The total is compared
  with the memory available now, less SAFETY_FRACTION of physical memory; a run that does not fit
  gets one line naming data.batch_size and the largest batch (and micro-batch) that fits. For
  ViT-B at 448 px it takes 8-20 s on 2 shared cores (gradient checkpointing every 2 blocks: ~30 s).

The child runs with MALLOC_MMAP_THRESHOLD_ set (glibc; other platforms ignore it) so that freed
blocks go back to the system at once and its peaks measure live memory: the estimate is of live
memory, and benchmarks/bench_memory_estimate.py checks it against real training steps. A large run
allocates its tensors that way anyway (glibc maps blocks above 32 MiB directly; ViT-B at 448 px
from batch 14 on). A run whose activation tensors are smaller keeps freed blocks in glibc's heap
and holds more than its live memory (measured: 1.14-1.26x, 1.6x with gradient checkpointing); such
a run has at most about depth x 136 MiB of activations (ViT-B: 1.6 GiB), mostly within the safety
margin. Run as a script, this module is that child (`python machine_fit.py probe SPEC_JSON`).

The last section applies these to a run's config (train_direct calls it before the first step):
`resolve_num_workers` (data.num_workers=-1), `cpu_memory_message` (training.memory_check) and
`choose_micro_batches` (training.micro_batch_size; the CUDA probe of micro_batching).
"""

from __future__ import annotations

import gc
import json
import math
import os
import subprocess
import sys
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import psutil
import torch

from Configuration_System import RootConfig
from loss_functions import AsymmetricFocalLoss, MultiTaskLoss
from micro_batching import MicroBatchPlan, agree_across_ranks, injected_oom_limit, make_step_probe, micro_batch_candidates, plan_micro_batches
from process_group import usable_cpu_count
from timm_tagger import Tagger, TaggerConfig, TimmTaggerConfig, build_tagger, tagger_config_from_dict, uniform_depth
from training_utils import GuardedOptimizerStep, TrainStep, autocast_context, resolve_precision

__all__ = [
    "DEFAULT_WORKER_CAP",
    "MICRO_BATCH_KEY",
    "MemoryEstimate",
    "PeakRss",
    "StepMemoryProfile",
    "StepShape",
    "cgroup_memory",
    "check_cpu_memory",
    "choose_micro_batches",
    "cpu_memory_message",
    "default_num_workers",
    "describe_plan",
    "estimate_training_memory",
    "local_process_count",
    "memory_budget",
    "memory_message",
    "profile_step_memory",
    "resolve_num_workers",
    "saved_plan",
    "usable_cpu_count",
]

DEFAULT_WORKER_CAP = 8  # more workers rarely help one training process and each costs memory
SAFETY_FRACTION = 0.10  # share of physical memory kept free (page cache, other programs, error)
PROBE_TIMEOUT_S = 600
GRAD_CHECKPOINT_KEY = "model.grad_checkpoint_every"
BATCH_KEY = "data.batch_size"


# --------------------------------------------------------------------------------------------
# DataLoader workers
# --------------------------------------------------------------------------------------------


def local_process_count(environ: dict[str, str] | None = None) -> int:
    """Training processes on this machine: LOCAL_WORLD_SIZE under torchrun, else 1."""
    value = (os.environ if environ is None else environ).get("LOCAL_WORLD_SIZE", "1")
    if not value.strip().isdigit() or int(value) < 1:
        raise ValueError(f"LOCAL_WORLD_SIZE={value!r} is not a positive integer")
    return int(value)


def default_num_workers(cpus: int | None = None, local_processes: int | None = None, cap: int = DEFAULT_WORKER_CAP) -> int:
    """Workers per training process: its share of the CPUs minus one for itself, at most `cap`.

    Never above the CPU count, so DataLoader does not warn; 0 (load in the main process) when a
    process has a single core.
    """
    cpus = usable_cpu_count() if cpus is None else cpus
    local_processes = local_process_count() if local_processes is None else local_processes
    share = cpus // max(1, local_processes)
    return max(0, min(cap, share - 1, cpus))


# --------------------------------------------------------------------------------------------
# Measuring a step in a child process
# --------------------------------------------------------------------------------------------


def _rss_bytes() -> int:
    return psutil.Process().memory_info().rss


class PeakRss:
    """Peak resident memory of this process inside a `with` block, in bytes above its start.

    Linux: the kernel's high-water mark (VmHWM), reset on entry through /proc/self/clear_refs.
    Elsewhere (or where clear_refs is not writable) a thread samples the RSS every millisecond.
    """

    def __init__(self) -> None:
        """Prepare; `peak` is set when the block ends."""
        self.start = 0
        self.peak = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._sampled = 0

    @staticmethod
    def _reset_hwm() -> bool:
        try:
            with open("/proc/self/clear_refs", "w", encoding="ascii") as fh:
                fh.write("5")
            return True
        except OSError:
            return False

    @staticmethod
    def _hwm() -> int:
        with open("/proc/self/status", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
        raise OSError("/proc/self/status has no VmHWM line")

    def _sample(self) -> None:
        while not self._stop.wait(0.001):
            self._sampled = max(self._sampled, _rss_bytes())

    def __enter__(self) -> PeakRss:
        """Start measuring."""
        gc.collect()
        self.start = _rss_bytes()
        if not self._reset_hwm():
            self._sampled = self.start
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        """Stop measuring and store the peak above the start."""
        if self._thread is None:
            top = self._hwm()
        else:
            self._stop.set()
            self._thread.join()
            top = max(self._sampled, _rss_bytes())
        self.peak = max(0, top - self.start)


def model_depth(model_cfg: TaggerConfig) -> int | None:
    """Blocks the probe can extrapolate over: our ViT's depth, a timm stack's (ViT, EVA: its depth
    argument), None for a staged timm model (SwinV2, ConvNeXt: measured whole)."""
    if isinstance(model_cfg, TimmTaggerConfig):
        return uniform_depth(model_cfg)
    return model_cfg.depth


def _probe_model(model_cfg: TaggerConfig, depth: int | None) -> Tagger:
    """The network with `depth` blocks (None: as configured), random weights, in training mode."""
    if depth is None:
        cfg: TaggerConfig = replace(model_cfg, tag_bias_init=None)
    elif isinstance(model_cfg, TimmTaggerConfig):
        cfg = replace(model_cfg, model_args={**model_cfg.model_args, "depth": depth}, tag_bias_init=None)
    else:
        cfg = replace(model_cfg, depth=depth, tag_bias_init=None)
    return build_tagger(cfg).train()


def _one_pass(model_cfg: TaggerConfig, depth: int | None, batch: int, precision: str) -> tuple[int, int]:
    """Peak memory of one forward+backward at `depth` blocks and `batch` images (gradients
    allocated beforehand, as during accumulation); returns (peak bytes, parameter count)."""
    model = _probe_model(model_cfg, depth)
    params = list(model.parameters())
    for p in params:
        p.grad = torch.zeros_like(p)
    loss_fn = MultiTaskLoss(AsymmetricFocalLoss())
    size = model_cfg.image_size
    images = torch.randn(batch, 3, size, size)  # (B, 3, H, W)
    targets = (torch.rand(batch, model_cfg.num_tags) < 0.05).float()  # (B, T)
    ratings = torch.randint(0, model_cfg.num_ratings, (batch,))  # (B,)
    with PeakRss() as peak:
        with autocast_context(precision, torch.device("cpu")):
            outputs = model(images)
        total, _ = loss_fn(outputs, targets, ratings)
        total.backward()
        del outputs, total
    return peak.peak, sum(p.numel() for p in params)


def _warm_up(model_cfg: TaggerConfig, depth: int | None, precision: str) -> None:
    """One real training step (TrainStep with fused AdamW, as train_direct builds it) on one image,
    so that what a process gains for good by training (imported code, thread pools, kernel caches)
    is counted in runtime_bytes and not in the measured passes."""
    device = torch.device("cpu")
    model = _probe_model(model_cfg, depth)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _constant)
    step = TrainStep(
        model, model, MultiTaskLoss(AsymmetricFocalLoss()), GuardedOptimizerStep(optimizer, device, precision, grad_clip=1.0), scheduler, None, device
    )
    size = model_cfg.image_size
    step.forward_backward(
        torch.randn(1, 3, size, size), (torch.rand(1, model_cfg.num_tags) < 0.05).float(), torch.randint(0, model_cfg.num_ratings, (1,)), window=1
    )
    step.optimizer_step(0)


def _constant(step: int) -> float:
    return 1.0


def _probe_child(spec_json: str) -> int:
    """The child's work: measure the passes of `spec["points"]` ([depth, batch] pairs), print one JSON line."""
    spec = json.loads(spec_json)
    model_cfg = tagger_config_from_dict(spec["model"])
    points, precision = spec["points"], spec["precision"]
    interpreter = _rss_bytes()
    torch.manual_seed(0)
    t0 = time.perf_counter()
    _warm_up(model_cfg, points[0][0], precision)  # one real training step: threads, code, caches, imports
    peaks, counts = [], []
    for depth, batch in points:
        peak, count = _one_pass(model_cfg, depth, batch, precision)
        peaks.append(peak)
        counts.append(count)
    gc.collect()
    print(
        json.dumps(
            {
                "interpreter_bytes": interpreter,
                "runtime_bytes": _rss_bytes() - interpreter,
                "peaks": peaks,
                "parameters": counts,
                "seconds": time.perf_counter() - t0,
            }
        )
    )
    return 0


@dataclass(frozen=True)
class StepMemoryProfile:
    """What the child measured, extrapolated to the full network: per image and fixed."""

    depth: int  # 0: a staged timm model, measured whole
    parameters: int  # of the full network
    activation_per_image: int  # bytes a forward+backward keeps per image (activations, transients)
    step_fixed_bytes: int  # a pass's cost that does not grow with the batch (e.g. weight-gradient buffers)
    runtime_bytes: int  # what running the model adds to a process for good (code, threads, caches)
    interpreter_bytes: int  # a fresh interpreter with torch and the model code imported
    points: tuple[tuple[int, int], ...]  # (depth, batch) of each measured pass
    peaks: tuple[int, ...]  # their peak bytes
    seconds: float  # wall time of the whole measurement, child start-up included


def _probe_points(model_cfg: TaggerConfig, depth: int | None) -> list[tuple[int | None, int]]:
    """(depth, batch) passes: 1 and 2 images at depth d, and 2 images at depth d + one period.

    Without gradient checkpointing d is one block and a period one block. With checkpointing every
    k blocks, backward recomputes one checkpointed block at a time, a transient the size of a whole
    block that does not grow with depth: d = 2k, so both depths hold it and the difference is what
    one more period keeps (timm checkpoints every block: k = 1). The full depth alone when it is
    shorter than that, or when the model has no single depth (depth None: a staged timm model).
    """
    if depth is None:
        return [(None, 1), (None, 2)]
    every = model_cfg.grad_checkpoint_every
    if isinstance(model_cfg, TimmTaggerConfig) and every:
        every = 1
    period, first = (1, 1) if every == 0 else (every, 2 * every)
    if first + period > depth:
        return [(depth, 1), (depth, 2)]
    return [(first, 1), (first, 2), (first + period, 2)]


def profile_step_memory(model_cfg: TaggerConfig, precision: str = "fp32", timeout_s: float = PROBE_TIMEOUT_S) -> StepMemoryProfile:
    """Measure a training step's memory per image for this network in a child process.

    Peak(depth, batch) = fixed + batch * (stem + depth * block): two batch sizes separate the
    fixed part from the per-image part, two depths the blocks from the rest.
    """
    if precision not in ("fp32", "bf16"):
        raise ValueError(f"precision {precision!r}: a CPU step runs in fp32 or bf16")
    depth_full = model_depth(model_cfg)
    points = _probe_points(model_cfg, depth_full)
    spec = {"model": {**model_cfg.to_dict(), "tag_bias_init": None}, "points": points, "precision": precision}
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", PYTHONUNBUFFERED="1")
    t0 = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, str(Path(__file__).resolve()), "probe", json.dumps(spec)],
        capture_output=True,
        text=True,
        timeout=timeout_s,
        env=env,
        encoding="utf-8",
    )
    seconds = time.perf_counter() - t0
    if proc.returncode != 0:
        tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        raise RuntimeError(f"measuring the training step's memory failed (exit {proc.returncode}): {tail}")
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    peaks, counts = out["peaks"], out["parameters"]
    per_image = peaks[1] - peaks[0]  # one more image at depth d1
    parameters, activation = float(counts[0]), float(per_image)
    if len(points) == 3:
        d1, d2 = points[0][0], points[2][0]
        per_block_image = (peaks[2] - peaks[1]) / (2 * (d2 - d1))
        per_block_params = (counts[2] - counts[0]) / (d2 - d1)
        parameters += per_block_params * (depth_full - d1)
        activation += per_block_image * (depth_full - d1)
    return StepMemoryProfile(
        depth=depth_full or 0,
        parameters=round(parameters),
        activation_per_image=math.ceil(activation),
        step_fixed_bytes=max(0, peaks[0] - per_image),
        runtime_bytes=max(0, out["runtime_bytes"]),
        interpreter_bytes=out["interpreter_bytes"],
        points=tuple(tuple(p) for p in points),
        peaks=tuple(peaks),
        seconds=seconds,
    )


# --------------------------------------------------------------------------------------------
# The whole run's memory
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class StepShape:
    """What a run's memory depends on besides the network (from the config)."""

    batch_size: int
    micro_batch: int | None = None  # images per forward/backward pass (None: the whole batch)
    precision: str = "fp32"  # resolved: fp32 or bf16 on a CPU
    num_workers: int = 0
    prefetch_factor: int = 2
    ema: bool = False  # training.ema_decay > 0
    async_checkpoint: bool = True  # checkpoint.async_write: a CPU copy of the state lives during training
    model_built: bool = False  # the weights already count in this process's resident memory


@dataclass(frozen=True)
class MemoryEstimate:
    """A run's memory: this process as it is now plus what training adds, per image and fixed."""

    resident_now: int  # this process's RSS at the check
    state_bytes: int  # weights (if not built yet), gradients, AdamW moments, EMA, checkpoint copy
    fixed_bytes: int  # the step's batch-independent part and the runtime's one-time growth
    per_image_step: int  # activations per image of a micro-batch
    per_image_batch: int  # the loaded batch per image: uint8 and normalised float32 copies, targets
    worker_bytes: int  # all workers' interpreters
    per_image_workers: int  # batches the workers hold ready, per image of a batch

    def needed(self, batch_size: int, micro_batch: int | None = None) -> int:
        """Bytes the run needs at its peak, all processes together."""
        micro = batch_size if micro_batch is None else micro_batch
        return (
            self.resident_now
            + self.state_bytes
            + self.fixed_bytes
            + self.worker_bytes
            + batch_size * (self.per_image_batch + self.per_image_workers)
            + micro * self.per_image_step
        )

    def largest_batch(self, budget: int) -> int:
        """The largest batch that fits in `budget` bytes unsplit (0 when not even one image)."""
        fixed = self.needed(0)
        per_image = self.per_image_batch + self.per_image_workers + self.per_image_step
        return max(0, (budget - fixed) // per_image)

    def largest_micro_batch(self, batch_size: int, budget: int) -> int:
        """The largest equal split of `batch_size` that fits in `budget` (0 when none does)."""
        return next((m for m in micro_batch_candidates(batch_size) if self.needed(batch_size, m) <= budget), 0)


def estimate_training_memory(
    profile: StepMemoryProfile, shape: StepShape, image_size: int, num_tags: int, resident_now: int | None = None
) -> MemoryEstimate:
    """Combine the measured step with what training allocates around it."""
    weights = 4 * profile.parameters  # float32 weights
    state = weights * (1 + 2)  # gradients + AdamW exp_avg and exp_avg_sq
    if not shape.model_built:
        state += weights
    if shape.ema:
        state += weights  # the float32 shadow
    if shape.async_checkpoint:
        state += weights * (3 + (1 if shape.ema else 0))  # CPU copies of weights, moments (and EMA) being written
    pixels = 3 * image_size * image_size
    return MemoryEstimate(
        resident_now=_rss_bytes() if resident_now is None else resident_now,
        state_bytes=state,
        fixed_bytes=profile.step_fixed_bytes + profile.runtime_bytes,
        per_image_step=profile.activation_per_image,
        per_image_batch=pixels * (1 + 4) + num_tags * 4,  # uint8 batch, float32 images, float32 targets
        worker_bytes=shape.num_workers * profile.interpreter_bytes,
        per_image_workers=shape.num_workers * shape.prefetch_factor * pixels,
    )


def _read_int(path: Path) -> int | None:
    """An integer file of /sys; None when absent, 'max' or not a number."""
    try:
        text = path.read_text(encoding="ascii").strip()
    except (OSError, UnicodeDecodeError):
        return None
    return int(text) if text.isdigit() else None


def _inactive_file(stat: Path) -> int:
    """Reclaimable page cache in a cgroup's memory.stat (counted in its usage, freed under pressure)."""
    try:
        lines = stat.read_text(encoding="ascii").splitlines()
    except (OSError, UnicodeDecodeError):
        return 0
    fields = dict(line.split(" ", 1) for line in lines if " " in line)
    value = fields.get("inactive_file", fields.get("total_inactive_file", "0")).strip()
    return int(value) if value.isdigit() else 0


def cgroup_memory(root: Path = Path("/")) -> tuple[int, int] | None:
    """(limit, available) of the tightest memory cgroup limit over this process's group and its
    parents (Linux; containers, systemd slices, Slurm); None without one. psutil sees the machine's
    memory, not such a limit."""
    try:
        entries = (root / "proc/self/cgroup").read_text(encoding="utf-8").splitlines()
    except OSError:
        return None
    found: list[tuple[int, int]] = []
    for entry in entries:
        _, controllers, path = entry.split(":", 2)
        if controllers == "":  # cgroup v2
            base, names = root / "sys/fs/cgroup", ("memory.max", "memory.current")
        elif "memory" in controllers.split(","):  # cgroup v1
            base, names = root / "sys/fs/cgroup/memory", ("memory.limit_in_bytes", "memory.usage_in_bytes")
        else:
            continue
        # The group and its parents (limits nest); inside a container the root is the container's group.
        folder = base / path.strip("/")
        for group in (folder, *folder.parents):
            limit, usage = _read_int(group / names[0]), _read_int(group / names[1])
            if limit is not None and usage is not None and limit < 1 << 60:  # v1 writes "none" as ~2**63
                found.append((limit, max(0, limit - usage + _inactive_file(group / "memory.stat"))))
            if group == base:
                break
    if not found:
        return None
    return min(limit for limit, _ in found), min(available for _, available in found)


def memory_budget(safety_fraction: float = SAFETY_FRACTION, resident_now: int | None = None, local_processes: int = 1) -> int:
    """Bytes this process may use: its share of the memory available now (shared with the other
    training processes of this machine) plus what it already holds, less a margin of
    `safety_fraction` of the memory there is (physical, or a smaller cgroup limit)."""
    vm = psutil.virtual_memory()
    total, available = vm.total, vm.available
    limited = cgroup_memory()
    if limited is not None and limited[0] < total:
        total, available = limited[0], min(available, limited[1])
    resident = _rss_bytes() if resident_now is None else resident_now
    return int((available - safety_fraction * total) / max(1, local_processes) + resident)


def _gb(n: float) -> str:
    return f"{n / 1e9:.1f} GB"


def memory_message(
    estimate: MemoryEstimate, batch_size: int, budget: int, *, grad_checkpointing: bool, micro_batch_key: str | None, micro_batch: int | None = None
) -> str | None:
    """None when the run fits in `budget` (batches split into `micro_batch` images, None: unsplit),
    else one line naming data.batch_size and what fits."""
    need = estimate.needed(batch_size, micro_batch)
    if need <= budget:
        return None
    head = (
        f"{BATCH_KEY}={batch_size} needs about {_gb(need)} of memory on this machine "
        f"({_gb(estimate.per_image_step)} of activations per image) but {_gb(budget)} can be used"
    )
    options = []
    largest = min(estimate.largest_batch(budget), batch_size - 1)
    if largest >= 1:
        options.append(f"set {BATCH_KEY}={largest} or lower")
    micro = estimate.largest_micro_batch(batch_size, budget)
    if micro_batch_key and micro:
        options.append(f"keep {batch_size} as {batch_size // micro} micro-batches of {micro} ({micro_batch_key}={micro})")
    if not grad_checkpointing:
        options.append(f"recompute activations in backward with {GRAD_CHECKPOINT_KEY}=1 (slower)")
    if largest < 1:
        options.append("use a smaller model (model.preset) or image size (data.image_size)")
    return f"{head}: " + ", or ".join(options)


def check_cpu_memory(
    model_cfg: TaggerConfig,
    shape: StepShape,
    *,
    micro_batch_key: str | None = None,
    safety_fraction: float = SAFETY_FRACTION,
    local_processes: int = 1,
    profile: StepMemoryProfile | None = None,
) -> str | None:
    """None when a CPU run of this network and batch fits in memory, else one line saying what fits.

    Call it before the model is built (or say model_built=True); it takes seconds (a child process
    measures the step). `micro_batch_key` names the config key that splits a batch into
    micro-batches, when the trainer has one; `local_processes` is LOCAL_WORLD_SIZE under torchrun
    (the processes of this machine share its memory).
    """
    profile = profile or profile_step_memory(model_cfg, shape.precision)
    resident = _rss_bytes()
    estimate = estimate_training_memory(profile, shape, model_cfg.image_size, model_cfg.num_tags, resident)
    budget = memory_budget(safety_fraction, resident, local_processes)
    return memory_message(
        estimate,
        shape.batch_size,
        budget,
        grad_checkpointing=model_cfg.grad_checkpoint_every > 0,
        micro_batch_key=micro_batch_key,
        micro_batch=shape.micro_batch,
    )


# --------------------------------------------------------------------------------------------
# A run's config, fitted before its first step (train_direct calls these)
# --------------------------------------------------------------------------------------------

MICRO_BATCH_KEY = "training.micro_batch_size"
# Share of the CUDA memory this process can have that a micro-batch probe may reserve at its peak:
# the rest is headroom for fragmentation, validation batches and the allocator's own growth.
CUDA_PROBE_FRACTION = 0.9


def resolve_num_workers(cfg: RootConfig) -> str:
    """Replace data.num_workers=-1 by what the cores allow; returns the line to print."""
    if cfg.data.num_workers != -1:
        return f"data.num_workers={cfg.data.num_workers}"
    cfg.data.num_workers = default_num_workers()
    local = local_process_count()
    return (
        f"data.num_workers={cfg.data.num_workers} (auto: {usable_cpu_count()} usable cores, "
        f"{local} training process{'es' if local != 1 else ''} on this machine)"
    )


def saved_plan(resume_state: Mapping[str, Any] | None) -> MicroBatchPlan | None:
    """The micro-batch split a checkpoint was trained with (None: none recorded)."""
    if resume_state is None or "micro_batches" not in resume_state:
        return None
    return MicroBatchPlan.from_dict(resume_state["micro_batches"])


def cpu_memory_message(cfg: RootConfig, device: torch.device, model_cfg: TaggerConfig, saved: MicroBatchPlan | None) -> str | None:
    """On the CPU (training.memory_check), one line naming data.batch_size when the run cannot fit
    in memory (the OS would kill it without a message); None when it fits. Takes seconds."""
    if device.type != "cpu" or not cfg.training.memory_check:
        return None
    mb = cfg.training.micro_batch_size
    micro = mb if mb > 0 else (saved.micro_batch if mb == 0 and saved is not None else None)
    shape = StepShape(
        batch_size=cfg.data.batch_size,
        micro_batch=micro,
        precision=resolve_precision(cfg.training.precision, device),
        num_workers=cfg.data.num_workers,
        prefetch_factor=cfg.data.prefetch_factor,
        ema=cfg.training.ema_decay > 0,
        async_checkpoint=cfg.checkpoint.async_write,
    )
    return check_cpu_memory(model_cfg, shape, micro_batch_key=MICRO_BATCH_KEY, local_processes=local_process_count())


def choose_micro_batches(cfg: RootConfig, device: torch.device, step_fn: TrainStep, saved: MicroBatchPlan | None) -> tuple[MicroBatchPlan, str]:
    """The split of each batch (training.micro_batch_size) and how it was chosen.

    Auto (0): on CUDA the largest equal split whose real step fits, probed before the first step,
    starting at the checkpoint's split on resume (a smaller card gets a smaller one); on the CPU
    the checkpoint's split, else none. A collective under DDP (ranks take the smallest).
    """
    batch, mb = cfg.data.batch_size, cfg.training.micro_batch_size
    if mb == -1:
        return MicroBatchPlan(batch, batch), f"{MICRO_BATCH_KEY}=-1: never split"
    if mb > 0:
        return MicroBatchPlan(batch, mb), f"{MICRO_BATCH_KEY}={mb}: as configured"
    start = saved if saved is not None and saved.batch_size == batch else None
    if device.type != "cuda":
        return (start, "auto: the checkpoint's split") if start else (MicroBatchPlan(batch, batch), "auto: no split on the CPU")
    model = step_fn.raw_model
    free, _ = torch.cuda.mem_get_info(device)
    n_params = sum(p.numel() for p in step_fn.params)
    probe = make_step_probe(
        model,
        step_fn.loss_fn,
        step_fn.amp,
        num_tags=model.cfg.num_tags,
        num_ratings=model.cfg.num_ratings,
        image_size=cfg.data.image_size,
        device=device,
        reserve_bytes=8 * n_params,  # AdamW's two float32 moments, allocated at the first update
        memory_limit_bytes=int(CUDA_PROBE_FRACTION * (free + torch.cuda.memory_reserved(device))),
        fault_limit=injected_oom_limit(),
    )
    cap = batch if start is None else start.micro_batch

    def try_step(micro_batch: int) -> None:
        """The probe, from the checkpoint's micro-batch down."""
        if micro_batch > cap:
            raise torch.cuda.OutOfMemoryError(f"out of memory (above the checkpoint's micro-batch {cap})")
        probe(micro_batch)

    plan = agree_across_ranks(plan_micro_batches(batch, try_step), device)
    step_fn.amp.discard_window()  # the probes' loss checks are not the first window's
    return plan, "auto: probed on " + torch.cuda.get_device_name(device)


def describe_plan(plan: MicroBatchPlan) -> str:
    """'batches of 64 in one pass' or 'batches of 64 as 4 micro-batches of 16 (same gradient)'."""
    if plan.accumulation == 1:
        return f"batches of {plan.batch_size} in one pass"
    return f"batches of {plan.batch_size} as {plan.accumulation} micro-batches of {plan.micro_batch} (same gradient)"


if __name__ == "__main__":
    if len(sys.argv) != 3 or sys.argv[1] != "probe":
        print("usage: python machine_fit.py probe SPEC_JSON  (the memory check's child process)", file=sys.stderr)
        sys.exit(2)
    sys.exit(_probe_child(sys.argv[2]))
