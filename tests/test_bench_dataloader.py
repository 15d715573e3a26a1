"""Runs benchmarks/bench_dataloader.py as a subprocess with tiny images and checks its JSON report."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.e2e  # the whole module runs processes (the slow tier)

REPO_ROOT = Path(__file__).resolve().parents[1]
SCRIPT = REPO_ROOT / "benchmarks" / "bench_dataloader.py"


def test_tiny_run_reports_every_variant(tmp_path: Path) -> None:
    """Every variant reports a positive rate; the cache costs exactly S*S*3 bytes per image."""
    out_file = tmp_path / "out" / "bench.json"
    proc = subprocess.run(
        [
            sys.executable,
            str(SCRIPT),
            "--images",
            "3",
            "--width",
            "120",
            "--height",
            "90",
            "--image-size",
            "32",
            "--repeat",
            "1",
            "--data-dir",
            str(tmp_path / "data"),
            "--loader-workers",
            "1",
            "--loader-passes",
            "4",
            "--batch-size",
            "1",
            "--json-out",
            str(out_file),
        ],
        cwd=str(tmp_path),
        capture_output=True,
        text=True,
        encoding="utf-8",
        timeout=240,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    report = json.loads(proc.stdout)
    assert json.loads(out_file.read_text(encoding="utf-8")) == report
    assert report["config"]["images"] == 3 and report["config"]["image_size"] == 32
    assert report["cache_bytes_per_image"] == 32 * 32 * 3
    assert 32 * 32 * 3 < report["queue_bytes_per_sample"] < 32 * 32 * 3 + 512  # the image plus a few labels
    source = sorted((tmp_path / "data" / "data").glob("*.jpg"))
    assert len(source) == 3
    assert report["source_bytes_per_image"] == sum(p.stat().st_size for p in source) / 3
    results = report["results"]
    assert set(results) == {"full_decode", "pil_floor", "prepare", "cache", "loader_full_decode", "loader_cache"}
    assert results["loader_cache"]["workers"] == 1 and results["loader_cache"]["device"] == "cpu"
    for name, result in results.items():
        assert result["images_per_s"] > 0, name
        if not name.startswith("loader_"):
            assert result["ms_per_image"] == pytest.approx(1000.0 / result["images_per_s"]), name
    assert report["speedup_cache_vs_full"] == results["cache"]["images_per_s"] / results["full_decode"]["images_per_s"]
