"""Tests for dataset_split: the hash rule, stability when files are added, the cap, save and load."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from dataset_scan import SampleRecord
from dataset_split import _split_hash, load_split, save_split, split_records


def _records(n: int, prefix: str = "img") -> list[SampleRecord]:
    """n synthetic records."""
    return [SampleRecord(f"{prefix}/{i:05d}.jpg", f"/x/{prefix}/{i:05d}.jpg", ("a",), ("",), 0) for i in range(n)]


def test_split_disjoint_and_matches_hash_rule() -> None:
    """Train and val are disjoint, complete, and follow blake2b(seed, id) < fraction."""
    records = _records(2000)
    split = split_records(records, val_fraction=0.1, seed=7)
    train_ids = {r.sample_id for r in split.train}
    val_ids = {r.sample_id for r in split.val}
    assert not train_ids & val_ids and len(train_ids | val_ids) == 2000 and not split.excluded
    for rec in records:  # reference: direct blake2b computation
        digest = hashlib.blake2b(f"7\x00{rec.sample_id}".encode("utf-8"), digest_size=8).digest()
        assert (int.from_bytes(digest, "big") / 2**64 < 0.1) == (rec.sample_id in val_ids)
    assert 150 < len(val_ids) < 250
    other = split_records(records, val_fraction=0.1, seed=8)
    assert {r.sample_id for r in other.val} != val_ids


def test_split_stable_when_files_added() -> None:
    """Adding files never moves an existing sample between sides."""
    base = _records(500)
    more = base + _records(300, prefix="new")
    a = split_records(base, val_fraction=0.2, seed=1)
    b = split_records(list(reversed(more)), val_fraction=0.2, seed=1)
    b_val = {r.sample_id for r in b.val}
    assert all(r.sample_id in b_val for r in a.val)
    assert not any(r.sample_id in b_val for r in a.train)


def test_split_max_val_excludes_overflow(tmp_path: Path) -> None:
    """max_val keeps the lowest hashes and excludes the rest; save/load keeps sides."""
    records = _records(1000)
    full = split_records(records, val_fraction=0.3, seed=3)
    capped = split_records(records, val_fraction=0.3, seed=3, max_val=50)
    assert len(capped.val) == 50
    assert len(capped.excluded) == len(full.val) - 50
    assert [r.sample_id for r in capped.train] == [r.sample_id for r in full.train]
    ranked = sorted(full.val, key=lambda r: _split_hash(3, r.sample_id))
    assert {r.sample_id for r in capped.val} == {r.sample_id for r in ranked[:50]}
    assert capped.to_report()["excluded"] == len(capped.excluded)

    path = tmp_path / "split.json"
    save_split(path, capped)
    stored = json.loads(path.read_text(encoding="utf-8"))
    assert stored["seed"] == 3 and stored["val_fraction"] == 0.3 and len(stored["val"]) == 50
    # reload with one record gone and new ones added: stored sides kept, the vanished id reported
    gone = capped.val[0].sample_id
    now = [r for r in records if r.sample_id != gone] + _records(100, prefix="added")
    loaded = load_split(path, now)
    assert loaded.vanished == [gone]
    assert loaded.added == 100
    # the freed validation slot is refilled by new val-side ids; the overflow is excluded
    new_val_side = sorted((r for r in now if r.sample_id.startswith("added/") and _split_hash(3, r.sample_id) < 0.3), key=lambda r: r.sample_id)
    assert len(loaded.val) == 50 and len(new_val_side) >= 1
    assert {r.sample_id for r in loaded.val} == ({r.sample_id for r in capped.val} - {gone} | {new_val_side[0].sample_id})
    assert {r.sample_id for r in new_val_side[1:]} <= {r.sample_id for r in loaded.excluded}
    assert {r.sample_id for r in capped.train} <= {r.sample_id for r in loaded.train}
    new_train = [r for r in loaded.train if r.sample_id.startswith("added/")]
    assert all(_split_hash(3, r.sample_id) >= 0.3 for r in new_train)
    with pytest.raises(FileNotFoundError):
        load_split(tmp_path / "missing.json", now)


def test_split_hash_accepts_names_that_are_not_utf8() -> None:
    """A surrogate-escaped id (a Linux name that is not UTF-8) hashes instead of crashing; valid
    ids hash exactly as blake2b of their UTF-8 bytes, so existing splits do not move."""
    odd = "caf\udce9.png"
    digest = hashlib.blake2b(b"3\x00" + odd.encode("utf-8", "surrogatepass"), digest_size=8).digest()
    assert _split_hash(3, odd) == int.from_bytes(digest, "big") / 2.0**64
    plain = hashlib.blake2b("3\x00café.png".encode("utf-8"), digest_size=8).digest()
    assert _split_hash(3, "café.png") == int.from_bytes(plain, "big") / 2.0**64
