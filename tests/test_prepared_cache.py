"""Tests for prepared_cache: same pixels as decoding, invalidation, the prepare command of both scripts."""

from __future__ import annotations

import json
import os
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import broken_corpus as bc
from augmentation import AugmentParams
from batching import SidecarJsonDataset
from data_fixtures import broken_corpus, listing, small_orientation_handler
from dataset_scan import SampleRecord, scan_dataset
from image_preprocess import PreprocessParams, load_image
from prepared_cache import PreparedCache, prepare_cache
from skip_list import SKIP_LIST_FILE, read_skip_list

_REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> bc.BrokenCorpus:
    """47 good + 12 broken + 1 unknown-rating sample: exactly 20% of 60 samples are bad."""
    return broken_corpus(tmp_path_factory.mktemp("corpus"))


def test_prepared_cache_same_pixels_and_invalidation(tmp_path: Path) -> None:
    """Cached samples equal decoded ones; a changed source file is decoded again, then re-cached."""
    root = tmp_path / "root"
    for i in range(6):
        bc.write_image(root / f"i{i}.jpg", 30 + i, 20, seed=i)
        bc.write_json(root / f"i{i}.jpg.json", {"tags": ["smile", "looking_to_the_left"], "rating": "g"})
    scan = scan_dataset(root)
    params = PreprocessParams(16, pad_color=(1, 2, 3))
    before = listing(root)
    report = prepare_cache(scan.records, tmp_path / "cache", params, shard_size=4, data_root=root)
    assert listing(root) == before
    assert report["cached"] == 6 and report["decoded"] == 6 and report["shards"] == 2
    assert report["bytes_on_disk"] == 6 * 16 * 16 * 3
    cache = PreparedCache(tmp_path / "cache", params)
    t2i = {"smile": 0, "looking_to_the_left": 1, "looking_to_the_right": 2}
    aug = AugmentParams(flip_prob=0.5, brightness=0.2)
    cached = SidecarJsonDataset(scan.records, t2i, params, augment=aug, orientation=small_orientation_handler(), cache=cache)
    plain = SidecarJsonDataset(scan.records, t2i, params, augment=aug, orientation=small_orientation_handler())
    clone = pickle.loads(pickle.dumps(cached))
    for key in [(i, e) for i in range(6) for e in range(2)]:
        a, b, c = cached[key], plain[key], clone[key]
        assert torch.equal(a["image"], b["image"]) and torch.equal(c["image"], b["image"])
        assert torch.equal(a["tag_indices"], b["tag_indices"]) and a["flip"] == b["flip"]
    assert cached.cache_hits == 12 and clone.cache_hits == 12 and plain.cache_hits == 0
    # change one source: the cache entry is stale, the dataset decodes the new file
    bc.write_image(root / "i2.jpg", 20, 40, color=(0, 200, 0))
    os.utime(root / "i2.jpg", ns=(1, 1))
    fresh = SidecarJsonDataset(scan.records, t2i, params, cache=PreparedCache(tmp_path / "cache", params))
    index = [r.sample_id for r in scan.records].index("i2.jpg")
    np.testing.assert_array_equal(fresh[index]["image"].permute(1, 2, 0).numpy(), load_image(root / "i2.jpg", params))
    assert fresh.cache_hits == 0
    again = prepare_cache(scan.records, tmp_path / "cache", params, shard_size=4)
    assert again["reused"] == 5 and again["decoded"] == 1
    with pytest.raises(ValueError, match="image_size"):
        PreparedCache(tmp_path / "cache", PreprocessParams(32))
    with pytest.raises(ValueError, match="inside the dataset"):
        prepare_cache(scan.records, root / "cache", params, data_root=root)
    with pytest.raises(FileNotFoundError):
        PreparedCache(tmp_path / "nothing", params)


@pytest.mark.parametrize("script", ["dataset_loader.py", "prepared_cache.py"])
@pytest.mark.e2e
def test_prepare_cli(corpus: bc.BrokenCorpus, tmp_path: Path, script: str) -> None:
    """The prepare command (documented as dataset_loader.py's, also prepared_cache.py's) scans, caches
    the usable images and reports the failures as JSON."""
    before = listing(corpus.root)
    out = tmp_path / "cache"
    proc = subprocess.run(
        [sys.executable, str(_REPO / script), "prepare", "--data", str(corpus.root), "--image-size", "8", "--out", str(out), "--workers", "0"],
        capture_output=True,
        text=True,
        encoding="utf-8",
        timeout=120,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    header_records = corpus.expected_records("header")
    assert report["cached"] == header_records - len(corpus.decode_only_ids)
    assert report["failed"] == {"image_undecodable": len(corpus.decode_only_ids)}
    assert proc.stderr.startswith(f"data: {header_records} samples used")
    assert listing(corpus.root) == before
    assert (out / "index.json").is_file()
    # every sample left out, by the scan or by the cache's decode, is listed by path in the cache folder
    rows = list(read_skip_list(out / SKIP_LIST_FILE))
    assert report["skipped_list"] == {"file": SKIP_LIST_FILE, "samples": len(rows)}
    assert sorted(r[0] for r in rows if r[2] == "cache") == sorted(corpus.decode_only_ids)
    assert len([r for r in rows if r[2] == "start-up"]) == report["scan"]["num_skipped"]
    assert f"listed in {out / SKIP_LIST_FILE}" in proc.stderr


def test_decode_failures_are_recorded_and_not_retried(tmp_path: Path) -> None:
    """A file the build cannot decode is recorded in index.json with its reason; the next build
    does not decode it again while it is unchanged, and retries it once it changed."""
    root = tmp_path / "root"
    good = bc.write_image(root / "good.png", 12, 10)
    bad = bc.write_truncated_png(root / "bad.png")
    records = [SampleRecord("good.png", str(good), ("a",), ("",), 0), SampleRecord("bad.png", str(bad), ("a",), ("",), 0)]
    params = PreprocessParams(image_size=8)
    first = prepare_cache(records, tmp_path / "cache", params)
    assert first["failed_samples"] == {"bad.png": "image_undecodable"} and first["decoded"] == 1
    assert PreparedCache(tmp_path / "cache", params).failures == {"bad.png": "image_undecodable"}
    second = prepare_cache(records, tmp_path / "cache", params)
    assert second["decoded"] == 0 and second["reused"] == 1 and second["failed"] == {"image_undecodable": 1}
    bc.write_image(root / "bad.png", 12, 10, seed=5)
    os.utime(root / "bad.png", ns=(1, 1))
    third = prepare_cache(records, tmp_path / "cache", params)
    assert third["decoded"] == 1 and third["failed"] == {} and PreparedCache(tmp_path / "cache", params).failures == {}
