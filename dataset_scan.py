"""Dataset discovery and checking: image folders with sidecar JSON, or a JSON Lines manifest.

This module owns everything from a user's image folder to a list of usable ``SampleRecord``s:
sidecar parsing (``X.json`` / ``X.ext.json``, tag strings, per-category fields, e621-style tag
dicts, ratings: ``parse_sidecar``, ``split_tag_string``, ``parse_rating``), resolving referenced
paths inside the dataset root, the folder walk, image verification, ``scan_dataset``,
``load_manifest`` and the ``DatasetScanner`` that picks between them, with every skipped file
counted by reason (``DatasetScan``); and the reports on a scan (``check_scan_quality``,
``write_data_report``, ``format_scan_summary``, ``filter_known_tags``). Nothing here ever writes
into the user's dataset folder.

It imports ``file_io`` (atomic write), ``tag_text`` (tag normalisation) and
``image_preprocess`` (which exceptions mean an image is unusable); not the vocabulary, so that
``vocabulary``'s build command can import this module.
"""

from __future__ import annotations

import functools
import json
import os
import posixpath
import time
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import Any, Iterable, Mapping, Sequence

from PIL import Image

from file_io import atomic_write_text
from image_preprocess import IMAGE_ERRORS
from tag_text import normalize_tag

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
    "load_manifest",
    "DatasetScanner",
    "filter_known_tags",
    "check_scan_quality",
    "write_data_report",
    "format_scan_summary",
]


IMAGE_EXTENSIONS: frozenset[str] = frozenset({".jpg", ".jpeg", ".png", ".webp", ".gif", ".bmp"})
TAG_CATEGORIES: tuple[str, ...] = ("general", "character", "copyright", "artist", "meta")

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
)

_RATING_CODES: dict[str, int] = {
    "g": 0, "general": 0, "safe": 0,
    "s": 1, "sensitive": 1,
    "q": 2, "questionable": 2,
    "e": 3, "explicit": 3,
}
# e621-style tag dicts use other category names; these map onto ours, the rest become "".
_CATEGORY_ALIASES: dict[str, str] = {c: c for c in TAG_CATEGORIES}
_CATEGORY_ALIASES.update({"species": "general", "lore": "meta", "invalid": "meta"})


class DataQualityError(ValueError):
    """Raised when the share of bad data passes the configured limit."""


class _SidecarFormatError(ValueError):
    """A sidecar or manifest entry has a field of the wrong type."""


class _OutsideRootError(ValueError):
    """A referenced image path is absolute or escapes the dataset root."""


# --------------------------------------------------------------------------------------------
# Records and scan results
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class SampleRecord:
    """One usable sample: image location, normalised tags with categories, and rating."""

    sample_id: str
    image_path: str
    tags: tuple[str, ...]
    categories: tuple[str, ...]
    rating: int


@dataclass
class DatasetScan:
    """Result of scanning a folder or manifest: the records kept and what was skipped and why."""

    records: list[SampleRecord]
    skipped: dict[str, int] = field(default_factory=dict)
    examples: dict[str, list[str]] = field(default_factory=dict)
    unknown_rating: int = 0
    root: str = ""
    source: str = "folder"
    verify: str = "header"
    seconds: float = 0.0
    max_examples: int = 5

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
            "scan_seconds": round(self.seconds, 3),
        }


class _Collector:
    """Counts skips by reason with a bounded list of examples (used while scanning)."""

    def __init__(self, max_examples: int) -> None:
        """Start with no counts; keep at most `max_examples` examples per reason."""
        self.max_examples = max_examples
        self.counts: dict[str, int] = {}
        self.examples: dict[str, list[str]] = {}

    def add(self, reason: str, detail: str) -> None:
        """Count one skipped sample for `reason` with a human-readable detail."""
        self.counts[reason] = self.counts.get(reason, 0) + 1
        bucket = self.examples.setdefault(reason, [])
        if len(bucket) < self.max_examples:
            bucket.append(detail)


# --------------------------------------------------------------------------------------------
# Sidecar parsing
# --------------------------------------------------------------------------------------------


def parse_rating(value: Any) -> int:
    """Map a rating code (g/s/q/e, full words, 'safe', or 0-3 as int or digit string) to 0-3, else -1."""
    if isinstance(value, bool):  # bool is an int subclass; True is not a rating
        return -1
    if isinstance(value, int):
        return value if 0 <= value <= 3 else -1
    if isinstance(value, str):
        text = value.strip().lower()
        if text in _RATING_CODES:
            return _RATING_CODES[text]
        if text.isdigit() and 0 <= int(text) <= 3:
            return int(text)
    return -1


@functools.lru_cache(maxsize=1 << 18)
def _norm(tag: str) -> str:
    """Cached tag_text.normalize_tag: booru tags repeat across millions of sidecars."""
    return normalize_tag(tag)


def split_tag_string(text: str) -> list[str]:
    """Split a tag string on commas if it has any, else on whitespace; normalise and drop empties."""
    parts = text.split(",") if "," in text else text.split()
    out = []
    for part in parts:
        tag = _norm(part)
        if tag:
            out.append(tag)
    return out


def _tags_from_value(value: Any, field_name: str, *, space_only: bool = False) -> list[str]:
    """Tags from a list of strings or one string; raises _SidecarFormatError on other types."""
    if value is None:
        return []
    if isinstance(value, str):
        if space_only:
            return [t for t in map(_norm, value.split()) if t]
        return split_tag_string(value)
    if isinstance(value, list):
        out = []
        for item in value:
            if not isinstance(item, str):
                raise _SidecarFormatError(
                    f"field {field_name!r} holds a {type(item).__name__}, expected strings")
            tag = _norm(item)
            if tag:
                out.append(tag)
        return out
    raise _SidecarFormatError(
        f"field {field_name!r} is a {type(value).__name__}, expected a list of strings or a string")


def parse_sidecar(data: Any) -> tuple[tuple[str, ...], tuple[str, ...], int]:
    """Tags, categories and rating from one sidecar object; ValueError on wrong field types.

    Reads ``tags`` (list, string, or an e621-style ``{category: [tags]}`` dict), the per-category
    ``tag_string_<cat>`` / ``tags_<cat>`` fields and ``tag_string``. Tags keep their first
    appearance; a tag first seen without a category takes the first category given later.
    """
    if not isinstance(data, Mapping):
        raise _SidecarFormatError(f"sidecar is a JSON {type(data).__name__}, expected an object")
    order: list[str] = []
    cats: dict[str, str] = {}

    def add(tags: Iterable[str], category: str) -> None:
        """Append new tags in order; fill in a category for tags that had none."""
        for tag in tags:
            if tag not in cats:
                order.append(tag)
                cats[tag] = category
            elif not cats[tag] and category:
                cats[tag] = category

    raw_tags = data.get("tags")
    if isinstance(raw_tags, Mapping):
        for key, value in raw_tags.items():
            add(_tags_from_value(value, f"tags.{key}"), _CATEGORY_ALIASES.get(str(key).lower(), ""))
    else:
        add(_tags_from_value(raw_tags, "tags"), "")
    for category in TAG_CATEGORIES:
        add(_tags_from_value(data.get(f"tag_string_{category}"), f"tag_string_{category}",
                             space_only=True), category)
        add(_tags_from_value(data.get(f"tags_{category}"), f"tags_{category}"), category)
    tag_string = data.get("tag_string")
    if tag_string is not None and not isinstance(tag_string, str):
        raise _SidecarFormatError(
            f"field 'tag_string' is a {type(tag_string).__name__}, expected a string")
    add(_tags_from_value(tag_string, "tag_string", space_only=True), "")
    return tuple(order), tuple(cats[t] for t in order), parse_rating(data.get("rating"))


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


def _walk(root_abs: str, collector: _Collector) -> list[tuple[str, list[str], list[str]]]:
    """(relative dir, image names, sidecar names) per folder, sorted, via os.scandir."""
    out: list[tuple[str, list[str], list[str]]] = []
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
                    try:
                        if entry.is_dir():
                            if entry.is_symlink():  # follow linked folders once, never in a loop
                                real = os.path.realpath(entry.path)
                                if real in seen_real:
                                    continue
                                seen_real.add(real)
                            subdirs.append(name)
                            continue
                        if not entry.is_file():
                            continue
                    except OSError as exc:
                        collector.add("directory_unreadable", f"{posixpath.join(rel, name)}: {exc}")
                        continue
                    ext = os.path.splitext(name)[1].lower()
                    if ext == ".json":
                        sidecars.append(name)
                    elif ext in IMAGE_EXTENSIONS:
                        images.append(name)
        except OSError as exc:
            collector.add("directory_unreadable", f"{rel or '.'}: {exc}")
            continue
        images.sort()
        sidecars.sort()
        out.append((rel, images, sidecars))
        # reversed so that popping visits sub-folders in sorted order
        stack.extend(posixpath.join(rel, d) if rel else d for d in sorted(subdirs, reverse=True))
    return out


def _run_chunk(args: tuple[Any, list[Any], tuple[Any, ...]]) -> list[Any]:
    """Apply fn(item, *extra) to one chunk of items (a module-level helper for the thread pool)."""
    fn, items, extra = args
    return [fn(item, *extra) for item in items]


def _map_threads(fn: Any, items: Sequence[Any], num_threads: int, *extra: Any,
                 chunk: int = 256) -> list[Any]:
    """fn(item, *extra) for every item, in order, on a thread pool in chunks.

    Chunks keep the number of futures small: one future per file would cost ~1 KB each on a
    million-file dataset.
    """
    if num_threads <= 1 or len(items) <= chunk:
        return [fn(item, *extra) for item in items]
    jobs = [(fn, list(items[i:i + chunk]), extra) for i in range(0, len(items), chunk)]
    out: list[Any] = []
    with ThreadPoolExecutor(max_workers=num_threads) as pool:
        for part in pool.map(_run_chunk, jobs):
            out.extend(part)
    return out


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


def _verify_image(path: str, mode: str) -> tuple[str | None, str]:
    """(skip reason or None, detail) for one image under verify mode none|header|decode."""
    if mode == "none":
        return (None, "") if os.path.isfile(path) else ("image_missing", "file not found")
    try:
        with Image.open(path) as img:
            width, height = img.size
            limit = Image.MAX_IMAGE_PIXELS
            # Pillow only warns between 1x and 2x the limit; we treat the warning band as a bomb too
            if limit is not None and width * height > limit:
                return "decompression_bomb", f"{width}x{height} exceeds {limit} pixels"
            if width <= 0 or height <= 0:
                return "image_undecodable", f"empty size {width}x{height}"
            if mode == "decode":
                if img.format == "JPEG":  # DCT-scaled decode still reads every byte: truncation shows
                    img.draft("RGB", (max(1, width // 8), max(1, height // 8)))
                img.load()
    except FileNotFoundError:
        return "image_missing", "file not found"
    except Image.DecompressionBombError as exc:
        return "decompression_bomb", str(exc)
    except IMAGE_ERRORS as exc:
        return "image_undecodable", f"{type(exc).__name__}: {exc}"
    return None, ""


def _finish_scan(candidates: list[_Candidate], collector: _Collector, *, root: str, source: str,
                 verify: str, num_threads: int, started: float, listed: bool = False) -> DatasetScan:
    """Verify candidate images on a thread pool and build the DatasetScan.

    `listed`: the images came from a directory listing, so verify="none" needs no stat call.
    """
    if verify == "none" and listed:
        results: list[tuple[str | None, str]] = [(None, "")] * len(candidates)
    else:
        results = _verify_all(candidates, verify, num_threads)
    return _build_scan(candidates, results, collector, root=root, source=source, verify=verify,
                       started=started)


def _verify_all(candidates: list[_Candidate], verify: str, num_threads: int) -> list[tuple[str | None, str]]:
    """_verify_image over all candidates on a thread pool."""
    with warnings.catch_warnings():
        # _verify_image checks the pixel count itself; keep the console quiet while scanning
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        # small chunks: verification is slow per item and should spread over all threads
        return _map_threads(_verify_image, [c.image_path for c in candidates], num_threads,
                            verify, chunk=32)


def _build_scan(candidates: list[_Candidate], results: list[tuple[str | None, str]],
                collector: _Collector, *, root: str, source: str, verify: str,
                started: float) -> DatasetScan:
    """Records from candidates whose verification passed; the rest counted by reason."""
    records: list[SampleRecord] = []
    unknown_rating = 0
    for cand, (reason, detail) in zip(candidates, results):
        if reason is not None:
            collector.add(reason, f"{cand.sample_id}: {detail}")
            continue
        if cand.rating < 0:
            unknown_rating += 1
        records.append(SampleRecord(cand.sample_id, cand.image_path, cand.tags, cand.categories,
                                    cand.rating))
    return DatasetScan(records=records, skipped=dict(collector.counts),
                       examples={k: list(v) for k, v in collector.examples.items()},
                       unknown_rating=unknown_rating, root=root, source=source, verify=verify,
                       seconds=time.perf_counter() - started, max_examples=collector.max_examples)


def _check_verify(verify: str) -> None:
    """Raise ValueError for an unknown verify mode."""
    if verify not in ("none", "header", "decode"):
        raise ValueError(f"verify must be 'none', 'header' or 'decode', got {verify!r}")


def scan_dataset(root: str | Path, *, verify: str = "header", num_threads: int = 8,
                 max_examples: int = 5) -> DatasetScan:
    """Find every image with a sidecar under `root`, check them, and count what was skipped."""
    started = time.perf_counter()
    _check_verify(verify)
    root_path = Path(root)
    if not root_path.is_dir():
        raise FileNotFoundError(f"dataset root {str(root_path)!r} does not exist or is not a directory")
    root_abs = os.path.abspath(root_path)
    collector = _Collector(max_examples)
    listing = _walk(root_abs, collector)

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

    abs_paths = [os.path.join(root_abs, *rel_join(rel, n).split("/")) for rel, n in sidecar_rel]
    parsed = _map_threads(_read_sidecar_safe, abs_paths, num_threads)

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
        if isinstance(result, str):
            collector.add("sidecar_unreadable", f"{side}: {result}")
            failed.append((rel, name))
            continue
        data = result
        explicit = data.get("filename", data.get("file"))
        if explicit is not None:
            if not isinstance(explicit, str) or not explicit.strip():
                collector.add("sidecar_unreadable", f"{side}: field 'filename' is not a path string")
                failed.append((rel, name))
                continue
            try:
                target = _resolve_inside(rel, explicit.strip())
            except _OutsideRootError as exc:
                collector.add("path_outside_root", f"{side}: {exc}")
                failed.append((rel, name))
                continue
            extension = data.get("extension")
            found = _existing(root_abs, target, all_files)
            if found is None and isinstance(extension, str) and extension:
                # gallery-dl stores the stem in "filename" and the suffix in "extension"
                found = _existing(root_abs, f"{target}.{extension.lstrip('.')}", all_files)
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
            collector.add("sidecar_missing", f"{image}: no {posixpath.basename(image)}.json or stem .json")

    candidates: list[_Candidate] = []
    for i in sorted(targets, key=lambda k: targets[k]):
        data = parsed[i]
        side = rel_join(*sidecar_rel[i])
        try:
            tags, cats, rating = parse_sidecar(data)
        except _SidecarFormatError as exc:
            collector.add("sidecar_unreadable", f"{side}: {exc}")
            continue
        if not tags:
            collector.add("no_tags", f"{side}: no tags")
            continue
        target = targets[i]
        candidates.append(_Candidate(target, os.path.join(root_abs, *target.split("/")), tags, cats,
                                     rating, side))
    return _finish_scan(candidates, collector, root=root_abs, source="folder", verify=verify,
                        num_threads=num_threads, started=started, listed=True)


def _existing(root_abs: str, rel: str, all_files: set[str]) -> str | None:
    """`rel` if that file exists under the root (listing first, then a stat), else None."""
    if rel in all_files:
        return rel
    if os.path.isfile(os.path.join(root_abs, *rel.split("/"))):
        all_files.add(rel)
        return rel
    return None


def _read_sidecar_safe(path: str) -> dict[str, Any] | str:
    """The sidecar's JSON object, or a string explaining why it could not be read."""
    try:
        data = read_json(path)
    except (OSError, UnicodeDecodeError) as exc:
        return f"cannot read: {exc}"
    except json.JSONDecodeError as exc:
        return f"invalid JSON: {exc}"
    except RecursionError:
        return "invalid JSON: nested too deeply"
    if not isinstance(data, dict):
        return f"JSON is a {type(data).__name__}, expected an object"
    return data


# --------------------------------------------------------------------------------------------
# Manifest
# --------------------------------------------------------------------------------------------


def load_manifest(path: str | Path, root: str | Path | None = None, *, verify: str = "header",
                  num_threads: int = 8, max_examples: int = 5) -> DatasetScan:
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
    candidates: list[_Candidate] = []
    seen: dict[str, int] = {}
    with open(manifest, "r", encoding="utf-8-sig") as handle:
        for lineno, line in enumerate(handle, start=1):
            text = line.strip()
            if not text:
                continue
            try:
                obj = json.loads(text)
            except json.JSONDecodeError as exc:
                collector.add("manifest_line_invalid", f"line {lineno}: invalid JSON: {exc}")
                continue
            if not isinstance(obj, dict):
                collector.add("manifest_line_invalid",
                              f"line {lineno}: JSON {type(obj).__name__}, expected an object")
                continue
            file_value = obj.get("file", obj.get("filename"))
            if not isinstance(file_value, str) or not file_value.strip():
                collector.add("manifest_line_invalid", f"line {lineno}: missing or non-string 'file'")
                continue
            try:
                tags, cats, rating = parse_sidecar(obj)
            except _SidecarFormatError as exc:
                collector.add("manifest_line_invalid", f"line {lineno}: {exc}")
                continue
            try:
                target = _resolve_inside("", file_value.strip())
            except _OutsideRootError as exc:
                collector.add("path_outside_root", f"line {lineno}: {exc}")
                continue
            if target in seen:
                collector.add("duplicate_image", f"line {lineno}: {target!r} already on line {seen[target]}")
                continue
            seen[target] = lineno
            if not tags:
                collector.add("no_tags", f"line {lineno}: {target}: no tags")
                continue
            candidates.append(_Candidate(target, os.path.join(root_abs, *target.split("/")), tags,
                                         cats, rating, f"line {lineno}"))
    return _finish_scan(candidates, collector, root=root_abs, source=f"manifest:{manifest}",
                        verify=verify, num_threads=num_threads, started=started)


class DatasetScanner:
    """Scans a dataset given as a folder of images with sidecars or as a JSON Lines manifest."""

    def __init__(self, source: str | Path, *, root: str | Path | None = None, verify: str = "header",
                 num_threads: int = 8, max_examples: int = 5) -> None:
        """Remember where the data is; `root` only applies to manifests."""
        _check_verify(verify)
        self.source = Path(source)
        self.root = Path(root) if root is not None else None
        self.verify = verify
        self.num_threads = num_threads
        self.max_examples = max_examples

    def scan(self) -> DatasetScan:
        """Run the scan (folder) or manifest load (file) and return the DatasetScan."""
        if self.source.is_dir():
            return scan_dataset(self.source, verify=self.verify, num_threads=self.num_threads,
                                max_examples=self.max_examples)
        if self.source.is_file():
            return load_manifest(self.source, self.root, verify=self.verify,
                                 num_threads=self.num_threads, max_examples=self.max_examples)
        raise FileNotFoundError(f"dataset source {str(self.source)!r} does not exist")


# --------------------------------------------------------------------------------------------
# Reports
# --------------------------------------------------------------------------------------------


def filter_known_tags(records: Sequence[SampleRecord], vocab: Any) -> tuple[list[SampleRecord], int]:
    """Keep records with at least one tag in `vocab` (a TagVocabulary or tag->index mapping)."""
    known = getattr(vocab, "tag_to_index", vocab)
    kept = [r for r in records if any(t in known for t in r.tags)]
    return kept, len(records) - len(kept)


def check_scan_quality(scan: DatasetScan, max_bad_fraction: float) -> float:
    """The skipped share of the scan; DataQualityError when it exceeds `max_bad_fraction`."""
    total = len(scan.records) + scan.num_skipped
    if total == 0:
        raise DataQualityError(f"no samples found under {scan.root!r}")
    share = scan.num_skipped / total
    if share > max_bad_fraction:
        raise DataQualityError(
            f"{scan.num_skipped} of {total} samples ({share:.1%}) under {scan.root!r} are unusable, "
            f"more than the allowed {max_bad_fraction:.1%}: {format_scan_summary(scan)}")
    return share


def write_data_report(path: str | Path, report: Mapping[str, Any]) -> None:
    """Write `report` as JSON atomically."""
    atomic_write_text(path, json.dumps(report, indent=2, ensure_ascii=False) + "\n")


def format_scan_summary(scan: DatasetScan) -> str:
    """One console line: 'data: N samples used, M skipped (reason: x, ...)'."""
    line = f"data: {len(scan.records)} samples used, {scan.num_skipped} skipped"
    if scan.skipped:
        parts = sorted(scan.skipped.items(), key=lambda kv: (-kv[1], kv[0]))
        line += " (" + ", ".join(f"{k}: {v}" for k, v in parts) + ")"
    if scan.unknown_rating:
        line += f"; {scan.unknown_rating} kept with unknown rating"
    return line
