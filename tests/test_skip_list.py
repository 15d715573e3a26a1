"""skip_list.py: the complete list of skipped samples, written whole and read back as written (Python's csv module as the reference)."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest

from scan_limits import printable
from skip_list import COLUMNS, PRE_TRAINING, read_skip_list, write_skip_list


def test_rows_round_trip_through_csv(tmp_path: Path) -> None:
    rows = [
        ("a,b.png", "decode_error", "start-up", 'broken "quote", comma'),
        ("sub/c.jpg", "no_known_tags", "split", ""),
        ("d.png", "load_failed", "training", "OSError: line one\nline two"),
        ("e\udcff.png", "decode_error", "validation", "tab\there"),  # a non-UTF-8 name as os.listdir gives it
    ]
    path = tmp_path / "skipped_samples.csv"
    assert write_skip_list(path, iter(rows)) == 4
    with open(path, encoding="utf-8", newline="") as handle:
        parsed = list(csv.reader(handle))
    assert tuple(parsed[0]) == COLUMNS and len(parsed) == 5
    assert parsed[1] == list(rows[0])
    assert parsed[3][3] == "OSError: line one line two"  # one line a row
    assert parsed[4][0] == printable("e\udcff.png") == "e\\udcff.png"  # escaped, never a lone surrogate
    assert [r[2] for r in read_skip_list(path, PRE_TRAINING)] == ["start-up", "split"]
    assert len(list(read_skip_list(path))) == 4
    assert list(read_skip_list(tmp_path / "absent.csv")) == []


def test_many_rows_stream_in_chunks(tmp_path: Path) -> None:
    rows = ((f"img_{i:06d}.png", "missing_sidecar", "start-up", "") for i in range(20_000))
    path = tmp_path / "list.csv"
    assert write_skip_list(path, rows) == 20_000
    back = list(read_skip_list(path))
    assert len(back) == 20_000 and back[-1][0] == "img_019999.png" and len({r[0] for r in back}) == 20_000


def test_bad_stage_and_foreign_file_are_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="unknown stage 'later'"):
        write_skip_list(tmp_path / "x.csv", [("a.png", "r", "later", "")])
    assert not (tmp_path / "x.csv").exists()  # atomic: nothing half-written
    other = tmp_path / "other.csv"
    other.write_text("name,size\na,1\n", encoding="utf-8")
    with pytest.raises(ValueError, match="not a skipped-samples list"):
        list(read_skip_list(other))
