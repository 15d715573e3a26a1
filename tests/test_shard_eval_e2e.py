"""Evaluating and exporting on a sharded dataset (`--data CHUNKS`), end to end: the session's demo run
evaluated on the demo converted to litdata chunks writes the folder's reports figure for figure
(validation_loop.py, its validation split when data.root names the chunks, the samples left out,
export_model.py's report, tag_app's Validation tab). The reference is the same model on the demo folder."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import yaml

import dataset_loader
import export_model
import validation_loop
from conftest import ROOT, TrainedRun, run_cli
from shard_helpers import require
from shard_prepare import prepare_shards
from tag_app import prepare_validation

pytestmark = pytest.mark.e2e

# export_report.json keys that name the source or measure this machine, not the model on the data
_MACHINE_KEYS = ("data", "seconds", "memory")


@pytest.fixture(scope="module")
def demo_shards(tmp_path_factory: pytest.TempPathFactory, demo_data: Path) -> Path:
    """The session's demo dataset as a chunk folder, written by the README's command (in this process, one worker)."""
    require("litdata")
    out = tmp_path_factory.mktemp("eval_shards") / "demo"
    command = ["prepare", "--data", str(demo_data), "--format", "litdata", "--out", str(out), "--workers", "1"]
    assert dataset_loader.main(command) == 0
    return out


def evaluate(checkpoint: Path, out: Path, *extra: str) -> dict:
    """validation_loop.main in this process (no loader workers); metrics.json."""
    assert validation_loop.main(["--checkpoint", str(checkpoint), "--out", str(out), "--num-workers", "0", *extra]) == 0
    return json.loads((out / "metrics.json").read_text(encoding="utf-8"))


def without(document: dict, *keys: str) -> str:
    """`document` less `keys`, as canonical JSON text (NaN equals NaN there)."""
    return json.dumps({k: v for k, v in document.items() if k not in keys}, sort_keys=True)


def last_checkpoint(run: TrainedRun) -> Path:
    """The run's last step folder."""
    checkpoints = run.run_dir / "checkpoints"
    return checkpoints / (checkpoints / "last").read_text(encoding="utf-8").strip()


def test_validation_on_chunks_writes_the_folders_reports(trained_run: TrainedRun, demo_shards: Path, tmp_path: Path) -> None:
    """The CLI as a user runs it, with the run's 2 spawned loader workers reading the chunks: metrics.json,
    per_tag.csv, thresholds.json and every sample's probabilities equal the folder's."""
    checkpoint = last_checkpoint(trained_run)
    folder = evaluate(checkpoint, tmp_path / "folder", "--data", str(trained_run.data), "--save-predictions")
    out = tmp_path / "chunks"
    proc = run_cli(
        [str(ROOT / "validation_loop.py"), "--checkpoint", str(checkpoint), "--data", str(demo_shards), "--out", str(out), "--save-predictions"],
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    chunks = json.loads((out / "metrics.json").read_text(encoding="utf-8"))
    assert chunks["data"] == str(demo_shards) and folder["data"] == str(trained_run.data)
    assert without(chunks, "data") == without(folder, "data")
    assert chunks["num_samples"] == 600 and chunks["num_skipped"] == 0
    for name in ("per_tag.csv", "thresholds.json", "skipped_samples.csv"):
        assert (out / name).read_bytes() == (tmp_path / "folder" / name).read_bytes(), name
    with np.load(out / "predictions.npz") as a, np.load(tmp_path / "folder" / "predictions.npz") as b:
        for key in ("probs", "targets", "rating_logits", "ratings", "paths"):
            assert np.array_equal(a[key], b[key]), key  # the same bytes decode to the same pixels


def test_a_checkpoint_whose_data_root_names_the_chunks_evaluates_the_same_split(trained_run: TrainedRun, demo_shards: Path, tmp_path: Path) -> None:
    """Without --data: the checkpoint's data.root set to the chunks gives the folder run's validation split
    (the hash split of the same ids) and its figures."""
    source = last_checkpoint(trained_run)
    copy = tmp_path / "run" / "checkpoints" / source.name
    shutil.copytree(source, copy)
    config = yaml.safe_load((copy / "config.yaml").read_text(encoding="utf-8"))
    assert config["data"]["root"] == str(trained_run.data)
    config["data"]["root"] = str(demo_shards)
    (copy / "config.yaml").write_text(yaml.safe_dump(config), encoding="utf-8")
    folder, chunks = evaluate(source, tmp_path / "folder"), evaluate(copy, tmp_path / "chunks")
    assert chunks["data"] == str(demo_shards)
    assert without(chunks, "data", "checkpoint") == without(folder, "data", "checkpoint")
    assert 0 < chunks["num_samples"] < 600


def test_samples_left_out_are_listed_as_the_folders(trained_run: TrainedRun, tmp_path: Path) -> None:
    """Images without a sidecar (left out by the prepare) and truncated JPEGs (stored, then failing to decode
    in the evaluation): skipped_samples.csv names each one with its reason, as the folder's does."""
    import broken_corpus as bc
    from demo_dataset import generate_demo_dataset

    require("litdata")
    data = generate_demo_dataset(tmp_path / "data", num_images=24, seed=5, image_size=32)
    sidecar = json.loads(next(data.rglob("*.json")).read_text(encoding="utf-8"))
    for i in range(3):
        bc.write_image(data / f"lonely_{i}.png", 32, 32, seed=3)
    for i in range(2):
        bc.write_truncated_jpeg(data / f"cut_{i}.jpg", seed=i)  # the header check passes; the decode fails
        bc.write_json(data / f"cut_{i}.jpg.json", sidecar)
    prepare_shards(data, str(tmp_path / "chunks"), workers=1, log=None)
    checkpoint = last_checkpoint(trained_run)
    folder, chunks = (
        evaluate(checkpoint, tmp_path / "eval_folder", "--data", str(data)),
        evaluate(checkpoint, tmp_path / "eval_chunks", "--data", str(tmp_path / "chunks")),
    )
    assert without(chunks, "data") == without(folder, "data")
    assert chunks["num_samples"] == 24 and chunks["num_skipped"] == 2
    listed = (tmp_path / "eval_chunks" / "skipped_samples.csv").read_text(encoding="utf-8")
    assert listed == (tmp_path / "eval_folder" / "skipped_samples.csv").read_text(encoding="utf-8")
    assert listed.count("sidecar_missing,start-up") == 3 and listed.count("image_undecodable,validation") == 2


def test_export_on_chunks_reports_the_folders_numbers(trained_run: TrainedRun, demo_shards: Path, tmp_path: Path) -> None:
    """export_model.py --data CHUNKS: the same calibration, metrics, thresholds and tag list as --data FOLDER."""
    checkpoint = last_checkpoint(trained_run)
    reports = {}
    for name, data in (("folder", trained_run.data), ("chunks", demo_shards)):
        args = ["--checkpoint", str(checkpoint), "--data", str(data), "--out", str(tmp_path / name), "--num-workers", "0", "--verify-images", "16"]
        assert export_model.main(args) == 0
        reports[name] = json.loads((tmp_path / name / "export_report.json").read_text(encoding="utf-8"))
    assert reports["chunks"]["data"] == str(demo_shards)
    assert without(reports["chunks"], *_MACHINE_KEYS) == without(reports["folder"], *_MACHINE_KEYS)
    assert reports["chunks"]["validation_samples"] == 600 and reports["chunks"]["onnx_vs_pytorch"]["images"] == 16
    for name in ("selected_tags.csv", "thresholds.json"):
        assert (tmp_path / "chunks" / name).read_bytes() == (tmp_path / "folder" / name).read_bytes(), name


def test_the_pages_validation_tab_on_chunks(trained_run: TrainedRun, demo_shards: Path, tmp_path: Path) -> None:
    """tag_app.prepare_validation(--data CHUNKS) evaluates through the same path: the folder's figures, kept for the next call."""
    checkpoint = last_checkpoint(trained_run)
    folder = prepare_validation(checkpoint, data=str(trained_run.data), eval_dir=tmp_path / "folder", num_workers=0)
    chunks = prepare_validation(checkpoint, data=str(demo_shards), eval_dir=tmp_path / "chunks", num_workers=0)
    assert chunks.computed and without(chunks.metrics) == without(folder.metrics)
    assert json.dumps(chunks.rows) == json.dumps(folder.rows)
    again = prepare_validation(checkpoint, data=str(demo_shards), eval_dir=tmp_path / "chunks", num_workers=0)
    assert not again.computed and without(again.metrics) == without(chunks.metrics)
