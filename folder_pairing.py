"""One chunk of a folder scan: pair a run of listed files, read their sidecars, check their images.

The folder scan (``dataset_scan.scan_dataset``) cuts the walk's ``Listing`` into chunks of a few
thousand files and runs ``scan_chunk`` on each, in this process or on a pool of spawned ones
(one a core), then merges the results in chunk order. A chunk is a run of whole folders, or a
range of names of one big folder cut only between names with a different first dotted part
(``post_1.jpg`` / ``post_1.json`` / ``post_1.jpg.json`` stay together), so that every pairing by
file name happens inside one chunk. The rules are those of a scan over the whole folder:

* a sidecar names its image by a ``filename`` (or ``file``) field relative to its folder (with
  gallery-dl's ``extension``), by its own name (``X.ext.json``), or by its stem (``X.json``);
* claims by field or by ``X.ext.json`` come first, in file order; a later claim on a claimed image
  is a ``duplicate_image``; then each ``X.json`` takes the first free image of its stem;
* an image no sidecar claims is ``sidecar_missing``; the tags of a paired sidecar are parsed
  under the scan limits; the image is checked (verify mode), unless the scan index trusts it.

A ``filename`` field may name a file outside the chunk. Such a claim is left undecided
(``ChunkResult.foreign``); the scan resolves all of them at the end and runs the chunks involved
again with what it found (``ChunkJob.foreign_in`` / ``ChunkJob.verdicts``). Results are compact: a
small ``SampleTable``, a ``SkippedSamples`` of every sample dropped, counts; each row has a key, its
file's place in the listing, which orders the merged table and skip list as the walk does.

It imports ``folder_walk`` (the listing's kinds), ``image_audit`` (the image check),
``sample_table``, ``scan_limits`` and ``sidecar_format``.
"""

from __future__ import annotations

import json
import os
import posixpath
from dataclasses import dataclass, field
from pathlib import PurePosixPath, PureWindowsPath
from typing import Any, NamedTuple

import numpy as np

from folder_walk import IMAGE, IMAGE_EXTENSIONS, NOTE, REFUSED, file_stats, split_rel
from image_audit import check_images, map_threads
from sample_table import SampleTable, SampleTableBuilder, SkippedSamples
from scan_limits import LinkPolicy, ScanLimits, TagFilter, TooManyTagsError, WarningLog, is_utf8
from sidecar_format import SidecarFormatError, parse_sidecar

__all__ = [
    "SKIP_REASONS",
    "REFUSED_TEXT",
    "OutsideRootError",
    "resolve_inside",
    "read_sidecar",
    "sidecar_from_bytes",
    "parse_limited",
    "ForeignClaim",
    "ChunkJob",
    "ChunkResult",
    "scan_chunk",
]

# Every key a scan may count as a skipped sample (in this order in a SkippedSamples's reason codes).
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
REFUSED_TEXT = {
    "name_not_utf8": "file name is not valid UTF-8",
    "symlink_outside_root": "a link whose target is outside data.root (data.symlinks=inside_root)",
    "symlink_broken": "a dangling or self-referencing link",
}
# an unbounded warning log for one chunk: the scan's log merges them in order (WarningLog.merge)
_CHUNK_KINDS = 1 << 30


class OutsideRootError(ValueError):
    """A referenced image path is absolute or escapes the dataset root."""


def resolve_inside(base_rel: str, value: str) -> str:
    """POSIX path of `value` relative to the root, given the referring file's folder `base_rel`.

    Raises OutsideRootError for absolute paths (POSIX or Windows) and ``..`` escapes.
    """
    text = value.replace("\\", "/")
    if text.startswith("/") or PureWindowsPath(value).drive or PurePosixPath(text).is_absolute():
        raise OutsideRootError(f"absolute path {value!r}")
    joined = posixpath.normpath(posixpath.join(base_rel, text)) if base_rel else posixpath.normpath(text)
    if joined in (".", "..") or joined.startswith("../"):
        raise OutsideRootError(f"path {value!r} escapes the dataset root")
    return joined


def read_sidecar(path: str, max_bytes: int) -> dict[str, Any] | tuple[str, str]:
    """The sidecar's JSON object, or (skip reason, why it could not be used); at most
    `max_bytes` are read, so a huge file costs no memory."""
    try:
        with open(path, "rb", buffering=0) as handle:
            # read what the file holds, not max_bytes: a 4 MiB buffer a sidecar cost more than the parse
            size = os.fstat(handle.fileno()).st_size
            raw = handle.read(size + 1 if 0 < size <= max_bytes else max_bytes + 1)
    except OSError as exc:
        return "sidecar_unreadable", f"cannot read: {exc}"
    return sidecar_from_bytes(raw, max_bytes)


def sidecar_from_bytes(raw: bytes, max_bytes: int) -> dict[str, Any] | tuple[str, str]:
    """The JSON object in a sidecar's bytes, or (skip reason, why it cannot be used); more than
    `max_bytes` bytes is a sidecar_too_large (a tar member's bytes, or a file's first max_bytes + 1)."""
    if len(raw) > max_bytes:
        return "sidecar_too_large", f"larger than data.max_sidecar_bytes={max_bytes}"
    try:
        data = json.loads(raw.decode("utf-8-sig"))
    except UnicodeDecodeError as exc:
        return "sidecar_unreadable", f"cannot read: {exc}"
    except json.JSONDecodeError as exc:
        return "sidecar_unreadable", f"invalid JSON: {exc}"
    except RecursionError:
        return "sidecar_unreadable", "invalid JSON: nested too deeply"
    if not isinstance(data, dict):
        return "sidecar_unreadable", f"JSON is a {type(data).__name__}, expected an object"
    return data


def parse_limited(data: Any, limits: ScanLimits, format_reason: str) -> tuple[tuple[Any, ...], dict[str, int]]:
    """(outcome, tags dropped by reason) of parse_sidecar under the tag limits. The outcome is
    (tags, categories, rating), or (skip reason, detail) when the sample is unusable."""
    tag_filter = TagFilter.from_limits(limits)
    try:
        tags, cats, rating = parse_sidecar(data, tag_filter)
    except TooManyTagsError as exc:
        return ("too_many_tags", str(exc)), tag_filter.dropped
    except SidecarFormatError as exc:
        return (format_reason, str(exc)), tag_filter.dropped
    if not tags:
        return ("no_tags", "no tags" + (f" (dropped: {tag_filter.dropped})" if tag_filter.dropped else "")), tag_filter.dropped
    return (tags, cats, rating), tag_filter.dropped


class ForeignClaim(NamedTuple):
    """A sidecar's ``filename`` claim on a file outside its chunk."""

    key: int  # the sidecar's row in the listing
    side: str  # the sidecar's root-relative path
    target: str  # the claimed path; when absent, `ext_target` (gallery-dl's extension) is tried
    ext_target: str | None


@dataclass
class ChunkJob:
    """What one chunk scans: its listing rows and the part of the folder tree it owns.

    files: (key, path, kind, refused code, note) per listing row, in listing order.
    cover: (folder, first name or None, end name or None): the name ranges it owns (None: open).
    trusted: image paths the scan index vouches for (unchanged since they passed the check).
    foreign_in / verdicts: only when run again after the scan resolved claims across chunks:
    the claims of other chunks' sidecars on existing files it owns (sorted by key), and, per key of
    its own sidecars' claims outside it, ("won" | "lost" | "missing", resolved path, winner)."""

    root: str
    files: list[tuple[int, str, int, int, str]]
    cover: list[tuple[str, str | None, str | None]]
    verify: str
    limits: ScanLimits
    num_threads: int = 2
    max_examples: int = 5
    trusted: frozenset[str] = frozenset()
    foreign_in: list[ForeignClaim] = field(default_factory=list)
    verdicts: dict[int, tuple[str, str, str]] = field(default_factory=dict)
    stat: bool = False  # also stat every file (for a listing walked without stat)


@dataclass
class ChunkResult:
    """One chunk's samples and skips (see the module docstring)."""

    table: SampleTable  # sample ids and paths root-relative
    keys: np.ndarray  # (n,) int64: each record's row in the listing
    skips: SkippedSamples
    unknown_rating: int = 0
    dropped_tags: dict[str, int] = field(default_factory=dict)
    dropped_examples: list[tuple[int, str]] = field(default_factory=list)  # (key, text), the first few
    warnings: WarningLog = field(default_factory=lambda: WarningLog(_CHUNK_KINDS))
    foreign: list[ForeignClaim] = field(default_factory=list)
    verdicts: dict[int, tuple[str, str, str]] = field(default_factory=dict)  # for job.foreign_in
    stats: np.ndarray | None = None  # (len(job.files), 2) int64 size and mtime, with job.stat


class _Cover:
    """Which root-relative paths a chunk owns."""

    def __init__(self, cover: list[tuple[str, str | None, str | None]]) -> None:
        """Index the ranges by folder."""
        self.ranges: dict[str, list[tuple[str | None, str | None]]] = {}
        for folder, lo, hi in cover:
            self.ranges.setdefault(folder, []).append((lo, hi))

    def owns(self, rel: str) -> bool:
        """Whether `rel` falls in one of the chunk's name ranges."""
        folder, name = split_rel(rel)
        return any((lo is None or name >= lo) and (hi is None or name < hi) for lo, hi in self.ranges.get(folder, ()))


class _Chunk:
    """The state of one chunk's scan (scan_chunk runs its phases in order)."""

    def __init__(self, job: ChunkJob) -> None:
        """Sort the chunk's rows into images, sidecars and notes."""
        self.job = job
        self.policy = LinkPolicy(job.root, job.limits.symlinks)
        self.cover = _Cover(job.cover)
        self.out = ChunkResult(SampleTable.from_records([]), np.zeros(0, dtype=np.int64), SkippedSamples(SKIP_REASONS))
        self.images: dict[str, int] = {}  # listed image -> key
        self.extra: dict[str, int] = {}  # a claimed file found by stat, not listed -> the first claimer's key
        self.rejected: dict[str, str] = {}
        self.stems: dict[tuple[str, str], list[str]] = {}
        self.sidecars: list[tuple[int, str, str]] = []  # (key, folder, name)
        self.claimed: dict[str, tuple[str, int]] = {}  # image -> (claiming sidecar, its key)
        for key, rel, kind, refused, note in job.files:
            reason = REFUSED[refused]
            if kind == NOTE:
                self.skip(reason, rel, note, key)
                continue
            if reason:
                self.rejected[rel] = reason
            folder, name = split_rel(rel)
            if kind == IMAGE:
                self.images[rel] = key
                self.stems.setdefault((folder, os.path.splitext(name)[0]), []).append(rel)
            else:
                self.sidecars.append((key, folder, name))

    def skip(self, reason: str, path: str, detail: str, key: int) -> None:
        """Count one dropped sample."""
        self.out.skips.add(reason, path, detail, key)

    def abs(self, rel: str) -> str:
        """The absolute path of a root-relative one."""
        return os.path.join(self.job.root, *rel.split("/"))

    def existing(self, rel: str) -> str | None | bool:
        """`rel` when that file exists (listed, or found by stat and allowed by the link policy),
        None when it does not, False when the chunk cannot tell (another chunk owns it)."""
        if rel in self.images or rel in self.extra:
            return rel
        if not self.cover.owns(rel):
            return False
        path = self.abs(rel)
        if os.path.isfile(path) and self.policy.reason_for_file(path) is None:
            return rel
        return None

    def implicit_options(self, folder: str, name: str) -> list[str]:
        """Images a sidecar names by its own file name: X.ext for X.ext.json, X.* for X.json."""
        stem = name[:-5]
        if os.path.splitext(stem)[1].lower() in IMAGE_EXTENSIONS:
            own = posixpath.join(folder, stem) if folder else stem
            return [own] if own in self.images else []
        return self.stems.get((folder, stem), [])


def _join(folder: str, name: str) -> str:
    """Root-relative POSIX path of `name` in `folder`."""
    return f"{folder}/{name}" if folder else name


def _read_all(chunk: _Chunk) -> list[Any]:
    """Every sidecar's JSON object or (reason, detail); refused ones are never opened."""
    job = chunk.job
    paths = [chunk.abs(_join(f, n)) for _, f, n in chunk.sidecars if _join(f, n) not in chunk.rejected]
    readable = iter(map_threads(read_sidecar, paths, job.num_threads, job.limits.max_sidecar_bytes))
    out = []
    for _, folder, name in chunk.sidecars:
        rel = _join(folder, name)
        out.append((chunk.rejected[rel], REFUSED_TEXT[chunk.rejected[rel]]) if rel in chunk.rejected else next(readable))
    return out


def _claims_by_field(chunk: _Chunk, parsed: list[Any]) -> tuple[dict[int, str], list[int], dict[int, str], list[tuple[str, str]]]:
    """(claims by field or by X.ext.json: sidecar index -> image, sidecars left to claim by stem,
    their field values that were not found, sidecars that failed before pairing)."""
    targets: dict[int, str] = {}
    pending_stem: list[int] = []
    named_missing: dict[int, str] = {}
    failed: list[tuple[str, str]] = []
    for i, ((key, folder, name), result) in enumerate(zip(chunk.sidecars, parsed)):
        side = _join(folder, name)
        if isinstance(result, tuple):
            chunk.skip(result[0], side, result[1], key)
            failed.append((folder, name))
            continue
        explicit = result.get("filename", result.get("file"))
        if explicit is not None:
            problem = _field_problem(explicit)
            if problem is None:
                try:
                    target = resolve_inside(folder, explicit.strip())
                except OutsideRootError as exc:
                    problem = ("path_outside_root", str(exc))
            if problem is not None:
                chunk.skip(problem[0], side, problem[1], key)
                failed.append((folder, name))
                continue
            extension = result.get("extension")
            # gallery-dl stores the stem in "filename" and the suffix in "extension"
            ext_target = f"{target}.{extension.lstrip('.')}" if isinstance(extension, str) and extension and is_utf8(extension) else None
            found = chunk.existing(target)
            if found is None and ext_target is not None:
                found = chunk.existing(ext_target)
            if found is False:  # another chunk owns the file: the scan decides at the end
                verdict = chunk.job.verdicts.get(key)
                if verdict is None:
                    chunk.out.foreign.append(ForeignClaim(key, side, target, ext_target))
                    continue
                status, resolved, winner = verdict
                if status == "lost":
                    chunk.skip("duplicate_image", side, f"{resolved!r} already claimed by {winner}", key)
                if status != "missing":
                    continue
                found = None
            if found is not None:
                if found not in chunk.images:
                    chunk.extra.setdefault(found, key)
                targets[i] = found
                continue
            named_missing[i] = explicit.strip()
        stem = name[:-5]  # drop ".json"
        if os.path.splitext(stem)[1].lower() in IMAGE_EXTENSIONS:
            own = _join(folder, stem)
            if own in chunk.images or own in chunk.extra:
                targets[i] = own
            else:
                named = f" nor {named_missing[i]!r}" if i in named_missing else ""
                chunk.skip("image_missing", side, f"no image {own!r}{named}", key)
            continue
        pending_stem.append(i)
    return targets, pending_stem, named_missing, failed


def _field_problem(explicit: Any) -> tuple[str, str] | None:
    """(reason, detail) when a sidecar's filename field cannot name a file, else None."""
    if not isinstance(explicit, str) or not explicit.strip():
        return "sidecar_unreadable", "field 'filename' is not a path string"
    if not is_utf8(explicit):
        return "name_not_utf8", "field 'filename' is not valid UTF-8"
    return None


def _claim(chunk: _Chunk, targets: dict[int, str], pending_stem: list[int], named_missing: dict[int, str], failed: list[tuple[str, str]]) -> None:
    """Settle who owns each image: claims by field and X.ext.json in key order (other chunks'
    claims included), then X.json by stem; images of failed sidecars are not counted again."""
    job = chunk.job
    claims = [(chunk.sidecars[i][0], i, t) for i, t in targets.items()]
    claims += [(fc.key, -1 - n, fc.target) for n, fc in enumerate(job.foreign_in)]
    for key, i, target in sorted(claims):
        side = _join(*chunk.sidecars[i][1:]) if i >= 0 else job.foreign_in[-1 - i].side
        if target in chunk.claimed:
            if i >= 0:
                chunk.skip("duplicate_image", side, f"{target!r} already claimed by {chunk.claimed[target][0]}", key)
                del targets[i]
            else:
                chunk.out.verdicts[key] = ("lost", target, chunk.claimed[target][0])
            continue
        chunk.claimed[target] = (side, key)
        if i < 0:
            chunk.out.verdicts[key] = ("won", target, side)
    for i in pending_stem:
        key, folder, name = chunk.sidecars[i]
        side = _join(folder, name)
        options = chunk.stems.get((folder, name[:-5]), [])
        free = [o for o in options if o not in chunk.claimed]
        if free:
            targets[i] = free[0]
            chunk.claimed[free[0]] = (side, key)
        elif options:
            chunk.skip("duplicate_image", side, f"{options[0]!r} already claimed by {chunk.claimed[options[0]][0]}", key)
        else:
            named = f" and {named_missing[i]!r} not found" if i in named_missing else ""
            chunk.skip("image_missing", side, f"no image named {name[:-5]}.<ext> next to it{named}", key)
    # an image next to a sidecar that was already counted as bad must not be counted twice
    for folder, name in failed:
        for option in chunk.implicit_options(folder, name):
            if option not in chunk.claimed:
                chunk.claimed[option] = (_join(folder, name), -1)
                break
    for image, key in chunk.images.items():
        if image not in chunk.claimed:
            if image in chunk.rejected:  # a refused link counts once, under the link's reason
                chunk.skip(chunk.rejected[image], image, REFUSED_TEXT[chunk.rejected[image]], key)
            else:
                chunk.skip("sidecar_missing", image, f"no {posixpath.basename(image)}.json or stem .json", key)


def _candidates(chunk: _Chunk, targets: dict[int, str], parsed: list[Any]) -> list[tuple[int, str, tuple[Any, ...]]]:
    """(record key, image, (tags, categories, rating)) of every paired sample whose tags are
    usable, in key order; other chunks' winning claims are read here."""
    job = chunk.job
    paired = [(i, t) for i, t in targets.items()] + [
        (-1 - n, fc.target) for n, fc in enumerate(job.foreign_in) if chunk.out.verdicts.get(fc.key, ("",))[0] == "won"
    ]
    out = []
    # a record's key: its image's row, or for a file the walk did not list, its claimer's row
    for i, target in sorted(paired, key=lambda it: chunk.images.get(it[1], chunk.claimed[it[1]][1])):
        if i >= 0:
            key, folder, name = chunk.sidecars[i]
            side, data = _join(folder, name), parsed[i]
        else:
            fc = job.foreign_in[-1 - i]
            key, side = fc.key, fc.side
            data = read_sidecar(chunk.abs(side), job.limits.max_sidecar_bytes)
            if isinstance(data, tuple):  # changed since it was read: counted as it is now
                chunk.skip(data[0], side, data[1], key)
                continue
        if target in chunk.rejected:
            chunk.skip(chunk.rejected[target], side, f"image {target!r}: {REFUSED_TEXT[chunk.rejected[target]]}", key)
            continue
        outcome, dropped = parse_limited(data, job.limits, "sidecar_unreadable")
        for reason, count in dropped.items():
            chunk.out.dropped_tags[reason] = chunk.out.dropped_tags.get(reason, 0) + count
            if len(chunk.out.dropped_examples) < job.max_examples:
                chunk.out.dropped_examples.append((key, f"{side}: {count} {reason}"))
        if isinstance(outcome[0], str):
            chunk.skip(outcome[0], side, outcome[1], key)
            continue
        out.append((chunk.images.get(target, key), target, outcome))
    return out


def _check_and_record(chunk: _Chunk, candidates: list[tuple[int, str, tuple[Any, ...]]]) -> None:
    """Check the candidates' images (those the index does not vouch for) and keep those that pass."""
    job = chunk.job
    todo = [c for c in candidates if c[1] not in job.trusted]
    results: dict[str, tuple[str | None, str]] = {}
    if job.verify != "none" and todo:
        found, caught = check_images([chunk.abs(c[1]) for c in todo], job.verify, job.num_threads)
        results = {c[1]: r for c, r in zip(todo, found)}
        chunk.out.warnings.add_messages(caught)
    builder = SampleTableBuilder()
    keys = []
    for key, target, (tags, cats, rating) in candidates:
        reason, detail = results.get(target, (None, ""))
        if reason is not None:
            chunk.skip(reason, target, detail, key)
            continue
        chunk.out.unknown_rating += rating < 0
        builder.add(target, target, tags, cats, rating)
        keys.append(key)
    chunk.out.table = builder.build()
    chunk.out.keys = np.asarray(keys, dtype=np.int64)


def scan_chunk(job: ChunkJob) -> ChunkResult:
    """Pair, read and check one chunk (see the module docstring); a module-level function, so
    that a spawned pool can run it."""
    chunk = _Chunk(job)
    if job.stat:  # notes name no file: they keep the walk's (-1, -1)
        stats = file_stats([chunk.abs(rel) for _, rel, kind, _, _ in job.files if kind != NOTE])
        notes = [kind == NOTE for _, _, kind, _, _ in job.files]
        it = iter(stats)
        chunk.out.stats = np.asarray([(-1, -1) if note else next(it) for note in notes], dtype=np.int64).reshape(-1, 2)
    parsed = _read_all(chunk)
    targets, pending_stem, named_missing, failed = _claims_by_field(chunk, parsed)
    _claim(chunk, targets, pending_stem, named_missing, failed)
    _check_and_record(chunk, _candidates(chunk, targets, parsed))
    return chunk.out
