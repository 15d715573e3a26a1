"""Dataset discovery and checking: image folders with sidecar JSON, or a JSON Lines manifest.

This module owns everything from a user's image folder to a table of usable samples
(``sample_table.SampleTable``) and the list of every sample left out (``DatasetScan``): the folder
scan (``scan_dataset``), ``load_manifest``, the ``DatasetScanner`` that picks between them, and the
reports on a scan (``check_scan_quality``, ``write_data_report``, ``format_scan_summary``,
``filter_known_tags``). Nothing here ever writes into the user's dataset folder.

The folder scan walks the folder once (``folder_walk``), cuts the listing into chunks of a few
thousand files and pairs, reads and checks each chunk (``folder_pairing.scan_chunk``): in this
process for a small folder, else on one spawned process a core, results merged in chunk order.
What it keeps grows by a few hundred bytes a sample: the listing's arrays, the table being built,
the skipped samples packed (``SkippedSamples``); no Python object a file outlives its chunk. The
result is the same whichever way it ran (the chunks are the same, the merge is in order).

It imports ``file_io`` (atomic write), ``folder_walk``, ``folder_pairing``, ``image_audit`` (the
image check and the process pool), ``sample_table``, ``sidecar_format`` (tags and ratings of one
sidecar, re-exported here) and ``scan_limits``; not the vocabulary, so that ``vocabulary``'s build
command can import this module.
"""

from __future__ import annotations

import array
import bisect
import contextlib
import ctypes
import json
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Container, Iterable, Iterator, Mapping, Sequence

import numpy as np

from file_io import atomic_write_text
from folder_pairing import SKIP_REASONS, ChunkJob, ChunkResult, ForeignClaim, OutsideRootError, parse_limited, resolve_inside, scan_chunk
from folder_walk import IMAGE, IMAGE_EXTENSIONS, Listing, split_rel, walk_listing
from image_audit import ProcessMap, check_images_job, scan_processes
from sample_table import SampleRecord, SampleTable, SampleTableBuilder, SkippedSamples
from scan_limits import LinkPolicy, ScanLimits, WarningLog, is_utf8
from sidecar_format import TAG_CATEGORIES, parse_rating, parse_sidecar, split_tag_string

__all__ = [
    "IMAGE_EXTENSIONS",
    "SKIP_REASONS",
    "TAG_CATEGORIES",
    "PARALLEL_SCAN_MIN",
    "CHUNK_FILES",
    "SampleRecord",
    "DatasetScan",
    "DataQualityError",
    "parse_rating",
    "split_tag_string",
    "parse_sidecar",
    "read_json",
    "scan_dataset",
    "scan_source",
    "load_manifest",
    "DatasetScanner",
    "filter_known_tags",
    "check_scan_quality",
    "write_data_report",
    "format_scan_summary",
    "release_free_heap",
]

# folders with at least this many images and sidecars are scanned on one process a core
PARALLEL_SCAN_MIN = 40_000
# listed files a chunk (about half as many samples): small enough to spread over the cores and
# to keep little in flight, large enough that a chunk's start costs nothing next to its work
CHUNK_FILES = 2_000

# The limits when the caller gives none (ScanLimits is frozen, so one shared instance is safe).
DEFAULT_LIMITS = ScanLimits()


class DataQualityError(ValueError):
    """Raised when the share of bad data passes the configured limit."""


# --------------------------------------------------------------------------------------------
# Scan results
# --------------------------------------------------------------------------------------------


@dataclass
class DatasetScan:
    """Result of scanning a folder or manifest: the records kept and what was skipped and why.

    ``skips`` holds every sample the scan dropped (see ``skipped_entries``); ``skipped`` counts
    them by reason and ``examples`` keeps the first few of each for the summary. ``add_skipped``
    counts samples dropped after the scan (the prepared cache's failures) into ``skipped`` and
    ``examples`` only: whoever drops them lists them."""

    records: SampleTable | list[SampleRecord]
    skipped: dict[str, int] = field(default_factory=dict)
    examples: dict[str, list[str]] = field(default_factory=dict)
    unknown_rating: int = 0
    root: str = ""
    source: str = "folder"
    verify: str = "header"
    seconds: float = 0.0
    max_examples: int = 5
    dropped_tags: dict[str, int] = field(default_factory=dict)
    dropped_tag_examples: list[str] = field(default_factory=list)
    decoder_warnings: dict[str, int] = field(default_factory=dict)
    index: dict[str, Any] = field(default_factory=dict)  # scan_index's status: reused or rescanned, and why
    skips: SkippedSamples = field(default_factory=lambda: SkippedSamples(SKIP_REASONS), repr=False)
    # the folder scan's listing: scan_index saves it as the fingerprint, then lets it go
    listing: Listing | None = field(default=None, repr=False, compare=False)

    @property
    def num_skipped(self) -> int:
        """Total number of samples skipped, all reasons together."""
        return int(sum(self.skipped.values()))

    def skipped_entries(self) -> Iterator[tuple[str, str, str]]:
        """Every sample the scan dropped, once each, as (path, reason, detail): `path` is the file
        the reason is about, relative to the dataset root ('/'-separated; for a folder scan the
        sidecar for sidecar problems, the image for image problems; for a manifest 'line N' or the
        image), with characters that are not UTF-8 as backslash escapes (scan_limits.printable);
        `reason` one of SKIP_REASONS; `detail` the message. Folder scans list them in walk order,
        manifests in line order. Samples counted later by add_skipped are not in it."""
        return iter(self.skips)

    def add_skipped(self, reason: str, count: int, examples: Iterable[str] = ()) -> None:
        """Count `count` more samples skipped for `reason`, keeping a few example details."""
        if count <= 0:
            return
        self.skipped[reason] = self.skipped.get(reason, 0) + int(count)
        bucket = self.examples.setdefault(reason, [])
        for example in examples:
            if len(bucket) >= self.max_examples:
                break
            bucket.append(example)

    def to_report(self) -> dict[str, Any]:
        """A JSON-able summary: counts by reason, a few examples each, the unknown-rating count."""
        return {
            "source": self.source,
            "root": self.root,
            "verify": self.verify,
            "num_samples": len(self.records),
            "num_skipped": self.num_skipped,
            "skipped": dict(sorted(self.skipped.items())),
            "examples": {k: list(v) for k, v in sorted(self.examples.items())},
            "unknown_rating": self.unknown_rating,
            "dropped_tags": dict(sorted(self.dropped_tags.items())),
            "dropped_tag_examples": list(self.dropped_tag_examples),
            "decoder_warnings": dict(self.decoder_warnings),
            "scan_seconds": round(self.seconds, 3),
        } | ({"scan_index": dict(self.index)} if self.index else {})


def read_json(path: str) -> Any:
    """Parse one JSON file (UTF-8, a BOM tolerated)."""
    with open(path, "r", encoding="utf-8-sig") as handle:
        return json.load(handle)


def _check_verify(verify: str) -> None:
    """Raise ValueError for an unknown verify mode."""
    if verify not in ("none", "header", "decode"):
        raise ValueError(f"verify must be 'none', 'header' or 'decode', got {verify!r}")


class _Merge:
    """The scan's results, chunk after chunk, packed as they arrive; a chunk run again (claims
    across chunks) replaces its earlier rows, and `finish` puts every row in listing order."""

    def __init__(self, root: str, max_examples: int) -> None:
        """Nothing merged yet."""
        self.max_examples = max_examples
        self.builder = SampleTableBuilder(root)
        self.keys = array.array("q")
        self.skips = SkippedSamples(SKIP_REASONS)
        self.chunks: dict[int, tuple[int, int, int, int, ChunkResult]] = {}  # index -> rows, skips, summary
        self.foreign: list[tuple[int, ForeignClaim]] = []

    def add(self, index: int, result: ChunkResult) -> None:
        """Append chunk `index`'s results (replacing what it gave before); remember its open claims."""
        rows, skips = len(self.builder), len(self.skips)
        self.builder.extend(result.table)
        self.keys.frombytes(result.keys.astype(np.int64).tobytes())
        self.skips.extend(result.skips)
        self.foreign.extend((index, claim) for claim in result.foreign)
        # the rows and skips are kept; the summary needs none of the chunk's arrays
        result.table, result.skips, result.keys = SampleTable.from_records([]), SkippedSamples(), np.zeros(0, dtype=np.int64)
        self.chunks[index] = (rows, len(self.builder), skips, len(self.skips), result)

    def finish(self, scan: DatasetScan, replaced: Iterable[tuple[int, int, int, int]]) -> None:
        """Fill `scan` from everything merged; `replaced` are the (row, skip) ranges of chunk runs
        that a later run of the same chunk replaced."""
        keys = np.frombuffer(self.keys, dtype=np.int64) if len(self.keys) else np.zeros(0, dtype=np.int64)
        keep, keep_skips = np.ones(len(keys), dtype=bool), np.ones(len(self.skips), dtype=bool)
        for r0, r1, s0, s1 in replaced:
            keep[r0:r1] = False
            keep_skips[s0:s1] = False
        table = self.builder.build()
        order = np.flatnonzero(keep)
        order = order[np.argsort(keys[order], kind="stable")]
        if len(order) != len(keys) or np.any(order != np.arange(len(keys))):
            table = table.select(order)
        skips = self.skips if keep_skips.all() else self.skips.select(keep_skips)
        scan.skips = skips.in_key_order()
        scan.records = table
        scan.skipped = scan.skips.counts()
        scan.examples = scan.skips.examples(self.max_examples)
        warnings = WarningLog()
        dropped: list[tuple[int, str]] = []
        for index in sorted(self.chunks):
            result = self.chunks[index][4]
            scan.unknown_rating += result.unknown_rating
            for reason, count in result.dropped_tags.items():
                scan.dropped_tags[reason] = scan.dropped_tags.get(reason, 0) + count
            dropped.extend(result.dropped_examples)
            warnings.merge(result.warnings)
        scan.dropped_tag_examples = [text for _, text in sorted(dropped)[: self.max_examples]]
        scan.decoder_warnings = warnings.to_report()


class _Plan:
    """How a listing is cut into chunks, and the ChunkJob of each."""

    def __init__(self, listing: Listing, chunk_files: int, job: dict[str, Any], trusted: Container[str]) -> None:
        """Cut the listing: whole folders together up to `chunk_files` rows, a bigger folder at
        name boundaries (see folder_pairing); `job`: the ChunkJob fields all chunks share."""
        self.listing, self.job, self.trusted = listing, job, trusted
        self._owners: dict[str, list[tuple[str | None, str | None, int]]] | None = None
        self._folders: dict[str, tuple[int, int]] | None = None
        self.chunks: list[tuple[list[tuple[int, int]], list[tuple[str, str | None, str | None]]]] = []
        rows: list[tuple[int, int]] = []
        cover: list[tuple[str, str | None, str | None]] = []
        size = 0
        for folder, first, end in listing.folders:
            if size and size + end - first > chunk_files:
                self.chunks.append((rows, cover))
                rows, cover, size = [], [], 0
            if end - first <= chunk_files:
                rows.append((first, end))
                cover.append((folder, None, None))
                size += end - first
                continue
            self._split(folder, first, end, chunk_files)
        if rows:
            self.chunks.append((rows, cover))

    def _split(self, folder: str, first: int, end: int, chunk_files: int) -> None:
        """Chunks of one big folder, cut only where a name's first dotted part changes."""
        cut = len(folder) + 1 if folder else 0
        names = [path[cut:] for path in self.listing.path_list(first, end)]
        start = first
        for i in range(1, len(names)):
            at = first + i
            if at - start >= chunk_files and names[i].split(".", 1)[0] != names[i - 1].split(".", 1)[0]:
                self.chunks.append(([(start, at)], [(folder, names[start - first] if start > first else None, names[i])]))
                start = at
        self.chunks.append(([(start, end)], [(folder, names[start - first] if start > first else None, None)]))

    def make_job(self, index: int, **extra: Any) -> ChunkJob:
        """The job of chunk `index` (one past the cut chunks is an empty one `owner` added)."""
        rows, cover = self.chunks[index]
        files: list[tuple[int, str, int, int, str]] = []
        for first, end in rows:
            paths = self.listing.path_list(first, end)
            kinds, refused = self.listing.kinds[first:end].tolist(), self.listing.refused[first:end].tolist()
            files.extend((first + k, paths[k], kinds[k], refused[k], self.listing.notes.get(first + k, "")) for k in range(end - first))
        trusted = frozenset(rel for _, rel, kind, _, _ in files if kind == IMAGE and rel in self.trusted) if self.trusted else frozenset()
        return ChunkJob(files=files, cover=cover, trusted=trusted, **self.job, **extra)

    def record_stats(self, index: int, result: ChunkResult) -> None:
        """Put the sizes and mtimes chunk `index` found into the listing (its fingerprint)."""
        if result.stats is not None:
            rows = np.concatenate([np.arange(first, end) for first, end in self.chunks[index][0]] or [np.zeros(0, dtype=np.int64)])
            self.listing.sizes[rows], self.listing.mtimes[rows] = result.stats[:, 0], result.stats[:, 1]
            result.stats = None

    def owner(self, rel: str) -> int:
        """The chunk that owns `rel`; a new empty chunk owning just it when none does."""
        if self._owners is None:
            self._owners = {}
            for index, (_, cover) in enumerate(self.chunks):
                for folder, lo, hi in cover:
                    self._owners.setdefault(folder, []).append((lo, hi, index))
        folder, name = split_rel(rel)
        for lo, hi, index in self._owners.get(folder, ()):
            if (lo is None or name >= lo) and (hi is None or name < hi):
                return index
        self.chunks.append(([], [(folder, name, name + "\0")]))
        self._owners.setdefault(folder, []).append((name, name + "\0", len(self.chunks) - 1))
        return len(self.chunks) - 1

    def find(self, rel: str, policy: LinkPolicy) -> str | None:
        """`rel` when it is a listed image or an existing file the link policy allows, else None."""
        if self._folders is None:
            self._folders = {folder: (first, end) for folder, first, end in self.listing.folders}
        first, end = self._folders.get(split_rel(rel)[0], (0, 0))
        i = first + bisect.bisect_left(range(first, end), rel, key=self.listing.path)
        if i < end and self.listing.path(i) == rel and self.listing.kinds[i] == IMAGE:
            return rel
        path = os.path.join(self.listing.root, *rel.split("/"))
        return rel if os.path.isfile(path) and policy.reason_for_file(path) is None else None


def _settle_foreign(plan: _Plan, merge: _Merge, policy: LinkPolicy, pool: ProcessMap) -> list[tuple[int, int, int, int]]:
    """Decide the claims of sidecars on files outside their chunk, as a scan of the whole folder
    would: the chunks that own claimed files decide between claims (in listing order), then every
    chunk involved runs again knowing the outcome. Returns the replaced row and skip ranges."""
    claims = sorted(merge.foreign, key=lambda item: item[1].key)
    merge.foreign = []
    verdicts: dict[int, dict[int, tuple[str, str, str]]] = {}
    incoming: dict[int, list[ForeignClaim]] = {}
    claimer: dict[int, int] = {}
    for index, claim in claims:
        claimer[claim.key] = index
        found = plan.find(claim.target, policy)
        if found is None and claim.ext_target is not None:
            found = plan.find(claim.ext_target, policy)
        if found is None:
            verdicts.setdefault(index, {})[claim.key] = ("missing", claim.target, "")
        else:
            incoming.setdefault(plan.owner(found), []).append(claim._replace(target=found))
    owners = sorted(incoming)
    first_round = (plan.make_job(owner, foreign_in=incoming[owner], verdicts=verdicts.get(owner, {})) for owner in owners)
    for owner, decided in zip(owners, pool.map(scan_chunk, first_round)):
        for claim in incoming[owner]:
            verdicts.setdefault(claimer[claim.key], {})[claim.key] = decided.verdicts[claim.key]
    involved = sorted(set(incoming) | set(verdicts))
    replaced = [merge.chunks[index][:4] for index in involved if index in merge.chunks]
    second_round = (plan.make_job(index, foreign_in=incoming.get(index, []), verdicts=verdicts.get(index, {})) for index in involved)
    for index, result in zip(involved, pool.map(scan_chunk, second_round)):
        merge.add(index, result)
    if merge.foreign:  # every claim had its verdict: none can stay open
        raise RuntimeError(f"scan: claims across chunks left undecided: {merge.foreign[:3]}")
    return replaced


def scan_dataset(
    root: str | Path,
    *,
    verify: str = "header",
    num_threads: int = 8,
    max_examples: int = 5,
    limits: ScanLimits = DEFAULT_LIMITS,
    trusted: Container[str] = frozenset(),
    processes: int | None = None,
    parallel_min: int = PARALLEL_SCAN_MIN,
    chunk_files: int = CHUNK_FILES,
    keep_listing: bool = False,
) -> DatasetScan:
    """Find every image with a sidecar under `root`, check them, and list what was skipped.

    `trusted`: root-relative paths of unchanged images that passed the check before (not opened
    again). A folder of `parallel_min` listed files or more is scanned on `processes` spawned
    processes (default: one a usable core); fewer, here. `chunk_files` sets the chunk size; the
    result does not depend on where the chunks ran. `keep_listing`: keep the walk's listing in
    scan.listing (the scan index saves it as the fingerprint)."""
    started = time.perf_counter()
    _check_verify(verify)
    root_path = Path(root)
    if not root_path.is_dir():
        raise FileNotFoundError(f"dataset root {str(root_path)!r} does not exist or is not a directory")
    root_abs = os.path.abspath(root_path)
    policy = LinkPolicy(root_abs, limits.symlinks)
    wanted = scan_processes() if processes is None else processes
    with contextlib.ExitStack() as stack:
        pool = ProcessMap(1)

        def start_pool(rows: int) -> None:
            """Start the pool once the folder is big enough: it boots while the walk goes on."""
            nonlocal pool
            if rows >= parallel_min and wanted >= 2 and pool.processes < 2:
                pool = stack.enter_context(ProcessMap(wanted))

        # the pool stats the files as it reads them: the walk only lists
        listing = walk_listing(root_abs, policy, start_pool, stat=False)
        start_pool(len(listing))
        threads = num_threads if pool.processes < 2 else 1  # in a pool the processes are the parallelism: threads only cost
        shared = {"root": root_abs, "verify": verify, "limits": limits, "max_examples": max_examples, "num_threads": threads, "stat": True}
        plan = _Plan(listing, chunk_files, shared, trusted)
        merge = _Merge(root_abs, max_examples)
        jobs = (plan.make_job(i) for i in range(len(plan.chunks)))
        for index, result in enumerate(pool.map(scan_chunk, jobs)):
            plan.record_stats(index, result)
            merge.add(index, result)
        replaced = _settle_foreign(plan, merge, policy, pool) if merge.foreign else []
    scan = DatasetScan(
        records=[], root=root_abs, source="folder", verify=verify, max_examples=max_examples, listing=listing if keep_listing else None
    )
    merge.finish(scan, replaced)
    del merge, plan
    release_free_heap()
    scan.seconds = time.perf_counter() - started
    return scan


def release_free_heap() -> None:
    """Hand the C heap's free pages back to the OS (glibc's malloc_trim): the chunks' arrays came
    and went in this process, and the free heap they leave is not reused by Python's objects, so
    it would sit under the next phase's peak (~20 B a sample at 300,000). Elsewhere nothing to do."""
    if not sys.platform.startswith("linux"):
        return
    try:
        trim = ctypes.CDLL(None).malloc_trim
    except (OSError, AttributeError):  # not glibc (musl has no malloc_trim)
        return
    trim(0)


# --------------------------------------------------------------------------------------------
# Manifest
# --------------------------------------------------------------------------------------------


class _ManifestLines:
    """The state of one manifest read: candidates packed as they are found, skips, dropped tags."""

    def __init__(self, root_abs: str, limits: ScanLimits, max_examples: int) -> None:
        """Nothing read yet."""
        self.root_abs, self.limits, self.max_examples = root_abs, limits, max_examples
        self.policy = LinkPolicy(root_abs, limits.symlinks)
        self.skips = SkippedSamples(SKIP_REASONS)
        self.candidates = SampleTableBuilder(root_abs)
        self.lines = array.array("q")  # each candidate's line
        self.seen: dict[str, int] = {}
        self.dropped: dict[str, int] = {}
        self.dropped_examples: list[str] = []

    def skip(self, lineno: int, reason: str, detail: str) -> None:
        """Count one dropped line."""
        self.skips.add(reason, f"line {lineno}", detail, lineno)

    def read(self, lineno: int, text: str) -> None:
        """Check one non-empty line; a usable one becomes a candidate."""
        if len(text) > self.limits.max_sidecar_bytes:
            return self.skip(lineno, "sidecar_too_large", "longer than data.max_sidecar_bytes")
        try:
            obj = json.loads(text)
        except json.JSONDecodeError as exc:
            return self.skip(lineno, "manifest_line_invalid", f"invalid JSON: {exc}")
        if not isinstance(obj, dict):
            return self.skip(lineno, "manifest_line_invalid", f"JSON {type(obj).__name__}, expected an object")
        file_value = obj.get("file", obj.get("filename"))
        if not isinstance(file_value, str) or not file_value.strip():
            return self.skip(lineno, "manifest_line_invalid", "missing or non-string 'file'")
        if not is_utf8(file_value):
            return self.skip(lineno, "name_not_utf8", "'file' is not valid UTF-8")
        outcome, dropped = parse_limited(obj, self.limits, "manifest_line_invalid")
        for reason, count in dropped.items():
            self.dropped[reason] = self.dropped.get(reason, 0) + count
            if len(self.dropped_examples) < self.max_examples:
                self.dropped_examples.append(f"line {lineno}: {count} {reason}")
        if isinstance(outcome[0], str):
            return self.skip(lineno, outcome[0], outcome[1])
        try:
            target = resolve_inside("", file_value.strip())
        except OutsideRootError as exc:
            return self.skip(lineno, "path_outside_root", str(exc))
        if target in self.seen:
            return self.skip(lineno, "duplicate_image", f"{target!r} already on line {self.seen[target]}")
        self.seen[target] = lineno
        path = os.path.join(self.root_abs, *target.split("/"))
        link_reason = self.policy.reason_for_file(path)
        if link_reason is not None and os.path.lexists(path):
            return self.skip(lineno, link_reason, f"{target}: a link the data.symlinks policy refuses")
        tags, cats, rating = outcome
        self.candidates.add(target, path, tags, cats, rating)
        self.lines.append(lineno)
        return None


def _check_candidates(
    table: SampleTable, verify: str, num_threads: int, trusted: Container[str], processes: int, chunk_files: int, warnings: WarningLog
) -> list[tuple[int, str | None, str]]:
    """(row, reason, detail) of every candidate whose image fails the check, in row order; the
    images are checked a chunk at a time (on `processes` processes when more than one)."""
    rows = [i for i in range(len(table)) if table.sample_id(i) not in trusted]
    jobs = (([table.image_path(i) for i in rows[k : k + chunk_files]], verify, num_threads) for k in range(0, len(rows), chunk_files))
    failed = []
    with ProcessMap(processes) as pool:
        for k, (results, caught) in enumerate(pool.map(check_images_job, jobs)):
            warnings.add_messages(caught)
            failed.extend((rows[k * chunk_files + j], reason, detail) for j, (reason, detail) in enumerate(results) if reason is not None)
    return failed


def load_manifest(
    path: str | Path,
    root: str | Path | None = None,
    *,
    verify: str = "header",
    num_threads: int = 8,
    max_examples: int = 5,
    limits: ScanLimits = DEFAULT_LIMITS,
    trusted: Container[str] = frozenset(),
    processes: int | None = None,
    parallel_min: int = PARALLEL_SCAN_MIN,
    chunk_files: int = CHUNK_FILES,
) -> DatasetScan:
    """Records from a JSON Lines manifest of {"file", "tags", "rating"} objects, checked like a scan.

    ``file`` is relative to `root` when given, else to the manifest's folder; `trusted`, the
    pool and the chunks as for scan_dataset (the lines are read here, the images checked on the
    pool). Skipped lines are listed as 'line N' (the image, when its check fails)."""
    started = time.perf_counter()
    _check_verify(verify)
    manifest = Path(path)
    if not manifest.is_file():
        raise FileNotFoundError(f"manifest {str(manifest)!r} does not exist or is not a file")
    root_path = Path(root) if root is not None else manifest.parent
    if not root_path.is_dir():
        raise FileNotFoundError(f"dataset root {str(root_path)!r} does not exist or is not a directory")
    root_abs = os.path.abspath(root_path)
    state = _ManifestLines(root_abs, limits, max_examples)
    with open(manifest, "r", encoding="utf-8-sig", errors="surrogateescape") as handle:
        for lineno, line in enumerate(handle, start=1):
            text = line.strip()
            if text:
                state.read(lineno, text)
    state.seen.clear()
    table = state.candidates.build()
    lines = np.frombuffer(state.lines, dtype=np.int64) if len(state.lines) else np.zeros(0, dtype=np.int64)
    warnings = WarningLog()
    keep = np.ones(len(table), dtype=bool)
    if len(table):
        use = (processes or scan_processes()) if len(table) >= parallel_min // 2 else 1
        for row, reason, detail in _check_candidates(table, verify, num_threads if use < 2 else 2, trusted, use, chunk_files, warnings):
            keep[row] = False
            state.skips.add(reason, table.sample_id(row), detail, int(lines[row]))
    scan = DatasetScan(records=table if keep.all() else table.select(keep), root=root_abs, source=f"manifest:{manifest}", verify=verify)
    scan.skips = state.skips.in_key_order()
    scan.skipped, scan.examples = scan.skips.counts(), scan.skips.examples(max_examples)
    scan.unknown_rating = int(np.count_nonzero(scan.records.ratings < 0))
    scan.max_examples, scan.dropped_tags, scan.dropped_tag_examples = max_examples, state.dropped, state.dropped_examples
    scan.decoder_warnings = warnings.to_report()
    scan.seconds = time.perf_counter() - started
    return scan


def scan_source(
    root: str | Path,
    *,
    manifest: str | Path | None,
    verify: str,
    limits: ScanLimits,
    trusted: Container[str] = frozenset(),
    keep_listing: bool = False,
) -> DatasetScan:
    """The folder scan of `root`, or the records of `manifest` with their files resolved against
    `root` (`trusted`: root-relative images not opened again; `keep_listing` as for scan_dataset)."""
    if manifest:
        return load_manifest(manifest, root, verify=verify, limits=limits, trusted=trusted)
    return scan_dataset(root, verify=verify, limits=limits, trusted=trusted, keep_listing=keep_listing)


class DatasetScanner:
    """Scans a dataset given as a folder of images with sidecars or as a JSON Lines manifest."""

    def __init__(
        self,
        source: str | Path,
        *,
        root: str | Path | None = None,
        verify: str = "header",
        num_threads: int = 8,
        max_examples: int = 5,
        limits: ScanLimits = DEFAULT_LIMITS,
    ) -> None:
        """Remember where the data is; `root` only applies to manifests."""
        _check_verify(verify)
        self.source = Path(source)
        self.root = Path(root) if root is not None else None
        self.verify = verify
        self.num_threads = num_threads
        self.max_examples = max_examples
        self.limits = limits

    def scan(self) -> DatasetScan:
        """Run the scan (folder) or manifest load (file) and return the DatasetScan."""
        if self.source.is_dir():
            return scan_dataset(self.source, verify=self.verify, num_threads=self.num_threads, max_examples=self.max_examples, limits=self.limits)
        if self.source.is_file():
            return load_manifest(
                self.source, self.root, verify=self.verify, num_threads=self.num_threads, max_examples=self.max_examples, limits=self.limits
            )
        raise FileNotFoundError(f"dataset source {str(self.source)!r} does not exist")


# --------------------------------------------------------------------------------------------
# Reports
# --------------------------------------------------------------------------------------------


def filter_known_tags(records: Sequence[SampleRecord], vocab: Any) -> tuple[Sequence[SampleRecord], int]:
    """(the records with at least one tag in `vocab` (a TagVocabulary or tag->index mapping), with
    only their known tags; how many had none). Nothing after this point reads the other tags.

    A SampleTable comes back as a table re-keyed to the vocabulary's indices, so the dataset uses
    its tag arrays as they are."""
    known = getattr(vocab, "tag_to_index", vocab)
    if isinstance(records, SampleTable):
        return records.keep_known(known)
    kept = []
    for r in records:
        keep = [i for i, t in enumerate(r.tags) if t in known]
        if keep:
            cats = tuple(r.categories[i] if i < len(r.categories) else "" for i in keep)
            kept.append(SampleRecord(r.sample_id, r.image_path, tuple(r.tags[i] for i in keep), cats, r.rating))
    return kept, len(records) - len(kept)


def check_scan_quality(scan: DatasetScan, max_bad_fraction: float, key: str = "data.max_bad_fraction") -> float:
    """The skipped share of the scan; DataQualityError (naming the config `key`) when it exceeds
    `max_bad_fraction`."""
    total = len(scan.records) + scan.num_skipped
    if total == 0:
        raise DataQualityError(f"no samples found under {scan.root!r}")
    share = scan.num_skipped / total
    if share > max_bad_fraction:
        raise DataQualityError(
            f"{scan.num_skipped} of {total} samples ({share:.1%}) under {scan.root!r} are unusable, "
            f"more than {key}={max_bad_fraction:g} allows; raise {key} to train on the rest. "
            f"{format_scan_summary(scan)}"
        )
    return share


def write_data_report(path: str | Path, report: Mapping[str, Any]) -> None:
    """Write `report` as JSON atomically."""
    try:
        text = json.dumps(report, indent=2, ensure_ascii=False) + "\n"
        text.encode("utf-8")
    except UnicodeEncodeError:  # a lone surrogate from untrusted input: JSON's ASCII escapes can hold it
        text = json.dumps(report, indent=2, ensure_ascii=True) + "\n"
    atomic_write_text(path, text)


def format_scan_summary(scan: DatasetScan) -> str:
    """One console line: 'data: N samples used, M skipped (reason: x, ...)'."""
    line = f"data: {len(scan.records)} samples used, {scan.num_skipped} skipped"
    if scan.skipped:
        parts = sorted(scan.skipped.items(), key=lambda kv: (-kv[1], kv[0]))
        line += " (" + ", ".join(f"{k}: {v}" for k, v in parts) + ")"
    if scan.unknown_rating:
        line += f"; {scan.unknown_rating} kept with unknown rating"
    if scan.dropped_tags:
        line += "; tags dropped: " + ", ".join(f"{k}: {v}" for k, v in sorted(scan.dropped_tags.items()))
    if scan.decoder_warnings:
        line += f"; {sum(scan.decoder_warnings.values())} decoder warnings (in data_report.json)"
    if scan.index.get("reused"):
        line += f"; from the scan index in {scan.seconds:.1f}s (no file changed; data.rescan=true scans again)"
    return line
