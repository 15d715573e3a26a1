"""README.md, the front door: it shows what a reader will see, not the paths of the machine it was written on."""

from __future__ import annotations

import re

from conftest import ROOT

# Absolute folders of a particular machine (a home, a checkout, a temp or system folder, a virtual
# environment's interpreter); the commands' placeholders such as /data/booru or D:\booru are
# a reader's own choice and stay.
MACHINE_PATH = re.compile(r"(?<![\w.~])/(?:work|home|tmp|root|Users|usr|opt|var|private)/|[\\/]\.?venv[\\/](?:bin|Scripts)[\\/]python")


def test_readme_names_no_absolute_path_of_a_machine() -> None:
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    assert str(ROOT) not in text
    hits = [f"line {i}: {line}" for i, line in enumerate(text.splitlines(), 1) if MACHINE_PATH.search(line)]
    assert not hits, "\n".join(hits)
