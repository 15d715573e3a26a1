"""Synthetic demo dataset: the embedded default a newcomer trains on first.

This module owns the deterministic generator of a small tagging dataset in the sidecar format
that `dataset_scan` reads: coloured shapes on plain or patterned backgrounds, every tag visible in the pixels
(shape, colour, count, left/centre/right position, background, outline, border, a text box,
scanlines, monochrome) and a content rating derived from the size of a "skin" coloured ellipse.
Sidecars mix the `X.json` {"tags", "rating"} layout with gallery-dl `X.png.json` files
(`tag_string`, per-category `tag_string_general` / `tag_string_meta`) so both parsers are used.

The dataset is written into a temporary sibling folder and moved into place with os.replace, a
`DEMO_COMPLETE` marker (plain text, not JSON) written last, so a crash never leaves half a
dataset. It imports only `file_io` (for the os.replace retry that Windows needs).

CLI: python demo_dataset.py --out DIR [--images N] [--seed S] [--image-size PX] [--force]
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import random
import shutil
import sys
import uuid
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from file_io import replace_with_retry

GENERATOR_VERSION = 1
MARKER_NAME = "DEMO_COMPLETE"
MARKER_HEADER = "oppaioracle-demo-dataset"
DEFAULT_NUM_IMAGES = 2500
MIN_IMAGE_SIZE = 32
IMAGES_PER_FOLDER = 500
SUPERSAMPLE = 2  # shapes are drawn at 2x and box-filtered down, for clean edges

SHAPES = ("circle", "square", "triangle", "star", "cross")
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (235, 20, 20),
    "green": (20, 190, 30),
    "blue": (20, 60, 250),
    "yellow": (250, 220, 0),
    "purple": (165, 20, 235),
}
COUNT_TAGS = ("one_shape", "two_shapes", "three_shapes")
COLUMN_TAGS = ("shape_on_left", "shape_in_center", "shape_on_right")
# Mutually exclusive backgrounds with their probabilities (a long tail down to ~1%).
BACKGROUNDS: tuple[tuple[str, float], ...] = (
    ("white_background", 0.40),
    ("grey_background", 0.25),
    ("dark_background", 0.195),
    ("gradient_background", 0.10),
    ("striped_background", 0.04),
    ("checkered_background", 0.015),
)
SIMPLE_BACKGROUNDS = frozenset({"white_background", "grey_background", "dark_background"})
EXTRA_TAG_PROBABILITIES: dict[str, float] = {"outline": 0.15, "text": 0.10, "scanlines": 0.04, "monochrome": 0.03, "border": 0.015}
META_TAGS = frozenset({"text"})  # put under tag_string_meta in per-category gallery-dl sidecars
RATING_NAMES = ("general", "sensitive", "questionable", "explicit")
RATING_CODES = ("g", "s", "q", "e")
RATING_PROBABILITIES = (0.50, 0.25, 0.15, 0.10)
# Radius of the skin ellipse per rating, as a share of the image size (0 = none): more skin,
# higher rating, so the rating head has a visible cue.
SKIN_RADIUS_SHARE = (0.0, 0.17, 0.28, 0.40)
SKIN_COLOUR = (250, 196, 160)
# Shape centres sit on fixed points that fall on 8 px patch corners at 64 px (16/32/48 across,
# 24/48 down, 40 for a lone shape): each shape kind then always looks the same to a patch-8 ViT,
# which is what lets a micro model learn the shape tags in a few minutes.
COLUMN_X = (0.25, 0.50, 0.75)
ROW_Y = (0.375, 0.75)
SINGLE_Y = 0.625
# Every shape has about the same size, whatever the count, so the coloured area grows with
# the count (an easy cue for one/two/three_shapes); sizes are shares of the image side.
SHAPE_RADIUS_SHARE = 0.16
BASE_NOISE_SIGMA = 3.0

ALL_TAGS: tuple[str, ...] = (
    SHAPES
    + tuple(COLOURS)
    + COUNT_TAGS
    + COLUMN_TAGS
    + tuple(name for name, _ in BACKGROUNDS)
    + ("simple_background",)
    + tuple(EXTRA_TAG_PROBABILITIES)
)


@dataclass(frozen=True)
class ShapeSpec:
    """One drawn shape: kind, colour name, grid column (0 left, 1 centre, 2 right), centre and radius in px."""

    kind: str
    colour: str
    column: int
    cx: float
    cy: float
    radius: float


@dataclass(frozen=True)
class SampleSpec:
    """Everything about one demo image, decided before drawing (the generation metadata)."""

    index: int
    shapes: tuple[ShapeSpec, ...]
    background: str
    rating: int
    skin_center: tuple[float, float]
    outline: bool
    text: bool
    scanlines: bool
    monochrome: bool
    border: bool
    image_format: str  # "png", "png_rgba", "png_l" or "jpg"
    sidecar_style: str  # "list", "comma_string", "file_field", "tag_string", "per_category"
    tags: tuple[str, ...]

    @property
    def extension(self) -> str:
        """Image file extension without the dot."""
        return "jpg" if self.image_format == "jpg" else "png"

    @property
    def relative_image_path(self) -> str:
        """Image path relative to the dataset root, POSIX separators."""
        return f"images/part_{self.index // IMAGES_PER_FOLDER:02d}/demo_{self.index:05d}.{self.extension}"

    @property
    def relative_sidecar_path(self) -> str:
        """Sidecar path relative to the dataset root: X.json, or X.png.json for gallery-dl styles."""
        image = self.relative_image_path
        if self.sidecar_style in ("tag_string", "per_category"):
            return image + ".json"
        return image.rsplit(".", 1)[0] + ".json"

    def tag_category(self, tag: str) -> str:
        """Booru category of one of this sample's tags."""
        return "meta" if tag in META_TAGS else "general"


def _non_overlapping_layouts(count: int) -> tuple[tuple[tuple[int, int], ...], ...]:
    """All sets of `count` (column, row) cells with no two neighbouring columns in one row (they would touch)."""
    cells = [(column, row) for column in range(3) for row in range(2)]
    layouts = []
    for chosen in itertools.combinations(cells, count):
        clash = any(a[1] == b[1] and abs(a[0] - b[0]) == 1 for a, b in itertools.combinations(chosen, 2))
        if not clash:
            layouts.append(chosen)
    return tuple(layouts)


_LAYOUTS = {count: _non_overlapping_layouts(count) for count in (2, 3)}


def _pick(rng: random.Random, weighted: Sequence[tuple[str, float]]) -> str:
    """Draw one name from (name, probability) pairs."""
    roll = rng.random()
    cumulative = 0.0
    for name, probability in weighted:
        cumulative += probability
        if roll < cumulative:
            return name
    return weighted[-1][0]


def describe_sample(index: int, seed: int = 0, image_size: int = 64) -> SampleSpec:
    """Decide the content and tags of demo image `index` (pure: same inputs, same spec)."""
    # String seeding hashes with SHA-512: stable across processes and platforms.
    rng = random.Random(f"oppaioracle-demo:v{GENERATOR_VERSION}:{seed}:{index}")
    size = float(image_size)
    count = int(_pick(rng, (("1", 0.45), ("2", 0.30), ("3", 0.25))))
    shapes: list[ShapeSpec] = []
    if count == 1:
        column = rng.randrange(3)
        shapes.append(
            ShapeSpec(rng.choice(SHAPES), rng.choice(tuple(COLOURS)), column, COLUMN_X[column] * size, SINGLE_Y * size, SHAPE_RADIUS_SHARE * size)
        )
    else:
        for column, row in rng.choice(_LAYOUTS[count]):
            shapes.append(
                ShapeSpec(
                    rng.choice(SHAPES), rng.choice(tuple(COLOURS)), column, COLUMN_X[column] * size, ROW_Y[row] * size, SHAPE_RADIUS_SHARE * size
                )
            )

    background = _pick(rng, BACKGROUNDS)
    rating = RATING_NAMES.index(_pick(rng, tuple(zip(RATING_NAMES, RATING_PROBABILITIES))))
    skin_center = ((0.5 + rng.uniform(-0.06, 0.06)) * size, (0.55 + rng.uniform(-0.06, 0.06)) * size)
    extras = {tag: rng.random() < probability for tag, probability in EXTRA_TAG_PROBABILITIES.items()}
    format_roll = rng.random()
    if extras["monochrome"]:
        image_format = "png_l" if format_roll < 0.5 else "png"
    elif format_roll < 0.10:
        image_format = "jpg"
    elif format_roll < 0.13:
        image_format = "png_rgba"
    else:
        image_format = "png"
    sidecar_style = _pick(rng, (("list", 0.65), ("comma_string", 0.10), ("file_field", 0.05), ("tag_string", 0.10), ("per_category", 0.10)))

    tags: list[str] = []
    tags.extend(kind for kind in SHAPES if any(shape.kind == kind for shape in shapes))
    if not extras["monochrome"]:
        # A greyscale picture shows no hue, so it carries no colour tags.
        tags.extend(colour for colour in COLOURS if any(shape.colour == colour for shape in shapes))
    tags.append(COUNT_TAGS[count - 1])
    tags.extend(COLUMN_TAGS[column] for column in range(3) if any(s.column == column for s in shapes))
    tags.append(background)
    if background in SIMPLE_BACKGROUNDS:
        tags.append("simple_background")
    # Meta tags go last, so every sidecar style (per-category ones list general before meta)
    # yields the same tag order.
    tags.extend(tag for tag in EXTRA_TAG_PROBABILITIES if extras[tag] and tag not in META_TAGS)
    tags.extend(tag for tag in EXTRA_TAG_PROBABILITIES if extras[tag] and tag in META_TAGS)
    return SampleSpec(
        index=index,
        shapes=tuple(shapes),
        background=background,
        rating=rating,
        skin_center=skin_center,
        outline=extras["outline"],
        text=extras["text"],
        scanlines=extras["scanlines"],
        monochrome=extras["monochrome"],
        border=extras["border"],
        image_format=image_format,
        sidecar_style=sidecar_style,
        tags=tuple(tags),
    )


def _shape_polygon(kind: str, cx: float, cy: float, r: float) -> list[tuple[float, float]]:
    """Vertices of a polygonal shape (all left/right symmetric, so a mirror keeps the shape tag)."""
    if kind == "square":
        h = r * 0.82
        return [(cx - h, cy - h), (cx + h, cy - h), (cx + h, cy + h), (cx - h, cy + h)]
    if kind == "triangle":
        return [(cx, cy - r * 1.1), (cx + r * 1.05, cy + r * 0.8), (cx - r * 1.05, cy + r * 0.8)]
    if kind == "star":
        points = []
        for k in range(10):
            angle = -np.pi / 2 + k * np.pi / 5
            radius = r * 1.08 if k % 2 == 0 else r * 0.5
            points.append((cx + radius * float(np.cos(angle)), cy + radius * float(np.sin(angle))))
        return points
    if kind == "cross":
        a, t = r, r * 0.4
        return [
            (cx - t, cy - a),
            (cx + t, cy - a),
            (cx + t, cy - t),
            (cx + a, cy - t),
            (cx + a, cy + t),
            (cx + t, cy + t),
            (cx + t, cy + a),
            (cx - t, cy + a),
            (cx - t, cy + t),
            (cx - a, cy + t),
            (cx - a, cy - t),
            (cx - t, cy - t),
        ]
    raise ValueError(f"unknown polygon shape {kind!r}")


def _draw_background(draw: ImageDraw.ImageDraw, spec: SampleSpec, big: int, rng: random.Random) -> None:
    """Fill the (supersampled) canvas with the sample's background."""
    if spec.background == "white_background":
        draw.rectangle((0, 0, big, big), fill=(245, 245, 245))
    elif spec.background == "grey_background":
        draw.rectangle((0, 0, big, big), fill=(150, 150, 150))
    elif spec.background == "dark_background":
        draw.rectangle((0, 0, big, big), fill=(32, 32, 42))
    elif spec.background == "gradient_background":
        # Neutral greys only: a tinted background would blur the colour tags.
        top_level, bottom_level = rng.randint(215, 240), rng.randint(70, 105)
        top, bottom = (top_level,) * 3, (bottom_level,) * 3
        for y in range(big):
            t = y / max(1, big - 1)
            colour = tuple(int(round(a + (b - a) * t)) for a, b in zip(top, bottom))
            draw.line((0, y, big, y), fill=colour)
    elif spec.background == "striped_background":
        # Stripes and checks are half a 8 px patch wide and grid-aligned: a crisp texture.
        stripe = max(2, big // 16)
        for y in range(0, big, 2 * stripe):
            draw.rectangle((0, y, big, y + stripe - 1), fill=(120, 120, 120))
            draw.rectangle((0, y + stripe, big, y + 2 * stripe - 1), fill=(250, 250, 250))
    elif spec.background == "checkered_background":
        cell = max(2, big // 16)
        for y in range(0, big, cell):
            for x in range(0, big, cell):
                dark = ((x // cell) + (y // cell)) % 2 == 0
                draw.rectangle((x, y, x + cell - 1, y + cell - 1), fill=(50, 50, 50) if dark else (235, 235, 235))
    else:
        raise ValueError(f"unknown background {spec.background!r}")


def _draw_text_box(draw: ImageDraw.ImageDraw, big: int, rng: random.Random) -> None:
    """A light caption box at the top with two rows of small dark glyph strokes (not mirror-safe)."""
    left, right = int(0.05 * big), int(0.95 * big)
    top, bottom = int(0.02 * big), int(0.2 * big)
    # A pale cyan caption box: no shape or background uses that hue, so it reads as "text" at a glance.
    draw.rectangle((left, top, right, bottom), fill=(175, 240, 255), outline=(15, 15, 15), width=max(2, big // 64))
    cell_w = max(6, big // 16)
    cell_h = (bottom - top - 2 * max(2, big // 64)) // 2
    stroke = max(2, big // 64)
    for row in range(2):
        y0 = top + max(2, big // 64) + row * cell_h
        x = left + max(3, big // 48)
        while x + cell_w <= right - 2:
            gx0, gx1 = x + 1, x + cell_w - 3
            gy0, gy1 = y0 + 1, y0 + cell_h - 2
            gym = (gy0 + gy1) // 2
            strokes = [
                (gx0, gy0, gx0, gy1),
                (gx1, gy0, gx1, gy1),
                (gx0, gy0, gx1, gy0),
                (gx0, gym, gx1, gym),
                (gx0, gy1, gx1, gy1),
                (gx0, gy1, gx1, gy0),
                (gx0, gy0, gx1, gy1),
            ]
            # Glyph strokes are chosen asymmetrically on purpose: mirrored text looks wrong.
            for line in rng.sample(strokes, rng.randint(2, 3)):
                draw.line(line, fill=(15, 15, 15), width=stroke)
            x += cell_w
            if rng.random() < 0.15:
                x += cell_w // 2  # a word gap


def render_sample(spec: SampleSpec, image_size: int = 64, seed: int = 0) -> Image.Image:
    """Draw the image for `spec` (RGB, or L when the sample is stored greyscale)."""
    rng = random.Random(f"oppaioracle-demo-render:v{GENERATOR_VERSION}:{seed}:{spec.index}")
    scale = SUPERSAMPLE
    big = image_size * scale
    canvas = Image.new("RGB", (big, big))
    draw = ImageDraw.Draw(canvas)
    _draw_background(draw, spec, big, rng)

    skin_share = SKIN_RADIUS_SHARE[spec.rating]
    if skin_share > 0:
        sx, sy = spec.skin_center[0] * scale, spec.skin_center[1] * scale
        rx, ry = skin_share * big * 1.1, skin_share * big
        draw.ellipse((sx - rx, sy - ry, sx + rx, sy + ry), fill=SKIN_COLOUR)

    light_background = spec.background not in ("dark_background",)
    outline_colour = (10, 10, 10) if light_background else (245, 245, 245)
    outline_width = max(3, big // 28) if spec.outline else 0
    for shape in spec.shapes:
        cx, cy, r = shape.cx * scale, shape.cy * scale, shape.radius * scale
        fill = COLOURS[shape.colour]
        outline = outline_colour if spec.outline else None
        if shape.kind == "circle":
            draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=fill, outline=outline, width=outline_width)
        else:
            points = _shape_polygon(shape.kind, cx, cy, r)
            draw.polygon(points, fill=fill, outline=outline, width=outline_width)

    if spec.text:
        _draw_text_box(draw, big, rng)
    if spec.border:
        outer, inner = max(4, big // 12), max(2, big // 21)
        draw.rectangle((0, 0, big - 1, big - 1), outline=(0, 0, 0), width=outer)
        draw.rectangle((outer, outer, big - 1 - outer, big - 1 - outer), outline=(255, 255, 255), width=inner)

    image = canvas.reduce(scale)
    noise_rng = np.random.default_rng([seed, spec.index, GENERATOR_VERSION])
    pixels = np.array(image, dtype=np.float32)  # (H, W, 3)
    if spec.scanlines:
        # CRT-style scanlines: every other row dimmed (lifted on a dark background so they show).
        lift = 70.0 if spec.background == "dark_background" else 0.0
        pixels[1::2] = pixels[1::2] * 0.45 + lift  # (H/2, W, 3)
    noise = noise_rng.normal(0.0, BASE_NOISE_SIGMA, size=pixels.shape[:2] + (1,)).astype(np.float32)  # (H, W, 1)
    pixels = np.clip(pixels + noise, 0, 255).astype(np.uint8)
    image = Image.fromarray(pixels)
    if spec.monochrome:
        grey = image.convert("L")
        image = grey if spec.image_format == "png_l" else grey.convert("RGB")
    return image


def _rating_value(spec: SampleSpec, rng: random.Random) -> str | int:
    """The sidecar rating in one of the accepted spellings (code, word or 0-3)."""
    roll = rng.random()
    if spec.sidecar_style in ("tag_string", "per_category") or roll < 0.8:
        return RATING_CODES[spec.rating]
    if roll < 0.9:
        return RATING_NAMES[spec.rating]
    return spec.rating


def sidecar_document(spec: SampleSpec, seed: int = 0) -> dict[str, object]:
    """The JSON object written next to the image for `spec`."""
    rng = random.Random(f"oppaioracle-demo-sidecar:v{GENERATOR_VERSION}:{seed}:{spec.index}")
    rating = _rating_value(spec, rng)
    if spec.sidecar_style == "list":
        return {"tags": list(spec.tags), "rating": rating}
    if spec.sidecar_style == "comma_string":
        # Booru-style prose: spaces instead of underscores, some capitals; normalisation undoes it.
        words = [tag.replace("_", " ") for tag in spec.tags]
        words = [word.capitalize() if rng.random() < 0.3 else word for word in words]
        return {"tags": ", ".join(words), "rating": rating}
    if spec.sidecar_style == "file_field":
        return {"file": Path(spec.relative_image_path).name, "tags": list(spec.tags), "rating": rating}
    if spec.sidecar_style == "tag_string":
        return {"id": spec.index, "tag_string": " ".join(spec.tags), "rating": rating}
    if spec.sidecar_style == "per_category":
        general = [tag for tag in spec.tags if spec.tag_category(tag) == "general"]
        meta = [tag for tag in spec.tags if spec.tag_category(tag) == "meta"]
        return {
            "id": spec.index,
            "tag_string_general": " ".join(general),
            "tag_string_character": "",
            "tag_string_copyright": "",
            "tag_string_artist": "",
            "tag_string_meta": " ".join(meta),
            "rating": rating,
        }
    raise ValueError(f"unknown sidecar style {spec.sidecar_style!r}")


def _save_image(image: Image.Image, spec: SampleSpec, path: Path) -> None:
    """Save in the sample's storage format (PNG RGB/RGBA/L or JPEG)."""
    if spec.image_format == "jpg":
        image.convert("RGB").save(path, format="JPEG", quality=92, subsampling=0)
    elif spec.image_format == "png_rgba":
        # Fully opaque alpha: exercises RGBA decoding without changing what the model sees.
        rgba = image.convert("RGBA")
        rgba.save(path, format="PNG")
    else:
        image.save(path, format="PNG")


def _write_text(path: Path, text: str) -> None:
    """Write UTF-8 text with LF line ends (inside the temporary folder, so no per-file temp)."""
    with open(path, "w", encoding="utf-8", newline="\n") as handle:
        handle.write(text)


def marker_text(num_images: int, seed: int, image_size: int) -> str:
    """Contents of the DEMO_COMPLETE marker for these parameters."""
    return f"{MARKER_HEADER}\ngenerator_version={GENERATOR_VERSION}\nnum_images={num_images}\nseed={seed}\nimage_size={image_size}\n"


def read_demo_marker(path: str | Path) -> dict[str, str] | None:
    """The key=value parameters from a demo dataset's marker, or None when it is not a demo dataset."""
    marker = Path(path) / MARKER_NAME
    if not marker.is_file():
        return None
    try:
        lines = marker.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError):
        return None
    if not lines or lines[0].strip() != MARKER_HEADER:
        return None
    params: dict[str, str] = {}
    for line in lines[1:]:
        key, sep, value = line.partition("=")
        if sep:
            params[key.strip()] = value.strip()
    return params


def is_demo_dataset(path: str | Path) -> bool:
    """Whether `path` is a complete demo dataset written by this module."""
    return Path(path).is_dir() and read_demo_marker(path) is not None


def _generate_into(folder: Path, num_images: int, seed: int, image_size: int) -> Counter[str]:
    """Write all images and sidecars into `folder`; returns tag counts."""
    counts: Counter[str] = Counter()
    for index in range(num_images):
        spec = describe_sample(index, seed, image_size)
        image_path = folder / spec.relative_image_path
        image_path.parent.mkdir(parents=True, exist_ok=True)
        _save_image(render_sample(spec, image_size, seed), spec, image_path)
        document = sidecar_document(spec, seed)
        _write_text(folder / spec.relative_sidecar_path, json.dumps(document, ensure_ascii=False) + "\n")
        counts.update(spec.tags)
        counts[f"rating:{RATING_NAMES[spec.rating]}"] += 1
    return counts


def generate_demo_dataset(
    out_dir: str | Path, num_images: int = DEFAULT_NUM_IMAGES, seed: int = 0, image_size: int = 64, *, force: bool = False
) -> Path:
    """Write the demo dataset to `out_dir` atomically and return its path.

    An existing demo dataset with the same parameters is kept as is (unless `force`); one with
    other parameters is replaced. A non-empty folder that is not a demo dataset is never touched
    (ValueError).
    """
    if isinstance(num_images, bool) or not isinstance(num_images, int) or num_images < 1:
        raise ValueError(f"num_images must be a positive integer, got {num_images!r}")
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
    if isinstance(image_size, bool) or not isinstance(image_size, int) or image_size < MIN_IMAGE_SIZE:
        raise ValueError(f"image_size must be an integer >= {MIN_IMAGE_SIZE}, got {image_size!r}")
    out = Path(out_dir).absolute()
    if out.exists():
        if not out.is_dir():
            raise ValueError(f"demo output path exists and is not a folder: {out}")
        params = read_demo_marker(out)
        if params is None:
            if any(out.iterdir()):
                raise ValueError(f"refusing to overwrite {out}: it is not empty and not a demo dataset (no {MARKER_NAME} marker); pick another --out")
        elif not force and params == _marker_params(num_images, seed, image_size):
            return out
    out.parent.mkdir(parents=True, exist_ok=True)
    token = f"{os.getpid()}-{uuid.uuid4().hex[:8]}"
    staging = out.parent / f".{out.name}.tmp-{token}"
    retired = out.parent / f".{out.name}.old-{token}"
    try:
        staging.mkdir()
        _generate_into(staging, num_images, seed, image_size)
        # The marker goes last: its presence means every image and sidecar is on disk.
        _write_text(staging / MARKER_NAME, marker_text(num_images, seed, image_size))
        if out.exists():
            # Windows cannot os.replace onto an existing folder: move the old one aside first.
            replace_with_retry(out, retired)
        replace_with_retry(staging, out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        if retired.exists() and not out.exists():
            replace_with_retry(retired, out)  # put the previous demo back
        raise
    if retired.exists():
        shutil.rmtree(retired, ignore_errors=True)
    return out


def _marker_params(num_images: int, seed: int, image_size: int) -> dict[str, str]:
    """Marker key/values as `read_demo_marker` returns them."""
    return {"generator_version": str(GENERATOR_VERSION), "num_images": str(num_images), "seed": str(seed), "image_size": str(image_size)}


def tag_statistics(num_images: int = DEFAULT_NUM_IMAGES, seed: int = 0, image_size: int = 64) -> dict[str, int]:
    """Tag and rating counts the generator would produce, without drawing anything."""
    counts: Counter[str] = Counter()
    for index in range(num_images):
        spec = describe_sample(index, seed, image_size)
        counts.update(spec.tags)
        counts[f"rating:{RATING_NAMES[spec.rating]}"] += 1
    return dict(counts.most_common())


def main(argv: Sequence[str] | None = None) -> int:
    """CLI: generate the demo dataset and print a short summary."""
    parser = argparse.ArgumentParser(description="Generate the synthetic OppaiOracle demo dataset.")
    parser.add_argument("--out", required=True, help="output folder (created; replaced only if it is a demo dataset)")
    parser.add_argument("--images", type=int, default=DEFAULT_NUM_IMAGES, help="number of images")
    parser.add_argument("--seed", type=int, default=0, help="generation seed (same seed, same bytes)")
    parser.add_argument("--image-size", type=int, default=64, help="square image side in pixels")
    parser.add_argument("--force", action="store_true", help="regenerate even if an identical demo exists")
    args = parser.parse_args(argv)
    try:
        out = generate_demo_dataset(args.out, num_images=args.images, seed=args.seed, image_size=args.image_size, force=args.force)
    except (ValueError, OSError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    stats = tag_statistics(args.images, args.seed, args.image_size)
    tags = {k: v for k, v in stats.items() if not k.startswith("rating:")}
    ratings = {k.split(":", 1)[1]: v for k, v in stats.items() if k.startswith("rating:")}
    print(f"demo dataset: {out}")
    print(f"images: {args.images}  size: {args.image_size}px  seed: {args.seed}  tags: {len(tags)}")
    print("ratings: " + ", ".join(f"{name}={count}" for name, count in ratings.items()))
    print("tag counts: " + ", ".join(f"{name}={count}" for name, count in tags.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
