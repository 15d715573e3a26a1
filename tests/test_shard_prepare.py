"""shard_prepare: tar shards with planted bad members and a dataset folder -> litdata chunks + tag index."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

import numpy as np
import pytest

from dataset_scan import scan_dataset
from image_preprocess import PreprocessParams, load_letterboxed
from scan_limits import ScanLimits
from shard_format import PREPARE_REPORT_FILE, SHARD_INDEX_FILE, ShardImages, ShardUnavailableError, is_shard_dataset, load_tag_index
from shard_helpers import chunk_items, make_tar_set, require
from shard_prepare import prepare_shards
from sidecar_format import parse_rating
from skip_list import SKIP_LIST_FILE


@pytest.fixture(autouse=True)
def _litdata() -> None:
    require("litdata")


def test_tar_set_with_bad_members_counts_each_by_reason(tmp_path: Path) -> None:
    tars = make_tar_set(tmp_path, good=12, max_sidecar_bytes=4096)
    out = tmp_path / "shards"
    report = prepare_shards(tars.root, str(out), verify="decode", limits=ScanLimits(max_sidecar_bytes=4096), workers=1, chunk_bytes=20_000, log=None)
    # every planted member counted under its reason, by shard and member name; nothing else skipped
    assert report["skipped"] == {reason: len(where) for reason, where in tars.bad.items()}
    with open(out / SKIP_LIST_FILE, newline="", encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle))
    found: dict[str, set[str]] = {}
    for row in rows:
        found.setdefault(row["reason"], set()).add(row["path"])
    assert found == tars.bad
    assert json.loads((out / PREPARE_REPORT_FILE).read_text(encoding="utf-8")) == report
    assert report["num_samples"] == len(tars.good) and report["shards"]["chunks"] >= 2
    # the chunks hold the images as they came, in the tag index's order
    scan, extra = load_tag_index(out)
    table = scan.records
    items = list(chunk_items(out))
    assert [it["id"] for it in items] == table.sample_ids() and sorted(table.sample_ids()) == sorted(tars.good)
    for i, item in enumerate(items):
        data, tags, rating = tars.good[item["id"]]
        assert bytes(item["image"]) == data
        assert list(table[i].tags) == tags and table[i].rating == parse_rating(rating)
    assert scan.skipped == report["skipped"] and extra["chunks"] == report["shards"]["chunks"]
    assert is_shard_dataset(out) and not is_shard_dataset(tars.root)


def test_folder_round_trip_same_ids_tags_and_pixels(tmp_path: Path, demo_data: Path) -> None:
    out = tmp_path / "demo_shards"
    prepare_shards(demo_data, str(out), verify="header", workers=1, log=None)
    folder = scan_dataset(demo_data, verify="header")
    scan, _ = load_tag_index(out)
    a, b = folder.records, scan.records
    assert a.sample_ids() == b.sample_ids()
    for i in (0, 1, len(a) // 2, len(a) - 1):
        assert (a[i].tags, a[i].categories, a[i].rating) == (b[i].tags, b[i].categories, b[i].rating)
    images = ShardImages(out, b)
    assert np.array_equal(images.rows_for(b.select(np.asarray([5, 2]))), [5, 2])
    params = PreprocessParams(image_size=32)
    for i in (0, 7, len(a) - 1):
        from_folder = load_letterboxed(a.image_path(i), params)
        from_shards = load_letterboxed(io.BytesIO(images.read(i, b.sample_id(i))), params)
        assert np.array_equal(from_folder[0], from_shards[0]) and from_folder[1] == from_shards[1]
    with pytest.raises(ShardUnavailableError, match="holds sample"):
        images.read(0, b.sample_id(1))


def test_reencoded_images_fit_the_size(tmp_path: Path) -> None:
    tars = make_tar_set(tmp_path, good=4)
    out = tmp_path / "small"
    report = prepare_shards(tars.root, str(out), image_size=16, workers=1, log=None)
    from PIL import Image

    for item in chunk_items(out):
        with Image.open(io.BytesIO(bytes(item["image"]))) as img:
            assert max(img.size) == 16
    assert report["shards"]["image_size"] == 16


def test_refuses_a_non_empty_output(tmp_path: Path) -> None:
    tars = make_tar_set(tmp_path, good=4)
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("x")
    with pytest.raises(FileExistsError, match="not empty"):
        prepare_shards(tars.root, str(tmp_path / "full"), workers=1, log=None)
    assert not (tmp_path / "full" / SHARD_INDEX_FILE).exists()


def test_short_error_keeps_a_worker_error_s_own_line() -> None:
    from shard_format import short_error

    wrapped = ShardUnavailableError(
        "Caught ShardUnavailableError in DataLoader worker process 0.\nOriginal Traceback (most recent call last):\n"
        '  File "x.py", line 1, in f\nshard_format.ShardUnavailableError: s3://b/p: cannot be read\n'
    )
    assert short_error(wrapped) == "s3://b/p: cannot be read"
    assert short_error(ValueError("plain")) == "plain"
