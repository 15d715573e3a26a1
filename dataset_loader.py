"""Dataset discovery, validation, splitting, preprocessing and batching for the tagger.

This module owns everything between a user's image folder and a normalised batch on the device:

* discovery of images and their sidecar JSON files (``X.json`` / ``X.ext.json``) or a JSON Lines
  manifest, with every skipped file counted by reason (``scan_dataset``, ``load_manifest``,
  ``DatasetLoader``) and reported (``write_data_report``, ``format_scan_summary``);
* the deterministic, hash-based train/validation split (``split_records``, ``save_split``,
  ``load_split``);
* the one preprocessing function shared by training, validation and inference (``load_image``
  with ``PreprocessParams``: EXIF rotation, alpha over the pad colour, JPEG draft decode,
  high-quality downscale, centred letterbox);
* training augmentation with per-sample randomness from (seed, epoch, index) (``AugmentParams``);
* the map-style ``SidecarJsonDataset`` that replaces samples failing in workers, the
  ``collate_samples`` function, the resumable sharded ``ResumableSampler``, ``build_dataloader``,
  and the ``ImagePreFetcher`` that moves uint8 batches to the device and normalises them there.

It also holds the run-level wiring from the config to datasets and loaders (``prepare_data``,
``prepare_eval_data``, ``build_eval_loader``) and the prepared cache (``prepare_cache``,
``PreparedCache``). It imports the bottom modules ``Configuration_System``, ``vocabulary`` and
``orientation_handler``. Nothing here ever writes into the user's dataset folder.
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import io
import json
import math
import multiprocessing
import os
import posixpath
import struct
import sys
import time
import warnings
import zlib
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import Any, Callable, Iterable, Iterator, Mapping, Sequence

import numpy as np
import torch
from PIL import Image, ImageOps
from torch.utils.data import DataLoader, Dataset, Sampler

from Configuration_System import RootConfig, atomic_write_bytes, atomic_write_text, resolve_resource
from orientation_handler import FlipStats, OrientationHandler
from vocabulary import TagVocabulary, create_vocabulary_from_datasets, load_ignore_list, normalize_tag

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
    "scan_dataset",
    "load_manifest",
    "DatasetLoader",
    "filter_known_tags",
    "check_scan_quality",
    "write_data_report",
    "format_scan_summary",
    "SplitResult",
    "split_records",
    "save_split",
    "load_split",
    "PreprocessParams",
    "load_image",
    "AugmentParams",
    "apply_color_jitter",
    "SidecarJsonDataset",
    "collate_samples",
    "targets_from_indices",
    "normalize_images",
    "FailureTracker",
    "ResumableSampler",
    "build_dataloader",
    "ImagePreFetcher",
    "prepare_cache",
    "PreparedCache",
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

# Errors that mean "this image file cannot be used"; Pillow raises several non-OSError types on
# corrupt data (SyntaxError from the PNG parser, struct.error on short headers, zlib.error).
_IMAGE_ERRORS: tuple[type[BaseException], ...] = (
    OSError, ValueError, SyntaxError, EOFError, struct.error, zlib.error, IndexError,
    Image.DecompressionBombError,
)


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
    """Cached vocabulary.normalize_tag: booru tags repeat across millions of sidecars."""
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


def _read_json(path: str) -> Any:
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
    except _IMAGE_ERRORS as exc:
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
        data = _read_json(path)
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


class DatasetLoader:
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


# --------------------------------------------------------------------------------------------
# Split
# --------------------------------------------------------------------------------------------


@dataclass
class SplitResult:
    """Train/validation/excluded records and the parameters that produced them."""

    train: list[SampleRecord]
    val: list[SampleRecord]
    excluded: list[SampleRecord]
    seed: int
    val_fraction: float
    max_val: int = 0
    vanished: list[str] = field(default_factory=list)
    added: int = 0

    def to_report(self) -> dict[str, Any]:
        """Counts for the data report."""
        return {"seed": self.seed, "val_fraction": self.val_fraction, "max_val": self.max_val,
                "train": len(self.train), "val": len(self.val), "excluded": len(self.excluded),
                "vanished": len(self.vanished), "added": self.added}


def _split_hash(seed: int, sample_id: str) -> float:
    """Uniform value in [0, 1) from blake2b of (seed, sample_id); stable across runs and machines."""
    digest = hashlib.blake2b(f"{seed}\x00{sample_id}".encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2.0 ** 64


def _check_split_args(val_fraction: float, max_val: int) -> None:
    """Raise ValueError for an out-of-range fraction or cap."""
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    if max_val < 0:
        raise ValueError(f"max_val must be >= 0, got {max_val}")


def split_records(records: Sequence[SampleRecord], *, val_fraction: float, seed: int,
                  max_val: int = 0) -> SplitResult:
    """Split by a hash of (seed, sample_id); `max_val` > 0 keeps the lowest-hash val samples and
    excludes the rest (they are not moved to training)."""
    _check_split_args(val_fraction, max_val)
    ids = [r.sample_id for r in records]
    if len(set(ids)) != len(ids):
        raise ValueError("split_records: duplicate sample_id values in records")
    train: list[SampleRecord] = []
    val: list[tuple[float, SampleRecord]] = []
    for rec in records:
        h = _split_hash(seed, rec.sample_id)
        if h < val_fraction:
            val.append((h, rec))
        else:
            train.append(rec)
    excluded: list[SampleRecord] = []
    if max_val and len(val) > max_val:
        ranked = sorted(val, key=lambda hr: (hr[0], hr[1].sample_id))
        keep = {id(r) for _, r in ranked[:max_val]}
        excluded = [r for _, r in val if id(r) not in keep]
        val = [(h, r) for h, r in val if id(r) in keep]
    return SplitResult(train=train, val=[r for _, r in val], excluded=excluded, seed=seed,
                       val_fraction=val_fraction, max_val=max_val)


def save_split(path: str | Path, split: SplitResult) -> None:
    """Store the split (seed, fraction, cap and the id lists) as JSON, atomically."""
    write_data_report(path, {
        "format_version": 1, "seed": split.seed, "val_fraction": split.val_fraction,
        "max_val": split.max_val,
        "train": [r.sample_id for r in split.train],
        "val": [r.sample_id for r in split.val],
        "excluded": [r.sample_id for r in split.excluded],
    })


def load_split(path: str | Path, records: Sequence[SampleRecord]) -> SplitResult:
    """Rebuild a stored split over `records`; ids that vanished are listed, new ones hashed in."""
    source = Path(path)
    if not source.is_file():
        raise FileNotFoundError(f"split file {str(source)!r} does not exist")
    try:
        data = _read_json(str(source))
    except json.JSONDecodeError as exc:
        raise ValueError(f"split file {str(source)!r} is not valid JSON: {exc}") from exc
    required = ("seed", "val_fraction", "train", "val")
    if not isinstance(data, dict) or any(k not in data for k in required):
        raise ValueError(f"split file {str(source)!r} lacks one of {required}")
    seed = int(data["seed"])
    fraction = float(data["val_fraction"])
    max_val = int(data.get("max_val", 0))
    by_id = {r.sample_id: r for r in records}
    lists: dict[str, list[SampleRecord]] = {"train": [], "val": [], "excluded": []}
    vanished: list[str] = []
    assigned: set[str] = set()
    for side in lists:
        for sid in data.get(side, []):
            rec = by_id.get(sid)
            if rec is None:
                vanished.append(sid)
            elif sid not in assigned:
                lists[side].append(rec)
                assigned.add(sid)
    added = 0
    for rec in records:
        if rec.sample_id in assigned:
            continue
        added += 1
        if _split_hash(seed, rec.sample_id) < fraction:
            # a capped validation set stays fixed so metrics remain comparable across resumes
            full = max_val and len(lists["val"]) >= max_val
            lists["excluded" if full else "val"].append(rec)
        else:
            lists["train"].append(rec)
    return SplitResult(train=lists["train"], val=lists["val"], excluded=lists["excluded"], seed=seed,
                       val_fraction=fraction, max_val=max_val, vanished=vanished, added=added)


# --------------------------------------------------------------------------------------------
# Preprocessing
# --------------------------------------------------------------------------------------------

_RESAMPLE = {"bicubic": Image.Resampling.BICUBIC, "lanczos": Image.Resampling.LANCZOS,
             "bilinear": Image.Resampling.BILINEAR}


@dataclass(frozen=True)
class PreprocessParams:
    """Everything that defines the image -> array transform; stored in checkpoints."""

    image_size: int
    pad_color: tuple[int, int, int] = (255, 255, 255)
    mean: tuple[float, float, float] = (0.5, 0.5, 0.5)
    std: tuple[float, float, float] = (0.5, 0.5, 0.5)
    resample: str = "bicubic"

    def __post_init__(self) -> None:
        """Validate values and coerce sequences to tuples (so instances hash and compare)."""
        if not isinstance(self.image_size, int) or isinstance(self.image_size, bool) or self.image_size <= 0:
            raise ValueError(f"image_size must be a positive int, got {self.image_size!r}")
        pad = tuple(int(v) for v in self.pad_color)
        if len(pad) != 3 or any(not 0 <= v <= 255 for v in pad):
            raise ValueError(f"pad_color must be 3 ints in 0..255, got {self.pad_color!r}")
        mean = tuple(float(v) for v in self.mean)
        std = tuple(float(v) for v in self.std)
        if len(mean) != 3 or len(std) != 3 or any(s <= 0 for s in std):
            raise ValueError(f"mean/std must be 3 floats with std > 0, got {self.mean!r}/{self.std!r}")
        if self.resample not in _RESAMPLE:
            raise ValueError(f"resample must be one of {sorted(_RESAMPLE)}, got {self.resample!r}")
        object.__setattr__(self, "pad_color", pad)
        object.__setattr__(self, "mean", mean)
        object.__setattr__(self, "std", std)

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON/checkpoint-safe dict."""
        return {"image_size": self.image_size, "pad_color": list(self.pad_color),
                "mean": list(self.mean), "std": list(self.std), "resample": self.resample}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "PreprocessParams":
        """Inverse of to_dict; missing optional keys take their defaults, unknown keys are errors."""
        unknown = set(data) - {"image_size", "pad_color", "mean", "std", "resample"}
        if unknown:
            raise ValueError(f"unknown preprocessing keys: {sorted(unknown)}")
        if "image_size" not in data:
            raise ValueError("preprocessing parameters lack 'image_size'")
        kwargs = dict(data)
        kwargs["image_size"] = int(kwargs["image_size"])
        return cls(**kwargs)


def _to_rgb(img: Image.Image, pad_color: tuple[int, int, int]) -> Image.Image:
    """RGB copy of any Pillow mode; transparency is composited onto `pad_color`."""
    mode = img.mode
    if mode in ("I;16", "I;16L", "I;16B", "I;16N", "I", "F"):
        arr = np.asarray(img)
        if mode == "F":
            arr = np.clip(arr, 0.0, 255.0)
        else:
            arr = arr.astype(np.int64)
            # 16-bit data: scale the full range down; a mode "I" image already in 0..255 stays as is
            if mode.startswith("I;16") or arr.max(initial=0) > 255:
                arr = np.clip(arr, 0, 65535) // 257
        return Image.fromarray(arr.astype(np.uint8), "L").convert("RGB")
    has_alpha = mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in img.info
    if has_alpha:
        rgba = img.convert("RGBA")
        background = Image.new("RGB", rgba.size, pad_color)
        background.paste(rgba.convert("RGB"), mask=rgba.getchannel("A"))
        return background
    if mode == "RGB":
        return img
    return img.convert("RGB")


def _load_letterboxed(path: str | Path, params: PreprocessParams) -> tuple[np.ndarray, tuple[int, int, int, int]]:
    """Letterboxed (S, S, 3) uint8 array and the content box (x0, y0, x1, y1)."""
    size = params.image_size
    with Image.open(path) as img:
        width, height = img.size
        limit = Image.MAX_IMAGE_PIXELS
        if limit is not None and width * height > limit:
            raise Image.DecompressionBombError(f"{path}: {width}x{height} exceeds {limit} pixels")
        if img.format == "JPEG":
            scale = size / max(width, height)
            if scale < 1.0:
                # libjpeg DCT scaling: decode at >= the final size, far cheaper than full size
                img.draft("RGB", (max(1, math.ceil(width * scale)), max(1, math.ceil(height * scale))))
        img.load()
        # exif_transpose copies the image even when there is nothing to turn: ask first
        oriented = ImageOps.exif_transpose(img) if img.getexif().get(_EXIF_ORIENTATION, 1) != 1 else img
        rgb = _to_rgb(oriented, params.pad_color)
    width, height = rgb.size
    scale = size / max(width, height)
    new_w = max(1, min(size, round(width * scale)))
    new_h = max(1, min(size, round(height * scale)))
    if (new_w, new_h) == (width, height):
        content = np.asarray(rgb, dtype=np.uint8)  # (h, w, 3)
    elif params.resample in _TORCH_RESAMPLE:
        content = _resize_uint8(np.array(rgb, dtype=np.uint8), new_h, new_w, _TORCH_RESAMPLE[params.resample])
    else:
        # reducing_gap: integer-factor box reduce first, then the filter; fast and alias-free
        gap = 3.0 if scale < 1.0 else None
        content = np.asarray(rgb.resize((new_w, new_h), _RESAMPLE[params.resample], reducing_gap=gap), dtype=np.uint8)
    x0 = (size - new_w) // 2
    y0 = (size - new_h) // 2
    canvas = np.empty((size, size, 3), dtype=np.uint8)
    pad = np.asarray(params.pad_color, dtype=np.uint8)
    # fill only the letterbox bands; the content overwrites the rest
    canvas[:y0] = pad
    canvas[y0 + new_h:] = pad
    canvas[y0:y0 + new_h, :x0] = pad
    canvas[y0:y0 + new_h, x0 + new_w:] = pad
    canvas[y0:y0 + new_h, x0:x0 + new_w] = content
    return canvas, (x0, y0, x0 + new_w, y0 + new_h)


# torch's antialiased uint8 kernels compute PIL's bicubic/bilinear filters (to within one grey
# level) about five times faster than Pillow on one core: the largest cost after JPEG decoding.
_TORCH_RESAMPLE = {"bicubic": "bicubic", "bilinear": "bilinear"}
_EXIF_ORIENTATION = 0x0112


def _resize_uint8(image: np.ndarray, height: int, width: int, mode: str) -> np.ndarray:
    """Antialiased resize of a writable, C-contiguous (H, W, 3) uint8 array to (height, width, 3)."""
    x = torch.from_numpy(image).permute(2, 0, 1).unsqueeze(0)  # (1, 3, H, W), channels-last strides
    y = torch.nn.functional.interpolate(x, size=(height, width), mode=mode, antialias=True)
    return y[0].permute(1, 2, 0).numpy()  # (height, width, 3)


def load_image(path: str | Path, params: PreprocessParams) -> np.ndarray:
    """Decode, orient, composite, downscale and letterbox one image to (S, S, 3) uint8 RGB."""
    return _load_letterboxed(path, params)[0]


# --------------------------------------------------------------------------------------------
# Augmentation
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class AugmentParams:
    """Training augmentation strengths: flip probability and colour jitter ranges."""

    flip_prob: float = 0.5
    brightness: float = 0.1
    contrast: float = 0.1
    saturation: float = 0.1

    def __post_init__(self) -> None:
        """Validate ranges."""
        if not 0.0 <= self.flip_prob <= 1.0:
            raise ValueError(f"flip_prob must be in [0, 1], got {self.flip_prob}")
        for name in ("brightness", "contrast", "saturation"):
            value = getattr(self, name)
            if not 0.0 <= value < 1.0:
                raise ValueError(f"{name} must be in [0, 1), got {value}")

    def to_dict(self) -> dict[str, float]:
        """Plain dict."""
        return {"flip_prob": self.flip_prob, "brightness": self.brightness,
                "contrast": self.contrast, "saturation": self.saturation}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "AugmentParams":
        """Inverse of to_dict."""
        return cls(**{k: float(v) for k, v in data.items()})


_LUMA = np.asarray([0.299, 0.587, 0.114], dtype=np.float32)


def apply_color_jitter(images: torch.Tensor, factors: torch.Tensor, boxes: torch.Tensor) -> torch.Tensor:
    """Brightness, contrast, saturation factors (B, 3) (1.0 = unchanged) applied inside each
    sample's content box (B, 4: x0, y0, x1, y1) of float images (B, 3, H, W) in [0, 255].

    Runs on the device: workers only draw the factors, so a worker spends no time on it. The
    letterbox outside the box keeps exactly the pad colour.
    """
    b, _, h, w = images.shape
    f = factors.to(images.device, images.dtype).view(b, 3, 1, 1)
    boxes = boxes.to(images.device)
    rows = torch.arange(h, device=images.device).view(1, h, 1)
    cols = torch.arange(w, device=images.device).view(1, 1, w)
    inside = ((rows >= boxes[:, 1].view(b, 1, 1)) & (rows < boxes[:, 3].view(b, 1, 1))
              & (cols >= boxes[:, 0].view(b, 1, 1)) & (cols < boxes[:, 2].view(b, 1, 1))).unsqueeze(1)  # (B, 1, H, W)
    luma = torch.tensor(_LUMA, device=images.device, dtype=images.dtype).view(1, 3, 1, 1)
    x = images * f[:, 0:1]                                                    # brightness
    area = inside.sum(dim=(2, 3), keepdim=True).clamp_min(1)                  # (B, 1, 1, 1)
    gray_mean = ((x * luma).sum(1, keepdim=True) * inside).sum(dim=(2, 3), keepdim=True) / area
    x = (x - gray_mean) * f[:, 1:2] + gray_mean                               # contrast
    gray = (x * luma).sum(1, keepdim=True)                                    # (B, 1, H, W)
    x = ((x - gray) * f[:, 2:3] + gray).clamp_(0.0, 255.0)                    # saturation
    return torch.where(inside, x, images)


def _sample_rng(seed: int, epoch: int, index: int, *extra: int) -> np.random.Generator:
    """Generator for one sample from (seed, epoch, index): independent of workers and order."""
    words = [seed & 0xFFFFFFFFFFFFFFFF, epoch & 0xFFFFFFFFFFFFFFFF, index, *extra]
    return np.random.default_rng(words)


# --------------------------------------------------------------------------------------------
# Dataset
# --------------------------------------------------------------------------------------------


def _pack_strings(values: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    """Concatenate UTF-8 strings into one byte array plus offsets (cheap to pickle)."""
    encoded = [v.encode("utf-8") for v in values]
    offsets = np.zeros(len(encoded) + 1, dtype=np.int64)
    if encoded:
        np.cumsum([len(e) for e in encoded], out=offsets[1:])
    blob = np.frombuffer(b"".join(encoded), dtype=np.uint8).copy()
    return blob, offsets


def _unpack_string(blob: np.ndarray, offsets: np.ndarray, i: int) -> str:
    """The i-th string of a packed array."""
    return blob[offsets[i]:offsets[i + 1]].tobytes().decode("utf-8")


def _classify_failure(exc: BaseException) -> str:
    """Skip reason for an exception raised while loading an image."""
    if isinstance(exc, Image.DecompressionBombError):
        return "decompression_bomb"
    if isinstance(exc, FileNotFoundError):
        return "image_missing"
    return "image_undecodable"


class SidecarJsonDataset(Dataset):
    """Map-style dataset over SampleRecords, keyed by (index, epoch), with failing samples replaced.

    Records are held as packed arrays (paths, ids, tag indices) so spawned workers unpickle it fast.
    """

    def __init__(self, records: Sequence[SampleRecord], tag_to_index: Mapping[str, int],
                 params: PreprocessParams, *, augment: AugmentParams | None = None,
                 orientation: "OrientationHandler | None" = None, seed: int = 0,
                 max_retries: int = 10, cache: "PreparedCache | None" = None) -> None:
        """Encode every record's tags through `tag_to_index` (unknown tags dropped).

        `cache`: a PreparedCache for these params; its images replace decoding where the
        source file is unchanged (same pixels as load_image), the rest are decoded as usual.
        """
        if max_retries < 0:
            raise ValueError(f"max_retries must be >= 0, got {max_retries}")
        if augment is not None and augment.flip_prob > 0 and orientation is None:
            raise ValueError("flip_prob > 0 needs an orientation handler to swap left/right tags; "
                             "pass OrientationHandler.default() or set flip_prob=0")
        if not records:
            raise ValueError("SidecarJsonDataset needs at least one record")
        self.params = params
        self.augment = augment
        self.orientation = orientation
        self.seed = int(seed)
        self.max_retries = int(max_retries)
        self.tag_to_index = dict(tag_to_index)
        num = max(self.tag_to_index.values(), default=-1) + 1
        self.index_to_tag = [""] * num
        for tag, idx in self.tag_to_index.items():
            self.index_to_tag[idx] = tag
        self._ids, self._id_off = _pack_strings([r.sample_id for r in records])
        self._paths, self._path_off = _pack_strings([r.image_path for r in records])
        encoded = [[self.tag_to_index[t] for t in r.tags if t in self.tag_to_index] for r in records]
        self._tag_off = np.zeros(len(records) + 1, dtype=np.int64)
        np.cumsum([len(e) for e in encoded], out=self._tag_off[1:])
        self._tags = np.fromiter((i for e in encoded for i in e), dtype=np.int32,
                                 count=int(self._tag_off[-1]))
        self._ratings = np.asarray([r.rating for r in records], dtype=np.int8)
        self.cache = cache
        self._cache_rows = cache.rows_for([r.sample_id for r in records]) if cache is not None else None
        self.cache_hits = 0  # per process; for benchmarks and tests

    def __len__(self) -> int:
        """Number of records."""
        return len(self._ratings)

    def sample_id(self, index: int) -> str:
        """The sample_id of record `index`."""
        return _unpack_string(self._ids, self._id_off, index)

    def image_path(self, index: int) -> str:
        """The absolute image path of record `index`."""
        return _unpack_string(self._paths, self._path_off, index)

    def tag_indices(self, index: int) -> np.ndarray:
        """Known tag indices of record `index` (unaugmented), int32 (k,)."""
        return self._tags[self._tag_off[index]:self._tag_off[index + 1]]

    def _load(self, index: int, epoch: int) -> dict[str, Any]:
        """Load and augment one record; exceptions propagate to the retry loop."""
        path = self.image_path(index)
        cached = None
        if self.cache is not None and self._cache_rows is not None and self._cache_rows[index] >= 0:
            cached = self.cache.get(int(self._cache_rows[index]), path)
        if cached is not None:
            image, box = cached
            self.cache_hits += 1
        else:
            image, box = _load_letterboxed(path, self.params)
        tags = self.tag_indices(index).astype(np.int64)
        flip = 0
        jitter = (1.0, 1.0, 1.0)
        if self.augment is not None:
            rng = _sample_rng(self.seed, epoch, index)
            # always draw the same numbers so one setting never shifts the others' randomness
            u_flip = rng.random()
            factors = rng.uniform(-1.0, 1.0, size=3)
            aug = self.augment
            if u_flip < aug.flip_prob and self.orientation is not None:
                decision = self.orientation.decide([self.index_to_tag[i] for i in tags])
                if decision.allowed:
                    image = image[:, ::-1]
                    tags = np.asarray([self.tag_to_index[t] for t in decision.flipped_tags
                                       if t in self.tag_to_index], dtype=np.int64)
                    width = self.params.image_size
                    box = (width - box[2], box[1], width - box[0], box[3])
                    flip = 1
                else:
                    flip = 2
            # colour jitter is applied on the device (apply_color_jitter); here only its factors
            jitter = (1.0 + aug.brightness * float(factors[0]), 1.0 + aug.contrast * float(factors[1]),
                      1.0 + aug.saturation * float(factors[2]))
        # a (3, H, W) view: collate_samples' stack makes the one contiguous copy
        tensor = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1)
        return {"image": tensor, "tag_indices": torch.from_numpy(tags), "rating": int(self._ratings[index]),
                "index": index, "flip": flip, "jitter": jitter, "box": tuple(int(v) for v in box)}

    def __getitem__(self, key: int | tuple[int, int]) -> dict[str, Any]:
        """Sample for key (index, epoch) or index; a failing file is replaced deterministically."""
        if isinstance(key, tuple):
            index, epoch = int(key[0]), int(key[1])
        else:
            index, epoch = int(key), 0
        if not 0 <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} samples")
        failures: list[tuple[str, str]] = []
        current = index
        for attempt in range(self.max_retries + 1):
            try:
                sample = self._load(current, epoch)
            except _IMAGE_ERRORS as exc:
                failures.append((self.sample_id(current), _classify_failure(exc)))
                # replacement from (seed, epoch, index, attempt): same on every run and worker count
                current = int(_sample_rng(self.seed, epoch, index, attempt + 1, 1).integers(len(self)))
                continue
            sample["failure"] = failures[0] if failures else None
            sample["more_failures"] = failures[1:]
            return sample
        raise DataQualityError(
            f"sample {index} (epoch {epoch}) and {self.max_retries} replacements all failed to load: "
            + ", ".join(f"{sid} ({reason})" for sid, reason in failures[:5]))


def collate_samples(batch: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Stack samples: images (B,3,H,W) uint8, tag_indices (B,L) padded with -1, ratings, indices."""
    if not batch:
        raise ValueError("collate_samples got an empty batch")
    images = torch.stack([s["image"] for s in batch])  # (B, 3, H, W)
    longest = max(int(s["tag_indices"].numel()) for s in batch)
    tag_indices = torch.full((len(batch), longest), -1, dtype=torch.long)  # (B, L)
    for row, s in enumerate(batch):
        n = int(s["tag_indices"].numel())
        if n:
            tag_indices[row, :n] = s["tag_indices"]
    failures: list[tuple[str, str]] = []
    for s in batch:
        if s.get("failure") is not None:
            failures.append(tuple(s["failure"]))
        failures.extend(tuple(f) for f in s.get("more_failures", ()))
    return {
        "images": images,
        "tag_indices": tag_indices,
        "ratings": torch.tensor([int(s["rating"]) for s in batch], dtype=torch.long),  # (B,)
        "indices": torch.tensor([int(s["index"]) for s in batch], dtype=torch.long),  # (B,)
        "flip": torch.tensor([int(s["flip"]) for s in batch], dtype=torch.long),  # (B,)
        "jitter": torch.tensor([s["jitter"] for s in batch], dtype=torch.float32),  # (B, 3)
        "box": torch.tensor([s["box"] for s in batch], dtype=torch.long),  # (B, 4)
        "failures": failures,
    }


def targets_from_indices(tag_indices: torch.Tensor, num_tags: int) -> torch.Tensor:
    """Multi-hot float (B, T) from padded indices (B, L); negative entries are padding."""
    if tag_indices.dim() != 2:
        raise ValueError(f"tag_indices must be (B, L), got shape {tuple(tag_indices.shape)}")
    idx = tag_indices.long()
    idx = torch.where(idx < 0, torch.full_like(idx, num_tags), idx)  # padding -> spare column T
    out = torch.zeros(idx.shape[0], num_tags + 1, dtype=torch.float32, device=idx.device)  # (B, T+1)
    out.scatter_(1, idx, 1.0)
    return out[:, :num_tags].contiguous()  # (B, T)


def normalize_images(images_uint8: torch.Tensor, mean: Sequence[float], std: Sequence[float],
                     dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """(B,3,H,W) uint8 (or float in [0, 255]) -> float (x/255 - mean)/std, on the tensor's device.

    Computed as x * (1 / (255 std)) - mean / std with per-channel tensors: two passes instead of
    three, and the same IEEE operations on CPU and CUDA (CUDA turns a scalar division into a
    reciprocal multiply, which made the two devices disagree near zero).
    """
    mean64 = torch.as_tensor(mean, dtype=torch.float64)
    std64 = torch.as_tensor(std, dtype=torch.float64)
    scale = (1.0 / (255.0 * std64)).to(dtype).view(1, -1, 1, 1).to(images_uint8.device)  # (1, 3, 1, 1)
    shift = (mean64 / std64).to(dtype).view(1, -1, 1, 1).to(images_uint8.device)  # (1, 3, 1, 1)
    return images_uint8.to(dtype).mul_(scale).sub_(shift)


class FailureTracker:
    """Counts samples replaced during training and stops the run when too many are bad."""

    def __init__(self, max_bad_fraction: float, min_samples: int = 1000) -> None:
        """Raise once failures / attempted loads > max_bad_fraction after min_samples loads."""
        if not 0.0 <= max_bad_fraction <= 1.0:
            raise ValueError(f"max_bad_fraction must be in [0, 1], got {max_bad_fraction}")
        self.max_bad_fraction = float(max_bad_fraction)
        self.min_samples = int(min_samples)
        self.delivered = 0
        self.failed = 0
        self.by_reason: dict[str, int] = {}
        self.examples: list[str] = []

    @property
    def bad_fraction(self) -> float:
        """Failed loads over all attempted loads so far."""
        attempted = self.delivered + self.failed
        return self.failed / attempted if attempted else 0.0

    def observe(self, batch: Mapping[str, Any]) -> None:
        """Count one collated batch; DataQualityError when the bad share passes the limit."""
        failures = batch.get("failures", [])
        self.delivered += int(len(batch["indices"]))
        for sample_id, reason in failures:
            self.failed += 1
            self.by_reason[reason] = self.by_reason.get(reason, 0) + 1
            if len(self.examples) < 10:
                self.examples.append(f"{sample_id}: {reason}")
        attempted = self.delivered + self.failed
        if attempted >= self.min_samples and self.bad_fraction > self.max_bad_fraction:
            raise DataQualityError(
                f"{self.failed} of {attempted} image loads failed ({self.bad_fraction:.1%}), more than "
                f"the allowed {self.max_bad_fraction:.1%}; by reason {self.by_reason}; "
                f"e.g. {', '.join(self.examples[:3])}")

    def to_dict(self) -> dict[str, Any]:
        """Plain dict for logs and checkpoints."""
        return {"delivered": self.delivered, "failed": self.failed, "bad_fraction": self.bad_fraction,
                "by_reason": dict(self.by_reason), "examples": list(self.examples)}


# --------------------------------------------------------------------------------------------
# Sampler and loader
# --------------------------------------------------------------------------------------------


class ResumableSampler(Sampler):
    """Sharded per-epoch permutation yielding (index, epoch) keys, resumable inside an epoch."""

    def __init__(self, num_samples: int, *, batch_size: int, shuffle: bool = True, seed: int = 0,
                 rank: int = 0, world_size: int = 1, drop_last: bool = True) -> None:
        """Same arguments as DistributedSampler plus batch_size, so resume positions are batches."""
        if num_samples <= 0:
            raise ValueError(f"num_samples must be > 0, got {num_samples}")
        if batch_size <= 0:
            raise ValueError(f"batch_size must be > 0, got {batch_size}")
        if world_size <= 0 or not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not in [0, world_size={world_size})")
        self.num_samples = int(num_samples)
        self.batch_size = int(batch_size)
        self.shuffle = bool(shuffle)
        self.seed = int(seed)
        self.rank = int(rank)
        self.world_size = int(world_size)
        self.drop_last = bool(drop_last)
        self.epoch = 0
        self.start_batch = 0
        if self.drop_last and self.num_samples < self.world_size:
            raise ValueError(f"{num_samples} samples cannot be shared by {world_size} ranks with drop_last")
        if self.drop_last:
            self.per_rank = self.num_samples // self.world_size
        else:
            self.per_rank = math.ceil(self.num_samples / self.world_size)
        if self.drop_last and self.per_rank < self.batch_size:
            raise ValueError(f"{self.per_rank} samples per rank make no full batch of {batch_size}")

    def batches_per_epoch(self) -> int:
        """Batches each rank runs in one epoch."""
        if self.drop_last:
            return self.per_rank // self.batch_size
        return math.ceil(self.per_rank / self.batch_size)

    def _samples_per_epoch(self) -> int:
        """Samples this rank yields in a full epoch."""
        return self.batches_per_epoch() * self.batch_size if self.drop_last else self.per_rank

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        """Select the epoch; skip this rank's first `start_batch` batches of it (resume)."""
        if epoch < 0:
            raise ValueError(f"epoch must be >= 0, got {epoch}")
        if not 0 <= start_batch <= self.batches_per_epoch():
            raise ValueError(f"start_batch {start_batch} outside [0, {self.batches_per_epoch()}]")
        self.epoch = int(epoch)
        self.start_batch = int(start_batch)

    def _epoch_order(self) -> list[int]:
        """This rank's full index list for the current epoch."""
        if self.shuffle:
            g = torch.Generator()
            # 63-bit seed hashed from (seed, epoch): (0, 1) and (1, 0) must not give the same order
            digest = hashlib.blake2b(f"{self.seed}:{self.epoch}".encode("utf-8"), digest_size=8).digest()
            g.manual_seed(int.from_bytes(digest, "big") & 0x7FFFFFFFFFFFFFFF)
            order = torch.randperm(self.num_samples, generator=g).tolist()
        else:
            order = list(range(self.num_samples))
        total = self.per_rank * self.world_size
        if total > len(order):  # pad by repeating from the start, as DistributedSampler does
            reps = math.ceil(total / len(order))
            order = (order * reps)[:total]
        else:
            order = order[:total]
        return order[self.rank:total:self.world_size][:self._samples_per_epoch()]

    def __iter__(self) -> Iterator[tuple[int, int]]:
        """Yield (index, epoch) for this rank, from start_batch on."""
        order = self._epoch_order()
        epoch = self.epoch
        for index in order[self.start_batch * self.batch_size:]:
            yield (index, epoch)

    def __len__(self) -> int:
        """Keys left to yield in the current epoch (after the resume skip)."""
        return max(0, self._samples_per_epoch() - self.start_batch * self.batch_size)

    def state_dict(self, batches_done: int | None = None) -> dict[str, Any]:
        """Plain-typed position: pass the batches the loop has consumed in this epoch."""
        return {"epoch": self.epoch,
                "start_batch": self.start_batch if batches_done is None else int(batches_done),
                "seed": self.seed, "num_samples": self.num_samples, "batch_size": self.batch_size,
                "world_size": self.world_size, "shuffle": self.shuffle, "drop_last": self.drop_last}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Resume from state_dict(); ValueError if the data or layout changed since."""
        for key in ("num_samples", "batch_size", "world_size", "seed", "shuffle", "drop_last"):
            if key in state and state[key] != getattr(self, key):
                raise ValueError(f"sampler state has {key}={state[key]!r} but this run has "
                                 f"{getattr(self, key)!r}; cannot resume inside the epoch")
        start = int(state.get("start_batch", 0))
        epoch = int(state.get("epoch", 0))
        if start >= self.batches_per_epoch():  # the stored epoch was finished
            epoch, start = epoch + 1, 0
        self.set_epoch(epoch, start)


def _worker_init(worker_id: int) -> None:
    """Keep each worker to one compute thread; many workers x many threads thrash the CPUs."""
    torch.set_num_threads(1)
    cv2 = sys.modules.get("cv2")
    if cv2 is not None:
        cv2.setNumThreads(1)
    warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # load_image raises on these


def build_dataloader(dataset: Dataset, sampler: Sampler | Sequence[int], *, batch_size: int, num_workers: int,
                     pin_memory: bool, drop_last: bool, prefetch_factor: int = 2,
                     persistent_workers: bool = False, multiprocessing_context: Any = None,
                     timeout: float = 0, generator_seed: int | None = None) -> DataLoader:
    """A DataLoader with collate_samples and a picklable worker_init_fn.

    With `generator_seed`, the workers' base seed comes from a private generator instead of the
    global torch RNG, so starting an epoch does not consume global random state (exact resume).
    """
    extra: dict[str, Any] = {}
    if generator_seed is not None:
        extra["generator"] = torch.Generator().manual_seed(int(generator_seed))
    if num_workers > 0:
        extra |= {"prefetch_factor": prefetch_factor, "persistent_workers": persistent_workers,
                 "multiprocessing_context": multiprocessing_context, "timeout": timeout}
    return DataLoader(dataset, batch_size=batch_size, sampler=sampler, num_workers=num_workers,
                      collate_fn=collate_samples, pin_memory=pin_memory, drop_last=drop_last,
                      worker_init_fn=_worker_init, **extra)


class ImagePreFetcher:
    """Moves batches to the device one ahead on a side CUDA stream and normalises them there."""

    def __init__(self, loader: Iterable[dict[str, Any]], device: torch.device | str,
                 params: PreprocessParams, num_tags: int) -> None:
        """Wrap `loader`; on CPU devices batches are converted synchronously."""
        self.loader = loader
        self.device = torch.device(device)
        self.params = params
        self.num_tags = int(num_tags)

    def __len__(self) -> int:
        """Length of the wrapped loader."""
        return len(self.loader)  # type: ignore[arg-type]

    def _convert(self, batch: Mapping[str, Any]) -> dict[str, Any]:
        """Copy tensors to the device (non-blocking) and build normalised images and targets."""
        images = batch["images"].to(self.device, non_blocking=True)  # (B, 3, H, W) uint8
        tag_indices = batch["tag_indices"].to(self.device, non_blocking=True)  # (B, L)
        ratings = batch["ratings"].to(self.device, non_blocking=True)  # (B,)
        jitter = batch.get("jitter")  # (B, 3) on the host: checking it costs no device sync
        if jitter is not None and bool((jitter != 1.0).any()):
            images = apply_color_jitter(images.float(), jitter.to(self.device, non_blocking=True),
                                        batch["box"].to(self.device, non_blocking=True))  # (B, 3, H, W) float
        return {
            "images": normalize_images(images, self.params.mean, self.params.std),
            "tag_targets": targets_from_indices(tag_indices, self.num_tags),  # (B, T)
            "ratings": ratings,
            "failures": batch.get("failures", []),
            "flip": batch.get("flip"),
            "indices": batch.get("indices"),
        }

    def __iter__(self) -> Iterator[dict[str, Any]]:
        """Yield device batches; with CUDA the next batch is copied while this one trains."""
        if self.device.type != "cuda" or not torch.cuda.is_available():
            for batch in self.loader:
                yield self._convert(batch)
            return
        stream = torch.cuda.Stream(device=self.device)
        iterator = iter(self.loader)

        def preload() -> dict[str, Any] | None:
            """Start the copy and conversion of the next batch on the side stream."""
            try:
                batch = next(iterator)
            except StopIteration:
                return None
            with torch.cuda.stream(stream):
                return self._convert(batch)

        upcoming = preload()
        while upcoming is not None:
            current_stream = torch.cuda.current_stream(self.device)
            current_stream.wait_stream(stream)  # the copy/normalise must finish before use
            for key in ("images", "tag_targets", "ratings"):
                # memory made on the side stream is now used on the main one: tell the allocator
                upcoming[key].record_stream(current_stream)
            ready = upcoming
            upcoming = preload()
            yield ready


# --------------------------------------------------------------------------------------------
# Run-level wiring: config -> records -> split -> vocabulary -> datasets and loaders
# --------------------------------------------------------------------------------------------


@dataclass
class DataBundle:
    """The data side of a run: records, split, vocabulary, preprocessing and datasets."""

    train_records: list[SampleRecord]
    val_records: list[SampleRecord]
    vocab: TagVocabulary
    vocab_path: Path
    preprocess: PreprocessParams
    train_dataset: SidecarJsonDataset | None
    val_dataset: SidecarJsonDataset
    report: dict[str, Any]


def preprocess_from_config(cfg: RootConfig) -> PreprocessParams:
    """Preprocessing parameters from the data section (stored in every checkpoint)."""
    d = cfg.data
    return PreprocessParams(image_size=d.image_size, pad_color=tuple(int(v) for v in d.pad_color),
                            mean=tuple(float(v) for v in d.mean), std=tuple(float(v) for v in d.std))


def ensure_dataset(cfg: RootConfig, *, is_main: bool, log: Callable[[str], None] | None) -> Path:
    """The dataset root; the demo is generated there first when configured and absent."""
    root = Path(cfg.data.root)
    if cfg.data.manifest:
        manifest = Path(cfg.data.manifest)
        if not manifest.is_file():
            raise FileNotFoundError(f"data.manifest: manifest file not found: {manifest}")
        root = root if cfg.data.root else manifest.parent
        if not root.is_dir():
            raise FileNotFoundError(f"data.root: dataset folder not found: {root} (the manifest's 'file' paths are "
                                    "relative to it; set data.root='' to use the manifest's folder)")
        return root
    if not root.exists() and cfg.data.demo_images > 0 and is_main:
        from demo_dataset import generate_demo_dataset  # only the demo path needs the generator

        started = time.perf_counter()
        generate_demo_dataset(root, num_images=cfg.data.demo_images, seed=0, image_size=cfg.data.image_size)
        if log:
            log(f"demo: generated {cfg.data.demo_images} images in {root} ({time.perf_counter() - started:.1f}s)")
    if not root.is_dir():
        raise FileNotFoundError(f"data.root: dataset folder not found: {root}")
    return root


def scan_from_config(cfg: RootConfig, root: Path, verify: str | None = None) -> DatasetScan:
    """Scan the dataset folder, or read the manifest, as the config says."""
    verify = verify or cfg.data.verify
    if cfg.data.manifest:
        return load_manifest(cfg.data.manifest, root, verify=verify)
    return scan_dataset(root, verify=verify)


def _wait_for_rank0(world_size: int) -> None:
    if world_size > 1 and torch.distributed.is_initialized():
        torch.distributed.barrier()


def flip_audit(records: Sequence[SampleRecord], vocab: TagVocabulary, handler: OrientationHandler) -> FlipStats:
    """Which training samples a flip would be allowed for, and the tags that veto the others
    (decided on vocabulary tags, as the dataset does)."""
    stats = FlipStats()
    for record in records:
        stats.record(handler.decide([t for t in record.tags if t in vocab.tag_to_index]))
    return stats


def _datasets(cfg: RootConfig, train: list[SampleRecord] | None, val: list[SampleRecord], vocab: TagVocabulary,
              preprocess: PreprocessParams, cache: "PreparedCache | None" = None,
              ) -> tuple[SidecarJsonDataset | None, SidecarJsonDataset]:
    train_ds = None
    if train is not None:
        a = cfg.augment
        orientation = (OrientationHandler.from_file(resolve_resource(a.orientation_map), a.orientation_safety)
                       if a.flip_prob > 0 else None)
        train_ds = SidecarJsonDataset(train, vocab.tag_to_index, preprocess,
                                      augment=AugmentParams(flip_prob=a.flip_prob, brightness=a.brightness,
                                                            contrast=a.contrast, saturation=a.saturation),
                                      orientation=orientation, seed=cfg.training.seed, cache=cache)
    val_ds = SidecarJsonDataset(val, vocab.tag_to_index, preprocess, augment=None, orientation=None,
                                seed=cfg.training.seed, cache=cache)
    return train_ds, val_ds


def prepare_data(cfg: RootConfig, run_dir: Path, *, rank: int = 0, world_size: int = 1, resume: bool = False,
                 log: Callable[[str], None] | None = print) -> DataBundle:
    """Scan, audit, split and build the vocabulary for a training run; write the run's data files.

    On resume the split and vocabulary saved in the run folder are reused, so a resumed run sees
    exactly the samples and tag columns it started with.
    """
    is_main = rank == 0
    run_dir = Path(run_dir)
    if is_main:
        root = ensure_dataset(cfg, is_main=True, log=log)  # may generate the demo
    _wait_for_rank0(world_size)
    if not is_main:
        root = ensure_dataset(cfg, is_main=False, log=None)
    scan = scan_from_config(cfg, root)
    if log:
        log(format_scan_summary(scan))
    check_scan_quality(scan, cfg.data.max_bad_fraction)

    split_path, vocab_path = run_dir / "split.json", run_dir / "vocabulary.json"
    if resume and split_path.is_file():
        split = load_split(split_path, scan.records)
    else:
        split = split_records(scan.records, val_fraction=cfg.data.val_fraction, seed=cfg.training.seed,
                              max_val=cfg.data.max_val_samples)
    if resume and vocab_path.is_file():
        vocab = TagVocabulary.load(vocab_path)
    elif cfg.data.vocabulary:
        vocab = TagVocabulary.load(cfg.data.vocabulary)
    else:
        ignore = load_ignore_list(resolve_resource(cfg.data.ignore_tags_file)) if cfg.data.ignore_tags_file else ()
        vocab = create_vocabulary_from_datasets(split.train, min_frequency=cfg.data.min_tag_frequency,
                                                top_k=cfg.data.top_k_tags, ignore_tags=ignore)
    if len(vocab) == 0:
        raise DataQualityError(f"no tag reaches data.min_tag_frequency={cfg.data.min_tag_frequency} in the training split of {root}")
    train, dropped_train = filter_known_tags(split.train, vocab)
    val, dropped_val = filter_known_tags(split.val, vocab)
    if not train or not val:
        raise DataQualityError(f"{root}: {len(train)} training and {len(val)} validation samples after the split; "
                               "need at least one of each (add data or change data.val_fraction)")
    report = scan.to_report()
    report["split"] = split.to_report()
    report["no_known_tags"] = {"train": dropped_train, "val": dropped_val}
    report["used"] = {"train": len(train), "val": len(val), "tags": len(vocab)}
    if cfg.augment.flip_prob > 0:
        handler = OrientationHandler.from_file(resolve_resource(cfg.augment.orientation_map), cfg.augment.orientation_safety)
        report["flip_audit"] = flip_audit(train, vocab, handler).to_dict()
    if is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        if not (resume and split_path.is_file()):
            save_split(split_path, split)
        if not (resume and vocab_path.is_file()):
            vocab.save(vocab_path)
        write_data_report(run_dir / "data_report.json", report)
        if log:
            excluded = f", {len(split.excluded)} excluded by the validation cap" if split.excluded else ""
            log(f"split: {len(train)} train / {len(val)} val{excluded}; vocabulary: {len(vocab)} tags"
                + (f"; {dropped_train + dropped_val} samples without a known tag dropped" if dropped_train + dropped_val else ""))
            if "flip_audit" in report:
                audit = report["flip_audit"]
                causes = {**audit["vetoed_by_forbid_tag"], **audit["vetoed_by_unmapped_tag"]}
                top = ", ".join(f"{t}: {n}" for t, n in sorted(causes.items(), key=lambda kv: -kv[1])[:5])
                log(f"flips: {audit['vetoed']} of {audit['considered']} training samples never flip" + (f" ({top})" if top else ""))
    preprocess = preprocess_from_config(cfg)
    if cfg.data.cache_dir and is_main:
        started = time.perf_counter()
        cache_report = prepare_cache(train + val, cfg.data.cache_dir, preprocess, num_workers=cfg.data.num_workers,
                                     data_root=root)
        if log:
            log(f"cache: {cfg.data.cache_dir} ready in {time.perf_counter() - started:.1f}s "
                f"({cache_report.get('decoded', 0)} images decoded, {cache_report.get('reused', 0)} reused)")
    _wait_for_rank0(world_size)
    cache = PreparedCache(cfg.data.cache_dir, preprocess) if cfg.data.cache_dir else None
    train_ds, val_ds = _datasets(cfg, train, val, vocab, preprocess, cache)
    return DataBundle(train, val, vocab, vocab_path, preprocess, train_ds, val_ds, report)


def prepare_eval_data(cfg: RootConfig, vocab: TagVocabulary, preprocess: PreprocessParams, *,
                      data_root: str | Path | None = None, log: Callable[[str], None] | None = print) -> DataBundle:
    """Validation data for a checkpoint: the run's validation split, or every sample of data_root."""
    if data_root is not None:
        root = Path(data_root)
        if not root.is_dir():
            raise FileNotFoundError(f"--data: dataset folder not found: {root}")
        scan = scan_dataset(root, verify=cfg.data.verify)
        records = scan.records
    else:
        root = ensure_dataset(cfg, is_main=False, log=None)
        scan = scan_from_config(cfg, root)
        records = split_records(scan.records, val_fraction=cfg.data.val_fraction, seed=cfg.training.seed,
                                max_val=cfg.data.max_val_samples).val
    if log:
        log(format_scan_summary(scan))
    val, dropped = filter_known_tags(records, vocab)
    if not val:
        raise DataQualityError(f"{root}: no sample carries a tag of the checkpoint's vocabulary")
    report = scan.to_report()
    report["no_known_tags"] = {"val": dropped}
    _, val_ds = _datasets(cfg, None, val, vocab, preprocess)
    return DataBundle([], val, vocab, Path(), preprocess, None, val_ds, report)


def build_eval_loader(cfg: RootConfig, data: DataBundle, *, rank: int = 0, world_size: int = 1) -> DataLoader:
    """Validation batches in file order, this rank's share only (no sample on two ranks)."""
    batch_size = cfg.validation.batch_size or cfg.data.batch_size
    shard = list(range(rank, len(data.val_dataset), world_size))
    return build_dataloader(data.val_dataset, shard, batch_size=batch_size, num_workers=cfg.data.num_workers,
                            pin_memory=cfg.data.pin_memory and torch.cuda.is_available(), drop_last=False,
                            prefetch_factor=cfg.data.prefetch_factor, persistent_workers=cfg.data.persistent_workers,
                            multiprocessing_context=cfg.data.worker_start_method or None,
                            generator_seed=cfg.training.seed)


# --------------------------------------------------------------------------------------------
# Prepared cache
# --------------------------------------------------------------------------------------------

CACHE_FORMAT_VERSION = 1
_CACHE_INDEX = "index.json"
_CACHE_ENTRIES = "entries.npy"
# entries.npy columns, one row per cached image
_E_SHARD, _E_SLOT, _E_SIZE, _E_MTIME, _E_X0, _E_Y0, _E_X1, _E_Y1 = range(8)


def _cache_key(params: PreprocessParams) -> dict[str, Any]:
    """The parameters that decide the cached pixels (mean/std are applied later, on the device)."""
    return {"image_size": params.image_size, "pad_color": list(params.pad_color),
            "resample": params.resample}


def _file_signature(path: str) -> tuple[int, int]:
    """(size, mtime_ns) of a source file: a change in either invalidates its cached copy."""
    st = os.stat(path)
    return int(st.st_size), int(st.st_mtime_ns)


def _prepare_one(job: tuple[str, PreprocessParams]) -> tuple[bytes, tuple[int, int, int, int], int, int] | tuple[str, str]:
    """Letterbox one image for the cache: (pixels, box, size, mtime_ns) or (reason, detail)."""
    path, params = job
    try:
        size, mtime = _file_signature(path)
        with warnings.catch_warnings():  # runs in a pool process: no other thread shares the filters
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            array, box = _load_letterboxed(path, params)
    except _IMAGE_ERRORS as exc:
        return _classify_failure(exc), f"{path}: {type(exc).__name__}: {exc}"
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
        index = _read_json(str(index_path))
    except json.JSONDecodeError as exc:
        raise ValueError(f"cache index {str(index_path)!r} is not valid JSON: {exc}") from exc
    if not isinstance(index, dict) or index.get("format_version") != CACHE_FORMAT_VERSION:
        raise ValueError(f"cache index {str(index_path)!r} has an unknown format")
    entries = np.load(out / _CACHE_ENTRIES, allow_pickle=False)
    if entries.shape != (len(index["ids"]), 8):
        raise ValueError(f"cache {str(out)!r}: {_CACHE_ENTRIES} does not match {_CACHE_INDEX}")
    return index, entries


def prepare_cache(records: Sequence[SampleRecord], out_dir: str | Path, params: PreprocessParams, *,
                  num_workers: int = 0, shard_size: int = 2048,
                  data_root: str | Path | None = None) -> dict[str, Any]:
    """Letterbox every record into uint8 shard files under `out_dir`; returns a JSON-able report.

    Entries whose source file (size, mtime) is unchanged are kept from an earlier run; the rest are
    decoded (in `num_workers` processes) into new shards. `data_root`, when given, must not
    contain `out_dir`: nothing is ever written into the user's dataset folder.
    """
    started = time.perf_counter()
    out = Path(out_dir)
    if data_root is not None and _is_inside(out, Path(data_root)):
        raise ValueError(f"cache folder {str(out)!r} is inside the dataset {str(data_root)!r}; "
                         "choose a folder outside it")
    if shard_size <= 0:
        raise ValueError(f"shard_size must be > 0, got {shard_size}")
    out.mkdir(parents=True, exist_ok=True)
    key = _cache_key(params)
    existing = _read_cache_index(out)
    old_rows: dict[str, np.ndarray] = {}
    shards: list[dict[str, Any]] = []
    if existing is not None:
        index, entries = existing
        if index["key"] != key:
            raise ValueError(f"cache {str(out)!r} was prepared with {index['key']}, not {key}; "
                             "use another --out folder")
        shards = list(index["shards"])
        old_rows = {sid: entries[i] for i, sid in enumerate(index["ids"])}

    keep: dict[str, np.ndarray] = {}
    todo: list[SampleRecord] = []
    for rec in records:
        row = old_rows.get(rec.sample_id)
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
        pool: Any = ProcessPoolExecutor(max_workers=num_workers,
                                        mp_context=multiprocessing.get_context("spawn"))
        results: Iterator[Any] = pool.map(_prepare_one, jobs, chunksize=16)
    else:
        pool = None
        results = map(_prepare_one, jobs)
    try:
        position = 0
        while position < len(todo):
            batch = todo[position:position + shard_size]
            shard_no = len(shards)
            name = f"shard_{shard_no:05d}.u8"
            pixels: list[bytes] = []
            for rec in batch:
                result = next(results)
                if isinstance(result[0], str):
                    failed[result[0]] = failed.get(result[0], 0) + 1
                    if len(examples) < 5:
                        examples.append(str(result[1]))
                    continue
                data, box, fsize, mtime = result
                new_rows[rec.sample_id] = np.asarray(
                    [shard_no, len(pixels), fsize, mtime, *box], dtype=np.int64)
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
    write_data_report(out / _CACHE_INDEX, {
        "format_version": CACHE_FORMAT_VERSION, "key": key, "params": params.to_dict(),
        "shards": shards, "ids": ids})
    live = {int(r[_E_SHARD]) for r in rows}
    on_disk = sum((out / s["file"]).stat().st_size for i, s in enumerate(shards) if i in live)
    return {"cached": len(ids), "reused": len(keep), "decoded": len(new_rows), "failed": failed,
            "examples": examples, "shards": len(shards), "bytes_per_image": size * size * 3,
            "bytes_on_disk": on_disk, "seconds": round(time.perf_counter() - started, 3)}


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
            raise ValueError(f"cache {self.cache_dir!r} holds {index['key']}, but training uses "
                             f"{_cache_key(params)}; prepare it again for these parameters")
        self.image_size = params.image_size
        self.ids: list[str] = list(index["ids"])
        self.shard_files = [(s["file"], int(s["count"])) for s in index["shards"]]
        self._entries: np.ndarray | None = None
        self._maps: dict[int, np.ndarray] = {}

    def __getstate__(self) -> dict[str, Any]:
        """Pickle without ids or open memory maps (workers reopen them)."""
        state = dict(self.__dict__)
        state["_entries"] = None
        state["_maps"] = {}
        state["ids"] = []
        return state

    def rows_for(self, sample_ids: Sequence[str]) -> np.ndarray:
        """Entry row per sample id, -1 where the cache has none; int64 (N,)."""
        position = {sid: i for i, sid in enumerate(self.ids)}
        return np.asarray([position.get(s, -1) for s in sample_ids], dtype=np.int64)

    def _entry(self, row: int) -> np.ndarray:
        """One entries.npy row (memory-mapped on first use)."""
        if self._entries is None:
            self._entries = np.load(Path(self.cache_dir) / _CACHE_ENTRIES, mmap_mode="r",
                                    allow_pickle=False)
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
            mapped = np.memmap(Path(self.cache_dir) / name, dtype=np.uint8, mode="r",
                               shape=(count, size, size, 3))
            self._maps[shard] = mapped
        box = (int(entry[_E_X0]), int(entry[_E_Y0]), int(entry[_E_X1]), int(entry[_E_Y1]))
        return np.array(mapped[int(entry[_E_SLOT])]), box


def _main(argv: Sequence[str] | None = None) -> int:
    """CLI: `prepare` builds the letterboxed cache for a dataset folder or manifest."""
    parser = argparse.ArgumentParser(prog="dataset_loader.py", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    prep = sub.add_parser("prepare", help="letterbox every image once into memory-mappable shards")
    prep.add_argument("--data", required=True, help="dataset folder or JSON Lines manifest")
    prep.add_argument("--image-size", type=int, required=True)
    prep.add_argument("--out", required=True, help="cache folder (outside the dataset)")
    prep.add_argument("--pad-color", type=int, nargs=3, default=(255, 255, 255))
    prep.add_argument("--workers", type=int, default=max(1, (os.cpu_count() or 2) - 1))
    prep.add_argument("--shard-size", type=int, default=2048)
    prep.add_argument("--verify", choices=("none", "header", "decode"), default="header")
    args = parser.parse_args(argv)
    source = Path(args.data)
    scan = DatasetLoader(source, verify=args.verify).scan()
    print(format_scan_summary(scan), file=sys.stderr)
    root = source if source.is_dir() else source.parent
    params = PreprocessParams(args.image_size, pad_color=tuple(args.pad_color))
    report = prepare_cache(scan.records, args.out, params, num_workers=args.workers,
                           shard_size=args.shard_size, data_root=root)
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(_main())
