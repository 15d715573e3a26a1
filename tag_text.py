"""Tag text normalisation: the one rule that turns a tag as written into the form the project stores.

This module owns `normalize_tag`. It sits at the very bottom of the project and imports no
project module, so that both the dataset scanner (`dataset_scan`) and the vocabulary
(`vocabulary`, which re-exports `normalize_tag`) can use it without importing each other.
"""

from __future__ import annotations

import re

__all__ = ["normalize_tag"]

_WHITESPACE_RUN = re.compile(r"\s+")


def normalize_tag(tag: str) -> str:
    """Return `tag` stripped, lower-cased, with inner whitespace runs turned into one "_"."""
    return _WHITESPACE_RUN.sub("_", tag.strip().lower())
