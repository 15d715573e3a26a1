"""Tests for orientation_handler.py: tag swapping, forbid vetoes, safety modes, map validation, stats."""

from __future__ import annotations

import json
import pickle
from pathlib import Path
from typing import Any

import pytest

from orientation_handler import DEFAULT_MAP_PATH, FlipDecision, FlipStats, OrientationHandler

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def conservative() -> OrientationHandler:
    """The shipped map in conservative mode."""
    return OrientationHandler.default()


@pytest.fixture(scope="module")
def permissive() -> OrientationHandler:
    """The shipped map in permissive mode."""
    return OrientationHandler.default("permissive")


def _write_map(tmp_path: Path, data: Any, name: str = "omap.json") -> Path:
    """Write a map document to a temp file."""
    path = tmp_path / name
    path.write_text(json.dumps(data), encoding="utf-8")
    return path


def test_explicit_and_token_swaps_keep_order(conservative: OrientationHandler) -> None:
    tags = ["red", "hair_over_left_eye", "shape_on_left", "arm_(right)", "looking_to_the_right", "solo"]
    decision = conservative.decide(tags)
    assert decision.allowed
    assert decision.blocking_tags == ()
    assert decision.flipped_tags == ("red", "hair_over_right_eye", "shape_on_right", "arm_(left)", "looking_to_the_left", "solo")


def test_flip_is_an_involution_on_shipped_pairs(conservative: OrientationHandler) -> None:
    data = json.loads(DEFAULT_MAP_PATH.read_text(encoding="utf-8"))
    for left, right in data["explicit_pairs"]:
        assert conservative.flip_tag(left) == right
        assert conservative.flip_tag(right) == left
    for tag in ("left_eye_closed", "right-handed", "x_left_y_right", "clockwise"):
        assert conservative.flip_tag(conservative.flip_tag(tag)) == tag
    # The token rule swaps every left/right token, and only whole tokens.
    assert conservative.flip_tag("x_left_y_right") == "x_right_y_left"
    assert conservative.flip_tag("leftover_food") == "leftover_food"


def test_symmetric_tags_are_kept_and_never_veto(conservative: OrientationHandler) -> None:
    decision = conservative.decide(["left_4_dead", "upright", "asymmetrical_hair", "copyright"])
    assert decision.allowed
    assert decision.flipped_tags == ("left_4_dead", "upright", "asymmetrical_hair", "copyright")


def test_forbid_tags_veto_in_both_modes(conservative: OrientationHandler, permissive: OrientationHandler) -> None:
    for handler in (conservative, permissive):
        for forbid in ("text", "signature", "watermark", "speech_bubble", "english_text", "artist_name", "web_address"):
            tags = ["shape_on_left", forbid, "red"]
            decision = handler.decide(tags)
            assert not decision.allowed, forbid
            assert decision.blocking_tags == (forbid,)
            assert decision.forbid_tags == (forbid,)
            # A vetoed sample is not flipped: its tags come back unchanged.
            assert decision.flipped_tags == tuple(tags)


def test_unmapped_orientation_tag_conservative_vs_permissive(conservative: OrientationHandler, permissive: OrientationHandler) -> None:
    tags = ["leftward_glance", "looking_to_the_left"]
    strict = conservative.decide(tags)
    assert not strict.allowed
    assert strict.blocking_tags == ("leftward_glance",)
    assert strict.unmapped_tags == ("leftward_glance",)
    loose = permissive.decide(tags)
    assert loose.allowed
    assert loose.flipped_tags == ("leftward_glance", "looking_to_the_right")
    # Forbid + unmapped: both listed as blockers in conservative mode, forbid first.
    both = conservative.decide(["leftward_glance", "watermark"])
    assert both.blocking_tags == ("watermark", "leftward_glance")


def test_plain_tags_pass_through(conservative: OrientationHandler) -> None:
    tags = ["1girl", "blue_eyes", "circle", "bright_pupils", "copyright_request"]
    decision = conservative.decide(tags)
    assert decision == FlipDecision(allowed=True, flipped_tags=tuple(tags))
    assert conservative.decide([]) == FlipDecision(allowed=True, flipped_tags=())


def test_collision_keeps_first_occurrence() -> None:
    handler = OrientationHandler(explicit_pairs=[["a_left", "a_right"]])
    decision = handler.decide(["a_left", "a_right", "b"])
    assert decision.flipped_tags == ("a_right", "a_left", "b")
    # Token rule disabled: only explicit pairs swap.
    no_tokens = OrientationHandler(explicit_pairs=[], token_rule=False)
    assert no_tokens.flip_tag("x_left") == "x_left"


def test_flip_index_map_matches_decide(conservative: OrientationHandler) -> None:
    vocab = ["shape_on_left", "red", "shape_on_right", "hair_over_left_eye", "text"]
    mapping = conservative.flip_index_map(vocab)
    # Reference: look each flipped tag up directly.
    expected = [vocab.index(conservative.flip_tag(t)) if conservative.flip_tag(t) in vocab else -1 for t in vocab]
    assert mapping == expected == [2, 1, 0, -1, 4]


def test_pickle_round_trip(conservative: OrientationHandler) -> None:
    conservative.decide(["shape_on_left"])  # fill the cache
    clone = pickle.loads(pickle.dumps(conservative))
    assert clone._cache == {}
    tags = ["shape_on_left", "leftward", "text", "hair_over_right_eye"]
    assert clone.decide(tags) == conservative.decide(tags)
    assert clone.decide(["shape_on_left"]).flipped_tags == ("shape_on_right",)


def test_shipped_map_contents() -> None:
    data = json.loads(DEFAULT_MAP_PATH.read_text(encoding="utf-8"))
    assert "text" in data["forbid_flip"]
    assert ["shape_on_left", "shape_on_right"] in data["explicit_pairs"]


def test_safety_mode_validated() -> None:
    with pytest.raises(ValueError, match="safety_mode"):
        OrientationHandler.default("reckless")


@pytest.mark.parametrize(
    ("document", "message"),
    [
        ({"explicit_pairs": [["a_left"]]}, "pair of two"),
        ({"explicit_pairs": [["a", "a"]]}, "with itself"),
        ({"explicit_pairs": [["a", "b"], ["b", "c"]]}, "more than one pair"),
        ({"explicit_pairs": "a,b"}, "explicit_pairs must be a list"),
        ({"forbid_flip": ["text", 5]}, r"forbid_flip\[1\]"),
        ({"forbid_flip": "text"}, "forbid_flip must be a list"),
        ({"forbid_flip": ["x"], "symmetric_tags": ["x"]}, "both forbid_flip and symmetric_tags"),
        ({"forbid_flip": ["a"], "explicit_pairs": [["a", "b"]]}, "both forbid_flip and explicit_pairs"),
        ({"orientation_patterns": ["(unclosed"]}, "bad regex"),
        ({"token_rule": {"enabled": "yes"}}, "token_rule.enabled"),
        ({"token_rule": {"enabled": True, "token_pairs": [["le ft", "right"]]}}, "letters/digits"),
        ({"token_rule": {"enabled": True, "tokens": []}}, "unknown key"),
        ({"forbid": ["text"]}, "unknown key"),
        ({"format_version": 7}, "format_version"),
    ],
)
def test_invalid_maps_raise_value_error_naming_file(tmp_path: Path, document: dict[str, Any], message: str) -> None:
    path = _write_map(tmp_path, document)
    with pytest.raises(ValueError, match=message) as info:
        OrientationHandler.from_file(path)
    assert "omap.json" in str(info.value)


def test_bad_json_and_missing_file(tmp_path: Path) -> None:
    bad = tmp_path / "broken.json"
    bad.write_text("{oops", encoding="utf-8")
    with pytest.raises(ValueError, match="broken.json"):
        OrientationHandler.from_file(bad)
    with pytest.raises(FileNotFoundError, match="absent.json"):
        OrientationHandler.from_file(tmp_path / "absent.json")
    not_object = _write_map(tmp_path, [1, 2], name="list.json")
    with pytest.raises(ValueError, match="list.json"):
        OrientationHandler.from_file(not_object)


def test_map_entries_are_normalised(tmp_path: Path) -> None:
    path = _write_map(tmp_path, {"explicit_pairs": [["Tail Up Left", "TAIL_UP_RIGHT"]], "forbid_flip": ["Speech Bubble"]})
    handler = OrientationHandler.from_file(path)
    assert handler.flip_tag("tail_up_left") == "tail_up_right"
    assert not handler.decide(["speech_bubble"]).allowed


def test_flip_stats_record_merge_to_dict(conservative: OrientationHandler) -> None:
    batches = [[["shape_on_left"], ["text", "red"], ["leftward"], ["circle"]], [["text", "watermark"], ["red"]]]
    per_worker = []
    for batch in batches:
        stats = FlipStats()
        for tags in batch:
            stats.record(conservative.decide(tags))
        per_worker.append(stats)
    merged = FlipStats().merge(per_worker[0]).merge(per_worker[1])
    # Reference counts computed directly from the inputs.
    all_samples = [tags for batch in batches for tags in batch]
    vetoed = [t for t in all_samples if not conservative.decide(t).allowed]
    assert merged.considered == len(all_samples) == 6
    assert merged.vetoed == len(vetoed) == 3
    assert merged.flipped == 3
    summary = merged.to_dict()
    assert summary["vetoed_by_forbid_tag"] == {"text": 2, "watermark": 1}
    assert summary["vetoed_by_unmapped_tag"] == {"leftward": 1}
    assert summary["veto_rate"] == pytest.approx(0.5)
    json.dumps(summary)  # JSON-able
    assert pickle.loads(pickle.dumps(merged)) == merged
    assert FlipStats().to_dict()["veto_rate"] == 0.0
