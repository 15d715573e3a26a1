"""Sidecar JSON format: tags (lists, strings, per-category fields, e621-style dicts) and ratings.

This module owns how one sidecar object (or manifest record) becomes normalised tags, their
categories and a rating: ``parse_rating``, ``split_tag_string``, ``parse_sidecar``, with the
per-sample limits of a ``scan_limits.TagFilter`` applied while parsing (so an oversized tag is
never normalised) and ``SidecarFormatError`` for fields of the wrong type. It imports
``tag_text`` (normalisation) and ``scan_limits``; ``dataset_scan`` re-exports its public names.
"""

from __future__ import annotations

import functools
import sys
from typing import Any, Iterable, Mapping

from scan_limits import TagFilter
from tag_text import normalize_tag

__all__ = ["TAG_CATEGORIES", "SidecarFormatError", "parse_rating", "split_tag_string", "parse_sidecar"]

TAG_CATEGORIES: tuple[str, ...] = ("general", "character", "copyright", "artist", "meta")

_RATING_CODES: dict[str, int] = {"g": 0, "general": 0, "safe": 0, "s": 1, "sensitive": 1, "q": 2, "questionable": 2, "e": 3, "explicit": 3}
# e621-style tag dicts use other category names; these map onto ours, the rest become "".
_CATEGORY_ALIASES: dict[str, str] = {c: c for c in TAG_CATEGORIES}
_CATEGORY_ALIASES.update({"species": "general", "lore": "meta", "invalid": "meta"})


class SidecarFormatError(ValueError):
    """A sidecar or manifest entry has a field of the wrong type."""


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


def split_tag_string(text: str, tag_filter: TagFilter | None = None) -> list[str]:
    """Split a tag string on commas if it has any, else on whitespace; normalise and drop empties."""
    return _normalised(text.split(",") if "," in text else text.split(), "tags", tag_filter)


def _normalised(parts: list[Any], field_name: str, tag_filter: TagFilter | None) -> list[str]:
    """Normalised non-empty tags of `parts` (strings), through the limits of `tag_filter`."""
    limit = sys.maxsize
    if tag_filter is not None:
        tag_filter.check_count(len(parts), field_name)
        limit = tag_filter.max_chars
    out = []
    for item in parts:
        if not isinstance(item, str):
            raise SidecarFormatError(f"field {field_name!r} holds a {type(item).__name__}, expected strings")
        # the filter's methods only for a tag near a limit or not ASCII: most tags are neither
        if tag_filter is not None and len(item) > 4 * limit and not tag_filter.raw_ok(item):
            continue
        tag = _norm(item)
        if tag and (tag_filter is None or (len(tag) <= limit and tag.isascii()) or tag_filter.accept(tag)):
            out.append(tag)
    return out


def _tags_from_value(value: Any, field_name: str, *, space_only: bool = False, tag_filter: TagFilter | None = None) -> list[str]:
    """Tags from a list of strings or one string; raises SidecarFormatError on other types."""
    if value is None:
        return []
    if isinstance(value, str):
        if space_only:
            return _normalised(value.split(), field_name, tag_filter)
        return split_tag_string(value, tag_filter)
    if isinstance(value, list):
        return _normalised(value, field_name, tag_filter)
    raise SidecarFormatError(f"field {field_name!r} is a {type(value).__name__}, expected a list of strings or a string")


def parse_sidecar(data: Any, tag_filter: TagFilter | None = None) -> tuple[tuple[str, ...], tuple[str, ...], int]:
    """Tags, categories and rating from one sidecar object; ValueError on wrong field types.

    `tag_filter` applies the per-sample limits (TooManyTagsError past max_tags_per_sample; long
    or unencodable tags dropped and counted in it). Reads ``tags`` (list, string, or an e621-style ``{category: [tags]}`` dict), the per-category
    ``tag_string_<cat>`` / ``tags_<cat>`` fields and ``tag_string``. Tags keep their first
    appearance; a tag first seen without a category takes the first category given later.
    """
    if not isinstance(data, Mapping):
        raise SidecarFormatError(f"sidecar is a JSON {type(data).__name__}, expected an object")
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
            add(_tags_from_value(value, f"tags.{key}", tag_filter=tag_filter), _CATEGORY_ALIASES.get(str(key).lower(), ""))
    else:
        add(_tags_from_value(raw_tags, "tags", tag_filter=tag_filter), "")
    for category in TAG_CATEGORIES:
        add(_tags_from_value(data.get(f"tag_string_{category}"), f"tag_string_{category}", space_only=True, tag_filter=tag_filter), category)
        add(_tags_from_value(data.get(f"tags_{category}"), f"tags_{category}", tag_filter=tag_filter), category)
    tag_string = data.get("tag_string")
    if tag_string is not None and not isinstance(tag_string, str):
        raise SidecarFormatError(f"field 'tag_string' is a {type(tag_string).__name__}, expected a string")
    add(_tags_from_value(tag_string, "tag_string", space_only=True, tag_filter=tag_filter), "")
    if tag_filter is not None:
        tag_filter.check_count(len(order), "all tag fields together")
    return tuple(order), tuple(cats[t] for t in order), parse_rating(data.get("rating"))
