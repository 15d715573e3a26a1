"""Horizontal-flip tag handling: which tags swap under a left/right mirror and which forbid it.

This module owns `OrientationHandler` (reads `configs/orientation_map.json`), the `FlipDecision`
it returns for one sample's tags, and `FlipStats`, which counts flips done and vetoed and the
tags that caused the vetoes. It is a bottom module: it imports only the tag normalisation of
`vocabulary` and the JSON reader of `Configuration_System`.

Rules, in priority order, for one tag:
1. `forbid_flip` tags (text, signature, watermark, ...) veto the flip in every safety mode:
   mirrored text is not the same picture.
2. `symmetric_tags` only look orientation-related (left_4_dead, upright, asymmetrical_hair):
   they are kept as they are and never veto.
3. `explicit_pairs` swap with their partner (hair_over_left_eye <-> hair_over_right_eye).
4. The token rule: a tag's tokens are its runs of letters/digits; each token equal to one side
   of a token pair (left/right) is replaced by the other. It applies always, whether or not the
   partner tag exists anywhere (a tag whose partner is not in the vocabulary then simply drops
   out of the flipped sample's targets, which is what the mirrored picture shows).
5. A tag matching an `orientation_patterns` regex that nothing above maps ("leftward") is
   unmapped: in "conservative" mode it vetoes the flip; in "permissive" mode it is kept as is.
Everything else is unchanged by a flip.

Tags passed to `decide` are expected normalised (lower-case, "_" for spaces), as
the data pipeline hands them over; map-file entries are normalised on load.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from file_io import load_json_file
from tag_text import normalize_tag as _normalize

FORMAT_VERSION = 1
SAFETY_MODES = ("conservative", "permissive")
DEFAULT_MAP_PATH = Path(__file__).resolve().parent / "configs" / "orientation_map.json"
_ALLOWED_KEYS = frozenset(
    {"format_version", "description", "$comment", "explicit_pairs", "token_rule", "symmetric_tags", "orientation_patterns", "forbid_flip"}
)
_TOKEN_SPLIT = re.compile(r"([a-z0-9]+)")

# Per-tag classification kinds (internal).
_KEEP = "keep"
_SWAP = "swap"
_FORBID = "forbid"
_UNMAPPED = "unmapped"


@dataclass(frozen=True)
class FlipDecision:
    """Whether one sample may be mirrored, and its tags after the mirror.

    `flipped_tags` is the input with left/right partners swapped (order kept) when `allowed`;
    when the flip is vetoed it is the input unchanged (the image is not flipped).
    `blocking_tags` lists every tag that vetoed it (forbid tags first, then unmapped ones).
    """

    allowed: bool
    flipped_tags: tuple[str, ...]
    blocking_tags: tuple[str, ...] = ()
    forbid_tags: tuple[str, ...] = ()
    unmapped_tags: tuple[str, ...] = ()


class OrientationHandler:
    """Maps tags through a horizontal flip and decides whether a sample may be flipped (picklable)."""

    def __init__(
        self,
        explicit_pairs: Iterable[Sequence[str]] = (),
        forbid_flip: Iterable[str] = (),
        symmetric_tags: Iterable[str] = (),
        *,
        token_rule: bool = True,
        token_pairs: Iterable[Sequence[str]] = (("left", "right"),),
        orientation_patterns: Iterable[str] = (),
        safety_mode: str = "conservative",
        source: str = "<arguments>",
    ) -> None:
        """Validate and index the rules; ValueError names `source` and the bad entry."""
        if safety_mode not in SAFETY_MODES:
            raise ValueError(f"safety_mode must be one of {SAFETY_MODES}, got {safety_mode!r}")
        self.safety_mode = safety_mode
        self.source = source
        self.token_rule = bool(token_rule)

        self.pair_map: dict[str, str] = {}
        for entry in explicit_pairs:
            left, right = _validate_pair(entry, "explicit_pairs", source)
            for tag in (left, right):
                if tag in self.pair_map:
                    raise ValueError(f"{source}: explicit_pairs: tag {tag!r} appears in more than one pair")
            self.pair_map[left] = right
            self.pair_map[right] = left

        self.token_map: dict[str, str] = {}
        for entry in token_pairs:
            left, right = _validate_pair(entry, "token_rule.token_pairs", source)
            for token in (left, right):
                if not re.fullmatch(r"[a-z0-9]+", token):
                    raise ValueError(f"{source}: token_rule.token_pairs: token {token!r} must be letters/digits only")
                if token in self.token_map:
                    raise ValueError(f"{source}: token_rule.token_pairs: token {token!r} appears twice")
            self.token_map[left] = right
            self.token_map[right] = left

        self.forbid: frozenset[str] = frozenset(_validate_tag_list(forbid_flip, "forbid_flip", source))
        self.symmetric: frozenset[str] = frozenset(_validate_tag_list(symmetric_tags, "symmetric_tags", source))
        for tag in sorted(self.forbid & self.symmetric):
            raise ValueError(f"{source}: tag {tag!r} is in both forbid_flip and symmetric_tags")
        for tag in sorted(self.forbid & set(self.pair_map)):
            raise ValueError(f"{source}: tag {tag!r} is in both forbid_flip and explicit_pairs")
        for tag in sorted(self.symmetric & set(self.pair_map)):
            raise ValueError(f"{source}: tag {tag!r} is in both symmetric_tags and explicit_pairs")

        self.patterns: tuple[re.Pattern[str], ...] = tuple(_compile_pattern(pattern, source) for pattern in orientation_patterns)
        # Per-tag classification cache: the vocabulary is finite, so this stays bounded.
        self._cache: dict[str, tuple[str, str]] = {}

    # -- construction -------------------------------------------------------------------------

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], safety_mode: str = "conservative", source: str = "<dict>") -> "OrientationHandler":
        """Build from a parsed orientation map; ValueError names `source` and the bad entry."""
        if not isinstance(data, Mapping):
            raise ValueError(f"{source}: orientation map must be a JSON object, got {type(data).__name__}")
        unknown = sorted(set(data) - _ALLOWED_KEYS)
        if unknown:
            raise ValueError(f"{source}: unknown key(s) {unknown}; allowed: {sorted(_ALLOWED_KEYS)}")
        version = data.get("format_version", FORMAT_VERSION)
        if version != FORMAT_VERSION:
            raise ValueError(f"{source}: unsupported format_version {version!r} (expected {FORMAT_VERSION})")
        pairs = data.get("explicit_pairs", [])
        if not isinstance(pairs, list):
            raise ValueError(f"{source}: explicit_pairs must be a list of [tag, tag] pairs")
        token_rule = data.get("token_rule", {"enabled": True, "token_pairs": [["left", "right"]]})
        if not isinstance(token_rule, Mapping):
            raise ValueError(f"{source}: token_rule must be an object with 'enabled' and 'token_pairs'")
        unknown_rule_keys = sorted(set(token_rule) - {"enabled", "token_pairs"})
        if unknown_rule_keys:
            raise ValueError(f"{source}: token_rule: unknown key(s) {unknown_rule_keys}")
        enabled = token_rule.get("enabled", True)
        if not isinstance(enabled, bool):
            raise ValueError(f"{source}: token_rule.enabled must be true or false, got {enabled!r}")
        token_pairs = token_rule.get("token_pairs", [["left", "right"]])
        if not isinstance(token_pairs, list):
            raise ValueError(f"{source}: token_rule.token_pairs must be a list of [token, token] pairs")
        patterns = data.get("orientation_patterns", [])
        if not isinstance(patterns, list) or not all(isinstance(p, str) for p in patterns):
            raise ValueError(f"{source}: orientation_patterns must be a list of regex strings")
        return cls(
            explicit_pairs=pairs,
            forbid_flip=_require_list(data.get("forbid_flip", []), "forbid_flip", source),
            symmetric_tags=_require_list(data.get("symmetric_tags", []), "symmetric_tags", source),
            token_rule=enabled,
            token_pairs=token_pairs,
            orientation_patterns=patterns,
            safety_mode=safety_mode,
            source=source,
        )

    @classmethod
    def from_file(cls, path: str | Path, safety_mode: str = "conservative") -> "OrientationHandler":
        """Load an orientation map JSON file; FileNotFoundError/ValueError name the file."""
        map_path = Path(path)
        data = load_json_file(map_path, "orientation map")
        return cls.from_dict(data, safety_mode=safety_mode, source=str(map_path))

    @classmethod
    def default(cls, safety_mode: str = "conservative") -> "OrientationHandler":
        """The handler for configs/orientation_map.json next to this module."""
        return cls.from_file(DEFAULT_MAP_PATH, safety_mode=safety_mode)

    # -- pickling: drop the cache so workers start lean -----------------------------------------

    def __getstate__(self) -> dict[str, Any]:
        """Picklable state without the per-tag cache."""
        state = dict(self.__dict__)
        state["_cache"] = {}
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        """Restore from `__getstate__`."""
        self.__dict__.update(state)

    # -- queries -------------------------------------------------------------------------------

    def _classify(self, tag: str) -> tuple[str, str]:
        """(kind, tag after flip) for one tag; kind is keep, swap, forbid or unmapped."""
        cached = self._cache.get(tag)
        if cached is not None:
            return cached
        result: tuple[str, str]
        if tag in self.forbid:
            result = (_FORBID, tag)
        elif tag in self.symmetric:
            result = (_KEEP, tag)
        elif tag in self.pair_map:
            result = (_SWAP, self.pair_map[tag])
        else:
            swapped = self._swap_tokens(tag) if self.token_rule else tag
            if swapped != tag:
                result = (_SWAP, swapped)
            elif any(pattern.search(tag) for pattern in self.patterns):
                result = (_UNMAPPED, tag)
            else:
                result = (_KEEP, tag)
        self._cache[tag] = result
        return result

    def _swap_tokens(self, tag: str) -> str:
        """Replace every token that is one side of a token pair by the other side."""
        parts = _TOKEN_SPLIT.split(tag)
        # re.split with a capturing group puts the tokens at the odd positions.
        for position in range(1, len(parts), 2):
            partner = self.token_map.get(parts[position])
            if partner is not None:
                parts[position] = partner
        return "".join(parts)

    def flip_tag(self, tag: str) -> str:
        """The tag a horizontal flip turns `tag` into (itself when unaffected, forbidden or unmapped)."""
        return self._classify(tag)[1]

    def is_forbidding(self, tag: str) -> bool:
        """Whether `tag` vetoes flipping in every mode."""
        return self._classify(tag)[0] == _FORBID

    def veto_kind(self, tag: str) -> str | None:
        """Why `tag` alone vetoes a flip: "forbid", "unmapped" (conservative mode only), or None."""
        kind = self._classify(tag)[0]
        if kind == _FORBID or (kind == _UNMAPPED and self.safety_mode == "conservative"):
            return kind
        return None

    def decide(self, tags: Sequence[str]) -> FlipDecision:
        """Decide whether a sample with `tags` may be flipped, and its tags after the flip."""
        original = tuple(tags)
        flipped: list[str] = []
        forbid_tags: list[str] = []
        unmapped_tags: list[str] = []
        for tag in original:
            kind, after = self._classify(tag)
            if kind == _FORBID:
                forbid_tags.append(tag)
            elif kind == _UNMAPPED:
                unmapped_tags.append(tag)
            flipped.append(after)
        vetoing_unmapped = unmapped_tags if self.safety_mode == "conservative" else []
        blocking = tuple(forbid_tags + vetoing_unmapped)
        if blocking:
            return FlipDecision(
                allowed=False, flipped_tags=original, blocking_tags=blocking, forbid_tags=tuple(forbid_tags), unmapped_tags=tuple(vetoing_unmapped)
            )
        # Two input tags can map onto one (e.g. "x_left" and an explicit partner); keep the first.
        deduplicated = tuple(dict.fromkeys(flipped))
        return FlipDecision(allowed=True, flipped_tags=deduplicated)

    def flip_index_map(self, index_to_tag: Sequence[str]) -> list[int]:
        """For vocabulary columns: entry i is the column tag i moves to under a flip, -1 if none.

        A caller flipping an already-encoded multi-hot row (after `decide(...).allowed`) builds
        `new[m[i]] = old[i]` for m[i] >= 0; -1 means the flipped tag is not in the vocabulary.
        """
        position = {tag: index for index, tag in enumerate(index_to_tag)}
        return [position.get(self.flip_tag(tag), -1) for tag in index_to_tag]


def _require_list(value: Any, name: str, source: str) -> list[Any]:
    """`value` if it is a list, else ValueError naming the section."""
    if not isinstance(value, list):
        raise ValueError(f"{source}: {name} must be a list, got {type(value).__name__}")
    return value


def _validate_tag_list(values: Iterable[Any], name: str, source: str) -> list[str]:
    """Normalised non-empty string tags, else ValueError naming the section and entry."""
    tags: list[str] = []
    for index, value in enumerate(values):
        if not isinstance(value, str) or not _normalize(value):
            raise ValueError(f"{source}: {name}[{index}] must be a non-empty tag string, got {value!r}")
        tags.append(_normalize(value))
    return tags


def _validate_pair(entry: Any, name: str, source: str) -> tuple[str, str]:
    """A normalised [a, b] pair of distinct non-empty strings, else ValueError naming the entry."""
    if not isinstance(entry, (list, tuple)) or len(entry) != 2 or not all(isinstance(item, str) and _normalize(item) for item in entry):
        raise ValueError(f"{source}: {name}: entry {entry!r} must be a pair of two non-empty strings")
    left, right = _normalize(entry[0]), _normalize(entry[1])
    if left == right:
        raise ValueError(f"{source}: {name}: entry {entry!r} pairs a tag with itself")
    return left, right


def _compile_pattern(pattern: str, source: str) -> re.Pattern[str]:
    """Compile one orientation pattern, else ValueError naming it."""
    try:
        return re.compile(pattern)
    except re.error as error:
        raise ValueError(f"{source}: orientation_patterns: bad regex {pattern!r} ({error})") from error


@dataclass
class FlipStats:
    """Counts of flips allowed and vetoed, and of the tags behind the vetoes (mergeable across workers)."""

    flipped: int = 0
    vetoed: int = 0
    forbid_counts: Counter[str] = field(default_factory=Counter)
    unmapped_counts: Counter[str] = field(default_factory=Counter)

    def record(self, decision: FlipDecision) -> None:
        """Count one decision: allowed ones as flips done, others as vetoes with their causes."""
        if decision.allowed:
            self.flipped += 1
            return
        self.vetoed += 1
        self.forbid_counts.update(decision.forbid_tags)
        self.unmapped_counts.update(decision.unmapped_tags)

    def merge(self, other: "FlipStats") -> "FlipStats":
        """Add `other`'s counts into this one (returns self, for chaining)."""
        self.flipped += other.flipped
        self.vetoed += other.vetoed
        self.forbid_counts.update(other.forbid_counts)
        self.unmapped_counts.update(other.unmapped_counts)
        return self

    @property
    def considered(self) -> int:
        """Decisions recorded."""
        return self.flipped + self.vetoed

    def to_dict(self, top: int = 20) -> dict[str, Any]:
        """JSON-able summary with the `top` most frequent veto causes of each kind."""
        return {
            "considered": self.considered,
            "flipped": self.flipped,
            "vetoed": self.vetoed,
            "veto_rate": (self.vetoed / self.considered) if self.considered else 0.0,
            "vetoed_by_forbid_tag": dict(self.forbid_counts.most_common(top)),
            "vetoed_by_unmapped_tag": dict(self.unmapped_counts.most_common(top)),
        }
