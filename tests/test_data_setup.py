"""Tests for data_setup: the run-level wiring gives what the owning modules give when called by hand,
writes the run folder's data files, and a resumed run reuses them."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

import broken_corpus as bc
from Configuration_System import ConfigError, load_config
from data_fixtures import listing
from data_setup import check_output_locations, ensure_dataset, flip_audit, prepare_data, prepare_eval_data, preprocess_from_config
from dataset_scan import DataQualityError, filter_known_tags, scan_dataset
from dataset_split import split_records
from file_io import resolve_resource
from image_preprocess import PreprocessParams
from orientation_handler import OrientationHandler
from sample_table import SampleRecord, SampleTable
from skip_list import SKIP_LIST_FILE, read_skip_list
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
    vocab = create_vocabulary_from_datasets(
        split.train, min_frequency=3, top_k=cfg.data.top_k_tags, ignore_tags=load_ignore_list(resolve_resource(cfg.data.ignore_tags_file))
    )
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


def test_prepare_eval_data_reads_a_scan_index_but_writes_none(demo_root: Path, tmp_path: Path) -> None:
    """The run's validation split through the scan index a training run left; evaluation alone
    leaves no index behind (it may run from any folder, even inside the dataset's parent)."""
    cfg = load_config(None, SMALL + [f"data.root={demo_root}", f"output_root={tmp_path / 'runs'}"])
    vocab = create_vocabulary_from_datasets(scan_dataset(demo_root).records)
    bundle = prepare_eval_data(cfg, vocab, PreprocessParams(32), log=None)
    assert not (tmp_path / "runs").exists() and bundle.report["scan_index"]["reused"] is False
    prepare_data(cfg, tmp_path / "runs" / "exp", log=None)  # a training run writes the index
    again = prepare_eval_data(cfg, vocab, PreprocessParams(32), log=None)
    assert again.report["scan_index"]["reused"] is True and again.val_records == bundle.val_records


# --------------------------------------------------------------------------------------------
# Hostile data (issue 12)
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("key, value", [("output_root", "{data}/runs"), ("data.cache_dir", "{data}/sub/cache"), ("output_root", "{data}/../data/x")])
def test_output_locations_inside_the_dataset_are_refused_first(tmp_path: Path, key: str, value: str) -> None:
    """A run folder or cache folder inside data.root is a ConfigError naming the key, raised by
    prepare_data before anything is scanned or written."""
    data = tmp_path / "data"
    bc.make_broken_corpus(data, good=4)
    before = listing(data)
    cfg = load_config(None, SMALL + [f"data.root={data}", f"{key}={value.format(data=data)}"])
    with pytest.raises(ConfigError, match=rf"^{key}: .* inside the dataset folder"):
        check_output_locations(cfg)
    with pytest.raises(ConfigError, match=rf"^{key}:"):
        prepare_data(cfg, cfg.run_dir, log=None)
    assert listing(data) == before
    ok = load_config(None, SMALL + [f"data.root={data}", f"output_root={tmp_path / 'runs'}", f"data.cache_dir={tmp_path / 'cache'}"])
    check_output_locations(ok)


def test_bad_fraction_refusal_names_the_key_and_writes_the_report(tmp_path: Path) -> None:
    """At the default data.max_bad_fraction a 20%-broken corpus is refused; data_report.json is
    there with the counts by reason."""
    corpus = bc.make_broken_corpus(tmp_path / "data", good=47)
    cfg = load_config(None, SMALL + [f"data.root={corpus.root}", f"output_root={tmp_path / 'runs'}"])
    with pytest.raises(DataQualityError, match=r"data\.max_bad_fraction=0\.05"):
        prepare_data(cfg, cfg.run_dir, log=None)
    report = json.loads((cfg.run_dir / "data_report.json").read_text(encoding="utf-8"))
    assert report["skipped"] == corpus.expected_skips("header")


def test_cache_build_failures_are_left_out_and_reported(tmp_path: Path) -> None:
    """With data.cache_dir, the files the cache build cannot decode are skipped under their reason
    before the split (never in validation), on this run and on a run that reuses the cache."""
    hostile = bc.make_hostile_corpus(tmp_path, good=40, huge_tag_string=False, with_links=False)
    sets = [
        f"data.root={hostile.root}",
        f"output_root={tmp_path / 'runs'}",
        f"data.cache_dir={tmp_path / 'cache'}",
        "data.max_bad_fraction=0.5",
        "augment.flip_prob=0",
    ]
    for name in ("a", "b"):
        cfg = load_config(None, SMALL + sets + [f"experiment_name={name}"])
        bundle = prepare_data(cfg, cfg.run_dir, log=None)
        ids = {r.sample_id for r in [*bundle.train_records, *bundle.val_records]}
        assert not ids & set(hostile.decode_only_ids)
        assert bundle.report["skipped"] == hostile.expected_skips(decoded=True)
        assert bundle.report["dropped_tags"] == hostile.dropped_tags


def test_a_single_sample_cannot_take_over_the_vocabulary(tmp_path: Path) -> None:
    """One sidecar with 2000 unique tags adds no vocabulary column (min_tag_frequency 2), and
    data.max_vocabulary_tags caps what a crowd of them could add."""
    data = tmp_path / "data"
    for i in range(12):
        bc.write_image(data / f"{i}.png", 8, 8, seed=i)
        bc.write_json(data / f"{i}.png.json", {"tags": ["common", f"pair_{i // 2}"]})
    bc.write_json(data / "0.png.json", {"tags": ["common", "pair_0"] + [f"junk_{k}" for k in range(2000)]})
    base = SMALL + [f"data.root={data}", f"output_root={tmp_path / 'runs'}", "data.val_fraction=0.2", "augment.flip_prob=0"]
    bundle = prepare_data(load_config(None, base), tmp_path / "runs" / "a", log=None)
    assert not [t for t in bundle.vocab.index_to_tag if t.startswith("junk_")]
    capped = prepare_data(load_config(None, base + ["data.min_tag_frequency=1", "data.max_vocabulary_tags=3"]), tmp_path / "runs" / "b", log=None)
    assert len(capped.vocab) == 3 and capped.report["vocabulary"]["dropped_top_k"] > 0


def test_resume_never_decodes_earlier_failures_again(tmp_path: Path) -> None:
    """Samples an earlier attempt of the run found undecodable (in data_report.json) stay out of
    validation and are never decoded again in training on resume; the report keeps them."""
    hostile = bc.make_hostile_corpus(tmp_path, good=40, huge_tag_string=False, with_links=False)
    cfg = load_config(
        None,
        SMALL
        + [
            f"data.root={hostile.root}",
            f"output_root={tmp_path / 'runs'}",
            "data.max_bad_fraction=0.5",
            "augment.flip_prob=0",
            "data.val_fraction=0.5",
        ],
    )
    first = prepare_data(cfg, cfg.run_dir, log=None)
    failed = {sid: "image_undecodable" for sid in hostile.decode_only_ids}
    tracker = first.failure_tracker(0.5)
    tracker.record(failed)
    tracker.write_report()
    resumed = prepare_data(cfg, cfg.run_dir, resume=True, log=None)
    assert not {r.sample_id for r in resumed.val_records} & set(failed)
    # each failed sample was in the first attempt's validation or is in training now
    assert set(failed) <= {r.sample_id for r in resumed.train_records} | {r.sample_id for r in first.val_records}
    assert resumed.report["replaced_during_training"]["samples"] == failed
    for i in range(len(resumed.train_dataset)):
        if resumed.train_dataset.sample_id(i) in failed:
            assert resumed.train_dataset[(i, 0)]["failure"] == (resumed.train_dataset.sample_id(i), "image_undecodable")


@pytest.mark.parametrize("safety", ["conservative", "permissive"])
def test_flip_audit_of_a_table_equals_the_record_by_record_audit(safety: str) -> None:
    """The array audit of a SampleTable counts what decide() on each record counts."""
    rng = random.Random(3)
    pool = [
        "text",
        "looking_to_the_side",
        "hand_on_left_hip",
        "left_eye_closed",
        "1girl",
        "smile",
        "solo",
        "holding_sword",
        "english_text",
        "weird_left",
    ]
    records = [
        SampleRecord(f"s{i}", f"/d/s{i}.png", tuple(dict.fromkeys(rng.choice(pool) for _ in range(rng.randint(0, 5)))), (), 0) for i in range(400)
    ]
    handler = OrientationHandler.from_file(resolve_resource("configs/orientation_map.json"), safety)
    vocab = TagVocabulary(pool[:-1])  # "weird_left" is not in the vocabulary: it never vetoes
    by_table = flip_audit(SampleTable.from_records(records), vocab, handler).to_dict()
    by_record = flip_audit(records, vocab, handler).to_dict()
    assert by_table == by_record and by_table["vetoed"] > 0


def test_every_skipped_sample_is_in_the_runs_complete_list(tmp_path: Path) -> None:
    """More bad files of each reason than the report keeps as examples: skipped_samples.csv names
    every one, once, with its reason and stage; workers' and validation's failures are added to it
    by the failure tracker, and a resumed run lists them again with their stage."""
    corpus = bc.make_broken_corpus(tmp_path / "data", good=40, copies=7)
    cfg = load_config(
        None,
        SMALL
        + [f"data.root={corpus.root}", f"output_root={tmp_path / 'runs'}", "data.max_bad_fraction=0.9", "augment.flip_prob=0", "data.verify=header"],
    )
    first = prepare_data(cfg, cfg.run_dir, log=None)
    path = cfg.run_dir / SKIP_LIST_FILE
    rows = list(read_skip_list(path))
    startup = [r for r in rows if r[2] == "start-up"]
    by_reason: dict[str, list[str]] = {}
    for p, reason, _, _ in startup:
        by_reason.setdefault(reason, []).append(p)
    scanned = first.report["skipped"]
    assert {k: len(v) for k, v in by_reason.items()} == scanned
    for reason, paths in by_reason.items():
        assert len(set(paths)) == len(paths), reason  # each once
        if scanned[reason] >= 7:  # one a copy: every copy's folder is named, not just the first examples
            assert {p.split("/")[1] for p in paths} == {f"copy_{c}" for c in range(7)}, (reason, paths)
        for p in paths:
            assert (corpus.root / p).exists() or (corpus.root / p).parent.is_dir(), p
    assert first.report["skipped_list"] == {"file": SKIP_LIST_FILE, "samples": len(rows)}
    assert len(rows) == sum(scanned.values()) + sum(first.report["no_known_tags"].values())

    # training (replaced) and validation (skipped) failures join the list, each once, with where
    in_training = [first.train_records[i].sample_id for i in range(3)]
    in_validation = [first.val_records[0].sample_id]
    tracker = first.failure_tracker(0.9)
    tracker.observe({"indices": [0, 1, 2, 3], "failures": [(s, "image_undecodable") for s in in_training]})
    tracker.record({in_validation[0]: "load_failed"})
    tracker.write_report()
    later = {r[0]: r for r in read_skip_list(path) if r[2] in ("training", "validation")}
    assert {p: (r[1], r[2]) for p, r in later.items()} == {s: ("image_undecodable", "training") for s in in_training} | {
        in_validation[0]: ("load_failed", "validation")
    }
    assert list(read_skip_list(path, ["start-up"])) == startup  # the start-up rows are kept as they were

    resumed = prepare_data(cfg, cfg.run_dir, resume=True, log=None)
    again = list(read_skip_list(path))
    assert [r for r in again if r[2] == "start-up"] == startup
    assert {r[0]: (r[1], r[2]) for r in again if r[2] in ("training", "validation")} == {p: (r[1], r[2]) for p, r in later.items()}
    assert resumed.report["skipped_list"]["samples"] == len(again)
