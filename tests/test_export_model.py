"""Tests for export_model and the modules behind it (wd_model, timm_layout, export_calibration, export_card).

References: the checkpoint's own SimplifiedTagger (logits put in CSV order by tag name, shifted by
the reported calibration), onnxruntime, timm, validation_loop.py's CLI, and brute-force F1 in numpy.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import timm
import torch

from checkpoint_eval import LoadedCheckpoint
from conftest import ROOT, TrainedRun, run_cli
from evaluation_metrics import MetricComputer
from export_calibration import ExportMetrics, fit_calibration
from export_model import export_onnx
from image_preprocess import PreprocessParams, load_image, normalize_images
from model_architecture import SimplifiedTagger, VisionTransformerConfig
from timm_layout import (
    ratings_are_softmax,
    read_timm_folder,
    timm_config,
    timm_family_config,
    timm_family_state_dict,
    timm_state_dict,
    write_timm_folder,
)
from timm_tagger import TimmTagger, TimmTaggerConfig
from vocabulary import TagVocabulary
from wd_export_helpers import (
    CHARACTER_TAGS,
    Validation,
    characterised_checkpoint,
    export,
    load,
    onnx_probabilities,
    read_csv_rows,
    reference_logits,
    reference_probabilities,
    validation_images,
)
from wd_format import RATING_NAMES, rgb_to_wd_input
from wd_model import WDTagger, fused_head, plan_outputs, resized_tagger
from wd_release import read_release
from wd_release_helpers import SHRINK, release_config, write_release


@dataclass
class Exported:
    """An export of the trained run's best checkpoint (with CHARACTER_TAGS as characters)."""

    checkpoint: Path
    out: Path
    stdout: str
    ck: LoadedCheckpoint
    report: dict
    names: list[str]
    val: Validation


@pytest.fixture(scope="module")
def exported(trained_run: TrainedRun, tmp_path_factory: pytest.TempPathFactory) -> Exported:
    """export_model.py run once on the trained run."""
    base = tmp_path_factory.mktemp("export")
    checkpoint = characterised_checkpoint(trained_run, base / "run")
    out = base / "wd"
    proc = export(checkpoint, out)
    ck = load(checkpoint)
    report = json.loads((out / "export_report.json").read_text(encoding="utf-8"))
    names = [row[1] for row in read_csv_rows(out / "selected_tags.csv")[1:]]
    return Exported(checkpoint, out, proc.stdout, ck, report, names, validation_images(ck))


# ---------------------------------------------------------------------------------------------- end to end


@pytest.mark.e2e
def test_onnx_probabilities_equal_pytorch_on_validation_images(exported: Exported) -> None:
    onnx = onnx_probabilities(exported.out, exported.val.images)
    reference = reference_probabilities(reference_logits(exported.ck, exported.names, exported.report["logit_shifts"], exported.val.images))
    assert onnx.shape == (len(exported.val.paths), len(exported.names))
    assert np.abs(onnx - reference).max() <= 1e-4
    # The export checked itself the same way and printed the figure.
    assert "onnxruntime vs PyTorch: max abs diff" in exported.stdout
    check = exported.report["onnx_vs_pytorch"]
    assert check["images"] == min(64, len(exported.val.paths)) and check["max_abs_diff"] <= 1e-4  # --verify-images 64 by default


@pytest.mark.e2e
def test_batch_sizes_one_and_seven_give_the_same_rows(exported: Exported) -> None:
    images = exported.val.images[:14]
    one = onnx_probabilities(exported.out, images, batch_size=1)
    seven = onnx_probabilities(exported.out, images, batch_size=7)
    np.testing.assert_allclose(one, seven, rtol=0, atol=1e-6)


@pytest.mark.e2e
def test_selected_tags_csv_is_what_kohya_expects(exported: Exported) -> None:
    rows = read_csv_rows(exported.out / "selected_tags.csv")
    assert rows[0] == ["tag_id", "name", "category", "count"]
    codes = [int(r[2]) for r in rows[1:]]
    assert set(codes) <= {9, 0, 4}
    assert codes == sorted(codes, key=[9, 0, 4].index)  # ratings, then general, then character
    assert [r[1] for r in rows[1:5]] == list(RATING_NAMES) and codes[:4] == [9] * 4
    vocab = exported.ck.vocab
    character = [r[1] for r in rows[1:] if r[2] == "4"]
    general = [r[1] for r in rows[1:] if r[2] == "0"]
    assert character == [t for t in vocab.index_to_tag if t in CHARACTER_TAGS]
    assert general == [t for t in vocab.index_to_tag if t not in CHARACTER_TAGS]  # the meta tag "text" included
    assert vocab.tag_categories["text"] == "meta" and "text" in general
    assert [int(r[3]) for r in rows[5:]] == [vocab.tag_frequencies[r[1]] for r in rows[5:]]
    assert [int(r[0]) for r in rows[1:]] == list(range(len(rows) - 1))
    session = ort.InferenceSession(str(exported.out / "model.onnx"), providers=["CPUExecutionProvider"])
    size = exported.ck.preprocess.image_size
    (node,) = session.get_inputs()
    assert node.type == "tensor(float)" and node.shape[1:] == [size, size, 3] and isinstance(node.shape[0], str)
    (output,) = session.get_outputs()
    assert output.shape[1] == len(rows) - 1


@pytest.mark.e2e
def test_timm_builds_the_export_with_equal_outputs(exported: Exported) -> None:
    config = json.loads((exported.out / "config.json").read_text(encoding="utf-8"))
    by_folder = timm.create_model(f"local-dir:{exported.out}", pretrained=True).eval()
    n = config["num_classes"]
    by_file = timm.create_model(
        config["architecture"],
        pretrained=True,
        num_classes=n,
        **config["model_args"],
        pretrained_cfg_overlay={"file": str(exported.out / "model.safetensors"), "num_classes": n},
    ).eval()
    ck = exported.ck
    images = torch.from_numpy(exported.val.images[:16]).permute(0, 3, 1, 2)
    x = normalize_images(images, ck.preprocess.mean, ck.preprocess.std)[:, [2, 1, 0]]  # BGR, as WD v3 timm models
    reference = reference_logits(ck, exported.names, exported.report["logit_shifts"], exported.val.images[:16])
    with torch.no_grad():
        for model in (by_folder, by_file):
            np.testing.assert_allclose(model(x).double().numpy(), reference, rtol=0, atol=1e-5)
    assert config["label_names"] == exported.names
    assert by_folder.pretrained_cfg["input_size"] == (3, ck.preprocess.image_size, ck.preprocess.image_size)


def _best_f1_threshold(scores: np.ndarray, positive: np.ndarray) -> float:
    """The threshold (one of the positives' scores, or above every score) with the highest F1 for one tag."""
    if not positive.any():
        return math.inf
    best, best_f1 = math.inf, -1.0
    for t in np.unique(scores[positive]):
        predicted = scores >= t
        f1 = 2 * (predicted & positive).sum() / (predicted.sum() + positive.sum())
        if f1 > best_f1:
            best, best_f1 = float(t), f1
    return best


def _micro_f1(probs: np.ndarray, targets: np.ndarray, thresholds: np.ndarray) -> float:
    """Exact micro-F1 of probs (N, T) against 0/1 targets at per-tag thresholds (T,)."""
    predicted = probs >= thresholds[None, :]
    tp = (predicted & targets).sum()
    return float(2 * tp / (predicted.sum() + targets.sum()))


@pytest.mark.e2e
def test_exported_model_keeps_map_and_consumer_thresholds_reach_tuned_f1(exported: Exported, tmp_path: Path) -> None:
    proc = run_cli(
        [str(ROOT / "validation_loop.py"), "--checkpoint", str(exported.checkpoint), "--out", str(tmp_path / "eval"), "--num-workers", "0"],
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    checkpoint_map = json.loads((tmp_path / "eval" / "metrics.json").read_text(encoding="utf-8"))["mAP"]
    probs = onnx_probabilities(exported.out, exported.val.images)[:, 4:]  # (N, T)
    names = exported.names[4:]
    targets = np.array([[name in tags for name in names] for tags in exported.val.tags])  # (N, T) bool
    computer = MetricComputer(len(names))
    computer.update(torch.from_numpy(probs), torch.from_numpy(targets.astype(np.float32)))
    assert abs(computer.compute()["mAP"] - checkpoint_map) <= 0.005
    cuts = np.array([0.85 if n in CHARACTER_TAGS else 0.35 for n in names])
    tuned = np.array([_best_f1_threshold(probs[:, i], targets[:, i]) for i in range(len(names))])
    at_cuts, at_tuned = _micro_f1(probs, targets, cuts), _micro_f1(probs, targets, tuned)
    assert abs(at_cuts - at_tuned) <= 0.02, (at_cuts, at_tuned)
    reported = exported.report["exported"]["at_consumer_thresholds"]["all"]["f1"]
    assert reported == pytest.approx(at_cuts, abs=1e-9)  # the card's number is the exact one


@pytest.mark.e2e
def test_model_card_and_thresholds_describe_the_export(exported: Exported) -> None:
    card = (exported.out / "README.md").read_text(encoding="utf-8")
    for needle in (
        "## Calibration",
        "shift_t = ",
        "## Preprocessing",
        "BGR",
        "## Validation metrics",
        f"{exported.report['exported']['mAP']:.4f}",
        "local-dir:",
    ):
        assert needle in card, needle
    thresholds = json.loads((exported.out / "thresholds.json").read_text(encoding="utf-8"))
    assert list(thresholds["per_tag"]) == exported.names[4:]
    assert all(v is None or 0.0 <= v <= 1.0 for v in thresholds["per_tag"].values())
    assert set(thresholds["per_category"]) == {"general", "character"}
    assert thresholds["consumer_defaults"] == {"general": 0.35, "character": 0.85}


@pytest.mark.e2e
def test_export_at_another_image_size(exported: Exported, tmp_path: Path) -> None:
    out = tmp_path / "wd48"
    export(exported.checkpoint, out, "--image-size", "48", "--verify-images", "8", "--no-calibration")
    ck = exported.ck
    params = dataclasses.replace(ck.preprocess, image_size=48)
    images = np.stack([load_image(p, params) for p in exported.val.paths[:8]])
    onnx = onnx_probabilities(out, images)
    assert onnx.shape[1] == len(exported.names)
    # Our model resamples its position embedding at run time for any grid: the reference at 48 px.
    reference = reference_probabilities(reference_logits(ck, exported.names, dict.fromkeys(exported.names, 0.0), images))
    assert np.abs(onnx - reference).max() <= 1e-4
    card = (out / "README.md").read_text(encoding="utf-8")
    assert "resampled from the training size" in card and "None (`--no-calibration`)" in card


@pytest.mark.e2e
def test_export_that_would_not_fit_in_memory_is_refused_naming_the_flag(exported: Exported, tmp_path: Path) -> None:
    base = [str(ROOT / "export_model.py"), "--checkpoint", str(exported.checkpoint), "--out", str(tmp_path / "x"), "--image-size", "448"]
    proc = run_cli([*base, "--batch-size", "100000"], cwd=tmp_path)
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-2000:]
    suggested = re.search(r"use --batch-size (\d+) or lower", proc.stderr)
    assert suggested and 1 <= int(suggested.group(1)) < 100000, proc.stderr
    proc = run_cli([*base, "--memory-limit", "0.1"], cwd=tmp_path)
    assert proc.returncode == 2 and "100 MB can be used" in proc.stderr, proc.stderr
    assert "more free memory, or raise --memory-limit" in proc.stderr, proc.stderr  # not even the weights fit in 0.1 GB
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # refused before anything was written


@pytest.mark.e2e
def test_export_rejects_an_unknown_category(exported: Exported, tmp_path: Path) -> None:
    proc = run_cli(
        [str(ROOT / "export_model.py"), "--checkpoint", str(exported.checkpoint), "--out", str(tmp_path / "x"), "--categories", "general,species"],
        cwd=tmp_path,
    )
    assert proc.returncode == 2 and "species" in proc.stderr


# ---------------------------------------------------------------------------------------------- units


def _tiny_model(num_tags: int = 6, pooling: str = "cls", seed: int = 0) -> SimplifiedTagger:
    torch.manual_seed(seed)
    cfg = VisionTransformerConfig(
        image_size=32,
        patch_size=8,
        num_tags=num_tags,
        embed_dim=32,
        depth=2,
        num_heads=2,
        pooling=pooling,
        layer_scale_init=0.5 if pooling == "avg" else None,
    )
    model = SimplifiedTagger(cfg).eval()
    with torch.no_grad():  # non-trivial heads, so a wrong row or order shows
        model.tag_head.bias.normal_()
        model.rating_head.bias.normal_()
    return model


def _vocab() -> TagVocabulary:
    tags = ["hero", "sky", "tree", "brand", "villain", "mystery"]
    categories = {"hero": "character", "sky": "general", "tree": "general", "brand": "copyright", "villain": "character", "mystery": ""}
    return TagVocabulary(tags, {t: 10 - i for i, t in enumerate(tags)}, categories)


def test_plan_orders_general_block_then_characters_and_drops_categories() -> None:
    plan = plan_outputs(_vocab())
    assert plan.labels.general == ("sky", "tree", "brand", "mystery")
    assert plan.labels.character == ("hero", "villain")
    assert plan.columns == (1, 2, 3, 5, 0, 4)
    narrow = plan_outputs(_vocab(), ["general", "character"])
    assert narrow.dropped == ("brand",) and "mystery" in narrow.labels.general
    with pytest.raises(ValueError, match="species"):
        plan_outputs(_vocab(), ["species"])


@pytest.mark.parametrize("pooling", ["cls", "avg"])
def test_wdtagger_on_bgr_input_equals_the_model(pooling: str) -> None:
    model = _tiny_model(pooling=pooling)
    plan = plan_outputs(_vocab())
    shift = torch.linspace(-1, 1, len(plan.columns))
    wd = WDTagger(model, fused_head(model, plan, shift), (0.4, 0.5, 0.6), (0.2, 0.25, 0.3)).eval()
    rgb = np.random.default_rng(0).integers(0, 256, (3, 32, 32, 3), dtype=np.uint8)
    with torch.no_grad():
        out = model(normalize_images(torch.from_numpy(rgb).permute(0, 3, 1, 2), (0.4, 0.5, 0.6), (0.2, 0.25, 0.3)))
        got = wd(torch.from_numpy(rgb_to_wd_input(rgb)))
    expected = torch.cat([out["rating_logits"].softmax(1), torch.sigmoid(out["tag_logits"][:, list(plan.columns)] + shift)], dim=1)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-6)


def test_onnx_export_of_a_random_model_matches_and_batches(tmp_path: Path) -> None:
    model = resized_tagger(_tiny_model(pooling="avg"), 48)  # position embedding resampled to a 6x6 grid
    plan = plan_outputs(_vocab())
    wd = WDTagger(model, fused_head(model, plan), (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)).eval()
    export_onnx(wd, tmp_path / "model.onnx")
    session = ort.InferenceSession(str(tmp_path / "model.onnx"), providers=["CPUExecutionProvider"])
    x = torch.rand(7, 48, 48, 3) * 255
    with torch.no_grad():
        expected = wd(x).numpy()
    got7 = session.run(None, {"input": x.numpy()})[0]
    got1 = np.concatenate([session.run(None, {"input": x[i : i + 1].numpy()})[0] for i in range(7)])
    np.testing.assert_allclose(got7, expected, rtol=0, atol=1e-5)
    np.testing.assert_allclose(got1, got7, rtol=0, atol=1e-6)


def test_timm_folder_round_trip_and_refusals(tmp_path: Path) -> None:
    model = _tiny_model(pooling="avg")
    plan = plan_outputs(_vocab())
    head = fused_head(model, plan)
    write_timm_folder(tmp_path, timm_config(model.cfg, plan.labels.names, (0.5,) * 3, (0.5,) * 3), timm_state_dict(model, head))
    back = read_timm_folder(tmp_path)
    assert back.cfg.pooling == "avg" and back.cfg.layer_scale_init is not None
    for key, value in model.backbone_state_dict().items():
        torch.testing.assert_close(back.backbone[key], value, rtol=0, atol=0)  # the BGR flip undone exactly
    torch.testing.assert_close(back.head_weight, head.weight.detach(), rtol=0, atol=0)
    config = json.loads((tmp_path / "config.json").read_text(encoding="utf-8"))
    for change, needle in (({"class_token": False}, "class_token"), ({"act_layer": "gelu_tanh"}, "act_layer"), ({"fc_norm": None}, "fc_norm")):
        bad = dict(config, model_args={**config["model_args"], **change})
        (tmp_path / "config.json").write_text(json.dumps(bad), encoding="utf-8")
        with pytest.raises(ValueError, match=needle):
            read_timm_folder(tmp_path)


def _synthetic_computer(num_tags: int, seed: int = 0) -> tuple[MetricComputer, np.ndarray, np.ndarray]:
    """Scores of tags whose positives sit higher than their negatives, as logits; probs and targets."""
    rng = np.random.default_rng(seed)
    targets = rng.random((4000, num_tags)) < np.linspace(0.05, 0.4, num_tags)
    logits = rng.normal(0.0, 1.0, targets.shape) + np.where(targets, 2.5, 0.5)  # over-confident, like ASL
    probs = 1.0 / (1.0 + np.exp(-logits))
    computer = MetricComputer(num_tags)
    computer.update(torch.from_numpy(probs).float(), torch.from_numpy(targets.astype(np.float32)))
    return computer, logits, targets


def test_calibration_puts_each_tags_f1_point_on_the_consumer_threshold() -> None:
    vocab = _vocab()
    plan = plan_outputs(vocab)
    computer, logits, targets = _synthetic_computer(len(vocab))
    calibration = fit_calibration(computer, plan, prior=0.0)
    shifted = logits[:, list(plan.columns)] + calibration.shifts.double().numpy()
    probs = 1.0 / (1.0 + np.exp(-shifted))
    targets = targets[:, list(plan.columns)]
    for i, name in enumerate(plan.labels.names[4:]):
        target = 0.85 if name in plan.labels.character else 0.35
        scores, positive = probs[:, i], targets[:, i]
        best = _best_f1_threshold(scores, positive)
        f1_best = _micro_f1(scores[:, None], positive[:, None], np.array([best]))
        f1_target = _micro_f1(scores[:, None], positive[:, None], np.array([target]))
        # At the consumer threshold each tag reaches its best F1 (up to the metric's bin width).
        assert f1_target >= f1_best - 0.003, (name, f1_target, f1_best)
        f1_uncalibrated = _micro_f1(1 / (1 + np.exp(-logits[:, [plan.columns[i]]])), positive[:, None], np.array([target]))
        assert f1_target > f1_uncalibrated  # and the raw, over-confident scores would not
    # A huge prior puts every tag on its block's shift.
    pooled = fit_calibration(computer, plan, prior=1e12)
    general = pooled.shifts[: len(plan.labels.general)]
    assert torch.allclose(general, general[0].expand_as(general), atol=1e-6)
    assert pooled.block_shifts["general"] == pytest.approx(float(general[0]), abs=1e-6)


def test_export_metrics_count_exactly_at_the_consumer_thresholds() -> None:
    vocab = _vocab()
    plan = plan_outputs(vocab)
    rng = np.random.default_rng(3)
    probs = rng.random((50, 4 + len(plan.columns))).astype(np.float32)
    targets = (rng.random((50, len(vocab))) < 0.3).astype(np.float32)  # vocabulary order
    metrics = ExportMetrics(plan, {"general": 0.35, "character": 0.85})
    metrics.update(torch.from_numpy(probs), torch.from_numpy(targets), torch.full((50,), -1))
    result = metrics.compute()
    ordered = targets[:, list(plan.columns)] > 0.5
    cuts = np.array([0.35] * len(plan.labels.general) + [0.85] * len(plan.labels.character))
    assert result["at_consumer_thresholds"]["all"]["f1"] == pytest.approx(_micro_f1(probs[:, 4:], ordered, cuts))
    tuned = np.array([_best_f1_threshold(probs[:, 4 + i], ordered[:, i]) for i in range(len(plan.columns))])
    # Histogram bins are ~0.002 wide near 0.5: the tuned F1 is the exact one to within a tie or two.
    assert result["f1_micro_tuned_per_tag"] == pytest.approx(_micro_f1(probs[:, 4:], ordered, tuned), abs=0.02)


@pytest.mark.parametrize("name", list(SHRINK))
def test_every_released_family_exports_to_onnx_and_a_timm_folder_that_agree(tmp_path: Path, name: str) -> None:
    """A TimmTagger of each WD v3 release's architecture (shrunk, BGR like the release) through the export's graph:
    onnxruntime equals PyTorch, timm.create_model("local-dir:...") on the BGR image gives the fused head's logits,
    and the folder is recognised as ours (its ratings read with a softmax, where a release's are sigmoid outputs)."""
    config = release_config(name, 9, shrink=True)
    size = config["pretrained_cfg"]["input_size"][1]
    torch.manual_seed(0)
    cfg = TimmTaggerConfig(config["architecture"], config["model_args"], 5, 4, size, "bgr")
    model = TimmTagger(cfg).eval()
    plan = plan_outputs(TagVocabulary([f"t{i}" for i in range(5)], tag_categories={"t4": "character"}))
    wd = WDTagger(model, fused_head(model, plan), (0.5,) * 3, (0.5,) * 3).eval()
    export_onnx(wd, tmp_path / "model.onnx")
    session = ort.InferenceSession(str(tmp_path / "model.onnx"), providers=["CPUExecutionProvider"])
    x = torch.rand(3, size, size, 3) * 255  # WD input: BGR 0..255
    with torch.no_grad():
        expected = wd(x).numpy()
    np.testing.assert_allclose(session.run(None, {"input": x.numpy()})[0], expected, rtol=0, atol=1e-5)
    preprocess = PreprocessParams(size, layout="pad_then_resize")
    write_timm_folder(tmp_path, timm_family_config(model, plan.labels.names, preprocess), timm_family_state_dict(model, wd.head))
    built = timm.create_model(f"local-dir:{tmp_path}", pretrained=True).eval()
    rgb = torch.randn(2, 3, size, size)  # normalised RGB
    with torch.no_grad():
        torch.testing.assert_close(built(rgb[:, [2, 1, 0]]), wd.logits_from_normalized(rgb), rtol=0, atol=1e-5)
    assert ratings_are_softmax(tmp_path)
    release = write_release(tmp_path / "release", name, ["a", "b"], ["c"])
    assert not ratings_are_softmax(release)


@pytest.mark.parametrize("name", list(SHRINK))
def test_every_released_family_exports_at_another_size_as_timm_loads_it_there(tmp_path: Path, name: str) -> None:
    """--image-size for a timm-family run: resized_tagger rebuilds the model at the new size through timm's checkpoint
    filter; timm itself, asked for the trained folder at that size (`img_size=`), gives the same logits, the ONNX graph
    the same probabilities, and the resized model's own timm folder loads at its size unchanged."""
    config = release_config(name, 9, shrink=True)
    size = config["pretrained_cfg"]["input_size"][1]
    new = size + 32
    torch.manual_seed(1)
    model = TimmTagger(TimmTaggerConfig(config["architecture"], config["model_args"], 5, 4, size, "bgr")).eval()
    plan = plan_outputs(TagVocabulary([f"t{i}" for i in range(5)], tag_categories={"t4": "character"}))
    trained = tmp_path / "trained"
    write_timm_folder(
        trained, timm_family_config(model, plan.labels.names, PreprocessParams(size)), timm_family_state_dict(model, fused_head(model, plan))
    )
    resized = resized_tagger(model, new)
    assert resized.cfg.image_size == new and model.cfg.image_size == size
    wd = WDTagger(resized, fused_head(resized, plan), (0.5,) * 3, (0.5,) * 3).eval()
    size_args = {"img_size": new} if "img_size" in config["model_args"] else {}
    timm_at_new = timm.create_model(f"local-dir:{trained}", pretrained=True, **size_args).eval()
    rgb = torch.randn(2, 3, new, new)  # normalised RGB
    with torch.no_grad():
        ours = wd.logits_from_normalized(rgb)
        torch.testing.assert_close(timm_at_new(rgb[:, [2, 1, 0]]), ours, rtol=0, atol=1e-5)
    export_onnx(wd, tmp_path / "model.onnx")
    session = ort.InferenceSession(str(tmp_path / "model.onnx"), providers=["CPUExecutionProvider"])
    x = torch.rand(2, new, new, 3) * 255
    with torch.no_grad():
        np.testing.assert_allclose(session.run(None, {"input": x.numpy()})[0], wd(x).numpy(), rtol=0, atol=1e-5)
    folder = tmp_path / "resized"
    write_timm_folder(folder, timm_family_config(resized, plan.labels.names, PreprocessParams(new)), timm_family_state_dict(resized, wd.head))
    assert json.loads((folder / "config.json").read_text(encoding="utf-8"))["pretrained_cfg"]["input_size"] == [3, new, new]
    with torch.no_grad():
        torch.testing.assert_close(timm.create_model(f"local-dir:{folder}", pretrained=True).eval()(rgb[:, [2, 1, 0]]), ours, rtol=0, atol=1e-5)


@pytest.mark.parametrize("channels", ["rgb", "bgr"])
def test_a_timm_family_model_is_written_as_timm_builds_it_taking_bgr(tmp_path: Path, channels: str) -> None:
    """timm_family_config/state_dict of a TimmTagger (RGB from scratch, or BGR like a release): timm.create_model("local-dir:...")
    on the BGR image gives the fused head's logits of our model on the RGB image; wd_release reads the folder back."""
    torch.manual_seed(0)
    cfg = TimmTaggerConfig("vit_base_patch16_224", {"img_size": 32, "patch_size": 8, "embed_dim": 32, "depth": 1, "num_heads": 2}, 5, 4, 32, channels)
    model = TimmTagger(cfg).eval()
    vocab = TagVocabulary([f"t{i}" for i in range(5)], tag_categories={"t4": "character"})
    plan = plan_outputs(vocab)
    wd = WDTagger(model, fused_head(model, plan), (0.5,) * 3, (0.5,) * 3).eval()
    preprocess = PreprocessParams(32, layout="pad_then_resize")
    write_timm_folder(tmp_path, timm_family_config(model, plan.labels.names, preprocess), timm_family_state_dict(model, wd.head))
    (tmp_path / "selected_tags.csv").write_text(plan.labels.to_csv_text(), encoding="utf-8")
    config = json.loads((tmp_path / "config.json").read_text(encoding="utf-8"))
    assert (config["architecture"], config["model_args"], config["num_classes"]) == (cfg.architecture, cfg.model_args, 9)
    assert config["pretrained_cfg"]["input_size"] == [3, 32, 32] and config["pretrained_cfg"]["interpolation"] == "bicubic"
    built = timm.create_model(f"local-dir:{tmp_path}", pretrained=True).eval()
    rgb = torch.randn(3, 3, 32, 32)  # normalised RGB
    with torch.no_grad():
        ours = wd.logits_from_normalized(rgb)  # (3, 9)
        theirs = built(rgb[:, [2, 1, 0]])  # the released models' BGR input
        back = read_release(tmp_path).build_model()(rgb)
    assert torch.allclose(ours, theirs, atol=1e-5)
    assert torch.allclose(back["tag_logits"], ours[:, 4:], atol=1e-5) and torch.allclose(back["rating_logits"], ours[:, :4], atol=1e-5)
