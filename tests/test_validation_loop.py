"""validation_loop.py end to end in each mode on the shared trained run, plus report helpers."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from conftest import ROOT, TrainedRun, run_cli


def evaluate_cli(run: TrainedRun, out: Path, *extra: str) -> dict:
    proc = run_cli(
        [str(ROOT / "validation_loop.py"), "--checkpoint", str(run.run_dir / "checkpoints" / "last"), "--out", str(out), *extra], cwd=out.parent
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "eval step_" in proc.stdout
    return json.loads((out / "metrics.json").read_text(encoding="utf-8"))


def test_full_mode_writes_every_report(trained_run: TrainedRun, tmp_path: Path) -> None:
    metrics = evaluate_cli(trained_run, tmp_path / "full")
    out = tmp_path / "full"
    vocab = json.loads((trained_run.run_dir / "vocabulary.json").read_text(encoding="utf-8"))
    rows = list(csv.DictReader((out / "per_tag.csv").open(encoding="utf-8")))
    assert [r["tag"] for r in rows] == vocab["index_to_tag"]
    supports = sum(int(r["support"]) for r in rows)
    assert supports > 0
    thresholds = json.loads((out / "thresholds.json").read_text(encoding="utf-8"))
    assert set(thresholds["per_tag"]) == set(vocab["index_to_tag"])
    assert 0.0 < thresholds["global_threshold"] < 1.0
    report = (out / "report.md").read_text(encoding="utf-8")
    assert "mAP" in report and "Rating confusion" in report and "Worst tags" in report
    assert metrics["num_tags"] == len(vocab["index_to_tag"])
    assert metrics["mode"] == "full"
    confusion = metrics["rating_confusion"]
    assert sum(map(sum, confusion)) == metrics["num_samples"]  # the demo rates every image


def test_fast_mode_counts_fewer_samples(trained_run: TrainedRun, tmp_path: Path) -> None:
    full = evaluate_cli(trained_run, tmp_path / "full")
    fast = evaluate_cli(trained_run, tmp_path / "fast", "--mode", "fast", "--fast-batches", "1", "--batch-size", "16")
    assert fast["num_samples"] == 16 < full["num_samples"]


def test_tags_mode_and_unknown_tag(trained_run: TrainedRun, tmp_path: Path) -> None:
    vocab = json.loads((trained_run.run_dir / "vocabulary.json").read_text(encoding="utf-8"))
    chosen = vocab["index_to_tag"][:2]
    metrics = evaluate_cli(trained_run, tmp_path / "tags", "--mode", "tags", "--tags", ",".join(chosen))
    assert list(metrics["tags"]) == chosen
    assert all(0.0 <= metrics["tags"][t]["ap"] <= 1.0 for t in chosen)
    proc = run_cli(
        [
            str(ROOT / "validation_loop.py"),
            "--checkpoint",
            str(trained_run.run_dir / "checkpoints" / "last"),
            "--mode",
            "tags",
            "--tags",
            "no_such_tag",
            "--out",
            str(tmp_path / "bad"),
        ],
        cwd=tmp_path,
    )
    assert proc.returncode == 2 and "no_such_tag" in proc.stderr


def test_hierarchical_mode_groups(trained_run: TrainedRun, tmp_path: Path) -> None:
    metrics = evaluate_cli(trained_run, tmp_path / "hier", "--mode", "hierarchical")
    assert metrics["by_category"] and metrics["by_frequency_bucket"]


def test_other_dataset_folder(trained_run: TrainedRun, tmp_path: Path) -> None:
    from demo_dataset import generate_demo_dataset

    other = generate_demo_dataset(tmp_path / "other", num_images=64, seed=7, image_size=32)
    metrics = evaluate_cli(trained_run, tmp_path / "other_eval", "--data", str(other))
    assert metrics["num_samples"] == 64
    assert metrics["data"] == str(other)


def test_every_skipped_sample_of_data_is_listed(trained_run: TrainedRun, tmp_path: Path) -> None:
    """--data with more bad files than the report keeps as examples: skipped_samples.csv in --out names
    each one, those the scan left out and those that failed to load during evaluation."""
    import broken_corpus as bc
    from demo_dataset import generate_demo_dataset
    from skip_list import SKIP_LIST_FILE, read_skip_list

    data = generate_demo_dataset(tmp_path / "data", num_images=24, seed=5, image_size=32)
    sidecar = json.loads(next(data.rglob("*.json")).read_text(encoding="utf-8"))
    lonely = [f"lonely_{i}.png" for i in range(7)]
    for name in lonely:
        bc.write_image(data / name, 32, 32, seed=3)
    truncated = [f"cut_{i}.jpg" for i in range(2)]
    for i, name in enumerate(truncated):
        bc.write_truncated_jpeg(data / name, seed=i)  # the header check passes; the load fails
        bc.write_json(data / (name + ".json"), sidecar)
    out = tmp_path / "eval"
    metrics = evaluate_cli(trained_run, out, "--data", str(data))
    rows = list(read_skip_list(out / SKIP_LIST_FILE))
    assert sorted(r[0] for r in rows if r[1] == "sidecar_missing") == sorted(lonely)
    assert sorted((r[0], r[2]) for r in rows if r[0].startswith("cut_")) == [(n, "validation") for n in truncated]
    assert metrics["num_skipped"] == 2


@pytest.mark.parametrize(
    "args, fragment", [(["--checkpoint", "/nonexistent/step_1"], "not found: /nonexistent/step_1"), (["--ema"], "ema.safetensors")]
)
def test_clear_errors(trained_run: TrainedRun, tmp_path: Path, args: list[str], fragment: str) -> None:
    base = ["--checkpoint", str(trained_run.run_dir / "checkpoints" / "last")]
    if args[0] == "--checkpoint":
        base = []
    proc = run_cli([str(ROOT / "validation_loop.py"), *base, *args, "--out", str(tmp_path / "x")], cwd=tmp_path)
    assert proc.returncode == 2 and fragment in proc.stderr
