"""Tests for demo_dataset.py: determinism, sidecars, pixel/tag agreement, tag statistics, atomic writes."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import demo_dataset
from demo_dataset import (
    ALL_TAGS,
    COLOURS,
    MARKER_NAME,
    RATING_CODES,
    RATING_NAMES,
    SKIN_COLOUR,
    describe_sample,
    generate_demo_dataset,
    is_demo_dataset,
    read_demo_marker,
    tag_statistics,
)
from orientation_handler import OrientationHandler

ROOT = Path(__file__).resolve().parents[1]

SIZE = 64
COUNT = 240
SEED = 5


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One small demo dataset shared by the read-only tests."""
    return generate_demo_dataset(tmp_path_factory.mktemp("demo") / "data", num_images=COUNT, seed=SEED, image_size=SIZE)


def _tree_digest(root: Path) -> str:
    """SHA-256 over every file's relative path and bytes, in sorted order."""
    digest = hashlib.sha256()
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        digest.update(path.relative_to(root).as_posix().encode("utf-8"))
        digest.update(path.read_bytes())
    return digest.hexdigest()


def _normalise(tag: str) -> str:
    """Reference normalisation (strip, lower, whitespace runs to '_')."""
    return "_".join(tag.strip().lower().split())


def _parse_sidecar(document: dict) -> tuple[list[str], dict[str, str], int]:
    """Reference reader for the sidecar fields the demo writes: tags, categories, rating."""
    tags: list[str] = []
    categories: dict[str, str] = {}
    if "tags" in document:
        raw = document["tags"]
        items = raw if isinstance(raw, list) else (raw.split(",") if "," in raw else raw.split())
        tags = [_normalise(t) for t in items if _normalise(t)]
    elif "tag_string" in document:
        tags = [_normalise(t) for t in document["tag_string"].split()]
    else:
        for category in ("general", "character", "copyright", "artist", "meta"):
            for tag in document.get(f"tag_string_{category}", "").split():
                tags.append(_normalise(tag))
                categories[_normalise(tag)] = category
    rating = document["rating"]
    if isinstance(rating, int):
        value = rating
    elif rating in RATING_CODES:
        value = RATING_CODES.index(rating)
    else:
        value = RATING_NAMES.index(rating)
    return tags, categories, value


def _shape_mask(pixels: np.ndarray, colour: tuple[int, int, int], tolerance: float = 70.0) -> np.ndarray:
    """Boolean (H, W) mask of pixels within `tolerance` (RGB distance) of `colour`."""
    distance = np.linalg.norm(pixels.astype(np.float32) - np.array(colour, np.float32), axis=-1)  # (H, W)
    return distance < tolerance


def test_same_seed_same_bytes_other_seed_differs(tmp_path: Path) -> None:
    first = generate_demo_dataset(tmp_path / "a", num_images=30, seed=11, image_size=32)
    second = generate_demo_dataset(tmp_path / "b", num_images=30, seed=11, image_size=32)
    other = generate_demo_dataset(tmp_path / "c", num_images=30, seed=12, image_size=32)
    assert _tree_digest(first) == _tree_digest(second)
    assert _tree_digest(first) != _tree_digest(other)


def test_every_image_has_one_sidecar_with_matching_tags(demo: Path) -> None:
    images = sorted(p for p in demo.rglob("*") if p.suffix in (".png", ".jpg"))
    sidecars = sorted(demo.rglob("*.json"))
    assert len(images) == COUNT
    assert len(sidecars) == COUNT  # no stray JSON the loader would treat as an orphan sidecar
    styles = set()
    for index in range(COUNT):
        spec = describe_sample(index, SEED, SIZE)
        styles.add(spec.sidecar_style)
        image_path = demo / spec.relative_image_path
        sidecar = demo / spec.relative_sidecar_path
        assert image_path.is_file() and sidecar.is_file()
        assert sidecar.name in (image_path.name + ".json", image_path.stem + ".json")
        document = json.loads(sidecar.read_text(encoding="utf-8"))
        tags, categories, rating = _parse_sidecar(document)
        assert tags == list(spec.tags), sidecar
        assert len(set(tags)) == len(tags)
        assert rating == spec.rating
        assert set(tags) <= set(ALL_TAGS)
        if "file" in document:
            assert (sidecar.parent / document["file"]).resolve() == image_path.resolve()
        if categories:
            assert categories.get("text", "meta") == "meta"
            assert all(c == "general" for t, c in categories.items() if t != "text")
    assert styles == {"list", "comma_string", "file_field", "tag_string", "per_category"}


def test_image_formats_and_modes(demo: Path) -> None:
    seen_modes: dict[str, set[str]] = {}
    for index in range(COUNT):
        spec = describe_sample(index, SEED, SIZE)
        with Image.open(demo / spec.relative_image_path) as image:
            assert image.size == (SIZE, SIZE)
            seen_modes.setdefault(spec.image_format, set()).add(image.mode)
            if spec.image_format == "png_rgba":
                assert image.getchannel("A").getextrema() == (255, 255)
    assert seen_modes.get("png") == {"RGB"}
    assert seen_modes.get("jpg") == {"RGB"}
    assert seen_modes.get("png_rgba") == {"RGBA"}


def test_left_right_tags_match_drawn_pixels(demo: Path) -> None:
    checked_single = 0
    for index in range(COUNT):
        spec = describe_sample(index, SEED, SIZE)
        columns = {shape.column for shape in spec.shapes}
        # Tags agree with the generation metadata...
        assert ("shape_on_left" in spec.tags) == (0 in columns)
        assert ("shape_in_center" in spec.tags) == (1 in columns)
        assert ("shape_on_right" in spec.tags) == (2 in columns)
        for shape in spec.shapes:
            assert shape.column * SIZE / 3 <= shape.cx < (shape.column + 1) * SIZE / 3
        if spec.monochrome or spec.scanlines:
            continue  # no hue / dimmed rows: the colour checks below do not apply
        pixels = np.asarray(Image.open(demo / spec.relative_image_path).convert("RGB"))  # (H, W, 3)
        # ...and the metadata agrees with the pixels: each shape's colour is at its centre.
        for shape in spec.shapes:
            x, y = int(round(shape.cx)), int(round(shape.cy))
            patch = pixels[y - 1 : y + 2, x - 1 : x + 2].reshape(-1, 3).mean(axis=0)
            assert np.linalg.norm(patch - np.array(COLOURS[shape.colour])) < 45, (index, shape)
        if len(spec.shapes) == 1:
            # Independent of the metadata: the centroid of shape-coloured pixels.
            mask = _shape_mask(pixels, COLOURS[spec.shapes[0].colour])
            assert mask.sum() > 40
            centroid_x = float(np.nonzero(mask)[1].mean())
            if "shape_on_left" in spec.tags:
                assert centroid_x < SIZE / 3
            elif "shape_on_right" in spec.tags:
                assert centroid_x > 2 * SIZE / 3
            else:
                assert SIZE / 3 <= centroid_x <= 2 * SIZE / 3
            checked_single += 1
    assert checked_single > 50


def test_shapes_never_touch_and_stay_inside() -> None:
    for index in range(400):
        spec = describe_sample(index, 0, SIZE)
        assert (
            len(spec.shapes) == ["one_shape", "two_shapes", "three_shapes"].index(next(t for t in spec.tags if t.endswith(("_shape", "_shapes")))) + 1
        )
        for shape in spec.shapes:
            assert shape.radius <= shape.cx <= SIZE - shape.radius
            assert shape.radius <= shape.cy <= SIZE - shape.radius
        for a in spec.shapes:
            for b in spec.shapes:
                if a is not b:
                    gap = float(np.hypot(a.cx - b.cx, a.cy - b.cy)) - a.radius - b.radius
                    assert gap > 0, (index, a, b)


def test_mirror_moves_shape_and_handler_swaps_tags(demo: Path) -> None:
    handler = OrientationHandler.default()
    checked = 0
    for index in range(COUNT):
        spec = describe_sample(index, SEED, SIZE)
        decision = handler.decide(spec.tags)
        assert decision.allowed == ("text" not in spec.tags)
        if len(spec.shapes) != 1 or spec.monochrome or spec.scanlines or not decision.allowed:
            continue
        pixels = np.asarray(Image.open(demo / spec.relative_image_path).convert("RGB"))[:, ::-1]  # mirrored
        centroid_x = float(np.nonzero(_shape_mask(pixels, COLOURS[spec.shapes[0].colour]))[1].mean())
        if "shape_on_right" in decision.flipped_tags:
            assert centroid_x > 2 * SIZE / 3
        elif "shape_on_left" in decision.flipped_tags:
            assert centroid_x < SIZE / 3
        checked += 1
    assert checked > 30


def test_rare_and_effect_tags_are_visible(demo: Path) -> None:
    text_colour = (175, 240, 255)
    positives = {tag: sum(tag in describe_sample(i, SEED, SIZE).tags for i in range(COUNT)) for tag in ("border", "scanlines", "text")}
    assert min(positives.values()) >= 2, positives  # the checks below must see both cases
    for index in range(COUNT):
        spec = describe_sample(index, SEED, SIZE)
        pixels = np.asarray(Image.open(demo / spec.relative_image_path).convert("RGB")).astype(np.float32)  # (H, W, 3)
        luma = pixels.mean(axis=-1)  # (H, W)
        band = slice(SIZE * 5 // 16, SIZE * 11 // 16)
        if not spec.scanlines:
            # The frame is pure black outside (darker than any background) and white inside.
            framed = luma[band, 1].mean() < 15 and luma[band, 6].mean() > 190
            assert framed == ("border" in spec.tags), index
        row_gap = abs(luma[0::2].mean() - luma[1::2].mean())
        assert (row_gap > 20) == ("scanlines" in spec.tags), (index, row_gap)
        if not spec.monochrome:
            caption = _shape_mask(pixels[: SIZE // 4].astype(np.uint8), text_colour, tolerance=40).sum()
            assert (caption > SIZE) == ("text" in spec.tags), (index, caption)


def test_rating_follows_visible_skin_area(demo: Path) -> None:
    shares: dict[int, list[float]] = {rating: [] for rating in range(4)}
    for index in range(COUNT):
        spec = describe_sample(index, SEED, SIZE)
        if spec.monochrome or spec.scanlines:
            continue
        pixels = np.asarray(Image.open(demo / spec.relative_image_path).convert("RGB"))
        shares[spec.rating].append(float(_shape_mask(pixels, SKIN_COLOUR, tolerance=40).mean()))
    means = [float(np.mean(shares[rating])) for rating in range(4)]
    assert all(len(shares[rating]) >= 5 for rating in range(4))
    assert means[0] < 0.01
    assert means[0] < means[1] < means[2] < means[3]


def test_tag_statistics_long_tail_and_ratings() -> None:
    num = demo_dataset.DEFAULT_NUM_IMAGES
    stats = tag_statistics(num, seed=0, image_size=64)
    tags = {k: v for k, v in stats.items() if not k.startswith("rating:")}
    assert 25 <= len(tags) <= 40
    assert set(tags) == set(ALL_TAGS)
    for rare in ("border", "checkered_background"):
        assert 0.004 <= tags[rare] / num <= 0.02, (rare, tags[rare])
    for common in ("simple_background", "one_shape"):
        assert tags[common] / num > 0.3
    ratings = [stats[f"rating:{name}"] for name in RATING_NAMES]
    assert sum(ratings) == num
    assert all(count / num >= 0.05 for count in ratings)
    # Left and right are equally likely (a flip must not bias them).
    assert abs(tags["shape_on_left"] - tags["shape_on_right"]) / num < 0.05
    # Reference: recount directly from the specs for a prefix.
    direct: dict[str, int] = {}
    for index in range(200):
        for tag in describe_sample(index, 0, 64).tags:
            direct[tag] = direct.get(tag, 0) + 1
    prefix = {k: v for k, v in tag_statistics(200, 0, 64).items() if not k.startswith("rating:")}
    assert prefix == direct


def test_marker_and_is_demo_dataset(demo: Path, tmp_path: Path) -> None:
    assert is_demo_dataset(demo)
    assert (demo / MARKER_NAME).is_file()
    assert read_demo_marker(demo) == {
        "generator_version": str(demo_dataset.GENERATOR_VERSION),
        "num_images": str(COUNT),
        "seed": str(SEED),
        "image_size": str(SIZE),
    }
    assert not is_demo_dataset(tmp_path)
    assert not is_demo_dataset(tmp_path / "missing")
    fake = tmp_path / "fake"
    fake.mkdir()
    (fake / MARKER_NAME).write_text("something else\n", encoding="utf-8")
    assert not is_demo_dataset(fake)


def test_refuses_non_demo_folder(tmp_path: Path) -> None:
    target = tmp_path / "mine"
    target.mkdir()
    precious = target / "notes.txt"
    precious.write_text("keep me", encoding="utf-8")
    with pytest.raises(ValueError, match="refusing to overwrite"):
        generate_demo_dataset(target, num_images=3, image_size=32)
    assert precious.read_text(encoding="utf-8") == "keep me"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mine"]
    a_file = tmp_path / "file.txt"
    a_file.write_text("x", encoding="utf-8")
    with pytest.raises(ValueError, match="not a folder"):
        generate_demo_dataset(a_file, num_images=3, image_size=32)


def test_empty_folder_reuse_and_replacement(tmp_path: Path) -> None:
    target = tmp_path / "demo"
    target.mkdir()
    generate_demo_dataset(target, num_images=4, seed=1, image_size=32)
    assert is_demo_dataset(target)
    marker = target / MARKER_NAME
    before = marker.stat().st_mtime_ns
    # Same parameters: kept as is.
    generate_demo_dataset(target, num_images=4, seed=1, image_size=32)
    assert marker.stat().st_mtime_ns == before
    # Other parameters: replaced atomically, nothing left beside it.
    generate_demo_dataset(target, num_images=6, seed=1, image_size=32)
    assert read_demo_marker(target)["num_images"] == "6"
    assert len(list(target.rglob("*.json"))) == 6
    assert sorted(p.name for p in tmp_path.iterdir()) == ["demo"]


def test_crash_leaves_no_partial_dataset(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    target = tmp_path / "demo"
    generate_demo_dataset(target, num_images=3, seed=2, image_size=32)
    digest = _tree_digest(target)
    real_render = demo_dataset.render_sample

    def failing_render(spec: demo_dataset.SampleSpec, image_size: int = 64, seed: int = 0) -> Image.Image:
        """Fail on the fifth image, as a crash mid-generation would."""
        if spec.index == 4:
            raise OSError("disk full (simulated)")
        return real_render(spec, image_size, seed)

    monkeypatch.setattr(demo_dataset, "render_sample", failing_render)
    with pytest.raises(OSError, match="simulated"):
        generate_demo_dataset(target, num_images=8, seed=2, image_size=32)
    # The previous demo is untouched and no temporary sibling remains.
    assert _tree_digest(target) == digest
    assert sorted(p.name for p in tmp_path.iterdir()) == ["demo"]
    fresh = tmp_path / "fresh"
    with pytest.raises(OSError, match="simulated"):
        generate_demo_dataset(fresh, num_images=8, seed=2, image_size=32)
    assert not fresh.exists()


@pytest.mark.parametrize(("kwargs", "message"), [({"num_images": 0}, "num_images"), ({"seed": -1}, "seed"), ({"image_size": 16}, "image_size")])
def test_invalid_parameters(tmp_path: Path, kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        generate_demo_dataset(tmp_path / "x", **kwargs)
    assert not (tmp_path / "x").exists()


def test_cli(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "cli_demo"
    assert demo_dataset.main(["--out", str(out), "--images", "12", "--seed", "4", "--image-size", "40"]) == 0
    assert read_demo_marker(out) == {"generator_version": "1", "num_images": "12", "seed": "4", "image_size": "40"}
    printed = capsys.readouterr().out
    assert "images: 12" in printed and "ratings:" in printed
    blocked = tmp_path / "blocked"
    blocked.mkdir()
    (blocked / "a.txt").write_text("a", encoding="utf-8")
    assert demo_dataset.main(["--out", str(blocked), "--images", "2"]) == 2
    assert "refusing" in capsys.readouterr().err
