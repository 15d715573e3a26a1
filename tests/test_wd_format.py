"""Tests for wd_format and a reader of the export written exactly as kohya-ss's WD14 tagger script reads one.

`kohya_captions` follows sd-scripts' finetune/tag_images_by_wd14_tagger.py step by step: the CSV
header check, tag lists by category code, `Image.open(...).convert("RGB")`, RGB -> BGR, a white
pad to a square, the resize to the model's input size, float32, `prob[:4]` as ratings and
`prob[4:]` read by position as the general block then the character block.
"""

from __future__ import annotations

import csv
import io
import shutil
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
from PIL import Image

from conftest import ROOT, TrainedRun, run_cli
from wd_export_helpers import CHARACTER_TAGS, characterised_checkpoint, export, load, validation_images
from wd_format import CATEGORY_CHARACTER, CATEGORY_GENERAL, CATEGORY_RATING, RATING_NAMES, LabelTable, rgb_to_wd_input, select_tags

TRICKY = ("a,b", 'say "hi"', "café_au_lait", "^_^", " spaced ", "semi;colon")


def test_csv_round_trip_with_commas_quotes_and_unicode() -> None:
    table = LabelTable(RATING_NAMES, ("plain", *TRICKY[:3]), TRICKY[3:], (5, 4, 3, 2), (1, 0, 7))
    text = table.to_csv_text()
    assert text.splitlines()[0] == "tag_id,name,category,count"
    rows = list(csv.reader(io.StringIO(text)))
    assert [r[1] for r in rows[1:]] == table.names
    assert [int(r[2]) for r in rows[1:]] == [9] * 4 + [0] * 4 + [4] * 3
    assert LabelTable.from_csv_text(text) == table


@pytest.mark.parametrize(
    "text, needle",
    [
        ("id,name,category,count\n0,general,9,0\n", "header"),
        ("tag_id,name,category,count\n0,general,9,0\n1,x,3,5\n", "category 3"),
        ("tag_id,name,category,count\n0,x,4,1\n1,y,0,1\n", "comes after"),
        ("tag_id,name,category,count\n0,x,zero,1\n", "not an integer"),
    ],
)
def test_csv_reader_refuses_what_consumers_would_misread(text: str, needle: str) -> None:
    with pytest.raises(ValueError, match=needle):
        LabelTable.from_csv_text(text)


def test_label_table_needs_four_ratings_and_unique_names() -> None:
    with pytest.raises(ValueError, match="4 rating rows"):
        LabelTable(("general",), ("a",), ())
    with pytest.raises(ValueError, match="twice"):
        LabelTable(RATING_NAMES, ("a",), ("a",))


def test_rgb_to_wd_input_is_bgr_float_nhwc() -> None:
    rgb = np.arange(2 * 3 * 4 * 4, dtype=np.uint8).reshape(2, 3, 4, 4)  # (B, 3, S, S)
    out = rgb_to_wd_input(rgb)
    assert out.shape == (2, 4, 4, 3) and out.dtype == np.float32
    np.testing.assert_array_equal(out[..., 0], rgb[:, 2].astype(np.float32))  # B first
    np.testing.assert_array_equal(rgb_to_wd_input(rgb.transpose(0, 2, 3, 1)), out)


def test_select_tags_reads_blocks_by_position() -> None:
    table = LabelTable(RATING_NAMES, ("g1", "g2"), ("c1",))
    decision = select_tags([0.1, 0.6, 0.2, 0.1, 0.35, 0.34, 0.84], table)
    assert decision.rating == "sensitive"
    assert decision.general == [("g1", pytest.approx(0.35))] and decision.character == []
    chosen = select_tags([0.1, 0.6, 0.2, 0.1, 0.35, 0.34, 0.84], table, per_tag_thresholds={"c1": 0.8, "g1": 0.9})
    assert [n for n, _ in chosen.general] == [] and [n for n, _ in chosen.character] == ["c1"]
    with pytest.raises(ValueError, match="row has 3"):
        select_tags([0.1, 0.2, 0.3], table)


def kohya_captions(
    model_dir: Path, paths: list[Path], general_threshold: float = 0.35, character_threshold: float = 0.85, batch_size: int = 4
) -> dict[Path, str]:
    """Captions of `paths` computed the way kohya's tag_images_by_wd14_tagger.py computes them."""
    with open(model_dir / "selected_tags.csv", "r", encoding="utf-8") as f:
        line = [row for row in csv.reader(f)]
    header, rows = line[0], line[1:]
    assert header[0] == "tag_id" and header[1] == "name" and header[2] == "category", f"unexpected csv format: {header}"
    rating_tags = [row[1] for row in rows if row[2] == "9"]
    general_tags = [row[1] for row in rows if row[2] == "0"]
    character_tags = [row[1] for row in rows if row[2] == "4"]
    session = ort.InferenceSession(str(model_dir / "model.onnx"), providers=["CPUExecutionProvider"])
    input_name = session.get_inputs()[0].name
    image_size = session.get_inputs()[0].shape[1]  # kohya's IMAGE_SIZE (448 there; this export's size here)

    def preprocess_image(image: Image.Image) -> np.ndarray:
        image = np.array(image)
        image = image[:, :, ::-1]  # RGB->BGR
        size = max(image.shape[0:2])
        pad_x = size - image.shape[1]
        pad_y = size - image.shape[0]
        pad_l = pad_x // 2
        pad_t = pad_y // 2
        image = np.pad(image, ((pad_t, pad_y - pad_t), (pad_l, pad_x - pad_l), (0, 0)), mode="constant", constant_values=255)
        # kohya resizes with cv2 (INTER_AREA down, LANCZOS4 up); these images already have the input size.
        assert size == image_size, "the test feeds images of the model's size, where cv2.resize is the identity"
        return image.astype(np.float32)

    captions: dict[Path, str] = {}
    for start in range(0, len(paths), batch_size):
        chunk = paths[start : start + batch_size]
        imgs = np.array([preprocess_image(Image.open(p).convert("RGB")) for p in chunk])
        probs = session.run(None, {input_name: imgs})[0]
        for path, prob in zip(chunk, probs):
            combined_tags = []
            for i, p in enumerate(prob[4:]):
                if i < len(general_tags) and p >= general_threshold:
                    combined_tags.append(general_tags[i])
                elif i >= len(general_tags) and p >= character_threshold:
                    combined_tags.append(character_tags[i - len(general_tags)])
            assert rating_tags[int(prob[:4].argmax())] in RATING_NAMES
            captions[path] = ", ".join(combined_tags)
    return captions


@pytest.mark.e2e
def test_kohya_reading_of_the_export_gives_tag_images_captions(trained_run: TrainedRun, tmp_path: Path) -> None:
    checkpoint = characterised_checkpoint(trained_run, tmp_path / "run")
    out = tmp_path / "wd"
    export(checkpoint, out)
    codes = {int(row[2]) for row in csv.reader(io.StringIO((out / "selected_tags.csv").read_text(encoding="utf-8"))) if row[2].isdigit()}
    assert codes == {CATEGORY_RATING, CATEGORY_GENERAL, CATEGORY_CHARACTER}
    folder = tmp_path / "images"
    folder.mkdir()
    val = validation_images(load(checkpoint))
    for path in val.paths:
        shutil.copy(path, folder / Path(path).name)
    images = sorted(folder.iterdir())
    expected = kohya_captions(out, images)
    proc = run_cli([str(ROOT / "tag_images.py"), "--model", str(out), "--input", str(folder), "--num-workers", "0"], cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    got = {p: p.with_suffix(".txt").read_text(encoding="utf-8") for p in images}
    assert got == expected
    # The comparison covers both blocks: some image carries a character tag and some a general one.
    assert any(t in CHARACTER_TAGS for c in got.values() for t in c.split(", "))
    assert any(t and t not in CHARACTER_TAGS for c in got.values() for t in c.split(", "))
