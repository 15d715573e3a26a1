"""The complete list of skipped samples: every sample left out, anywhere, by path, in one CSV file.

A run's reports keep a few examples a reason (``data_report.json``, the console's ``data:`` line);
a user cleaning a dataset needs every path. This module owns that file, ``skipped_samples.csv``:

    path,reason,where,detail
    images/a.png,decode_error,start-up,image file is truncated (3 bytes not processed)
    images/b.jpg,load_failed,training,OSError: broken data stream

* ``path``: the image (or sidecar) path relative to the dataset root as the scan saw it; a name
  that is not UTF-8 is shown as ``scan_limits.printable`` writes it;
* ``reason``: the skip reason key (``dataset_scan.SKIP_REASONS``, a cache or worker reason);
* ``where``: the stage that found it (``WHERE``): ``start-up`` (the scan and image check),
  ``cache`` (the prepared cache's build), ``split`` (no tag of the vocabulary, the validation cap),
  ``training`` (a worker failed to load it; it was replaced), ``validation`` (skipped, never replaced);
* ``detail``: the message, as far as one was recorded.

The file is written whole and atomically (``file_io.atomic_write_bytes``) from streams of rows,
so it costs one pass over the skipped samples and never holds them all as text; the stages before
training are written at start-up, and each later rewrite copies those rows from the file and adds
what training and validation found so far. The rows of each stage come from the object that found
them: ``scan_rows`` (a ``DatasetScan``), ``record_rows`` (rows of a sample table: no known tag,
the validation cap), ``failure_rows`` (sample id -> (reason, where): the cache, workers,
validation). It imports file_io, scan_limits and sample_table.
"""

from __future__ import annotations

import csv
import io
import itertools
import os
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from file_io import atomic_write_bytes
from sample_table import as_table
from scan_limits import printable

__all__ = [
    "COLUMNS",
    "PRE_TRAINING",
    "SKIP_LIST_FILE",
    "WHERE",
    "SkipRow",
    "failure_rows",
    "read_skip_list",
    "record_rows",
    "scan_rows",
    "update_skip_list",
    "write_skip_list",
]

SKIP_LIST_FILE = "skipped_samples.csv"
COLUMNS: tuple[str, ...] = ("path", "reason", "where", "detail")
WHERE: tuple[str, ...] = ("start-up", "cache", "split", "training", "validation")
# The stages decided before the first step: a start writes them, later rewrites copy them.
PRE_TRAINING: frozenset[str] = frozenset({"start-up", "cache", "split"})
_ROWS_PER_CHUNK = 4096

SkipRow = tuple[str, str, str, str]  # (path, reason, where, detail)


def _clean(text: object) -> str:
    """One CSV cell: printable (no control characters, no lone surrogates), on one line."""
    return printable(str(text)).replace("\r", " ").replace("\n", " ")


def _encoded_chunks(rows: Iterable[SkipRow], counter: list[int]) -> Iterator[bytes]:
    """The CSV text of the header and `rows`, in UTF-8 chunks; counts rows into counter[0]."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(COLUMNS)
    pending = 0
    for path, reason, where, detail in rows:
        if where not in WHERE:
            raise ValueError(f"skip list: unknown stage {where!r} for {path!r}; expected one of {list(WHERE)}")
        writer.writerow((_clean(path), _clean(reason), where, _clean(detail)))
        counter[0] += 1
        pending += 1
        if pending >= _ROWS_PER_CHUNK:
            yield buffer.getvalue().encode("utf-8")
            buffer.seek(0)
            buffer.truncate()
            pending = 0
    yield buffer.getvalue().encode("utf-8")


def write_skip_list(path: str | Path, rows: Iterable[SkipRow]) -> int:
    """Write `rows` (path, reason, where, detail) as the complete list at `path`, atomically; returns the row count."""
    counter = [0]
    atomic_write_bytes(path, _encoded_chunks(rows, counter))
    return counter[0]


def read_skip_list(path: str | Path, stages: Iterable[str] | None = None) -> Iterator[SkipRow]:
    """The rows of a list written by write_skip_list (only those of `stages` when given); none when the file is absent."""
    path = Path(path)
    wanted = None if stages is None else frozenset(stages)
    if not path.is_file():
        return
    with open(path, "r", encoding="utf-8", newline="") as handle:
        reader = csv.reader(handle)
        header = next(reader, None)
        if header is None:
            return
        if tuple(header) != COLUMNS:
            raise ValueError(f"{path}: not a skipped-samples list (header {header!r}, expected {list(COLUMNS)})")
        for line, row in enumerate(reader, start=2):
            if len(row) != len(COLUMNS):
                raise ValueError(f"{path}: line {line} has {len(row)} fields, expected {len(COLUMNS)}")
            if wanted is None or row[2] in wanted:
                yield (row[0], row[1], row[2], row[3])


def scan_rows(scan: Any) -> Iterator[SkipRow]:
    """Every sample the scan left out (DatasetScan.skipped_entries: path, reason, detail), where "start-up"."""
    for path, reason, detail in scan.skipped_entries():
        yield (path, reason, "start-up", detail)


def _relative(image_path: str, root: str) -> str:
    """An image path as the list shows it: relative to the dataset root when below it, '/'-separated."""
    if root and os.path.isabs(image_path):
        rel = os.path.relpath(image_path, root)
        if not rel.startswith(".."):
            image_path = rel
    return image_path.replace(os.sep, "/")


def record_rows(records: Sequence[Any], rows: np.ndarray | Sequence[int], reason: str, where: str, detail: str = "") -> Iterator[SkipRow]:
    """Rows `rows` of a sample table (or SampleRecord list), each with the same reason."""
    table = as_table(records)
    for i in np.asarray(rows, dtype=np.int64).tolist():
        yield (_relative(table.image_path(i), table.root), reason, where, detail)


def failure_rows(failed: Mapping[str, tuple[str, str]], tables: Sequence[Sequence[Any]], detail: str = "") -> Iterator[SkipRow]:
    """Samples named by id (id -> (reason, where)), located in `tables` (one pass over their ids
    while some are still unplaced); an id no table holds is listed as the id itself."""
    todo = dict(failed)
    for records in tables:
        if not todo:
            break
        table = as_table(records)
        for i in range(len(table)):
            entry = todo.pop(table.sample_id(i), None)
            if entry is not None:
                yield (_relative(table.image_path(i), table.root), entry[0], entry[1], detail)
                if not todo:
                    break
    for sample_id, (reason, where) in todo.items():
        yield (sample_id, reason, where, detail)


def update_skip_list(path: str | Path, failed: Mapping[str, tuple[str, str]], tables: Sequence[Sequence[Any]]) -> int:
    """Rewrite the list at `path`: its rows from before training as they are, then `failed` (id ->
    (reason, where)) located in `tables`; returns the row count."""
    path = Path(path)
    # read_skip_list is consumed while the new file is written to its temp name: the old one is
    # closed before os.replace (Windows cannot replace a file that is open).
    return write_skip_list(path, itertools.chain(read_skip_list(path, PRE_TRAINING), failure_rows(failed, tables)))
