"""The scan index: reused while no file changed, and a changed folder scans to what a fresh scan finds."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import dataset_scan
import image_audit
from dataset_scan import scan_dataset
from scan_index import fingerprint_folder, index_file, scan_with_index
from scan_limits import ScanLimits

LIMITS = ScanLimits()


def make_folder(root: Path, n: int) -> None:
    """n images with sidecars in two sub-folders, one broken image, one orphan sidecar."""
    for i in range(n):
        folder = root / f"part{i % 2}"
        folder.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (8 + i, 8), (i * 20 % 255, 0, 0)).save(folder / f"img{i}.png")
        (folder / f"img{i}.json").write_text(json.dumps({"tags": f"tag_a tag_{i % 3}", "rating": "g"}), encoding="utf-8")
    (root / "part0" / "broken.png").write_bytes(b"not a png")
    (root / "part0" / "broken.json").write_text('{"tags": "tag_a"}', encoding="utf-8")
    (root / "part1" / "orphan.json").write_text('{"tags": "tag_a"}', encoding="utf-8")


def same_scan(a: dataset_scan.DatasetScan, b: dataset_scan.DatasetScan) -> None:
    """Equal records and equal reports (times and the index status aside)."""
    assert list(a.records) == list(b.records)
    ra, rb = a.to_report(), b.to_report()
    for report in (ra, rb):
        report.pop("scan_seconds")
        report.pop("scan_index", None)
    assert ra == rb


def run(root: Path, index: Path, **kw: object) -> dataset_scan.DatasetScan:
    return scan_with_index(root, manifest=None, verify="header", limits=LIMITS, index_dir=index, **kw)


def test_unchanged_folder_reuses_the_index_without_opening_a_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    root, index = tmp_path / "data", tmp_path / "index"
    make_folder(root, 6)
    first = run(root, index)
    assert first.index["reused"] is False and index_file(index, root, manifest=None, verify="header", limits=LIMITS).is_file()
    same_scan(first, scan_dataset(root))

    def no_reading(*args: object, **kwargs: object) -> None:
        raise AssertionError("a reused index must not scan")

    monkeypatch.setattr("scan_index.scan_source", no_reading)
    second = run(root, index)
    assert second.index["reused"] is True
    same_scan(second, first)
    assert "from the scan index" in dataset_scan.format_scan_summary(second)


@pytest.mark.parametrize("change", ["add", "delete", "rewrite_sidecar", "rewrite_image", "rename"])
def test_any_change_scans_to_what_a_fresh_scan_finds(tmp_path: Path, change: str) -> None:
    root, index = tmp_path / "data", tmp_path / "index"
    make_folder(root, 6)
    run(root, index)
    part = root / "part0"
    if change == "add":
        Image.new("RGB", (9, 9)).save(part / "new.png")
        (part / "new.json").write_text('{"tags": "tag_new"}', encoding="utf-8")
    elif change == "delete":
        (part / "img2.png").unlink()
    elif change == "rewrite_sidecar":  # same size, later mtime: the content must be read again
        text = (part / "img0.json").read_text(encoding="utf-8").replace("tag_0", "tag_9")
        (part / "img0.json").write_text(text, encoding="utf-8")
        st = os.stat(part / "img0.json")
        os.utime(part / "img0.json", ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))
    elif change == "rewrite_image":
        (part / "img4.png").write_bytes(b"truncated")
    else:
        (part / "img0.png").rename(part / "img0_renamed.png")
    updated = run(root, index)
    assert updated.index["reused"] is False and sum(updated.index["changes"].values()) >= 1
    same_scan(updated, scan_dataset(root))
    assert run(root, index).index["reused"] is True  # rewritten: the next start reuses it


def test_unchanged_images_are_not_reopened_after_a_change(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    root, index = tmp_path / "data", tmp_path / "index"
    make_folder(root, 6)
    run(root, index)
    Image.new("RGB", (9, 9)).save(root / "part1" / "new.png")
    (root / "part1" / "new.json").write_text('{"tags": "tag_new"}', encoding="utf-8")
    opened: list[str] = []
    real = image_audit.verify_image

    def counting(path: str, mode: str) -> tuple[str | None, str]:
        opened.append(os.path.basename(path))
        return real(path, mode)

    monkeypatch.setattr(image_audit, "verify_image", counting)
    updated = run(root, index)
    assert sorted(opened) == ["broken.png", "new.png"]  # the failed one is checked again: it may be fixed
    assert updated.index["images_not_reopened"] == 6


def test_rescan_flag_and_unreadable_index_scan_again(tmp_path: Path) -> None:
    root, index = tmp_path / "data", tmp_path / "index"
    make_folder(root, 4)
    run(root, index)
    assert run(root, index, rescan=True).index["reused"] is False
    path = index_file(index, root, manifest=None, verify="header", limits=LIMITS)
    path.write_bytes(b"garbage")
    lines: list[str] = []
    again = run(root, index, log=lines.append)
    assert again.index["reused"] is False and "unreadable scan index" in lines[0] and str(path) in lines[0]
    assert run(root, index).index["reused"] is True


def test_settings_get_their_own_index_file(tmp_path: Path) -> None:
    root = tmp_path / "data"
    a = index_file(tmp_path, root, manifest=None, verify="header", limits=LIMITS)
    assert a != index_file(tmp_path, root, manifest=None, verify="decode", limits=LIMITS)
    assert a != index_file(tmp_path, root, manifest=None, verify="header", limits=ScanLimits(max_tags_per_sample=10))
    assert a != index_file(tmp_path, tmp_path / "other", manifest=None, verify="header", limits=LIMITS)


def test_manifest_change_is_seen(tmp_path: Path) -> None:
    root, index = tmp_path / "data", tmp_path / "index"
    make_folder(root, 4)
    manifest = tmp_path / "m.jsonl"
    manifest.write_text(json.dumps({"file": "part0/img0.png", "tags": "x y"}) + "\n", encoding="utf-8")
    kw = dict(manifest=manifest, verify="header", limits=LIMITS, index_dir=index)
    assert len(scan_with_index(root, **kw).records) == 1
    with manifest.open("a", encoding="utf-8") as handle:
        handle.write(json.dumps({"file": "part1/img1.png", "tags": "x"}) + "\n")
    updated = scan_with_index(root, **kw)
    assert updated.index["reused"] is False and len(updated.records) == 2


def test_fingerprint_lists_images_and_sidecars_with_sizes(tmp_path: Path) -> None:
    make_folder(tmp_path, 2)
    (tmp_path / "notes.txt").write_text("ignored", encoding="utf-8")
    fp = fingerprint_folder(tmp_path)
    assert "notes.txt" not in fp.paths and "part0/img0.png" in fp.paths
    assert fp.paths == sorted(fp.paths)
    i = fp.paths.index("part0/img0.json")
    assert fp.sizes[i] == (tmp_path / "part0" / "img0.json").stat().st_size and np.all(fp.mtimes > 0)


@pytest.mark.e2e  # starts worker processes
def test_image_check_in_processes_equals_the_threaded_one(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A scan large enough for the process pool (threshold lowered here) finds exactly what the
    in-process check finds, in the same order, with the same decoder-warning counts."""
    root = tmp_path / "data"
    make_folder(root, 12)
    Image.new("RGB", (6, 6)).save(root / "part1" / "extra.jpg")
    (root / "part1" / "extra.json").write_text('{"tags": "tag_a"}', encoding="utf-8")
    threaded = scan_dataset(root)
    pools: list[int] = []

    class CountingPool(image_audit.ProcessPoolExecutor):
        def __init__(self, *args: object, **kwargs: object) -> None:
            pools.append(1)
            super().__init__(*args, **kwargs)

    monkeypatch.setattr(image_audit, "PARALLEL_VERIFY_MIN", 2)
    monkeypatch.setattr(image_audit, "usable_cpu_count", lambda: 2)
    monkeypatch.setattr(image_audit, "ProcessPoolExecutor", CountingPool)
    in_processes = scan_dataset(root)
    assert pools == [1]
    same_scan(in_processes, threaded)
    assert threaded.skipped.get("image_undecodable") == 1 and len(threaded.records) == 13


@pytest.mark.e2e  # starts a process
def test_big_scan_in_a_spawned_child_equals_the_scan_here(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A folder over the child-process threshold (lowered here) is scanned in a spawned process;
    the table and report that come back equal an in-process scan, and errors come back too."""
    import scan_index

    root, index = tmp_path / "data", tmp_path / "index"
    make_folder(root, 6)
    children: list[int] = []
    real = scan_index._scan_in_child

    def counting(job: tuple) -> dataset_scan.DatasetScan:
        children.append(1)
        return real(job)

    monkeypatch.setattr(scan_index, "CHILD_PROCESS_FILES", 1)
    monkeypatch.setattr(scan_index, "_scan_in_child", counting)
    in_child = run(root, index)
    assert children == [1]
    same_scan(in_child, scan_dataset(root))
    with pytest.raises(FileNotFoundError, match="m.jsonl"):
        scan_index._scan_in_child((str(root), str(tmp_path / "m.jsonl"), "header", LIMITS, frozenset()))
