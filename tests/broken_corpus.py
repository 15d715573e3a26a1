"""Test helper: writes small image datasets with sidecars, including every kind of broken file.

`make_broken_corpus` builds a dataset folder whose bad files cover each skip reason of
the scan (dataset_scan) and returns the counts a scan must report, so tests compare against what was
actually written rather than against hard-coded numbers.
"""

from __future__ import annotations

import json
import os
import struct
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

# EXIF tag id for Orientation (TIFF tag 0x0112).
EXIF_ORIENTATION = 0x0112


def noise_image(width: int, height: int, seed: int = 0, mode: str = "RGB") -> Image.Image:
    """A random-noise image (noise keeps JPEGs large enough to truncate meaningfully)."""
    rng = np.random.default_rng(seed)
    channels = {"RGB": 3, "RGBA": 4, "L": 1}[mode]
    arr = rng.integers(0, 256, size=(height, width, channels), dtype=np.uint8)
    if channels == 1:
        return Image.fromarray(arr[..., 0], "L")
    return Image.fromarray(arr, mode)


def write_image(
    path: Path, width: int = 40, height: int = 30, *, seed: int = 0, color: tuple[int, int, int] | None = None, exif_orientation: int | None = None
) -> Path:
    """Write an RGB image (format from the suffix); solid `color` or noise; optional EXIF orientation."""
    path.parent.mkdir(parents=True, exist_ok=True)
    img = Image.new("RGB", (width, height), color) if color is not None else noise_image(width, height, seed)
    kwargs: dict[str, Any] = {}
    if exif_orientation is not None:
        exif = Image.Exif()
        exif[EXIF_ORIENTATION] = exif_orientation
        kwargs["exif"] = exif.tobytes()
    if path.suffix.lower() in (".jpg", ".jpeg"):
        kwargs["quality"] = 95
    img.save(path, **kwargs)
    return path


def write_json(path: Path, data: Any) -> Path:
    """Write `data` as UTF-8 JSON."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data), encoding="utf-8")
    return path


def write_truncated_jpeg(path: Path, width: int = 64, height: int = 48, seed: int = 0) -> Path:
    """A JPEG whose header is intact but whose scan data stops half-way (fails only at decode)."""
    write_image(path, width, height, seed=seed)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return path


def write_zero_byte(path: Path) -> Path:
    """An empty file with an image suffix."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"")
    return path


def write_text_as_image(path: Path) -> Path:
    """A text file renamed to an image suffix."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("this is not an image\n", encoding="utf-8")
    return path


def _png_chunk(kind: bytes, payload: bytes) -> bytes:
    """One PNG chunk with length and CRC."""
    return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))


def write_png_header_only(path: Path, width: int, height: int) -> Path:
    """A PNG declaring width x height RGB pixels with (almost) no pixel data: a decompression bomb."""
    path.parent.mkdir(parents=True, exist_ok=True)
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    idat = zlib.compress(b"\x00" * 16)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr) + _png_chunk(b"IDAT", idat) + _png_chunk(b"IEND", b""))
    return path


@dataclass
class BrokenCorpus:
    """What make_broken_corpus wrote: good sample ids and the skip counts a scan must report."""

    root: Path
    good_ids: list[str] = field(default_factory=list)
    decode_only_ids: list[str] = field(default_factory=list)  # pass a header check, fail decoding
    unknown_rating_ids: list[str] = field(default_factory=list)
    skips: dict[str, int] = field(default_factory=dict)  # reasons known without decoding
    # (path the scan lists, reason) of every sample skipped without decoding, and of those only decoding finds
    skip_paths: list[tuple[str, str]] = field(default_factory=list)
    decode_only_paths: list[tuple[str, str]] = field(default_factory=list)

    def expected_entries(self, verify: str) -> list[tuple[str, str]]:
        """(path, reason) of every sample scan_dataset(root, verify=verify) lists as skipped, sorted."""
        out = list(self.skip_paths) + (list(self.decode_only_paths) if verify == "decode" else [])
        if verify == "none":
            out = [(p, r) for p, r in out if r not in ("image_undecodable", "decompression_bomb")]
        return sorted(out)

    def expected_skips(self, verify: str) -> dict[str, int]:
        """Skip counts by reason that scan_dataset(root, verify=verify) must report."""
        out = dict(self.skips)
        if verify == "decode" and self.decode_only_ids:
            out["image_undecodable"] = out.get("image_undecodable", 0) + len(self.decode_only_ids)
        if verify == "none":  # nothing opens the images: only file-level problems remain
            for reason in ("image_undecodable", "decompression_bomb"):
                out.pop(reason, None)
        return {k: v for k, v in out.items() if v}

    def expected_records(self, verify: str) -> int:
        """Number of records the scan must keep."""
        broken_images = self.skips.get("image_undecodable", 0) + self.skips.get("decompression_bomb", 0)
        kept = len(self.good_ids) + len(self.unknown_rating_ids)
        if verify == "none":
            return kept + len(self.decode_only_ids) + broken_images
        if verify == "header":
            return kept + len(self.decode_only_ids)
        return kept


def make_broken_corpus(
    root: Path, *, good: int = 40, copies: int = 1, size: tuple[int, int] = (40, 30), outside_target: Path | None = None
) -> BrokenCorpus:
    """Write `good` valid samples plus `copies` of each broken kind under `root`.

    Per copy: a truncated JPEG, a zero-byte PNG, a text file renamed .png, invalid JSON, a JSON
    list, numeric tags, a "../../x.jpg" escape, an absolute path, a 100000x100000 PNG header,
    a sidecar without image, an image without sidecar, a sidecar with no tags, and one valid
    sample with an unknown rating (kept). `outside_target` is an existing image outside the root
    that the escaping sidecars point at (so only the root check can reject them).
    """
    corpus = BrokenCorpus(root=root)
    width, height = size
    root.mkdir(parents=True, exist_ok=True)
    for i in range(good):
        sub = "a" if i % 2 else "b/c"
        name = f"{sub}/good_{i:04d}.jpg"
        write_image(root / name, width, height, seed=i)
        # alternate the two sidecar conventions
        sidecar = root / (name + ".json") if i % 3 else (root / name).with_suffix(".json")
        write_json(sidecar, {"tags": [f"tag_{i % 7}", "common"], "rating": "g"})
        corpus.good_ids.append(name)

    def bump(reason: str, path: str) -> None:
        """Count one expected skip of the file at `path` (relative to the root)."""
        corpus.skips[reason] = corpus.skips.get(reason, 0) + 1
        corpus.skip_paths.append((path, reason))

    for c in range(copies):
        d = root / "bad" / f"copy_{c}"
        rel = f"bad/copy_{c}/"
        ok = {"tags": ["common"], "rating": "s"}
        write_truncated_jpeg(d / "truncated.jpg", seed=1000 + c)
        write_json(d / "truncated.jpg.json", ok)
        corpus.decode_only_ids.append(f"bad/copy_{c}/truncated.jpg")
        corpus.decode_only_paths.append((rel + "truncated.jpg", "image_undecodable"))
        write_zero_byte(d / "zero.png")
        write_json(d / "zero.json", ok)
        bump("image_undecodable", rel + "zero.png")
        write_text_as_image(d / "text.png")
        write_json(d / "text.png.json", ok)
        bump("image_undecodable", rel + "text.png")
        write_png_header_only(d / "bomb.png", 100000, 100000)
        write_json(d / "bomb.png.json", ok)
        bump("decompression_bomb", rel + "bomb.png")
        write_image(d / "badjson.jpg", width, height)
        (d / "badjson.jpg.json").write_text('{"tags": ["a", ', encoding="utf-8")
        bump("sidecar_unreadable", rel + "badjson.jpg.json")
        write_image(d / "listjson.jpg", width, height)
        write_json(d / "listjson.jpg.json", ["common"])
        bump("sidecar_unreadable", rel + "listjson.jpg.json")
        write_image(d / "numtags.jpg", width, height)
        write_json(d / "numtags.jpg.json", {"tags": [1, 2, 3]})
        bump("sidecar_unreadable", rel + "numtags.jpg.json")
        target = outside_target if outside_target is not None else root.parent / "outside.jpg"
        write_json(d / "escape.json", {"filename": "../../../" + target.name, "tags": ["common"]})
        bump("path_outside_root", rel + "escape.json")
        write_json(d / "absolute.json", {"filename": str(target.resolve()), "tags": ["common"]})
        bump("path_outside_root", rel + "absolute.json")
        write_json(d / "orphan.jpg.json", ok)
        bump("image_missing", rel + "orphan.jpg.json")
        write_image(d / "lonely.jpg", width, height)
        bump("sidecar_missing", rel + "lonely.jpg")
        write_image(d / "notags.jpg", width, height)
        write_json(d / "notags.jpg.json", {"tags": [], "rating": "g"})
        bump("no_tags", rel + "notags.jpg.json")
        write_image(d / "norating.jpg", width, height)
        write_json(d / "norating.jpg.json", {"tags": "common, extra"})
        corpus.unknown_rating_ids.append(f"bad/copy_{c}/norating.jpg")
    return corpus


# --------------------------------------------------------------------------------------------
# Hostile corpus: names, links, oversized sidecars, odd image modes (issue 12)
# --------------------------------------------------------------------------------------------


def write_truncated_png(path: Path, width: int = 64, height: int = 48, seed: int = 0) -> Path:
    """A PNG whose header is intact but whose compressed data stops half-way (fails only at decode)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    noise_image(width, height, seed).save(path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return path


def write_fuzz_png(path: Path, seed: int = 0) -> Path:
    """Random bytes after a PNG signature: what a fuzzer leaves behind, renamed .png."""
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + rng.integers(0, 256, 600, dtype=np.uint8).tobytes())
    return path


def write_odd_mode(path: Path, mode: str, seed: int = 0) -> Path:
    """A valid image in an unusual mode: I;16 PNG, P with a transparent index, LA PNG, CMYK JPEG,
    or a JPEG whose EXIF block is garbage ("badexif")."""
    path.parent.mkdir(parents=True, exist_ok=True)
    rgb = noise_image(24, 20, seed)
    if mode == "I;16":
        arr = np.asarray(rgb.convert("L"), dtype=np.uint16) * 257
        Image.fromarray(arr).save(path)  # uint16 -> mode I;16
    elif mode == "P":
        rgb.convert("P", palette=Image.Palette.ADAPTIVE, colors=16).save(path, transparency=0)
    elif mode == "badexif":
        rgb.save(path, exif=b"Exif\x00\x00II*\x00\x08\x00\x00\x00\xff\xff" + b"\x01" * 24)
    else:
        rgb.convert(mode).save(path)
    return path


def write_json_text(path: Path, text: str) -> Path:
    """Write JSON text exactly as given (escapes such as a lone \\ud800 stay as written)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


@dataclass
class HostileCorpus:
    """What make_hostile_corpus wrote: the ids a header scan keeps, those that only fail when
    decoded, the skip counts by reason and the tags dropped by reason."""

    root: Path
    good_ids: list[str] = field(default_factory=list)
    decode_only_ids: list[str] = field(default_factory=list)
    skips: dict[str, int] = field(default_factory=dict)
    dropped_tags: dict[str, int] = field(default_factory=dict)
    outside: Path | None = None

    def expected_skips(self, decoded: bool) -> dict[str, int]:
        """Skip counts once nothing was decoded (header check) or everything was."""
        out = dict(self.skips)
        if decoded:
            out["image_undecodable"] = out.get("image_undecodable", 0) + len(self.decode_only_ids)
        return out

    def expected_ids(self, decoded: bool) -> set[str]:
        """Sample ids a header scan (decoded=False) or a decoding pass keeps."""
        return set(self.good_ids) | (set() if decoded else set(self.decode_only_ids))


def make_hostile_corpus(base: Path, *, good: int = 40, huge_tag_string: bool = True, with_links: bool = True) -> HostileCorpus:
    """`good` valid samples (two shared tags each) plus one of each hostile case under base/root.

    Cases: a non-UTF-8 image name and sidecar name; a lone-surrogate tag and a 300-character tag
    (the sample is kept, the tags dropped); a 100,000-tag list; a sidecar over 4 MiB holding one
    10 MiB tag string (`huge_tag_string`); a truncated PNG and a truncated JPEG (pass the header
    check); random bytes renamed .png; odd modes (I;16, P with transparency, LA, CMYK, broken
    EXIF: all kept); and with `with_links` (POSIX): links to an image, a folder and a sidecar
    outside the root, a link to /etc/passwd named .jpg, a self-referencing link and a dangling one.
    """
    root = base / "root"
    corpus = HostileCorpus(root=root)
    ok = {"tags": ["common", "shared"], "rating": "g"}

    def bump(reason: str, count: int = 1) -> None:
        """Count one expected skip."""
        corpus.skips[reason] = corpus.skips.get(reason, 0) + count

    for i in range(good):
        name = f"good/g_{i:03d}.png"
        write_image(root / name, 24, 20, seed=i)
        write_json(root / (name + ".json"), {"tags": ["common", "shared", f"tag_{i % 5}"], "rating": i % 4})
        corpus.good_ids.append(name)
    for mode, ext in (("I;16", "png"), ("P", "png"), ("LA", "png"), ("CMYK", "jpg"), ("badexif", "jpg")):
        name = f"modes/{mode.replace(';', '')}.{ext}"
        write_odd_mode(root / name, mode, seed=len(corpus.good_ids))
        write_json(root / (name + ".json"), ok)
        corpus.good_ids.append(name)
    # names that are not UTF-8: a surrogate-escaped str on Linux, unusable in JSON or a hash
    bad = root / "names"
    bad.mkdir(parents=True)
    raw_dir = os.fsencode(bad)
    write_image(Path(os.fsdecode(raw_dir + b"/caf\xe9.png")), 24, 20)
    write_json(Path(os.fsdecode(raw_dir + b"/caf\xe9.png.json")), ok)
    bump("name_not_utf8")
    # tags
    write_image(root / "tags" / "surrogate.png", 24, 20, seed=7)
    write_json_text(root / "tags" / "surrogate.png.json", '{"tags": ["common", "shared", "\\ud800", "' + "x" * 300 + '"], "rating": "s"}')
    corpus.good_ids.append("tags/surrogate.png")
    corpus.dropped_tags = {"tag_not_utf8": 1, "tag_too_long": 1}
    write_image(root / "tags" / "many.png", 24, 20, seed=8)
    write_json(root / "tags" / "many.png.json", {"tags": [f"t{i}" for i in range(100_000)]})
    bump("too_many_tags")
    if huge_tag_string:
        write_image(root / "tags" / "huge.png", 24, 20, seed=9)
        write_json_text(root / "tags" / "huge.png.json", '{"tags": "' + "y" * (10 << 20) + '"}')
        bump("sidecar_too_large")
    # images that pass the header check but not decoding, and one that fails the header check
    for name, writer in (("decode/trunc.png", write_truncated_png), ("decode/trunc.jpg", write_truncated_jpeg)):
        writer(root / name)
        write_json(root / (name + ".json"), ok)
        corpus.decode_only_ids.append(name)
    write_fuzz_png(root / "decode" / "fuzz.png")
    write_json(root / "decode" / "fuzz.png.json", ok)
    bump("image_undecodable")
    if with_links and hasattr(os, "symlink"):
        _plant_links(base, root, ok, bump)
    return corpus


def _plant_links(base: Path, root: Path, ok: dict[str, Any], bump: Any) -> None:
    """Links out of the root (image, folder, sidecar, /etc/passwd), a loop and a dangling link."""
    outside = base / "outside"
    write_image(outside / "img.png", 24, 20, seed=11)
    write_image(outside / "folder" / "o.png", 24, 20, seed=12)
    write_json(outside / "folder" / "o.png.json", ok)
    write_json(outside / "side.json", ok)
    links = root / "links"
    links.mkdir(parents=True)
    os.symlink(outside / "img.png", links / "out.png")
    write_json(links / "out.png.json", ok)
    os.symlink(outside / "folder", links / "outdir")
    write_image(links / "local.png", 24, 20, seed=13)
    os.symlink(outside / "side.json", links / "local.png.json")
    os.symlink("/etc/passwd", links / "passwd.jpg")
    write_json(links / "passwd.jpg.json", ok)
    bump("symlink_outside_root", 4)
    os.symlink("loop.png", links / "loop.png")  # points at itself
    write_json(links / "loop.png.json", ok)
    os.symlink(links / "gone.png", links / "dangling.png")
    bump("symlink_broken", 2)


# --------------------------------------------------------------------------------------------
# Claims across folders: sidecars in one folder naming images in another (issue 24)
# --------------------------------------------------------------------------------------------


@dataclass
class ClaimsCorpus:
    """What make_claims_corpus wrote: the sample ids a scan keeps and every (path, reason) it lists."""

    root: Path
    kept: list[str] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)


def make_claims_corpus(root: Path) -> ClaimsCorpus:
    """Sidecars under json/ naming images under images/ (one claim lost to an earlier one, one
    winning over the image's own X.json, one by gallery-dl's filename + extension, one naming a
    file that is not an image, one naming a missing file and falling back to its own name), next
    to ordinary pairs in images/."""
    corpus = ClaimsCorpus(root=root)
    tags = {"tags": ["common"], "rating": "g"}
    for name in ("a", "b", "g", "x"):
        write_image(root / "images" / f"{name}.png", 8, 8, seed=ord(name))
    (root / "images" / "readme.txt").write_text("not an image", encoding="utf-8")
    write_json(root / "json" / "a.json", {**tags, "filename": "../images/a.png"})
    write_json(root / "json" / "a2.json", {**tags, "filename": "../images/a.png"})
    write_json(root / "images" / "b.json", tags)
    write_json(root / "json" / "g.json", {**tags, "filename": "../images/g", "extension": "png"})
    write_json(root / "json" / "n.json", {**tags, "filename": "../images/readme.txt"})
    write_json(root / "json" / "m.png.json", {**tags, "filename": "../images/zz.png"})
    write_json(root / "json" / "x_ref.json", {**tags, "filename": "../images/x.png"})
    write_json(root / "images" / "x.json", tags)
    corpus.kept = ["images/a.png", "images/b.png", "images/g.png", "images/x.png"]
    corpus.skipped = [
        ("images/readme.txt", "image_undecodable"),
        ("images/x.json", "duplicate_image"),
        ("json/a2.json", "duplicate_image"),
        ("json/m.png.json", "image_missing"),
    ]
    return corpus
