"""Tests for benchmarks/bench_shards.py: a tiny run as a subprocess prints one complete JSON object
(every format's loader rates and bytes, the shards' starts), and a second prepare of the same data is reused."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from conftest import ROOT, run_cli

pytestmark = pytest.mark.e2e  # runs the benchmark, which starts processes

sys.path.insert(0, str(ROOT / "benchmarks"))

import bench_shards  # noqa: E402  (benchmarks/ is not a package)

SCRIPT = ROOT / "benchmarks" / "bench_shards.py"
FORMATS = {"folder", "cache_raw", "cache_jpeg", "shards", "shards_64"}


def test_tiny_run_reports_every_format_and_the_shards_starts(tmp_path: Path) -> None:
    out_file = tmp_path / "out.json"
    args = [
        *("--images", "6", "--width", "120", "--height", "90", "--image-size", "32", "--shard-image-size", "64"),
        *("--prepare-workers", "1", "--rounds", "1", "--loader-workers", "1", "--loader-passes", "2", "--batch-size", "1"),
        *("--samples", "200", "--skip-folder-start", "--timeout", "240"),
        *("--work", str(tmp_path / "scale"), "--loader-dir", str(tmp_path / "loader"), "--json-out", str(out_file)),
    ]
    proc = run_cli([str(SCRIPT), *args], cwd=tmp_path, timeout=400)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(proc.stdout)
    assert json.loads(out_file.read_text(encoding="utf-8")) == report
    assert "bench_shards.py" in report["command"] and report["cpus"] >= 1 and len(report["load_average_at_start"]) == 3
    loader = report["loader"]
    assert set(loader["one_process"]) == set(loader["dataloader"]) == FORMATS
    assert 0 < loader["train_samples"] < 6
    for name in FORMATS:
        assert loader["one_process"][name]["images_per_s"] > 0 and loader["dataloader"][name]["images_per_s_per_worker"] > 0, name
    sizes = loader["bytes_per_image"]
    images = sorted((tmp_path / "loader" / "6_120x90" / "data").glob("*.jpg"))
    assert len(images) == 6 and sizes["folder_images"]["apparent"] == round(sum(p.stat().st_size for p in images) / 6, 1)
    assert sizes["cache_raw"]["apparent"] >= 32 * 32 * 3  # the letterboxed pixels, plus the cache's index
    assert sizes["shards"]["apparent"] > sizes["folder_images"]["apparent"]  # the bytes as they came, plus the tag index
    assert 0 < sizes["shards_tag_index"]["apparent"] < sizes["shards"]["apparent"]
    start = report["start"]
    assert start["samples"] == 200 and "folder" not in start and start["prepare"]["reused"] is False
    assert start["prepare"]["shards"]["chunks"] >= 1 and start["tag_index_bytes_per_sample"] > 0
    for phase in ("cold", "resume"):
        run = start["shards"][phase]
        assert run["exit_code"] == 0 and run["first_step_s"] > 0 and run["processes"]["main"]["processes"] == 1, run
        assert run["lines"][0].startswith("data: 200 samples used"), run["lines"]
    again = bench_shards._prepared(tmp_path / "scale" / "200" / "data", tmp_path / "scale" / "200" / "shards", 200, 1)
    assert again == {**start["prepare"], "reused": True}


def test_unknown_phase_is_refused() -> None:
    with pytest.raises(SystemExit) as exc:
        bench_shards.parse_args(["--skip", "loader,nope"])
    assert exc.value.code == 2
