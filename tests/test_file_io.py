"""Tests for file_io: atomic writes, strict JSON reading, the replace retry, shipped resources."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

import file_io as F


def test_atomic_write_replaces(tmp_path: Path) -> None:
    target = tmp_path / "a" / "f.txt"
    F.atomic_write_text(target, "one")
    F.atomic_write_text(target, "two")
    assert target.read_text(encoding="utf-8") == "two"
    assert [p.name for p in target.parent.iterdir()] == ["f.txt"]


def test_atomic_write_failure_leaves_target_and_no_temp_file(tmp_path: Path) -> None:
    target = tmp_path / "f.bin"
    F.atomic_write_bytes(target, [b"old"])

    def chunks():
        yield b"new, half written"
        raise OSError(28, "No space left on device")

    with pytest.raises(OSError, match="No space left"):
        F.atomic_write_bytes(target, chunks())
    assert target.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["f.bin"]


def test_load_json_file_names_the_file(tmp_path: Path) -> None:
    good = tmp_path / "good.json"
    good.write_text('{"a": [1, 2]}', encoding="utf-8")
    assert F.load_json_file(good) == {"a": [1, 2]}
    with pytest.raises(FileNotFoundError, match="vocabulary not found: .*missing.json"):
        F.load_json_file(tmp_path / "missing.json", "vocabulary")
    bad = tmp_path / "bad.json"
    bad.write_text('{"a": ', encoding="utf-8")
    with pytest.raises(ValueError, match="bad.json: not valid JSON"):
        F.load_json_file(bad)
    latin = tmp_path / "latin.json"
    latin.write_bytes('{"a": "caf\xe9"}'.encode("latin-1"))
    with pytest.raises(ValueError, match="latin.json: not UTF-8"):
        F.load_json_file(latin)


def test_replace_with_retry_retries_then_gives_up(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    src, dst = tmp_path / "src", tmp_path / "dst"
    src.write_text("x", encoding="utf-8")
    real_replace, calls = os.replace, []

    def busy_twice(a: object, b: object) -> None:
        calls.append(1)
        if len(calls) <= 2:
            raise PermissionError(13, "in use by another process")
        real_replace(a, b)

    monkeypatch.setattr(F.os, "replace", busy_twice)
    F.replace_with_retry(src, dst, delay_s=0.0)
    assert len(calls) == 3 and dst.read_text(encoding="utf-8") == "x"
    calls.clear()

    def always_busy(a: object, b: object) -> None:
        calls.append(1)
        raise PermissionError(13, "held by another process")

    monkeypatch.setattr(F.os, "replace", always_busy)
    with pytest.raises(PermissionError):
        F.replace_with_retry(dst, src, attempts=4, delay_s=0.0)
    assert len(calls) == 4


def test_resolve_resource_falls_back_to_project(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    assert F.resolve_resource("configs/demo.yaml") == F.PROJECT_DIR / "configs" / "demo.yaml"
    (tmp_path / "configs").mkdir()
    (tmp_path / "configs" / "demo.yaml").write_text("x: 1\n", encoding="utf-8")
    assert F.resolve_resource("configs/demo.yaml") == Path("configs/demo.yaml")


def test_display_path_is_relative_inside_the_working_directory(tmp_path: Path) -> None:
    inside = tmp_path / "runs" / "demo"
    assert F.display_path(inside, cwd=tmp_path) == str(Path("runs") / "demo")
    assert F.display_path(Path("data") / "demo", cwd=tmp_path) == str(Path("data") / "demo")
    elsewhere = tmp_path.parent / "other-place"
    assert F.display_path(elsewhere, cwd=tmp_path) == str(elsewhere)


def test_python_command_names_python_only_when_it_is_this_interpreter(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    exe = tmp_path / "bin" / "python"
    exe.parent.mkdir()
    exe.write_text("#!/bin/sh\n", encoding="utf-8")
    exe.chmod(0o755)
    monkeypatch.setenv("PATH", str(exe.parent))
    monkeypatch.chdir(tmp_path)
    assert F.python_command(str(exe)) == "python"
    other = tmp_path / "venv" / "python3"
    other.parent.mkdir()
    other.write_text("#!/bin/sh\n", encoding="utf-8")
    assert F.python_command(str(other)) == str(Path("venv") / "python3")
