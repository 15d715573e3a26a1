"""Tests for benchmarks/bench_metrics.py: a tiny run as a subprocess prints sane, complete JSON."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.e2e  # the whole module runs processes (the slow tier)

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "benchmarks" / "bench_metrics.py"


def _run_bench(*args: str) -> dict:
    """Run the benchmark script with `args` and parse its single JSON line."""
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), *args],
        cwd=str(ROOT.parent),  # not the repo root: the script must find its module itself
        capture_output=True,
        text=True,
        encoding="utf-8",
        timeout=120,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    lines = [line for line in proc.stdout.splitlines() if line.strip()]
    assert len(lines) == 1, proc.stdout
    return json.loads(lines[0])


def test_tiny_benchmark_reports_json() -> None:
    """A tiny run prints one complete JSON object, reproducible for a fixed seed."""
    out = _run_bench("--tags", "40", "--samples", "300", "--batch-size", "64", "--bins", "128")
    assert out["tags"] == 40 and out["samples"] == 300 and out["bins"] == 128
    assert out["num_samples"] == 300  # a partial last batch (300 = 4 * 64 + 44) is counted
    assert 0.0 < out["mAP"] <= 1.0
    for key in ("seconds_update", "seconds_compute", "seconds_data_generation"):
        assert out[key] >= 0.0, key
    assert out["seconds_metrics"] == pytest.approx(out["seconds_update"] + out["seconds_compute"], abs=2e-3)
    assert out["peak_rss_mb"] >= out["rss_start_mb"] > 0
    # histogram: tags * 2 * bins int32 cells (+1 discard cell), plus small per-tag counters
    assert out["state_bytes"] >= 40 * 2 * 128 * 4
    # Same seed, same data, same mAP.
    again = _run_bench("--tags", "40", "--samples", "300", "--batch-size", "64", "--bins", "128")
    assert again["mAP"] == out["mAP"]


def test_bad_option_is_rejected() -> None:
    """A non-positive size is an argparse error naming the option."""
    proc = subprocess.run([sys.executable, str(SCRIPT), "--samples", "0"], capture_output=True, text=True, encoding="utf-8", timeout=120, check=False)
    assert proc.returncode == 2
    assert "--samples must be >= 1" in proc.stderr
