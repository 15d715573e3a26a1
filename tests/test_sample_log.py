"""Tests for sample_log: the per-step sample ids, cut back on resume like metrics.jsonl."""

from __future__ import annotations

from pathlib import Path

import pytest

from sample_log import SampleLog, read_sample_log


def _ids(i: int) -> str:
    return f"images/{i:03d}.png"


def test_log_is_cut_back_to_the_resumed_step_and_survives_a_cut_line(tmp_path: Path) -> None:
    log = SampleLog(tmp_path, 1, _ids)
    for step in range(4):
        log.write(step, 0, [2 * step, 2 * step + 1])
    log.close()
    path = tmp_path / "sample_log" / "rank_1.jsonl"
    assert [e["ids"] for e in read_sample_log(path)][1] == ["images/002.png", "images/003.png"]
    with path.open("a", encoding="utf-8") as handle:
        handle.write('{"step": 4, "epo')  # a kill in the middle of a write
    assert [e["step"] for e in read_sample_log(path)] == [0, 1, 2, 3]
    with pytest.raises(ValueError, match="belongs to another run"):
        SampleLog(tmp_path, 1, _ids)
    resumed = SampleLog(tmp_path, 1, _ids, resume_step=2)  # steps 2 and 3 are trained again
    resumed.write(2, 0, [9])
    resumed.close()
    assert [(e["step"], e["ids"]) for e in read_sample_log(path)] == [
        (0, ["images/000.png", "images/001.png"]),
        (1, ["images/002.png", "images/003.png"]),
        (2, ["images/009.png"]),
    ]
    path.write_text('{"step": 0}\n{"step": 1, "epoch": 0, "ids": []}\n', encoding="utf-8")
    with pytest.raises(ValueError, match="line 1 is not a sample-log entry"):
        read_sample_log(path)
