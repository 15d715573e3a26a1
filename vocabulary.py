"""Tag vocabulary: the tag <-> output-column mapping, and building it from a dataset.

This module owns `TagVocabulary` (vocabulary.json format, save/load, including files written by
the original OppaiOracle with `<PAD>`/`<UNK>` specials), the meta-tag ignore list
(`configs/ignore_tags.txt`), `create_vocabulary_from_datasets` and the
`python vocabulary.py build` CLI; `normalize_tag` (owned by `tag_text`) is re-exported here.
Its library part uses only `file_io` (atomic write, JSON reader) and `tag_text`, and
works on any records with `.tags` / `.categories`; the `build` command scans a folder with
`dataset_scan.scan_dataset`, which does not import this module.

Column i of the model's tag output is tag i; no special tokens occupy output columns.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from dataset_scan import format_scan_summary, scan_dataset
from file_io import atomic_write_text, load_json_file
from sample_table import SampleTable
from scan_limits import is_utf8
from tag_text import normalize_tag

FORMAT_VERSION = 1
# Tokens the original OppaiOracle vocabulary kept in output columns; they are dropped on load.
LEGACY_SPECIAL_TOKENS = frozenset({"<PAD>", "<UNK>", "<pad>", "<unk>", "<MASK>", "<mask>"})
DEFAULT_IGNORE_PATH = Path(__file__).resolve().parent / "configs" / "ignore_tags.txt"


def load_ignore_list(path: str | Path | None = None) -> frozenset[str]:
    """Read an ignore list (one tag per line, `#` starts a comment) into a set of normalised tags."""
    ignore_path = Path(path) if path is not None else DEFAULT_IGNORE_PATH
    if not ignore_path.is_file():
        raise FileNotFoundError(f"ignore list not found: {ignore_path}")
    tags: set[str] = set()
    with open(ignore_path, "r", encoding="utf-8") as handle:
        for line in handle:
            # Allow trailing comments too: "tagme  # needs review".
            content = line.split("#", 1)[0]
            tag = normalize_tag(content)
            if tag:
                tags.add(tag)
    return frozenset(tags)


class TagVocabulary:
    """The ordered tag list behind the model's tag outputs, with frequencies and categories."""

    def __init__(
        self, index_to_tag: Sequence[str], tag_frequencies: Mapping[str, int] | None = None, tag_categories: Mapping[str, str] | None = None
    ) -> None:
        """Build from an ordered tag list; raises ValueError on duplicates or empty/non-str tags."""
        tags = list(index_to_tag)
        tag_to_index: dict[str, int] = {}
        for index, tag in enumerate(tags):
            if not isinstance(tag, str) or not tag:
                raise ValueError(f"vocabulary tag at index {index} is not a non-empty string: {tag!r}")
            if tag in tag_to_index:
                raise ValueError(f"duplicate tag {tag!r} at indices {tag_to_index[tag]} and {index}")
            tag_to_index[tag] = index
        self.index_to_tag: list[str] = tags
        self.tag_to_index: dict[str, int] = tag_to_index
        frequencies = dict(tag_frequencies or {})
        categories = dict(tag_categories or {})
        # Keep exactly one entry per tag so the saved file is self-consistent.
        self.tag_frequencies: dict[str, int] = {t: int(frequencies.get(t, 0)) for t in tags}
        self.tag_categories: dict[str, str] = {t: str(categories.get(t, "") or "") for t in tags}

    def __len__(self) -> int:
        """Number of tags (= number of tag output columns)."""
        return len(self.index_to_tag)

    def __contains__(self, tag: object) -> bool:
        """Whether `tag` has an output column."""
        return tag in self.tag_to_index

    def __eq__(self, other: object) -> bool:
        """Equal when tags, order, frequencies and categories match."""
        if not isinstance(other, TagVocabulary):
            return NotImplemented
        return (
            self.index_to_tag == other.index_to_tag and self.tag_frequencies == other.tag_frequencies and self.tag_categories == other.tag_categories
        )

    def __repr__(self) -> str:
        """Short description with the size and fingerprint."""
        return f"TagVocabulary({len(self)} tags, fingerprint={self.fingerprint()[:12]})"

    def encode_list(self, tags: Iterable[str]) -> list[int]:
        """Indices of the known tags, in input order; unknown tags are dropped (no torch: for workers)."""
        lookup = self.tag_to_index
        return [lookup[tag] for tag in tags if tag in lookup]

    def encode(self, tags: Iterable[str]) -> torch.Tensor:
        """Indices of the known tags as a LongTensor, in input order; unknown tags are dropped."""
        return torch.tensor(self.encode_list(tags), dtype=torch.long)  # (K,)

    def encode_multi_hot(self, tags: Iterable[str]) -> torch.Tensor:
        """A float multi-hot target row with 1.0 in each known tag's column."""
        row = torch.zeros(len(self), dtype=torch.float32)  # (T,)
        indices = self.encode_list(tags)
        if indices:
            row[torch.tensor(indices, dtype=torch.long)] = 1.0
        return row

    def decode(self, indices: Iterable[int] | torch.Tensor) -> list[str]:
        """Tags for the given indices; raises ValueError for an index outside [0, len)."""
        if isinstance(indices, torch.Tensor):
            indices = indices.reshape(-1).tolist()
        tags: list[str] = []
        size = len(self.index_to_tag)
        for raw in indices:
            index = int(raw)
            if not 0 <= index < size:
                raise ValueError(f"tag index {index} out of range for a vocabulary of {size} tags")
            tags.append(self.index_to_tag[index])
        return tags

    def frequencies_array(self) -> list[int]:
        """Tag frequencies in index order (e.g. for loss re-weighting or logit-bias init)."""
        return [self.tag_frequencies[tag] for tag in self.index_to_tag]

    def categories_array(self) -> list[str]:
        """Tag categories in index order ("" when unknown)."""
        return [self.tag_categories[tag] for tag in self.index_to_tag]

    def fingerprint(self) -> str:
        """Stable SHA-256 hex digest of the ordered tag list (resume checks compare it)."""
        payload = json.dumps(self.index_to_tag, ensure_ascii=False, separators=(",", ":"))
        return hashlib.sha256(payload.encode("utf-8")).hexdigest()

    def to_dict(self) -> dict[str, Any]:
        """The vocabulary.json document as a dict."""
        return {
            "format_version": FORMAT_VERSION,
            "tag_to_index": dict(self.tag_to_index),
            "index_to_tag": list(self.index_to_tag),
            "tag_frequencies": dict(self.tag_frequencies),
            "tag_categories": dict(self.tag_categories),
        }

    def save(self, path: str | Path) -> Path:
        """Write vocabulary.json atomically (temp file in the same folder, then os.replace)."""
        target = Path(path)
        target.parent.mkdir(parents=True, exist_ok=True)
        text = json.dumps(self.to_dict(), ensure_ascii=False, indent=1)
        atomic_write_text(target, text)
        return target

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], source: str = "<dict>") -> "TagVocabulary":
        """Build from a vocabulary.json document (current or original OppaiOracle layout)."""
        if not isinstance(data, Mapping):
            raise ValueError(f"{source}: vocabulary file must hold a JSON object, got {type(data).__name__}")
        version = data.get("format_version", None)
        if version is not None and version != FORMAT_VERSION:
            raise ValueError(f"{source}: unsupported format_version {version!r} (expected {FORMAT_VERSION})")
        ordered = _ordered_tags_from_document(data, source)
        kept = [tag for tag in ordered if tag not in LEGACY_SPECIAL_TOKENS]
        frequencies = _frequencies_from_document(data, source)
        categories = _categories_from_document(data, source)
        try:
            return cls(kept, frequencies, categories)
        except ValueError as error:
            raise ValueError(f"{source}: {error}") from error

    @classmethod
    def load(cls, path: str | Path) -> "TagVocabulary":
        """Read vocabulary.json; legacy `<PAD>`/`<UNK>` specials are dropped and indices re-packed."""
        source = Path(path)
        data = load_json_file(source, "vocabulary file")
        return cls.from_dict(data, source=str(source))


def _ordered_tags_from_document(data: Mapping[str, Any], source: str) -> list[str]:
    """Recover the ordered tag list from `index_to_tag` (list or {"i": tag}) and/or `tag_to_index`."""
    raw_index_to_tag = data.get("index_to_tag")
    raw_tag_to_index = data.get("tag_to_index")
    if raw_index_to_tag is None and raw_tag_to_index is None:
        raise ValueError(f"{source}: neither 'index_to_tag' nor 'tag_to_index' present")

    ordered: list[str] | None = None
    if raw_index_to_tag is not None:
        if isinstance(raw_index_to_tag, list):
            ordered = list(raw_index_to_tag)
        elif isinstance(raw_index_to_tag, Mapping):
            # The original OppaiOracle wrote {"0": "<PAD>", "1": "<UNK>", ...}.
            by_index: dict[int, Any] = {}
            for key, tag in raw_index_to_tag.items():
                try:
                    index = int(key)
                except (TypeError, ValueError) as error:
                    raise ValueError(f"{source}: index_to_tag key {key!r} is not an integer") from error
                by_index[index] = tag
            if sorted(by_index) != list(range(len(by_index))):
                raise ValueError(
                    f"{source}: index_to_tag indices are not contiguous from 0 ({len(by_index)} entries, max index {max(by_index, default=-1)})"
                )
            ordered = [by_index[i] for i in range(len(by_index))]
        else:
            raise ValueError(f"{source}: index_to_tag must be a list or an object, got {type(raw_index_to_tag).__name__}")
        for index, tag in enumerate(ordered):
            if not isinstance(tag, str) or not tag:
                raise ValueError(f"{source}: index_to_tag[{index}] is not a non-empty string: {tag!r}")
        seen: dict[str, int] = {}
        for index, tag in enumerate(ordered):
            if tag in seen:
                raise ValueError(f"{source}: duplicate tag {tag!r} at indices {seen[tag]} and {index}")
            seen[tag] = index

    if raw_tag_to_index is not None:
        if not isinstance(raw_tag_to_index, Mapping):
            raise ValueError(f"{source}: tag_to_index must be an object, got {type(raw_tag_to_index).__name__}")
        for tag, index in raw_tag_to_index.items():
            if isinstance(index, bool) or not isinstance(index, int):
                raise ValueError(f"{source}: tag_to_index[{tag!r}] is not an integer: {index!r}")
        if ordered is None:
            by_position: dict[int, str] = {}
            for tag, index in raw_tag_to_index.items():
                if index in by_position:
                    raise ValueError(f"{source}: tags {by_position[index]!r} and {tag!r} share index {index}")
                by_position[index] = tag
            if sorted(by_position) != list(range(len(by_position))):
                raise ValueError(f"{source}: tag_to_index indices are not contiguous from 0")
            ordered = [by_position[i] for i in range(len(by_position))]
        else:
            if len(raw_tag_to_index) != len(ordered):
                raise ValueError(f"{source}: tag_to_index has {len(raw_tag_to_index)} entries but index_to_tag has {len(ordered)}")
            for index, tag in enumerate(ordered):
                if raw_tag_to_index.get(tag) != index:
                    raise ValueError(
                        f"{source}: index mismatch for tag {tag!r}: index_to_tag says {index}, tag_to_index says {raw_tag_to_index.get(tag)!r}"
                    )
    assert ordered is not None  # one of the two branches above always sets it
    return ordered


def _frequencies_from_document(data: Mapping[str, Any], source: str) -> dict[str, int]:
    """Read `tag_frequencies` (or the legacy `tag_counts`), validating integer counts."""
    raw = data.get("tag_frequencies", data.get("tag_counts", {}))
    if raw is None:
        return {}
    if not isinstance(raw, Mapping):
        raise ValueError(f"{source}: tag_frequencies must be an object, got {type(raw).__name__}")
    frequencies: dict[str, int] = {}
    for tag, count in raw.items():
        if isinstance(count, bool) or not isinstance(count, (int, float)) or count < 0:
            raise ValueError(f"{source}: tag_frequencies[{tag!r}] is not a non-negative number: {count!r}")
        frequencies[tag] = int(count)
    return frequencies


def _categories_from_document(data: Mapping[str, Any], source: str) -> dict[str, str]:
    """Read `tag_categories` (absent in legacy files: every category is then "")."""
    raw = data.get("tag_categories", {})
    if raw is None:
        return {}
    if not isinstance(raw, Mapping):
        raise ValueError(f"{source}: tag_categories must be an object, got {type(raw).__name__}")
    categories: dict[str, str] = {}
    for tag, category in raw.items():
        if not isinstance(category, str):
            raise ValueError(f"{source}: tag_categories[{tag!r}] is not a string: {category!r}")
        categories[tag] = category
    return categories


@dataclass
class VocabularyBuildReport:
    """What a vocabulary build kept and dropped, and why."""

    num_samples: int = 0
    total_occurrences: int = 0
    kept_occurrences: int = 0
    distinct_tags: int = 0
    kept: int = 0
    dropped_ignored: list[str] = field(default_factory=list)
    dropped_min_frequency: list[str] = field(default_factory=list)
    dropped_top_k: list[str] = field(default_factory=list)
    dropped_not_utf8: int = 0

    @property
    def coverage(self) -> float:
        """Share of all tag occurrences that land on a kept tag (1.0 for an empty dataset)."""
        if self.total_occurrences == 0:
            return 1.0
        return self.kept_occurrences / self.total_occurrences

    def to_dict(self) -> dict[str, Any]:
        """JSON-able summary (dropped lists are counted, not listed)."""
        return {
            "num_samples": self.num_samples,
            "distinct_tags": self.distinct_tags,
            "kept": self.kept,
            "dropped_ignored": len(self.dropped_ignored),
            "dropped_min_frequency": len(self.dropped_min_frequency),
            "dropped_top_k": len(self.dropped_top_k),
            "dropped_not_utf8": self.dropped_not_utf8,
            "total_occurrences": self.total_occurrences,
            "kept_occurrences": self.kept_occurrences,
            "coverage": self.coverage,
        }


def _sample_tags_and_categories(sample: Any) -> tuple[Sequence[str], Sequence[str]]:
    """Tags and categories of one sample: an object with .tags (and maybe .categories), or a tag list."""
    if isinstance(sample, str):
        raise ValueError(f"a sample must be a tag sequence or have .tags, got the string {sample!r}")
    if hasattr(sample, "tags"):
        tags = sample.tags
        categories = getattr(sample, "categories", None) or ()
    else:
        tags = sample
        categories = ()
    if isinstance(tags, str):
        raise ValueError(f"sample tags must be a sequence of tags, got the string {tags!r}")
    return tags, categories


def _count_table(table: SampleTable, counts: Counter[str], category_votes: dict[str, Counter[str]], report: VocabularyBuildReport) -> bool:
    """Count tags and category votes from a SampleTable's arrays (what the per-sample loop would
    count: a scan's table holds each normalised tag once a sample). False, counting nothing, when a
    tag name is not already normalised (the loop must then normalise and de-duplicate per sample)."""
    names = table.tag_names
    if any(normalize_tag(name) != name for name in names):
        return False
    per_tag, votes = table.tag_counts()  # (T,), (T, C)
    report.num_samples += len(table)
    categories = table.category_names
    for tid in np.flatnonzero(per_tag).tolist():
        tag, n = names[tid], int(per_tag[tid])
        if not tag:
            continue
        if not is_utf8(tag):
            report.dropped_not_utf8 += n
            continue
        counts[tag] += n
        for cid in np.flatnonzero(votes[tid]).tolist():
            if categories[cid]:
                category_votes.setdefault(tag, Counter())[categories[cid]] += int(votes[tid, cid])
    return True


def build_vocabulary(
    samples: Iterable[Any], *, min_frequency: int = 1, top_k: int = 0, ignore_tags: Iterable[str] = ()
) -> tuple[TagVocabulary, VocabularyBuildReport]:
    """Build a vocabulary and a report of what was dropped; see `create_vocabulary_from_datasets`."""
    if min_frequency < 1:
        raise ValueError(f"min_frequency must be >= 1, got {min_frequency}")
    if top_k < 0:
        raise ValueError(f"top_k must be >= 0 (0 = no cap), got {top_k}")
    ignored = {normalize_tag(tag) for tag in ignore_tags}
    counts: Counter[str] = Counter()
    category_votes: dict[str, Counter[str]] = {}
    report = VocabularyBuildReport()
    if isinstance(samples, SampleTable) and _count_table(samples, counts, category_votes, report):
        samples = ()  # counted from the table's arrays
    for sample in samples:
        tags, categories = _sample_tags_and_categories(sample)
        report.num_samples += 1
        seen_in_sample: set[str] = set()
        for position, raw_tag in enumerate(tags):
            tag = normalize_tag(raw_tag)
            # A tag repeated inside one sample counts once: frequency = number of samples.
            if not tag or tag in seen_in_sample:
                continue
            if not is_utf8(tag):  # a lone surrogate (valid JSON) could never be saved
                report.dropped_not_utf8 += 1
                continue
            seen_in_sample.add(tag)
            counts[tag] += 1
            category = categories[position] if position < len(categories) else ""
            if category:
                category_votes.setdefault(tag, Counter())[category] += 1

    report.distinct_tags = len(counts)
    report.total_occurrences = sum(counts.values())
    # Most frequent first; ties broken by name so the order is reproducible.
    ranked = sorted(counts.items(), key=lambda item: (-item[1], item[0]))
    candidates: list[tuple[str, int]] = []
    for tag, count in ranked:
        if tag in ignored:
            report.dropped_ignored.append(tag)
        elif count < min_frequency:
            report.dropped_min_frequency.append(tag)
        else:
            candidates.append((tag, count))
    if top_k and len(candidates) > top_k:
        report.dropped_top_k = [tag for tag, _ in candidates[top_k:]]
        candidates = candidates[:top_k]

    index_to_tag = [tag for tag, _ in candidates]
    frequencies = dict(candidates)
    categories_out = {}
    for tag in index_to_tag:
        votes = category_votes.get(tag)
        # The most common non-empty category wins; ties go to the alphabetically first.
        categories_out[tag] = min(votes.items(), key=lambda kv: (-kv[1], kv[0]))[0] if votes else ""
    report.kept = len(index_to_tag)
    report.kept_occurrences = sum(frequencies.values())
    return TagVocabulary(index_to_tag, frequencies, categories_out), report


def create_vocabulary_from_datasets(
    samples: Iterable[Any], *, min_frequency: int = 1, top_k: int = 0, ignore_tags: Iterable[str] = ()
) -> TagVocabulary:
    """Build a TagVocabulary from samples (objects with .tags/.categories, or plain tag sequences).

    Tags are normalised; frequency is the number of samples carrying a tag. Tags in `ignore_tags`
    and tags seen in fewer than `min_frequency` samples are dropped; `top_k` > 0 then keeps only
    the most frequent. Order: frequency descending, then tag name. A tag's category is the most
    common non-empty category it was given.
    """
    vocabulary, _ = build_vocabulary(samples, min_frequency=min_frequency, top_k=top_k, ignore_tags=ignore_tags)
    return vocabulary


def format_build_summary(vocabulary: TagVocabulary, report: VocabularyBuildReport, top: int = 15) -> str:
    """Human-readable summary of a build: kept/dropped counts, coverage, top tags."""
    lines = [
        f"samples: {report.num_samples}  distinct tags: {report.distinct_tags}",
        f"kept: {report.kept}",
        f"dropped by ignore list: {len(report.dropped_ignored)}" + (f" ({', '.join(report.dropped_ignored[:10])})" if report.dropped_ignored else ""),
        f"dropped by min frequency: {len(report.dropped_min_frequency)}",
        f"dropped by top-k: {len(report.dropped_top_k)}",
        f"tag occurrences covered: {report.kept_occurrences}/{report.total_occurrences} ({100.0 * report.coverage:.2f}%)",
        f"fingerprint: {vocabulary.fingerprint()[:16]}",
        "top tags:",
    ]
    for tag in vocabulary.index_to_tag[:top]:
        category = vocabulary.tag_categories.get(tag) or "-"
        lines.append(f"  {vocabulary.tag_frequencies[tag]:>8}  {tag}  [{category}]")
    return "\n".join(lines)


def _build_command(args: argparse.Namespace) -> int:
    """`build`: scan a dataset, build the vocabulary, write it and print a summary."""
    ignore_tags: frozenset[str] = frozenset()
    if not args.no_ignore:
        ignore_tags = load_ignore_list(args.ignore)
    scan = scan_dataset(args.data)
    print(format_scan_summary(scan))
    for reason, examples in sorted(scan.examples.items()):
        print(f"  {reason}: e.g. {examples[0]}")
    for example in scan.dropped_tag_examples:
        print(f"  tags dropped: {example}")
    vocabulary, report = build_vocabulary(scan.records, min_frequency=args.min_frequency, top_k=args.top_k, ignore_tags=ignore_tags)
    if len(vocabulary) == 0:
        print(f"error: no tags kept from {args.data}", file=sys.stderr)
        return 2
    out = vocabulary.save(args.out)
    print(format_build_summary(vocabulary, report))
    print(f"wrote {out}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """CLI entry point: `python vocabulary.py build --data DIR --out vocabulary.json`."""
    parser = argparse.ArgumentParser(description="Tag vocabulary tools.")
    commands = parser.add_subparsers(dest="command", required=True)
    build = commands.add_parser("build", help="build vocabulary.json from a dataset folder")
    build.add_argument("--data", required=True, help="dataset root (images + sidecar JSON)")
    build.add_argument("--out", required=True, help="where to write vocabulary.json")
    build.add_argument("--min-frequency", type=int, default=1, help="drop tags seen in fewer samples")
    build.add_argument("--top-k", type=int, default=0, help="keep at most K most frequent tags (0 = all)")
    build.add_argument("--ignore", default=None, help=f"ignore-list file (default {DEFAULT_IGNORE_PATH})")
    build.add_argument("--no-ignore", action="store_true", help="do not apply any ignore list")
    args = parser.parse_args(argv)
    try:
        return _build_command(args)
    except (FileNotFoundError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
