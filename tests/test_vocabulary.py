"""Tests for vocabulary.py: normalisation, building, save/load (incl. legacy files), encode/decode, CLI."""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

import tag_text
import vocabulary
from demo_dataset import describe_sample, generate_demo_dataset
from vocabulary import DEFAULT_IGNORE_PATH, TagVocabulary, build_vocabulary, create_vocabulary_from_datasets, load_ignore_list, normalize_tag


@dataclass(frozen=True)
class FakeRecord:
    """Stands in for dataset_scan.SampleRecord: only .tags and .categories are used."""

    tags: tuple[str, ...]
    categories: tuple[str, ...] = ()


def _reference_counts(samples: list[list[str]]) -> Counter[str]:
    """Per-sample (deduplicated) tag counts computed directly."""
    counts: Counter[str] = Counter()
    for tags in samples:
        counts.update({normalize_tag(t) for t in tags if normalize_tag(t)})
    return counts


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("  Long Hair ", "long_hair"),
        ("BLUE\teyes", "blue_eyes"),
        ("a   b\n c", "a_b_c"),
        ("already_normal", "already_normal"),
        ("", ""),
        ("Ünïcode Tag", "ünïcode_tag"),
    ],
)
def test_normalize_tag(raw: str, expected: str) -> None:
    assert normalize_tag(raw) == expected


def test_build_orders_by_frequency_then_name_and_counts_once_per_sample() -> None:
    samples = [["b", "a", "a", "c"], ["a", "B ", "d"], ["c", "a"], ["e"]]
    vocab = create_vocabulary_from_datasets(samples)
    reference = _reference_counts(samples)
    expected_order = sorted(reference, key=lambda t: (-reference[t], t))
    assert vocab.index_to_tag == expected_order
    assert vocab.tag_frequencies == dict(reference)
    assert vocab.tag_to_index == {t: i for i, t in enumerate(expected_order)}
    assert vocab.frequencies_array() == [reference[t] for t in expected_order]
    assert len(vocab) == len(reference)


def test_min_frequency_top_k_and_ignore_with_report() -> None:
    samples = [["x", "y", "tagme", "z"], ["x", "y", "Tagme"], ["x", "w"], ["x", "y", "rare"]]
    vocab, report = build_vocabulary(samples, min_frequency=2, top_k=1, ignore_tags=["TagMe"])
    counts = _reference_counts(samples)
    assert vocab.index_to_tag == ["x"]
    assert report.dropped_ignored == ["tagme"]
    assert sorted(report.dropped_min_frequency) == sorted(t for t, c in counts.items() if c < 2 and t != "tagme")
    assert report.dropped_top_k == ["y"]
    assert report.total_occurrences == sum(counts.values())
    assert report.kept_occurrences == counts["x"]
    assert report.coverage == pytest.approx(counts["x"] / sum(counts.values()))
    assert report.to_dict()["kept"] == 1
    # Without the cap, y (3) and tagme-free min-frequency survivors remain, in frequency order.
    uncapped = create_vocabulary_from_datasets(samples, min_frequency=2, ignore_tags=["tagme"])
    assert uncapped.index_to_tag == ["x", "y"]


def test_invalid_build_parameters() -> None:
    with pytest.raises(ValueError, match="min_frequency"):
        create_vocabulary_from_datasets([["a"]], min_frequency=0)
    with pytest.raises(ValueError, match="top_k"):
        create_vocabulary_from_datasets([["a"]], top_k=-1)
    with pytest.raises(ValueError, match="string"):
        create_vocabulary_from_datasets(["not a list of tags"])


def test_categories_from_records_majority_vote() -> None:
    records = [
        FakeRecord(("text", "red"), ("meta", "general")),
        FakeRecord(("text", "hero"), ("general", "character")),
        FakeRecord(("text",), ("meta",)),
        FakeRecord(("blue",), ("",)),
    ]
    vocab = create_vocabulary_from_datasets(records)
    assert vocab.tag_categories == {"text": "meta", "red": "general", "hero": "character", "blue": ""}
    assert vocab.categories_array() == [vocab.tag_categories[t] for t in vocab.index_to_tag]


def test_encode_decode() -> None:
    vocab = TagVocabulary(["cat", "dog", "bird"], {"cat": 3, "dog": 2, "bird": 1})
    encoded = vocab.encode(["bird", "unknown", "cat"])
    assert encoded.dtype == torch.long
    assert encoded.tolist() == [2, 0]
    assert vocab.encode_list(["dog", "nope"]) == [1]
    assert vocab.encode([]).tolist() == []
    assert vocab.decode(encoded) == ["bird", "cat"]
    assert vocab.decode([1]) == ["dog"]
    row = vocab.encode_multi_hot(["dog", "bird", "zzz"])
    assert row.tolist() == [0.0, 1.0, 1.0]
    with pytest.raises(ValueError, match="out of range"):
        vocab.decode([3])
    with pytest.raises(ValueError, match="out of range"):
        vocab.decode([-1])


def test_duplicate_tags_rejected_in_constructor() -> None:
    with pytest.raises(ValueError, match="duplicate tag 'a'"):
        TagVocabulary(["a", "b", "a"])


def test_save_load_round_trip_and_format(tmp_path: Path) -> None:
    samples = [FakeRecord(("ｔａｇ_ünï", "b"), ("general", "meta")), FakeRecord(("b",), ("meta",))]
    vocab = create_vocabulary_from_datasets(samples)
    path = vocab.save(tmp_path / "sub" / "vocabulary.json")
    raw = json.loads(path.read_text(encoding="utf-8"))
    assert set(raw) == {"format_version", "tag_to_index", "index_to_tag", "tag_frequencies", "tag_categories"}
    assert raw["index_to_tag"] == vocab.index_to_tag
    loaded = TagVocabulary.load(path)
    assert loaded == vocab
    assert loaded.fingerprint() == vocab.fingerprint()
    # No temp files left behind by the atomic write.
    assert [p.name for p in path.parent.iterdir()] == ["vocabulary.json"]


def test_fingerprint_depends_on_order_only() -> None:
    a = TagVocabulary(["x", "y"], {"x": 5, "y": 1})
    b = TagVocabulary(["x", "y"], {"x": 1, "y": 9})
    c = TagVocabulary(["y", "x"])
    assert a.fingerprint() == b.fingerprint()
    assert a.fingerprint() != c.fingerprint()
    assert len(a.fingerprint()) == 64


def test_load_legacy_oppaioracle_file(tmp_path: Path) -> None:
    legacy = {
        "tag_to_index": {"<PAD>": 0, "<UNK>": 1, "1girl": 2, "solo": 3, "long_hair": 4},
        "index_to_tag": {"0": "<PAD>", "1": "<UNK>", "2": "1girl", "3": "solo", "4": "long_hair"},
        "tag_frequencies": {"<PAD>": 0, "<UNK>": 0, "1girl": 900, "solo": 700, "long_hair": 500},
    }
    path = tmp_path / "vocabulary.json"
    path.write_text(json.dumps(legacy), encoding="utf-8")
    vocab = TagVocabulary.load(path)
    assert vocab.index_to_tag == ["1girl", "solo", "long_hair"]
    assert vocab.tag_to_index == {"1girl": 0, "solo": 1, "long_hair": 2}
    assert vocab.frequencies_array() == [900, 700, 500]
    assert vocab.tag_categories == {"1girl": "", "solo": "", "long_hair": ""}
    assert "<PAD>" not in vocab and "<UNK>" not in vocab


def test_load_legacy_tag_to_index_only(tmp_path: Path) -> None:
    path = tmp_path / "v.json"
    path.write_text(json.dumps({"tag_to_index": {"b": 3, "<UNK>": 1, "a": 2, "<PAD>": 0}}), encoding="utf-8")
    assert TagVocabulary.load(path).index_to_tag == ["a", "b"]


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("{not json", "not valid JSON"),
        ("[1, 2]", "JSON object"),
        (json.dumps({"index_to_tag": ["a", "b", "a"]}), "duplicate tag 'a'"),
        (json.dumps({"index_to_tag": ["a", "b"], "tag_to_index": {"a": 0, "b": 5}}), "index mismatch"),
        (json.dumps({"index_to_tag": ["a", "b"], "tag_to_index": {"a": 0}}), "1 entries"),
        (json.dumps({"index_to_tag": {"0": "a", "2": "b"}}), "not contiguous"),
        (json.dumps({"index_to_tag": {"x": "a"}}), "not an integer"),
        (json.dumps({"index_to_tag": ["a", 3]}), "not a non-empty string"),
        (json.dumps({"tag_to_index": {"a": 0, "b": 0}}), "share index 0"),
        (json.dumps({"format_version": 99, "index_to_tag": ["a"]}), "format_version"),
        (json.dumps({"index_to_tag": ["a"], "tag_frequencies": {"a": "many"}}), "tag_frequencies"),
        (json.dumps({"something": 1}), "neither"),
    ],
)
def test_malformed_files_raise_value_error_naming_file(tmp_path: Path, content: str, message: str) -> None:
    path = tmp_path / "bad_vocab.json"
    path.write_text(content, encoding="utf-8")
    with pytest.raises(ValueError, match=message) as info:
        TagVocabulary.load(path)
    assert "bad_vocab.json" in str(info.value)


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="nope.json"):
        TagVocabulary.load(tmp_path / "nope.json")


def test_ignore_list_file_and_default(tmp_path: Path) -> None:
    path = tmp_path / "ignore.txt"
    path.write_text("# header\nTagMe\n\nbad id  # trailing comment\n  highres\n", encoding="utf-8")
    assert load_ignore_list(path) == frozenset({"tagme", "bad_id", "highres"})
    default = load_ignore_list()
    assert DEFAULT_IGNORE_PATH.is_file()
    for meta in ("commentary", "translated", "bad_id", "bad_pixiv_id", "tagme", "highres", "absurdres", "commentary_request"):
        assert meta in default
    # Visible-content tags must survive: the demo's `text` tag drives the flip veto.
    assert "text" not in default
    with pytest.raises(FileNotFoundError, match="missing.txt"):
        load_ignore_list(tmp_path / "missing.txt")


def test_normalize_tag_is_tag_texts() -> None:
    """vocabulary.normalize_tag stays importable and is the one rule, owned by tag_text."""
    assert normalize_tag is tag_text.normalize_tag


def test_cli_build_on_demo_dataset(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    data = generate_demo_dataset(tmp_path / "demo", num_images=60, seed=3, image_size=32)
    out = tmp_path / "vocab.json"
    code = vocabulary.main(["build", "--data", str(data), "--min-frequency", "2", "--out", str(out)])
    assert code == 0
    vocab = TagVocabulary.load(out)
    reference = Counter(tag for i in range(60) for tag in describe_sample(i, 3, 32).tags)
    expected = sorted((t for t, c in reference.items() if c >= 2), key=lambda t: (-reference[t], t))
    assert vocab.index_to_tag == expected
    assert vocab.tag_frequencies == {t: reference[t] for t in expected}
    printed = capsys.readouterr().out
    assert "kept:" in printed and "covered" in printed and "top tags" in printed


def test_cli_reports_missing_data_folder(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "vocab.json"
    code = vocabulary.main(["build", "--data", str(tmp_path / "no_such_dir"), "--out", str(out)])
    assert code == 2
    assert "no_such_dir" in capsys.readouterr().err
    assert not out.exists()


def test_build_drops_tags_that_cannot_be_saved(tmp_path) -> None:
    """A lone surrogate (valid JSON) never reaches vocabulary.json: dropped and counted."""
    vocab, report = build_vocabulary([["a", "\ud800"], ["a", "b"]])
    assert vocab.index_to_tag == ["a", "b"] and report.dropped_not_utf8 == 1
    vocab.save(tmp_path / "v.json")
    assert TagVocabulary.load(tmp_path / "v.json") == vocab
