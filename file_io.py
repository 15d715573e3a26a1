"""Safe file writing and reading shared by every module that touches the disk.

Owns atomic writes (temp file in the same folder, fsync, `os.replace`), the `os.replace` retry
that Windows needs while a reader holds the target open, strict JSON reading with errors that
name the file, finding a shipped resource from any working directory, and the way a path or the
interpreter is shown to people (relative to where they ran the command). Bottom module: it
imports nothing from the project, so any module may use it.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

__all__ = [
    "PROJECT_DIR",
    "atomic_write_bytes",
    "atomic_write_text",
    "display_path",
    "load_json_file",
    "python_command",
    "replace_with_retry",
    "resolve_resource",
]

PROJECT_DIR = Path(__file__).resolve().parent


def replace_with_retry(src: str | Path, dst: str | Path, attempts: int = 10, delay_s: float = 0.05) -> None:
    """os.replace that retries briefly on PermissionError (Windows: a reader may hold the file)."""
    for attempt in range(attempts):
        try:
            os.replace(src, dst)
            return
        except PermissionError:
            if attempt == attempts - 1:
                raise
            time.sleep(delay_s * (attempt + 1))


def atomic_write_bytes(path: str | Path, chunks: Iterable[bytes]) -> None:
    """Write bytes atomically: a temp file in the same folder, fsync, then os.replace (with a
    retry for Windows readers); the temp file never outlives a failure."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(handle, "wb") as fh:
            for chunk in chunks:
                fh.write(chunk)
            fh.flush()
            os.fsync(fh.fileno())
        replace_with_retry(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_text(path: str | Path, text: str) -> None:
    """Write a UTF-8 text file atomically (temp file in the same folder, then os.replace)."""
    atomic_write_bytes(path, [text.encode("utf-8")])


def load_json_file(path: str | Path, what: str = "file") -> Any:
    """Parse a UTF-8 JSON file; FileNotFoundError / ValueError name the file and the reason."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{what} not found: {path}")
    try:
        with open(path, "r", encoding="utf-8") as handle:
            return json.load(handle)
    except json.JSONDecodeError as error:
        raise ValueError(f"{path}: not valid JSON ({error})") from error
    except UnicodeDecodeError as error:
        raise ValueError(f"{path}: not UTF-8 text ({error})") from error


def resolve_resource(path: str | Path) -> Path:
    """A shipped resource path (e.g. configs/orientation_map.json): as given if it exists, else
    relative to the project folder, so runs started from another working directory still find it."""
    p = Path(path)
    if p.is_absolute() or p.exists():
        return p
    candidate = PROJECT_DIR / p
    return candidate if candidate.exists() else p


def display_path(path: str | Path, cwd: str | Path | None = None) -> str:
    """`path` as a reader should see it: relative to the working directory when inside it, else as given."""
    p = Path(path)
    base = Path(cwd) if cwd is not None else Path.cwd()
    if not p.is_absolute():
        return str(p)
    try:
        return str(p.relative_to(base))
    except ValueError:
        pass
    try:
        # The same place reached another way (a resolved link, a case-folded Windows drive).
        return str(p.resolve().relative_to(base.resolve()))
    except (ValueError, OSError):
        return str(p)


def python_command(executable: str | None = None) -> str:
    """How to start this interpreter in a printed command: `python` when that name on PATH is this
    interpreter (an activated virtual environment), else its path shown by display_path."""
    exe = executable or sys.executable
    found = shutil.which("python")
    if found is not None:
        try:
            if os.path.samefile(found, exe):
                return "python"
        except OSError:
            pass
    return display_path(exe)
