"""Tests for tagging: MCut against its definition, the thresholds of tag_images' options, opening models, batched inference."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from export_model import export_onnx
from image_preprocess import PreprocessParams
from model_architecture import SimplifiedTagger, VisionTransformerConfig
from tag_images import parse_args, thresholds_from_args
from tagging import MCUT_CHARACTER_FLOOR, Thresholds, mcut_threshold, open_model, predict, read_image, resolve_model_path, thresholds_for
from timm_layout import timm_config, timm_state_dict, write_timm_folder
from vocabulary import TagVocabulary
from wd_format import RATING_NAMES, LabelTable, select_tags
from wd_model import WDTagger, fused_head, plan_outputs


def _mcut_by_definition(values: list[float]) -> float:
    """Try every split of the scores sorted high to low; keep the one with the widest gap; cut in its middle."""
    ordered = sorted(values, reverse=True)
    best_gap, best_cut = -1.0, math.nan
    for k in range(1, len(ordered)):
        gap = ordered[k - 1] - ordered[k]
        if gap > best_gap:
            best_gap, best_cut = gap, (ordered[k - 1] + ordered[k]) / 2
    return best_cut


def test_mcut_is_the_middle_of_the_largest_gap() -> None:
    rng = np.random.default_rng(0)
    for _ in range(200):
        values = rng.random(rng.integers(2, 30)).tolist()
        cut = mcut_threshold(np.asarray(values))
        assert cut == pytest.approx(_mcut_by_definition(values), abs=1e-12)
        above = sorted((v for v in values if v > cut), reverse=True)
        below = sorted((v for v in values if v < cut), reverse=True)
        assert above and below  # the cut separates the scores into two non-empty groups
        widest = max(a - b for a, b in zip(sorted(values, reverse=True)[:-1], sorted(values, reverse=True)[1:]))
        assert above[-1] - below[0] == pytest.approx(widest)
    assert mcut_threshold([0.9, 0.8, 0.2, 0.1]) == pytest.approx(0.5)
    assert math.isnan(mcut_threshold([0.7])) and math.isnan(mcut_threshold([]))
    assert mcut_threshold([0.9, float("nan"), 0.1]) == pytest.approx(0.5)  # nan scores take no part


LABELS = LabelTable(RATING_NAMES, ("g1", "g2", "g3", "g4"), ("c1", "c2", "c3"))


def _row(general: list[float], character: list[float]) -> np.ndarray:
    return np.asarray([0.1, 0.6, 0.2, 0.1, *general, *character])


def test_thresholds_decide_with_mcut_per_category() -> None:
    row = _row([0.95, 0.9, 0.3, 0.05], [0.5, 0.45, 0.02])
    fixed = Thresholds(0.35, 0.85)
    assert fixed.decide(row, LABELS) == select_tags(row, LABELS, general_threshold=0.35, character_threshold=0.85)
    general_cut = mcut_threshold(row[4:8])  # between 0.9 and 0.3
    character_cut = mcut_threshold(row[8:])  # between 0.45 and 0.02
    both = Thresholds(0.35, 0.85, general_mcut=True, character_mcut=True).decide(row, LABELS)
    assert both == select_tags(row, LABELS, general_threshold=general_cut, character_threshold=character_cut)
    assert [n for n, _ in both.general] == ["g1", "g2"] and [n for n, _ in both.character] == ["c1", "c2"]
    # per-tag thresholds stay in the other category, and are replaced in the MCut one
    per_tag = {"g2": 0.99, "c1": 0.99}
    mixed = Thresholds(0.35, 0.4, per_tag=per_tag, general_mcut=True).decide(row, LABELS)
    assert [n for n, _ in mixed.general] == ["g1", "g2"] and [n for n, _ in mixed.character] == ["c2"]


def test_character_mcut_never_below_the_floor_and_one_score_keeps_the_fixed_threshold() -> None:
    row = _row([0.5, 0.4, 0.3, 0.2], [0.12, 0.11, 0.01])  # largest character gap: 0.11 -> 0.01, cut 0.06
    decision = Thresholds(0.35, 0.85, character_mcut=True).decide(row, LABELS)
    assert decision.character == []  # the cut is raised to the floor, above every score
    assert Thresholds(0.35, 0.85, character_mcut=True).cuts(row, LABELS)[1] == MCUT_CHARACTER_FLOOR
    one = LabelTable(RATING_NAMES, ("g1",), ())
    assert Thresholds(0.35, 0.85, general_mcut=True).cuts(np.asarray([0.25] * 4 + [0.3]), one) == (0.35, 0.85)


def test_tag_images_options_give_the_library_thresholds(tmp_path: Path) -> None:
    file = tmp_path / "thresholds.json"
    file.write_text(json.dumps({"global_threshold": 0.6, "per_tag": {"g1": 0.2, "c3": None}}), encoding="utf-8")
    args = parse_args(["--model", "m", "--input", "i", "--general-threshold", "0.3", "--character-mcut"])
    assert thresholds_from_args(args, LABELS) == Thresholds(0.3, 0.85, {}, False, True, source="")
    args = parse_args(["--model", "m", "--input", "i", "--thresholds", str(file), "--general-mcut"])
    assert thresholds_from_args(args, LABELS) == thresholds_for(LABELS, 0.35, 0.85, file, True, False)
    assert thresholds_from_args(args, LABELS) == Thresholds(0.6, 0.6, {"g1": 0.2}, True, False, source=str(file))
    with pytest.raises(ValueError, match="general threshold"):
        Thresholds(1.5, 0.5)


def test_open_model_names_what_is_wrong(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="model not found"):
        open_model(tmp_path / "missing")
    (tmp_path / "photos").mkdir()
    (tmp_path / "photos" / "a.txt").write_text("x", encoding="utf-8")
    with pytest.raises(ValueError, match="is not a model"):
        open_model(tmp_path / "photos")
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match="no best or last pointer"):
        resolve_model_path(run)
    (run / "checkpoints" / "last").write_text("step_3", encoding="utf-8")
    assert resolve_model_path(run) == run / "checkpoints" / "last"


class _Counting:
    """A stand-in model that records its batch sizes and returns the mean pixel per image."""

    def __init__(self) -> None:
        self.labels = LabelTable(RATING_NAMES, ("a",), ())
        self.batches: list[int] = []

    def __call__(self, images: np.ndarray) -> np.ndarray:
        self.batches.append(images.shape[0])
        mean = images.reshape(images.shape[0], -1).mean(axis=1, keepdims=True) / 255.0
        return np.concatenate([np.full((images.shape[0], 4), 0.25), mean], axis=1).astype(np.float32)


def test_predict_runs_batches_and_read_image_reports_bad_files(tmp_path: Path) -> None:
    model = _Counting()
    images = np.random.default_rng(1).integers(0, 256, (7, 4, 4, 3), dtype=np.uint8)
    out = predict(model, images, batch_size=3)  # type: ignore[arg-type]
    assert model.batches == [3, 3, 1] and out.shape == (7, 5)
    assert np.allclose(out[:, 4], images.reshape(7, -1).mean(axis=1) / 255.0)
    assert predict(model, images[:0], batch_size=3).shape == (0, 5)  # type: ignore[arg-type]
    bad = tmp_path / "bad.png"
    bad.write_text("not an image", encoding="utf-8")
    image, error = read_image(bad, PreprocessParams(16))
    assert image is None and error and "UnidentifiedImageError" in error


def test_a_timm_layout_folder_gives_the_onnx_models_probabilities(tmp_path: Path) -> None:
    """One random tagger written both ways (model.onnx as export_model traces it; config.json + model.safetensors):
    open_model reads each folder and both give the same probabilities on the same images."""
    torch.manual_seed(0)
    cfg = VisionTransformerConfig(image_size=32, patch_size=8, num_tags=9, embed_dim=32, depth=2, num_heads=2)
    backbone = SimplifiedTagger(cfg).eval()
    vocab = TagVocabulary([f"t{i}" for i in range(9)], tag_categories={"t7": "character", "t8": "character"})
    plan = plan_outputs(vocab)
    wd = WDTagger(backbone, fused_head(backbone, plan), (0.5,) * 3, (0.5,) * 3).eval()
    onnx_folder, timm_folder = tmp_path / "onnx", tmp_path / "timm"
    onnx_folder.mkdir()
    export_onnx(wd, onnx_folder / "model.onnx")
    write_timm_folder(timm_folder, timm_config(cfg, plan.labels.names, (0.5,) * 3, (0.5,) * 3), timm_state_dict(backbone, wd.head))
    for folder in (onnx_folder, timm_folder):
        (folder / "selected_tags.csv").write_text(plan.labels.to_csv_text(), encoding="utf-8")
    onnx, timm = open_model(onnx_folder), open_model(timm_folder)
    assert (onnx.kind, timm.kind) == ("onnx", "timm") and onnx.labels == timm.labels == plan.labels
    assert onnx.preprocess == timm.preprocess
    images = np.random.default_rng(0).integers(0, 256, (5, 32, 32, 3), dtype=np.uint8)
    assert np.max(np.abs(predict(onnx, images, 2) - predict(timm, images, 3))) < 1e-5


def test_a_release_folder_opens_through_timm_with_the_reference_recipes_outputs(tmp_path: Path) -> None:
    """A shrunk wd-vit-tagger-v3 folder (config.json + model.safetensors + selected_tags.csv): open_model runs it
    with the release's own pixels (white pad to a square, then bicubic) and gives the reference recipe's sigmoid."""
    from wd_release_helpers import reference_probabilities, write_images, write_release

    folder = write_release(tmp_path / "wd-vit-tagger-v3", "wd-vit-tagger-v3", ["a", "b", "c"], ["d", "e"])
    images = write_images(tmp_path / "images", 4)
    model = open_model(folder)
    assert model.kind == "timm" and model.preprocess.layout == "pad_then_resize" and model.preprocess.pad_color == (255, 255, 255)
    assert model.labels.general == ("a", "b", "c") and model.labels.character == ("d", "e")
    pixels = np.stack([read_image(p, model.preprocess)[0] for p in images])  # (4, 32, 32, 3)
    ours = predict(model, pixels, 3)
    reference = reference_probabilities(folder, images).numpy()
    assert np.abs(ours[:, 4:] - reference[:, 4:]).max() < 1e-4
    assert np.array_equal(ours[:, :4].argmax(1), reference[:, :4].argmax(1))  # softmax and sigmoid rank the ratings alike


def test_a_wd_v2_or_incomplete_release_is_refused_naming_what_is_missing(tmp_path: Path) -> None:
    from checkpoint_eval import load_checkpoint_for_eval
    from wd_release_helpers import write_release

    folder = write_release(tmp_path / "v3", "wd-vit-tagger-v3", ["a"], ["d"])
    (folder / "model.safetensors").unlink()
    with pytest.raises(ValueError, match="without model.safetensors"):
        open_model(folder)
    v2 = tmp_path / "v2"
    v2.mkdir()
    (v2 / "selected_tags.csv").write_text((folder / "selected_tags.csv").read_text(encoding="utf-8"), encoding="utf-8")
    (v2 / "model.onnx").write_bytes(b"onnx")
    with pytest.raises(ValueError, match="WD v2 / ONNX-only"):
        load_checkpoint_for_eval(v2, torch.device("cpu"))
