"""Test helper shared by the data-pipeline tests: folder listings, a small flip map, the broken corpus.

Each test module that needs the broken corpus defines its own module-scoped fixture calling
`broken_corpus`, so the corpus is built once per module and never shared across modules.
"""

from __future__ import annotations

import os
from pathlib import Path

import broken_corpus as bc
from orientation_handler import OrientationHandler


def listing(root: Path) -> dict[str, tuple[int, int]]:
    """Every file under root with (size, mtime_ns): to prove nothing was written there."""
    out = {}
    for dirpath, _dirs, files in os.walk(root):
        for name in files:
            st = os.lstat(os.path.join(dirpath, name))  # lstat: dangling links are part of a corpus too
            out[os.path.join(dirpath, name)] = (st.st_size, st.st_mtime_ns)
    return out


def small_orientation_handler() -> OrientationHandler:
    """A small explicit orientation handler independent of the shipped map file."""
    return OrientationHandler(
        explicit_pairs=[("looking_to_the_left", "looking_to_the_right")],
        forbid_flip=["text"],
        token_rule=True,
        orientation_patterns=[r"(^|_)(left|right)[a-z]"],
        safety_mode="conservative",
    )


def broken_corpus(base: Path) -> bc.BrokenCorpus:
    """47 good + 12 broken + 1 unknown-rating sample under `base`: exactly 20% of 60 samples are bad."""
    outside = bc.write_image(base / "outside.jpg")
    return bc.make_broken_corpus(base / "root", good=47, copies=1, outside_target=outside)
