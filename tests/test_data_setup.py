"""Tests for data_setup: the run-level wiring gives what the owning modules give when called by hand,
writes the run folder's data files, and a resumed run reuses them."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from Configuration_System import load_config
from data_setup import ensure_dataset, flip_audit, prepare_data, prepare_eval_data, preprocess_from_config
from dataset_scan import filter_known_tags, scan_dataset
from dataset_split import split_records
from file_io import resolve_resource
from image_preprocess import PreprocessParams
from orientation_handler import OrientationHandler
from vocabulary import TagVocabulary, create_vocabulary_from_datasets, load_ignore_list

SMALL = ["data.image_size=32", "data.val_fraction=0.25", "data.num_workers=0", "data.demo_images=60"]


@pytest.fixture(scope="module")
def demo_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 60-image demo dataset, generated through ensure_dataset as a first run does."""
    root = tmp_path_factory.mktemp("data") / "demo"
    cfg = load_config(None, SMALL + [f"data.root={root}"])
    assert ensure_dataset(cfg, is_main=True, log=None) == root
    return root


def test_ensure_dataset_generates_only_when_asked(demo_root: Path, tmp_path: Path) -> None:
    """The demo is there with its sidecars; a missing folder without demo_images is an error naming it."""
    assert len(scan_dataset(demo_root).records) == 60
    missing = tmp_path / "nothing_here"
    cfg = load_config(None, [f"data.root={missing}", "data.demo_images=0"])
    with pytest.raises(FileNotFoundError, match="nothing_here"):
        ensure_dataset(cfg, is_main=True, log=None)
    assert not missing.exists()


def test_prepare_data_matches_the_steps_by_hand(demo_root: Path, tmp_path: Path) -> None:
    """Records, vocabulary and files equal scan -> split -> vocabulary -> filter done directly; a resumed
    run keeps the saved split and vocabulary even when the config would now build another."""
    cfg = load_config(None, SMALL + [f"data.root={demo_root}", "data.min_tag_frequency=3"])
    bundle = prepare_data(cfg, tmp_path / "run", log=None)

    scan = scan_dataset(demo_root)
    split = split_records(scan.records, val_fraction=0.25, seed=cfg.training.seed, max_val=cfg.data.max_val_samples)
    vocab = create_vocabulary_from_datasets(split.train, min_frequency=3, top_k=cfg.data.top_k_tags,
                                            ignore_tags=load_ignore_list(resolve_resource(cfg.data.ignore_tags_file)))
    assert bundle.vocab.index_to_tag == vocab.index_to_tag
    assert bundle.train_records == filter_known_tags(split.train, vocab)[0]
    assert bundle.val_records == filter_known_tags(split.val, vocab)[0]
    assert bundle.preprocess == preprocess_from_config(cfg) == PreprocessParams(32)
    assert len(bundle.train_dataset) == len(bundle.train_records) and len(bundle.val_dataset) == len(bundle.val_records)
    report = json.loads((tmp_path / "run" / "data_report.json").read_text(encoding="utf-8"))
    assert report["used"] == {"train": len(bundle.train_records), "val": len(bundle.val_records), "tags": len(vocab)}
    handler = OrientationHandler.from_file(resolve_resource(cfg.augment.orientation_map), cfg.augment.orientation_safety)
    assert report["flip_audit"] == flip_audit(bundle.train_records, vocab, handler).to_dict()
    assert TagVocabulary.load(tmp_path / "run" / "vocabulary.json").index_to_tag == vocab.index_to_tag

    changed = load_config(None, SMALL + [f"data.root={demo_root}", "data.min_tag_frequency=1", "data.val_fraction=0.5"])
    resumed = prepare_data(changed, tmp_path / "run", resume=True, log=None)
    assert resumed.vocab.index_to_tag == vocab.index_to_tag
    assert resumed.train_records == bundle.train_records and resumed.val_records == bundle.val_records


def test_flip_audit_decides_on_vocabulary_tags(demo_root: Path) -> None:
    """flip_audit sees only the vocabulary's tags: "text" (a flip-forbidding tag) vetoes every record that
    carries it while it is in the vocabulary, and none once it is left out."""
    records = scan_dataset(demo_root).records
    handler = OrientationHandler.from_file(resolve_resource("configs/orientation_map.json"))
    with_text = create_vocabulary_from_datasets(records)
    without_text = TagVocabulary([t for t in with_text.index_to_tag if t != "text"])
    carrying = sum("text" in r.tags for r in records)
    assert 0 < carrying < len(records)
    audit = flip_audit(records, with_text, handler).to_dict()
    assert audit["considered"] == len(records) and audit["vetoed_by_forbid_tag"].get("text") == carrying
    assert "text" not in flip_audit(records, without_text, handler).to_dict()["vetoed_by_forbid_tag"]


def test_prepare_eval_data_takes_every_sample_of_a_folder(demo_root: Path) -> None:
    """With data_root, evaluation uses every sample that carries a vocabulary tag."""
    cfg = load_config(None, SMALL + [f"data.root={demo_root}"])
    records = scan_dataset(demo_root).records
    vocab = create_vocabulary_from_datasets(records[:20])
    bundle = prepare_eval_data(cfg, vocab, PreprocessParams(32), data_root=demo_root, log=None)
    assert bundle.val_records == filter_known_tags(records, vocab)[0]
    assert bundle.train_dataset is None and len(bundle.val_dataset) == len(bundle.val_records)
    with pytest.raises(FileNotFoundError, match="no_such"):
        prepare_eval_data(cfg, vocab, PreprocessParams(32), data_root=demo_root / "no_such", log=None)
