"""Split each configured batch into equal micro-batches that fit in device memory, with the same gradient.

- `forward_backward_split` runs one batch as k micro-batches of `micro_batch` images through the
  model and the project's `MultiTaskLoss` (what `TrainStep.forward_backward` does for one batch)
  and accumulates exactly the unsplit batch's gradient. How the loss reduces decides the scaling:
  the tag loss (AsymmetricFocalLoss) is summed over tags and AVERAGED OVER THE BATCH, so micro-batch
  i's tag loss is weighted by its share b_i / B; the rating loss is a cross-entropy averaged over
  the images WITH A KNOWN RATING (-1 = unknown), so micro-batch i's rating loss is weighted by
  known_i / known_total (a micro-batch may hold no known rating at all). Summed, the weighted
  parts equal the unsplit losses, and so do their gradients, up to float rounding. Stochastic
  depth draws per micro-batch, so with drop_path_rate > 0 split and unsplit runs are equal in
  distribution, not bit for bit.
- `plan_micro_batches` finds the largest micro-batch that divides the batch into equal parts and
  fits: it tries the batch, then each smaller divisor, with a caller-supplied step (use
  `make_step_probe`), treating CUDA out-of-memory errors as "does not fit".
- Tests inject an out-of-memory fault above a chosen micro-batch size through the environment
  variable `OOM_FAULT_ENV`; it must hold a positive integer (anything else is an error) and every
  injected error says it was injected.

It imports nothing from the project (the loss is used through MultiTaskLoss's public parts), so
training_utils may import it.
"""

from __future__ import annotations

import contextlib
import gc
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

import torch
import torch.distributed as tdist

from loss_functions import known_ratings

__all__ = [
    "OOM_FAULT_ENV",
    "InjectedOutOfMemoryError",
    "MicroBatchPlan",
    "MicroBatchPlanError",
    "agree_across_ranks",
    "forward_backward_split",
    "injected_oom_limit",
    "is_out_of_memory",
    "make_step_probe",
    "micro_batch_candidates",
    "plan_micro_batches",
]

# Deliberately long and test-specific, so that no one sets it by accident.
OOM_FAULT_ENV = "OPPAI_TEST_INJECT_OOM_ABOVE_MICRO_BATCH"
OOM_MESSAGES = ("out of memory", "can't allocate memory")  # CUDA caching allocator, CPU allocator


class MicroBatchPlanError(RuntimeError):
    """Not even a micro-batch of one image fits (one line saying what to change)."""


class InjectedOutOfMemoryError(torch.cuda.OutOfMemoryError):
    """An out-of-memory error raised on purpose by the test fault OOM_FAULT_ENV."""


class LossScaler(Protocol):
    """What the split needs from the optimizer-step guard (training_utils.GuardedOptimizerStep)."""

    def autocast(self) -> contextlib.AbstractContextManager:
        """The autocast context of forward and loss."""

    def backward(self, loss: torch.Tensor, window: int) -> None:
        """Backward of one part of a `window`-long accumulation window."""


def injected_oom_limit(environ: Mapping[str, str] | None = None) -> int | None:
    """The micro-batch size above which the test fault raises out-of-memory; None when unset."""
    value = (os.environ if environ is None else environ).get(OOM_FAULT_ENV)
    if value is None:
        return None
    if not value.strip().isdigit() or int(value) < 1:
        raise ValueError(f"{OOM_FAULT_ENV}={value!r}: must be a positive integer (a micro-batch size) or unset")
    return int(value)


def _check_fault(micro_batch: int, fault_limit: int | None) -> None:
    if fault_limit is not None and micro_batch > fault_limit:
        raise InjectedOutOfMemoryError(f"CUDA out of memory (injected by {OOM_FAULT_ENV}={fault_limit}: micro-batch {micro_batch} > {fault_limit})")


def is_out_of_memory(exc: BaseException) -> bool:
    """Whether an exception means an allocation did not fit (CUDA OOM or an allocator's RuntimeError)."""
    if isinstance(exc, torch.cuda.OutOfMemoryError):
        return True
    return isinstance(exc, RuntimeError) and any(m in str(exc).lower() for m in OOM_MESSAGES)


# --------------------------------------------------------------------------------------------
# The split forward/backward
# --------------------------------------------------------------------------------------------


def _is_ddp(model: torch.nn.Module) -> bool:
    inner = getattr(model, "_orig_mod", model)  # torch.compile wraps the DDP module
    return isinstance(inner, torch.nn.parallel.DistributedDataParallel)


def forward_backward_split(
    model: torch.nn.Module,
    loss_fn: torch.nn.Module,
    amp: LossScaler,
    images: torch.Tensor,
    tag_targets: torch.Tensor,
    ratings: torch.Tensor,
    *,
    micro_batch: int,
    window: int = 1,
    sync: bool = True,
    fault_limit: int | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Forward and backward of one batch (B images) as B / micro_batch micro-batches.

    images (B, 3, H, W), tag_targets (B, T), ratings (B,) with -1 = unknown. Gradients accumulate
    into the parameters exactly as one pass over the whole batch would leave them, divided by
    `window` (the batches of one optimizer step, as in TrainStep). `sync=False` skips the DDP
    all-reduce for the whole batch; with sync=True only the last micro-batch reduces. `loss_fn` is
    a MultiTaskLoss. Returns the batch's (total, {"tags", "rating"}) losses, detached.
    """
    batch = images.shape[0]
    if micro_batch < 1 or batch % micro_batch:
        raise ValueError(f"micro_batch={micro_batch} does not divide the batch of {batch} into equal parts")
    _check_fault(micro_batch, fault_limit)
    ddp = _is_ddp(model)
    if micro_batch == batch:  # unsplit: exactly TrainStep.forward_backward
        with model.no_sync() if (ddp and not sync) else contextlib.nullcontext():
            with amp.autocast():
                outputs = model(images)  # {"tag_logits": (B, T), "rating_logits": (B, R)}
            total, parts = loss_fn(outputs, tag_targets, ratings)
            amp.backward(total, window)
        return total.detach(), {k: v.detach() for k, v in parts.items()}
    known_total = known_ratings(ratings).sum().clamp(min=1).float()  # a device tensor: no host sync
    sums = {"total": 0.0, "tags": 0.0, "rating": 0.0}
    count = batch // micro_batch
    for i in range(count):
        part = slice(i * micro_batch, (i + 1) * micro_batch)
        last = i == count - 1
        with model.no_sync() if (ddp and not (sync and last)) else contextlib.nullcontext():
            with amp.autocast():
                outputs = model(images[part])  # (b, T) and (b, R)
            tags = loss_fn.tag_loss(outputs["tag_logits"], tag_targets[part])  # mean over the b images
            rating = loss_fn.rating_loss(outputs["rating_logits"], ratings[part])  # mean over known_i
            known = known_ratings(ratings[part]).sum().float()
            tags_share = tags * (micro_batch / batch)
            rating_share = rating * (known / known_total)  # this part's sum of rating losses / known_total
            total = loss_fn.tag_weight * tags_share + loss_fn.rating_weight * rating_share
            amp.backward(total, window)
        sums["total"] = sums["total"] + total.detach()
        sums["tags"] = sums["tags"] + tags_share.detach()
        sums["rating"] = sums["rating"] + rating_share.detach()
    return sums["total"], {"tags": sums["tags"], "rating": sums["rating"]}


# --------------------------------------------------------------------------------------------
# Planning the split
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class MicroBatchPlan:
    """How a batch is split: `accumulation` micro-batches of `micro_batch` images each."""

    batch_size: int
    micro_batch: int

    def __post_init__(self) -> None:
        """Reject splits that are not equal parts."""
        if self.batch_size < 1 or self.micro_batch < 1 or self.batch_size % self.micro_batch:
            raise ValueError(f"micro-batch {self.micro_batch} does not divide batch {self.batch_size} into equal parts")

    @property
    def accumulation(self) -> int:
        """Micro-batches per batch."""
        return self.batch_size // self.micro_batch

    def to_dict(self) -> dict[str, int]:
        """Plain types, for training_state and metrics.jsonl."""
        return {"batch_size": self.batch_size, "micro_batch": self.micro_batch, "accumulation": self.accumulation}

    @classmethod
    def from_dict(cls, data: Any) -> MicroBatchPlan:
        """Read to_dict() back (untrusted: ValueError on anything else)."""
        if not isinstance(data, Mapping) or not all(isinstance(data.get(k), int) for k in ("batch_size", "micro_batch")):
            raise ValueError(f"not a micro-batch plan: {data!r:.200}")
        return cls(int(data["batch_size"]), int(data["micro_batch"]))


def micro_batch_candidates(batch_size: int) -> list[int]:
    """Every micro-batch size that splits `batch_size` into equal parts, largest first."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    return [m for m in range(batch_size, 0, -1) if batch_size % m == 0]


def _attempt(try_step: Callable[[int], None], micro_batch: int) -> str | None:
    """Run one probe; the one-line OOM message, or None when it fit. Other errors propagate."""
    try:
        try_step(micro_batch)
    except RuntimeError as exc:  # torch.cuda.OutOfMemoryError is a RuntimeError
        if not is_out_of_memory(exc):
            raise
        return str(exc).strip().splitlines()[0][:300] if str(exc).strip() else type(exc).__name__
    return None


def _free_device_memory() -> None:
    """Return the failed attempt's blocks (the exception and its frames are gone by now)."""
    gc.collect()
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.empty_cache()


def plan_micro_batches(batch_size: int, try_step: Callable[[int], None], *, log: Callable[[str], None] | None = None) -> MicroBatchPlan:
    """The largest equal split of `batch_size` whose step fits; `try_step(m)` runs one step at
    micro-batch m and raises an out-of-memory error when it does not fit."""
    failures: list[str] = []
    for m in micro_batch_candidates(batch_size):
        failure = _attempt(try_step, m)
        if failure is None:
            plan = MicroBatchPlan(batch_size, m)
            if log is not None and failures:
                log(
                    f"micro-batches: a batch of {batch_size} does not fit in memory at once; "
                    f"training it as {plan.accumulation} micro-batches of {m} (same gradient)"
                )
            return plan
        failures.append(f"{m}: {failure}")
        _free_device_memory()
    raise MicroBatchPlanError(
        f"data.batch_size={batch_size}: not even a micro-batch of 1 image fits in memory ({failures[-1]}); "
        "use a smaller model (model.preset) or image size (data.image_size), or set model.grad_checkpoint_every=1"
    )


def agree_across_ranks(plan: MicroBatchPlan, device: torch.device) -> MicroBatchPlan:
    """The smallest micro-batch any rank found (ranks may differ in free memory); a collective under DDP."""
    if not (tdist.is_available() and tdist.is_initialized()) or tdist.get_world_size() == 1:
        return plan
    value = torch.tensor([plan.micro_batch], dtype=torch.int64, device=device)
    tdist.all_reduce(value, op=tdist.ReduceOp.MIN)
    return MicroBatchPlan(plan.batch_size, int(value.item()))  # a divisor of the same batch on every rank


def make_step_probe(
    model: torch.nn.Module,
    loss_fn: torch.nn.Module,
    amp: LossScaler,
    *,
    num_tags: int,
    num_ratings: int,
    image_size: int,
    device: torch.device,
    reserve_bytes: int = 0,
    memory_limit_bytes: int | None = None,
    fault_limit: int | None = None,
) -> Callable[[int], None]:
    """A `try_step` for plan_micro_batches: one forward+backward of random images at micro-batch m.

    Pass the raw model (not DDP: no collective in a probe). Gradients are allocated before the pass
    (the steady state of accumulation) and dropped after it; `reserve_bytes` holds memory that
    training will allocate later (e.g. AdamW's two moments before the first update). With
    `memory_limit_bytes` (CUDA), a pass whose peak reserved memory exceeds it counts as out of
    memory, leaving headroom for fragmentation and validation. The global RNG state is restored,
    so probing does not change the run's random stream.
    """
    params = [p for p in model.parameters() if p.requires_grad]
    cuda = device.type == "cuda"

    def try_step(micro_batch: int) -> None:
        """One probe pass at `micro_batch` images; raises an out-of-memory error when it does not fit."""
        _check_fault(micro_batch, fault_limit)
        with torch.random.fork_rng(devices=[device] if cuda else []):
            if cuda:
                torch.cuda.reset_peak_memory_stats(device)
            reserve = torch.empty(reserve_bytes, dtype=torch.uint8, device=device) if reserve_bytes else None
            try:
                for p in params:
                    p.grad = torch.zeros_like(p)
                images = torch.randn(micro_batch, 3, image_size, image_size, device=device)  # (m, 3, H, W)
                targets = (torch.rand(micro_batch, num_tags, device=device) < 0.05).float()  # (m, T)
                ratings = torch.randint(0, num_ratings, (micro_batch,), device=device)  # (m,)
                forward_backward_split(model, loss_fn, amp, images, targets, ratings, micro_batch=micro_batch)
                if cuda:
                    torch.cuda.synchronize(device)
                    peak = torch.cuda.max_memory_reserved(device)
                    if memory_limit_bytes is not None and peak > memory_limit_bytes:
                        raise torch.cuda.OutOfMemoryError(
                            f"out of memory headroom: micro-batch {micro_batch} reserved {peak / 2**30:.2f} GiB, "
                            f"over the {memory_limit_bytes / 2**30:.2f} GiB limit"
                        )
            finally:
                for p in params:
                    p.grad = None
                del reserve

    return try_step
