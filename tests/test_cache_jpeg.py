"""Tests for the jpeg prepared cache: round-trip error and size, rebuilds, revalidation, failures,
dataset samples, decode_on_device (device="cpu": the CUDA code path) and spawn pickling."""

from __future__ import annotations

import io
import json
import os
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

import broken_corpus as bc
import cache_codec
from augmentation import AugmentParams
from batching import ImagePreFetcher, SidecarJsonDataset, collate_samples
from Configuration_System import ConfigError, load_config
from data_fixtures import small_orientation_handler
from dataset_scan import SampleRecord, scan_dataset
from image_preprocess import PreprocessParams, load_image
from prepared_cache import PreparedCache, prepare_cache

_REPO = Path(__file__).resolve().parents[1]
# torchvision 0.29 deprecates its image decoders (for TorchCodec); they still work, and are the
# fallback worker decoder and the device decoder here
pytestmark = pytest.mark.filterwarnings("ignore:The image decoding and encoding capabilities of TorchVision:DeprecationWarning")
SIZE = 64
PARAMS = PreprocessParams(SIZE)
T2I = {"smile": 0, "looking_to_the_left": 1, "looking_to_the_right": 2}
# Measured on these 64 px drawings at quality 90 (4:2:0) against the raw cache's pixels: max 97,
# mean 5.9 grey levels (5.2-7.2 per image; full-resolution grain is harder than real images:
# bench_cache.py measures mean 3.0, max 103 on anime-like content at 448 px). Bounds with headroom.
MAX_ERROR_Q90, MEAN_ERROR_Q90 = 120, 8.0
# libjpeg-turbo decoders (Pillow, torchvision, simplejpeg) gave identical pixels here (max
# difference 0); the tolerance leaves room for another libjpeg build (and for nvJPEG on CUDA).
DECODER_ATOL = 2


def drawing(path: Path, width: int, height: int, seed: int) -> Path:
    """A small illustration-like image: gradient, flat outlined shapes, thin lines, light grain."""
    rng = np.random.default_rng(seed)
    t = np.linspace(0.0, 1.0, height)[:, None, None]  # (H, 1, 1)
    top, bottom = rng.integers(40, 256, 3), rng.integers(40, 256, 3)
    img = Image.fromarray((top * (1 - t) + bottom * t).repeat(width, axis=1).astype(np.uint8))  # (H, W, 3) gradient
    draw = ImageDraw.Draw(img)
    for _ in range(5):
        x, y, r = rng.uniform(0, width), rng.uniform(0, height), rng.uniform(6, 22)
        fill = tuple(int(v) for v in rng.integers(40, 256, 3))
        draw.ellipse((x - r, y - r, x + r, y + r), fill=fill, outline=(20, 15, 25), width=2)
    for _ in range(6):
        draw.line([tuple(rng.uniform(0, (width, height))) for _ in range(3)], fill=(30, 20, 20), width=1)
    pixels = np.asarray(img, dtype=np.float32) + rng.normal(0, 3.0, (height, width, 1))  # grain
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(path)
    return path


def make_root(root: Path, count: int = 6) -> list[SampleRecord]:
    """`count` drawings (PNG, several aspect ratios so boxes differ) with sidecars; the scan's records."""
    for i in range(count):
        drawing(root / f"d{i}.png", 80 + 12 * (i % 3), 96 - 10 * (i % 2), seed=i)
        bc.write_json(root / f"d{i}.png.json", {"tags": ["smile", "looking_to_the_left"], "rating": "g"})
    return scan_dataset(root).records


def pillow_decode(data: bytes) -> np.ndarray:
    """Reference decode of JPEG bytes: Pillow, (H, W, 3) uint8."""
    with Image.open(io.BytesIO(data)) as img:
        return np.array(img.convert("RGB"))


def stored_jpegs(cache: PreparedCache, records: list[SampleRecord]) -> list[bytes]:
    """The JPEG bytes the cache holds for each record (in record order)."""
    rows = cache.rows_for([r.sample_id for r in records])
    return [cache.get_encoded(int(row), r.image_path)[0].numpy().tobytes() for row, r in zip(rows, records)]  # type: ignore[index]


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> tuple[list[SampleRecord], Path, Path]:
    """Drawings with a raw and a jpeg (q90) cache of them: (records, raw cache, jpeg cache)."""
    base = tmp_path_factory.mktemp("jpeg")
    records = make_root(base / "root")
    prepare_cache(records, base / "raw", PARAMS)
    prepare_cache(records, base / "jpeg", PARAMS, cache_format="jpeg", quality=90, shard_size=4)
    return records, base / "raw", base / "jpeg"


def test_round_trip_error_and_bytes(built: tuple[list[SampleRecord], Path, Path]) -> None:
    """The stored JPEGs decode (Pillow) to the cache's pixels; those are within the measured error
    of the raw cache's (= load_image's) pixels, and far smaller than raw."""
    records, raw_dir, jpeg_dir = built
    raw, jpeg = PreparedCache(raw_dir, PARAMS), PreparedCache(jpeg_dir, PARAMS)
    assert (raw.format, jpeg.format) == ("raw", "jpeg")
    assert jpeg.codec == {"format": "jpeg", "quality": 90, "subsampling": "4:2:0"}
    blobs = stored_jpegs(jpeg, records)
    errors = []
    for row, record, blob in zip(jpeg.rows_for([r.sample_id for r in records]), records, blobs):
        assert blob[:2] == b"\xff\xd8" and blob[-2:] == b"\xff\xd9"  # one whole JPEG per entry
        pixels, box = jpeg.get(int(row), record.image_path)  # type: ignore[misc]
        reference, raw_box = raw.get(int(raw.rows_for([record.sample_id])[0]), record.image_path)  # type: ignore[misc]
        assert box == raw_box and pixels.shape == (SIZE, SIZE, 3)
        assert np.abs(pixels.astype(int) - pillow_decode(blob)).max() <= DECODER_ATOL
        np.testing.assert_array_equal(reference, load_image(record.image_path, PARAMS))
        errors.append(np.abs(pixels.astype(int) - reference))
    assert max(int(e.max()) for e in errors) <= MAX_ERROR_Q90
    assert float(np.mean([e.mean() for e in errors])) <= MEAN_ERROR_Q90
    report = prepare_cache(records, jpeg_dir, PARAMS, cache_format="jpeg", quality=90)
    assert report["reused"] == len(records) and report["decoded"] == 0
    assert report["bytes_per_image"] == round(np.mean([len(b) for b in blobs]))
    assert report["bytes_per_image"] < SIZE * SIZE * 3 / 4
    assert report["bytes_on_disk"] == sum(len(b) for b in blobs)  # shards are the JPEGs back to back


def test_format_or_quality_change_rebuilds_in_place(tmp_path: Path) -> None:
    """Another format or quality rebuilds the cache (never mixes entries) and deletes the old
    shards; a raw cache indexed before the jpeg format existed keeps working and is reused."""
    records = make_root(tmp_path / "root", 4)
    out = tmp_path / "cache"
    first = prepare_cache(records, out, PARAMS)
    index = json.loads((out / "index.json").read_text(encoding="utf-8"))
    del index["codec"]  # what the code before the jpeg format wrote
    (out / "index.json").write_text(json.dumps(index), encoding="utf-8")
    assert PreparedCache(out, PARAMS).format == "raw"
    assert prepare_cache(records, out, PARAMS)["reused"] == first["cached"] == 4

    to_jpeg = prepare_cache(records, out, PARAMS, cache_format="jpeg", quality=90)
    assert (to_jpeg["decoded"], to_jpeg["reused"], to_jpeg["rebuilt_from"]) == (4, 0, {"format": "raw"})
    assert sorted(p.name for p in out.glob("shard_*")) == ["shard_00000.q90.jpegs"]
    assert prepare_cache(records, out, PARAMS, cache_format="jpeg", quality=90)["reused"] == 4
    q80 = prepare_cache(records, out, PARAMS, cache_format="jpeg", quality=80)
    assert q80["decoded"] == 4 and q80["rebuilt_from"]["quality"] == 90
    assert sorted(p.name for p in out.glob("shard_*")) == ["shard_00000.q80.jpegs"]
    assert q80["bytes_per_image"] < to_jpeg["bytes_per_image"]
    back = prepare_cache(records, out, PARAMS)
    assert back["decoded"] == 4 and back["format"] == "raw" and sorted(p.name for p in out.glob("shard_*")) == ["shard_00000.u8"]
    with pytest.raises(ValueError, match="format"):
        prepare_cache(records, out, PARAMS, cache_format="png")


def test_changed_source_is_reencoded(tmp_path: Path) -> None:
    """A source file whose size or mtime changed is not read from the cache; the next build
    encodes it again and keeps the others."""
    root = tmp_path / "root"
    records = make_root(root, 4)
    out = tmp_path / "cache"
    prepare_cache(records, out, PARAMS, cache_format="jpeg", quality=90)
    changed = records[2]
    drawing(Path(changed.image_path), 100, 60, seed=99)
    os.utime(changed.image_path, ns=(1, 1))
    cache = PreparedCache(out, PARAMS)
    row = int(cache.rows_for([changed.sample_id])[0])
    assert cache.get(row, changed.image_path) is None and cache.get_encoded(row, changed.image_path) is None
    dataset = SidecarJsonDataset(records, T2I, PARAMS, cache=cache)
    np.testing.assert_array_equal(dataset[2]["image"].permute(1, 2, 0).numpy(), load_image(changed.image_path, PARAMS))
    assert dataset.cache_hits == 0
    again = prepare_cache(records, out, PARAMS, cache_format="jpeg", quality=90)
    assert (again["reused"], again["decoded"]) == (3, 1)
    fresh = PreparedCache(out, PARAMS)
    pixels, _box = fresh.get(int(fresh.rows_for([changed.sample_id])[0]), changed.image_path)  # type: ignore[misc]
    error = np.abs(pixels.astype(int) - load_image(changed.image_path, PARAMS))
    assert error.max() <= MAX_ERROR_Q90 and error.mean() <= MEAN_ERROR_Q90


def test_a_damaged_cache_entry_falls_back_to_the_source(tmp_path: Path) -> None:
    """Damaged (no JPEG markers) or missing bytes in a shard are not the source file's fault: the
    worker decodes the source instead (no failure recorded), with or without decode_on_device."""
    records = make_root(tmp_path / "root", 3)
    out = tmp_path / "cache"
    prepare_cache(records, out, PARAMS, cache_format="jpeg", quality=90)
    shard = next(out.glob("shard_*.jpegs"))
    data = bytearray(shard.read_bytes())
    data[0:2] = b"\x00\x00"  # the first entry loses its start-of-image marker
    shard.write_bytes(bytes(data))
    for decode_on_device in (False, True):
        dataset = SidecarJsonDataset(records, T2I, PARAMS, cache=PreparedCache(out, PARAMS, decode_on_device=decode_on_device))
        index = [r.sample_id for r in records].index(min(r.sample_id for r in records))  # the shard's first entry
        sample = dataset[index]
        assert "image" in sample and sample["failure"] is None and dataset.cache_hits == 0
        np.testing.assert_array_equal(sample["image"].permute(1, 2, 0).numpy(), load_image(records[index].image_path, PARAMS))
    shard.write_bytes(bytes(data[:10]))  # truncated: every later entry's bytes are missing
    cache = PreparedCache(out, PARAMS)
    last = max(r.sample_id for r in records)
    row = int(cache.rows_for([last])[0])
    path = next(r.image_path for r in records if r.sample_id == last)
    assert cache.get(row, path) is None and cache.get_encoded(row, path) is None


def test_decode_failures_recorded_as_in_the_raw_format(tmp_path: Path) -> None:
    """An undecodable source is recorded with its reason, not retried while unchanged (nor after
    a format change), and retried once it changed."""
    root = tmp_path / "root"
    good = bc.write_image(root / "good.png", 12, 10)
    bad = bc.write_truncated_png(root / "bad.png")
    records = [SampleRecord("good.png", str(good), ("a",), ("",), 0), SampleRecord("bad.png", str(bad), ("a",), ("",), 0)]
    out = tmp_path / "cache"
    first = prepare_cache(records, out, PARAMS, cache_format="jpeg")
    assert first["failed_samples"] == {"bad.png": "image_undecodable"} and first["decoded"] == 1
    assert PreparedCache(out, PARAMS).failures == {"bad.png": "image_undecodable"}
    second = prepare_cache(records, out, PARAMS, cache_format="jpeg")
    assert second["decoded"] == 0 and second["reused"] == 1 and second["failed"] == {"image_undecodable": 1}
    rebuilt = prepare_cache(records, out, PARAMS, cache_format="jpeg", quality=75)
    assert rebuilt["decoded"] == 1 and rebuilt["failed"] == {"image_undecodable": 1}
    bc.write_image(root / "bad.png", 12, 10, seed=5)
    os.utime(root / "bad.png", ns=(1, 1))
    third = prepare_cache(records, out, PARAMS, cache_format="jpeg", quality=75)
    assert third["decoded"] == 1 and third["failed"] == {} and PreparedCache(out, PARAMS).failures == {}


@pytest.mark.parametrize("decoder", cache_codec.DECODERS)
def test_dataset_samples_are_the_decoded_stored_bytes(built: tuple[list[SampleRecord], Path, Path], decoder: str) -> None:
    """Each worker decoder gives the samples the stored bytes decode to (flipped where the sample
    flips), the same tags and boxes as the raw cache's samples, and a (3, S, S) uint8 image."""
    if decoder not in cache_codec.available_decoders():
        pytest.skip(f"{decoder} is not installed (optional: requirements-fast.txt)")
    records, raw_dir, jpeg_dir = built
    cache = PreparedCache(jpeg_dir, PARAMS, decoder=decoder)
    aug = AugmentParams(flip_prob=0.5, brightness=0.2)
    dataset = SidecarJsonDataset(records, T2I, PARAMS, augment=aug, orientation=small_orientation_handler(), cache=cache)
    raw = SidecarJsonDataset(records, T2I, PARAMS, augment=aug, orientation=small_orientation_handler(), cache=PreparedCache(raw_dir, PARAMS))
    blobs = stored_jpegs(cache, records)
    flips = 0
    for key in [(i, e) for i in range(len(records)) for e in range(3)]:
        sample, reference = dataset[key], raw[key]
        expected = torch.from_numpy(pillow_decode(blobs[key[0]])).permute(2, 0, 1)  # (3, S, S)
        if sample["flip"] == 1:
            expected = expected.flip(-1)
            flips += 1
        assert sample["image"].dtype == torch.uint8 and tuple(sample["image"].shape) == (3, SIZE, SIZE)
        assert (sample["image"].int() - expected.int()).abs().max() <= DECODER_ATOL
        assert torch.equal(sample["tag_indices"], reference["tag_indices"])
        assert (sample["flip"], sample["box"], sample["jitter"]) == (reference["flip"], reference["box"], reference["jitter"])
    assert cache.active_decoder() == decoder and dataset.cache_hits == 3 * len(records) and flips > 0


def _fetch(samples: list[dict], device: str = "cpu") -> dict:
    """Collate `samples` and convert them as the training loop does."""
    return next(iter(ImagePreFetcher([collate_samples(samples)], device, PARAMS, num_tags=len(T2I))))


def test_decode_on_device_batch_equals_the_worker_batch(tmp_path: Path, built: tuple[list[SampleRecord], Path, Path]) -> None:
    """decode_on_device: workers hand over bytes; ImagePreFetcher decodes on the device (the CPU
    here: the CUDA code path), flips the flipped samples, and merges samples the cache does not
    hold (decoded in the worker); the batch equals the worker-decoded one."""
    records, _raw_dir, jpeg_dir = built
    # one sample the cache does not hold: its source is new (mixed batch)
    extra = drawing(tmp_path / "extra.png", 70, 90, seed=42)
    mixed = [*records, SampleRecord("extra.png", str(extra), ("looking_to_the_left",), ("",), 1)]
    aug = AugmentParams(flip_prob=0.5, brightness=0.2, contrast=0.1)
    on_device = SidecarJsonDataset(
        mixed, T2I, PARAMS, augment=aug, orientation=small_orientation_handler(), cache=PreparedCache(jpeg_dir, PARAMS, decode_on_device=True)
    )
    in_worker = SidecarJsonDataset(mixed, T2I, PARAMS, augment=aug, orientation=small_orientation_handler(), cache=PreparedCache(jpeg_dir, PARAMS))
    for epoch in range(3):
        keys = [(i, epoch) for i in range(len(mixed))]
        samples = [on_device[k] for k in keys]
        assert all("encoded" in s for s in samples[:-1]) and "image" in samples[-1] and "encoded" not in samples[-1]
        collated = collate_samples(samples)
        assert tuple(collated["images"].shape) == (1, 3, SIZE, SIZE) and collated["image_rows"].tolist() == [len(mixed) - 1]
        assert collated["encoded_rows"].tolist() == list(range(len(records)))
        ours, theirs = _fetch(samples), _fetch([in_worker[k] for k in keys])
        assert ours["images"].shape == theirs["images"].shape == (len(mixed), 3, SIZE, SIZE)
        # normalised images: a grey level is 2/255; colour jitter (contrast, brightness) scales it by < 2
        assert (ours["images"] - theirs["images"]).abs().max() <= 2 * DECODER_ATOL * 2 / 255
        assert torch.equal(ours["tag_targets"], theirs["tag_targets"]) and torch.equal(ours["flip"], theirs["flip"])
    assert bool((ours["flip"] == 1).any())  # flipped samples were compared
    # every sample encoded (no pixels from workers), and a batch with none encoded
    only_encoded = [on_device[(i, 1)] for i in range(len(records))]
    assert _fetch(only_encoded)["images"].shape == (len(records), 3, SIZE, SIZE)
    assert torch.equal(_fetch(only_encoded)["images"], _fetch([in_worker[(i, 1)] for i in range(len(records))])["images"])
    assert "encoded" not in collate_samples([in_worker[(0, 0)]])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_decode_on_device_on_cuda_is_close_to_the_worker_batch(built: tuple[list[SampleRecord], Path, Path]) -> None:
    """On CUDA (nvJPEG, on ImagePreFetcher's side stream) the batch matches the CPU-decoded one.
    nvJPEG's IDCT and upsampling may differ from libjpeg-turbo's by a few grey levels; the bound
    (8 levels, mean under 1) is not yet measured on a GPU."""
    records, _raw_dir, jpeg_dir = built
    aug = AugmentParams(flip_prob=0.5)
    on_device = SidecarJsonDataset(
        records, T2I, PARAMS, augment=aug, orientation=small_orientation_handler(), cache=PreparedCache(jpeg_dir, PARAMS, decode_on_device=True)
    )
    in_worker = SidecarJsonDataset(records, T2I, PARAMS, augment=aug, orientation=small_orientation_handler(), cache=PreparedCache(jpeg_dir, PARAMS))
    keys = [(i, 1) for i in range(len(records))]
    gpu = _fetch([on_device[k] for k in keys], "cuda")
    torch.cuda.synchronize()
    cpu = _fetch([in_worker[k] for k in keys])
    difference = (gpu["images"].cpu() - cpu["images"]).abs() * 255 / 2  # in grey levels
    assert gpu["images"].is_cuda and float(difference.max()) <= 8.01 and float(difference.mean()) < 1.0


def test_decode_on_device_is_ignored_for_raw_caches(built: tuple[list[SampleRecord], Path, Path]) -> None:
    """A raw cache has no bytes to hand over: decode_on_device has no effect on it."""
    records, raw_dir, _jpeg_dir = built
    cache = PreparedCache(raw_dir, PARAMS, decode_on_device=True)
    assert cache.decode_on_device is False
    assert "image" in SidecarJsonDataset(records, T2I, PARAMS, cache=cache)[0]
    with pytest.raises(ValueError, match="not jpeg"):
        cache.get_encoded(0, records[0].image_path)


def test_cache_pickles_for_spawned_workers(built: tuple[list[SampleRecord], Path, Path]) -> None:
    """PreparedCache crosses into spawned workers (Windows): it pickles after use without its open
    memory maps or its resolved decoder, and the copy reads the same pixels and bytes."""
    records, _raw_dir, jpeg_dir = built
    for decode_on_device in (False, True):
        cache = PreparedCache(jpeg_dir, PARAMS, decode_on_device=decode_on_device)
        dataset = SidecarJsonDataset(records, T2I, PARAMS, cache=cache)
        first = dataset[0]
        assert cache._maps  # a memory map is open: pickling must leave it behind
        clone = pickle.loads(pickle.dumps(dataset))
        assert clone.cache is not None and clone.cache._maps == {} and clone.cache._active_decoder is None
        again = clone[0]
        key = "encoded" if decode_on_device else "image"
        assert torch.equal(again[key], first[key]) and clone.cache.decode_on_device is decode_on_device


def test_worker_decoder_falls_back_when_the_optional_one_is_missing(monkeypatch: pytest.MonkeyPatch) -> None:
    """Without simplejpeg (optional: requirements-fast.txt) the worker uses torchvision, then Pillow;
    all of them decode to the same pixels."""
    image = np.asarray(Image.new("RGB", (16, 8), (200, 30, 60)))
    blob = np.frombuffer(cache_codec.encode_jpeg(np.ascontiguousarray(image), 90), dtype=np.uint8)
    decoded = {name: cache_codec.decode_jpeg_chw(blob, name) for name in cache_codec.available_decoders()}
    assert "pillow" in decoded and "torchvision" in decoded
    assert all(torch.equal(d, decoded["pillow"]) for d in decoded.values())
    monkeypatch.setattr(cache_codec, "_probed", {"simplejpeg": False})
    assert cache_codec.worker_decoder() == "torchvision" and cache_codec.worker_decoder("simplejpeg") == "torchvision"
    monkeypatch.setattr(cache_codec, "_probed", {"simplejpeg": False, "torchvision": False})
    assert cache_codec.worker_decoder() == "pillow"
    with pytest.raises(ValueError, match="unknown JPEG decoder"):
        cache_codec.worker_decoder("nvjpeg")
    with pytest.raises(OSError, match="JPEG decode failed"):
        cache_codec.decode_jpeg_chw(blob[: len(blob) // 2], "torchvision")


def test_config_keys_and_their_ranges(tmp_path: Path) -> None:
    """data.cache_format, data.cache_quality and data.decode_on_device load with their checks."""
    config = tmp_path / "c.yaml"
    config.write_text("data:\n  cache_format: jpeg\n  cache_quality: 85\n  decode_on_device: true\n", encoding="utf-8")
    data = load_config(config).data
    assert (data.cache_format, data.cache_quality, data.decode_on_device) == ("jpeg", 85, True)
    for bad in ("cache_format: png", "cache_quality: 49", "cache_quality: 101"):
        config.write_text(f"data:\n  {bad}\n", encoding="utf-8")
        with pytest.raises(ConfigError, match=bad.split(":")[0]):
            load_config(config)


@pytest.mark.e2e
def test_demo_trains_from_a_jpeg_cache_decoded_on_device(tmp_path: Path, demo_data: Path) -> None:
    """The demo command trains from a jpeg cache (built by the prepare CLI, then used with
    decode_on_device on the CPU) and ends with a validation mAP; the dataset is left untouched."""
    from conftest import TINY_RUN, read_jsonl, run_cli

    cache = tmp_path / "cache"
    prep = run_cli(
        [str(_REPO / "prepared_cache.py"), "prepare", "--data", str(demo_data), "--image-size", "32", "--out", str(cache), "--workers", "0"]
        + ["--format", "jpeg", "--quality", "90"],
        cwd=tmp_path,
    )
    assert prep.returncode == 0, prep.stderr[-3000:]
    assert json.loads(prep.stdout)["codec"]["format"] == "jpeg"
    args = [str(_REPO / "train_direct.py"), "--config", str(_REPO / "configs" / "demo.yaml")]
    overrides = TINY_RUN + [f"data.root={demo_data}", "output_root=runs", "experiment_name=jpeg", f"data.cache_dir={cache}"]
    for o in overrides + ["data.cache_format=jpeg", "data.decode_on_device=true", "training.epochs=2"]:
        args += ["--set", o]
    proc = run_cli(args, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "(jpeg q90," in proc.stdout and "reused" in proc.stdout
    events = read_jsonl(tmp_path / "runs" / "jpeg" / "metrics.jsonl")
    maps = [e["mAP"] for e in events if e["type"] == "val"]
    assert maps and all(0.0 < m <= 1.0 for m in maps)


@pytest.mark.e2e
def test_bench_cache_reports_every_format_and_decoder(tmp_path: Path) -> None:
    """benchmarks/bench_cache.py (tiny run) prints, per content kind, the codec table and each cache
    format's bytes, worker rates per decoder and error against raw."""
    from conftest import run_cli

    out = tmp_path / "bench.json"
    args = [str(_REPO / "benchmarks" / "bench_cache.py"), "--images", "2", "--image-size", "32", "--qualities", "90", "--seconds", "0.01"]
    proc = run_cli(args + ["--rounds", "1", "--json-out", str(out)], cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(out.read_text(encoding="utf-8"))
    assert report == json.loads(proc.stdout)
    for kind in ("demo", "anime"):
        codec, pipeline = report["kinds"][kind]["codec"], report["kinds"][kind]["pipeline"]
        assert set(codec) == {"q90_4:2:0", "q90_4:4:4"} and "pillow" in codec["q90_4:2:0"]["decoders"]
        assert pipeline["raw"]["bytes_per_image"] == 32 * 32 * 3 > pipeline["jpeg_q90"]["bytes_per_image"] > 0
        assert set(pipeline["jpeg_q90"]["worker_images_per_s"]) == set(report["config"]["worker_decoder_order"])
        assert pipeline["jpeg_q90"]["mean_abs_error"] > 0 and pipeline["jpeg_q90"]["decode_on_device_cpu"]["device_images_per_s"] > 0
