"""The prepared cache: every image letterboxed once into memory-mappable shards, raw uint8 or JPEG.

This module owns the cache format (``index.json`` with the preprocessing key, the codec and the
shard list, ``entries.npy`` with one row per image: shard, slot, source size and mtime, content
box; a ``jpeg`` cache's slot is the byte offset and a ninth column the length),
``prepare_cache`` (the write side: reuses entries whose source file is unchanged, decodes the
rest in spawned processes), ``PreparedCache`` (the read side a dataset uses in each worker) and
the ``prepare`` command line::

    python prepared_cache.py prepare --data DIR --image-size 448 --out CACHE
    python dataset_loader.py prepare ...   (the same command, kept for existing instructions)

Two formats: ``raw`` (the letterboxed pixels, 3 S^2 bytes an image, read by memcpy) and ``jpeg``
(exactly those pixels JPEG-encoded once, ~10x smaller, decoded by the worker or, with
``decode_on_device``, by the training device). Changing the format or quality rebuilds the cache
in place; the raw format's files are the same as before the jpeg format existed.

It imports ``file_io`` (atomic write), ``image_preprocess`` (the cached pixels are
exactly ``load_image``'s), ``cache_codec`` (JPEG encode/decode) and ``dataset_scan`` (records,
and the scan the command runs first).
Nothing here ever writes into the user's dataset folder.
"""

from __future__ import annotations

import argparse
import io
import itertools
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
import torch

from cache_codec import JPEG_SUBSAMPLING, decode_jpeg_batch, decode_jpeg_chw, encode_jpeg, worker_decoder
from dataset_scan import DatasetScanner, SampleRecord, format_scan_summary, read_json, write_data_report
from file_io import atomic_write_bytes
from image_preprocess import IMAGE_ERRORS, PreprocessParams, classify_failure, load_letterboxed
from scan_limits import ScanLimits, printable
from skip_list import SKIP_LIST_FILE, failure_rows, scan_rows, write_skip_list

__all__ = ["CACHE_FORMAT_VERSION", "CACHE_FORMATS", "cache_codec_key", "prepare_cache", "PreparedCache", "main"]

# the raw format's files are unchanged by the jpeg format (an index without "codec" is raw): still 1
CACHE_FORMAT_VERSION = 1
CACHE_FORMATS = ("raw", "jpeg")
_CACHE_INDEX = "index.json"
_CACHE_ENTRIES = "entries.npy"
# entries.npy columns, one row per cached image; jpeg: _E_SLOT is the byte offset in the shard
_E_SHARD, _E_SLOT, _E_SIZE, _E_MTIME, _E_X0, _E_Y0, _E_X1, _E_Y1, _E_LENGTH = range(9)
_RAW_COLUMNS, _JPEG_COLUMNS = 8, 9


def _cache_key(params: PreprocessParams) -> dict[str, Any]:
    """The parameters that decide the cached pixels (mean/std are applied later, on the device)."""
    key = {"image_size": params.image_size, "pad_color": list(params.pad_color), "resample": params.resample}
    if params.layout != "letterbox":  # only then: the caches of every letterbox run stay valid
        key["layout"] = params.layout
    return key


def cache_codec_key(cache_format: str = "raw", quality: int = 90) -> dict[str, Any]:
    """How the cached pixels are stored; part of the index, so a change rebuilds instead of mixing."""
    if cache_format == "raw":
        return {"format": "raw"}
    if cache_format == "jpeg":
        if isinstance(quality, bool) or not isinstance(quality, int) or not 1 <= quality <= 100:
            raise ValueError(f"cache quality must be an int in 1..100, got {quality!r}")
        return {"format": "jpeg", "quality": quality, "subsampling": JPEG_SUBSAMPLING}
    raise ValueError(f"cache format must be one of {list(CACHE_FORMATS)}, got {cache_format!r}")


def _index_codec(index: dict[str, Any]) -> dict[str, Any]:
    """The codec an index was written with (indexes from before the jpeg format are raw)."""
    codec = index.get("codec", {"format": "raw"})
    if not isinstance(codec, dict) or codec.get("format") not in CACHE_FORMATS:
        raise ValueError(f"cache index: unknown codec {codec!r}")
    return dict(codec)


def _shard_name(number: int, codec: dict[str, Any]) -> str:
    """A shard's file name; jpeg names carry the quality, so a rebuild never overwrites a shard
    the previous index still names (an interrupted rebuild leaves the old cache readable)."""
    if codec["format"] == "raw":
        return f"shard_{number:05d}.u8"
    return f"shard_{number:05d}.q{codec['quality']}.jpegs"


def _file_signature(path: str) -> tuple[int, int]:
    """(size, mtime_ns) of a source file: a change in either invalidates its cached copy."""
    st = os.stat(path)
    return int(st.st_size), int(st.st_mtime_ns)


def _prepare_one(job: tuple[str, PreprocessParams, dict[str, Any]]) -> tuple[bytes, tuple[int, int, int, int], int, int] | tuple[str, str, int, int]:
    """Letterbox (and for jpeg, encode) one image for the cache: (data, box, size, mtime_ns) or
    (reason, detail, size, mtime_ns) for a file that cannot be used (its signature lets the next
    build skip it)."""
    path, params, codec = job
    size, mtime = -1, -1
    try:
        size, mtime = _file_signature(path)
        with warnings.catch_warnings():  # runs in a pool process: no other thread shares the filters
            warnings.simplefilter("ignore")  # decoder warnings: the scan counted them for the report
            array, box = load_letterboxed(path, params)
    except IMAGE_ERRORS as exc:
        return classify_failure(exc), printable(f"{path}: {type(exc).__name__}: {exc}"), size, mtime
    if codec["format"] == "jpeg":
        return encode_jpeg(array, codec["quality"], codec["subsampling"]), box, size, mtime
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
    columns = _JPEG_COLUMNS if _index_codec(index)["format"] == "jpeg" else _RAW_COLUMNS
    entries = np.load(out / _CACHE_ENTRIES, allow_pickle=False)
    if entries.shape != (len(index["ids"]), columns):
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
    cache_format: str = "raw",
    quality: int = 90,
) -> dict[str, Any]:
    """Letterbox every record into shard files under `out_dir`; returns a JSON-able report.

    `cache_format`: raw (uint8 pixels) or jpeg (the same pixels JPEG-encoded at `quality`).
    Entries whose source file (size, mtime) is unchanged are kept from an earlier run; the rest are
    decoded (in `num_workers` processes) into new shards. A cache written with another format or
    quality is rebuilt in place (its old shards are deleted once the new index is written). Only
    each record's `.sample_id` and `.image_path` are read. `data_root`, when given, must not
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
    codec = cache_codec_key(cache_format, quality)
    existing = _read_cache_index(out)
    old_failed: dict[str, list[Any]] = {}
    old_rows: dict[str, np.ndarray] = {}
    shards: list[dict[str, Any]] = []
    stale: list[str] = []  # shard files of a cache written with another codec: deleted after the new index
    rebuilt_from: dict[str, Any] | None = None
    if existing is not None:
        index, entries = existing
        if index["key"] != key:
            raise ValueError(f"cache {str(out)!r} was prepared with {index['key']}, not {key}; use another --out folder")
        # decode failures belong to the source file, whatever the codec: kept across a rebuild
        old_failed = _failed_entries(index)
        if _index_codec(index) == codec:
            shards = list(index["shards"])
            old_rows = {sid: entries[i] for i, sid in enumerate(index["ids"])}
        else:
            rebuilt_from = _index_codec(index)
            stale = [str(s["file"]) for s in index["shards"]]

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
    jobs = [(rec.image_path, params, codec) for rec in todo]
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
            name = _shard_name(shard_no, codec)
            pieces: list[bytes] = []
            offset = 0
            for rec in batch:
                result = next(results)
                if isinstance(result[0], str):
                    failed_samples[rec.sample_id] = [result[0], result[2], result[3], result[1]]
                    continue
                data, box, fsize, mtime = result
                if codec["format"] == "jpeg":
                    row = [shard_no, offset, fsize, mtime, *box, len(data)]
                else:
                    row = [shard_no, len(pieces), fsize, mtime, *box]
                new_rows[rec.sample_id] = np.asarray(row, dtype=np.int64)
                pieces.append(data)
                offset += len(data)
            position += len(batch)
            if pieces:
                atomic_write_bytes(out / name, pieces)
                shards.append({"file": name, "count": len(pieces)})
    finally:
        if pool is not None:
            pool.shutdown()

    ids = sorted(set(keep) | set(new_rows))
    columns = _JPEG_COLUMNS if codec["format"] == "jpeg" else _RAW_COLUMNS
    rows = np.stack([new_rows.get(s, keep.get(s)) for s in ids]) if ids else np.zeros((0, columns), np.int64)
    atomic_write_bytes(out / _CACHE_ENTRIES, [_npy_bytes(rows.astype(np.int64))])
    write_data_report(
        out / _CACHE_INDEX,
        {
            "format_version": CACHE_FORMAT_VERSION,
            "key": key,
            "codec": codec,
            "params": params.to_dict(),
            "shards": shards,
            "ids": ids,
            "failed": dict(sorted(failed_samples.items())),
        },
    )
    current = {s["file"] for s in shards}
    for name in stale:
        if name not in current:
            (out / name).unlink(missing_ok=True)
    for entry in failed_samples.values():
        failed[entry[0]] = failed.get(entry[0], 0) + 1
        if len(examples) < 5:
            examples.append(str(entry[3]))
    live = {int(r[_E_SHARD]) for r in rows}
    on_disk = sum((out / s["file"]).stat().st_size for i, s in enumerate(shards) if i in live)
    if codec["format"] == "jpeg":
        per_image = round(float(rows[:, _E_LENGTH].mean())) if len(rows) else 0  # the live entries' mean
    else:
        per_image = size * size * 3
    return {
        "format": codec["format"],
        "codec": codec,
        "rebuilt_from": rebuilt_from,
        "cached": len(ids),
        "reused": len(keep),
        "decoded": len(new_rows),
        "failed": failed,
        "examples": examples,
        "failed_samples": {s: e[0] for s, e in sorted(failed_samples.items())},
        "shards": len(shards),
        "bytes_per_image": per_image,
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

    def __init__(self, cache_dir: str | Path, params: PreprocessParams, *, decode_on_device: bool = False, decoder: str | None = None) -> None:
        """Check the cache matches `params`; ValueError naming both when it does not.

        `decode_on_device` (jpeg caches only; ignored for raw ones): datasets hand over the JPEG
        bytes (get_encoded) and ImagePreFetcher decodes the batch on the training device.
        `decoder`: the worker-side JPEG decoder (cache_codec.DECODERS), None = the fastest here."""
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
        self.codec = _index_codec(index)
        self.format: str = self.codec["format"]
        self.decode_on_device = bool(decode_on_device) and self.format == "jpeg"
        self.decoder = decoder  # the preference; None = the fastest available
        # resolved per process on first decode: a spawned worker may lack what the parent has
        self._active_decoder: str | None = None
        self._entries: np.ndarray | None = None
        self._maps: dict[int, np.ndarray] = {}

    def __getstate__(self) -> dict[str, Any]:
        """Pickle without ids or open memory maps (workers reopen them)."""
        state = dict(self.__dict__)
        state["_entries"] = None
        state["_maps"] = {}
        state["_active_decoder"] = None
        state["ids"] = []
        state["failures"] = {}
        return state

    def active_decoder(self) -> str:
        """The JPEG decoder this process uses for this cache (chosen on first use)."""
        if self._active_decoder is None:
            self._active_decoder = worker_decoder(self.decoder)
        return self._active_decoder

    def rows_for(self, sample_ids: Sequence[str]) -> np.ndarray:
        """Entry row per sample id, -1 where the cache has none; int64 (N,)."""
        position = {sid: i for i, sid in enumerate(self.ids)}
        return np.asarray([position.get(s, -1) for s in sample_ids], dtype=np.int64)

    def _entry(self, row: int) -> np.ndarray:
        """One entries.npy row (memory-mapped on first use)."""
        if self._entries is None:
            self._entries = np.load(Path(self.cache_dir) / _CACHE_ENTRIES, mmap_mode="r", allow_pickle=False)
        return self._entries[row]

    def _fresh_entry(self, row: int, image_path: str) -> np.ndarray | None:
        """The entry row, None if the source file changed (or vanished) since it was cached."""
        entry = self._entry(row)
        try:
            if _file_signature(image_path) != (int(entry[_E_SIZE]), int(entry[_E_MTIME])):
                return None
        except OSError:
            return None
        return entry

    def _shard(self, shard: int) -> np.ndarray:
        """Shard `shard` memory-mapped: (count, S, S, 3) raw pixels or the jpeg shard's flat bytes."""
        mapped = self._maps.get(shard)
        if mapped is None:
            name, count = self.shard_files[shard]
            path = Path(self.cache_dir) / name
            if self.format == "jpeg":
                mapped = np.memmap(path, dtype=np.uint8, mode="r")  # (bytes,)
            else:
                size = self.image_size
                mapped = np.memmap(path, dtype=np.uint8, mode="r", shape=(count, size, size, 3))
            self._maps[shard] = mapped
        return mapped

    @staticmethod
    def _box(entry: np.ndarray) -> tuple[int, int, int, int]:
        """The content box (x0, y0, x1, y1) of an entry row."""
        return int(entry[_E_X0]), int(entry[_E_Y0]), int(entry[_E_X1]), int(entry[_E_Y1])

    def _jpeg_bytes(self, entry: np.ndarray) -> np.ndarray | None:
        """The stored JPEG of a jpeg entry: a read-only (n,) uint8 view of the memory map; None
        when the shard is shorter than the entry says or the bytes do not start and end as a JPEG
        (a damaged cache, not a bad source). The marker check is what protects decode_on_device,
        whose batch decode in the main process cannot fall back to the source file."""
        start = int(entry[_E_SLOT])
        mapped = self._shard(int(entry[_E_SHARD]))
        data = mapped[start : start + int(entry[_E_LENGTH])]
        if data.size != int(entry[_E_LENGTH]) or data.size < 4:
            return None
        if data[0] != 0xFF or data[1] != 0xD8 or data[-2] != 0xFF or data[-1] != 0xD9:  # SOI ... EOI
            return None
        return data

    def get_chw(self, row: int, image_path: str) -> tuple[torch.Tensor, tuple[int, int, int, int]] | None:
        """(image (3, S, S) uint8 tensor, maybe a strided view, box) for an entry row, None if the
        source changed since. A jpeg entry is decoded here; None too when it cannot be."""
        entry = self._fresh_entry(row, image_path)
        if entry is None:
            return None
        if self.format == "jpeg":
            data = self._jpeg_bytes(entry)
            try:
                image = decode_jpeg_chw(data, self.active_decoder()) if data is not None else None  # (3, S, S)
            except OSError:
                # a damaged cache entry says nothing about the source file: the caller decodes the
                # source instead of recording a good image as undecodable
                image = None
            if image is None or tuple(image.shape) != (3, self.image_size, self.image_size):
                return None
            return image, self._box(entry)
        pixels = np.array(self._shard(int(entry[_E_SHARD]))[int(entry[_E_SLOT])])  # (S, S, 3) copy
        return torch.from_numpy(pixels).permute(2, 0, 1), self._box(entry)  # (3, S, S) view

    @staticmethod
    def decode_batch(encoded: Sequence[torch.Tensor], device: torch.device | str) -> torch.Tensor:
        """Decode get_encoded()'s bytes of K images on `device`: (K, 3, S, S) uint8 (cache_codec.decode_jpeg_batch)."""
        return decode_jpeg_batch(encoded, device)

    def get(self, row: int, image_path: str) -> tuple[np.ndarray, tuple[int, int, int, int]] | None:
        """(image (S, S, 3) uint8 array, box) for an entry row, None if the source changed since."""
        found = self.get_chw(row, image_path)
        if found is None:
            return None
        image, box = found
        return np.ascontiguousarray(image.permute(1, 2, 0).numpy()), box  # (S, S, 3)

    def get_encoded(self, row: int, image_path: str) -> tuple[torch.Tensor, tuple[int, int, int, int]] | None:
        """(JPEG bytes as a (n,) uint8 tensor, box) of a jpeg entry row; None if the source changed
        or the shard lacks the entry's bytes (the caller decodes the source instead)."""
        if self.format != "jpeg":
            raise ValueError(f"cache {self.cache_dir!r} is {self.format}, not jpeg: it holds no encoded images")
        entry = self._fresh_entry(row, image_path)
        data = self._jpeg_bytes(entry) if entry is not None else None
        if entry is None or data is None:
            return None
        return torch.from_numpy(np.array(data)), self._box(entry)  # (n,) private copy


def main(argv: Sequence[str] | None = None) -> int:
    """CLI: `prepare` builds the letterboxed cache for a dataset folder or manifest."""
    # prog defaults to the script run: dataset_loader.py or prepared_cache.py
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    prep = sub.add_parser("prepare", help="letterbox every image once into memory-mappable shards (raw pixels or JPEG)")
    prep.add_argument("--data", required=True, help="dataset folder or JSON Lines manifest")
    prep.add_argument("--image-size", type=int, required=True)
    prep.add_argument("--out", required=True, help="cache folder (outside the dataset)")
    prep.add_argument("--pad-color", type=int, nargs=3, default=(255, 255, 255))
    prep.add_argument("--workers", type=int, default=max(1, (os.cpu_count() or 2) - 1))
    prep.add_argument("--shard-size", type=int, default=2048)
    prep.add_argument("--format", choices=CACHE_FORMATS, default="raw", help="raw uint8 pixels, or the same pixels JPEG-encoded (data.cache_format)")
    prep.add_argument("--quality", type=int, default=90, help="JPEG quality for --format jpeg (data.cache_quality)")
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
        report = prepare_cache(
            scan.records,
            args.out,
            params,
            num_workers=args.workers,
            shard_size=args.shard_size,
            data_root=root,
            cache_format=args.format,
            quality=args.quality,
        )
    except (FileNotFoundError, ValueError) as exc:
        print(f"error: {printable(str(exc))}", file=sys.stderr)
        return 2
    report["scan"] = scan.to_report()
    failed = {sid: (reason, "cache") for sid, reason in report.get("failed_samples", {}).items()}
    skip_path = Path(args.out) / SKIP_LIST_FILE
    report["skipped_list"] = {
        "file": SKIP_LIST_FILE,
        "samples": write_skip_list(skip_path, itertools.chain(scan_rows(scan), failure_rows(failed, [scan.records]))),
    }
    print(json.dumps(report, indent=2))
    if report["skipped_list"]["samples"]:
        print(f"skipped: every one of the {report['skipped_list']['samples']} samples left out is listed in {skip_path}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
