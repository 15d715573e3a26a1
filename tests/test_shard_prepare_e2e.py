"""`python dataset_loader.py prepare --format litdata`, end to end: to a folder and to a loopback S3 server."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterator

import pytest

from conftest import ROOT, run_cli
from shard_format import PREPARE_REPORT_FILE, load_tag_index
from shard_helpers import LoopbackS3, make_tar_set, require, serve_s3

pytestmark = pytest.mark.e2e


@pytest.fixture
def loopback_s3(monkeypatch: pytest.MonkeyPatch) -> Iterator[LoopbackS3]:
    yield from serve_s3(monkeypatch)


def test_cli_prepares_tar_shards_to_a_folder(tmp_path: Path) -> None:
    require("litdata")
    tars = make_tar_set(tmp_path, good=8, max_sidecar_bytes=4096)
    out = tmp_path / "out"
    args = [str(ROOT / "dataset_loader.py"), "prepare", "--data", str(tars.root), "--format", "litdata", "--out", str(out)]
    proc = run_cli(args + ["--verify", "decode", "--max-sidecar-bytes", "4096", "--workers", "2"], cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    report = json.loads((out / PREPARE_REPORT_FILE).read_text(encoding="utf-8"))
    assert report["skipped"] == {reason: len(where) for reason, where in tars.bad.items()}
    assert report["num_samples"] == len(tars.good) and "shards:" in proc.stderr
    # without --format litdata, prepare is still the prepared cache's command
    folder = tmp_path / "folder"
    folder.mkdir()
    (folder / "a.jpg").write_bytes(tars.good["1001"][0])
    (folder / "a.json").write_text('{"tags": ["sky"]}', encoding="utf-8")
    proc = run_cli(
        [str(ROOT / "dataset_loader.py"), "prepare", "--data", str(folder), "--image-size", "32", "--out", str(tmp_path / "c")], cwd=tmp_path
    )
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "c" / "entries.npy").is_file() and not (tmp_path / "c" / PREPARE_REPORT_FILE).exists()


def test_cli_prepares_to_loopback_s3(tmp_path: Path, loopback_s3: LoopbackS3) -> None:
    require("litdata")
    tars = make_tar_set(tmp_path, good=8)
    args = [str(ROOT / "dataset_loader.py"), "prepare", "--data", str(tars.root), "--format", "litdata", "--out", "s3://shards/set1"]
    proc = run_cli(args + ["--workers", "1"], cwd=tmp_path, env=loopback_s3.env)
    assert proc.returncode == 0, proc.stderr
    scan, extra = load_tag_index("s3://shards/set1")
    assert sorted(scan.records.sample_ids()) == sorted(tars.good) and extra["chunks"] >= 1
    assert "loopback-test-secret" not in proc.stderr + proc.stdout
