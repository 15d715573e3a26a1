"""Tests for benchmarks/bench_recipe.py: tiny runs as subprocesses print complete, sane JSON."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "benchmarks" / "bench_recipe.py"
VARIANTS = (
    "baseline",
    "repeat_factor",
    "mixup_cutmix",
    "asl_focal",
    "weight_inverse_sqrt",
    "weight_effective_number",
    "progressive_resolution",
    "combo",
    "finetune",
    "finetune_layer_decay",
)
RATES = ("mAP", "f1_micro", "f1_macro_at_pr", "ap_rare_third", "rating_accuracy")

pytestmark = pytest.mark.e2e


def _run_bench(*args: str) -> subprocess.CompletedProcess:
    """Run the benchmark script with `args` from outside the repository root."""
    return subprocess.run(
        [sys.executable, str(SCRIPT), *args],
        cwd=str(ROOT.parent),  # not the repo root: the script must find its modules itself
        capture_output=True,
        text=True,
        encoding="utf-8",
        timeout=120,
        check=False,
    )


def _document(proc: subprocess.CompletedProcess) -> dict:
    """The single JSON line a successful run prints."""
    assert proc.returncode == 0, proc.stderr
    lines = [line for line in proc.stdout.splitlines() if line.strip()]
    assert len(lines) == 1, proc.stdout
    return json.loads(lines[0])


def test_smoke_run_reports_every_variant_with_sane_numbers(tmp_path: Path) -> None:
    """All variants x 2 seeds: metrics in [0, 1], mean/std consistent with the per-seed values, JSON file written."""
    out_file = tmp_path / "recipe.json"
    doc = _document(_run_bench("--smoke", "--seeds", "2", "--json-out", str(out_file)))
    assert json.loads(out_file.read_text(encoding="utf-8")) == doc
    assert doc["mode"] == "steps" and doc["seeds"] == 2 and doc["threads"] == 1
    assert set(doc["summary"]) == set(VARIANTS) and set(doc["per_seed"]) == {"0", "1"}
    stats = doc["dataset"]
    # A long tail: the rarest tag has a handful of images, the most frequent many times the median.
    assert 1 <= stats["train_positives_min"] < stats["train_positives_median"] < stats["train_positives_max"]
    steps = doc["sizes"]["steps"]
    for name in VARIANTS:
        runs = [doc["per_seed"][seed][name] for seed in ("0", "1")]
        for run in runs:
            assert run["steps"] == steps, name
            assert run["train_seconds"] > 0 and math.isfinite(run["final_loss"]), name
            for key in RATES:
                assert 0.0 <= run[key] <= 1.0, (name, key, run[key])
        summary = doc["summary"][name]
        for key in RATES:
            values = [run[key] for run in runs]
            assert summary[key]["n"] == 2
            assert summary[key]["mean"] == pytest.approx(sum(values) / 2)
            assert summary[key]["std"] == pytest.approx(abs(values[0] - values[1]) / math.sqrt(2))
        # Layer decay is judged against fine-tuning without it; everything else against the baseline.
        reference = "finetune" if name == "finetune_layer_decay" else "baseline"
        if name == "baseline":
            assert "delta_vs_reference" not in summary
        else:
            assert summary["reference"] == reference
            ref_runs = [doc["per_seed"][seed][reference] for seed in ("0", "1")]
            expected = sum(r["mAP"] - b["mAP"] for r, b in zip(runs, ref_runs)) / 2
            assert summary["delta_vs_reference"]["mAP"]["mean"] == pytest.approx(expected)
    # Every technique changes training: no variant ends with exactly the baseline's loss.
    base_loss = doc["per_seed"]["0"]["baseline"]["final_loss"]
    for name in VARIANTS[1:]:
        assert doc["per_seed"]["0"][name]["final_loss"] != base_loss, name
    assert doc["per_seed"]["0"]["finetune_layer_decay"]["final_loss"] != doc["per_seed"]["0"]["finetune"]["final_loss"]

    # Paired design: a variant's result does not depend on which other variants ran with it.
    subset = _document(_run_bench("--smoke", "--seeds", "1", "--variants", "combo,finetune_layer_decay"))
    for name in ("combo", "finetune_layer_decay"):
        for key in RATES + ("final_loss",):
            assert subset["per_seed"]["0"][name][key] == doc["per_seed"]["0"][name][key], (name, key)


def test_wall_time_mode_trains_for_the_budget() -> None:
    """--wall-seconds: each variant stops once its budget is spent, after at least one step."""
    budget = 0.5
    doc = _document(_run_bench("--smoke", "--seeds", "1", "--wall-seconds", str(budget), "--variants", "baseline,progressive_resolution"))
    assert doc["mode"] == "wall_seconds" and doc["wall_seconds"] == budget
    for name in ("baseline", "progressive_resolution"):
        run = doc["per_seed"]["0"][name]
        assert run["steps"] >= 1
        # Stops at the first step boundary past the budget: one step (well under a second here) late at most.
        assert budget <= run["train_seconds"] < budget + 1.0, run["train_seconds"]
        assert 0.0 <= run["mAP"] <= 1.0


def test_unknown_variant_is_rejected() -> None:
    """A misspelt variant is an argparse error naming it."""
    proc = _run_bench("--smoke", "--variants", "baseline,no_such_trick")
    assert proc.returncode == 2
    assert "no_such_trick" in proc.stderr
