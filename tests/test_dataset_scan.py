"""Tests for dataset_scan: sidecar conventions and parsing, every bad-input reason, manifests, reports."""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path

import pytest
from PIL import Image

import broken_corpus as bc
from data_fixtures import broken_corpus, listing
from dataset_scan import (
    SKIP_REASONS,
    DataQualityError,
    DatasetScan,
    DatasetScanner,
    check_scan_quality,
    filter_known_tags,
    format_scan_summary,
    load_manifest,
    parse_rating,
    parse_sidecar,
    scan_dataset,
    split_tag_string,
    write_data_report,
)
from image_preprocess import PreprocessParams, load_image
from scan_limits import ScanLimits
from vocabulary import create_vocabulary_from_datasets


def _scan_one(tmp_path: Path, sidecar_name: str, data: object, image_name: str = "img.png") -> DatasetScan:
    """Scan a root holding one image and one sidecar."""
    root = tmp_path / "root"
    bc.write_image(root / image_name)
    bc.write_json(root / sidecar_name, data)
    return scan_dataset(root, num_threads=1)


# ------------------------------------------------------------------------------------------
# sidecar conventions and parsing
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("sidecar", ["img.json", "img.png.json"])
def test_sidecar_naming_conventions(tmp_path: Path, sidecar: str) -> None:
    """X.json and X.ext.json both pair with X.ext; tags normalised, rating decoded."""
    scan = _scan_one(tmp_path, sidecar, {"tags": ["Blue Sky", "cloud"], "rating": "q"})
    assert scan.skipped == {}
    (rec,) = scan.records
    assert rec.sample_id == "img.png"
    assert rec.image_path == str((tmp_path / "root" / "img.png").resolve())
    assert rec.tags == ("blue_sky", "cloud") and rec.categories == ("", "")
    assert rec.rating == 2


def test_filename_field_relative_to_json_folder(tmp_path: Path) -> None:
    """filename/file resolve from the JSON's folder; gallery-dl stem+extension works."""
    root = tmp_path / "root"
    bc.write_image(root / "images" / "p1.jpg")
    bc.write_image(root / "images" / "p2.webp")
    bc.write_image(root / "images" / "p3.jpg")
    bc.write_json(root / "meta" / "one.json", {"filename": "../images/p1.jpg", "tags": "a"})
    bc.write_json(root / "meta" / "two.json", {"file": "..\\images\\p2.webp", "tags": "b"})
    # gallery-dl: stem in "filename", suffix in "extension", sidecar named p3.jpg.json
    bc.write_json(root / "images" / "p3.jpg.json", {"filename": "p3", "extension": "jpg", "tags": "c"})
    scan = scan_dataset(root, num_threads=2)
    assert scan.skipped == {}
    assert {r.sample_id: r.tags for r in scan.records} == {"images/p1.jpg": ("a",), "images/p2.webp": ("b",), "images/p3.jpg": ("c",)}


def test_tag_string_fields_keep_categories(tmp_path: Path) -> None:
    """Per-category tag_string fields give each tag its category, no duplicates."""
    data = {
        "tag_string": "1girl hatsune_miku vocaloid solo",
        "tag_string_general": "1girl solo",
        "tag_string_character": "hatsune_miku",
        "tag_string_copyright": "vocaloid",
        "tag_string_artist": "someone",
        "tag_string_meta": "highres",
        "rating": "s",
    }
    scan = _scan_one(tmp_path, "img.png.json", data)
    (rec,) = scan.records
    cats = dict(zip(rec.tags, rec.categories))
    assert cats == {
        "1girl": "general",
        "solo": "general",
        "hatsune_miku": "character",
        "vocaloid": "copyright",
        "someone": "artist",
        "highres": "meta",
    }
    assert len(rec.tags) == len(set(rec.tags))


def test_e621_style_tag_dict() -> None:
    """A {category: [tags]} dict maps known categories and leaves others empty."""
    tags, cats, rating = parse_sidecar({"tags": {"general": ["Fur"], "species": ["fox"], "artist": ["x"], "weird": ["y"]}, "rating": "e"})
    assert dict(zip(tags, cats)) == {"fur": "general", "fox": "general", "x": "artist", "y": ""}
    assert rating == 3


@pytest.mark.parametrize(
    "text, expected",
    [
        ("long hair, blue eyes ,smile", ["long_hair", "blue_eyes", "smile"]),
        ("long_hair blue_eyes  smile", ["long_hair", "blue_eyes", "smile"]),
        ("  Single Tag ", ["single", "tag"]),
        ("a,,b, ", ["a", "b"]),
        ("", []),
    ],
)
def test_tag_string_splitting(text: str, expected: list[str]) -> None:
    """Commas win over whitespace; tags are normalised and empties dropped."""
    assert split_tag_string(text) == expected


def test_tags_deduplicated_order_kept() -> None:
    """First appearance keeps its place; a later category fills an empty one."""
    tags, cats, _ = parse_sidecar({"tags": ["b", "A", "b", " a "], "tag_string_general": "a c"})
    assert tags == ("b", "a", "c")
    assert cats == ("", "general", "general")  # "a" gets the category given later


@pytest.mark.parametrize(
    "value, expected",
    [
        ("g", 0),
        ("general", 0),
        ("safe", 0),
        ("S", 1),
        ("sensitive", 1),
        ("q", 2),
        ("questionable", 2),
        ("e", 3),
        ("Explicit", 3),
        (0, 0),
        (3, 3),
        ("2", 2),
        (" 1 ", 1),
        (4, -1),
        (-1, -1),
        ("x", -1),
        (None, -1),
        (True, -1),
        (1.0, -1),
        ([], -1),
    ],
)
def test_rating_codes(value: object, expected: int) -> None:
    """Every documented rating spelling maps to 0-3; anything else to -1."""
    assert parse_rating(value) == expected


@pytest.mark.parametrize("data", [{"tags": [1, 2]}, {"tags": 5}, {"tag_string": ["a"]}, {"tag_string_general": 3}, ["a"], "tags"])
def test_wrong_field_types_raise(data: object) -> None:
    """Wrong field types are errors (they become sidecar_unreadable in a scan)."""
    with pytest.raises(ValueError):
        parse_sidecar(data)


# ------------------------------------------------------------------------------------------
# bad input
# ------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> bc.BrokenCorpus:
    """47 good + 12 broken + 1 unknown-rating sample: exactly 20% of 60 samples are bad."""
    return broken_corpus(tmp_path_factory.mktemp("corpus"))


@pytest.mark.parametrize("verify", ["none", "header", "decode"])
def test_every_skip_reason_counted(corpus: bc.BrokenCorpus, verify: str) -> None:
    """Each broken file is counted under its reason for every verify mode; the folder is untouched."""
    before = listing(corpus.root)
    scan = scan_dataset(corpus.root, verify=verify, num_threads=4)
    assert listing(corpus.root) == before  # nothing written into the user's folder
    assert scan.skipped == corpus.expected_skips(verify)
    assert len(scan.records) == corpus.expected_records(verify)
    assert scan.unknown_rating == len(corpus.unknown_rating_ids)
    ids = {r.sample_id for r in scan.records}
    assert set(corpus.good_ids) <= ids
    assert set(corpus.unknown_rating_ids) <= ids
    assert (set(corpus.decode_only_ids) <= ids) == (verify != "decode")
    for reason, count in scan.skipped.items():
        assert 1 <= len(scan.examples[reason]) <= count


def test_twenty_percent_broken_report(corpus: bc.BrokenCorpus, tmp_path: Path) -> None:
    """A 20%-broken corpus: report, summary line and quality check agree with what was written."""
    scan = scan_dataset(corpus.root, verify="decode")
    expected = corpus.expected_skips("decode")
    total = len(scan.records) + scan.num_skipped
    assert scan.num_skipped / total == pytest.approx(0.2)
    report = scan.to_report()
    out = tmp_path / "run" / "data_report.json"
    write_data_report(out, report)
    loaded = json.loads(out.read_text(encoding="utf-8"))
    assert loaded["skipped"] == expected
    assert loaded["num_samples"] == len(scan.records)
    assert loaded["unknown_rating"] == 1
    assert not list(out.parent.glob("*.tmp*"))
    line = format_scan_summary(scan)
    assert line.startswith(f"data: {len(scan.records)} samples used, {sum(expected.values())} skipped (")
    for reason, count in expected.items():
        assert f"{reason}: {count}" in line
    assert check_scan_quality(scan, 0.25) == pytest.approx(0.2)
    with pytest.raises(DataQualityError, match="20.0%"):
        check_scan_quality(scan, 0.1)


def test_missing_root_raises(tmp_path: Path) -> None:
    """A missing root or bad verify mode raises a specific error naming it."""
    with pytest.raises(FileNotFoundError, match="nope"):
        scan_dataset(tmp_path / "nope")
    (tmp_path / "file.txt").write_text("x", encoding="utf-8")
    with pytest.raises(FileNotFoundError):
        scan_dataset(tmp_path / "file.txt")
    with pytest.raises(ValueError, match="verify"):
        scan_dataset(tmp_path, verify="full")


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")
def test_warning_band_is_a_bomb(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # 40x30 = 1200 pixels: above a 1000 limit but below 2x, where Pillow only warns
    """Images between 1x and 2x Pillow's limit (warning only) count as bombs too."""
    root = tmp_path / "root"
    bc.write_image(root / "big.png", 40, 30)
    bc.write_json(root / "big.png.json", {"tags": "a"})
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    scan = scan_dataset(root)
    assert scan.skipped == {"decompression_bomb": 1}
    with pytest.raises(Image.DecompressionBombError):
        load_image(root / "big.png", PreprocessParams(16))


def test_duplicate_claims_counted(tmp_path: Path) -> None:
    """Two sidecars claiming one image keep the first and count the second."""
    root = tmp_path / "root"
    bc.write_image(root / "x.jpg")
    bc.write_json(root / "x.jpg.json", {"tags": "a"})
    bc.write_json(root / "other.json", {"filename": "x.jpg", "tags": "b"})
    scan = scan_dataset(root)
    assert len(scan.records) == 1 and scan.skipped == {"duplicate_image": 1}


def test_filter_known_tags(corpus: bc.BrokenCorpus) -> None:
    """Records with no vocabulary tag are dropped and counted."""
    scan = scan_dataset(corpus.root, verify="none")
    vocab = create_vocabulary_from_datasets(scan.records, min_frequency=3)
    kept, dropped = filter_known_tags(scan.records, vocab)
    known = vocab.tag_to_index
    reference = [
        (r.sample_id, r.image_path, tuple(t for t in r.tags if t in known), tuple(c for t, c in zip(r.tags, r.categories) if t in known), r.rating)
        for r in scan.records
        if any(t in known for t in r.tags)
    ]
    as_tuples = [(r.sample_id, r.image_path, r.tags, r.categories, r.rating) for r in kept]
    assert as_tuples == reference and dropped == len(scan.records) - len(reference)
    listed, listed_dropped = filter_known_tags(list(scan.records), vocab)  # a plain list: the same rows
    assert [(r.sample_id, r.image_path, r.tags, r.categories, r.rating) for r in listed] == reference and listed_dropped == dropped
    kept2, dropped2 = filter_known_tags(scan.records, {"tag_0": 0})
    assert {r.sample_id for r in kept2} == {r.sample_id for r in scan.records if "tag_0" in r.tags}
    assert dropped2 == len(scan.records) - len(kept2) > 0
    scan.add_skipped("no_known_tags", dropped2, ["x"])
    assert scan.to_report()["skipped"]["no_known_tags"] == dropped2


# ------------------------------------------------------------------------------------------
# manifest
# ------------------------------------------------------------------------------------------


def test_manifest_records_and_reasons(tmp_path: Path) -> None:
    """A JSON Lines manifest gives the same records and reasons, with line numbers."""
    root = tmp_path / "data"
    bc.write_image(root / "a.jpg")
    bc.write_image(root / "sub" / "b.png")
    bc.write_zero_byte(root / "z.png")
    bc.write_image(tmp_path / "outside.jpg")
    lines = [
        json.dumps({"file": "a.jpg", "tags": ["x", "y"], "rating": "g"}),
        "",
        json.dumps({"file": "sub/b.png", "tags": "p, q", "rating": 3}),
        "{not json",
        json.dumps(["a.jpg"]),
        json.dumps({"file": "a.jpg", "tags": [1]}),
        json.dumps({"file": "../outside.jpg", "tags": "x"}),
        json.dumps({"file": "missing.jpg", "tags": "x"}),
        json.dumps({"file": "z.png", "tags": "x"}),
        json.dumps({"file": "a.jpg", "tags": "x"}),
        json.dumps({"tags": "x"}),
    ]
    manifest = root / "manifest.jsonl"
    manifest.write_text("\n".join(lines) + "\n", encoding="utf-8")
    scan = load_manifest(manifest)
    assert [(r.sample_id, r.tags, r.rating) for r in scan.records] == [("a.jpg", ("x", "y"), 0), ("sub/b.png", ("p", "q"), 3)]
    assert scan.skipped == {"manifest_line_invalid": 4, "path_outside_root": 1, "image_missing": 1, "image_undecodable": 1, "duplicate_image": 1}
    assert [e.split(":")[0] for e in scan.examples["manifest_line_invalid"]] == ["line 4", "line 5", "line 6", "line 11"]
    # same result through DatasetScanner, and with an explicit root from elsewhere
    other = tmp_path / "elsewhere.jsonl"
    other.write_text(lines[0] + "\n", encoding="utf-8")
    via_loader = DatasetScanner(other, root=root).scan()
    assert [r.sample_id for r in via_loader.records] == ["a.jpg"]
    assert DatasetScanner(root).scan().source == "folder"
    with pytest.raises(FileNotFoundError):
        load_manifest(tmp_path / "none.jsonl")


# --------------------------------------------------------------------------------------------
# Hostile input (issue 12)
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def hostile(tmp_path_factory: pytest.TempPathFactory) -> bc.HostileCorpus:
    """One of each hostile case next to 40 good samples, built once for this module."""
    return bc.make_hostile_corpus(tmp_path_factory.mktemp("hostile"))


@pytest.mark.parametrize("verify", ["header", "decode"])
def test_hostile_corpus_counted_once_per_sample_by_reason(hostile: bc.HostileCorpus, verify: str) -> None:
    """Each hostile sample is skipped once under its own reason; tags that cannot be kept are
    dropped and counted; the report is valid JSON; the decoder warnings went into it, not stderr."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a warning escaping the scan would fail here
        scan = scan_dataset(hostile.root, verify=verify, num_threads=2)
    decoded = verify == "decode"
    assert scan.skipped == hostile.expected_skips(decoded)
    assert {r.sample_id for r in scan.records} == hostile.expected_ids(decoded)
    assert scan.dropped_tags == hostile.dropped_tags
    assert sorted(scan.dropped_tag_examples) == ["tags/surrogate.png.json: 1 tag_not_utf8", "tags/surrogate.png.json: 1 tag_too_long"]
    kept = {r.sample_id: r for r in scan.records}["tags/surrogate.png"]
    assert kept.tags == ("common", "shared")
    assert any("Corrupt EXIF" in k for k in scan.decoder_warnings)
    text = json.dumps(scan.to_report(), ensure_ascii=False)
    text.encode("utf-8")  # no unencodable character reached the report
    assert scan.examples["name_not_utf8"][0].startswith("names/caf\\udce9.png")  # shown, escaped
    assert set(scan.skipped) <= set(SKIP_REASONS)


def test_symlinks_follow_policy_uses_outside_targets(hostile: bc.HostileCorpus) -> None:
    """data.symlinks=follow follows the links out of the root (broken links stay skipped)."""
    scan = scan_dataset(hostile.root, verify="header", limits=ScanLimits(symlinks="follow"))
    ids = {r.sample_id for r in scan.records}
    assert {"links/out.png", "links/local.png", "links/outdir/o.png"} <= ids
    assert "symlink_outside_root" not in scan.skipped
    assert scan.skipped["symlink_broken"] == 2
    # /etc/passwd is now followed as an image and fails the header check as a text file
    assert "links/passwd.jpg" not in ids


def test_limits_are_configurable(tmp_path: Path) -> None:
    """max_tags_per_sample, max_tag_chars and max_sidecar_bytes act at their configured values."""
    bc.write_image(tmp_path / "a.png", 8, 8)
    bc.write_json(tmp_path / "a.png.json", {"tags": ["abcdef", "ab", "c", "d"]})
    bc.write_image(tmp_path / "b.png", 8, 8)
    bc.write_json(tmp_path / "b.png.json", {"tags": ["ab"], "padding": "z" * 3000})
    scan = scan_dataset(tmp_path, limits=ScanLimits(max_tags_per_sample=3, max_tag_chars=4, max_sidecar_bytes=2048))
    assert scan.skipped == {"too_many_tags": 1, "sidecar_too_large": 1}
    scan = scan_dataset(tmp_path, limits=ScanLimits(max_tags_per_sample=4, max_tag_chars=4))
    assert [r.tags for r in scan.records] == [("ab", "c", "d"), ("ab",)]
    assert scan.dropped_tags == {"tag_too_long": 1}


def test_manifest_with_hostile_entries(tmp_path: Path) -> None:
    """A manifest line naming a non-UTF-8 file, a link out of the root, too many tags, or a
    surrogate tag is handled like the same sidecar."""
    root = tmp_path / "root"
    bc.write_image(root / "a.png", 8, 8)
    bc.write_image(tmp_path / "out.png", 8, 8)
    os.symlink(tmp_path / "out.png", root / "link.png")
    lines = [
        '{"file": "a.png", "tags": ["x", "\\ud800"]}',
        '{"file": "caf\\udce9.png", "tags": ["x"]}',
        '{"file": "link.png", "tags": ["x"]}',
        json.dumps({"file": "a.png", "tags": ["t"] * 3000}),
    ]
    manifest = tmp_path / "m.jsonl"
    manifest.write_text("\n".join(lines) + "\n", encoding="utf-8")
    scan = load_manifest(manifest, root)
    assert scan.skipped == {"name_not_utf8": 1, "symlink_outside_root": 1, "too_many_tags": 1}
    assert [r.tags for r in scan.records] == [("x",)] and scan.dropped_tags == {"tag_not_utf8": 1}


def test_bad_fraction_error_names_the_key(corpus: bc.BrokenCorpus) -> None:
    """The refusal names data.max_bad_fraction, so the user knows what to change."""
    scan = scan_dataset(corpus.root, verify="header")
    with pytest.raises(DataQualityError, match=r"data\.max_bad_fraction=0\.01"):
        check_scan_quality(scan, 0.01)


# --------------------------------------------------------------------------------------------
# Every skipped sample by path; chunks and the process pool (issue 24)
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("verify", ["header", "decode"])
def test_every_skipped_sample_is_listed_once_by_path(tmp_path: Path, verify: str) -> None:
    """Six bad files of each kind: the summary keeps five examples a reason, the complete list
    names every bad file exactly once, under its reason, with a detail."""
    corpus = bc.make_broken_corpus(tmp_path / "root", good=6, copies=6)
    scan = scan_dataset(corpus.root, verify=verify)
    entries = list(scan.skipped_entries())
    assert sorted((path, reason) for path, reason, _ in entries) == corpus.expected_entries(verify)
    assert len({path for path, _, _ in entries}) == len(entries) and all(detail for _, _, detail in entries)
    assert scan.skipped == corpus.expected_skips(verify)
    for reason, count in scan.skipped.items():
        assert count >= 6 and len(scan.examples[reason]) == 5
        assert scan.examples[reason] == [f"{p}: {d}" for p, r, d in entries if r == reason][:5]


def test_claims_across_folders_and_chunks(tmp_path: Path) -> None:
    """Sidecars naming images in another folder pair as one whole-folder pass would pair them, also
    when every file is a chunk of its own (the claims across chunks are settled at the end)."""
    corpus = bc.make_claims_corpus(tmp_path / "root")
    for chunk_files in (1, 3, 2000):
        scan = scan_dataset(corpus.root, processes=1, chunk_files=chunk_files)
        assert [r.sample_id for r in scan.records] == corpus.kept
        entries = {path: (reason, detail) for path, reason, detail in scan.skipped_entries()}
        assert sorted((path, reason) for path, (reason, _) in entries.items()) == corpus.skipped
        assert entries["json/a2.json"][1] == "'images/a.png' already claimed by json/a.json"
        assert entries["images/x.json"][1] == "'images/x.png' already claimed by json/x_ref.json"
        assert entries["json/m.png.json"][1] == "no image 'json/m.png' nor '../images/zz.png'"


def _same_scan(a: DatasetScan, b: DatasetScan) -> None:
    """Equal records in the same order, equal reports (time aside) and equal complete lists."""
    assert [(r.sample_id, r.image_path, r.tags, r.categories, r.rating) for r in a.records] == [
        (r.sample_id, r.image_path, r.tags, r.categories, r.rating) for r in b.records
    ]
    ra, rb = a.to_report(), b.to_report()
    ra.pop("scan_seconds")
    rb.pop("scan_seconds")
    assert ra == rb
    assert list(a.skipped_entries()) == list(b.skipped_entries())


@pytest.mark.parametrize("chunk_files", [1, 3, 7])
def test_chunk_size_does_not_change_the_scan(hostile: bc.HostileCorpus, tmp_path: Path, chunk_files: int) -> None:
    """Hostile names and links, broken files and claims across folders: cut into chunks of any
    size, the scan equals the scan of the folder as one chunk (records, order, report, list)."""
    broken = bc.make_broken_corpus(tmp_path / "broken", good=8, copies=2)
    claims = bc.make_claims_corpus(tmp_path / "claims")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a decoder warning escaping the scan would fail here
        for root in (hostile.root, broken.root, claims.root):
            _same_scan(scan_dataset(root, processes=1, chunk_files=chunk_files), scan_dataset(root, processes=1, chunk_files=100_000))


@pytest.mark.e2e  # starts worker processes
def test_scan_on_a_process_pool_equals_the_scan_here(hostile: bc.HostileCorpus, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Over the pool threshold (lowered here) the chunks run on spawned processes: the scan equals
    the one run here, chunk for chunk, on hostile, broken and cross-folder corpora."""
    import image_audit

    pools: list[int] = []

    class CountingPool(image_audit.ProcessPoolExecutor):
        def __init__(self, *args: object, **kwargs: object) -> None:
            pools.append(1)
            super().__init__(*args, **kwargs)

    monkeypatch.setattr(image_audit, "ProcessPoolExecutor", CountingPool)
    broken = bc.make_broken_corpus(tmp_path / "broken", good=8, copies=2)
    claims = bc.make_claims_corpus(tmp_path / "claims")
    for root in (hostile.root, broken.root, claims.root):
        here = scan_dataset(root, processes=2, chunk_files=3)  # under the threshold: no pool
        pooled = scan_dataset(root, processes=2, parallel_min=0, chunk_files=3)
        _same_scan(pooled, here)
    assert pools == [1, 1, 1]
    manifest = tmp_path / "m.jsonl"
    manifest.write_text("".join(json.dumps({"file": r.sample_id, "tags": list(r.tags)}) + "\n" for r in here.records), encoding="utf-8")
    _same_scan(load_manifest(manifest, claims.root, processes=2, parallel_min=0, chunk_files=1), load_manifest(manifest, claims.root))
    assert pools == [1, 1, 1, 1]
