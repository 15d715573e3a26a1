"""The sample table: every usable sample of a dataset in a few flat arrays.

A Danbooru-scale folder holds millions of samples; one Python object per sample (id, path, a tuple
of tag strings, a tuple of categories) costs ~2.5 KB each, 15 GB at 6M. ``SampleTable`` holds the
same facts in numpy arrays, about 200 bytes a sample at 25 tags:

* sample ids and image paths as UTF-8 blobs with int64 offsets (paths relative to ``root``),
* tags as int32 ids into the table's ``tag_names`` with int64 row offsets (CSR), one uint8
  category id per tag occurrence (into ``category_names``), and an int8 rating per sample.

It is a ``Sequence[SampleRecord]`` (a row is built on access), so code written for record lists
keeps working, and it has the bulk operations the start-up needs without per-sample objects:
``select`` (sub-tables for the split and filters), ``tag_counts`` (vocabulary), ``keep_known``
(re-keyed to a vocabulary's indices), ``save``/``load`` (the persisted scan index, ``.npz`` with
no pickles). Workers receive it by pickling a handful of arrays, so a spawned worker starts fast
and a forked one never touches per-sample reference counts (no copy-on-access growth).

It owns ``SampleRecord`` (one row as an object) and imports nothing from the project;
``dataset_scan`` builds tables through ``SampleTableBuilder``.
"""

from __future__ import annotations

import array
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping, Sequence, overload

import numpy as np

__all__ = ["SampleRecord", "SampleTable", "SampleTableBuilder", "SkippedSamples", "as_table", "take_ragged"]

_FORMAT_VERSION = 1
# surrogatepass: a file name that is not valid UTF-8 arrives as a surrogate-escaped str and must
# round-trip through the blobs rather than crash a worker
_ERRORS = "surrogatepass"


@dataclass(frozen=True, slots=True)
class SampleRecord:
    """One usable sample: image location, normalised tags with categories, and rating."""

    sample_id: str
    image_path: str
    tags: tuple[str, ...]
    categories: tuple[str, ...]
    rating: int


def _pack(values: Iterable[str]) -> tuple[np.ndarray, np.ndarray]:
    """UTF-8 blob (uint8) and int64 offsets (n + 1) of `values`."""
    encoded = [v.encode("utf-8", _ERRORS) for v in values]
    offsets = np.zeros(len(encoded) + 1, dtype=np.int64)
    if encoded:
        np.cumsum([len(e) for e in encoded], out=offsets[1:])
    return np.frombuffer(b"".join(encoded), dtype=np.uint8).copy(), offsets


# rows a block when a gather has to index element by element (bounds its int64 index arrays)
_GATHER_ROWS = 1 << 16


def take_ragged(blob: np.ndarray, offsets: np.ndarray, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The ragged rows `rows` of (blob, offsets) as a new (blob, offsets), in `rows`' order.

    A run of consecutive rows is one slice copy (a split keeps long runs); otherwise elements are
    gathered a block of rows at a time, so the index arrays never grow with the whole blob."""
    rows = np.asarray(rows, dtype=np.int64)
    starts, ends = offsets[rows], offsets[rows + 1]
    new_offsets = np.zeros(len(rows) + 1, dtype=np.int64)
    np.cumsum(ends - starts, out=new_offsets[1:])
    out = np.empty(int(new_offsets[-1]), dtype=blob.dtype)
    if len(out) == 0:
        return out, new_offsets
    cuts = np.flatnonzero(rows[1:] != rows[:-1] + 1) + 1
    if len(cuts) < len(rows) // 8:  # few runs: copy each whole
        for a, b in zip([0, *cuts.tolist()], [*cuts.tolist(), len(rows)]):
            out[new_offsets[a] : new_offsets[b]] = blob[starts[a] : ends[b - 1]]
        return out, new_offsets
    for a in range(0, len(rows), _GATHER_ROWS):
        b = min(len(rows), a + _GATHER_ROWS)
        base = new_offsets[a:b] - new_offsets[a]
        # position of every element in the old blob: its row start plus its place in the row
        element_row = np.repeat(np.arange(b - a), ends[a:b] - starts[a:b])
        within = np.arange(int(new_offsets[b] - new_offsets[a])) - base[element_row]
        out[new_offsets[a] : new_offsets[b]] = blob[starts[a:b][element_row] + within]
    return out, new_offsets


class SampleTable(Sequence):
    """Every usable sample as flat arrays; a ``Sequence[SampleRecord]`` whose rows are built on access."""

    def __init__(
        self,
        root: str,
        ids: tuple[np.ndarray, np.ndarray],
        paths: tuple[np.ndarray, np.ndarray],
        tag_names: Sequence[str],
        tags: tuple[np.ndarray, np.ndarray],
        tag_categories: np.ndarray,
        category_names: Sequence[str],
        ratings: np.ndarray,
    ) -> None:
        """Wrap the arrays (see the module docstring); ValueError when their lengths disagree."""
        self.root = str(root)
        self.id_blob, self.id_offsets = ids
        self.path_blob, self.path_offsets = paths
        self.tag_names = list(tag_names)
        self.tag_ids, self.tag_offsets = tags
        self.tag_categories = tag_categories
        self.category_names = list(category_names)
        self.ratings = ratings
        n = len(ratings)
        if not (len(self.id_offsets) == len(self.path_offsets) == len(self.tag_offsets) == n + 1):
            raise ValueError(
                f"sample table: offsets for {len(self.id_offsets) - 1}/{len(self.path_offsets) - 1}/{len(self.tag_offsets) - 1} rows, ratings for {n}"
            )
        if len(self.tag_ids) != int(self.tag_offsets[-1]) or len(self.tag_categories) != len(self.tag_ids):
            raise ValueError(
                f"sample table: {len(self.tag_ids)} tag ids and {len(self.tag_categories)} categories for {int(self.tag_offsets[-1])} tag slots"
            )
        if len(self.tag_ids) and (int(self.tag_ids.min()) < 0 or int(self.tag_ids.max()) >= len(self.tag_names)):
            raise ValueError(f"sample table: tag ids outside 0..{len(self.tag_names) - 1}")
        if len(self.tag_categories) and int(self.tag_categories.max()) >= len(self.category_names):
            raise ValueError(f"sample table: category ids outside 0..{len(self.category_names) - 1}")
        # a table read from disk is untrusted: offsets must rise from 0 to the end of their blob
        for name, offsets, size in (("id", self.id_offsets, len(self.id_blob)), ("path", self.path_offsets, len(self.path_blob))):
            if offsets[0] != 0 or offsets[-1] != size or (n and np.any(np.diff(offsets) < 0)):
                raise ValueError(f"sample table: {name} offsets do not cover their {size} bytes in order")
        if self.tag_offsets[0] != 0 or (n and np.any(np.diff(self.tag_offsets) < 0)):
            raise ValueError("sample table: tag offsets do not rise from 0")

    # ------------------------------------------------------------------ rows

    def __len__(self) -> int:
        """Number of samples."""
        return len(self.ratings)

    @overload
    def __getitem__(self, index: int) -> SampleRecord: ...
    @overload
    def __getitem__(self, index: slice) -> "SampleTable": ...
    def __getitem__(self, index: int | slice) -> SampleRecord | SampleTable:
        """Row `index` as a SampleRecord (a slice gives a sub-table)."""
        if isinstance(index, slice):
            return self.select(np.arange(len(self))[index])
        i = int(index)
        if i < 0:
            i += len(self)
        if not 0 <= i < len(self):
            raise IndexError(f"sample {index} out of range for {len(self)} samples")
        return SampleRecord(self.sample_id(i), self.image_path(i), self.tags_of(i), self.categories_of(i), int(self.ratings[i]))

    def __iter__(self) -> Iterator[SampleRecord]:
        """Rows in order, as SampleRecords."""
        for i in range(len(self)):
            yield self[i]

    def __eq__(self, other: object) -> bool:
        """Row-wise equality with another table or a list of records."""
        if not isinstance(other, (SampleTable, list, tuple)):
            return NotImplemented
        return len(self) == len(other) and all(a == b for a, b in zip(self, other))

    __hash__ = None  # type: ignore[assignment]  # mutable arrays: not hashable

    def sample_id(self, i: int) -> str:
        """The sample id of row i."""
        return self.id_blob[self.id_offsets[i] : self.id_offsets[i + 1]].tobytes().decode("utf-8", _ERRORS)

    def image_path(self, i: int) -> str:
        """The image path of row i (absolute when the table has a root)."""
        rel = self.path_blob[self.path_offsets[i] : self.path_offsets[i + 1]].tobytes().decode("utf-8", _ERRORS)
        return os.path.join(self.root, rel) if self.root else rel

    def tag_ids_of(self, i: int) -> np.ndarray:
        """Tag ids of row i, int32 (k,)."""
        return self.tag_ids[self.tag_offsets[i] : self.tag_offsets[i + 1]]

    def tags_of(self, i: int) -> tuple[str, ...]:
        """Tag names of row i, in file order."""
        names = self.tag_names
        return tuple(names[t] for t in self.tag_ids_of(i).tolist())

    def categories_of(self, i: int) -> tuple[str, ...]:
        """The category of each tag of row i ('' when the file gave none)."""
        names = self.category_names
        return tuple(names[c] for c in self.tag_categories[self.tag_offsets[i] : self.tag_offsets[i + 1]].tolist())

    def sample_ids(self) -> list[str]:
        """Every sample id, in row order."""
        blob = self.id_blob.tobytes()
        offsets = self.id_offsets.tolist()
        return [blob[offsets[i] : offsets[i + 1]].decode("utf-8", _ERRORS) for i in range(len(self))]

    @property
    def nbytes(self) -> int:
        """Bytes held in the table's arrays (the tag and category name lists not included)."""
        arrays = (self.id_blob, self.id_offsets, self.path_blob, self.path_offsets, self.tag_ids, self.tag_offsets, self.tag_categories, self.ratings)
        return int(sum(a.nbytes for a in arrays))

    # ------------------------------------------------------------------ bulk operations

    def select(self, rows: Sequence[int] | np.ndarray) -> "SampleTable":
        """A new table of rows `rows` (indices or a boolean mask), in that order."""
        rows = np.asarray(rows)
        if rows.dtype == bool:
            if len(rows) != len(self):
                raise ValueError(f"select: mask of {len(rows)} for {len(self)} samples")
            rows = np.flatnonzero(rows)
        rows = rows.astype(np.int64, copy=False)
        tag_ids, tag_offsets = take_ragged(self.tag_ids, self.tag_offsets, rows)
        categories, _ = take_ragged(self.tag_categories, self.tag_offsets, rows)
        return SampleTable(
            self.root,
            take_ragged(self.id_blob, self.id_offsets, rows),
            take_ragged(self.path_blob, self.path_offsets, rows),
            self.tag_names,
            (tag_ids, tag_offsets),
            categories,
            self.category_names,
            self.ratings[rows],
        )

    def tag_counts(self) -> tuple[np.ndarray, np.ndarray]:
        """(samples per tag id (T,), votes per (tag id, category id) (T, C)); a row holds each tag once."""
        n_tags, n_cats = len(self.tag_names), max(1, len(self.category_names))
        counts = np.bincount(self.tag_ids, minlength=n_tags)
        votes = np.bincount(self.tag_ids.astype(np.int64) * n_cats + self.tag_categories, minlength=n_tags * n_cats).reshape(n_tags, n_cats)
        return counts, votes

    def rekeyed(self, tag_to_index: Mapping[str, int]) -> "SampleTable":
        """The same rows with tags re-keyed to `tag_to_index`'s indices; tags it lacks are dropped."""
        n_out = max(tag_to_index.values(), default=-1) + 1
        lookup = np.asarray([tag_to_index.get(name, -1) for name in self.tag_names] + [-1], dtype=np.int32)
        mapped = lookup[self.tag_ids] if len(self.tag_ids) else np.zeros(0, dtype=np.int32)
        known = mapped >= 0
        if known.all():  # every tag is in the vocabulary: the rows keep their offsets and categories
            offsets, categories = self.tag_offsets, self.tag_categories
        else:
            mapped, categories = mapped[known], self.tag_categories[known]
            kept = np.zeros(len(known) + 1, dtype=np.int64)
            np.cumsum(known, out=kept[1:])
            offsets = kept[self.tag_offsets]
        del known
        names = [""] * n_out
        for tag, index in tag_to_index.items():
            names[index] = tag
        return SampleTable(
            self.root,
            (self.id_blob, self.id_offsets),
            (self.path_blob, self.path_offsets),
            names,
            (mapped, offsets),
            categories,
            self.category_names,
            self.ratings,
        )

    def keep_known(self, tag_to_index: Mapping[str, int]) -> tuple["SampleTable", int]:
        """(the samples with at least one tag of `tag_to_index`, re-keyed to it; how many had none)."""
        rekeyed = self.rekeyed(tag_to_index)
        keep = np.diff(rekeyed.tag_offsets) > 0
        dropped = int(len(self) - keep.sum())
        return (rekeyed if dropped == 0 else rekeyed.select(keep)), dropped

    # ------------------------------------------------------------------ building and files

    @classmethod
    def from_records(cls, records: Iterable[Any], root: str = "") -> "SampleTable":
        """A table of SampleRecord-like objects (.sample_id, .image_path, .tags, .categories, .rating)."""
        builder = SampleTableBuilder(root)
        for r in records:
            builder.add(r.sample_id, r.image_path, r.tags, getattr(r, "categories", ()) or (), r.rating)
        return builder.build()

    def to_arrays(self) -> dict[str, np.ndarray]:
        """The table as named arrays (for an .npz file: no pickles)."""
        names_blob, names_offsets = _pack(self.tag_names)
        cats_blob, cats_offsets = _pack(self.category_names)
        return {
            "version": np.asarray([_FORMAT_VERSION]),
            "root": _pack([self.root])[0],
            "id_blob": self.id_blob,
            "id_offsets": self.id_offsets,
            "path_blob": self.path_blob,
            "path_offsets": self.path_offsets,
            "tag_names": names_blob,
            "tag_name_offsets": names_offsets,
            "tag_ids": self.tag_ids,
            "tag_offsets": self.tag_offsets,
            "tag_categories": self.tag_categories,
            "category_names": cats_blob,
            "category_offsets": cats_offsets,
            "ratings": self.ratings,
        }

    @classmethod
    def from_arrays(cls, arrays: Mapping[str, np.ndarray]) -> "SampleTable":
        """A table from `to_arrays`' output; KeyError/ValueError when arrays are missing or disagree."""
        if int(arrays["version"][0]) != _FORMAT_VERSION:
            raise ValueError(f"sample table format {int(arrays['version'][0])}, expected {_FORMAT_VERSION}")

        def strings(blob: str, offsets: str) -> list[str]:
            data, offs = arrays[blob], arrays[offsets]
            return [data[offs[i] : offs[i + 1]].tobytes().decode("utf-8", _ERRORS) for i in range(len(offs) - 1)]

        return cls(
            arrays["root"].tobytes().decode("utf-8", _ERRORS),
            (arrays["id_blob"], arrays["id_offsets"]),
            (arrays["path_blob"], arrays["path_offsets"]),
            strings("tag_names", "tag_name_offsets"),
            (arrays["tag_ids"], arrays["tag_offsets"]),
            arrays["tag_categories"],
            strings("category_names", "category_offsets"),
            arrays["ratings"],
        )

    def save(self, path: str | Path) -> None:
        """Write the table to `path` (.npz, no pickles); the caller makes the write atomic."""
        with open(path, "wb") as handle:
            np.savez(handle, **self.to_arrays())

    @classmethod
    def load(cls, path: str | Path) -> "SampleTable":
        """Read a table written by `save`; ValueError naming the file when it is not one."""
        try:
            with np.load(path, allow_pickle=False) as f:
                return cls.from_arrays({k: f[k] for k in f.files})
        except (OSError, KeyError, EOFError, IndexError, ValueError) as exc:  # ValueError: not an .npz, or a pickle in it
            raise ValueError(f"{path}: not a readable sample table ({type(exc).__name__}: {exc})") from exc


def _fresh(text: str) -> str:
    """A new string object equal to `text` (allocated now)."""
    return text.encode("utf-8", _ERRORS).decode("utf-8", _ERRORS)


class SampleTableBuilder:
    """Appends samples one by one into compact buffers (no per-sample Python objects kept)."""

    def __init__(self, root: str = "") -> None:
        """Paths under `root` are stored relative to it."""
        self.root = str(root)
        self._prefix = os.path.join(self.root, "") if self.root else ""
        self._reset()

    def _reset(self) -> None:
        """No samples yet."""
        self._ids, self._paths = bytearray(), bytearray()
        self._id_offsets, self._path_offsets = array.array("q", [0]), array.array("q", [0])
        self._tag_ids, self._tag_offsets = array.array("i"), array.array("q", [0])
        self._categories = bytearray()
        self._ratings = array.array("b")
        self._tag_index: dict[str, int] = {}
        self._category_index: dict[str, int] = {"": 0}

    def __len__(self) -> int:
        """Samples added so far."""
        return len(self._ratings)

    def add(self, sample_id: str, image_path: str, tags: Sequence[str], categories: Sequence[str], rating: int) -> None:
        """Append one sample; `categories` may be shorter than `tags` (missing ones are ''); a repeated
        tag keeps its first place."""
        self._ids += sample_id.encode("utf-8", _ERRORS)
        self._id_offsets.append(len(self._ids))
        if self._prefix and image_path.startswith(self._prefix):
            image_path = image_path[len(self._prefix) :]
        self._paths += image_path.encode("utf-8", _ERRORS)
        self._path_offsets.append(len(self._paths))
        tag_index, category_index = self._tag_index, self._category_index
        ids = [tag_index.setdefault(tag, len(tag_index)) for tag in tags]
        cats = list(categories[: len(ids)]) + [""] * (len(ids) - len(categories))
        if len(set(ids)) != len(ids):  # a row holds each tag once, at its first place (a scan's records already do)
            seen: set[int] = set()
            first = [k for k, tid in enumerate(ids) if not (tid in seen or seen.add(tid))]
            ids, cats = [ids[k] for k in first], [cats[k] for k in first]
        self._tag_ids.extend(ids)
        self._categories.extend([category_index[c] if c in category_index else self._new_category(c, sample_id) for c in cats])
        self._tag_offsets.append(len(self._tag_ids))
        self._ratings.append(int(rating))

    def _new_category(self, category: str, sample_id: str) -> int:
        """The id of a category met for the first time (at most 255 of them: a uint8 a tag)."""
        if len(self._category_index) >= 255:
            raise ValueError(f"sample {sample_id!r}: more than 255 distinct tag categories")
        return self._category_index.setdefault(category, len(self._category_index))

    def extend(self, table: SampleTable) -> None:
        """Append every row of `table` (its paths relative to this builder's root, or to its own
        root when that is this one), its tags and categories re-keyed to this builder's: array
        operations, no per-sample objects."""
        if table.root and table.root != self.root:
            raise ValueError(f"extend: a table under {table.root!r} into a builder under {self.root!r}")
        tag_map = np.asarray([self._tag_index.setdefault(name, len(self._tag_index)) for name in table.tag_names] or [0], dtype=np.int32)
        index = self._category_index
        cat_map = np.asarray(
            [index[name] if name in index else self._new_category(name, "(appended table)") for name in table.category_names] or [0], dtype=np.uint8
        )
        for blob, offsets, own, own_offsets in (
            (table.id_blob, table.id_offsets, self._ids, self._id_offsets),
            (table.path_blob, table.path_offsets, self._paths, self._path_offsets),
        ):
            own_offsets.frombytes((offsets[1:] + len(own)).astype(np.int64).tobytes())
            own += blob.tobytes()
        self._tag_offsets.frombytes((table.tag_offsets[1:] + len(self._tag_ids)).astype(np.int64).tobytes())
        self._tag_ids.frombytes(tag_map[table.tag_ids].astype(np.int32).tobytes())
        self._categories += cat_map[table.tag_categories].tobytes()
        self._ratings.frombytes(table.ratings.astype(np.int8).tobytes())

    def build(self) -> SampleTable:
        """The table of every sample added. The builder is emptied as its buffers are copied out
        (one column at a time, so the peak is the table plus one column, not twice the table)."""

        def take(name: str, dtype: type) -> np.ndarray:
            out = np.frombuffer(getattr(self, name), dtype=dtype).copy()
            setattr(self, name, None)  # the buffer goes before the next column is copied
            return out

        # fresh copies of the names: a name first met in a chunk's unpickled result would pin that
        # chunk's whole pymalloc arena (its other objects long gone) for the table's lifetime
        self._tag_index = {_fresh(name): tid for name, tid in self._tag_index.items()}
        self._category_index = {_fresh(name): cid for name, cid in self._category_index.items()}
        ids = (take("_ids", np.uint8), take("_id_offsets", np.int64))
        paths = (take("_paths", np.uint8), take("_path_offsets", np.int64))
        tags = (take("_tag_ids", np.int32), take("_tag_offsets", np.int64))
        table = SampleTable(
            self.root, ids, paths, list(self._tag_index), tags, take("_categories", np.uint8), list(self._category_index), take("_ratings", np.int8)
        )
        self._reset()
        return table


def as_table(records: Sequence[Any]) -> SampleTable:
    """`records` as a SampleTable (itself when it already is one)."""
    return records if isinstance(records, SampleTable) else SampleTable.from_records(records)


class SkippedSamples:
    """Every sample a scan dropped, as (path, reason, detail) rows packed into a few buffers.

    A folder of millions of files may hold millions of bad ones; a Python tuple a row would cost
    ~300 B. Here a row is its path and its detail as UTF-8 in two blobs with int64 offsets, a uint8
    reason code (into ``reasons``) and an int64 sort key (the scan's file order), ~20 B plus the
    text. Text is stored with unencodable characters as backslash escapes (``printable``), so
    every row can go into JSON, a CSV or a console as it is.
    """

    def __init__(self, reasons: Sequence[str] = ()) -> None:
        """An empty list; `reasons` are the reason names known up front (more are added as met)."""
        self.reasons: list[str] = []
        self._code: dict[str, int] = {}
        for reason in reasons:
            self._reason_code(reason)
        self._paths, self._details, self._codes = bytearray(), bytearray(), bytearray()
        self._path_offsets, self._detail_offsets = array.array("q", [0]), array.array("q", [0])
        self._keys = array.array("q")

    def _reason_code(self, reason: str) -> int:
        """The code of `reason`, adding it when new (at most 256 reasons)."""
        code = self._code.get(reason)
        if code is None:
            if len(self.reasons) >= 256:
                raise ValueError(f"skip list: more than 256 reasons (adding {reason!r})")
            code = self._code[reason] = len(self.reasons)
            self.reasons.append(reason)
        return code

    def add(self, reason: str, path: str, detail: str, key: int = 0) -> None:
        """Append one dropped sample: the file at fault (root-relative), why, and a detail."""
        self._codes.append(self._reason_code(reason))
        self._paths += path.encode("utf-8", "backslashreplace")
        self._path_offsets.append(len(self._paths))
        self._details += detail.encode("utf-8", "backslashreplace")
        self._detail_offsets.append(len(self._details))
        self._keys.append(int(key))

    def extend(self, other: "SkippedSamples") -> None:
        """Append every row of `other`, in its order."""
        remap = np.asarray([self._reason_code(r) for r in other.reasons] or [0], dtype=np.uint8)
        self._codes += remap[np.frombuffer(other._codes, dtype=np.uint8)].tobytes()
        for own, offsets, blob, their in (
            (self._paths, self._path_offsets, other._paths, other._path_offsets),
            (self._details, self._detail_offsets, other._details, other._detail_offsets),
        ):
            offsets.frombytes((np.frombuffer(their, dtype=np.int64)[1:] + len(own)).tobytes())
            own += blob
        self._keys.extend(other._keys)

    def __len__(self) -> int:
        """Number of rows."""
        return len(self._codes)

    def _text(self, blob: bytearray, offsets: array.array, i: int) -> str:
        """Row i of one text column."""
        return blob[offsets[i] : offsets[i + 1]].decode("utf-8")

    def __getitem__(self, i: int) -> tuple[str, str, str]:
        """Row i as (path, reason, detail)."""
        if not -len(self) <= i < len(self):
            raise IndexError(f"skip list row {i} out of range for {len(self)} rows")
        i %= len(self)
        return self._text(self._paths, self._path_offsets, i), self.reasons[self._codes[i]], self._text(self._details, self._detail_offsets, i)

    def __iter__(self) -> Iterator[tuple[str, str, str]]:
        """Rows in order, as (path, reason, detail)."""
        for i in range(len(self)):
            yield self[i]

    def counts(self) -> dict[str, int]:
        """Rows by reason."""
        found = np.bincount(np.frombuffer(self._codes, dtype=np.uint8), minlength=len(self.reasons))
        return {reason: int(found[code]) for code, reason in enumerate(self.reasons) if found[code]}

    def examples(self, limit: int) -> dict[str, list[str]]:
        """The first `limit` rows of each reason as 'path: detail' lines."""
        out: dict[str, list[str]] = {}
        full = 0
        for path, reason, detail in self:
            bucket = out.setdefault(reason, [])
            if len(bucket) < limit:
                bucket.append(f"{path}: {detail}" if detail else path)
                full += len(bucket) == limit
                if full == len(self.reasons):
                    break
        return out

    def keys(self) -> np.ndarray:
        """The sort key of every row, int64 (n,)."""
        return np.frombuffer(self._keys, dtype=np.int64).copy() if len(self) else np.zeros(0, dtype=np.int64)

    def select(self, rows: Sequence[int] | np.ndarray) -> "SkippedSamples":
        """A new list of rows `rows` (indices or a boolean mask), in that order."""
        rows = np.asarray(rows)
        if rows.dtype == bool:
            rows = np.flatnonzero(rows)
        rows = rows.astype(np.int64, copy=False)
        out = SkippedSamples(self.reasons)
        out._codes = bytearray(np.frombuffer(self._codes, dtype=np.uint8)[rows].tobytes())
        out._keys = array.array("q", self.keys()[rows].tobytes())
        for name in ("path", "detail"):
            blob, offsets = take_ragged(
                np.frombuffer(getattr(self, f"_{name}s"), dtype=np.uint8), np.frombuffer(getattr(self, f"_{name}_offsets"), dtype=np.int64), rows
            )
            setattr(out, f"_{name}s", bytearray(blob.tobytes()))
            setattr(out, f"_{name}_offsets", array.array("q", offsets.tobytes()))
        return out

    def in_key_order(self) -> "SkippedSamples":
        """The rows sorted by key (stable: rows with equal keys keep their order); itself when already so."""
        keys = self.keys()
        if len(keys) < 2 or bool(np.all(keys[1:] >= keys[:-1])):
            return self
        return self.select(np.argsort(keys, kind="stable"))

    def to_arrays(self) -> dict[str, np.ndarray]:
        """The list as named arrays (for an .npz file: no pickles); keys are not kept."""
        reasons, reason_offsets = _pack(self.reasons)
        return {
            "reasons": reasons,
            "reason_offsets": reason_offsets,
            "codes": np.frombuffer(self._codes, dtype=np.uint8).copy(),
            "paths": np.frombuffer(self._paths, dtype=np.uint8).copy(),
            "path_offsets": np.frombuffer(self._path_offsets, dtype=np.int64).copy(),
            "details": np.frombuffer(self._details, dtype=np.uint8).copy(),
            "detail_offsets": np.frombuffer(self._detail_offsets, dtype=np.int64).copy(),
        }

    @classmethod
    def from_arrays(cls, arrays: Mapping[str, np.ndarray]) -> "SkippedSamples":
        """A list from `to_arrays`' output; KeyError/ValueError when arrays are missing, disagree or
        are not UTF-8 (a damaged file is refused, not trusted)."""
        names, offs = arrays["reasons"], arrays["reason_offsets"]
        reasons = [names[offs[i] : offs[i + 1]].tobytes().decode("utf-8") for i in range(len(offs) - 1)]
        out = cls(reasons)
        codes = np.asarray(arrays["codes"], dtype=np.uint8)
        n = len(codes)
        if n and int(codes.max()) >= len(reasons):
            raise ValueError(f"skip list: reason codes outside 0..{len(reasons) - 1}")
        for name in ("path", "detail"):
            blob, offsets = np.asarray(arrays[f"{name}s"], dtype=np.uint8), np.asarray(arrays[f"{name}_offsets"], dtype=np.int64)
            if len(offsets) != n + 1 or offsets[0] != 0 or offsets[-1] != len(blob) or np.any(np.diff(offsets) < 0):
                raise ValueError(f"skip list: {name} offsets do not cover their {len(blob)} bytes for {n} rows")
            blob.tobytes().decode("utf-8")  # raises UnicodeDecodeError (a ValueError) when damaged
            setattr(out, f"_{name}s", bytearray(blob.tobytes()))
            setattr(out, f"_{name}_offsets", array.array("q", offsets.tobytes()))
        out._codes = bytearray(codes.tobytes())
        out._keys = array.array("q", np.arange(n, dtype=np.int64).tobytes())
        return out
