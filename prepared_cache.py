"""The prepared cache: every image letterboxed once into memory-mappable uint8 shards.

This module owns the cache format (``index.json`` with the preprocessing key and shard list,
``entries.npy`` with one row per image: shard, slot, source size and mtime, content box),
``prepare_cache`` (the write side: reuses entries whose source file is unchanged, decodes the
rest in spawned processes), ``PreparedCache`` (the read side a dataset uses in each worker) and
the ``prepare`` command line::

    python prepared_cache.py prepare --data DIR --image-size 448 --out CACHE
    python dataset_loader.py prepare ...   (the same command, kept for existing instructions)

It imports ``file_io`` (atomic write), ``image_preprocess`` (the cached pixels are
exactly ``load_image``'s) and ``dataset_scan`` (records, and the scan the command runs first).
Nothing here ever writes into the user's dataset folder.
"""

from __future__ import annotations

import argparse
import io
import json
import multiprocessing
import os
import sys
import time
import warnings
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np

from dataset_scan import DatasetScanner, SampleRecord, format_scan_summary, read_json, write_data_report
from file_io import atomic_write_bytes
from image_preprocess import IMAGE_ERRORS, PreprocessParams, classify_failure, load_letterboxed
from scan_limits import ScanLimits, printable

__all__ = ["CACHE_FORMAT_VERSION", "prepare_cache", "PreparedCache", "main"]

CACHE_FORMAT_VERSION = 1
_CACHE_INDEX = "index.json"
_CACHE_ENTRIES = "entries.npy"
# entries.npy columns, one row per cached image
_E_SHARD, _E_SLOT, _E_SIZE, _E_MTIME, _E_X0, _E_Y0, _E_X1, _E_Y1 = range(8)


def _cache_key(params: PreprocessParams) -> dict[str, Any]:
    """The parameters that decide the cached pixels (mean/std are applied later, on the device)."""
    return {"image_size": params.image_size, "pad_color": list(params.pad_color), "resample": params.resample}


def _file_signature(path: str) -> tuple[int, int]:
    """(size, mtime_ns) of a source file: a change in either invalidates its cached copy."""
    st = os.stat(path)
    return int(st.st_size), int(st.st_mtime_ns)


def _prepare_one(job: tuple[str, PreprocessParams]) -> tuple[bytes, tuple[int, int, int, int], int, int] | tuple[str, str, int, int]:
    """Letterbox one image for the cache: (pixels, box, size, mtime_ns) or (reason, detail,
    size, mtime_ns) for a file that cannot be used (its signature lets the next build skip it)."""
    path, params = job
    size, mtime = -1, -1
    try:
        size, mtime = _file_signature(path)
        with warnings.catch_warnings():  # runs in a pool process: no other thread shares the filters
            warnings.simplefilter("ignore")  # decoder warnings: the scan counted them for the report
            array, box = load_letterboxed(path, params)
    except IMAGE_ERRORS as exc:
        return classify_failure(exc), printable(f"{path}: {type(exc).__name__}: {exc}"), size, mtime
    return array.tobytes(), box, size, mtime


def _is_inside(child: Path, parent: Path) -> bool:
    """Whether `child` is `parent` or below it (after resolving)."""
    child_r, parent_r = child.resolve(), parent.resolve()
    return child_r == parent_r or parent_r in child_r.parents


def _read_cache_index(out: Path) -> tuple[dict[str, Any], np.ndarray] | None:
    """(index, entries) of an existing cache folder, or None when it has none yet."""
    index_path = out / _CACHE_INDEX
    if not index_path.is_file():
        return None
    try:
        index = read_json(str(index_path))
    except json.JSONDecodeError as exc:
        raise ValueError(f"cache index {str(index_path)!r} is not valid JSON: {exc}") from exc
    if not isinstance(index, dict) or index.get("format_version") != CACHE_FORMAT_VERSION:
        raise ValueError(f"cache index {str(index_path)!r} has an unknown format")
    entries = np.load(out / _CACHE_ENTRIES, allow_pickle=False)
    if entries.shape != (len(index["ids"]), 8):
        raise ValueError(f"cache {str(out)!r}: {_CACHE_ENTRIES} does not match {_CACHE_INDEX}")
    return index, entries


def _failed_entries(index: dict[str, Any]) -> dict[str, list[Any]]:
    """The index's record of files that failed to decode: sample id -> [reason, size, mtime_ns, detail]."""
    failed = index.get("failed", {})
    if not isinstance(failed, dict):
        raise ValueError(f"cache index: 'failed' is a {type(failed).__name__}, expected an object")
    return {str(k): list(v) for k, v in failed.items() if isinstance(v, list) and len(v) == 4}


def prepare_cache(
    records: Sequence[SampleRecord],
    out_dir: str | Path,
    params: PreprocessParams,
    *,
    num_workers: int = 0,
    shard_size: int = 2048,
    data_root: str | Path | None = None,
) -> dict[str, Any]:
    """Letterbox every record into uint8 shard files under `out_dir`; returns a JSON-able report.

    Entries whose source file (size, mtime) is unchanged are kept from an earlier run; the rest are
    decoded (in `num_workers` processes) into new shards. `data_root`, when given, must not
    contain `out_dir`: nothing is ever written into the user's dataset folder.
    """
    started = time.perf_counter()
    out = Path(out_dir)
    if data_root is not None and _is_inside(out, Path(data_root)):
        raise ValueError(f"cache folder {str(out)!r} is inside the dataset {str(data_root)!r}; choose a folder outside it")
    if shard_size <= 0:
        raise ValueError(f"shard_size must be > 0, got {shard_size}")
    out.mkdir(parents=True, exist_ok=True)
    key = _cache_key(params)
    existing = _read_cache_index(out)
    old_failed: dict[str, list[Any]] = {}
    old_rows: dict[str, np.ndarray] = {}
    shards: list[dict[str, Any]] = []
    if existing is not None:
        index, entries = existing
        if index["key"] != key:
            raise ValueError(f"cache {str(out)!r} was prepared with {index['key']}, not {key}; use another --out folder")
        shards = list(index["shards"])
        old_rows = {sid: entries[i] for i, sid in enumerate(index["ids"])}
        old_failed = _failed_entries(index)

    keep: dict[str, np.ndarray] = {}
    todo: list[SampleRecord] = []
    failed_samples: dict[str, list[Any]] = {}  # sample id -> [reason, size, mtime_ns, detail]
    for rec in records:
        row = old_rows.get(rec.sample_id)
        known = old_failed.get(rec.sample_id)
        if known is not None:
            try:
                if _file_signature(rec.image_path) == (int(known[1]), int(known[2])):
                    failed_samples[rec.sample_id] = list(known)  # unchanged and still broken: not decoded again
                    continue
            except OSError:
                pass
        if row is not None:
            try:
                if _file_signature(rec.image_path) == (int(row[_E_SIZE]), int(row[_E_MTIME])):
                    keep[rec.sample_id] = row
                    continue
            except OSError:
                pass  # vanished or unreadable now: try to decode it below and count the failure
        todo.append(rec)

    size = params.image_size
    failed: dict[str, int] = {}
    examples: list[str] = []
    new_rows: dict[str, np.ndarray] = {}
    jobs = [(rec.image_path, params) for rec in todo]
    if num_workers > 0 and len(jobs) > 1:
        pool: Any = ProcessPoolExecutor(max_workers=num_workers, mp_context=multiprocessing.get_context("spawn"))
        results: Iterator[Any] = pool.map(_prepare_one, jobs, chunksize=16)
    else:
        pool = None
        results = map(_prepare_one, jobs)
    try:
        position = 0
        while position < len(todo):
            batch = todo[position : position + shard_size]
            shard_no = len(shards)
            name = f"shard_{shard_no:05d}.u8"
            pixels: list[bytes] = []
            for rec in batch:
                result = next(results)
                if isinstance(result[0], str):
                    failed_samples[rec.sample_id] = [result[0], result[2], result[3], result[1]]
                    continue
                data, box, fsize, mtime = result
                new_rows[rec.sample_id] = np.asarray([shard_no, len(pixels), fsize, mtime, *box], dtype=np.int64)
                pixels.append(data)
            position += len(batch)
            if pixels:
                atomic_write_bytes(out / name, pixels)
                shards.append({"file": name, "count": len(pixels)})
    finally:
        if pool is not None:
            pool.shutdown()

    ids = sorted(set(keep) | set(new_rows))
    rows = np.stack([new_rows.get(s, keep.get(s)) for s in ids]) if ids else np.zeros((0, 8), np.int64)
    atomic_write_bytes(out / _CACHE_ENTRIES, [_npy_bytes(rows.astype(np.int64))])
    write_data_report(
        out / _CACHE_INDEX,
        {
            "format_version": CACHE_FORMAT_VERSION,
            "key": key,
            "params": params.to_dict(),
            "shards": shards,
            "ids": ids,
            "failed": dict(sorted(failed_samples.items())),
        },
    )
    for entry in failed_samples.values():
        failed[entry[0]] = failed.get(entry[0], 0) + 1
        if len(examples) < 5:
            examples.append(str(entry[3]))
    live = {int(r[_E_SHARD]) for r in rows}
    on_disk = sum((out / s["file"]).stat().st_size for i, s in enumerate(shards) if i in live)
    return {
        "cached": len(ids),
        "reused": len(keep),
        "decoded": len(new_rows),
        "failed": failed,
        "examples": examples,
        "failed_samples": {s: e[0] for s, e in sorted(failed_samples.items())},
        "shards": len(shards),
        "bytes_per_image": size * size * 3,
        "bytes_on_disk": on_disk,
        "seconds": round(time.perf_counter() - started, 3),
    }


def _npy_bytes(array: np.ndarray) -> bytes:
    """The .npy encoding of a plain array."""
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=False)
    return buffer.getvalue()


class PreparedCache:
    """Read side of a prepared cache: memory-mapped shards, opened lazily in each process."""

    def __init__(self, cache_dir: str | Path, params: PreprocessParams) -> None:
        """Check the cache matches `params`; ValueError naming both when it does not."""
        self.cache_dir = str(cache_dir)
        loaded = _read_cache_index(Path(cache_dir))
        if loaded is None:
            raise FileNotFoundError(f"no prepared cache at {self.cache_dir!r} (missing {_CACHE_INDEX})")
        index, _entries = loaded
        if index["key"] != _cache_key(params):
            raise ValueError(
                f"cache {self.cache_dir!r} holds {index['key']}, but training uses {_cache_key(params)}; prepare it again for these parameters"
            )
        self.image_size = params.image_size
        self.ids: list[str] = list(index["ids"])
        self.shard_files = [(s["file"], int(s["count"])) for s in index["shards"]]
        # sample id -> reason, for files the build could not decode (excluded from the run)
        self.failures: dict[str, str] = {k: str(v[0]) for k, v in _failed_entries(index).items()}
        self._entries: np.ndarray | None = None
        self._maps: dict[int, np.ndarray] = {}

    def __getstate__(self) -> dict[str, Any]:
        """Pickle without ids or open memory maps (workers reopen them)."""
        state = dict(self.__dict__)
        state["_entries"] = None
        state["_maps"] = {}
        state["ids"] = []
        state["failures"] = {}
        return state

    def rows_for(self, sample_ids: Sequence[str]) -> np.ndarray:
        """Entry row per sample id, -1 where the cache has none; int64 (N,)."""
        position = {sid: i for i, sid in enumerate(self.ids)}
        return np.asarray([position.get(s, -1) for s in sample_ids], dtype=np.int64)

    def _entry(self, row: int) -> np.ndarray:
        """One entries.npy row (memory-mapped on first use)."""
        if self._entries is None:
            self._entries = np.load(Path(self.cache_dir) / _CACHE_ENTRIES, mmap_mode="r", allow_pickle=False)
        return self._entries[row]

    def get(self, row: int, image_path: str) -> tuple[np.ndarray, tuple[int, int, int, int]] | None:
        """(image (S, S, 3) uint8 copy, box) for an entry row, None if the source changed since."""
        entry = self._entry(row)
        try:
            if _file_signature(image_path) != (int(entry[_E_SIZE]), int(entry[_E_MTIME])):
                return None
        except OSError:
            return None
        shard = int(entry[_E_SHARD])
        mapped = self._maps.get(shard)
        if mapped is None:
            name, count = self.shard_files[shard]
            size = self.image_size
            mapped = np.memmap(Path(self.cache_dir) / name, dtype=np.uint8, mode="r", shape=(count, size, size, 3))
            self._maps[shard] = mapped
        box = (int(entry[_E_X0]), int(entry[_E_Y0]), int(entry[_E_X1]), int(entry[_E_Y1]))
        return np.array(mapped[int(entry[_E_SLOT])]), box


def main(argv: Sequence[str] | None = None) -> int:
    """CLI: `prepare` builds the letterboxed cache for a dataset folder or manifest."""
    # prog defaults to the script run: dataset_loader.py or prepared_cache.py
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    prep = sub.add_parser("prepare", help="letterbox every image once into memory-mappable shards")
    prep.add_argument("--data", required=True, help="dataset folder or JSON Lines manifest")
    prep.add_argument("--image-size", type=int, required=True)
    prep.add_argument("--out", required=True, help="cache folder (outside the dataset)")
    prep.add_argument("--pad-color", type=int, nargs=3, default=(255, 255, 255))
    prep.add_argument("--workers", type=int, default=max(1, (os.cpu_count() or 2) - 1))
    prep.add_argument("--shard-size", type=int, default=2048)
    prep.add_argument("--verify", choices=("none", "header", "decode"), default="header")
    prep.add_argument(
        "--symlinks",
        choices=("inside_root", "follow"),
        default="inside_root",
        help="links to images, folders and sidecars: follow only those inside --data, or all",
    )
    args = parser.parse_args(argv)
    source = Path(args.data)
    root = source if source.is_dir() else source.parent
    if source.exists() and _is_inside(Path(args.out), root):
        print(
            f"error: --out {args.out} is inside the dataset folder {root}; nothing is ever written into the dataset: choose a folder outside it",
            file=sys.stderr,
        )
        return 2
    try:
        scan = DatasetScanner(source, verify=args.verify, limits=ScanLimits(symlinks=args.symlinks)).scan()
        print(format_scan_summary(scan), file=sys.stderr)
        params = PreprocessParams(args.image_size, pad_color=tuple(args.pad_color))
        report = prepare_cache(scan.records, args.out, params, num_workers=args.workers, shard_size=args.shard_size, data_root=root)
    except (FileNotFoundError, ValueError) as exc:
        print(f"error: {printable(str(exc))}", file=sys.stderr)
        return 2
    report["scan"] = scan.to_report()
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
