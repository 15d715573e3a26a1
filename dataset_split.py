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

import numpy as np

from dataset_scan import SampleRecord, read_json, write_data_report
from sample_table import SampleTable

__all__ = ["SplitResult", "split_records", "save_split", "load_split"]


@dataclass
class SplitResult:
    """Train/validation/excluded records and the parameters that produced them."""

    train: Sequence[SampleRecord]  # a SampleTable when the split was made from one
    val: Sequence[SampleRecord]
    excluded: Sequence[SampleRecord]
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


def _ids(records: Sequence[SampleRecord]) -> list[str]:
    """The sample ids of `records`, in order (straight from the id blob for a SampleTable)."""
    return records.sample_ids() if isinstance(records, SampleTable) else [r.sample_id for r in records]


def _take(records: Sequence[SampleRecord], rows: list[int]) -> Sequence[SampleRecord]:
    """Rows `rows` of `records`: a sub-table of a SampleTable, else a list."""
    if isinstance(records, SampleTable):
        return records.select(np.asarray(rows, dtype=np.int64))
    return [records[i] for i in rows]


def split_records(records: Sequence[SampleRecord], *, val_fraction: float, seed: int, max_val: int = 0) -> SplitResult:
    """Split by a hash of (seed, sample_id); `max_val` > 0 keeps the lowest-hash val samples and
    excludes the rest (they are not moved to training)."""
    _check_split_args(val_fraction, max_val)
    ids = _ids(records)
    if len(set(ids)) != len(ids):
        raise ValueError("split_records: duplicate sample_id values in records")
    train: list[int] = []
    val: list[tuple[float, str, int]] = []
    for row, sid in enumerate(ids):
        h = _split_hash(seed, sid)
        if h < val_fraction:
            val.append((h, sid, row))
        else:
            train.append(row)
    excluded: list[int] = []
    if max_val and len(val) > max_val:
        ranked = sorted(val)
        keep = {row for _, _, row in ranked[:max_val]}
        excluded = [row for _, _, row in val if row not in keep]
        val = [v for v in val if v[2] in keep]
    return SplitResult(
        train=_take(records, train),
        val=_take(records, [row for _, _, row in val]),
        excluded=_take(records, excluded),
        seed=seed,
        val_fraction=val_fraction,
        max_val=max_val,
    )


def save_split(path: str | Path, split: SplitResult) -> None:
    """Store the split (seed, fraction, cap and the id lists) as JSON, atomically."""
    write_data_report(
        path,
        {
            "format_version": 1,
            "seed": split.seed,
            "val_fraction": split.val_fraction,
            "max_val": split.max_val,
            "train": _ids(split.train),
            "val": _ids(split.val),
            "excluded": _ids(split.excluded),
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
    ids = _ids(records)
    by_id = {sid: row for row, sid in enumerate(ids)}
    lists: dict[str, list[int]] = {"train": [], "val": [], "excluded": []}
    vanished: list[str] = []
    assigned: set[str] = set()
    for side in lists:
        for sid in data.get(side, []):
            row = by_id.get(sid)
            if row is None:
                vanished.append(sid)
            elif sid not in assigned:
                lists[side].append(row)
                assigned.add(sid)
    added = 0
    for row, sid in enumerate(ids):
        if sid in assigned:
            continue
        added += 1
        if _split_hash(seed, sid) < fraction:
            # a capped validation set stays fixed so metrics remain comparable across resumes
            full = max_val and len(lists["val"]) >= max_val
            lists["excluded" if full else "val"].append(row)
        else:
            lists["train"].append(row)
    return SplitResult(
        train=_take(records, lists["train"]),
        val=_take(records, lists["val"]),
        excluded=_take(records, lists["excluded"]),
        seed=seed,
        val_fraction=fraction,
        max_val=max_val,
        vanished=vanished,
        added=added,
    )
