"""Tests for benchmarks/bench_scale.py: a small run over generated data prints complete, sane JSON."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.e2e  # runs the benchmark, which starts processes

ROOT = Path(__file__).resolve().parent.parent


def test_small_run_reports_every_phase(tmp_path: Path) -> None:
    """300 generated samples: every phase reports, the scan keeps them all, the reused scan equals
    the first, the table is compact, workers do not grow, and both sides of each kernel ran."""
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "bench_scale.py"), "--samples", "300", "--work", str(tmp_path), "--timeout", "240"],
        capture_output=True,
        text=True,
        encoding="utf-8",
        timeout=280,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout)
    data = tmp_path / "300" / "data"
    assert len(list(data.rglob("*.jpg"))) == 300 and len(list(data.rglob("*.json"))) == 300
    assert out["in_process"]["samples"] == 300 and 0 < out["in_process"]["table_bytes_per_sample"] < 300
    for method in ("fork", "spawn"):
        assert out["workers"][method]["touched"] == out["workers"]["fork"]["touched"] > 250
    for phase in ("cold", "resume"):
        assert out["train"][phase]["exit_code"] == 0 and out["train"][phase]["first_step_s"] > 0
    assert "from the scan index" in out["train"]["resume"]["lines"][0]
    k = out["kernels"]
    assert k["samples"] == 300 and k["rss_with_scan"] > 0
    assert set(k["scan_s"]) == {"here", "pool"} and set(k["flip_audit_s"]) == set(k["vocabulary_s"]) == {"per_record", "table"}
