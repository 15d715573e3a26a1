"""The deterministic train/validation split of a dataset's records, and its file in the run folder.

This module owns ``SplitResult``, the hash rule that puts a sample in validation (blake2b of
(seed, sample_id), so the split is the same on every machine and a sample keeps its side when
files are added), ``split_records`` with the optional validation cap, and ``save_split`` /
``load_split`` (a resumed run rebuilds exactly the split it started with). It imports
``dataset_scan`` (``SampleRecord``, the JSON reader and the atomic report writer).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from dataset_scan import SampleRecord, read_json, write_data_report

__all__ = ["SplitResult", "split_records", "save_split", "load_split"]


@dataclass
class SplitResult:
    """Train/validation/excluded records and the parameters that produced them."""

    train: list[SampleRecord]
    val: list[SampleRecord]
    excluded: list[SampleRecord]
    seed: int
    val_fraction: float
    max_val: int = 0
    vanished: list[str] = field(default_factory=list)
    added: int = 0

    def to_report(self) -> dict[str, Any]:
        """Counts for the data report."""
        return {
            "seed": self.seed,
            "val_fraction": self.val_fraction,
            "max_val": self.max_val,
            "train": len(self.train),
            "val": len(self.val),
            "excluded": len(self.excluded),
            "vanished": len(self.vanished),
            "added": self.added,
        }


def _split_hash(seed: int, sample_id: str) -> float:
    """Uniform value in [0, 1) from blake2b of (seed, sample_id); stable across runs and machines."""
    # surrogatepass: a name that is not valid UTF-8 (a surrogate-escaped str) hashes instead of
    # crashing; for every valid name the bytes, so the split, are unchanged
    digest = hashlib.blake2b(f"{seed}\x00{sample_id}".encode("utf-8", "surrogatepass"), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2.0**64


def _check_split_args(val_fraction: float, max_val: int) -> None:
    """Raise ValueError for an out-of-range fraction or cap."""
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    if max_val < 0:
        raise ValueError(f"max_val must be >= 0, got {max_val}")


def split_records(records: Sequence[SampleRecord], *, val_fraction: float, seed: int, max_val: int = 0) -> SplitResult:
    """Split by a hash of (seed, sample_id); `max_val` > 0 keeps the lowest-hash val samples and
    excludes the rest (they are not moved to training)."""
    _check_split_args(val_fraction, max_val)
    ids = [r.sample_id for r in records]
    if len(set(ids)) != len(ids):
        raise ValueError("split_records: duplicate sample_id values in records")
    train: list[SampleRecord] = []
    val: list[tuple[float, SampleRecord]] = []
    for rec in records:
        h = _split_hash(seed, rec.sample_id)
        if h < val_fraction:
            val.append((h, rec))
        else:
            train.append(rec)
    excluded: list[SampleRecord] = []
    if max_val and len(val) > max_val:
        ranked = sorted(val, key=lambda hr: (hr[0], hr[1].sample_id))
        keep = {id(r) for _, r in ranked[:max_val]}
        excluded = [r for _, r in val if id(r) not in keep]
        val = [(h, r) for h, r in val if id(r) in keep]
    return SplitResult(train=train, val=[r for _, r in val], excluded=excluded, seed=seed, val_fraction=val_fraction, max_val=max_val)


def save_split(path: str | Path, split: SplitResult) -> None:
    """Store the split (seed, fraction, cap and the id lists) as JSON, atomically."""
    write_data_report(
        path,
        {
            "format_version": 1,
            "seed": split.seed,
            "val_fraction": split.val_fraction,
            "max_val": split.max_val,
            "train": [r.sample_id for r in split.train],
            "val": [r.sample_id for r in split.val],
            "excluded": [r.sample_id for r in split.excluded],
        },
    )


def load_split(path: str | Path, records: Sequence[SampleRecord]) -> SplitResult:
    """Rebuild a stored split over `records`; ids that vanished are listed, new ones hashed in."""
    source = Path(path)
    if not source.is_file():
        raise FileNotFoundError(f"split file {str(source)!r} does not exist")
    try:
        data = read_json(str(source))
    except json.JSONDecodeError as exc:
        raise ValueError(f"split file {str(source)!r} is not valid JSON: {exc}") from exc
    required = ("seed", "val_fraction", "train", "val")
    if not isinstance(data, dict) or any(k not in data for k in required):
        raise ValueError(f"split file {str(source)!r} lacks one of {required}")
    seed = int(data["seed"])
    fraction = float(data["val_fraction"])
    max_val = int(data.get("max_val", 0))
    by_id = {r.sample_id: r for r in records}
    lists: dict[str, list[SampleRecord]] = {"train": [], "val": [], "excluded": []}
    vanished: list[str] = []
    assigned: set[str] = set()
    for side in lists:
        for sid in data.get(side, []):
            rec = by_id.get(sid)
            if rec is None:
                vanished.append(sid)
            elif sid not in assigned:
                lists[side].append(rec)
                assigned.add(sid)
    added = 0
    for rec in records:
        if rec.sample_id in assigned:
            continue
        added += 1
        if _split_hash(seed, rec.sample_id) < fraction:
            # a capped validation set stays fixed so metrics remain comparable across resumes
            full = max_val and len(lists["val"]) >= max_val
            lists["excluded" if full else "val"].append(rec)
        else:
            lists["train"].append(rec)
    return SplitResult(
        train=lists["train"],
        val=lists["val"],
        excluded=lists["excluded"],
        seed=seed,
        val_fraction=fraction,
        max_val=max_val,
        vanished=vanished,
        added=added,
    )
