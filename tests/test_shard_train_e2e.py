"""Training from a sharded dataset, end to end: the demo as litdata chunks trains as the folder does
(same split, same validation mAP), and a run from the loopback S3 server killed with SIGKILL in
mid-epoch (2 workers), resumed, then cut off from storage and resumed again ends with the
uninterrupted run's per-step losses and weights."""

from __future__ import annotations

import json
import signal
import sys
import time
from pathlib import Path
from typing import Iterator

import pytest

from conftest import ROOT, TINY_RUN, TrainedRun, read_jsonl, run_cli
from shard_helpers import LoopbackS3, require, serve_s3
from shard_prepare import prepare_shards
from test_resume_e2e import assert_same_run, start_and_interrupt, train_args

pytestmark = [pytest.mark.e2e, pytest.mark.skipif(sys.platform == "win32", reason="uses POSIX signals")]


@pytest.fixture
def loopback_s3(monkeypatch: pytest.MonkeyPatch) -> Iterator[LoopbackS3]:
    yield from serve_s3(monkeypatch)


@pytest.fixture(scope="module")
def demo_shards(tmp_path_factory: pytest.TempPathFactory, demo_data: Path) -> Path:
    """The session's demo dataset as a local chunk folder."""
    require("litdata")
    out = tmp_path_factory.mktemp("shards") / "demo"
    prepare_shards(demo_data, str(out), workers=1, log=None)
    return out


def val_map(run_dir: Path) -> dict[int, float]:
    return {e["step"]: e["mAP"] for e in read_jsonl(run_dir / "metrics.jsonl") if e["type"] == "val"}


def test_shards_train_as_the_folder_does(trained_run: TrainedRun, demo_shards: Path) -> None:
    """Same split, vocabulary and validation mAP (within 0.01; the same seed reads the same bytes) as
    the session's folder run of the same config."""
    args = [str(ROOT / "train_direct.py"), "--config", str(ROOT / "configs" / "demo.yaml")]
    for o in TINY_RUN + [f"data.root={demo_shards}", "output_root=runs", "experiment_name=shards"]:
        args += ["--set", o]
    proc = run_cli(args, cwd=trained_run.workdir)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    run_dir, folder_dir = trained_run.workdir / "runs" / "shards", trained_run.run_dir
    split = json.loads((run_dir / "split.json").read_text(encoding="utf-8"))
    assert split == json.loads((folder_dir / "split.json").read_text(encoding="utf-8"))
    assert (run_dir / "vocabulary.json").read_bytes() == (folder_dir / "vocabulary.json").read_bytes()
    shard_map, folder_map = val_map(run_dir), val_map(folder_dir)
    assert shard_map.keys() == folder_map.keys() and shard_map
    for step in shard_map:
        assert abs(shard_map[step] - folder_map[step]) <= 0.01, (step, shard_map[step], folder_map[step])
    report = json.loads((run_dir / "data_report.json").read_text(encoding="utf-8"))
    assert report["used"] == json.loads((folder_dir / "data_report.json").read_text(encoding="utf-8"))["used"]
    assert "shards: 600 samples" in proc.stdout + proc.stderr


def test_s3_run_killed_then_cut_off_from_storage_resumes_exactly(tmp_path: Path, demo_shards: Path, loopback_s3: LoopbackS3) -> None:
    """The uninterrupted run reads the local chunks. The same data on the loopback S3 server: a run from it is SIGKILLed
    after its step-12 checkpoint (2 workers), resumed, and cut off from storage (the server stopped) after step 24: it
    ends (exit 3) naming the URL and the endpoint, with a checkpoint; with the server back on the same address, a second
    resume finishes the run with the uninterrupted run's per-step losses and weights, bit for bit."""
    from shard_format import upload_folder
    from shard_helpers import LoopbackS3 as Server

    upload_folder(demo_shards, "s3://shards/demo")
    ref = run_cli(train_args(demo_shards, "ref"), cwd=tmp_path)
    assert ref.returncode == 0, ref.stderr[-3000:]
    url, run_dir = "s3://shards/demo", tmp_path / "runs" / "s3"
    proc = start_and_interrupt(tmp_path, train_args(url, "s3"), run_dir, after_step=12, how="kill")
    proc.communicate(timeout=60)
    assert proc.returncode == -signal.SIGKILL

    resumed = start_and_interrupt(tmp_path, train_args(url, "s3") + ["--resume", "latest"], run_dir, after_step=24, how="none")
    loopback_s3.stop()
    started = time.monotonic()
    _, err = resumed.communicate(timeout=180)
    assert resumed.returncode == 3, err[-3000:]
    assert f"error: {url}: the sharded dataset cannot be read from object storage" in err and loopback_s3.endpoint in err
    assert "Traceback" not in err.split(f"error: {url}")[-1]
    print(f"the run ended {time.monotonic() - started:.1f}s after the server stopped")
    back = Server(port=loopback_s3.port)  # moto keeps the bucket in this process: the data is back
    try:
        finished = run_cli(train_args(url, "s3") + ["--resume", "latest"], cwd=tmp_path)
    finally:
        back.stop()
    assert finished.returncode == 0, finished.stderr[-3000:]
    assert_same_run(tmp_path / "runs" / "ref", run_dir)
    config = (run_dir / "config.yaml").read_text(encoding="utf-8")
    assert url in config and "loopback-test-secret" not in config and loopback_s3.endpoint not in config
    assert "loopback-test-secret" not in (run_dir / "metrics.jsonl").read_text(encoding="utf-8")
