"""The persisted scan index: a dataset's scan result kept on disk and reused while the files are unchanged.

Scanning millions of sidecars and image headers takes minutes; a resume, or the next run over the
same folder, should not pay it again. ``scan_with_index`` keeps one ``.npz`` file per (dataset
root, manifest, verify mode, scan limits) in the index folder holding

* the scan's ``SampleTable``, its report (skips by reason with examples, dropped tags, ...) and
  the complete list of the samples it skipped (``SkippedSamples``: path, reason, detail),
* the folder's fingerprint: the scan's own listing (``folder_walk``): every image and sidecar
  file it could see, with its size, mtime and kind (and the manifest's, for a manifest).

On the next start it fingerprints the folder again (a directory walk and one ``stat`` a file, no
file is opened): an equal fingerprint means the saved scan is the scan, reused as it is. Any
difference (a file added, deleted, renamed or rewritten) means a new scan in which images that
passed the check before and are unchanged are not opened again; the index is then rewritten.
With no index yet, the folder is walked once, by the scan. ``data.rescan`` ignores the index. A
missing, unreadable or foreign index file is a new scan, never an error; a failure to write one
is reported and the run goes on (it only costs time).

The scan runs in this process: it keeps packed arrays and no per-file Python object outlives its
chunk (``dataset_scan``), so what it leaves behind is the table, not a fragmented heap (measured
by ``benchmarks/bench_scale.py``); its chunks run on a process pool for big folders.

It imports ``dataset_scan`` (the scan itself), ``folder_walk`` and ``sample_table``;
``data_setup`` calls it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import tempfile
import time
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np

from dataset_scan import DatasetScan, release_free_heap, scan_source
from folder_walk import Listing, walk_listing
from sample_table import SampleTable, SkippedSamples, take_ragged
from scan_limits import LinkPolicy, ScanLimits

__all__ = ["INDEX_VERSION", "Fingerprint", "PathSet", "fingerprint_folder", "index_file", "scan_arrays", "scan_from_arrays", "scan_with_index"]

# bump when what a scan keeps or skips changes, or the file's arrays: older indexes are then scanned again
# (2: the fingerprint is the scan's own listing, packed; the complete list of skipped samples)
INDEX_VERSION = 2
# the DatasetScan fields kept next to the table (records are the table; seconds is the new load time)
_SCAN_FIELDS = (
    "skipped",
    "examples",
    "unknown_rating",
    "root",
    "source",
    "verify",
    "max_examples",
    "dropped_tags",
    "dropped_tag_examples",
    "decoder_warnings",
)
_FP_ARRAYS = ("paths", "offsets", "sizes", "mtimes", "flags")


def _crc(blob: np.ndarray, offsets: np.ndarray) -> np.ndarray:
    """crc32 of every packed string, (n,) int64."""
    view = memoryview(blob)
    cuts = offsets.tolist()
    return np.fromiter((zlib.crc32(view[cuts[i] : cuts[i + 1]]) for i in range(len(cuts) - 1)), dtype=np.int64, count=len(cuts) - 1)


class PathSet:
    """A set of root-relative paths packed as UTF-8 (a blob, offsets and a crc32 index): membership
    in O(log n) with no Python string kept per path."""

    def __init__(self, blob: np.ndarray, offsets: np.ndarray) -> None:
        """The set of the packed strings (blob, offsets)."""
        self.blob, self.offsets = blob, offsets
        crcs = _crc(blob, offsets)
        self.order = np.argsort(crcs, kind="stable")
        self.sorted = crcs[self.order]

    def __len__(self) -> int:
        """Number of paths."""
        return len(self.offsets) - 1

    def rows(self, blob: np.ndarray, offsets: np.ndarray) -> np.ndarray:
        """For each packed string of (blob, offsets): its row here, or -1 (exact: equal bytes)."""
        crcs = _crc(blob, offsets)
        lo = np.searchsorted(self.sorted, crcs, "left")
        hi = np.searchsorted(self.sorted, crcs, "right")
        out = np.full(len(crcs), -1, dtype=np.int64)
        mine, theirs = memoryview(self.blob), memoryview(blob)
        for i in np.flatnonzero(hi > lo).tolist():
            text = theirs[offsets[i] : offsets[i + 1]]
            for row in self.order[lo[i] : hi[i]].tolist():
                if mine[self.offsets[row] : self.offsets[row + 1]] == text:
                    out[i] = row
                    break
        return out

    def __contains__(self, path: object) -> bool:
        """Whether `path` (a str) is in the set."""
        if not isinstance(path, str):
            return False
        raw = np.frombuffer(path.encode("utf-8", "surrogatepass"), dtype=np.uint8)
        return bool(self.rows(raw, np.asarray([0, len(raw)], dtype=np.int64))[0] >= 0)


@dataclass
class Fingerprint:
    """Every file a scan could read (folder_walk's listing: root-relative POSIX paths packed, with
    size, mtime and kind), and for a manifest source the manifest's path, size and mtime."""

    paths_blob: np.ndarray  # (B,) uint8
    offsets: np.ndarray  # (F + 1,) int64
    sizes: np.ndarray  # (F,) int64; -1 for a file that could not be stat'ed
    mtimes: np.ndarray  # (F,) int64 nanoseconds
    flags: np.ndarray  # (F,) int16: kind * 256 + refused code
    extra: str = ""

    @classmethod
    def from_listing(cls, listing: Listing, extra: str = "") -> "Fingerprint":
        """The fingerprint of what a walk found."""
        flags = listing.kinds.astype(np.int16) * 256 + listing.refused
        return cls(listing.paths, listing.offsets, listing.sizes, listing.mtimes, flags, extra)

    @property
    def paths(self) -> list[str]:
        """Every path as a string (for a look at a small folder: the arrays are the fingerprint)."""
        text = self.paths_blob.tobytes()
        cuts = self.offsets.tolist()
        return [text[cuts[i] : cuts[i + 1]].decode("utf-8", "surrogatepass") for i in range(len(cuts) - 1)]

    def __len__(self) -> int:
        """Number of files."""
        return len(self.sizes)

    def __eq__(self, other: object) -> bool:
        """Same files with the same sizes, mtimes and kinds."""
        if not isinstance(other, Fingerprint):
            return NotImplemented
        return self.extra == other.extra and all(
            np.array_equal(getattr(self, k), getattr(other, k)) for k in ("offsets", "paths_blob", "sizes", "mtimes", "flags")
        )

    def unchanged(self, earlier: "Fingerprint") -> np.ndarray:
        """(F,) bool: the files present in `earlier` too, with equal size, mtime and kind."""
        rows = PathSet(earlier.paths_blob, earlier.offsets).rows(self.paths_blob, self.offsets)
        found = rows >= 0
        same = np.zeros(len(self), dtype=bool)
        same[found] = (
            (earlier.sizes[rows[found]] == self.sizes[found])
            & (earlier.mtimes[rows[found]] == self.mtimes[found])
            & (earlier.flags[rows[found]] == self.flags[found])
        )
        return same

    def changes(self, earlier: "Fingerprint", unchanged: np.ndarray) -> dict[str, int]:
        """How many files were added, deleted and changed since `earlier` (`unchanged`: self.unchanged(earlier))."""
        both = int(np.count_nonzero(PathSet(earlier.paths_blob, earlier.offsets).rows(self.paths_blob, self.offsets) >= 0))
        return {"added": len(self) - both, "deleted": len(earlier) - both, "changed": both - int(np.count_nonzero(unchanged))}

    def to_arrays(self) -> dict[str, np.ndarray]:
        """The arrays of an index file."""
        return {"fp_paths": self.paths_blob, "fp_offsets": self.offsets, "fp_sizes": self.sizes, "fp_mtimes": self.mtimes, "fp_flags": self.flags}


def _manifest_extra(manifest: str | Path | None) -> str:
    """The manifest's path, size and mtime ('' without one)."""
    if manifest is None:
        return ""
    st = os.stat(manifest)
    return json.dumps([os.path.abspath(manifest), int(st.st_size), int(st.st_mtime_ns)])


def fingerprint_folder(root: str | Path, *, follow_links: bool = False, manifest: str | Path | None = None) -> Fingerprint:
    """The fingerprint of every image and sidecar file below `root`: the scan's own walk
    (folder_walk), linked folders followed as the data.symlinks policy says. No file is opened:
    one directory listing a folder, one stat a file."""
    root_abs = os.path.abspath(root)
    listing = walk_listing(root_abs, LinkPolicy(root_abs, "follow" if follow_links else "inside_root"))
    return Fingerprint.from_listing(listing, _manifest_extra(manifest))


def index_file(index_dir: str | Path, root: str | Path, *, manifest: str | Path | None, verify: str, limits: ScanLimits) -> Path:
    """The index file for this dataset and these scan settings (a hash of them names it)."""
    key = {
        "version": INDEX_VERSION,
        "root": os.path.abspath(root),
        "manifest": os.path.abspath(manifest) if manifest else "",
        "verify": verify,
        "limits": dataclasses.asdict(limits),
    }
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode("utf-8", "surrogatepass")).hexdigest()[:20]
    return Path(index_dir) / f"scan-{digest}.npz"


def scan_arrays(scan: DatasetScan, version: int, **meta: Any) -> dict[str, np.ndarray]:
    """A scan as .npz arrays: its table, its skipped samples, a format `version` and, as JSON, its report fields,
    the seconds it took and `meta` (the scan index's and the sharded dataset's tag index share this layout)."""
    fields = {k: getattr(scan, k) for k in _SCAN_FIELDS} | {"scan_seconds": scan.seconds, **meta}
    arrays = {f"table_{k}": v for k, v in scan.records.to_arrays().items()}
    arrays.update({f"skips_{k}": v for k, v in scan.skips.to_arrays().items()})
    arrays.update(version=np.asarray([version]), meta=np.frombuffer(json.dumps(fields).encode("utf-8", "surrogatepass"), dtype=np.uint8))
    return arrays


def scan_from_arrays(f: Any, version: int) -> tuple[DatasetScan, dict[str, Any]]:
    """The scan `scan_arrays` stored in an open .npz (`f`) and its JSON fields; ValueError for another format
    version or skipped samples that disagree with their counts (KeyError/TypeError for missing or odd arrays)."""
    if int(f["version"][0]) != version:
        raise ValueError(f"format {int(f['version'][0])}, expected {version}")
    meta = json.loads(f["meta"].tobytes().decode("utf-8", "surrogatepass"))
    table = SampleTable.from_arrays({k[len("table_") :]: f[k] for k in f.files if k.startswith("table_")})
    skips = SkippedSamples.from_arrays({k[len("skips_") :]: f[k] for k in f.files if k.startswith("skips_")})
    scan = DatasetScan(records=table, skips=skips, **{k: meta[k] for k in _SCAN_FIELDS})
    if skips.counts() != {k: v for k, v in scan.skipped.items() if v}:
        raise ValueError("the skipped samples disagree with their counts")
    return scan, meta


def _save(path: Path, fp: Fingerprint, scan: DatasetScan) -> None:
    """Write the index atomically (a temporary file in the same folder, then os.replace)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    arrays = scan_arrays(scan, INDEX_VERSION, fingerprint_extra=fp.extra)
    arrays.update(fp.to_arrays())
    handle, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(handle, "wb") as out:
            np.savez(out, **arrays)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _load(path: Path, with_fingerprint: bool = True) -> tuple[Fingerprint | None, DatasetScan, float]:
    """(fingerprint (None unless `with_fingerprint`), scan, seconds the original scan took) from an
    index file; ValueError when unreadable."""
    try:
        with np.load(path, allow_pickle=False) as f:
            scan, meta = scan_from_arrays(f, INDEX_VERSION)
            fp = None
            if with_fingerprint:
                fp = Fingerprint(*(f[f"fp_{k}"] for k in _FP_ARRAYS), extra=str(meta["fingerprint_extra"]))
                if len(fp.offsets) != len(fp.sizes) + 1 or not len(fp.sizes) == len(fp.mtimes) == len(fp.flags):
                    raise ValueError("fingerprint arrays of different lengths")
            return fp, scan, float(meta["scan_seconds"])
    except (OSError, KeyError, EOFError, IndexError, TypeError, ValueError) as exc:  # ValueError covers JSON and .npz errors
        raise ValueError(f"{path}: unreadable scan index ({type(exc).__name__}: {exc})") from exc


def _trusted_images(scan: DatasetScan, fp: Fingerprint, saved: Fingerprint) -> PathSet:
    """The saved scan's images whose file is unchanged (they passed the check): root-relative."""
    table = scan.records
    unchanged = fp.unchanged(saved)
    kept = PathSet(table.path_blob, table.path_offsets).rows(fp.paths_blob, fp.offsets) >= 0
    rows = np.flatnonzero(unchanged & kept)
    return PathSet(*take_ragged(fp.paths_blob, fp.offsets, rows))


def scan_with_index(
    root: str | Path,
    *,
    manifest: str | Path | None,
    verify: str,
    limits: ScanLimits,
    index_dir: str | Path,
    rescan: bool = False,
    write: bool = True,
    log: Callable[[str], None] | None = None,
) -> DatasetScan:
    """The scan of `root` (or of `manifest`): reused from the index when no file changed, else
    scanned (unchanged, already checked images not reopened) and the index rewritten when `write`.

    With no index yet, the folder is walked once: the scan's own listing is the fingerprint."""
    started = time.perf_counter()
    path = index_file(index_dir, root, manifest=manifest, verify=verify, limits=limits)
    saved: tuple[Fingerprint | None, DatasetScan, float] | None = None
    status: dict[str, Any] = {"file": str(path)}
    if not rescan and path.is_file():
        try:
            saved = _load(path)
        except ValueError as exc:
            status["unreadable"] = str(exc)
            if log:
                log(f"scan index: {exc}; scanning again")
    trusted: PathSet | frozenset[str] = frozenset()
    if saved is not None:
        fp = fingerprint_folder(root, follow_links=limits.symlinks == "follow", manifest=manifest)
        if saved[0] == fp:
            scan = saved[1]
            scan.seconds = time.perf_counter() - started
            scan.index = {**status, "reused": True, "files": len(fp), "first_scan_seconds": round(saved[2], 3)}
            return scan
        unchanged = fp.unchanged(saved[0])
        status["changes"] = fp.changes(saved[0], unchanged)
        trusted = _trusted_images(saved[1], fp, saved[0])
        del fp, unchanged
        saved = None  # the old table and fingerprint go before the new scan starts
        if log:
            c = status["changes"]
            log(f"scan index: {c['added']} files added, {c['deleted']} deleted, {c['changed']} changed since the last scan; scanning again")
    scan, save_error = _scan(str(root), str(manifest) if manifest else None, verify, limits, trusted, path if write else None)
    status.update(reused=False, files=scan.index.pop("files", 0), images_not_reopened=len(trusted), rescan=bool(rescan))
    if save_error:
        status["not_written"] = save_error
        if log:
            log(f"scan index: could not write {path} ({save_error}); the next start scans again")
    scan.index = status
    return scan


def _scan(root: str, manifest: str | None, verify: str, limits: ScanLimits, trusted: Any, index_path: Path | None) -> tuple[DatasetScan, str]:
    """The scan, and the index written to `index_path` when given: (scan, why the index could not
    be written, or ''). The folder scan's listing is its fingerprint; a manifest's folder is walked."""
    scan = scan_source(root, manifest=manifest, verify=verify, limits=limits, trusted=trusted, keep_listing=True)
    listing, scan.listing = scan.listing, None
    if listing is not None:
        fp = Fingerprint.from_listing(listing, _manifest_extra(manifest))
    else:
        fp = fingerprint_folder(root, follow_links=limits.symlinks == "follow", manifest=manifest)
    scan.index = {"files": len(fp)}
    error = ""
    if index_path is not None:
        try:
            _save(index_path, fp, scan)
        except OSError as exc:
            error = str(exc)
    del listing, fp
    release_free_heap()  # the fingerprint and the file's buffers are gone: their pages too
    return scan, error
