"""Runs benchmarks/bench_train_step.py as a subprocess on CPU with a micro model and checks its JSON report."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.e2e  # the whole module runs processes (the slow tier)

REPO_ROOT = Path(__file__).resolve().parents[1]
SCRIPT = REPO_ROOT / "benchmarks" / "bench_train_step.py"
MICRO_ARGS = [
    "--device",
    "cpu",
    "--preset",
    "tiny",
    "--depth",
    "2",
    "--embed-dim",
    "64",
    "--heads",
    "4",
    "--image-size",
    "32",
    "--patch-size",
    "8",
    "--tags",
    "50",
    "--batch-size",
    "4",
    "--steps",
    "2",
    "--warmup",
    "1",
]
RESULT_KEYS = {
    "name",
    "compiled",
    "params",
    "images_per_s",
    "step_time_ms",
    "step_time_ms_median",
    "step_time_ms_min",
    "peak_memory_mib",
    "memory_kind",
    "compile_s",
    "flops_per_step",
    "achieved_tflops",
    "mfu",
    "final_loss",
}


def run_bench(*extra: str, cwd: Path = REPO_ROOT) -> subprocess.CompletedProcess:
    """Run the benchmark script with the micro arguments; fails the test on a non-zero exit."""
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), *MICRO_ARGS, *extra], cwd=str(cwd), capture_output=True, text=True, encoding="utf-8", timeout=240
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc


def test_cpu_micro_run_reports_positive_numbers(tmp_path: Path) -> None:
    out_file = tmp_path / "sub" / "bench.json"
    # Run from another folder: the script must find the project modules by itself.
    proc = run_bench("--json-out", str(out_file), cwd=tmp_path)
    report = json.loads(proc.stdout)  # stdout is exactly one JSON object
    assert json.loads(out_file.read_text(encoding="utf-8")) == report
    assert report["device"] == "cpu"
    assert report["dtype"] == "fp32"
    assert report["config"]["depth"] == 2 and report["config"]["embed_dim"] == 64 and report["config"]["tags"] == 50
    assert report["matmul_peak_tflops"] is None
    results = report["results"]
    expected_variants = {"ours_eager", "timm_eager"} if report["timm_available"] else {"ours_eager"}
    assert set(results) == expected_variants
    for key, result in results.items():
        assert set(result) == RESULT_KEYS, key
        for field in ("params", "images_per_s", "step_time_ms", "step_time_ms_median", "step_time_ms_min", "final_loss"):
            assert result[field] > 0, (key, field, result[field])
        assert result["peak_memory_mib"] >= 0
        assert result["memory_kind"] == "cpu_rss_growth"
        # images/s and step time describe the same measurement.
        assert result["images_per_s"] == pytest.approx(4 / (result["step_time_ms"] / 1000.0), rel=1e-6)
        assert result["step_time_ms_min"] <= result["step_time_ms_median"]
        # FLOPs / MFU are CUDA-only (the CPU attention kernel is invisible to FlopCounterMode).
        assert result["flops_per_step"] is None and result["mfu"] is None
    # Params, grads and two AdamW states are allocated after the baseline, so the growth is visible.
    assert results["ours_eager"]["peak_memory_mib"] > 0
    if report["timm_available"]:
        assert results["ours_eager"]["params"] == results["timm_eager"]["params"]
        ratios = report["ratios"]["eager"]
        assert ratios["images_per_s_ours_over_timm"] == pytest.approx(results["ours_eager"]["images_per_s"] / results["timm_eager"]["images_per_s"])
        assert ratios["peak_memory_ours_over_timm"] > 0
    assert "img/s" in proc.stderr  # the human table goes to stderr
    assert report["step"]["what"].startswith("training_utils.TrainStep")
    assert report["pipeline"] is None


def test_pipeline_rate_from_the_prepared_cache(tmp_path: Path) -> None:
    """--pipeline-images trains ours from generated JPEGs through the cache and real loader."""
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), *MICRO_ARGS, "--no-timm", "--pipeline-images", "8", "--pipeline-workers", "1"],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    report = json.loads(proc.stdout)
    pipe = report["pipeline"]
    assert pipe["name"] == "ours_eager_pipeline" and pipe["workers"] == 1 and pipe["images"] == 8
    assert pipe["images_per_s"] > 0
    assert pipe["share_of_synthetic"] == pytest.approx(pipe["images_per_s"] / report["results"]["ours_eager"]["images_per_s"])
    assert "of the synthetic-input rate" in proc.stderr


def test_bad_arguments_fail_cleanly() -> None:
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--device", "cpu", "--batch-size", "0"],
        cwd=str(REPO_ROOT),
        capture_output=True,
        text=True,
        encoding="utf-8",
        timeout=120,
    )
    assert proc.returncode != 0
    assert "--batch-size must be > 0" in proc.stderr


def test_timm_backbone_against_a_plain_timm_loop() -> None:
    """--timm-arch: our step with a timm backbone (a WD release's ViT arguments) against timm's own
    model with a 4 + T classifier in a plain loop; the same parameter count plus nothing."""
    args = '{"img_size": 32, "patch_size": 8, "embed_dim": 64, "depth": 2, "num_heads": 4, "class_token": false, "global_pool": "avg", "fc_norm": false, "act_layer": "gelu_tanh"}'
    proc = run_bench("--timm-arch", "vit_base_patch16_224", "--timm-args", args, "--ema-decay", "0")
    report = json.loads(proc.stdout)
    results = report["results"]
    assert set(results) == {"ours_eager", "timm_eager"} and report["config"]["timm_arch"] == "vit_base_patch16_224"
    # our two heads hold exactly the rows of timm's one classifier (4 ratings + 50 tags)
    assert results["ours_eager"]["params"] == results["timm_eager"]["params"]
    assert all(r["images_per_s"] > 0 and r["final_loss"] > 0 for r in results.values())
    assert report["ratios"]["eager"]["images_per_s_ours_over_timm"] > 0
    paired = [t / o for o, t in zip(report["round_step_time_ms"]["ours_eager"], report["round_step_time_ms"]["timm_eager"])]
    assert report["ratios"]["eager"]["images_per_s_ours_over_timm_paired_median"] == pytest.approx(sorted(paired)[len(paired) // 2])
