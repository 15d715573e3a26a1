"""Tests for wd_release (a released WD v3 tagger folder read as data) and the path from such a folder
to a training run's first step: our pipeline against the reference recipe (timm local-dir + white pad
+ bicubic + BGR + sigmoid) on the same images, config.json checked as untrusted data, the folders
that cannot give a model (WD v2: ONNX only), and --init-from's start (head rows by tag name)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from checkpoint_store import resolve_checkpoint
from Configuration_System import ConfigError, load_config
from image_preprocess import PreprocessParams, load_image, normalize_images
from tagger_init import apply_init_preprocessing, init_model_weights, timm_source
from timm_tagger import TimmTagger, build_tagger
from training_setup import timm_model_config
from vocabulary import TagVocabulary
from wd_release import read_release, read_release_config, release_layout, release_problem
from wd_release_helpers import RELEASE_CONFIGS, reference_probabilities, write_images, write_release

GENERAL = ["red", "blue", "circle", "square", "star", "outline", "text", "one_shape", "two_shapes"]
CHARACTER = ["hero", "villain", "sidekick", "mentor"]  # a 9/0/4 table: 4 ratings, 9 general, 4 character rows


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """Non-square RGBA with soft alpha, palette, grey and RGB images of several sizes."""
    return write_images(tmp_path_factory.mktemp("images"), 6)


def _our_probabilities(model: torch.nn.Module, preprocess: PreprocessParams, images: list[Path]) -> torch.Tensor:
    """Our pipeline: load_image (the dataset's decoder) -> normalize_images -> the model -> sigmoid."""
    batch = torch.stack([torch.from_numpy(load_image(p, preprocess)).permute(2, 0, 1) for p in images])  # (N, 3, S, S) uint8
    with torch.no_grad():
        out = model.eval()(normalize_images(batch, preprocess.mean, preprocess.std))
    return torch.sigmoid(torch.cat([out["rating_logits"], out["tag_logits"]], dim=1))  # (N, 4 + T)


@pytest.mark.parametrize("name", sorted(RELEASE_CONFIGS))
def test_shrunk_release_gives_the_reference_recipes_probabilities(name: str, tmp_path: Path, images: list[Path]) -> None:
    folder = write_release(tmp_path / name, name, GENERAL, CHARACTER)
    release = read_release(folder)
    assert release.config.preprocess().layout == "pad_then_resize" and release.config.preprocess().pad_color == (255, 255, 255)
    ours = _our_probabilities(release.build_model(), release.config.preprocess(), images)
    reference = reference_probabilities(folder, images)
    assert reference.std() > 0.1  # the check has outputs to compare, not saturated ones
    torch.testing.assert_close(ours, reference, rtol=0, atol=1e-4)


@pytest.mark.e2e  # the full-size ViT-B at 448 px: one forward pass, seconds on 2 cores
def test_full_size_wd_vit_tagger_v3_gives_the_reference_recipes_probabilities(tmp_path: Path, images: list[Path]) -> None:
    """The verbatim config.json of wd-vit-tagger-v3 (no class token, tanh GELU, avg pool), random weights."""
    folder = write_release(tmp_path / "wd-vit-tagger-v3", "wd-vit-tagger-v3", GENERAL, CHARACTER, shrink=False)
    config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    expected = dict(RELEASE_CONFIGS["wd-vit-tagger-v3"], num_classes=17)
    assert list(config) == list(expected) and config["model_args"] == expected["model_args"]
    release = read_release(folder)
    assert release.config.image_size == 448 and release.config.num_tags == 13
    ours = _our_probabilities(release.build_model(), release.config.preprocess(), images[:2])
    torch.testing.assert_close(ours, reference_probabilities(folder, images[:2]), rtol=0, atol=1e-4)


def test_letterbox_is_not_the_reference_but_pad_then_resize_is(tmp_path: Path) -> None:
    """Our default letterbox resizes the image and then pads; the reference pads at full size and then
    resizes (the border mixes into the edge pixels, offsets round differently). The release layout
    reproduces the reference's pixels exactly."""
    from PIL import Image
    from timm.data import create_transform

    rng = np.random.default_rng(0)
    path = tmp_path / "wide.png"
    Image.fromarray(rng.integers(0, 256, (37, 100, 3), dtype=np.uint8)).save(path)
    side = 100
    canvas = Image.new("RGB", (side, side), (255, 255, 255))
    canvas.paste(Image.open(path), (0, (side - 37) // 2))
    transform = create_transform(input_size=(3, 32, 32), interpolation="bicubic", crop_pct=1.0, mean=(0, 0, 0), std=(1, 1, 1))
    reference = (transform(canvas) * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()  # (32, 32, 3)
    exact = load_image(path, PreprocessParams(32, layout="pad_then_resize"))
    letterbox = load_image(path, PreprocessParams(32))
    assert np.array_equal(exact, reference)
    differs = np.abs(letterbox.astype(int) - reference.astype(int))
    assert differs.max() > 20  # not a rounding difference: the content lands on other pixels


def _write_config(folder: Path, **changes: object) -> None:
    config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    for key, value in changes.items():
        target = config
        *parents, last = key.split(".")
        for part in parents:
            target = target[part]
        if value is None:
            target.pop(last)
        else:
            target[last] = value
    (folder / "config.json").write_text(json.dumps(config), encoding="utf-8")


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"architecture": None}, "'architecture' must name a timm model"),
        ({"architecture": "no_such_net"}, "no model named 'no_such_net'"),
        ({"model_args": [1, 2]}, "'model_args' must be an object"),
        ({"model_args.pretrained": True}, "may not set 'pretrained'"),
        ({"model_args.depth": 5}, "does not fit"),
        ({"num_classes": 3}, "'num_classes' must be an integer above 4"),
        ({"num_classes": 20}, "selected_tags.csv lists 17 outputs but config.json num_classes is 20"),
        ({"pretrained_cfg.input_size": [3, 32, 48]}, "our pipeline feeds square 3-channel images"),
        ({"pretrained_cfg.input_size": "448"}, "must be \\[3, H, W\\]"),
        ({"pretrained_cfg.crop_pct": 0.875}, "crop_pct' is 0.875"),
        ({"pretrained_cfg.mean": [0.5, 0.5]}, "'pretrained_cfg.mean' must be a list of 3 numbers"),
        ({"pretrained_cfg.std": [0.5, 0.0, 0.5]}, "'pretrained_cfg.std' must be positive"),
        ({"pretrained_cfg.interpolation": "nearest"}, "'pretrained_cfg.interpolation' must be one of"),
    ],
)
def test_config_json_is_checked_key_by_key(tmp_path: Path, changes: dict, message: str) -> None:
    folder = write_release(tmp_path / "rel", "wd-vit-tagger-v3", GENERAL, CHARACTER)
    _write_config(folder, **changes)
    with pytest.raises(ValueError, match=message) as info:
        read_release(folder)
    assert str(folder) in str(info.value)  # the file (or folder) is named


def test_training_only_arguments_are_left_to_the_run(tmp_path: Path) -> None:
    folder = write_release(tmp_path / "rel", "wd-eva02-large-tagger-v3", GENERAL, CHARACTER)
    _write_config(folder, **{"model_args.drop_path_rate": 0.1})
    config = read_release_config(folder)
    assert "drop_path_rate" not in config.model_args and config.dropped_args == {"drop_path_rate": 0.1}


def test_folders_that_cannot_give_a_model_say_what_is_missing(tmp_path: Path) -> None:
    """A WD v2 release (model.onnx + selected_tags.csv), a download without model.safetensors, and a
    release given where a checkpoint is expected: each message names what the folder is."""
    v3 = write_release(tmp_path / "v3", "wd-vit-tagger-v3", GENERAL, CHARACTER)
    v2 = tmp_path / "v2"
    v2.mkdir()
    shutil.copy(v3 / "selected_tags.csv", v2)
    (v2 / "model.onnx").write_bytes(b"onnx")
    partial = tmp_path / "partial"
    shutil.copytree(v3, partial)
    (partial / "model.safetensors").unlink()
    assert [release_layout(p) for p in (v3, v2, partial, tmp_path)] == ["wd_v3", "onnx_only", "no_weights", None]
    assert "WD v2 / ONNX-only release" in release_problem(v2) and "no model.safetensors and config.json" in release_problem(v2)
    assert "without model.safetensors" in release_problem(partial)
    model = TimmTagger(read_release_config(v3).tagger_config())
    vocab = TagVocabulary(GENERAL + CHARACTER)
    for folder, words in ((v2, "ONNX-only"), (partial, "incomplete download")):
        with pytest.raises(ValueError, match=words):
            init_model_weights(model, vocab, folder)
        with pytest.raises(ValueError, match=words):
            resolve_checkpoint(folder)
    with pytest.raises(ValueError, match="is a released WD tagger folder .* not a training checkpoint") as info:
        resolve_checkpoint(v3)
    assert "COMPLETE" not in str(info.value)
    with pytest.raises(ConfigError, match="ONNX-only"):
        timm_source(load_config(None, ["model.family=timm", f"model.init_from={v2}"]))


# The new run's tags: the release's minus two (dropped), plus three it never had (new).
DROPPED = ["text", "mentor"]
NEW = ["green", "triangle", "cross"]


@pytest.mark.parametrize("name", sorted(RELEASE_CONFIGS))
def test_init_from_a_release_keeps_its_probabilities_for_shared_tags(name: str, tmp_path: Path, images: list[Path]) -> None:
    """What train_direct does before the first step, in process: the config takes the release's
    preprocessing, the model its architecture, --init-from its weights and head rows by tag name.
    Counts are exact, shared tags and ratings give the reference recipe's probabilities, new tags
    start at their frequency."""
    folder = write_release(tmp_path / name, name, GENERAL, CHARACTER)
    cfg = load_config(None, ["model.family=timm", f"model.init_from={folder}", "data.image_size=448"])
    preprocess = apply_init_preprocessing(cfg)
    assert preprocess == read_release_config(folder).preprocess() and cfg.data.image_size == preprocess.image_size
    assert cfg.data.image_layout == "pad_then_resize" and cfg.data.pad_color == [255, 255, 255]
    tags = [t for t in GENERAL + CHARACTER if t not in DROPPED] + NEW
    frequencies = {t: 10 + i for i, t in enumerate(tags)}
    vocab = TagVocabulary(tags, frequencies)
    model = build_tagger(timm_model_config(cfg, len(vocab), [frequencies[t] / 200 for t in tags]))
    line, record = init_model_weights(model, vocab, folder)
    assert (record["kept"], record["new"], record["dropped"]) == (len(tags) - 3, 3, 2), line
    assert record["new_tags"] == NEW and sorted(record["dropped_tags"]) == sorted(DROPPED)
    ours = _our_probabilities(model, preprocess, images)  # (N, 4 + T) in our vocabulary's order
    reference = reference_probabilities(folder, images)  # (N, 4 + T) in selected_tags.csv's order
    column = {t: 4 + i for i, t in enumerate(GENERAL + CHARACTER)}
    kept = [i for i, t in enumerate(tags) if t not in NEW]
    torch.testing.assert_close(ours[:, :4], reference[:, :4], rtol=0, atol=1e-4)
    torch.testing.assert_close(ours[:, [4 + i for i in kept]], reference[:, [column[tags[i]] for i in kept]], rtol=0, atol=1e-4)
    prior = torch.sigmoid(model.tag_head.bias.detach()[[tags.index(t) for t in NEW]].double())
    torch.testing.assert_close(prior, torch.tensor([frequencies[t] / 200 for t in NEW], dtype=torch.float64), rtol=1e-5, atol=1e-6)


def test_a_release_fixes_the_architecture(tmp_path: Path) -> None:
    folder = write_release(tmp_path / "rel", "wd-vit-tagger-v3", GENERAL, CHARACTER)
    source = timm_source(load_config(None, ["model.family=timm", f"model.init_from={folder}"]))
    assert (source.architecture, source.input_channels, source.origin) == ("vit_base_patch16_224", "bgr", "release")
    with pytest.raises(ConfigError, match="differs from model.init_from's"):
        timm_source(load_config(None, ["model.family=timm", f"model.init_from={folder}", "model.timm_architecture=convnext_base"]))
    with pytest.raises(ConfigError, match="name the model with model.timm_architecture"):
        timm_source(load_config(None, ["model.family=timm"]))
    cfg = load_config(None, ["model.family=timm", f"model.init_from={folder}", "data.preprocess_from_init=false", "data.image_size=64"])
    assert apply_init_preprocessing(cfg) is None and cfg.data.image_size == 64
