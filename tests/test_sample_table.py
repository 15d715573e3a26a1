"""SampleTable: the compact sample table equals the record list it replaces, in every operation."""

from __future__ import annotations

import pickle
import random
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

import sample_table
from dataset_scan import filter_known_tags
from dataset_split import split_records
from sample_table import SampleRecord, SampleTable, SampleTableBuilder, SkippedSamples
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


def test_extend_equals_adding_the_rows_one_by_one() -> None:
    """Tables built apart (their own tag and category ids) and appended give the table of all rows."""
    records = random_records(240, seed=8)
    parts = [SampleTable.from_records(records[i : i + 70], root="/data") for i in range(0, 240, 70)]
    builder = SampleTableBuilder("/data")
    builder.add(records[0].sample_id, records[0].image_path, records[0].tags, records[0].categories, records[0].rating)
    for part in parts:
        builder.extend(part)
    assert builder.build() == records[:1] + records
    assert len(builder) == 0 and len(builder.build()) == 0  # build empties the builder
    with pytest.raises(ValueError, match="/elsewhere"):
        SampleTableBuilder("/data").extend(SampleTable.from_records(records[:3], root="/elsewhere"))


def test_skipped_samples_pack_round_trip_and_order() -> None:
    """Rows come back as added (text that is not UTF-8 escaped), counted by reason, in key order,
    through the .npz arrays, and appended to a list that numbers its reasons differently."""
    skips = SkippedSamples(("a_reason", "b_reason"))
    rows = [
        (f"dir/f{i}.png" if i % 5 else f"dir/caf\udce9{i}.png", ("b_reason", "a_reason", "new_reason")[i % 3], f"detail {i}" * (i % 2))
        for i in range(50)
    ]
    for key, (path, reason, detail) in zip(range(50, 0, -1), rows):
        skips.add(reason, path, detail, key)
    shown = [(p.encode("utf-8", "backslashreplace").decode("utf-8"), r, d) for p, r, d in rows]
    assert list(skips) == shown and skips[-1] == shown[-1] and len(skips) == 50
    assert skips.counts() == dict(Counter(r for _, r, _ in rows))
    assert list(skips.in_key_order()) == shown[::-1]
    assert skips.examples(2)["new_reason"] == [shown[2][0], f"{shown[5][0]}: {shown[5][2]}"]
    loaded = SkippedSamples.from_arrays(skips.to_arrays())
    assert list(loaded) == shown and loaded.counts() == skips.counts()
    other = SkippedSamples(("new_reason",))
    other.add("new_reason", "x.png", "first", 0)
    other.extend(skips.select(np.arange(49, -1, -1)))
    assert list(other) == [("x.png", "new_reason", "first")] + shown[::-1]
    with pytest.raises(IndexError):
        skips[50]


def test_skipped_samples_are_compact_and_damage_is_refused() -> None:
    """A million-file folder's bad files cost their text plus ~20 bytes a row; damaged arrays raise."""
    skips = SkippedSamples()
    for i in range(5000):
        skips.add("sidecar_missing", f"{i // 1000:05d}/post_{i:08d}.jpg", "no post.jpg.json or stem .json", i)
    arrays = skips.to_arrays()
    text = sum(len(arrays[k]) for k in ("paths", "details"))
    assert (sum(a.nbytes for a in arrays.values()) - text) / len(skips) < 20
    for key, damage in (("codes", lambda a: a + 7), ("path_offsets", lambda a: a[::-1].copy()), ("details", lambda a: a[:-3])):
        broken = dict(arrays)
        broken[key] = damage(arrays[key])
        with pytest.raises(ValueError, match="skip list"):
            SkippedSamples.from_arrays(broken)


@pytest.mark.parametrize("kind", ["runs", "shuffled", "repeated"])
def test_take_ragged_equals_row_by_row(monkeypatch: pytest.MonkeyPatch, kind: str) -> None:
    """Long runs of rows (a split) copied a run at a time, shuffled or repeated rows gathered a
    block at a time (blocks of 7 here): both equal the rows taken one by one."""
    monkeypatch.setattr(sample_table, "_GATHER_ROWS", 7)
    rng = np.random.default_rng(3)
    lengths = rng.integers(0, 6, size=200)
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    blob = rng.integers(0, 1000, size=int(offsets[-1])).astype(np.int32)
    rows = {"runs": np.flatnonzero(rng.random(200) > 0.02), "shuffled": rng.permutation(200), "repeated": rng.integers(0, 200, size=300)}[kind]
    out, new_offsets = sample_table.take_ragged(blob, offsets, rows)
    expected = [blob[offsets[r] : offsets[r + 1]] for r in rows]
    assert [out[new_offsets[i] : new_offsets[i + 1]].tolist() for i in range(len(rows))] == [e.tolist() for e in expected]
    assert out.dtype == blob.dtype and len(sample_table.take_ragged(blob, offsets, np.zeros(0, dtype=np.int64))[0]) == 0
