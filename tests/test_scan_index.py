"""The scan index: reused while no file changed, and a changed folder scans to what a fresh scan finds."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import broken_corpus as bc
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


def test_a_cold_start_walks_the_folder_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """With no index yet the scan's own listing is saved as the fingerprint (no second walk), and
    the next start finds it equal to a fresh fingerprint of the folder."""
    import scan_index

    root, index = tmp_path / "data", tmp_path / "index"
    make_folder(root, 6)

    def no_walk(*args: object, **kwargs: object) -> None:
        raise AssertionError("a cold start must not fingerprint the folder apart from its scan")

    monkeypatch.setattr(scan_index, "fingerprint_folder", no_walk)
    first = run(root, index)
    assert first.index["reused"] is False and first.index["files"] == 15 and first.listing is None
    monkeypatch.undo()
    assert run(root, index).index["reused"] is True


def test_the_skipped_samples_survive_a_reload_from_the_index(tmp_path: Path) -> None:
    """Six bad files of each kind: every one is listed once after the scan and after the reload,
    and a changed folder lists what a fresh scan lists."""
    corpus = bc.make_broken_corpus(tmp_path / "data", good=6, copies=6)
    index = tmp_path / "index"
    first = run(corpus.root, index)
    entries = list(first.skipped_entries())
    assert sorted((path, reason) for path, reason, _ in entries) == corpus.expected_entries("header")
    reused = run(corpus.root, index)
    assert reused.index["reused"] is True and list(reused.skipped_entries()) == entries
    (corpus.root / "bad" / "copy_0" / "lonely.jpg").unlink()
    updated = run(corpus.root, index)
    assert updated.index["reused"] is False
    assert list(updated.skipped_entries()) == list(scan_dataset(corpus.root).skipped_entries())
    assert ("bad/copy_0/lonely.jpg", "sidecar_missing") not in {(p, r) for p, r, _ in updated.skipped_entries()}


def test_a_damaged_list_of_skipped_samples_is_rescanned(tmp_path: Path) -> None:
    """An index whose skipped samples disagree with its counts is not trusted: scanned again."""
    root, index = tmp_path / "data", tmp_path / "index"
    make_folder(root, 4)
    run(root, index)
    path = index_file(index, root, manifest=None, verify="header", limits=LIMITS)
    with np.load(path) as f:
        arrays = {k: f[k] for k in f.files}
    arrays["skips_codes"] = arrays["skips_codes"][:1]
    arrays["skips_path_offsets"] = arrays["skips_path_offsets"][:2]
    arrays["skips_detail_offsets"] = arrays["skips_detail_offsets"][:2]
    arrays["skips_paths"] = arrays["skips_paths"][: arrays["skips_path_offsets"][-1]]
    arrays["skips_details"] = arrays["skips_details"][: arrays["skips_detail_offsets"][-1]]
    np.savez(path, **arrays)
    lines: list[str] = []
    again = run(root, index, log=lines.append)
    assert again.index["reused"] is False and "disagree" in lines[0]
    same_scan(again, scan_dataset(root))
