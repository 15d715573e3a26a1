"""Tests for benchmarks/bench_tagging.py: a tiny run as a subprocess prints one complete JSON object."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.e2e  # the whole module runs processes (the slow tier)

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "benchmarks" / "bench_tagging.py"


@pytest.mark.e2e
def test_tiny_tagging_benchmark_reports_both_backends() -> None:
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--models", "demo", "--images", "16", "--batch-size", "4", "--threads", "1"],
        cwd=str(ROOT.parent),
        capture_output=True,
        text=True,
        encoding="utf-8",
        timeout=240,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    lines = [line for line in proc.stdout.splitlines() if line.strip()]
    assert len(lines) == 1, proc.stdout
    out = json.loads(lines[0])
    assert out["threads"] == 1 and out["torch_threads"] == 1
    demo = out["models"]["demo"]
    assert (demo["image_size"], demo["width"], demo["depth"], demo["tags"]) == (64, 128, 4, 28)
    assert demo["images"] == 16
    assert demo["onnxruntime_images_per_s"] > 0 and demo["pytorch_images_per_s"] > 0


@pytest.mark.e2e
def test_unknown_model_name_is_refused() -> None:
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--models", "vit_huge"], capture_output=True, text=True, encoding="utf-8", timeout=120, check=False
    )
    assert proc.returncode == 2 and "vit_huge" in proc.stderr
