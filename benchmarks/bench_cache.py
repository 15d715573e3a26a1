"""Benchmark the prepared cache's formats: raw uint8 vs JPEG at several qualities, per decoder.

Two content kinds, letterboxed to --image-size by the project's own preprocessing:

* ``demo``: the demo generator's images (``demo_dataset.render_sample``), rendered natively at
  the benchmark size (the 64 px demo files upscaled would be far smoother than real data);
* ``anime``: synthetic illustrations closer to booru images: flat colour regions with sharp dark
  outlines and cel shading, thin hair-like strands, eyes with highlights, a screentone band, a
  soft light gradient and paper grain, saved as quality-92 JPEG sources of ~1.3 MP.

For each kind it prints (one JSON object, also to ``--json-out``):

* ``codec``: per quality x chroma subsampling (4:2:0, 4:4:4): bytes per image, max/mean absolute
  pixel error against the raw pixels, and decode-only images/s in this process (one thread) per
  decoder: Pillow, torchvision.io.decode_jpeg, simplejpeg (also with its fastdct/fastupsample
  flags) and PyTurboJPEG (plain and TJFLAG_FASTDCT|TJFLAG_FASTUPSAMPLE) when importable (give
  PyTurboJPEG's library with --turbojpeg-lib; it needs the system libturbojpeg);
* ``pipeline``: per cache format (raw, jpeg at each --qualities): the cache's bytes per image,
  what one DataLoader worker delivers (SidecarJsonDataset.__getitem__ with flips + collate, one
  thread) per decoder, the pixel error of the samples against the raw cache's, and for jpeg the
  decode_on_device path on the CPU (worker hand-over of bytes + ImagePreFetcher's batch decode).

Example: python benchmarks/bench_cache.py --images 32 --image-size 448 --qualities 85 90 95
"""

from __future__ import annotations

import argparse
import io
import json
import math
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import numpy as np
import torch
from PIL import Image, ImageDraw

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    # run as a script, sys.path[0] is benchmarks/; the project modules live one level up
    sys.path.insert(0, str(REPO_ROOT))

from augmentation import AugmentParams  # noqa: E402
from batching import ImagePreFetcher, SidecarJsonDataset, collate_samples  # noqa: E402
from cache_codec import available_decoders, decode_jpeg_chw, encode_jpeg  # noqa: E402
from dataset_scan import scan_dataset  # noqa: E402
from demo_dataset import describe_sample, render_sample  # noqa: E402
from image_preprocess import PreprocessParams  # noqa: E402
from orientation_handler import OrientationHandler  # noqa: E402
from prepared_cache import PreparedCache, prepare_cache  # noqa: E402

KINDS = ("demo", "anime")


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    """Parse the CLI (see the module docstring)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=32, help="images per content kind")
    parser.add_argument("--image-size", type=int, default=448)
    parser.add_argument("--qualities", type=int, nargs="+", default=[85, 90, 95], help="JPEG qualities to measure")
    parser.add_argument("--kinds", nargs="+", choices=KINDS, default=list(KINDS))
    parser.add_argument("--batch-size", type=int, default=16, help="samples per collated batch in the pipeline timing")
    parser.add_argument("--seconds", type=float, default=0.4, help="minimum time per timed round")
    parser.add_argument("--rounds", type=int, default=3, help="alternating rounds per variant; the best is kept")
    parser.add_argument("--turbojpeg-lib", default=os.environ.get("TURBOJPEG_LIB", ""), help="libturbojpeg for PyTurboJPEG ('' = its own search)")
    parser.add_argument("--data-dir", default=None, help="where to generate data (default: a temp dir)")
    parser.add_argument("--json-out", default=None)
    return parser.parse_args(argv)


# --------------------------------------------------------------------------------------------
# Content
# --------------------------------------------------------------------------------------------


def _colour(rng: np.random.Generator, dark: bool = False) -> tuple[int, int, int]:
    """A random RGB colour: saturated-ish, or a near-black line colour."""
    low, high = (0, 60) if dark else (40, 256)
    return tuple(int(v) for v in rng.integers(low, high, 3))  # type: ignore[return-value]


def anime_like(seed: int, width: int = 960, height: int = 1360) -> Image.Image:
    """A synthetic anime-style illustration: outlined flat regions, cel shading, strands, grain."""
    rng = np.random.default_rng(seed)
    t = np.linspace(0.0, 1.0, height, dtype=np.float32)[:, None, None]  # (H, 1, 1)
    top, bottom = np.asarray(_colour(rng), np.float32), np.asarray(_colour(rng), np.float32)
    sky = (top * (1 - t) + bottom * t) * np.ones((1, width, 1), np.float32)  # (H, W, 3) vertical gradient
    img = Image.fromarray(sky.astype(np.uint8))
    draw = ImageDraw.Draw(img)
    line = _colour(rng, dark=True)
    for _ in range(int(rng.integers(18, 30))):  # flat colour regions, dark outline, a shaded inner part
        cx, cy, r = rng.uniform(0, width), rng.uniform(0, height), rng.uniform(40, 260)
        angles = np.sort(rng.uniform(0, 2 * math.pi, int(rng.integers(5, 12))))
        radii = r * rng.uniform(0.6, 1.0, len(angles))
        points = [(float(cx + a * math.cos(b)), float(cy + a * math.sin(b))) for a, b in zip(radii, angles)]
        fill = _colour(rng)
        draw.polygon(points, fill=fill, outline=line, width=int(rng.integers(3, 7)))
        shade = tuple(int(v * 0.75) for v in fill)
        draw.polygon([(cx + (x - cx) * 0.6 + r * 0.15, cy + (y - cy) * 0.6 + r * 0.1) for x, y in points], fill=shade)
    for _ in range(int(rng.integers(60, 120))):  # hair-like strands
        x, y, heading = rng.uniform(0, width), rng.uniform(0, height * 0.7), rng.uniform(0.3, 2.8)
        strand = []
        for _step in range(12):
            strand.append((float(x), float(y)))
            heading += rng.normal(0, 0.15)
            x, y = x + 18 * math.cos(heading), y + 18 * math.sin(heading)
        draw.line(strand, fill=line, width=int(rng.integers(1, 4)))
    for _ in range(4):  # eyes: outlined ellipses, dark iris, white highlight
        cx, cy = rng.uniform(100, width - 100), rng.uniform(100, height - 100)
        draw.ellipse((cx - 40, cy - 55, cx + 40, cy + 55), fill=_colour(rng), outline=line, width=4)
        draw.ellipse((cx - 22, cy - 30, cx + 22, cy + 30), fill=_colour(rng, dark=True))
        draw.ellipse((cx - 12, cy - 25, cx + 2, cy - 8), fill=(255, 255, 255))
    pixels = np.asarray(img, dtype=np.float32).copy()  # (H, W, 3)
    y0 = int(rng.integers(0, height - 300))  # a screentone band
    yy, xx = np.mgrid[y0 : y0 + 300, 0:width]
    dots = ((np.sin(xx * 0.9) + np.sin(yy * 0.9)) > 1.2)[..., None]  # (300, W, 1)
    pixels[y0 : y0 + 300] = np.where(dots, pixels[y0 : y0 + 300] * 0.6, pixels[y0 : y0 + 300])
    ly, lx = rng.uniform(0, height), rng.uniform(0, width)
    yy, xx = np.mgrid[0:height, 0:width]
    light = np.exp(-((yy - ly) ** 2 + (xx - lx) ** 2) / (2 * (0.35 * width) ** 2))[..., None]  # (H, W, 1)
    pixels = pixels * (0.85 + 0.3 * light) + rng.normal(0, 4.0, (height, width, 1))  # soft light, paper grain
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))


def generate(root: Path, kind: str, count: int, image_size: int) -> Path:
    """Write `count` source images of `kind` with sidecars under root/kind; returns the folder."""
    folder = root / kind
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(count):
        if kind == "demo":
            spec = describe_sample(i, 0, image_size)
            image = render_sample(spec, image_size, 0).convert("RGB")
            path = folder / f"{kind}_{i:04d}.png"
            image.save(path)
        else:
            # a few aspect ratios, so letterbox bands (flat pad colour) take their usual share
            path = folder / f"{kind}_{i:04d}.jpg"
            anime_like(i, 960 + 40 * (i % 5), 1360 - 60 * (i % 3)).save(path, quality=92)
        tags = ["tag_a", "looking_to_the_left" if i % 2 else "smile"]
        (folder / f"{path.name}.json").write_text(json.dumps({"tags": tags, "rating": "g"}), encoding="utf-8")
    return folder


# --------------------------------------------------------------------------------------------
# Timing
# --------------------------------------------------------------------------------------------


def rate(fn: Callable[[], int], seconds: float) -> float:
    """Images per second of fn() (which returns how many images it handled) over >= `seconds`."""
    fn()  # warm-up: first-use imports, memory maps
    done, started = 0, time.perf_counter()
    while True:
        done += fn()
        elapsed = time.perf_counter() - started
        if elapsed >= seconds:
            return done / elapsed


def best_rates(variants: dict[str, Callable[[], int]], seconds: float, rounds: int) -> dict[str, float]:
    """Each variant's best rate over `rounds` rounds, the variants alternating (a noisy moment on a
    shared machine then hits them alike)."""
    best: dict[str, float] = {}
    for _ in range(rounds):
        for name, fn in variants.items():
            best[name] = max(best.get(name, 0.0), rate(fn, seconds))
    return {name: round(value, 1) for name, value in best.items()}


def errors(images: Sequence[np.ndarray], reference: Sequence[np.ndarray]) -> dict[str, float]:
    """Max and mean absolute pixel difference of two lists of equally shaped uint8 arrays."""
    diffs = [np.abs(a.astype(np.int16) - b.astype(np.int16)) for a, b in zip(images, reference)]
    return {"max_abs_error": int(max(int(d.max()) for d in diffs)), "mean_abs_error": round(float(np.mean([d.mean() for d in diffs])), 3)}


# --------------------------------------------------------------------------------------------
# Decoders (codec level, including the optional ones and their speed flags)
# --------------------------------------------------------------------------------------------


def codec_decoders(turbojpeg_lib: str) -> dict[str, Callable[[bytes], np.ndarray]]:
    """name -> decode(bytes) -> (H, W, 3) uint8, for every decoder importable here."""
    decoders: dict[str, Callable[[bytes], np.ndarray]] = {}
    for name in available_decoders():
        decoders[name] = lambda data, n=name: decode_jpeg_chw(np.frombuffer(data, np.uint8), n).permute(1, 2, 0).numpy()
    if "simplejpeg" in decoders:
        import simplejpeg

        decoders["simplejpeg_fastdct_fastupsample"] = lambda data: simplejpeg.decode_jpeg(data, "RGB", fastdct=True, fastupsample=True)
    try:
        from turbojpeg import TJFLAG_FASTDCT, TJFLAG_FASTUPSAMPLE, TJPF_RGB, TurboJPEG

        turbo = TurboJPEG(turbojpeg_lib or None)
    except (ImportError, OSError, RuntimeError):  # not installed, or no (compatible) libturbojpeg
        return decoders
    decoders["pyturbojpeg"] = lambda data: turbo.decode(data, pixel_format=TJPF_RGB)
    decoders["pyturbojpeg_fastdct_fastupsample"] = lambda data: turbo.decode(data, pixel_format=TJPF_RGB, flags=TJFLAG_FASTDCT | TJFLAG_FASTUPSAMPLE)
    return decoders


def codec_report(
    raw: list[np.ndarray], qualities: Sequence[int], decoders: dict[str, Callable[[bytes], np.ndarray]], args: argparse.Namespace
) -> dict[str, Any]:
    """Bytes, error and decode-only rate per quality x subsampling x decoder."""
    out: dict[str, Any] = {}
    for quality in qualities:
        for subsampling in ("4:2:0", "4:4:4"):
            blobs = [encode_jpeg(image, quality, subsampling) for image in raw]
            row: dict[str, Any] = {"bytes_per_image": round(float(np.mean([len(b) for b in blobs]))), "decoders": {}}

            def loop(decode: Callable[[bytes], np.ndarray], blobs: list[bytes] = blobs) -> int:
                """Decode every blob once."""
                for blob in blobs:
                    decode(blob)
                return len(blobs)

            speeds = best_rates({name: (lambda d=decode: loop(d)) for name, decode in decoders.items()}, args.seconds, args.rounds)
            reference = [np.asarray(Image.open(io.BytesIO(b)).convert("RGB")) for b in blobs]  # Pillow
            for name, decode in decoders.items():
                pixels = [np.ascontiguousarray(decode(b)) for b in blobs]
                row["decoders"][name] = {
                    "images_per_s": speeds[name],
                    **errors(pixels, raw),
                    "max_abs_diff_vs_pillow": errors(pixels, reference)["max_abs_error"],
                }
            out[f"q{quality}_{subsampling}"] = row
    return out


# --------------------------------------------------------------------------------------------
# Pipeline (what a worker delivers from each cache format)
# --------------------------------------------------------------------------------------------


def pipeline_report(folder: Path, cache_root: Path, args: argparse.Namespace) -> dict[str, Any]:
    """Per cache format: bytes per image, worker images/s per decoder, error vs the raw cache."""
    scan = scan_dataset(folder, verify="header")
    if len(scan.records) != args.images:
        raise RuntimeError(f"scan kept {len(scan.records)} of {args.images} images: {scan.skipped}")
    params = PreprocessParams(args.image_size)
    t2i = {"tag_a": 0, "smile": 1, "looking_to_the_left": 2, "looking_to_the_right": 3}
    aug = AugmentParams(flip_prob=0.5)  # flips on, as in training (jitter is applied on the device)
    orientation = OrientationHandler.default()
    n = len(scan.records)
    batches = [list(range(i, min(n, i + args.batch_size))) for i in range(0, n, args.batch_size)]
    out: dict[str, Any] = {}
    raw_pixels: list[np.ndarray] = []
    for cache_format, quality in [("raw", 0), *[("jpeg", q) for q in args.qualities]]:
        name = "raw" if cache_format == "raw" else f"jpeg_q{quality}"
        target = cache_root / f"{folder.name}_{name}"
        started = time.perf_counter()
        report = prepare_cache(scan.records, target, params, cache_format=cache_format, quality=quality or 90)
        row: dict[str, Any] = {
            "bytes_per_image": report["bytes_per_image"],
            "build_images_per_s": round(n / (time.perf_counter() - started), 1),
            "worker_images_per_s": {},
        }
        decoders = ["none"] if cache_format == "raw" else available_decoders()
        datasets = {}
        for decoder in decoders:
            cache = PreparedCache(target, params, decoder=None if decoder == "none" else decoder)
            datasets[decoder] = SidecarJsonDataset(scan.records, t2i, params, augment=aug, orientation=orientation, cache=cache)

        def worker(dataset: SidecarJsonDataset) -> int:
            """One pass of a worker's work: every batch's samples (flips included), collated."""
            for keys in batches:
                collate_samples([dataset[(i, 1)] for i in keys])
            return n

        row["worker_images_per_s"] = best_rates({d: (lambda ds=ds: worker(ds)) for d, ds in datasets.items()}, args.seconds, args.rounds)
        # the pixels a sample carries, unaugmented, with the worker's first-choice decoder
        plain = SidecarJsonDataset(scan.records, t2i, params, cache=datasets[decoders[0]].cache)
        pixels = [plain[i]["image"].permute(1, 2, 0).numpy() for i in range(n)]
        if cache_format == "raw":
            raw_pixels = pixels
        else:
            row.update(errors(pixels, raw_pixels))
            row["decode_on_device_cpu"] = device_report(scan.records, t2i, params, aug, orientation, target, batches, args)
        out[name] = row
    return out


def device_report(
    records: Any,
    t2i: dict[str, int],
    params: PreprocessParams,
    aug: AugmentParams,
    orientation: OrientationHandler,
    target: Path,
    batches: list[list[int]],
    args: argparse.Namespace,
) -> dict[str, float]:
    """decode_on_device with device="cpu": the worker's share (bytes out) and the device's (batch
    decode, flips, normalisation; colour jitter off, it costs the same from either format)."""
    aug = AugmentParams(flip_prob=aug.flip_prob, brightness=0.0, contrast=0.0, saturation=0.0)
    dataset = SidecarJsonDataset(
        records, t2i, params, augment=aug, orientation=orientation, cache=PreparedCache(target, params, decode_on_device=True)
    )
    collated = [collate_samples([dataset[(i, 1)] for i in keys]) for keys in batches]
    fetcher = ImagePreFetcher(collated, "cpu", params, num_tags=len(t2i))

    def worker() -> int:
        """A worker's share: read the bytes, decide flips, collate."""
        for keys in batches:
            collate_samples([dataset[(i, 1)] for i in keys])
        return len(dataset)

    def device() -> int:
        """The device's share on the CPU (one thread): batch decode, flips, normalisation."""
        for batch in fetcher:
            del batch
        return len(dataset)

    speeds = best_rates({"worker": worker, "device_cpu_one_thread": device}, args.seconds, args.rounds)
    return {"worker_images_per_s": speeds["worker"], "device_images_per_s": speeds["device_cpu_one_thread"]}


def run(args: argparse.Namespace, root: Path) -> dict[str, Any]:
    """Generate the content, measure every variant, return the report."""
    torch.set_num_threads(1)  # one worker's view: a single compute thread
    decoders = codec_decoders(args.turbojpeg_lib)
    report: dict[str, Any] = {
        "config": {
            "images": args.images,
            "image_size": args.image_size,
            "qualities": list(args.qualities),
            "cpu_count": os.cpu_count(),
            "decoders": list(decoders),
            "worker_decoder_order": available_decoders(),
            "torch": torch.__version__,
        },
        "kinds": {},
    }
    params = PreprocessParams(args.image_size)
    for kind in args.kinds:
        folder = generate(root / "data", kind, args.images, args.image_size)
        raw_cache = root / "cache" / f"{kind}_codec_raw"
        scan = scan_dataset(folder, verify="header")
        prepare_cache(scan.records, raw_cache, params)
        cache = PreparedCache(raw_cache, params)
        raw = [cache.get(r, rec.image_path)[0] for r, rec in zip(cache.rows_for([x.sample_id for x in scan.records]), scan.records)]  # type: ignore[index]
        report["kinds"][kind] = {
            "codec": codec_report(raw, args.qualities, decoders, args),
            "pipeline": pipeline_report(folder, root / "cache", args),
        }
    return report


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point: print the JSON report."""
    args = parse_args(argv)
    if args.data_dir:
        root = Path(args.data_dir)
        root.mkdir(parents=True, exist_ok=True)
        report = run(args, root)
    else:
        with tempfile.TemporaryDirectory() as tmp:
            report = run(args, Path(tmp))
    text = json.dumps(report, indent=2)
    print(text)
    if args.json_out:
        Path(args.json_out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json_out).write_text(text + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
