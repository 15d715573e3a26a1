"""Tests for benchmarks/bench_app.py: a tiny run as a subprocess prints one complete JSON object."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.e2e  # the whole module runs processes (the slow tier)

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "benchmarks" / "bench_app.py"


@pytest.mark.e2e
def test_tiny_app_benchmark_reports_page_and_tag_images() -> None:
    pytest.importorskip("gradio", reason="bench_app times tag_app: pip install -r requirements-app.txt")
    args = [sys.executable, str(SCRIPT), "--models", "demo", "--counts", "2", "--repeats", "1", "--width", "64", "--height", "48"]
    proc = subprocess.run(args, cwd=str(ROOT.parent), capture_output=True, text=True, encoding="utf-8", timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr
    lines = [line for line in proc.stdout.splitlines() if line.strip()]
    assert len(lines) == 1, proc.stdout
    out = json.loads(lines[0])
    demo = out["models"]["demo"]
    assert (demo["image_size"], demo["tags"]) == (64, 28)
    assert demo["page_2_images_s"] > 0 and demo["tag_images_cli_2_images_s"] > 0 and demo["tag_images_run_2_images_s"] > 0
    assert demo["page_2_images_tags_shown"] >= 2 * 4  # at least the four ratings of each image
    assert out["batch_size"] == 8 and len(out["load_before"]) == 3


@pytest.mark.e2e
def test_unknown_model_name_is_refused() -> None:
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--models", "vit_huge"], capture_output=True, text=True, encoding="utf-8", timeout=120, check=False
    )
    assert proc.returncode == 2 and "vit_huge" in proc.stderr
