"""Tests for batching: the dataset (flips, augmentation, replacement), collation, failure tracking,
the resumable sampler, DataLoader workers and the device prefetcher."""

from __future__ import annotations

import hashlib
import json
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

import broken_corpus as bc
from augmentation import AugmentParams, apply_color_jitter
from batching import FailureTracker, ImagePreFetcher, ResumableSampler, SidecarJsonDataset, build_dataloader, collate_samples, targets_from_indices
from data_fixtures import broken_corpus, small_orientation_handler
from dataset_scan import DataQualityError, SampleRecord, scan_dataset
from image_preprocess import PreprocessParams, load_image, normalize_images
from orientation_handler import OrientationHandler
from vocabulary import create_vocabulary_from_datasets


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> bc.BrokenCorpus:
    """47 good + 12 broken + 1 unknown-rating sample: exactly 20% of 60 samples are bad."""
    return broken_corpus(tmp_path_factory.mktemp("corpus"))


# ------------------------------------------------------------------------------------------
# augmentation and dataset
# ------------------------------------------------------------------------------------------


def _flip_dataset(
    tmp_path: Path, tags_by_name: dict[str, list[str]], augment: AugmentParams, seed: int = 0
) -> tuple[SidecarJsonDataset, dict[str, int]]:
    """A dataset of solid/noise images with given tags plus its tag_to_index."""
    records = []
    for i, (name, tags) in enumerate(tags_by_name.items()):
        path = bc.write_image(tmp_path / name, 24, 12, seed=i)
        records.append(SampleRecord(name, str(path), tuple(tags), ("",) * len(tags), i % 4))
    vocab_tags = sorted({t for ts in tags_by_name.values() for t in ts} | {"looking_to_the_right", "hand_on_right_hip"})
    t2i = {t: i for i, t in enumerate(vocab_tags)}
    ds = SidecarJsonDataset(
        records, t2i, PreprocessParams(16, pad_color=(7, 7, 7)), augment=augment, orientation=small_orientation_handler(), seed=seed
    )
    return ds, t2i


def test_flip_swaps_tags_and_vetoes(tmp_path: Path) -> None:
    """Allowed flips mirror the image and swap tags; vetoed ones change nothing."""
    no_jitter = AugmentParams(flip_prob=1.0, brightness=0.0, contrast=0.0, saturation=0.0)
    ds, t2i = _flip_dataset(
        tmp_path,
        {"ok.png": ["looking_to_the_left", "hand_on_left_hip", "smile"], "veto.png": ["text", "smile"], "unmapped.png": ["lefty_pose", "smile"]},
        no_jitter,
    )
    base = [load_image(ds.image_path(i), ds.params) for i in range(3)]
    ok = ds[(0, 0)]
    assert ok["flip"] == 1 and ok["failure"] is None and ok["index"] == 0
    np.testing.assert_array_equal(ok["image"].permute(1, 2, 0).numpy(), base[0][:, ::-1])
    assert sorted(ok["tag_indices"].tolist()) == sorted([t2i["looking_to_the_right"], t2i["hand_on_right_hip"], t2i["smile"]])
    for i in (1, 2):  # forbid tag; orientation-looking tag with no mapping (conservative)
        item = ds[(i, 0)]
        assert item["flip"] == 2
        np.testing.assert_array_equal(item["image"].permute(1, 2, 0).numpy(), base[i])
        assert item["tag_indices"].tolist() == ds.tag_indices(i).tolist()
    never = SidecarJsonDataset(
        [SampleRecord("ok.png", ds.image_path(0), ("smile",), ("",), 0)], t2i, ds.params, augment=AugmentParams(0.0, 0.0, 0.0, 0.0), seed=0
    )
    assert never[0]["flip"] == 0
    with pytest.raises(ValueError, match="orientation"):
        SidecarJsonDataset(
            never_records := [SampleRecord("a", ds.image_path(0), ("smile",), ("",), 0)], t2i, ds.params, augment=AugmentParams(), orientation=None
        )
    assert never_records


def test_augmentation_deterministic_per_seed_epoch_index(tmp_path: Path) -> None:
    """Augmentation depends only on (seed, epoch, index), survives pickling, keeps the pad."""
    aug = AugmentParams(flip_prob=0.5, brightness=0.3, contrast=0.3, saturation=0.3)
    names = {f"s{i}.png": ["smile"] for i in range(6)}
    ds, _ = _flip_dataset(tmp_path, names, aug, seed=11)
    again, _ = _flip_dataset(tmp_path, names, aug, seed=11)
    clone = pickle.loads(pickle.dumps(ds))
    for key in [(0, 0), (3, 0), (3, 5)]:
        a, b, c = ds[key], again[key], clone[key]
        assert torch.equal(a["image"], b["image"]) and torch.equal(a["image"], c["image"])
        assert a["flip"] == b["flip"] == c["flip"]
    assert torch.equal(ds[3]["image"], ds[(3, 0)]["image"])
    epochs = [ds[(2, e)]["image"] for e in range(4)]
    assert any(not torch.equal(epochs[0], x) for x in epochs[1:])
    flips = {ds[(i, e)]["flip"] for i in range(6) for e in range(4)}
    assert flips == {0, 1}
    # the jitter factors (applied on the device) come from the same per-sample randomness
    factors = {ds[(i, e)]["jitter"] for i in range(6) for e in range(4)}
    assert len(factors) > 1 and all(0.7 <= f <= 1.3 for fs in factors for f in fs)
    assert ds[(2, 1)]["jitter"] == again[(2, 1)]["jitter"] == clone[(2, 1)]["jitter"]


def test_failed_sample_replaced_deterministically(tmp_path: Path) -> None:
    """A failing file is replaced by the same other sample every time; all-bad raises."""
    good = [bc.write_image(tmp_path / f"g{i}.png", seed=i) for i in range(4)]
    bad = bc.write_truncated_jpeg(tmp_path / "bad.jpg")
    records = [SampleRecord(p.name, str(p), ("a",), ("",), 0) for p in good]
    records.insert(2, SampleRecord("bad.jpg", str(bad), ("a",), ("",), 1))
    ds = SidecarJsonDataset(records, {"a": 0}, PreprocessParams(8), seed=5)
    first, second = ds[(2, 3)], ds[(2, 3)]
    assert first["failure"] == ("bad.jpg", "image_undecodable")
    assert first["index"] != 2 and first["index"] == second["index"]
    assert torch.equal(first["image"], second["image"])
    assert ds[(0, 3)]["failure"] is None
    all_bad = SidecarJsonDataset([records[2]], {"a": 0}, PreprocessParams(8), max_retries=3)
    with pytest.raises(DataQualityError, match="bad.jpg"):
        all_bad[0]


def test_collate_and_targets_from_indices() -> None:
    """Collation pads with -1; multi-hot targets equal a direct loop."""
    samples = [
        {
            "image": torch.full((3, 4, 4), i, dtype=torch.uint8),
            "tag_indices": torch.tensor(t, dtype=torch.long),
            "rating": r,
            "index": i,
            "flip": f,
            "failure": fail,
            "more_failures": [],
            "jitter": (1.0, 1.0 + i / 10, 1.0),
            "box": (0, i, 4, 4),
        }
        for i, (t, r, f, fail) in enumerate([([3, 1], 0, 1, None), ([], -1, 0, ("x", "image_undecodable")), ([0, 2, 4], 2, 2, None)])
    ]
    batch = collate_samples(samples)
    assert batch["images"].shape == (3, 3, 4, 4) and batch["images"].dtype == torch.uint8
    assert batch["tag_indices"].tolist() == [[3, 1, -1], [-1, -1, -1], [0, 2, 4]]
    assert batch["ratings"].tolist() == [0, -1, 2] and batch["flip"].tolist() == [1, 0, 2]
    assert batch["indices"].tolist() == [0, 1, 2] and batch["failures"] == [("x", "image_undecodable")]
    assert batch["jitter"].shape == (3, 3) and batch["box"].tolist() == [[0, 0, 4, 4], [0, 1, 4, 4], [0, 2, 4, 4]]
    rng = np.random.default_rng(1)
    idx = torch.tensor(rng.integers(-1, 20, size=(6, 9)))
    targets = targets_from_indices(idx, 20)
    reference = torch.zeros(6, 20)
    for b in range(6):
        for j in range(9):
            if idx[b, j] >= 0:
                reference[b, idx[b, j]] = 1.0
    assert torch.equal(targets, reference) and targets.dtype == torch.float32
    assert targets_from_indices(torch.empty(2, 0, dtype=torch.long), 5).shape == (2, 5)


def test_failure_tracker() -> None:
    """The tracker waits for min_samples, then raises once the bad share passes the limit."""
    tracker = FailureTracker(0.1, min_samples=20)
    clean = {"indices": torch.arange(8), "failures": []}
    dirty = {"indices": torch.arange(8), "failures": [("a", "image_undecodable")] * 2}
    tracker.observe(dirty)  # 2/10 bad, but below min_samples
    tracker.observe(clean)
    tracker.observe(clean)  # 2/26
    assert tracker.to_dict()["by_reason"] == {"image_undecodable": 2}
    with pytest.raises(DataQualityError, match="image_undecodable"):
        tracker.observe(dirty)  # 4/36 > 0.1
    assert issubclass(DataQualityError, ValueError)


def test_failure_tracker_state_round_trip() -> None:
    """state_dict() is what checkpoints store under "failures" (to_dict()); a tracker restored from it
    through JSON continues the count exactly; keys missing in older checkpoints load as zero/empty."""
    tracker = FailureTracker(0.25, min_samples=1)
    tracker.observe({"indices": torch.arange(6), "failures": [("a.jpg", "image_undecodable"), ("b.png", "image_missing")]})
    state = tracker.state_dict()
    assert state == tracker.to_dict()
    assert state == {
        "delivered": 6,
        "failed": 2,
        "bad_fraction": 2 / 8,
        "by_reason": {"image_undecodable": 1, "image_missing": 1},
        "examples": ["a.jpg: image_undecodable", "b.png: image_missing"],
        "samples": {"a.jpg": "image_undecodable", "b.png": "image_missing"},
        "validation_samples": [],
    }
    restored = FailureTracker(0.25, min_samples=1)
    restored.load_state_dict(json.loads(json.dumps(state)))
    assert restored.state_dict() == state
    # 2/8 is at the limit; one more bad load (3/10) passes it for both, with the same counts
    bad = {"indices": torch.arange(1), "failures": [("c.jpg", "image_undecodable")]}
    for t in (tracker, restored):
        with pytest.raises(DataQualityError, match="3 of 10"):
            t.observe(bad)
    assert restored.state_dict() == tracker.state_dict()
    older = FailureTracker(0.1)
    older.load_state_dict({"failed": 3})
    assert (older.delivered, older.failed, older.by_reason, older.examples) == (0, 3, {}, [])
    with pytest.raises(ValueError, match="mapping"):
        older.load_state_dict([("failed", 3)])  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="by_reason"):
        older.load_state_dict({"by_reason": ["image_missing"]})


def test_failure_tracker_hands_every_failure_with_its_stage_to_the_skip_list(tmp_path: Path) -> None:
    """write_report() gives the skip list every failed sample once, with where it was found first,
    and a checkpoint round trip keeps the stages."""
    handed: list[dict[str, tuple[str, str]]] = []
    report_path = tmp_path / "data_report.json"
    tracker = FailureTracker(0.9, min_samples=1, report={}, report_path=report_path, skip_list=handed.append)
    failures = [(f"t{i}.png", "image_undecodable") for i in range(12)]  # more than the 10 examples kept
    tracker.observe({"indices": torch.arange(20), "failures": failures})
    tracker.record({"v.png": "load_failed", "t0.png": "load_failed"})  # t0 was found in training first
    tracker.write_report()
    expected = {sid: ("image_undecodable", "training") for sid, _ in failures} | {"v.png": ("load_failed", "validation")}
    assert handed == [expected]
    restored = FailureTracker(0.9, min_samples=1, report={}, report_path=report_path, skip_list=handed.append)
    restored.load_state_dict(json.loads(json.dumps(tracker.state_dict())))
    restored.write_report()
    assert handed[-1] == expected


# ------------------------------------------------------------------------------------------
# sampler
# ------------------------------------------------------------------------------------------


def test_sampler_deterministic_and_epoch_dependent() -> None:
    """Same seed and epoch give the same order; another epoch another order."""
    a = ResumableSampler(50, batch_size=4, seed=3)
    b = ResumableSampler(50, batch_size=4, seed=3)
    first = list(a)
    assert first == list(b) and len(first) == len(a) == 48 and a.batches_per_epoch() == 12
    assert all(e == 0 for _, e in first) and len({i for i, _ in first}) == 48
    a.set_epoch(1)
    second = list(a)
    assert [i for i, _ in second] != [i for i, _ in first] and all(e == 1 for _, e in second)
    plain = ResumableSampler(10, batch_size=3, shuffle=False, drop_last=False)
    assert [i for i, _ in plain] == list(range(10)) and plain.batches_per_epoch() == 4


@pytest.mark.parametrize("drop_last", [True, False])
def test_sampler_sharding(drop_last: bool) -> None:
    """Ranks get equal, disjoint (drop) or covering (pad) shards of one permutation."""
    n, world = 23, 3
    shards = []
    for rank in range(world):
        s = ResumableSampler(n, batch_size=2, seed=9, rank=rank, world_size=world, drop_last=drop_last)
        s.set_epoch(4)
        shards.append([i for i, _ in s])
    lengths = {len(x) for x in shards}
    assert len(lengths) == 1
    flat = [i for x in shards for i in x]
    if drop_last:
        assert len(set(flat)) == len(flat)  # disjoint
        assert lengths == {6}  # 23 // 3 = 7 per rank -> 3 full batches of 2
    else:
        assert set(flat) == set(range(n)) and lengths == {8}  # padded by repeating
    g = torch.Generator()
    digest = hashlib.blake2b(b"9:4", digest_size=8).digest()
    g.manual_seed(int.from_bytes(digest, "big") & 0x7FFFFFFFFFFFFFFF)
    perm = torch.randperm(n, generator=g).tolist()
    assert shards[1][:3] == perm[1:10:3]  # rank r takes positions r, r+world, ...


def test_sampler_resume_inside_epoch() -> None:
    """Resuming at batch k yields exactly the rest of the epoch; mismatches raise."""
    s = ResumableSampler(40, batch_size=4, seed=2, rank=1, world_size=2)
    s.set_epoch(3)
    full = list(s)
    state = s.state_dict(batches_done=2)
    resumed = ResumableSampler(40, batch_size=4, seed=2, rank=1, world_size=2)
    resumed.load_state_dict(state)
    assert list(resumed) == full[8:] and len(resumed) == len(full) - 8
    end = ResumableSampler(40, batch_size=4, seed=2, rank=1, world_size=2)
    end.load_state_dict(s.state_dict(batches_done=s.batches_per_epoch()))
    assert end.epoch == 4 and end.start_batch == 0  # finished epoch -> next one
    with pytest.raises(ValueError, match="num_samples"):
        ResumableSampler(41, batch_size=4, seed=2, rank=1, world_size=2).load_state_dict(state)
    with pytest.raises(ValueError):
        s.set_epoch(0, start_batch=99)
    loader = build_dataloader(_KeyEcho(), resumed, batch_size=4, num_workers=0, pin_memory=False, drop_last=True)
    assert len(loader) == s.batches_per_epoch() - 2


def test_sampler_state_dict_without_argument_round_trips() -> None:
    """state_dict() with no argument stores the sampler's own position; load_state_dict restores it."""
    s = ResumableSampler(40, batch_size=4, seed=2, rank=1, world_size=2)
    s.set_epoch(2, start_batch=3)
    other = ResumableSampler(40, batch_size=4, seed=2, rank=1, world_size=2)
    other.load_state_dict(json.loads(json.dumps(s.state_dict())))
    assert (other.epoch, other.start_batch) == (2, 3) and list(other) == list(s)


def _ranks(make, world: int) -> list:
    return [make(rank, world) for rank in range(world)]


def _run_ranks(samplers: list, batches: int | None = None) -> list[tuple[int, ...]]:
    """Every rank's keys for its first `batches` batches (all when None), rank after rank."""
    out = []
    for s in samplers:
        keys = list(s)
        out += keys if batches is None else keys[: batches * s.batch_size]
    return out


@pytest.mark.parametrize("sampler", ["plain", "repeat"])
@pytest.mark.parametrize("before, after", [((2, 4), (1, 4)), ((1, 4), (2, 4)), ((2, 3), (3, 2)), ((3, 2), (2, 5))])
def test_elastic_resume_sees_every_sample_of_the_epoch_once(sampler: str, before: tuple[int, int], after: tuple[int, int]) -> None:
    """(world size, batch) changes between a checkpoint and the resume: the ranks before and after together take each
    item of the epoch's sequence once (the sample ids counted), only drop_last's last partial batch left out."""
    from repeat_factor import RepeatFactorSampler

    n, epoch = 61, 2
    factors = np.linspace(1.0, 2.5, n)

    def make(world: int, batch: int):
        def build(rank: int, world: int = world):
            if sampler == "repeat":
                return RepeatFactorSampler(factors, batch_size=batch, seed=4, rank=rank, world_size=world)
            return ResumableSampler(n, batch_size=batch, seed=4, rank=rank, world_size=world)

        return build

    (w0, b0), (w1, b1) = before, after
    first = _ranks(make(w0, b0), w0)
    for s in first:
        s.set_epoch(epoch)
    done = 3
    seen = _run_ranks(first, done)
    state = json.loads(json.dumps(first[0].state_dict(batches_done=done)))
    assert (state["start_batch"], state["offset"], state["batch_size"], state["world_size"]) == (done, 0, b0, w0)
    second = _ranks(make(w1, b1), w1)
    with pytest.raises(ValueError, match="cannot resume inside the epoch"):
        second[0].load_state_dict(state)  # not without elastic
    for s in second:
        s.load_state_dict(state, elastic=True)
    assert all(s.epoch == epoch and s.start_batch == 0 and s.offset == done * b0 * w0 for s in second)
    seen += _run_ranks(second)
    sequence = first[0]._epoch_sequence(epoch)
    expected = [first[0]._key(item, epoch) for item in sequence]
    assert len(seen) == len(set(seen))  # no sample (or repeat copy) twice
    assert set(seen) <= set(expected) and len(expected) - len(seen) < w1 * b1  # only the last partial batch left out
    # the resumed layout's own checkpoint, taken mid-way, resumes in the same layout where it was
    middle = json.loads(json.dumps(second[-1].state_dict(batches_done=1)))
    again = make(w1, b1)(w1 - 1)
    again.load_state_dict(middle)
    assert list(again) == list(second[-1])[b1:] and again.offset == second[-1].offset
    # the next epoch is whole again
    again.set_epoch(epoch + 1)
    assert again.batches_per_epoch() == again.full_batches_per_epoch()


def test_elastic_resume_refuses_changed_data_and_finishes_a_spent_epoch() -> None:
    s = ResumableSampler(40, batch_size=4, seed=2, world_size=1)
    s.set_epoch(1)
    state = s.state_dict(batches_done=9)  # 36 of 40 taken
    with pytest.raises(ValueError, match="num_samples"):
        ResumableSampler(41, batch_size=4, seed=2, rank=0, world_size=2).load_state_dict(state, elastic=True)
    with pytest.raises(ValueError, match="seed"):
        ResumableSampler(40, batch_size=4, seed=3, rank=0, world_size=2).load_state_dict(state, elastic=True)
    two = ResumableSampler(40, batch_size=4, seed=2, rank=0, world_size=2)
    two.load_state_dict(state, elastic=True)  # 4 left: less than a batch on each of 2 ranks
    assert (two.epoch, two.start_batch) == (2, 0) and two.batches_per_epoch() == two.full_batches_per_epoch() == 5


class _KeyEcho(torch.utils.data.Dataset):
    """Returns a minimal sample echoing its key (for loader length checks)."""

    def __len__(self) -> int:
        """Forty keys."""
        return 40

    def __getitem__(self, key: tuple[int, int]) -> dict:
        """A 1x1 sample carrying the index."""
        return {
            "image": torch.zeros(3, 1, 1, dtype=torch.uint8),
            "tag_indices": torch.tensor([0]),
            "rating": 0,
            "index": key[0],
            "flip": 0,
            "failure": None,
        }


# ------------------------------------------------------------------------------------------
# end to end through DataLoader workers
# ------------------------------------------------------------------------------------------


def _run_epoch(ds: SidecarJsonDataset, workers: int, context: str | None) -> list[dict]:
    """All batches of epoch 1 with the given worker count."""
    sampler = ResumableSampler(len(ds), batch_size=8, seed=4, drop_last=True)
    sampler.set_epoch(1)
    loader = build_dataloader(ds, sampler, batch_size=8, num_workers=workers, pin_memory=False, drop_last=True, multiprocessing_context=context)
    return list(loader)


@pytest.mark.e2e  # DataLoader worker processes / several re-planned training windows: the slow tier
def test_dataloader_workers_replace_decode_failures(corpus: bc.BrokenCorpus) -> None:
    """Spawned workers replace decode-time failures and match a single-process run exactly."""
    scan = scan_dataset(corpus.root, verify="header")  # truncated JPEGs get through
    assert set(corpus.decode_only_ids) <= {r.sample_id for r in scan.records}
    vocab = create_vocabulary_from_datasets(scan.records)
    aug = AugmentParams(flip_prob=0.5)
    ds = SidecarJsonDataset(scan.records, vocab.tag_to_index, PreprocessParams(16), augment=aug, orientation=OrientationHandler.default(), seed=1)
    assert len(pickle.dumps(ds)) < 64_000
    # spawn: the way Windows starts workers, proving the dataset and worker_init pickle
    with_workers = _run_epoch(ds, 2, "spawn")
    in_process = _run_epoch(ds, 0, None)
    assert len(with_workers) == len(ds) // 8
    tracker = FailureTracker(0.2, min_samples=1)
    failures = []
    for a, b in zip(with_workers, in_process):
        assert a["images"].shape == (8, 3, 16, 16) and a["images"].dtype == torch.uint8
        assert torch.equal(a["images"], b["images"]) and torch.equal(a["tag_indices"], b["tag_indices"])
        assert a["failures"] == b["failures"]
        tracker.observe(a)
        failures.extend(a["failures"])
    bad_positions = [i for i, r in enumerate(scan.records) if r.sample_id in corpus.decode_only_ids]
    sampler = ResumableSampler(len(ds), batch_size=8, seed=4)
    sampler.set_epoch(1)
    visited = [i for i, _ in sampler]
    expected = sum(visited.count(p) for p in bad_positions)
    assert expected >= 1  # the corpus places a broken file where this epoch reads it
    assert len(failures) >= expected
    assert {f[1] for f in failures} == {"image_undecodable"}
    assert tracker.to_dict()["failed"] == len(failures)


def test_prefetcher_cpu_matches_reference() -> None:
    """On CPU the prefetcher normalises images and builds targets like the references."""
    params = PreprocessParams(4, mean=(0.2, 0.3, 0.4), std=(0.5, 0.6, 0.7))
    batches = [
        {
            "images": torch.randint(0, 256, (2, 3, 4, 4), dtype=torch.uint8),
            "tag_indices": torch.tensor([[0, 2], [1, -1]]),
            "ratings": torch.tensor([1, -1]),
            "indices": torch.tensor([5, 6]),
            "flip": torch.tensor([0, 1]),
            "failures": [("z", "r")],
        }
        for _ in range(3)
    ]
    out = list(ImagePreFetcher(batches, "cpu", params, num_tags=3))
    assert len(out) == 3
    for got, src in zip(out, batches):
        assert torch.equal(got["images"], normalize_images(src["images"], params.mean, params.std))
        assert got["tag_targets"].tolist() == [[1, 0, 1], [0, 1, 0]]
        assert got["ratings"].tolist() == [1, -1] and got["failures"] == [("z", "r")]
        assert got["indices"].tolist() == [5, 6]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_prefetcher_cuda_matches_cpu() -> None:
    """On CUDA the side-stream prefetcher gives the same tensors as the CPU path."""
    params = PreprocessParams(8)
    batches = [
        {
            "images": torch.randint(0, 256, (4, 3, 8, 8), dtype=torch.uint8).pin_memory(),
            "tag_indices": torch.randint(-1, 10, (4, 5)).pin_memory(),
            "ratings": torch.randint(-1, 4, (4,)).pin_memory(),
            "indices": torch.arange(4),
            "flip": torch.zeros(4),
            "failures": [],
        }
        for _ in range(5)
    ]
    gpu = list(ImagePreFetcher(batches, "cuda", params, num_tags=10))
    cpu = list(ImagePreFetcher(batches, "cpu", params, num_tags=10))
    for g, c in zip(gpu, cpu):
        assert g["images"].is_cuda
        assert torch.equal(g["images"].cpu(), c["images"]) and torch.equal(g["tag_targets"].cpu(), c["tag_targets"])
        assert g["tag_targets"].is_cuda and g["ratings"].is_cuda and g["failures"] == []


def test_prefetcher_applies_jitter_then_normalises() -> None:
    """Batches with jitter factors are jittered on the device before normalisation."""
    params = PreprocessParams(4, mean=(0.5, 0.4, 0.3), std=(0.2, 0.25, 0.3))
    images = torch.randint(0, 256, (2, 3, 4, 4), dtype=torch.uint8)
    batch = {
        "images": images,
        "tag_indices": torch.tensor([[0, -1], [1, 2]]),
        "ratings": torch.tensor([0, -1]),
        "jitter": torch.tensor([[1.2, 0.9, 1.1], [1.0, 1.0, 1.0]]),
        "box": torch.tensor([[0, 1, 4, 3], [0, 0, 4, 4]]),
        "failures": [],
        "flip": torch.zeros(2),
        "indices": torch.arange(2),
    }
    out = next(iter(ImagePreFetcher([batch], "cpu", params, num_tags=3)))
    expected = normalize_images(apply_color_jitter(images.float(), batch["jitter"], batch["box"]), params.mean, params.std)
    torch.testing.assert_close(out["images"], expected)
    assert not torch.allclose(out["images"][0], normalize_images(images, params.mean, params.std)[0])
    torch.testing.assert_close(out["images"][1], normalize_images(images, params.mean, params.std)[1])


def test_evaluation_dataset_skips_and_never_substitutes(tmp_path: Path) -> None:
    """substitute=False: a failing sample is left out of the batch and listed under "skipped";
    a batch of only failures is empty; known_bad samples are never decoded again."""
    root = tmp_path / "root"
    records = []
    for i in range(4):
        path = bc.write_image(root / f"{i}.png", 16, 12, seed=i)
        records.append(SampleRecord(f"{i}.png", str(path), ("a",), ("",), 0))
    bc.write_truncated_png(root / "1.png")
    params = PreprocessParams(image_size=16)
    ds = SidecarJsonDataset(records, {"a": 0}, params, substitute=False)
    batch = collate_samples([ds[(i, 0)] for i in range(4)])
    assert batch["indices"].tolist() == [0, 2, 3] and batch["images"].shape == (3, 3, 16, 16)
    assert batch["skipped"] == [("1.png", "image_undecodable")]
    empty = collate_samples([ds[(1, 0)]])
    assert empty["images"].shape == (0, 3, 16, 16) and empty["tag_indices"].shape[0] == 0
    # training: a known-bad sample is replaced without being opened
    (root / "3.png").unlink()
    bc.write_image(root / "3.png", 16, 12, seed=3)  # fine now, but recorded as bad by an earlier run
    train = SidecarJsonDataset(records, {"a": 0}, params, known_bad={"3.png": "image_undecodable"})
    sample = train[(3, 0)]
    assert sample["failure"] == ("3.png", "image_undecodable") and sample["index"] != 3  # a replacement


def test_failure_tracker_writes_the_report(tmp_path: Path) -> None:
    """write_report() puts each failing sample once, with its reason, into the run's report."""
    report: dict = {"skipped": {}}
    tracker = FailureTracker(0.5, min_samples=100, report=report, report_path=tmp_path / "data_report.json")
    for _ in range(2):  # the same file failing in two epochs is one sample
        tracker.observe({"indices": torch.arange(4), "failures": [("x.png", "image_undecodable")]})
    tracker.write_report()
    written = json.loads((tmp_path / "data_report.json").read_text(encoding="utf-8"))
    assert written["replaced_during_training"]["samples"] == {"x.png": "image_undecodable"}
    assert written["replaced_during_training"]["failed"] == 2


def test_failure_tracker_records_validation_skips_without_counting_loads() -> None:
    """record() adds samples by id and reason (kept first-seen) without touching the load counts."""
    tracker = FailureTracker(0.1, min_samples=1)
    tracker.record({"v.png": "image_undecodable"})
    tracker.record({"v.png": "image_missing"})
    assert tracker.samples == {"v.png": "image_undecodable"} and tracker.failed == 0 and tracker.bad_fraction == 0.0
