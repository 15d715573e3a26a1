"""Where a training run is: the loop's counters (`RunState`) and the sampler's place in the data order
(`SamplerPosition`), two components of the checkpoint's training state.

The sampler's position is stored as the batches each rank consumed in the epoch, with the batch
layout and what an earlier layout took (batching.ShardedEpochSampler: from these an elastic resume
knows the items all ranks took together); loading it sets the loop's epoch and batch to where the
sampler will go on. It imports batching.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any

from batching import ShardedEpochSampler

__all__ = ["RunState", "SamplerPosition"]


@dataclass
class RunState:
    """Where the run is: the counters a checkpoint carries besides weights, optimizer and RNG."""

    step: int = 0  # optimizer steps done
    epoch: int = 0  # current epoch (0-based)
    batch_in_epoch: int = 0  # micro-batches of this epoch already consumed (this rank)
    images_seen: int = 0  # all ranks
    last_val_step: int | None = None
    last_ckpt_step: int | None = None

    def state_dict(self) -> dict[str, Any]:
        """Plain-type dict."""
        return dict(self.__dict__)

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore state_dict(). Format-1 checkpoints written before BestMetric also hold
        best_metric/best_step here; `with_best_entry` hands those to the best record."""
        missing = [f.name for f in fields(self) if f.name not in state]
        if missing:
            raise ValueError(f"run_state lacks {', '.join(missing)}")
        for f in fields(self):
            setattr(self, f.name, state[f.name])


class SamplerPosition:
    """The sampler's place in the data order, with the loop's own count of consumed micro-batches."""

    def __init__(self, sampler: ShardedEpochSampler, position: RunState) -> None:
        """Checkpoint `sampler` at the epoch and micro-batch `position` has reached."""
        self.sampler = sampler
        self.position = position

    def state_dict(self) -> dict[str, Any]:
        """The sampler's state at the run's epoch and micro-batch (the sampler's own epoch lags at an epoch end)."""
        return self.sampler.state_dict(batches_done=self.position.batch_in_epoch, epoch=self.position.epoch)

    def load_state_dict(self, state: Mapping[str, Any], elastic: bool = False) -> None:
        """Restore the position; ValueError when the data changed since, or the batch layout without `elastic`
        (then the rest of the epoch is re-split over this run's ranks and batches)."""
        self.sampler.load_state_dict(state, elastic=elastic)
        self.position.epoch, self.position.batch_in_epoch = self.sampler.epoch, self.sampler.start_batch
