"""Dataset discovery and checking: image folders with sidecar JSON, or a JSON Lines manifest.

This module owns everything from a user's image folder to a table of usable samples
(``sample_table.SampleTable``): pairing images with sidecars (``X.json`` / ``X.ext.json`` / a
``filename`` field), resolving referenced paths inside the dataset root, the folder walk (names
that are not UTF-8 and links the ``data.symlinks`` policy refuses are set aside and counted once),
``scan_dataset``, ``load_manifest`` and the
``DatasetScanner`` that picks between them, with every skipped file counted by reason
(``DatasetScan``); and the reports on a scan (``check_scan_quality``, ``write_data_report``,
``format_scan_summary``, ``filter_known_tags``). Nothing here ever writes into the user's
dataset folder.

It imports ``file_io`` (atomic write), ``image_audit`` (the image check), ``sample_table``,
``sidecar_format`` (tags and ratings of one sidecar, re-exported here) and
``scan_limits`` (limits, link policy and name checks for untrusted input); not the vocabulary,
so that ``vocabulary``'s build command can import this module.
"""

from __future__ import annotations

import json
import os
import posixpath
import time
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import Any, Iterable, Mapping, Sequence

from file_io import atomic_write_text
from image_audit import map_threads, verify_images
from sample_table import SampleRecord, SampleTable, SampleTableBuilder
from scan_limits import LinkPolicy, ScanLimits, TagFilter, TooManyTagsError, WarningLog, is_utf8, printable
from sidecar_format import TAG_CATEGORIES, SidecarFormatError, parse_rating, parse_sidecar, split_tag_string

__all__ = [
    "IMAGE_EXTENSIONS",
    "SKIP_REASONS",
    "TAG_CATEGORIES",
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
]


IMAGE_EXTENSIONS: frozenset[str] = frozenset({".jpg", ".jpeg", ".png", ".webp", ".gif", ".bmp"})

# Every key a DatasetScan may count in .skipped (samples dropped) plus the kept-but-noted one.
SKIP_REASONS: tuple[str, ...] = (
    "image_missing",
    "sidecar_missing",
    "sidecar_unreadable",
    "image_undecodable",
    "path_outside_root",
    "decompression_bomb",
    "no_tags",
    "no_known_tags",
    "manifest_line_invalid",
    "duplicate_image",
    "directory_unreadable",
    "name_not_utf8",
    "symlink_outside_root",
    "symlink_broken",
    "sidecar_too_large",
    "too_many_tags",
)


# Why a listed image or sidecar was set aside without being opened.
_REFUSED = {
    "name_not_utf8": "file name is not valid UTF-8",
    "symlink_outside_root": "a link whose target is outside data.root (data.symlinks=inside_root)",
    "symlink_broken": "a dangling or self-referencing link",
}


# The limits when the caller gives none (ScanLimits is frozen, so one shared instance is safe).
DEFAULT_LIMITS = ScanLimits()


class DataQualityError(ValueError):
    """Raised when the share of bad data passes the configured limit."""


class _OutsideRootError(ValueError):
    """A referenced image path is absolute or escapes the dataset root."""


# --------------------------------------------------------------------------------------------
# Records and scan results
# --------------------------------------------------------------------------------------------


@dataclass
class DatasetScan:
    """Result of scanning a folder or manifest: the records kept and what was skipped and why."""

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

    @property
    def num_skipped(self) -> int:
        """Total number of samples skipped, all reasons together."""
        return int(sum(self.skipped.values()))

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


class _Collector:
    """Counts skips by reason with a bounded list of examples (used while scanning)."""

    def __init__(self, max_examples: int) -> None:
        """Start with no counts; keep at most `max_examples` examples per reason."""
        self.max_examples = max_examples
        self.counts: dict[str, int] = {}
        self.examples: dict[str, list[str]] = {}
        self.dropped_tags: dict[str, int] = {}
        self.dropped_examples: list[str] = []
        self.warnings = WarningLog()

    def add(self, reason: str, detail: str) -> None:
        """Count one skipped sample for `reason` with a human-readable detail (escaped: names
        that are not UTF-8 must still go into JSON)."""
        self.counts[reason] = self.counts.get(reason, 0) + 1
        bucket = self.examples.setdefault(reason, [])
        if len(bucket) < self.max_examples:
            bucket.append(printable(detail))

    def add_dropped_tags(self, dropped: dict[str, int], origin: str) -> None:
        """Count tags a TagFilter dropped from the sample of `origin` (a sidecar or manifest line)."""
        for reason, count in dropped.items():
            self.dropped_tags[reason] = self.dropped_tags.get(reason, 0) + count
            if len(self.dropped_examples) < self.max_examples:
                self.dropped_examples.append(printable(f"{origin}: {count} {reason}"))


def _resolve_inside(base_rel: str, value: str) -> str:
    """POSIX path of `value` relative to the root, given the referring file's folder `base_rel`.

    Raises _OutsideRootError for absolute paths (POSIX or Windows) and ``..`` escapes.
    """
    text = value.replace("\\", "/")
    if text.startswith("/") or PureWindowsPath(value).drive or PurePosixPath(text).is_absolute():
        raise _OutsideRootError(f"absolute path {value!r}")
    joined = posixpath.normpath(posixpath.join(base_rel, text)) if base_rel else posixpath.normpath(text)
    if joined in (".", "..") or joined.startswith("../"):
        raise _OutsideRootError(f"path {value!r} escapes the dataset root")
    return joined


# --------------------------------------------------------------------------------------------
# Folder discovery
# --------------------------------------------------------------------------------------------


@dataclass
class _Listing:
    """What the folder walk found: per folder (rel, image names, sidecar names), and the image
    files that are links it will not follow (rel path -> reason; counted once, when paired)."""

    folders: list[tuple[str, list[str], list[str]]] = field(default_factory=list)
    rejected: dict[str, str] = field(default_factory=dict)


def _walk(root_abs: str, collector: _Collector, policy: LinkPolicy) -> _Listing:
    """Every folder's images and sidecars, sorted, via os.scandir; names that are not UTF-8 and
    links the policy refuses are counted (folders, sidecars) or set aside (images)."""
    listing = _Listing()
    stack = [""]
    seen_real = {os.path.realpath(root_abs)}
    while stack:
        rel = stack.pop()
        abs_dir = os.path.join(root_abs, rel) if rel else root_abs
        images: list[str] = []
        sidecars: list[str] = []
        subdirs: list[str] = []
        try:
            with os.scandir(abs_dir) as it:
                for entry in it:
                    name = entry.name
                    shown = posixpath.join(rel, name)
                    ext = os.path.splitext(name)[1].lower()
                    try:
                        link = entry.is_symlink()
                        # Linux names are bytes: one that is not UTF-8 cannot go into JSON or a hash
                        reason = "name_not_utf8" if not is_utf8(name) else policy.reason(entry.path) if link else None
                        if reason is not None:
                            # images and sidecars are set aside and counted once, as a sample
                            if ext in IMAGE_EXTENSIONS or ext == ".json":
                                listing.rejected[shown] = reason
                                (images if ext in IMAGE_EXTENSIONS else sidecars).append(name)
                            elif os.path.isdir(entry.path) and reason != "symlink_broken":
                                collector.add(reason, f"{shown}: skipped folder or file")
                            continue
                        if entry.is_dir():
                            if link:  # follow linked folders once, never in a loop
                                real = os.path.realpath(entry.path)
                                if real in seen_real:
                                    continue
                                seen_real.add(real)
                            subdirs.append(name)
                            continue
                        if not entry.is_file():
                            continue
                    except OSError as exc:
                        collector.add("directory_unreadable", f"{shown}: {exc}")
                        continue
                    if ext == ".json":
                        sidecars.append(name)
                    elif ext in IMAGE_EXTENSIONS:
                        images.append(name)
        except OSError as exc:
            collector.add("directory_unreadable", f"{rel or '.'}: {exc}")
            continue
        images.sort()
        sidecars.sort()
        listing.folders.append((rel, images, sidecars))
        # reversed so that popping visits sub-folders in sorted order
        stack.extend(posixpath.join(rel, d) if rel else d for d in sorted(subdirs, reverse=True))
    return listing


def read_json(path: str) -> Any:
    """Parse one JSON file (UTF-8, a BOM tolerated)."""
    with open(path, "r", encoding="utf-8-sig") as handle:
        return json.load(handle)


@dataclass
class _Candidate:
    """A sample that passed sidecar checks and awaits image verification."""

    sample_id: str
    image_path: str
    tags: tuple[str, ...]
    categories: tuple[str, ...]
    rating: int
    origin: str  # sidecar path or manifest line, for examples


def _finish_scan(
    candidates: list[_Candidate],
    collector: _Collector,
    *,
    root: str,
    source: str,
    verify: str,
    num_threads: int,
    started: float,
    listed: bool = False,
    trusted: frozenset[str] = frozenset(),
) -> DatasetScan:
    """Verify candidate images on a thread pool and build the DatasetScan.

    `listed`: the images came from a directory listing, so verify="none" needs no stat call.
    `trusted`: image paths that passed this check before and are unchanged since (the scan index
    says so); they are not opened again.
    """
    if verify == "none" and listed:
        results: list[tuple[str | None, str]] = [(None, "")] * len(candidates)
    elif trusted:
        todo = [c for c in candidates if c.image_path not in trusted]
        checked = iter(verify_images([c.image_path for c in todo], verify, num_threads, collector.warnings))
        results = [(None, "") if c.image_path in trusted else next(checked) for c in candidates]
    else:
        results = verify_images([c.image_path for c in candidates], verify, num_threads, collector.warnings)
    return _build_scan(candidates, results, collector, root=root, source=source, verify=verify, started=started)


def _build_scan(
    candidates: list[_Candidate], results: list[tuple[str | None, str]], collector: _Collector, *, root: str, source: str, verify: str, started: float
) -> DatasetScan:
    """Records from candidates whose verification passed; the rest counted by reason."""
    table = SampleTableBuilder(root)
    unknown_rating = 0
    for cand, (reason, detail) in zip(candidates, results):
        if reason is not None:
            collector.add(reason, f"{cand.sample_id}: {detail}")
            continue
        if cand.rating < 0:
            unknown_rating += 1
        table.add(cand.sample_id, cand.image_path, cand.tags, cand.categories, cand.rating)
    return DatasetScan(
        records=table.build(),
        skipped=dict(collector.counts),
        examples={k: list(v) for k, v in collector.examples.items()},
        unknown_rating=unknown_rating,
        root=root,
        source=source,
        verify=verify,
        seconds=time.perf_counter() - started,
        max_examples=collector.max_examples,
        dropped_tags=dict(collector.dropped_tags),
        dropped_tag_examples=list(collector.dropped_examples),
        decoder_warnings=collector.warnings.to_report(),
    )


def _check_verify(verify: str) -> None:
    """Raise ValueError for an unknown verify mode."""
    if verify not in ("none", "header", "decode"):
        raise ValueError(f"verify must be 'none', 'header' or 'decode', got {verify!r}")


def scan_dataset(
    root: str | Path,
    *,
    verify: str = "header",
    num_threads: int = 8,
    max_examples: int = 5,
    limits: ScanLimits = DEFAULT_LIMITS,
    trusted: frozenset[str] = frozenset(),
) -> DatasetScan:
    """Find every image with a sidecar under `root`, check them, and count what was skipped
    (`trusted`: unchanged image paths that passed the check before, not opened again)."""
    started = time.perf_counter()
    _check_verify(verify)
    root_path = Path(root)
    if not root_path.is_dir():
        raise FileNotFoundError(f"dataset root {str(root_path)!r} does not exist or is not a directory")
    root_abs = os.path.abspath(root_path)
    collector = _Collector(max_examples)
    policy = LinkPolicy(root_abs, limits.symlinks)
    walked = _walk(root_abs, collector, policy)
    listing, rejected = walked.folders, walked.rejected

    all_files: set[str] = set()
    stems: dict[str, dict[str, list[str]]] = {}  # rel dir -> stem -> image names (sorted)
    sidecar_rel: list[tuple[str, str]] = []
    for rel, images, sidecars in listing:
        by_stem: dict[str, list[str]] = {}
        for name in images:
            all_files.add(posixpath.join(rel, name) if rel else name)
            by_stem.setdefault(os.path.splitext(name)[0], []).append(name)
        stems[rel] = by_stem
        sidecar_rel.extend((rel, name) for name in sidecars)

    def rel_join(rel: str, name: str) -> str:
        """Root-relative POSIX path of `name` in folder `rel`."""
        return f"{rel}/{name}" if rel else name

    # refused links and undecodable names are never opened: their reason stands in for the content
    abs_paths = [os.path.join(root_abs, *rel_join(rel, n).split("/")) for rel, n in sidecar_rel if rel_join(rel, n) not in rejected]
    readable = iter(map_threads(_read_sidecar_safe, abs_paths, num_threads, limits.max_sidecar_bytes))
    parsed = [
        (rejected[rel_join(rel, n)], _REFUSED[rejected[rel_join(rel, n)]]) if rel_join(rel, n) in rejected else next(readable)
        for rel, n in sidecar_rel
    ]

    def implicit_options(rel: str, name: str) -> list[str]:
        """Images a sidecar names by its own file name: X.ext for X.ext.json, X.* for X.json."""
        stem_name = name[:-5]
        if os.path.splitext(stem_name)[1].lower() in IMAGE_EXTENSIONS:
            return [rel_join(rel, stem_name)] if rel_join(rel, stem_name) in all_files else []
        return [rel_join(rel, n) for n in stems.get(rel, {}).get(stem_name, [])]

    failed: list[tuple[str, str]] = []  # sidecars counted as bad before pairing
    claimed: dict[str, str] = {}  # image rel path -> sidecar rel path
    pending_stem: list[tuple[int, str, str]] = []  # (sidecar index, rel dir, stem) for X.json
    named_missing: dict[int, str] = {}  # sidecar index -> its filename/file value that was not found
    targets: dict[int, str] = {}
    for i, ((rel, name), result) in enumerate(zip(sidecar_rel, parsed)):
        side = rel_join(rel, name)
        if isinstance(result, tuple):
            collector.add(result[0], f"{side}: {result[1]}")
            failed.append((rel, name))
            continue
        data = result
        explicit = data.get("filename", data.get("file"))
        if explicit is not None:
            if not isinstance(explicit, str) or not explicit.strip():
                collector.add("sidecar_unreadable", f"{side}: field 'filename' is not a path string")
                failed.append((rel, name))
                continue
            if not is_utf8(explicit):
                collector.add("name_not_utf8", f"{side}: field 'filename' is not valid UTF-8")
                failed.append((rel, name))
                continue
            try:
                target = _resolve_inside(rel, explicit.strip())
            except _OutsideRootError as exc:
                collector.add("path_outside_root", f"{side}: {exc}")
                failed.append((rel, name))
                continue
            extension = data.get("extension")
            found = _existing(root_abs, target, all_files, policy)
            if found is None and isinstance(extension, str) and extension and is_utf8(extension):
                # gallery-dl stores the stem in "filename" and the suffix in "extension"
                found = _existing(root_abs, f"{target}.{extension.lstrip('.')}", all_files, policy)
            if found is not None:
                targets[i] = found
                continue
            named_missing[i] = explicit.strip()
        stem_name = name[:-5]  # drop ".json"
        if os.path.splitext(stem_name)[1].lower() in IMAGE_EXTENSIONS:
            target = rel_join(rel, stem_name)
            if target in all_files:
                targets[i] = target
            else:
                named = f" nor {named_missing[i]!r}" if i in named_missing else ""
                collector.add("image_missing", f"{side}: no image {target!r}{named}")
            continue
        pending_stem.append((i, rel, stem_name))

    # explicit and X.ext.json claims first, in sidecar order; then X.json takes a free image
    for i in sorted(targets):
        target = targets[i]
        side = rel_join(*sidecar_rel[i])
        if target in claimed:
            collector.add("duplicate_image", f"{side}: {target!r} already claimed by {claimed[target]}")
            del targets[i]
        else:
            claimed[target] = side
    for i, rel, stem in pending_stem:
        side = rel_join(rel, sidecar_rel[i][1])
        options = [rel_join(rel, n) for n in stems.get(rel, {}).get(stem, [])]
        free = [o for o in options if o not in claimed]
        if free:
            targets[i] = free[0]
            claimed[free[0]] = side
        elif options:
            collector.add("duplicate_image", f"{side}: {options[0]!r} already claimed by {claimed[options[0]]}")
        else:
            named = f" and {named_missing[i]!r} not found" if i in named_missing else ""
            collector.add("image_missing", f"{side}: no image named {stem}.<ext> next to it{named}")

    # an image next to a sidecar that was already counted as bad must not be counted twice
    for rel, name in failed:
        for option in implicit_options(rel, name):
            if option not in claimed:
                claimed[option] = rel_join(rel, name)
                break

    for image in sorted(all_files):
        if image not in claimed:
            if image in rejected:  # a refused link counts once, under the link's reason
                collector.add(rejected[image], f"{image}: {_REFUSED[rejected[image]]}")
            else:
                collector.add("sidecar_missing", f"{image}: no {posixpath.basename(image)}.json or stem .json")

    candidates: list[_Candidate] = []
    for i in sorted(targets, key=lambda k: targets[k]):
        side = rel_join(*sidecar_rel[i])
        target = targets[i]
        if target in rejected:
            collector.add(rejected[target], f"{side}: image {target!r}: {_REFUSED[rejected[target]]}")
            continue
        parsed_tags = _parse_limited(parsed[i], side, limits, collector, "sidecar_unreadable")
        if parsed_tags is None:
            continue
        tags, cats, rating = parsed_tags
        candidates.append(_Candidate(target, os.path.join(root_abs, *target.split("/")), tags, cats, rating, side))
    return _finish_scan(
        candidates, collector, root=root_abs, source="folder", verify=verify, num_threads=num_threads, started=started, listed=True, trusted=trusted
    )


def _parse_limited(
    data: Any, origin: str, limits: ScanLimits, collector: _Collector, format_reason: str
) -> tuple[tuple[str, ...], tuple[str, ...], int] | None:
    """parse_sidecar under the tag limits; None (counted by reason) when the sample is unusable."""
    tag_filter = TagFilter.from_limits(limits)
    try:
        tags, cats, rating = parse_sidecar(data, tag_filter)
    except TooManyTagsError as exc:
        collector.add("too_many_tags", f"{origin}: {exc}")
        return None
    except SidecarFormatError as exc:
        collector.add(format_reason, f"{origin}: {exc}")
        return None
    finally:
        collector.add_dropped_tags(tag_filter.dropped, origin)
    if not tags:
        collector.add("no_tags", f"{origin}: no tags" + (f" (dropped: {tag_filter.dropped})" if tag_filter.dropped else ""))
        return None
    return tags, cats, rating


def _existing(root_abs: str, rel: str, all_files: set[str], policy: LinkPolicy) -> str | None:
    """`rel` if that file exists under the root (listing first, then a stat), else None."""
    if rel in all_files:
        return rel
    path = os.path.join(root_abs, *rel.split("/"))
    if os.path.isfile(path) and policy.reason_for_file(path) is None:
        all_files.add(rel)
        return rel
    return None


def _read_sidecar_safe(path: str, max_bytes: int) -> dict[str, Any] | tuple[str, str]:
    """The sidecar's JSON object, or (skip reason, why it could not be used); at most
    `max_bytes` are read, so a huge file costs no memory."""
    try:
        with open(path, "rb") as handle:
            raw = handle.read(max_bytes + 1)
        if len(raw) > max_bytes:
            return "sidecar_too_large", f"larger than data.max_sidecar_bytes={max_bytes}"
        data = json.loads(raw.decode("utf-8-sig"))
    except (OSError, UnicodeDecodeError) as exc:
        return "sidecar_unreadable", f"cannot read: {exc}"
    except json.JSONDecodeError as exc:
        return "sidecar_unreadable", f"invalid JSON: {exc}"
    except RecursionError:
        return "sidecar_unreadable", "invalid JSON: nested too deeply"
    if not isinstance(data, dict):
        return "sidecar_unreadable", f"JSON is a {type(data).__name__}, expected an object"
    return data


# --------------------------------------------------------------------------------------------
# Manifest
# --------------------------------------------------------------------------------------------


def load_manifest(
    path: str | Path,
    root: str | Path | None = None,
    *,
    verify: str = "header",
    num_threads: int = 8,
    max_examples: int = 5,
    limits: ScanLimits = DEFAULT_LIMITS,
    trusted: frozenset[str] = frozenset(),
) -> DatasetScan:
    """Records from a JSON Lines manifest of {"file", "tags", "rating"} objects, checked like a scan.

    ``file`` is relative to `root` when given, else to the manifest's folder.
    """
    started = time.perf_counter()
    _check_verify(verify)
    manifest = Path(path)
    if not manifest.is_file():
        raise FileNotFoundError(f"manifest {str(manifest)!r} does not exist or is not a file")
    root_path = Path(root) if root is not None else manifest.parent
    if not root_path.is_dir():
        raise FileNotFoundError(f"dataset root {str(root_path)!r} does not exist or is not a directory")
    root_abs = os.path.abspath(root_path)
    collector = _Collector(max_examples)
    policy = LinkPolicy(root_abs, limits.symlinks)
    candidates: list[_Candidate] = []
    seen: dict[str, int] = {}
    with open(manifest, "r", encoding="utf-8-sig", errors="surrogateescape") as handle:
        for lineno, line in enumerate(handle, start=1):
            text = line.strip()
            if not text:
                continue
            if len(text) > limits.max_sidecar_bytes:
                collector.add("sidecar_too_large", f"line {lineno}: longer than data.max_sidecar_bytes")
                continue
            try:
                obj = json.loads(text)
            except json.JSONDecodeError as exc:
                collector.add("manifest_line_invalid", f"line {lineno}: invalid JSON: {exc}")
                continue
            if not isinstance(obj, dict):
                collector.add("manifest_line_invalid", f"line {lineno}: JSON {type(obj).__name__}, expected an object")
                continue
            file_value = obj.get("file", obj.get("filename"))
            if not isinstance(file_value, str) or not file_value.strip():
                collector.add("manifest_line_invalid", f"line {lineno}: missing or non-string 'file'")
                continue
            if not is_utf8(file_value):
                collector.add("name_not_utf8", f"line {lineno}: 'file' is not valid UTF-8")
                continue
            parsed_tags = _parse_limited(obj, f"line {lineno}", limits, collector, "manifest_line_invalid")
            if parsed_tags is None:
                continue
            tags, cats, rating = parsed_tags
            try:
                target = _resolve_inside("", file_value.strip())
            except _OutsideRootError as exc:
                collector.add("path_outside_root", f"line {lineno}: {exc}")
                continue
            if target in seen:
                collector.add("duplicate_image", f"line {lineno}: {target!r} already on line {seen[target]}")
                continue
            seen[target] = lineno
            link_reason = policy.reason_for_file(os.path.join(root_abs, *target.split("/")))
            if link_reason is not None and os.path.lexists(os.path.join(root_abs, *target.split("/"))):
                collector.add(link_reason, f"line {lineno}: {target}: a link the data.symlinks policy refuses")
                continue
            candidates.append(_Candidate(target, os.path.join(root_abs, *target.split("/")), tags, cats, rating, f"line {lineno}"))
    return _finish_scan(
        candidates, collector, root=root_abs, source=f"manifest:{manifest}", verify=verify, num_threads=num_threads, started=started, trusted=trusted
    )


def scan_source(
    root: str | Path, *, manifest: str | Path | None, verify: str, limits: ScanLimits, trusted: frozenset[str] = frozenset()
) -> DatasetScan:
    """The folder scan of `root`, or the records of `manifest` with their files resolved against `root`."""
    if manifest:
        return load_manifest(manifest, root, verify=verify, limits=limits, trusted=trusted)
    return scan_dataset(root, verify=verify, limits=limits, trusted=trusted)


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
