"""Benchmark sharded datasets (litdata chunks + tag index) against the JPEG folder and the prepared cache.

On the images the other benchmarks generate (their generators, imported), it prints one JSON object
(also to ``--json-out``):

* ``loader`` (a): the training dataset as train_direct builds it (``data_setup.prepare_data``: the
  ``SidecarJsonDataset`` of the training split, with the run's flips and colour-jitter draws) over
  ``--images`` ~1.5 MP JPEGs (``bench_dataloader.generate``), read from the JPEG folder, from the
  prepared cache (raw, and jpeg at the default quality), and from shards (the bytes as they came,
  and re-encoded by the prepare with ``--shard-image-size``; ``prepare_s``: each one's prepare, for a
  cache the scan and the build inside ``prepare_data``): images/s in one process with one
  thread (what one loader worker does; ``--rounds`` alternating rounds, the best kept), and through
  ``build_dataloader`` with ``--loader-workers`` workers (``bench_dataloader.loader_rate``: images/s
  and images/s per worker);
* ``bytes`` (c): bytes per image on disk of each of those formats (apparent and allocated; the
  folder's sidecars and the shards' tag index included);
* ``start`` (b): ``train_direct.py`` from launch to its first optimizer step (a tiny model, so the
  figures are the data start-up; ``bench_scale.time_to_first_step``: wall time, CPU seconds, every
  process's peak memory by role) over ``--samples`` generated pairs (``bench_scale.generate``, in
  bench_scale's ``--work`` folder, so both benchmarks read the same images): from the folder, cold
  (no run folder, no scan index) and resumed, as bench_scale measures them, and from shards
  prepared from that folder (its tag index is the scan: no folder walk), cold and resumed; the
  prepare's own time, and the chunks' and tag index's bytes per sample.

Example: python benchmarks/bench_shards.py --images 64 --samples 300000 --json-out /tmp/shards.json
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any, Optional, Sequence

import torch

BENCH_DIR = Path(__file__).resolve().parent
REPO_ROOT = BENCH_DIR.parent
for _path in (REPO_ROOT, BENCH_DIR):  # the project's modules, and the sibling benchmarks whose generators are reused
    if str(_path) not in sys.path:
        sys.path.insert(0, str(_path))

import bench_dataloader  # noqa: E402
import bench_scale  # noqa: E402

from Configuration_System import load_config  # noqa: E402
from data_setup import prepare_data  # noqa: E402
from shard_format import SHARD_INDEX_FILE, is_shard_dataset  # noqa: E402
from shard_prepare import prepare_shards  # noqa: E402

PHASES = ("loader", "start")


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    """Parse the CLI (see the module docstring)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=64, help="(a, c) generated JPEGs")
    parser.add_argument("--width", type=int, default=1414)
    parser.add_argument("--height", type=int, default=1061)
    parser.add_argument("--image-size", type=int, default=448, help="(a) the training image size")
    parser.add_argument("--shard-image-size", type=int, default=768, help="(a) the re-encoded shards' long side (prepare --image-size)")
    parser.add_argument("--shard-quality", type=int, default=95, help="(a) the re-encoded shards' JPEG quality (prepare --quality)")
    parser.add_argument("--prepare-workers", type=int, default=0, help="processes of each shard prepare (0: one a usable core, as the CLI)")
    parser.add_argument("--repeat", type=int, default=1, help="(a) passes over the images a timed round")
    parser.add_argument("--rounds", type=int, default=3, help="(a) alternating rounds; the best of each variant is kept")
    parser.add_argument("--loader-workers", type=int, default=1, help="(a) DataLoader workers (0: no DataLoader timing)")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--loader-passes", type=int, default=4, help="(a) passes over the data a DataLoader timing")
    parser.add_argument("--samples", type=int, default=20_000, help="(b) generated samples")
    parser.add_argument("--work", type=Path, default=Path("/tmp/oppai_bench_scale"), help="(b) bench_scale's work folder: the same generated data")
    parser.add_argument("--loader-dir", type=Path, default=Path("/tmp/oppai_bench_shards"), help="(a) where its images, caches and shards go")
    parser.add_argument("--skip", default="", help=f"comma list of phases to skip: {','.join(PHASES)}")
    parser.add_argument("--skip-folder-start", action="store_true", help="(b) time the shards' starts only (the folder's are in BENCHMARKS.md)")
    parser.add_argument("--timeout", type=float, default=1800.0, help="(b) seconds a start may take")
    parser.add_argument("--json-out", type=Path)
    args = parser.parse_args(argv)
    unknown = set(filter(None, args.skip.split(","))) - set(PHASES)
    if unknown:
        parser.error(f"--skip: unknown phase(s) {', '.join(sorted(unknown))}; choose from {', '.join(PHASES)}")
    return args


def disk_bytes(path: Path, names: Sequence[str] | None = None) -> dict[str, int]:
    """Apparent and allocated bytes of the files under `path` (or only of its `names`); a file
    hard-linked more than once is counted once allocated."""
    files = [path / n for n in names] if names is not None else [p for p in path.rglob("*") if p.is_file()]
    apparent, allocated, seen = 0, 0, set()
    for file in files:
        st = file.stat()
        apparent += st.st_size
        if (st.st_dev, st.st_ino) not in seen:
            seen.add((st.st_dev, st.st_ino))
            allocated += getattr(st, "st_blocks", (st.st_size + 4095) // 4096 * 8) * 512
    return {"apparent": apparent, "allocated": allocated}


def per_image(total: dict[str, int], count: int) -> dict[str, float]:
    """Bytes per image of a disk_bytes total."""
    return {k: round(v / count, 1) for k, v in total.items()}


def _loader_config(base: Path, root: Path, image_size: int, images: int, cache: str = "") -> Any:
    """The run config of a loader variant: `root` as data.root, the prepared cache in `cache` (raw|jpeg);
    a validation share that leaves a few of `images` out (the split needs one)."""
    overrides = [
        f"data.root={root}",
        f"output_root={base / 'runs'}",
        f"data.scan_index_dir={base / 'scan_index'}",
        f"data.image_size={image_size}",
        f"data.val_fraction={min(0.5, max(0.05, 3 / images)):.3f}",
        "data.min_tag_frequency=1",
        "data.num_workers=0",
    ]
    if cache:
        overrides += [f"data.cache_dir={base / f'cache_{cache}'}", f"data.cache_format={cache}"]
    return load_config(None, overrides=overrides)


def loader(args: argparse.Namespace) -> dict[str, Any]:
    """(a) and (c): each format's training dataset in one process and through the DataLoader, and its bytes."""
    base = args.loader_dir / f"{args.images}_{args.width}x{args.height}"
    shutil.rmtree(base, ignore_errors=True)
    bench_dataloader.generate(base, args.images, args.width, args.height)
    folder = base / "data"
    shards = {"shards": (base / "shards", 0), f"shards_{args.shard_image_size}": (base / f"shards_{args.shard_image_size}", args.shard_image_size)}
    prepare_s = {}
    for name, (out, size) in shards.items():
        started = time.perf_counter()
        prepare_shards(folder, str(out), image_size=size, quality=args.shard_quality, workers=args.prepare_workers, log=None)
        prepare_s[name] = round(time.perf_counter() - started, 2)
    variants = {
        "folder": _loader_config(base, folder, args.image_size, args.images),
        "cache_raw": _loader_config(base, folder, args.image_size, args.images, "raw"),
        "cache_jpeg": _loader_config(base, folder, args.image_size, args.images, "jpeg"),
        **{name: _loader_config(base, out, args.image_size, args.images) for name, (out, _) in shards.items()},
    }
    datasets = {}
    for name, cfg in variants.items():
        started = time.perf_counter()
        datasets[name] = prepare_data(cfg, base / "runs" / name, log=None).train_dataset
        if name.startswith("cache"):
            prepare_s[name] = round(time.perf_counter() - started, 2)  # the scan and the cache build
    counts = {len(ds) for ds in datasets.values()}
    if len(counts) != 1:
        raise RuntimeError(f"the formats' training splits differ in size: { {n: len(d) for n, d in datasets.items()} }")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # one worker's view: a single compute thread
    try:
        one = bench_dataloader.best_of({n: (lambda i, ds=ds: ds[(i, 0)]) for n, ds in datasets.items()}, counts.pop(), args.repeat, args.rounds)
    finally:
        torch.set_num_threads(threads)
    for name in ("cache_raw", "cache_jpeg"):
        if datasets[name].cache_hits == 0:
            raise RuntimeError(f"{name}: the dataset never read from the cache")
    result: dict[str, Any] = {"train_samples": len(datasets["folder"]), "prepare_s": prepare_s, "one_process": one}
    if args.loader_workers > 0:
        result["dataloader"] = {
            name: bench_dataloader.loader_rate(ds, args.loader_workers, args.batch_size, args.loader_passes) for name, ds in datasets.items()
        }
    images = sorted(folder.glob("*.jpg"))
    count = len(images)
    result["bytes_per_image"] = {
        "folder_images": per_image(disk_bytes(folder, [p.name for p in images]), count),
        "folder_sidecars": per_image(disk_bytes(folder, [p.name + ".json" for p in images]), count),
        "cache_raw": per_image(disk_bytes(base / "cache_raw"), count),
        "cache_jpeg": per_image(disk_bytes(base / "cache_jpeg"), count),
        **{name: per_image(disk_bytes(out), count) for name, (out, _) in shards.items()},
        **{f"{name}_tag_index": per_image(disk_bytes(out, [SHARD_INDEX_FILE]), count) for name, (out, _) in shards.items()},
    }
    return result


def _prepared(folder: Path, out: Path, samples: int, workers: int) -> dict[str, Any]:
    """The shards of `folder` in `out`, prepared now or kept from an earlier run of the same size; the prepare's figures."""
    report_path = out / "prepare_report.json"
    if is_shard_dataset(out) and report_path.is_file():
        report = json.loads(report_path.read_text(encoding="utf-8"))
        if report.get("num_samples") == samples:
            return {"reused": True, "prepare_s": report["seconds"], "shards": report["shards"]}
    shutil.rmtree(out, ignore_errors=True)
    report = prepare_shards(folder, str(out), workers=workers, log=None)
    if report.get("num_samples") != samples:
        raise RuntimeError(f"{out}: the prepare kept {report.get('num_samples')} of {samples} samples: {report.get('skipped')}")
    return {"reused": False, "prepare_s": report["seconds"], "shards": report["shards"]}


def _start_summary(start: dict[str, Any]) -> dict[str, Any]:
    """A start's figures without its per-process listing (kept: the roles' peaks)."""
    return {k: v for k, v in start.items() if k != "process_list"}


def start(args: argparse.Namespace) -> dict[str, Any]:
    """(b): time to the first step from the folder (cold, resumed) and from its shards (cold, resumed)."""
    work = args.work / str(args.samples)
    folder = work / "data"
    result: dict[str, Any] = {"samples": args.samples, "generate_s": round(bench_scale.generate(folder, args.samples), 1)}
    shards = work / "shards"
    result["prepare"] = _prepared(folder, shards, args.samples, args.prepare_workers)
    result["tag_index_bytes_per_sample"] = round((shards / SHARD_INDEX_FILE).stat().st_size / args.samples, 1)
    if not args.skip_folder_start:
        result["folder"] = {k: _start_summary(v) for k, v in bench_scale.train_starts(work, folder, args.timeout).items()}
    result["shards"] = {k: _start_summary(v) for k, v in bench_scale.train_starts(work / "shards_run", shards, args.timeout).items()}
    return result


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Measure the phases not skipped; print the JSON report."""
    args = parse_args(argv)
    skip = set(filter(None, args.skip.split(",")))
    report: dict[str, Any] = {
        "command": " ".join(["python", "benchmarks/bench_shards.py", *(argv if argv is not None else sys.argv[1:])]),
        "cpus": os.cpu_count(),
        "load_average_at_start": [round(v, 2) for v in os.getloadavg()] if hasattr(os, "getloadavg") else None,
        "config": {"images": args.images, "megapixels": round(args.width * args.height / 1e6, 3), "image_size": args.image_size},
    }
    if "loader" not in skip:
        report["loader"] = loader(args)
    if "start" not in skip:
        report["start"] = start(args)
    report["load_average_at_end"] = [round(v, 2) for v in os.getloadavg()] if hasattr(os, "getloadavg") else None
    text = json.dumps(report, indent=2)
    if args.json_out:
        args.json_out.parent.mkdir(parents=True, exist_ok=True)
        args.json_out.write_text(text + "\n", encoding="utf-8")
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
