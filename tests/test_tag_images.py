"""Tests for tag_images: caption text options, thresholds files, and the CLI on a folder of good and bad images."""

from __future__ import annotations

import io
import json
import math
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from broken_corpus import write_image, write_png_header_only, write_text_as_image, write_truncated_jpeg
from conftest import ROOT, TrainedRun, run_cli
from tag_images import Progress
from tagging import CaptionOptions, caption_tags, format_tag, load_thresholds, merge_caption
from wd_export_helpers import characterised_checkpoint, export, load, validation_images
from wd_format import RATING_NAMES, LabelTable, TagDecision

# ---------------------------------------------------------------------------------------------- units


def test_format_tag_keeps_kaomoji_and_short_tags() -> None:
    options = CaptionOptions(remove_underscore=True, escape_parentheses=True)
    assert format_tag("long_hair", options) == "long hair"
    assert format_tag("^_^", options) == "^_^" and format_tag("o_o", options) == "o_o"
    assert format_tag("(o)_(o)", options) == "\\(o\\)_\\(o\\)"  # a kaomoji: underscores kept, parentheses escaped
    assert format_tag("hatsune_miku_(append)", options) == "hatsune miku \\(append\\)"
    assert format_tag("long_hair", CaptionOptions()) == "long_hair"


def test_caption_tags_order_rating_and_undesired() -> None:
    decision = TagDecision(
        {"general": 0.1, "sensitive": 0.7, "questionable": 0.1, "explicit": 0.1}, [("smile", 0.9), ("long_hair", 0.5)], [("hero_(x)", 0.95)]
    )
    assert caption_tags(decision, CaptionOptions()) == ["smile", "long_hair", "hero_(x)"]
    assert caption_tags(decision, CaptionOptions(character_first=True, rating=True)) == ["sensitive", "hero_(x)", "smile", "long_hair"]
    options = CaptionOptions(remove_underscore=True, undesired=frozenset({"long hair", "sensitive"}), rating=True)
    assert caption_tags(decision, options) == ["smile", "hero (x)"]


def test_merge_caption_appends_only_new_tags() -> None:
    assert merge_caption("keep me,  smile\n", ["smile", "new"], ", ") == "keep me, smile, new"
    assert merge_caption("", ["a", "a"], ", ") == "a"


def test_load_thresholds_reads_export_and_validation_loop_files(tmp_path: Path) -> None:
    table = LabelTable(RATING_NAMES, ("a", "b"), ("c",))
    ours = tmp_path / "export.json"
    ours.write_text(
        json.dumps({"per_tag": {"a": 0.4, "b": None, "c": 0.9, "gone": 0.1}, "per_category": {"general": 0.3, "character": 0.8}}), encoding="utf-8"
    )
    assert load_thresholds(ours, table, 0.35, 0.85) == ({"a": 0.4, "c": 0.9}, 0.3, 0.8)
    theirs = tmp_path / "validation.json"
    theirs.write_text(json.dumps({"global_threshold": 0.7, "default_threshold": 0.5, "per_tag": {"b": 0.6}}), encoding="utf-8")
    assert load_thresholds(theirs, table, 0.35, 0.85) == ({"b": 0.6}, 0.7, 0.7)
    theirs.write_text(json.dumps({"per_tag": {"b": 1.5}}), encoding="utf-8")
    with pytest.raises(ValueError, match="1.5"):
        load_thresholds(theirs, table, 0.35, 0.85)


def test_progress_off_a_terminal_prints_whole_lines() -> None:
    stream = io.StringIO()  # not a TTY: no carriage-return frames
    progress = Progress(7, stream=stream)
    progress.update(3)
    progress.update(4)
    progress.close()
    lines = stream.getvalue().splitlines()
    assert "\r" not in stream.getvalue() and len(lines) == 1
    assert "7/7" in lines[0] and "img/s" in lines[0] and "ETA 0s" in lines[0]


# ---------------------------------------------------------------------------------------------- CLI


@dataclass
class Setup:
    """An export, its checkpoint and a folder of validation images."""

    checkpoint: Path
    export: Path
    images: list[Path]
    base: Path


@pytest.fixture(scope="module")
def setup(trained_run: TrainedRun, tmp_path_factory: pytest.TempPathFactory) -> Setup:
    """Export the trained run; copy 12 validation images into a folder to tag."""
    base = tmp_path_factory.mktemp("tagging")
    checkpoint = characterised_checkpoint(trained_run, base / "run")
    out = base / "wd"
    export(checkpoint, out)
    images = []
    for path in validation_images(load(checkpoint)).paths[:12]:
        images.append(Path(shutil.copy(path, base / Path(path).name)))
    return Setup(checkpoint, out, images, base)


def _tag(setup: Setup, folder: Path, *extra: str, model: Path | None = None) -> tuple[int, str]:
    proc = run_cli([str(ROOT / "tag_images.py"), "--model", str(model or setup.export), "--input", str(folder), *extra], cwd=setup.base, timeout=300)
    return proc.returncode, proc.stdout + proc.stderr


@pytest.mark.e2e
def test_bad_files_are_named_and_existing_captions_kept(setup: Setup, tmp_path: Path) -> None:
    folder = tmp_path / "mixed"
    folder.mkdir()
    for path in setup.images[:4]:
        shutil.copy(path, folder)
    write_text_as_image(folder / "broken.png")
    write_truncated_jpeg(folder / "truncated.jpg")
    write_png_header_only(folder / "huge.png", 100_000, 100_000)  # past Pillow's pixel limit
    rgba = np.zeros((30, 50, 4), dtype=np.uint8)
    rgba[:, :25] = (255, 0, 0, 255)  # opaque red half, transparent other half
    Image.fromarray(rgba, "RGBA").save(folder / "transparent.png")
    Image.new("CMYK", (40, 24), (0, 200, 200, 0)).save(folder / "cmyk.jpg")
    write_image(folder / "wide.jpg", 90, 20, seed=3)
    write_image(folder / "sub" / "nested.png", 32, 32, seed=4)
    existing = folder / (setup.images[0].stem + ".txt")
    existing.write_text("keep me, hand written", encoding="utf-8")

    code, out = _tag(setup, folder, "--num-workers", "2", "--worker-start-method", "spawn", "--json", str(tmp_path / "probs.json"))
    assert code == 0, out
    for name in ("broken.png", "truncated.jpg", "huge.png"):
        line = next(line for line in out.splitlines() if line.strip().startswith(str(folder / name)))
        assert len(line.split(": ", 1)[1]) > 5, line  # a reason follows the name
        assert not (folder / name).with_suffix(".txt").exists()
    assert "DecompressionBomb" in out and "skipped 3 images" in out
    assert existing.read_text(encoding="utf-8") == "keep me, hand written"
    assert "1 existing captions left alone" in out
    for name in ("transparent", "cmyk", "wide", *(p.stem for p in setup.images[1:4])):
        assert (folder / f"{name}.txt").is_file(), name
    assert not (folder / "sub" / "nested.txt").exists()  # not --recursive
    payload = json.loads((tmp_path / "probs.json").read_text(encoding="utf-8"))
    assert set(payload["skipped"]) == {str(folder / n) for n in ("broken.png", "truncated.jpg", "huge.png")}
    entry = payload["images"]["cmyk.jpg"]
    assert set(entry["rating"]) == set(RATING_NAMES) and math.isclose(sum(entry["rating"].values()), 1, rel_tol=1e-5)
    caption = (folder / "cmyk.txt").read_text(encoding="utf-8")
    assert caption == ", ".join([*entry["general"], *entry["character"]])

    before = {p: p.read_text(encoding="utf-8") for p in folder.glob("*.txt")}
    code, out = _tag(setup, folder, "--append", "--num-workers", "0")
    assert code == 0, out
    merged = existing.read_text(encoding="utf-8")
    assert merged.startswith("keep me, hand written")
    parts = merged.split(", ")
    assert len(parts) == len(set(parts))
    assert all(p.read_text(encoding="utf-8") == text for p, text in before.items() if p != existing)

    code, out = _tag(setup, folder, "--overwrite", "--recursive", "--num-workers", "0", "--rating")
    assert code == 0, out
    assert "keep me" not in existing.read_text(encoding="utf-8")
    assert (folder / "sub" / "nested.txt").is_file()
    assert existing.read_text(encoding="utf-8").split(", ")[0] in RATING_NAMES


@pytest.mark.e2e
def test_batch_size_and_backend_do_not_change_probabilities(setup: Setup, tmp_path: Path) -> None:
    folder = tmp_path / "imgs"
    folder.mkdir()
    for path in setup.images:
        shutil.copy(path, folder)
    everything = ["--general-threshold", "0", "--character-threshold", "0", "--overwrite", "--num-workers", "0"]
    runs = {}
    for name, extra, model in (
        ("b1", ["--batch-size", "1"], None),
        ("b7", ["--batch-size", "7"], None),
        ("torch", ["--batch-size", "5", "--device", "cpu"], setup.checkpoint),
    ):
        code, out = _tag(setup, folder, *everything, *extra, "--json", str(tmp_path / f"{name}.json"), model=model)
        assert code == 0, out
        runs[name] = json.loads((tmp_path / f"{name}.json").read_text(encoding="utf-8"))["images"]
    shifts = json.loads((setup.export / "export_report.json").read_text(encoding="utf-8"))["logit_shifts"]
    assert len(runs["b1"]) == len(setup.images)
    for key, entry in runs["b1"].items():
        for block in ("rating", "general", "character"):
            for tag, p in entry[block].items():
                assert runs["b7"][key][block][tag] == pytest.approx(p, abs=1e-6)
                raw = runs["torch"][key][block][tag]  # the checkpoint's raw probability
                if block != "rating":
                    raw = 1.0 / (1.0 + math.exp(-(math.log(raw / (1.0 - raw)) + shifts[tag])))
                assert raw == pytest.approx(p, abs=1e-4), (key, tag)


@pytest.mark.e2e
def test_cli_errors_are_one_line(setup: Setup, tmp_path: Path) -> None:
    code, out = _tag(setup, tmp_path / "missing")
    assert code == 2 and "--input: folder not found" in out
    code, out = _tag(setup, tmp_path, model=tmp_path / "nothing")
    assert code == 2 and "--model" in out
