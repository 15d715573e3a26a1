"""Tests for tag_app's page functions, called directly (no browser): the same probabilities and captions as
tag_images.py, thresholds and MCut, side-by-side differences, bad input, and the Validation tab's figures
against validation_loop.py's, for a run and for export and release folders with --data."""

from __future__ import annotations

import csv
import json
import math
import shlex
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import export_model
import tag_images
import validation_loop
from broken_corpus import write_image, write_png_header_only, write_text_as_image, write_truncated_jpeg
from conftest import TrainedRun
from eval_reports import PREDICTIONS_FILE, load_predictions
from image_preprocess import PreprocessParams
from tag_app import OpenedModel, TagPage, caption_options, parse_args, prepare_validation, setup
from tag_app_helpers import demo_labels
from tagging import CaptionOptions, Thresholds
from wd_format import RATING_NAMES, LabelTable
from wd_release_helpers import write_release

# ---------------------------------------------------------------------------------------------- fast: stand-in models


@dataclass
class _Fake:
    """A stand-in model: each tag's probability is a fixed function of the image's mean colour."""

    labels: LabelTable
    weights: np.ndarray  # (4 + T, 3)
    source: Path = Path("fake")
    kind: str = "onnx"
    preprocess: PreprocessParams = PreprocessParams(image_size=8)

    def __call__(self, images: np.ndarray) -> np.ndarray:
        self.calls = getattr(self, "calls", []) + [images.shape[0]]
        mean = images.reshape(images.shape[0], -1, 3).mean(axis=1) / 255.0  # (B, 3)
        return (1.0 / (1.0 + np.exp(-(mean @ self.weights.T - 0.5) * 6))).astype(np.float32)  # (B, 4 + T)


def _page(tmp_path: Path) -> TagPage:
    page = TagPage(batch_size=2)
    rng = np.random.default_rng(3)
    a = LabelTable(RATING_NAMES, ("red", "green", "blue", "dark"), ("hero",))
    b = LabelTable(RATING_NAMES, ("red", "green", "blue", "bright"), ("hero", "villain"))
    for name, labels in (("a", a), ("b", b)):
        page.models[name] = OpenedModel(name, str(tmp_path / name), _Fake(labels, rng.normal(size=(4 + labels.num_tags, 3))), None)
    return page


def _images(folder: Path) -> list[str]:
    folder.mkdir(parents=True, exist_ok=True)
    colours = [(250, 10, 10), (10, 240, 20), (20, 20, 230), (120, 120, 120), (240, 240, 240)]
    return [str(write_image(folder / f"img{i}.png", 20, 16, color=c)) for i, c in enumerate(colours)]


def test_side_by_side_marks_exactly_the_tags_one_model_gives(tmp_path: Path) -> None:
    page = _page(tmp_path)
    paths = _images(tmp_path / "imgs")
    tagged = page.tag(paths, ["a", "b"])
    assert page.models["a"].model.calls == [2, 2, 1]  # five uploads in batches of two
    settings = {"a": Thresholds(0.5, 0.6), "b": Thresholds(0.4, 0.3)}
    views = page.views(tagged, settings, CaptionOptions())
    assert [v.name for v in views] == [Path(p).name for p in paths]
    for i, view in enumerate(views):
        probs = {m: dict(zip(page.models[m].model.labels.names, tagged.probs[m][i].astype(float))) for m in ("a", "b")}
        chosen = {
            m: {n for n, p in probs[m].items() if n not in RATING_NAMES and p >= _cut(settings[m], page.models[m].model.labels, n)}
            for m in ("a", "b")
        }
        for model_view in view.models:
            m, other = model_view.model, ("b" if model_view.model == "a" else "a")
            lines = model_view.general + model_view.character
            assert {line.name for line in lines} == chosen[m]
            assert {line.name for line in lines if line.only} == chosen[m] - chosen[other]
            for line in lines:
                if line.name in probs[other]:
                    assert line.delta == pytest.approx(probs[m][line.name] - probs[other][line.name])
                    assert line.missing_in == ()
                else:
                    assert line.delta is None and line.missing_in == (other,)
            assert [line.probability for line in model_view.general] == sorted((line.probability for line in model_view.general), reverse=True)
            assert model_view.caption == ", ".join(
                [n for n, _ in settings[m].decide(tagged.probs[m][i], page.models[m].model.labels).general]
                + [n for n, _ in settings[m].decide(tagged.probs[m][i], page.models[m].model.labels).character]
            )


def _cut(thresholds: Thresholds, labels: LabelTable, name: str) -> float:
    return thresholds.general if name in labels.general else thresholds.character


def test_bad_uploads_are_named_and_the_next_request_works(tmp_path: Path) -> None:
    page = _page(tmp_path)
    folder = tmp_path / "bad"
    bad = [
        write_text_as_image(folder / "text.png"),
        write_truncated_jpeg(folder / "truncated.jpg"),
        write_png_header_only(folder / "bomb.png", 100_000, 100_000),  # decompression bomb
        write_png_header_only(folder / "hundred_mp.png", 10_000, 10_000),  # 100 megapixels: past Pillow's limit
    ]
    good = _images(tmp_path / "good")[:1]
    tagged = page.tag([*map(str, bad), *good], ["a", "b"])
    assert sorted(tagged.errors) == [0, 1, 2, 3]
    assert "UnidentifiedImageError" in tagged.errors[0] and "DecompressionBomb" in tagged.errors[2] and "DecompressionBomb" in tagged.errors[3]
    assert all(str(folder) not in reason for reason in tagged.errors.values())  # named as uploaded, not by server path
    views = page.views(tagged, {"a": Thresholds(), "b": Thresholds()}, CaptionOptions())
    assert [bool(v.error) for v in views] == [True, True, True, True, False] and len(views[4].models) == 2
    again = page.tag(good, ["a"])
    assert again.errors == {} and len(again.probs["a"]) == 1
    with pytest.raises(ValueError, match="is not a model"):
        page.open(folder)
    with pytest.raises(FileNotFoundError):
        page.open(tmp_path / "nothing")
    assert set(page.models) == {"a", "b"}


def test_the_shown_command_holds_the_page_settings(tmp_path: Path) -> None:
    page = _page(tmp_path)
    settings = {"general": 0.42, "character": 0.9, "general_mcut": True, "character_mcut": False, "per_tag": False}
    options = caption_options(True, False, True, True, "red, blue")
    argv = shlex.split(page.command("a", settings, options))[2:]
    args = tag_images.parse_args([a if a != "DIR" else str(tmp_path) for a in argv])
    assert (args.general_threshold, args.character_threshold, args.general_mcut, args.character_mcut) == (0.42, 0.9, True, False)
    assert (args.remove_underscore, args.escape_parentheses, args.character_first, args.rating) == (True, False, True, True)
    assert set(args.undesired_tags.split(",")) == {"red", "blue"} and args.model == str(tmp_path / "a")


# ---------------------------------------------------------------------------------------------- a trained model


@pytest.fixture(scope="module")
def run_copy(trained_run: TrainedRun, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The trained run's checkpoints in a folder of this module (the page keeps its evaluation next to them)."""
    run = tmp_path_factory.mktemp("app") / "run"
    shutil.copytree(trained_run.run_dir / "checkpoints", run / "checkpoints")
    return run


def _demo_images(trained_run: TrainedRun, folder: Path, count: int = 6) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    sources = sorted(p for p in trained_run.data.rglob("*.png"))[:count]
    return [Path(shutil.copy(p, folder / p.name)) for p in sources]


def test_probabilities_and_captions_equal_tag_images(run_copy: Path, trained_run: TrainedRun, tmp_path: Path) -> None:
    images = _demo_images(trained_run, tmp_path / "imgs")
    page = TagPage(batch_size=4)
    opened = page.open(run_copy)
    tagged = page.tag([str(p) for p in images], [opened.name])
    everything = ["--general-threshold", "0", "--character-threshold", "0", "--overwrite", "--num-workers", "0", "--batch-size", "3"]
    tag_images.run(
        tag_images.parse_args(
            ["--model", str(run_copy / "checkpoints" / "best"), "--input", str(tmp_path / "imgs"), *everything, "--json", str(tmp_path / "all.json")]
        )
    )
    reference = json.loads((tmp_path / "all.json").read_text(encoding="utf-8"))["images"]
    labels = opened.model.labels
    for i, path in enumerate(images):
        row = tagged.probs[opened.name][i]
        entry = reference[path.name]
        expected = (
            [entry["rating"][n] for n in labels.ratings]
            + [entry["general"][n] for n in labels.general]
            + [entry["character"][n] for n in labels.character]
        )
        assert np.max(np.abs(row.astype(np.float64) - np.asarray(expected))) <= 1e-6

    cases = [
        ({"general": 0.5, "character": 0.5, "general_mcut": False, "character_mcut": False, "per_tag": False}, (False, False, False, False, "")),
        ({"general": 0.2, "character": 0.7, "general_mcut": True, "character_mcut": False, "per_tag": False}, (True, False, True, False, "")),
        ({"general": 0.3, "character": 0.3, "general_mcut": False, "character_mcut": True, "per_tag": False}, (False, True, False, True, "circle")),
    ]
    captions_seen = set()
    for settings, caption in cases:
        options = caption_options(*caption)
        thresholds = opened.thresholds(
            settings["general"], settings["character"], settings["general_mcut"], settings["character_mcut"], settings["per_tag"]
        )
        views = page.views(tagged, {opened.name: thresholds}, options)
        argv = [a if a != "DIR" else str(tmp_path / "imgs") for a in shlex.split(page.command(opened.name, settings, options))[2:]]
        tag_images.run(tag_images.parse_args([*argv, "--overwrite", "--num-workers", "0"]))
        for view, path in zip(views, images):
            written = path.with_suffix(".txt").read_text(encoding="utf-8")
            assert view.models[0].caption == written, (settings, path.name)
            captions_seen.add(written)
    assert len(captions_seen) > len(images)  # the settings changed the captions


def test_validation_figures_equal_validation_loop(run_copy: Path, trained_run: TrainedRun, tmp_path: Path) -> None:
    reference = tmp_path / "reference"
    assert (
        validation_loop.main(
            ["--checkpoint", str(run_copy / "checkpoints" / "best"), "--out", str(reference), "--num-workers", "0", "--save-predictions"]
        )
        == 0
    )
    data = prepare_validation(run_copy, num_workers=0)
    assert data.computed and (run_copy / "eval" / data.folder.name / PREDICTIONS_FILE).is_file()
    assert data.folder == run_copy / "eval" / (run_copy / "checkpoints" / "best").read_text(encoding="utf-8").strip()
    with pytest.raises(ValueError, match="never writes into a model folder"):
        prepare_validation(run_copy, eval_dir=data.folder.parent.parent / "checkpoints" / data.folder.name / "eval", num_workers=0)
    again = prepare_validation(run_copy, num_workers=0)
    assert not again.computed and json.dumps(again.rows) == json.dumps(data.rows)  # kept, not evaluated again (nan compares as text)
    rows = list(csv.DictReader((reference / "per_tag.csv").open(encoding="utf-8")))
    assert [r["tag"] for r in rows] == [r["tag"] for r in data.rows]
    for ref, ours in zip(rows, data.rows):
        assert (
            ref["category"] == ours["category"] and int(ref["support"]) == ours["support"] and int(ref["train_frequency"]) == ours["train_frequency"]
        )
        for key in ("ap", "f1", "precision", "recall", "best_threshold"):
            a, b = float(ref[key]), ours[key]
            assert (math.isnan(a) and math.isnan(b)) or a == pytest.approx(b, abs=1e-9), (ref["tag"], key)
    saved = load_predictions(reference / PREDICTIONS_FILE)
    assert np.array_equal(saved.probs, data.predictions.probs) and saved.paths == data.predictions.paths

    # worst images: labels read from the dataset's sidecars, scores on the right side of the threshold, in order
    threshold = data.predictions.threshold
    tag = max(data.rows, key=lambda r: (r["support"] > 0) * (1 - (r["f1"] if r["f1"] == r["f1"] else 0)))["tag"]
    fps, fns = data.worst(tag, count=50)
    assert fps or fns
    for item in fps + fns:
        assert (tag in demo_labels(item.path)) == (item.kind == "fn")
        assert (item.probability >= threshold) == (item.kind == "fp")
        assert (tag in item.predicted_tags) == (item.kind == "fp") and (tag in item.true_tags) == (item.kind == "fn")
    assert [i.probability for i in fps] == sorted((i.probability for i in fps), reverse=True)
    assert [i.probability for i in fns] == sorted(i.probability for i in fns)
    j = data.predictions.tags.index(tag)
    wrong = int(((data.predictions.probs[:, j] >= threshold) != data.predictions.targets[:, j]).sum())
    assert len(fps) + len(fns) == min(wrong, 100) or len(fps) == 50 or len(fns) == 50
    assert "<svg" in data.curve(tag)
    searched = data.filtered_rows("shape", "all", "support, most first")
    assert searched and all("shape" in r["tag"] for r in searched)
    assert [r["support"] for r in searched] == sorted((r["support"] for r in searched), reverse=True)
    Image.open(io_png(data)).verify()


def io_png(data: object) -> Path:
    """Any image path of the evaluation (the kept predictions name real files)."""
    return Path(data.predictions.paths[0])  # type: ignore[attr-defined]


def test_validation_of_export_and_release_folders_on_data(
    run_copy: Path, trained_run: TrainedRun, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Any model plus --data: an ONNX export (evaluated through onnxruntime, as tag_images.py runs it) gives the
    checkpoint's own evaluation on the same data; a WD release folder is evaluated as published; neither is written into."""
    monkeypatch.chdir(tmp_path)  # a model folder's evaluation goes to eval/<folder name> where the page starts
    checkpoint = run_copy / "checkpoints" / "best"
    export_dir = tmp_path / "export"
    assert export_model.main(["--checkpoint", str(checkpoint), "--out", str(export_dir), "--num-workers", "0", "--no-calibration"]) == 0
    data_dir = str(trained_run.data)
    with pytest.raises(ValueError, match="--data"):
        prepare_validation(export_dir, num_workers=0)
    before = sorted(p.name for p in export_dir.iterdir())
    exported = prepare_validation(export_dir, data=data_dir, num_workers=0)
    assert exported.computed and exported.folder == Path("eval") / "export" and exported.name == "export"
    assert sorted(p.name for p in export_dir.iterdir()) == before

    reference = tmp_path / "ckpt_on_data"
    argv = ["--checkpoint", str(checkpoint), "--data", data_dir, "--out", str(reference), "--num-workers", "0", "--save-predictions"]
    assert validation_loop.main(argv) == 0
    raw = load_predictions(reference / PREDICTIONS_FILE)
    ours = exported.predictions
    assert ours.paths == raw.paths and len(ours.paths) == 600
    # the export's tags are the checkpoint's (no calibration): same columns in the WD order, same labels, probabilities to 1e-5
    order = [raw.tags.index(t) for t in ours.tags]
    assert sorted(ours.tags) == sorted(raw.tags) and np.array_equal(ours.targets, raw.targets[:, order])
    assert np.abs(ours.probs - raw.probs[:, order]).max() <= 1e-5
    assert np.array_equal(ours.rating_logits.argmax(1), raw.rating_logits.argmax(1))
    by_tag = {r["tag"]: r for r in csv.DictReader((reference / "per_tag.csv").open(encoding="utf-8"))}
    for row in exported.rows:
        assert row["support"] == int(by_tag[row["tag"]]["support"])
        assert row["ap"] == pytest.approx(float(by_tag[row["tag"]]["ap"]), abs=1e-3, nan_ok=True), row["tag"]
    # validation_loop.py takes the export folder with --data too, and refuses it without
    assert validation_loop.main(["--checkpoint", str(export_dir), "--data", data_dir, "--num-workers", "0", "--mode", "fast"]) == 0
    assert json.loads((tmp_path / "eval" / "export" / "metrics.json").read_text(encoding="utf-8"))["num_samples"] > 0
    assert validation_loop.main(["--checkpoint", str(export_dir), "--num-workers", "0"]) == 2

    # the page: a model folder without --data says why it has no Validation tab; with --data the kept evaluation is reused
    page, validations, notes = setup(parse_args([str(export_dir), "--num-workers", "0"]))
    assert not validations and any("--data" in note for note in notes)
    page, validations, notes = setup(parse_args([str(export_dir), "--data", data_dir, "--num-workers", "0"]))
    assert len(validations) == 1 and not validations[0].computed
    assert page.models["export"].thresholds_file == export_dir / "thresholds.json"  # the export's own, not the evaluation's
    (export_dir / "model.onnx").touch()  # exported again under the same name: evaluated again
    assert prepare_validation(export_dir, data=data_dir, num_workers=0).computed

    tags = sorted({t for p in raw.paths for t in demo_labels(p)})
    release = write_release(tmp_path / "wd-convnext-tagger-v3", "wd-convnext-tagger-v3", tags[:-2], tags[-2:])
    released = prepare_validation(release, data=data_dir, num_workers=0)
    assert released.computed and released.folder == Path("eval") / release.name
    assert released.predictions.tags == [*tags[:-2], *tags[-2:]] and released.metrics["num_samples"] == 600
