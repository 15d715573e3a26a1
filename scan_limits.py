"""Limits and policies for untrusted dataset input: names, links, sidecar size, tags, decoder warnings.

Everything the dataset scan reads from the file system or a sidecar is data someone else wrote.
This module owns the rules that keep one bad file from taking over a run: ``ScanLimits`` (the
``data.max_tags_per_sample`` / ``max_tag_chars`` / ``max_sidecar_bytes`` / ``symlinks`` keys),
``is_utf8`` and ``printable`` (Linux file names are byte strings; Python hands non-UTF-8 ones over
as surrogate-escaped ``str`` that cannot be encoded, hashed or written to JSON), ``LinkPolicy``
(which symbolic links may be followed), ``TagFilter`` (tags per sample, tag length, tags that
cannot be encoded) and ``WarningLog`` (decoder warnings counted for the report instead of printed).
It imports no project module.
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass, field
from typing import Any, Iterable

__all__ = ["ScanLimits", "is_utf8", "printable", "LinkPolicy", "TooManyTagsError", "TagFilter", "WarningLog"]

SYMLINK_POLICIES = ("inside_root", "follow")


@dataclass(frozen=True)
class ScanLimits:
    """Bounds on what one sample may contribute; the defaults equal DataConfig's."""

    max_tags_per_sample: int = 2048
    max_tag_chars: int = 256
    max_sidecar_bytes: int = 4 * 1024 * 1024
    symlinks: str = "inside_root"

    def __post_init__(self) -> None:
        """Reject non-positive limits and unknown link policies."""
        for name in ("max_tags_per_sample", "max_tag_chars", "max_sidecar_bytes"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)!r}")
        if self.symlinks not in SYMLINK_POLICIES:
            raise ValueError(f"symlinks must be one of {SYMLINK_POLICIES}, got {self.symlinks!r}")


def is_utf8(text: str) -> bool:
    """Whether `text` encodes as UTF-8 (False for surrogate-escaped names and lone surrogates)."""
    if text.isascii():  # most names and tags: no encoding needed to know
        return True
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def printable(text: str) -> str:
    """`text` with unencodable characters as backslash escapes: safe for JSON, logs and consoles."""
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


def _inside(path: str, root: str) -> bool:
    """Whether the resolved `path` is `root` or below it (both already real paths)."""
    return path == root or path.startswith(root.rstrip(os.sep) + os.sep)


class LinkPolicy:
    """Decides whether a path that is (or passes through) a symbolic link may be used."""

    def __init__(self, root: str, mode: str) -> None:
        """`root`: the dataset folder; `mode`: inside_root (links must stay inside it) or follow."""
        if mode not in SYMLINK_POLICIES:
            raise ValueError(f"symlinks must be one of {SYMLINK_POLICIES}, got {mode!r}")
        self.mode = mode
        self.root_real = os.path.realpath(root)

    def reason(self, path: str) -> str | None:
        """None when `path` may be used; else 'symlink_broken' (dangling or a loop) or
        'symlink_outside_root' (its target leaves the dataset under the inside_root policy)."""
        real = os.path.realpath(path)
        if not os.path.exists(real):
            return "symlink_broken"
        if self.mode == "inside_root" and not _inside(real, self.root_real):
            return "symlink_outside_root"
        return None

    def reason_for_file(self, path: str) -> str | None:
        """Like reason(), for any file path (manifest entries, sidecar 'filename' targets):
        only paths whose resolution differs from their spelling are links."""
        if os.path.realpath(path) == os.path.abspath(path):
            return None
        return self.reason(path)


class TooManyTagsError(ValueError):
    """A sidecar lists more tags than data.max_tags_per_sample."""


@dataclass
class TagFilter:
    """Applies the tag limits while a sidecar is parsed; counts what it dropped."""

    max_tags: int = 2048
    max_chars: int = 256
    dropped: dict[str, int] = field(default_factory=dict)

    @classmethod
    def from_limits(cls, limits: ScanLimits) -> "TagFilter":
        """A filter for these limits, with no drops counted yet."""
        return cls(limits.max_tags_per_sample, limits.max_tag_chars)

    def check_count(self, count: int, field_name: str) -> None:
        """TooManyTagsError when one field alone holds more items than a sample may have tags."""
        if count > self.max_tags:
            raise TooManyTagsError(f"field {field_name!r} holds {count} tags, more than data.max_tags_per_sample={self.max_tags}")

    def raw_ok(self, raw: str) -> bool:
        """Whether a raw tag is short enough to normalise (checked first, so a 10 MiB string is
        never normalised or cached)."""
        if len(raw) > 4 * self.max_chars and len(raw.strip()) > self.max_chars:
            self._drop("tag_too_long")
            return False
        return True

    def accept(self, tag: str) -> bool:
        """Whether a normalised tag may be kept; drops are counted by reason."""
        if len(tag) > self.max_chars:
            self._drop("tag_too_long")
            return False
        if not is_utf8(tag):
            self._drop("tag_not_utf8")
            return False
        return True

    def _drop(self, reason: str) -> None:
        """Count one dropped tag."""
        self.dropped[reason] = self.dropped.get(reason, 0) + 1


class WarningLog:
    """Collects warnings raised while images are opened, counted by category and message."""

    def __init__(self, max_kinds: int = 20) -> None:
        """Keep at most `max_kinds` distinct messages (the rest are counted as 'other')."""
        self.max_kinds = max_kinds
        self.counts: dict[str, int] = {}

    def add_all(self, caught: Iterable[warnings.WarningMessage]) -> None:
        """Count recorded warnings (from warnings.catch_warnings(record=True))."""
        self.add_messages((item.category.__name__, str(item.message)) for item in caught)

    def add_messages(self, messages: Iterable[tuple[str, str]]) -> None:
        """Count warnings given as (category name, message) pairs (from another process)."""
        for category, message in messages:
            key = printable(f"{category}: {message[:160]}")
            if key not in self.counts and len(self.counts) >= self.max_kinds:
                key = "other"
            self.counts[key] = self.counts.get(key, 0) + 1

    def merge(self, other: "WarningLog") -> None:
        """Count `other`'s warnings as if its messages had been added here one by one, in the order
        it first saw them (so merging the logs of a scan's chunks in order gives the serial log)."""
        for key, count in other.counts.items():
            if key not in self.counts and len(self.counts) >= self.max_kinds:
                key = "other"
            self.counts[key] = self.counts.get(key, 0) + count

    def to_report(self) -> dict[str, Any]:
        """Counts by message, most frequent first."""
        return dict(sorted(self.counts.items(), key=lambda kv: (-kv[1], kv[0])))
