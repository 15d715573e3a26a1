"""The persisted scan index: a dataset's scan result kept on disk and reused while the files are unchanged.

Scanning millions of sidecars and image headers takes minutes; a resume, or the next run over the
same folder, should not pay it again. ``scan_with_index`` keeps one ``.npz`` file per (dataset
root, manifest, verify mode, scan limits) in the index folder holding

* the scan's ``SampleTable`` and its report (skips by reason with examples, dropped tags, ...),
* the folder's fingerprint: every image and sidecar file the scan could see, with its size and
  mtime (and the manifest's, for a manifest).

On the next start it fingerprints the folder again (a directory walk and one ``stat`` a file, no
file is opened): an equal fingerprint means the saved scan is the scan, reused as it is. Any
difference (a file added, deleted, renamed or rewritten) means a new scan in which images that
passed the check before and are unchanged are not opened again; the index is then rewritten.
``data.rescan`` ignores the index. A missing, unreadable or foreign index file is a new scan,
never an error; a failure to write one is reported and the run goes on (it only costs time).

It imports ``dataset_scan`` (the scan itself) and ``sample_table``; ``data_setup`` calls it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import multiprocessing
import os
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np

from dataset_scan import IMAGE_EXTENSIONS, DatasetScan, scan_source
from sample_table import SampleTable
from scan_limits import ScanLimits

__all__ = ["INDEX_VERSION", "Fingerprint", "fingerprint_folder", "index_file", "scan_with_index"]

INDEX_VERSION = 1  # bump when what a scan keeps or skips changes: older indexes are then scanned again
_SEEN_EXTENSIONS = IMAGE_EXTENSIONS | {".json"}
# folders with at least this many images and sidecars are scanned in a child process (see _scan_in_child)
CHILD_PROCESS_FILES = 20_000
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


@dataclass
class Fingerprint:
    """Every file a scan could read, as root-relative POSIX paths with their size and mtime."""

    paths: list[str]
    sizes: np.ndarray  # (F,) int64; -1 for a file that could not be stat'ed
    mtimes: np.ndarray  # (F,) int64 nanoseconds
    extra: str = ""  # the manifest's path, size and mtime for a manifest source

    def __eq__(self, other: object) -> bool:
        """Same files with the same sizes and mtimes."""
        if not isinstance(other, Fingerprint):
            return NotImplemented
        return (
            self.extra == other.extra
            and self.paths == other.paths
            and np.array_equal(self.sizes, other.sizes)
            and np.array_equal(self.mtimes, other.mtimes)
        )

    def unchanged(self, earlier: "Fingerprint") -> set[str]:
        """Paths present in both with equal size and mtime."""
        before = {p: (int(s), int(m)) for p, s, m in zip(earlier.paths, earlier.sizes.tolist(), earlier.mtimes.tolist())}
        return {p for p, s, m in zip(self.paths, self.sizes.tolist(), self.mtimes.tolist()) if before.get(p) == (s, m)}

    def changes(self, earlier: "Fingerprint", unchanged: set[str]) -> dict[str, int]:
        """How many files were added, deleted and changed since `earlier` (`unchanged`: self.unchanged(earlier))."""
        now, before = set(self.paths), set(earlier.paths)
        return {"added": len(now - before), "deleted": len(before - now), "changed": len(now & before) - len(unchanged)}


def _pack_paths(paths: list[str]) -> np.ndarray:
    """NUL-separated UTF-8 (no file name holds a NUL) as uint8."""
    return np.frombuffer("\0".join(paths).encode("utf-8", "surrogatepass"), dtype=np.uint8)


def _unpack_paths(blob: np.ndarray) -> list[str]:
    """The inverse of _pack_paths."""
    text = blob.tobytes().decode("utf-8", "surrogatepass")
    return text.split("\0") if text else []


def _list_folder(path: str, follow_links: bool, root_real: str, seen_real: set[str]) -> tuple[list[tuple[str, int, int]], list[str]]:
    """(sorted (name, size, mtime) of the folder's images and sidecars, sorted sub-folder names to visit)."""
    files: list[tuple[str, int, int]] = []
    folders: list[str] = []
    with os.scandir(path) as it:
        for entry in it:
            name = entry.name
            try:
                is_dir = entry.is_dir()
            except OSError:
                is_dir = False
            if is_dir:
                if entry.is_symlink():  # linked folders once, and outside the root only with follow_links
                    real = os.path.realpath(entry.path)
                    if real in seen_real or not (follow_links or real.startswith(root_real)):
                        continue
                    seen_real.add(real)
                folders.append(name)
                continue
            dot = name.rfind(".")
            if dot < 0 or name[dot:].lower() not in _SEEN_EXTENSIONS:
                continue
            try:
                st = entry.stat()
                files.append((name, int(st.st_size), int(st.st_mtime_ns)))
            except OSError:  # a broken link or a file gone since the listing
                files.append((name, -1, -1))
    files.sort()
    folders.sort()
    return files, folders


def fingerprint_folder(root: str | Path, *, follow_links: bool = False, manifest: str | Path | None = None) -> Fingerprint:
    """The fingerprint of every image and sidecar file below `root`, folder by folder in sorted
    order: linked folders are followed once, those outside `root` only with `follow_links` (as the
    scan's link policy does). No file is opened: one directory listing a folder, one stat a file."""
    root_abs = os.path.abspath(root)
    root_real = os.path.join(os.path.realpath(root_abs), "")
    seen_real = {os.path.realpath(root_abs)}
    paths: list[str] = []
    sizes: list[int] = []
    mtimes: list[int] = []
    stack = [""]
    while stack:
        rel = stack.pop()
        prefix = rel + "/" if rel else ""
        try:
            files, folders = _list_folder(os.path.join(root_abs, rel) if rel else root_abs, follow_links, root_real, seen_real)
        except OSError:
            files, folders = [("", -1, -1)], []  # an unreadable folder: the scan reports it; the fingerprint notes it
        for name, size, mtime in files:
            paths.append(prefix + name)
            sizes.append(size)
            mtimes.append(mtime)
        stack.extend(prefix + name for name in reversed(folders))
    extra = ""
    if manifest is not None:
        st = os.stat(manifest)
        extra = json.dumps([os.path.abspath(manifest), int(st.st_size), int(st.st_mtime_ns)])
    return Fingerprint(paths, np.asarray(sizes, dtype=np.int64), np.asarray(mtimes, dtype=np.int64), extra)


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


def _save(path: Path, fp: Fingerprint, scan: DatasetScan) -> None:
    """Write the index atomically (a temporary file in the same folder, then os.replace)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    meta = {k: getattr(scan, k) for k in _SCAN_FIELDS}
    meta["scan_seconds"] = scan.seconds
    meta["fingerprint_extra"] = fp.extra
    arrays = {f"table_{k}": v for k, v in scan.records.to_arrays().items()}
    arrays.update(
        version=np.asarray([INDEX_VERSION]),
        meta=np.frombuffer(json.dumps(meta).encode("utf-8", "surrogatepass"), dtype=np.uint8),
        fp_paths=_pack_paths(fp.paths),
        fp_sizes=fp.sizes,
        fp_mtimes=fp.mtimes,
    )
    handle, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(handle, "wb") as out:
            np.savez(out, **arrays)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _load(path: Path) -> tuple[Fingerprint, DatasetScan, float]:
    """(fingerprint, scan, seconds the original scan took) from an index file; ValueError when unreadable."""
    try:
        with np.load(path, allow_pickle=False) as f:
            if int(f["version"][0]) != INDEX_VERSION:
                raise ValueError(f"index format {int(f['version'][0])}, expected {INDEX_VERSION}")
            meta = json.loads(f["meta"].tobytes().decode("utf-8", "surrogatepass"))
            table = SampleTable.from_arrays({k[len("table_") :]: f[k] for k in f.files if k.startswith("table_")})
            fp = Fingerprint(_unpack_paths(f["fp_paths"]), f["fp_sizes"], f["fp_mtimes"], str(meta["fingerprint_extra"]))
            scan = DatasetScan(records=table, **{k: meta[k] for k in _SCAN_FIELDS})
            return fp, scan, float(meta["scan_seconds"])
    except (OSError, KeyError, EOFError, IndexError, TypeError, ValueError) as exc:  # ValueError covers JSON and .npz errors
        raise ValueError(f"{path}: unreadable scan index ({type(exc).__name__}: {exc})") from exc


def _trusted_images(scan: DatasetScan, unchanged: set[str]) -> frozenset[str]:
    """Image paths of the saved scan's samples whose file is unchanged (they passed the check)."""
    table = scan.records
    prefix = os.path.join(table.root, "")
    out = set()
    for i in range(len(table)):
        path = table.image_path(i)
        if path.startswith(prefix) and path[len(prefix) :].replace(os.sep, "/") in unchanged:
            out.add(path)
    return frozenset(out)


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
    scanned (unchanged, already checked images not reopened) and the index rewritten when `write`."""
    started = time.perf_counter()
    path = index_file(index_dir, root, manifest=manifest, verify=verify, limits=limits)
    fp = fingerprint_folder(root, follow_links=limits.symlinks == "follow", manifest=manifest)
    saved: tuple[Fingerprint, DatasetScan, float] | None = None
    status: dict[str, Any] = {"file": str(path)}
    if not rescan and path.is_file():
        try:
            saved = _load(path)
        except ValueError as exc:
            status["unreadable"] = str(exc)
            if log:
                log(f"scan index: {exc}; scanning again")
    if saved is not None and saved[0] == fp:
        scan = saved[1]
        scan.seconds = time.perf_counter() - started
        scan.index = {**status, "reused": True, "files": len(fp.paths), "first_scan_seconds": round(saved[2], 3)}
        return scan
    trusted: frozenset[str] = frozenset()
    if saved is not None:
        unchanged = fp.unchanged(saved[0])
        status["changes"] = fp.changes(saved[0], unchanged)
        trusted = _trusted_images(saved[1], unchanged)
        if log:
            c = status["changes"]
            log(f"scan index: {c['added']} files added, {c['deleted']} deleted, {c['changed']} changed since the last scan; scanning again")
    job = (str(root), str(manifest) if manifest else None, verify, limits, trusted)
    if len(fp.paths) >= CHILD_PROCESS_FILES:
        scan = _scan_in_child(job)
    else:
        scan = _scan(job)
    status.update(reused=False, files=len(fp.paths), images_not_reopened=len(trusted), rescan=bool(rescan))
    if write:
        try:
            _save(path, fp, scan)
        except OSError as exc:
            status["not_written"] = str(exc)
            if log:
                log(f"scan index: could not write {path} ({exc}); the next start scans again")
    scan.index = status
    return scan


def _scan(job: tuple[str, str | None, str, ScanLimits, frozenset[str]]) -> DatasetScan:
    """The scan itself (a module-level function: it runs in a spawned child)."""
    root, manifest, verify, limits, trusted = job
    return scan_source(root, manifest=manifest, verify=verify, limits=limits, trusted=trusted)


def _scan_in_child(job: tuple[str, str | None, str, ScanLimits, frozenset[str]]) -> DatasetScan:
    """_scan in a spawned process. A scan makes millions of short-lived objects interleaved with a
    few long-lived ones, and the allocator cannot give the fragmented heap back: in this process
    it stayed at ~2 KB a sample after the scan was gone. The child's heap goes with the child; the
    table comes back as a few arrays."""
    with ProcessPoolExecutor(max_workers=1, mp_context=multiprocessing.get_context("spawn")) as pool:
        return pool.submit(_scan, job).result()
