"""Tests for benchmarks/bench_export.py: a tiny run as a subprocess prints one complete JSON object."""

from __future__ import annotations

import json

import pytest

from conftest import ROOT, run_cli

pytestmark = pytest.mark.e2e  # the whole module runs processes (the slow tier)

SCRIPT = ROOT / "benchmarks" / "bench_export.py"


def test_tiny_export_benchmark_reports_time_memory_and_the_estimate() -> None:
    proc = run_cli(
        [
            str(SCRIPT),
            *("--demo-images", "40", "--sizes", "64,32", "--verify-images", "4"),
            *("--large", "32,16,32,1,2,300", "--large-images", "20", "--large-verify-images", "2"),
        ],
        cwd=ROOT.parent,
        timeout=400,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = [line for line in proc.stdout.splitlines() if line.strip()]
    assert len(lines) == 1, proc.stdout
    out = json.loads(lines[0])
    assert out["machine"]["cpus"] >= 1 and "bench_export.py" in out["command"]
    assert set(out["runs"]) == {"demo_64", "demo_32", "vit_32x1_p16_32_300_tags"}
    for name, run in out["runs"].items():
        assert run["exit_code"] == 0, (name, run)
        assert run["wall_s"] > 0 and run["peak_rss_mb"] > 100  # torch alone is more
        assert run["validation_images"] >= 1 and run["verified_images"] == min(run["validation_images"], 2 if name.startswith("vit") else 4)
        assert run["estimated_peak_mb"] > 0 and run["batch_size"] >= 1 and run["max_abs_diff"] <= 1e-4
        assert set(run["seconds"]) == {"backbone_pass", "onnx_export", "exported_metrics", "onnxruntime_check"}
    assert out["runs"]["demo_32"]["image_size"] == 32


def test_bad_model_spec_is_refused() -> None:
    proc = run_cli([str(SCRIPT), "--large", "448,16"], cwd=ROOT.parent, timeout=120)
    assert proc.returncode == 2 and "--large" in proc.stderr
