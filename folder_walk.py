"""The dataset folder walk: every image and sidecar under a root, in one order, packed into arrays.

This module owns ``IMAGE_EXTENSIONS`` and ``walk_listing``, which lists a dataset folder once: a
folder's files sorted by name, then its sub-folders in sorted order, depth first. Each listed file
is a row of a ``Listing``: its root-relative POSIX path (a UTF-8 blob with int64 offsets), size and
mtime (one ``stat``), and a kind (image, sidecar, or a note about something set aside: a folder
that could not be read, a folder link the ``data.symlinks`` policy refuses, a name that is not
UTF-8). At millions of files a row costs ~40 B, where a Python string a path cost ~100 B.

The scan pairs its files from a listing and the scan index fingerprints the folder with the same
walk, so "unchanged" means exactly "the scan would see the same files". It imports
``scan_limits`` (the link policy and the UTF-8 check).
"""

from __future__ import annotations

import array
import itertools
import os
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from scan_limits import LinkPolicy, is_utf8

__all__ = ["IMAGE_EXTENSIONS", "IMAGE", "SIDECAR", "NOTE", "REFUSED", "NOT_STATED", "Listing", "walk_listing", "file_stats", "split_rel"]

IMAGE_EXTENSIONS: frozenset[str] = frozenset({".jpg", ".jpeg", ".png", ".webp", ".gif", ".bmp"})

# a row's kind: an image, a sidecar, or a note (a folder or entry the walk set aside, counted once)
IMAGE, SIDECAR, NOTE = 1, 2, 3
# why an image or sidecar was set aside without being opened, by code (0: not set aside)
REFUSED: tuple[str, ...] = ("", "name_not_utf8", "symlink_outside_root", "symlink_broken", "directory_unreadable")
_REFUSED_CODE = {reason: code for code, reason in enumerate(REFUSED) if reason}
_ENCODING = "surrogatepass"
# the size and mtime of a row a walk without stat listed (file_stats fills them in)
NOT_STATED = -2
_NOT_STATED = (NOT_STATED, NOT_STATED)  # names that are not UTF-8 arrive surrogate-escaped and must round-trip


def split_rel(rel: str) -> tuple[str, str]:
    """(folder, name) of a root-relative POSIX path."""
    slash = rel.rfind("/")
    return (rel[:slash], rel[slash + 1 :]) if slash >= 0 else ("", rel)


@dataclass
class Listing:
    """Every image and sidecar a walk found (see the module docstring), row i in walk order.

    ``folders`` holds (folder, first row, end row) for every folder listed, in walk order;
    ``notes`` the detail of each NOTE row (an error text)."""

    root: str
    paths: np.ndarray  # (F,) uint8 UTF-8 blob
    offsets: np.ndarray  # (F + 1,) int64
    sizes: np.ndarray  # (F,) int64; -1 where stat failed (a broken link)
    mtimes: np.ndarray  # (F,) int64 nanoseconds
    kinds: np.ndarray  # (F,) uint8: IMAGE, SIDECAR or NOTE
    refused: np.ndarray  # (F,) uint8: index into REFUSED (0: usable)
    folders: list[tuple[str, int, int]] = field(default_factory=list)
    notes: dict[int, str] = field(default_factory=dict)

    def __len__(self) -> int:
        """Number of rows."""
        return len(self.sizes)

    def path(self, i: int) -> str:
        """The root-relative path of row i."""
        return self.paths[self.offsets[i] : self.offsets[i + 1]].tobytes().decode("utf-8", _ENCODING)

    def path_list(self, start: int = 0, end: int | None = None) -> list[str]:
        """The paths of rows start..end as strings (a slice at a time: a whole listing as strings
        is what this class avoids)."""
        end = len(self) if end is None else end
        blob = self.paths[self.offsets[start] : self.offsets[end]].tobytes()
        base = int(self.offsets[start])
        cuts = (self.offsets[start : end + 1] - base).tolist()
        return [blob[cuts[k] : cuts[k + 1]].decode("utf-8", _ENCODING) for k in range(end - start)]


class _Rows:
    """Growable buffers of a Listing under construction, filled a folder at a time."""

    def __init__(self) -> None:
        """No rows yet."""
        self.paths, self.kinds, self.refused = bytearray(), bytearray(), bytearray()
        self.offsets = array.array("q", [0])
        self.sizes, self.mtimes = array.array("q"), array.array("q")

    def __len__(self) -> int:
        """Rows so far."""
        return len(self.kinds)

    def add_folder(self, prefix: str, rows: list[tuple[str, int, int, int, int, str]], notes: dict[int, str]) -> None:
        """Append one folder's sorted rows (name, kind, refused, size, mtime, note)."""
        first = len(self.kinds)
        encoded = [(prefix + row[0]).encode("utf-8", _ENCODING) for row in rows]
        self.paths += b"".join(encoded)
        ends = itertools.accumulate(map(len, encoded), initial=self.offsets[-1])
        next(ends)  # the initial value is the last offset already stored
        self.offsets.extend(ends)
        self.kinds.extend(row[1] for row in rows)
        self.refused.extend(row[2] for row in rows)
        self.sizes.extend(row[3] for row in rows)
        self.mtimes.extend(row[4] for row in rows)
        for k, row in enumerate(rows):
            if row[5]:
                notes[first + k] = row[5]


def _extension(name: str) -> str:
    """os.path.splitext(name)[1].lower() of a file name, without its cost."""
    dot = name.rfind(".")
    if dot <= 0 or (name[0] == "." and not name[:dot].strip(".")):  # leading dots start no extension
        return ""
    return name[dot:].lower()


def _stat(entry: os.DirEntry) -> tuple[int, int]:
    """(size, mtime in ns) of an entry, following links; (-1, -1) when it cannot be stat'ed."""
    try:
        st = entry.stat()
    except OSError:  # a broken link, or a file gone since the listing
        return -1, -1
    return int(st.st_size), int(st.st_mtime_ns)


def file_stats(paths: list[str]) -> list[tuple[int, int]]:
    """(size, mtime in ns) of each path as a walk with stat records it (following links; (-1, -1)
    where it cannot be stat'ed)."""
    out = []
    for path in paths:
        try:
            st = os.stat(path)
        except (OSError, ValueError):  # a broken link, a file gone since the listing, a NUL in the name
            out.append((-1, -1))
            continue
        out.append((int(st.st_size), int(st.st_mtime_ns)))
    return out


def _list_folder(abs_dir: str, policy: LinkPolicy, seen_real: set[str], stat: bool) -> tuple[list[tuple[str, int, int, int, int, str]], list[str]]:
    """(sorted rows (name, kind, refused code, size, mtime, note) of one folder, sorted sub-folder
    names to visit; size and mtime NOT_STATED unless `stat`); raises OSError when the folder cannot
    be listed."""
    rows: list[tuple[str, int, int, int, int, str]] = []
    subdirs: list[str] = []
    with os.scandir(abs_dir) as it:
        for entry in it:
            name = entry.name
            ext = _extension(name)
            kind = SIDECAR if ext == ".json" else IMAGE if ext in IMAGE_EXTENSIONS else 0
            try:
                link = entry.is_symlink()
                # Linux names are bytes: one that is not UTF-8 cannot go into JSON or a hash
                reason = None if name.isascii() or is_utf8(name) else "name_not_utf8"
                if reason is None and link:
                    reason = policy.reason(entry.path)
                if reason is not None:
                    # images and sidecars are set aside and counted once, as a sample; folders once
                    if kind:
                        rows.append((name, kind, _REFUSED_CODE[reason], *(_stat(entry) if stat else _NOT_STATED), ""))
                    elif reason != "symlink_broken" and os.path.isdir(entry.path):
                        rows.append((name, NOTE, _REFUSED_CODE[reason], -1, -1, "skipped folder or file"))
                    continue
                if entry.is_dir():
                    if link:  # follow linked folders once, never in a loop
                        real = os.path.realpath(entry.path)
                        if real in seen_real:
                            continue
                        seen_real.add(real)
                    subdirs.append(name)
                    continue
                if not kind or not entry.is_file():
                    continue
            except OSError as exc:
                rows.append((name, NOTE, _REFUSED_CODE["directory_unreadable"], -1, -1, str(exc)))
                continue
            rows.append((name, kind, 0, *(_stat(entry) if stat else _NOT_STATED), ""))
    rows.sort()
    subdirs.sort()
    return rows, subdirs


def walk_listing(root: str, policy: LinkPolicy, progress: Callable[[int], None] | None = None, *, stat: bool = True) -> Listing:
    """Every image and sidecar below `root` (see the module docstring). Links are followed as
    `policy` allows (linked folders once); names that are not UTF-8, refused links and unreadable
    folders are rows of their own, so that the scan counts them and a fingerprint sees them.
    `progress` is called with the number of rows so far after each folder. Without `stat` the
    sizes and mtimes are NOT_STATED, for a caller that stats the files elsewhere (the scan does,
    on its pool, with file_stats)."""
    root_abs = os.path.abspath(root)
    rows = _Rows()
    folders: list[tuple[str, int, int]] = []
    notes: dict[int, str] = {}
    stack = [""]
    seen_real = {os.path.realpath(root_abs)}
    while stack:
        rel = stack.pop()
        prefix = rel + "/" if rel else ""
        first = len(rows)
        try:
            listed, subdirs = _list_folder(os.path.join(root_abs, *rel.split("/")) if rel else root_abs, policy, seen_real, stat)
        except OSError as exc:
            listed, subdirs, prefix = [(rel or ".", NOTE, _REFUSED_CODE["directory_unreadable"], -1, -1, str(exc))], [], ""
        rows.add_folder(prefix, listed, notes)
        folders.append((rel, first, len(rows)))
        if progress is not None:
            progress(len(rows))
        # reversed so that popping visits sub-folders in sorted order
        stack.extend(prefix + d for d in reversed(subdirs))
    return Listing(
        root_abs,
        np.frombuffer(rows.paths, dtype=np.uint8),
        np.frombuffer(rows.offsets, dtype=np.int64),
        np.frombuffer(rows.sizes, dtype=np.int64),
        np.frombuffer(rows.mtimes, dtype=np.int64),
        np.frombuffer(rows.kinds, dtype=np.uint8),
        np.frombuffer(rows.refused, dtype=np.uint8),
        folders,
        notes,
    )
