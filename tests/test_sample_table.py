"""SampleTable: the compact sample table equals the record list it replaces, in every operation."""

from __future__ import annotations

import pickle
import random
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from dataset_scan import filter_known_tags
from dataset_split import split_records
from sample_table import SampleRecord, SampleTable, SampleTableBuilder
from vocabulary import build_vocabulary

CATS = ("", "general", "character", "artist")


def random_records(n: int, seed: int = 0, root: str = "/data") -> list[SampleRecord]:
    """n records with 0-8 distinct tags from a skewed pool, some non-UTF-8-safe names."""
    rng = random.Random(seed)
    pool = [f"tag_{i}" for i in range(40)] + ["caf\u00e9", "\udcff_broken"]
    out = []
    for i in range(n):
        tags = tuple(dict.fromkeys(rng.choice(pool[: rng.randint(1, len(pool))]) for _ in range(rng.randint(0, 8))))
        cats = tuple(rng.choice(CATS) for _ in tags)
        name = f"img_{i}" if i % 7 else f"weird_\udce9_{i}"
        out.append(SampleRecord(f"sub/{name}", f"{root}/sub/{name}.png", tags, cats, rng.choice((-1, 0, 1, 2, 3))))
    return out


def test_rows_round_trip_and_paths_are_stored_relative() -> None:
    records = random_records(200)
    table = SampleTable.from_records(records, root="/data")
    assert list(table) == records and table == records and len(table) == 200
    assert table[-1] == records[-1] and table[5:9] == records[5:9]
    assert table.sample_ids() == [r.sample_id for r in records]
    assert bytes(table.path_blob[: table.path_offsets[1]]) == "sub/weird_\udce9_0.png".encode("utf-8", "surrogatepass")
    with pytest.raises(IndexError):
        table[200]


def test_builder_keeps_a_repeated_tag_once_at_its_first_place() -> None:
    builder = SampleTableBuilder()
    builder.add("a", "a.png", ("x", "y", "x"), ("general", "", "artist"), 1)
    row = builder.build()[0]
    assert row.tags == ("x", "y") and row.categories == ("general", "")


def test_select_with_indices_and_mask_equals_list_indexing() -> None:
    records = random_records(300, seed=1)
    table = SampleTable.from_records(records, root="/data")
    rows = np.asarray([5, 3, 299, 0, 3])
    assert table.select(rows) == [records[i] for i in rows]
    mask = np.asarray([r.rating == 2 for r in records])
    assert table.select(mask) == [r for r in records if r.rating == 2]
    assert len(table.select(np.zeros(0, dtype=np.int64))) == 0


def test_keep_known_equals_the_list_filter() -> None:
    records = random_records(300, seed=2)
    known = {f"tag_{i}": j for j, i in enumerate((3, 1, 0, 7))}
    kept, dropped = filter_known_tags(SampleTable.from_records(records, root="/data"), known)
    kept_list, dropped_list = filter_known_tags(records, known)
    assert kept == kept_list and dropped == dropped_list > 0
    assert kept.tag_names == ["tag_3", "tag_1", "tag_0", "tag_7"]  # keyed to the vocabulary's indices


def test_tag_counts_equal_brute_force() -> None:
    records = random_records(400, seed=3)
    table = SampleTable.from_records(records)
    counts, votes = table.tag_counts()
    expected = Counter(t for r in records for t in r.tags)
    assert {table.tag_names[i]: int(c) for i, c in enumerate(counts) if c} == dict(expected)
    expected_votes = Counter((t, c) for r in records for t, c in zip(r.tags, r.categories))
    got = {(table.tag_names[t], table.category_names[c]): int(votes[t, c]) for t, c in zip(*np.nonzero(votes))}
    assert got == dict(expected_votes)


def test_vocabulary_from_a_table_equals_the_per_sample_build() -> None:
    records = random_records(500, seed=4)
    table = SampleTable.from_records(records)
    for min_frequency, top_k in ((1, 0), (3, 0), (2, 5)):
        fast, fast_report = build_vocabulary(table, min_frequency=min_frequency, top_k=top_k, ignore_tags=["tag_1"])
        slow, slow_report = build_vocabulary(records, min_frequency=min_frequency, top_k=top_k, ignore_tags=["tag_1"])
        assert fast.to_dict() == slow.to_dict() and fast_report.to_dict() == slow_report.to_dict()


def test_split_of_a_table_equals_the_split_of_the_list() -> None:
    records = random_records(300, seed=5)
    table = SampleTable.from_records(records, root="/data")
    a = split_records(table, val_fraction=0.3, seed=7, max_val=40)
    b = split_records(records, val_fraction=0.3, seed=7, max_val=40)
    assert isinstance(a.train, SampleTable)
    assert a.train == b.train and a.val == b.val and a.excluded == b.excluded


def test_save_load_and_pickle_round_trip(tmp_path: Path) -> None:
    table = SampleTable.from_records(random_records(100, seed=6), root="/data")
    table.save(tmp_path / "t.npz")
    loaded = SampleTable.load(tmp_path / "t.npz")
    assert loaded == table and loaded.root == "/data" and loaded.category_names == table.category_names
    assert pickle.loads(pickle.dumps(table)) == table
    (tmp_path / "bad.npz").write_bytes(b"not a zip")
    with pytest.raises(ValueError, match="bad.npz"):
        SampleTable.load(tmp_path / "bad.npz")


def test_table_is_compact() -> None:
    """25 tags a sample: well under the 300 bytes per sample the scale target allows."""
    builder = SampleTableBuilder("/data/danbooru")
    for i in range(2000):
        tags = [f"tag_{(i * 7 + k * 13) % 20000}" for k in range(25)]
        builder.add(f"{i // 1000:04d}/{i:08d}", f"/data/danbooru/{i // 1000:04d}/{i:08d}.jpg", tags, ["general"] * 25, 0)
    table = builder.build()
    assert table.nbytes / len(table) < 200


def test_a_damaged_table_is_refused_with_a_reason() -> None:
    """Arrays read from disk are checked: offsets out of order, ids out of range."""
    arrays = SampleTable.from_records(random_records(20, seed=7), root="/data").to_arrays()
    for key, damage in (("id_offsets", lambda a: a[::-1].copy()), ("tag_ids", lambda a: a + 10_000), ("tag_categories", lambda a: a + 200)):
        broken = dict(arrays)
        broken[key] = damage(arrays[key])
        with pytest.raises(ValueError, match="sample table"):
            SampleTable.from_arrays(broken)
