"""Which samples each training step trained on: `<run>/sample_log/rank_<r>.jsonl` (monitor.sample_log).

One JSON line per micro-batch: `{"step": S, "epoch": E, "ids": [...]}`, S the 0-based optimizer
step the batch fed, the ids the samples' ids (their paths under data.root) in batch order, a
failed sample's replacement included. It answers "which images were in the step where the loss
spiked" and "did this run see every image of the epoch exactly once" (an elastic resume at
another world size, tests/test_distributed_e2e.py). Lines are written as they come (line
buffered), so a killed run keeps every line up to its last batch; a resume from step S first
drops the lines of steps S and later, which the resumed run trains again, as metrics.jsonl is
truncated. It imports file_io.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from pathlib import Path

from file_io import atomic_write_text

__all__ = ["SAMPLE_LOG_DIR", "SampleLog", "read_sample_log"]

SAMPLE_LOG_DIR = "sample_log"


class SampleLog:
    """This rank's sample log, appended to as the loop consumes batches."""

    def __init__(self, run_dir: Path, rank: int, sample_id: Callable[[int], str], resume_step: int | None = None) -> None:
        """Open <run_dir>/sample_log/rank_<rank>.jsonl; with resume_step, keep only the lines of earlier steps."""
        folder = Path(run_dir) / SAMPLE_LOG_DIR
        folder.mkdir(parents=True, exist_ok=True)
        self.path = folder / f"rank_{rank}.jsonl"
        self.sample_id = sample_id
        if self.path.exists():
            if resume_step is None:
                raise ValueError(f"{self.path} exists but this run does not resume: it belongs to another run")
            kept = [entry for entry in read_sample_log(self.path) if entry["step"] < resume_step]
            atomic_write_text(self.path, "".join(json.dumps(entry) + "\n" for entry in kept))
        self.handle = open(self.path, "a", encoding="utf-8", buffering=1)  # line buffered: a kill loses no written batch

    def write(self, step: int, epoch: int, indices: Sequence[int]) -> None:
        """One micro-batch's samples (dataset indices of the training records) at optimizer step `step`."""
        ids = [self.sample_id(int(i)) for i in indices]
        self.handle.write(json.dumps({"step": int(step), "epoch": int(epoch), "ids": ids}) + "\n")

    def close(self) -> None:
        """Close the file."""
        self.handle.close()


def read_sample_log(path: str | Path) -> list[dict]:
    """The entries of a sample log; a last line cut short by a kill is left out, any other bad line is a ValueError."""
    lines = Path(path).read_text(encoding="utf-8").splitlines()
    entries = []
    for number, line in enumerate(lines, 1):
        try:
            entry = json.loads(line)
        except json.JSONDecodeError:
            if number == len(lines):
                break  # the write a kill interrupted
            raise ValueError(f"{path}: line {number} is not JSON") from None
        if not isinstance(entry, dict) or not {"step", "epoch", "ids"} <= entry.keys():
            raise ValueError(f"{path}: line {number} is not a sample-log entry")
        entries.append(entry)
    return entries
