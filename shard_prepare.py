"""Writing a sharded dataset: a dataset folder or a folder of tar shards -> litdata chunks + tag index.

``python dataset_loader.py prepare --data SRC --format litdata --out DEST`` (DEST a folder or an
``s3://`` URL; see ``shard_format`` for what lands there). SRC is

* a dataset folder: scanned by ``dataset_scan.scan_source``, the folder scan training runs (same
  pairing, sidecar parsing, tag normalisation, limits, image check and skip reasons);
* a folder of ``.tar`` shards in the webdataset layout (``KEY.EXT`` + ``KEY.json`` members, the
  public Danbooru sets' layout): read member by member here, each sidecar through the folder scan's
  own ``folder_pairing.sidecar_from_bytes`` / ``parse_limited`` and each image through
  ``image_audit.verify_image``; the sample id is KEY (the post id), unique over all shards.

A bad member (truncated image, broken JSON, an oversized sidecar, a name that is not UTF-8, a
shard that ends early, ...) is counted under its reason with its shard and member name and never
stops the write. Images are stored encoded: the bytes as they came, or (``--image-size``)
re-encoded with the long side at most that size (JPEG, PNG when the image has alpha). Chunks are
written in sample order by one litdata ``BinaryWriter`` (row i of the tag index = item i) while
``image_audit.ProcessMap`` reads and re-encodes the images on one process a usable core.

It imports ``dataset_scan``, ``folder_pairing``, ``folder_walk``, ``image_audit``,
``image_preprocess`` (the failure classes), ``sample_table``, ``scan_limits``, ``skip_list`` and
``shard_format``; litdata is imported when the chunks are written.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import shutil
import sys
import tarfile
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
from PIL import Image, ImageOps

from dataset_scan import DEFAULT_LIMITS, DatasetScan, format_scan_summary, scan_source
from file_io import atomic_write_text
from folder_pairing import SKIP_REASONS, parse_limited, sidecar_from_bytes
from folder_walk import IMAGE_EXTENSIONS
from image_audit import ProcessMap, scan_processes, verify_image
from image_preprocess import IMAGE_ERRORS, classify_failure
from sample_table import SampleTable, SampleTableBuilder, SkippedSamples
from scan_limits import ScanLimits, is_utf8, printable
from shard_format import LITDATA_INDEX_FILE, PREPARE_REPORT_FILE, SHARD_INDEX_FILE, is_remote, save_tag_index, upload_folder
from skip_list import SKIP_LIST_FILE, scan_rows, write_skip_list

__all__ = ["Location", "scan_tar_shards", "prepare_shards", "main"]

DEFAULT_CHUNK_BYTES = 64 * 1024 * 1024
_SIDECAR_SUFFIX = ".json"

# where one kept sample's image bytes are: (file, offset, size); size -1 is the whole file
Location = tuple[str, int, int]


def _split_member(name: str) -> tuple[str, str]:
    """(key, extension) of a tar member name in the webdataset convention: the key is the path up to
    the first '.' of the base name, the extension the rest, lowercased ('jpg', 'json', 'jpg.json')."""
    folder, _, base = name.rpartition("/")
    stem, dot, ext = base.partition(".")
    return (f"{folder}/{stem}" if folder else stem), (ext.lower() if dot else "")


class _TarScan:
    """The samples and skipped members of a set of tar shards, in shard and member order."""

    def __init__(self, verify: str, limits: ScanLimits) -> None:
        """Empty result; `verify` is the image check (none|header|decode)."""
        self.verify, self.limits = verify, limits
        self.builder = SampleTableBuilder("")
        self.skips = SkippedSamples(SKIP_REASONS)
        self.locations: list[Location] = []
        self.seen: set[str] = set()
        self.unknown_rating = 0
        self.dropped: dict[str, int] = {}

    def skip(self, reason: str, path: str, detail: str) -> None:
        """Count one member (shard/member) as skipped for `reason`."""
        self.skips.add(reason, printable(path), detail)

    def shard(self, path: Path, label: str) -> None:
        """Every sample of one tar shard; `label` is its name as the report shows it."""
        try:
            tar = tarfile.open(path, "r:")  # uncompressed only: training reads members by offset
        except (tarfile.TarError, OSError) as exc:
            self.skip("directory_unreadable", label, f"unreadable tar shard: {type(exc).__name__}: {exc}")
            return
        groups: dict[str, dict[str, tarfile.TarInfo]] = {}
        with tar:
            try:
                for member in tar:
                    self._group(member, label, groups)
            except (tarfile.TarError, OSError, EOFError) as exc:  # a truncated shard: keep what was read before
                self.skip("directory_unreadable", label, f"tar shard ends early after {len(groups)} keys: {type(exc).__name__}: {exc}")
            for key, members in groups.items():
                self._sample(tar, path, label, key, members)

    def _group(self, member: tarfile.TarInfo, label: str, groups: dict[str, dict[str, tarfile.TarInfo]]) -> None:
        """File `member` under its key, or count it when its name is unusable."""
        if not member.isfile():
            return
        if not is_utf8(member.name):
            self.skip("name_not_utf8", f"{label}/{member.name}", "member name is not valid UTF-8")
            return
        key, ext = _split_member(member.name)
        groups.setdefault(key, {}).setdefault(ext, member)

    def _sample(self, tar: tarfile.TarFile, path: Path, label: str, key: str, members: dict[str, tarfile.TarInfo]) -> None:
        """Pair one key's image and sidecar, parse and check them; record the sample or its skip."""
        images = [m for ext, m in members.items() if f".{ext}" in IMAGE_EXTENSIONS]
        sidecar = next((m for ext, m in members.items() if ext.endswith("json")), None)
        if not images:
            if sidecar is not None:
                self.skip("image_missing", f"{label}/{sidecar.name}", "no image member with this key")
            return
        image = images[0]
        where = f"{label}/{image.name}"
        for extra in images[1:]:
            self.skip("duplicate_image", f"{label}/{extra.name}", f"key {key!r} already has {image.name}")
        if sidecar is None:
            self.skip("sidecar_missing", where, "no KEY.json member")
            return
        if key in self.seen:
            self.skip("duplicate_image", where, f"sample {key!r} already came from an earlier member")
            return
        if sidecar.size > self.limits.max_sidecar_bytes:  # never read: a sidecar bomb costs no memory
            self.skip("sidecar_too_large", f"{label}/{sidecar.name}", f"larger than data.max_sidecar_bytes={self.limits.max_sidecar_bytes}")
            return
        try:
            raw = _member_bytes(tar, sidecar)
        except (tarfile.TarError, OSError, EOFError) as exc:
            self.skip("sidecar_unreadable", f"{label}/{sidecar.name}", f"cannot read member: {type(exc).__name__}: {exc}")
            return
        parsed = sidecar_from_bytes(raw, self.limits.max_sidecar_bytes)
        if isinstance(parsed, tuple):
            self.skip(parsed[0], f"{label}/{sidecar.name}", parsed[1])
            return
        outcome, dropped = parse_limited(parsed, self.limits, "sidecar_unreadable")
        for reason, count in dropped.items():
            self.dropped[reason] = self.dropped.get(reason, 0) + count
        if isinstance(outcome[0], str):
            self.skip(outcome[0], f"{label}/{sidecar.name}", outcome[1])
            return
        if self.verify != "none":
            try:
                data = _member_bytes(tar, image)
            except (tarfile.TarError, OSError, EOFError) as exc:
                self.skip("image_undecodable", where, f"cannot read member: {type(exc).__name__}: {exc}")
                return
            reason, detail = verify_image(io.BytesIO(data), self.verify)
            if reason is not None:
                self.skip(reason, where, detail)
                return
        tags, cats, rating = outcome
        self.seen.add(key)
        self.unknown_rating += rating < 0
        self.builder.add(key, where, tags, cats, rating)
        self.locations.append((str(path), int(image.offset_data), int(image.size)))


def _member_bytes(tar: tarfile.TarFile, member: tarfile.TarInfo) -> bytes:
    """The bytes of one regular-file member."""
    handle = tar.extractfile(member)
    if handle is None:
        raise tarfile.TarError(f"{member.name} is not a regular file")
    with handle:
        return handle.read()


def _examples(skips: SkippedSamples, limit: int) -> dict[str, list[str]]:
    """The first `limit` skipped members of each reason as 'shard/member: detail'."""
    out: dict[str, list[str]] = {}
    for path, reason, detail in skips:
        bucket = out.setdefault(reason, [])
        if len(bucket) < limit:
            bucket.append(f"{path}: {detail}")
    return out


def scan_tar_shards(src: str | Path, verify: str = "header", limits: ScanLimits = DEFAULT_LIMITS) -> tuple[DatasetScan, list[Location]]:
    """The scan of a folder of .tar shards (every .tar below `src`, in name order) and where each kept image's bytes are."""
    started = time.perf_counter()
    root = Path(src)
    shards = sorted(p for p in root.rglob("*.tar") if p.is_file())
    if not shards:
        raise FileNotFoundError(f"{root}: no .tar shards (expected a dataset folder, or .tar files of KEY.EXT + KEY.json members)")
    result = _TarScan(verify, limits)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # verify_image counts bombs itself
        for shard in shards:
            result.shard(shard, shard.relative_to(root).as_posix())
    skips = result.skips
    scan = DatasetScan(
        records=result.builder.build(),
        skipped=skips.counts(),
        examples=_examples(skips, 5),
        unknown_rating=int(result.unknown_rating),
        root=str(root),
        source="tar",
        verify=verify,
        seconds=time.perf_counter() - started,
        dropped_tags=dict(result.dropped),
        skips=skips,
    )
    return scan, result.locations


def _folder_source(src: Path, verify: str, limits: ScanLimits) -> tuple[DatasetScan, list[Location]]:
    """The folder scan of `src` and each kept image's file."""
    scan = scan_source(src, manifest=None, verify=verify, limits=limits)
    table = scan.records if isinstance(scan.records, SampleTable) else SampleTable.from_records(scan.records, str(src))
    scan.records = table
    return scan, [(table.image_path(i), 0, -1) for i in range(len(table))]


def _reencode(data: bytes, size: int, quality: int) -> bytes:
    """The image with its long side at most `size`, upright (EXIF), as JPEG (PNG when it has alpha)."""
    with Image.open(io.BytesIO(data)) as img:
        img.load()
        upright = ImageOps.exif_transpose(img)
        alpha = upright.mode in ("RGBA", "LA", "PA") or (upright.mode == "P" and "transparency" in upright.info)
        converted = upright.convert("RGBA" if alpha else "RGB")
        converted.thumbnail((size, size), Image.Resampling.LANCZOS)
        out = io.BytesIO()
        if alpha:
            converted.save(out, "PNG", optimize=False)
        else:
            converted.save(out, "JPEG", quality=int(quality), subsampling=2, optimize=True)
        return out.getvalue()


def _read_item(job: tuple[str, str, int, int, int, int]) -> tuple[bytes | None, str, str]:
    """(image bytes, '', '') of one sample, or (None, skip reason, detail) when its bytes cannot be
    read or re-encoded (module-level: ProcessMap's spawned processes run it)."""
    path, _, offset, size, resize, quality = job
    try:
        with open(path, "rb") as handle:
            handle.seek(offset)
            data = handle.read() if size < 0 else handle.read(size)
        if size >= 0 and len(data) != size:
            raise EOFError(f"{len(data)} of {size} bytes")
        if resize > 0:
            data = _reencode(data, resize, quality)
    except IMAGE_ERRORS as exc:
        return None, classify_failure(exc), f"cannot write: {type(exc).__name__}: {exc}"
    return data, "", ""


def _write_chunks(
    scan: DatasetScan, locations: Sequence[Location], out: Path, *, image_size: int, quality: int, chunk_bytes: int, workers: int
) -> SampleTable:
    """Write one item per sample in order; a sample whose bytes fail now is skipped and counted.
    Returns the table of the samples written (row i = item i)."""
    from litdata.streaming.writer import BinaryWriter

    table = scan.records
    assert isinstance(table, SampleTable)
    keep = np.ones(len(table), dtype=bool)
    writer = BinaryWriter(str(out), chunk_bytes=chunk_bytes)
    jobs: Iterator[tuple[str, str, int, int, int, int]] = (
        (path, table.sample_id(i), offset, size, image_size, quality) for i, (path, offset, size) in enumerate(locations)
    )
    written = 0
    with ProcessMap(workers) as pool:
        for row, (data, reason, detail) in enumerate(pool.map(_read_item, jobs)):
            if data is None:
                keep[row] = False
                scan.skips.add(reason, printable(table.image_path(row)), detail)
                scan.add_skipped(reason, 1, [printable(f"{table.image_path(row)}: {detail}")])
                continue
            writer.add_item(written, {"id": table.sample_id(row), "image": data})
            written += 1
    if written == 0:
        raise ValueError(f"{scan.root}: no sample could be written ({scan.num_skipped} skipped; see {PREPARE_REPORT_FILE})")
    writer.done()
    writer.merge()
    return table.select(keep) if not keep.all() else table


def prepare_shards(
    src: str | Path,
    dest: str,
    *,
    verify: str = "header",
    limits: ScanLimits = DEFAULT_LIMITS,
    image_size: int = 0,
    quality: int = 95,
    chunk_bytes: int = DEFAULT_CHUNK_BYTES,
    workers: int = 0,
    log: Any = print,
) -> dict[str, Any]:
    """Write the sharded dataset of `src` (a dataset folder or a folder of .tar shards) to `dest` (a
    folder or an s3:// URL); returns the prepare report (also DEST/prepare_report.json)."""
    source = Path(src)
    if not source.is_dir():
        raise FileNotFoundError(f"--data: folder not found: {source}")
    started = time.perf_counter()
    is_tar = any(source.glob("*.tar")) or not any(p.suffix.lower() in IMAGE_EXTENSIONS for p in source.rglob("*") if p.is_file())
    scan, locations = scan_tar_shards(source, verify, limits) if is_tar else _folder_source(source, verify, limits)
    if log:
        log(format_scan_summary(scan))
    if len(scan.records) == 0:
        raise ValueError(f"{source}: no usable sample ({scan.num_skipped} skipped: {dict(sorted(scan.skipped.items()))})")
    remote = is_remote(dest)
    staging = Path(tempfile.mkdtemp(prefix="shards-")) if remote else Path(dest)
    if not remote:
        staging.mkdir(parents=True, exist_ok=True)
        if any(staging.iterdir()):
            raise FileExistsError(f"--out: {staging} is not empty; choose an empty or new folder")
    try:
        table = _write_chunks(
            scan, locations, staging, image_size=image_size, quality=quality, chunk_bytes=chunk_bytes, workers=workers or scan_processes()
        )
        scan.records = table
        chunk_files = sorted(p for p in staging.iterdir() if p.suffix == ".bin")
        chunk_total = sum(p.stat().st_size for p in chunk_files)
        extra = {
            "format": "litdata",
            "source": "tar" if is_tar else "folder",
            "chunks": len(chunk_files),
            "chunk_bytes": chunk_total,
            "bytes_per_image": round(chunk_total / max(1, len(table)), 1),
            "image_size": image_size,
            "quality": quality if image_size else None,
        }
        save_tag_index(staging / SHARD_INDEX_FILE, scan, extra)
        report = scan.to_report() | {"shards": extra, "seconds": round(time.perf_counter() - started, 3)}
        listed = write_skip_list(staging / SKIP_LIST_FILE, scan_rows(scan))
        report["skipped_list"] = {"file": SKIP_LIST_FILE, "samples": listed}
        atomic_write_text(staging / PREPARE_REPORT_FILE, json.dumps(report, indent=2, sort_keys=True))
        if remote:
            upload_folder(staging, dest, last=(SHARD_INDEX_FILE, LITDATA_INDEX_FILE))
    finally:
        if remote:
            shutil.rmtree(staging, ignore_errors=True)
    if log:
        log(
            f"shards: {len(table)} samples in {extra['chunks']} chunks at {dest} ({extra['bytes_per_image'] / 1024:.1f} KB an image, "
            f"{report['seconds']:.1f}s); {scan.num_skipped} skipped, listed in {dest.rstrip('/')}/{SKIP_LIST_FILE}"
        )
    return report


def main(argv: Sequence[str] | None = None) -> int:
    """CLI: `prepare --format litdata` writes the sharded dataset of a folder or of tar shards."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    prep = sub.add_parser("prepare", help="litdata chunks of the encoded images + the tag index, in a folder or under s3://")
    prep.add_argument("--data", required=True, help="dataset folder, or a folder of .tar shards (KEY.EXT + KEY.json members)")
    prep.add_argument("--out", required=True, help="output folder (empty or new) or s3://BUCKET/PREFIX")
    prep.add_argument("--format", choices=("litdata",), required=True)
    prep.add_argument("--image-size", type=int, default=0, help="re-encode with the long side at most this (0: the bytes as they came)")
    prep.add_argument("--quality", type=int, default=95, help="JPEG quality when re-encoding")
    prep.add_argument("--verify", choices=("none", "header", "decode"), default="header")
    prep.add_argument("--max-sidecar-bytes", type=int, default=ScanLimits.max_sidecar_bytes)
    prep.add_argument("--chunk-mb", type=int, default=DEFAULT_CHUNK_BYTES // (1024 * 1024), help="chunk size in MiB")
    prep.add_argument("--workers", type=int, default=0, help="processes reading and re-encoding images (0: one a usable core)")
    args = parser.parse_args(argv)
    if not is_remote(args.out) and os.path.realpath(args.out).startswith(os.path.join(os.path.realpath(args.data), "")):
        print(f"error: --out {args.out} is inside the dataset folder {args.data}; choose a folder outside it", file=sys.stderr)
        return 2
    try:
        prepare_shards(
            args.data,
            args.out,
            verify=args.verify,
            limits=ScanLimits(max_sidecar_bytes=args.max_sidecar_bytes),
            image_size=args.image_size,
            quality=args.quality,
            chunk_bytes=args.chunk_mb * 1024 * 1024,
            workers=args.workers,
            log=lambda line: print(line, file=sys.stderr),
        )
    except (FileNotFoundError, FileExistsError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
