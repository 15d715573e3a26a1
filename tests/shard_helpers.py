"""Test helpers for sharded datasets: webdataset-layout tar sets with planted bad members, the
litdata import (a failure under CI, a skip elsewhere) and a loopback S3 server (moto's real HTTP server)."""

from __future__ import annotations

import io
import json
import os
import tarfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import pytest

from broken_corpus import noise_image


def require(module: str) -> Any:
    """Import `module` (litdata, moto): missing, the test fails under CI (requirements-dev.txt installs
    it there) and is skipped elsewhere."""
    try:
        return __import__(module)
    except ImportError as exc:
        if os.environ.get("CI"):
            pytest.fail(f"{module} is not installed ({exc}); CI installs requirements-dev.txt, which includes requirements-shards.txt")
        pytest.skip(f"{module} is not installed (pip install -r requirements-shards.txt)")


def image_bytes(seed: int, fmt: str = "JPEG", size: tuple[int, int] = (40, 30)) -> bytes:
    """A small noise image, encoded."""
    buffer = io.BytesIO()
    noise_image(*size, seed=seed).save(buffer, fmt)
    return buffer.getvalue()


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    """One regular-file member."""
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


@dataclass
class TarSet:
    """A folder of tar shards and what a prepare of it must find."""

    root: Path
    good: dict[str, tuple[bytes, list[str], str]] = field(default_factory=dict)  # key -> (image bytes, tags, rating)
    bad: dict[str, set[str]] = field(default_factory=dict)  # reason -> {"shard/member", ...}


TAG_POOL = ["1girl", "solo", "long_hair", "smile", "red_eyes", "hat", "outdoors", "sky"]


def make_tar_set(base: Path, *, good: int = 12, max_sidecar_bytes: int = 4096) -> TarSet:
    """Two tar shards of `good` good samples with planted bad members, and a third shard cut short."""
    root = base / "tars"
    root.mkdir(parents=True)
    out = TarSet(root)

    def bad(reason: str, where: str) -> None:
        out.bad.setdefault(reason, set()).add(where)

    for shard in range(2):
        name = f"shard-{shard:04d}.tar"
        with tarfile.open(root / name, "w", format=tarfile.GNU_FORMAT, encoding="utf-8", errors="surrogateescape") as tar:
            for i in range(shard, good, 2):
                key = f"{1000 + i}"
                data = image_bytes(i, "PNG" if i % 3 == 0 else "JPEG")
                tags = [TAG_POOL[(i + j) % len(TAG_POOL)] for j in range(3)]
                rating = "gsqe"[i % 4]
                _add(tar, f"{key}.{'png' if i % 3 == 0 else 'jpg'}", data)
                _add(tar, f"{key}.json", json.dumps({"tag_string_general": " ".join(tags), "rating": rating}).encode())
                out.good[key] = (data, tags, rating)
            if shard == 0:
                _add(tar, "2001.jpg", image_bytes(1)[:300])  # a truncated JPEG
                _add(tar, "2001.json", b'{"tags": ["a"]}')
                bad("image_undecodable", f"{name}/2001.jpg")
                _add(tar, "2002.jpg", image_bytes(2))
                _add(tar, "2002.json", b'{"tags": ["a", ')  # broken JSON
                bad("sidecar_unreadable", f"{name}/2002.json")
                _add(tar, "2003.jpg", image_bytes(3))
                _add(tar, "2003.json", b'{"tags": ["' + b"x" * (max_sidecar_bytes + 10) + b'"]}')  # a sidecar bomb
                bad("sidecar_too_large", f"{name}/2003.json")
            else:
                _add(tar, "bad\udcff.jpg", image_bytes(4))  # a member name that is not UTF-8
                _add(tar, "bad\udcff.json", b'{"tags": ["a"]}')
                bad("name_not_utf8", f"{name}/bad\\udcff.jpg")
                bad("name_not_utf8", f"{name}/bad\\udcff.json")
                _add(tar, "2004.jpg", image_bytes(5))  # no sidecar
                bad("sidecar_missing", f"{name}/2004.jpg")
                _add(tar, "2005.json", b'{"tags": ["a"]}')  # no image
                bad("image_missing", f"{name}/2005.json")
                _add(tar, "2006.jpg", image_bytes(6))
                _add(tar, "2006.json", b'{"tags": []}')
                bad("no_tags", f"{name}/2006.json")
    # a shard that ends in the middle of a member: the members before the cut still count
    whole = io.BytesIO()
    with tarfile.open(fileobj=whole, mode="w", format=tarfile.GNU_FORMAT) as tar:
        data = image_bytes(50)
        _add(tar, "3000.jpg", data)
        _add(tar, "3000.json", b'{"tags": ["sky"], "rating": "g"}')
        _add(tar, "3001.jpg", image_bytes(51, size=(200, 200)))
    raw = whole.getvalue()
    (root / "shard-0002.tar").write_bytes(raw[: len(raw) - 20000])
    out.good["3000"] = (data, ["sky"], "g")
    bad("directory_unreadable", "shard-0002.tar")
    bad("sidecar_missing", "shard-0002.tar/3001.jpg")  # its header came before the cut, its sidecar never
    return out


def chunk_items(folder: Path | str) -> Iterator[dict[str, Any]]:
    """Every item of a litdata dataset, in order (random access by index)."""
    litdata = require("litdata")
    dataset = litdata.StreamingDataset(str(folder))
    for i in range(len(dataset)):
        yield dataset[i]


class LoopbackS3:
    """moto's S3-compatible HTTP server on 127.0.0.1 (a thread of this process) and the environment
    that points boto3 (and so litdata) at it: AWS_ENDPOINT_URL and dummy credentials."""

    def __init__(self, port: int = 0) -> None:
        """Start the server on `port` (0: a free one) with one bucket, 'shards'."""
        require("moto")
        from moto.server import ThreadedMotoServer

        self.server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
        self.server.start()
        host, self.port = self.server.get_host_and_port()
        self.endpoint = f"http://{host}:{self.port}"
        self.env = {
            "AWS_ENDPOINT_URL": self.endpoint,
            "AWS_ACCESS_KEY_ID": "loopback-test-key",
            "AWS_SECRET_ACCESS_KEY": "loopback-test-secret",
            "AWS_DEFAULT_REGION": "us-east-1",
        }

    def stop(self) -> None:
        """Stop the server (its data goes with it)."""
        self.server.stop()


def serve_s3(monkeypatch: pytest.MonkeyPatch) -> Iterator[LoopbackS3]:
    """A LoopbackS3 with its bucket, its environment set in this process (a fixture's body)."""
    s3 = LoopbackS3()
    for key, value in s3.env.items():
        monkeypatch.setenv(key, value)
    import boto3

    boto3.session.Session().client("s3").create_bucket(Bucket="shards")
    yield s3
    s3.stop()
