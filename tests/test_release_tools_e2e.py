"""Released WD v3 taggers and timm-family runs through the tools, end to end.

The releases are shrunk copies of the four WD v3 taggers (ViT, EVA02, SwinV2, ConvNeXt) built with timm
(tests/wd_release_helpers.py: the published config.json, random weights, a 9/0/4 selected_tags.csv);
the reference is the reference code's recipe (`timm.create_model("local-dir:...")`, white pad to a
square, bicubic resize, BGR, sigmoid). Training and the export run as processes; tag_images.py and
validation_loop.py run their commands' `main` in this process (the same code, no interpreter to
start). Checked:

- `tag_images.py --model RELEASE --json` gives the reference's probabilities within 1e-4, tags and
  ratings (a release's ratings are sigmoid outputs, as its reference code reads them);
- `validation_loop.py --checkpoint RELEASE --data DIR` evaluates the release, and says it needs
  --data without it;
- a run fine-tuned briefly from the EVA02 release (body and heads training) exports: onnxruntime
  against PyTorch within 1e-4 (the export's own check), the timm folder built by
  `timm.create_model("local-dir:...")` with the reference recipe gives the ONNX model's
  probabilities within 1e-5 (its ratings: a softmax of the four rating logits), and a model initialised from that export (--init-from's code) gives
  them again before any step;
- tag_images.py and validation_loop.py take the timm-family run's checkpoint.
"""

from __future__ import annotations

import json
import shutil
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from timm.data import create_transform, resolve_data_config

import tag_images
import validation_loop
from conftest import ROOT, run_cli
from dataset_scan import scan_dataset
from tagger_init import init_model_weights
from timm_tagger import TimmTagger
from vocabulary import TagVocabulary
from wd_format import LabelTable
from wd_release import read_release
from wd_release_helpers import _ensure_rgb, _pad_square, reference_probabilities, write_images, write_release

pytestmark = pytest.mark.e2e

RELEASES = {"vit": "wd-vit-tagger-v3", "eva02": "wd-eva02-large-tagger-v3", "swinv2": "wd-swinv2-tagger-v3", "convnext": "wd-convnext-tagger-v3"}
CHARACTER = ["star", "yellow"]  # demo tags put in the release's character block


@pytest.fixture(scope="module")
def work(tmp_path_factory: pytest.TempPathFactory, demo_data: Path) -> dict[str, Path]:
    """{"root", "images", "vit", "eva02"}: release folders on the demo data's tags, and a few odd images."""
    root = tmp_path_factory.mktemp("release_tools")
    counts = Counter(tag for record in scan_dataset(demo_data).records for tag in record.tags)
    tags = sorted(t for t, n in counts.items() if 20 <= n <= 400)
    assert set(CHARACTER) <= set(tags)
    general = [t for t in tags if t not in CHARACTER]
    out = {"root": root, "images": root / "images"}
    write_images(out["images"], 6)
    for family, name in RELEASES.items():
        out[family] = write_release(root / name, name, general, CHARACTER, seed=3)
    return out


def _tag_images_json(model: Path, images: Path, out: Path) -> dict[str, dict[str, float]]:
    """tag_images.py's command (its main, in this process: no second interpreter to start) with thresholds 0
    (every tag reported); returns image -> {tag: probability} from its --json file."""
    args = ["--model", str(model), "--input", str(images), "--json", str(out), "--overwrite"]
    args += ["--general-threshold", "0", "--character-threshold", "0", "--num-workers", "0", "--caption-extension", f".{out.stem}.txt"]
    assert tag_images.main(args) == 0
    results = json.loads(out.read_text(encoding="utf-8"))["images"]
    return {name: {**row["general"], **row["character"], **{f"rating:{k}": v for k, v in row["rating"].items()}} for name, row in results.items()}


def _max_diff(found: dict[str, dict[str, float]], folder: Path, reference: torch.Tensor, images: list[Path], ratings: str = "") -> float:
    """Largest |tool - reference| over every image and tag (the reference's columns in selected_tags.csv order), and over
    the four ratings when `ratings` says how the tool reads them from the reference's sigmoid outputs ("sigmoid": as
    they are, a release; "softmax": a softmax of their logits, our export)."""
    labels = LabelTable.read(folder / "selected_tags.csv")
    names = [*labels.general, *labels.character]
    assert sorted(found) == sorted(p.name for p in images)
    expected = reference[:, 4:].double()
    if ratings:
        names = [*(f"rating:{r}" for r in labels.ratings), *names]
        rating_probs = reference[:, :4].double()
        if ratings == "softmax":
            rating_probs = torch.softmax(torch.logit(rating_probs), dim=1)
        expected = torch.cat([rating_probs, expected], dim=1)
    worst = 0.0
    for i, path in enumerate(images):
        row = found[path.name]
        assert set(names) <= set(row) and len(row) == len(labels.names)
        ours = np.array([row[n] for n in names])
        worst = max(worst, float(np.abs(ours - expected[i].numpy()).max()))
    return worst


@pytest.mark.parametrize("family", list(RELEASES))
def test_tag_images_on_a_release_folder_gives_the_reference_recipes_probabilities(work: dict[str, Path], family: str) -> None:
    folder = work[family]
    images = sorted(work["images"].glob("*.png"))
    found = _tag_images_json(folder, work["images"], work["root"] / f"tags_{family}.json")
    diff = _max_diff(found, folder, reference_probabilities(folder, images), images, ratings="sigmoid")
    print(f"tag_images --model {RELEASES[family]} (shrunk) vs the reference recipe: max abs diff {diff:.3g}")
    assert diff < 1e-4


def test_validation_loop_evaluates_a_release_folder_with_data(work: dict[str, Path], demo_data: Path, capsys: pytest.CaptureFixture[str]) -> None:
    base = [str(ROOT / "validation_loop.py"), "--checkpoint", str(work["vit"]), "--num-workers", "0", "--batch-size", "64"]
    assert validation_loop.main(base[1:]) == 2  # in this process: the refusal comes before any data is read
    refused = capsys.readouterr().err
    assert "released WD tagger folder" in refused and "--data" in refused
    out = work["root"] / "eval_vit"
    proc = run_cli(base + ["--data", str(demo_data), "--out", str(out), "--mode", "fast", "--fast-batches", "2"], cwd=work["root"])
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    metrics = json.loads((out / "metrics.json").read_text(encoding="utf-8"))
    assert metrics["num_samples"] == 128 and metrics["step"] == 0 and 0.0 <= metrics["mAP"] <= 1.0


@pytest.fixture(scope="module")
def eva_run(work: dict[str, Path], demo_data: Path) -> Path:
    """A run fine-tuned from the EVA02 release for 6 steps (body and heads training): its run folder."""
    args = [str(ROOT / "train_direct.py"), "--config", str(ROOT / "configs" / "finetune.yaml"), "--init-from", str(work["eva02"])]
    overrides = [
        f"data.root={demo_data}",
        "output_root=runs",
        "experiment_name=eva",
        "data.num_workers=0",
        "data.batch_size=64",
        "data.val_fraction=0.2",
        "training.epochs=1",
        "training.freeze_body_steps=2",
        "training.body_lr_scale=1.0",
        "training.learning_rate=0.003",
        "training.warmup_steps=1",
        "training.memory_check=false",
        "monitor.console_interval_s=0",
        "monitor.system_stats_interval_s=0",
        "monitor.tensorboard=false",
    ]
    for o in overrides:
        args += ["--set", o]
    proc = run_cli(args, cwd=work["root"])
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return work["root"] / "runs" / "eva"


def test_a_finetuned_eva02_run_exports_to_folders_timm_and_init_from_agree_on(work: dict[str, Path], eva_run: Path) -> None:
    out = work["root"] / "export_eva"
    proc = run_cli(
        [str(ROOT / "export_model.py"), "--checkpoint", str(eva_run / "checkpoints" / "last"), "--out", str(out), "--num-workers", "0"],
        cwd=work["root"],
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads((out / "export_report.json").read_text(encoding="utf-8"))
    assert report["onnx_vs_pytorch"]["max_abs_diff"] <= 1e-4 and report["onnx_vs_pytorch"]["images"] > 0
    config = json.loads((out / "config.json").read_text(encoding="utf-8"))
    release = json.loads((work["eva02"] / "config.json").read_text(encoding="utf-8"))
    assert (config["architecture"], config["model_args"]) == (release["architecture"], release["model_args"])
    for key in ("input_size", "interpolation", "crop_pct", "mean", "std"):
        assert config["pretrained_cfg"][key] == release["pretrained_cfg"][key], key
    labels = LabelTable.read(out / "selected_tags.csv")
    assert config["num_classes"] == len(labels.names)

    images = sorted(work["images"].glob("*.png"))
    timm_probs = reference_probabilities(out, images)  # (N, 4 + T): timm local-dir, white pad, bicubic, BGR
    onnx = _tag_images_json(out, work["images"], work["root"] / "tags_export.json")  # model.onnx via onnxruntime
    onnx_diff = _max_diff(onnx, out, timm_probs, images, ratings="softmax")
    print(f"export: onnxruntime vs PyTorch {report['onnx_vs_pytorch']['max_abs_diff']:.3g}; tag_images (onnx) vs timm local-dir {onnx_diff:.3g}")
    assert onnx_diff < 1e-5

    # --init-from the export: the new run's model before any step gives the export's probabilities again
    names = [*labels.general, *labels.character]
    vocab = TagVocabulary(names, tag_categories={n: "character" for n in labels.character})
    model = TimmTagger(read_release(out).tagger_config()).eval()
    init_model_weights(model, vocab, out)
    batch = torch.stack([_reference_pixels(out, p) for p in images])  # (N, 3, S, S) normalised RGB
    with torch.no_grad():
        tags = torch.sigmoid(model(batch)["tag_logits"])  # (N, T) in selected_tags.csv order
    init_diff = float((tags - timm_probs[:, 4:]).abs().max())
    print(f"--init-from the export vs timm local-dir: max abs diff {init_diff:.3g}")
    assert init_diff < 1e-5


def _reference_pixels(folder: Path, path: Path) -> torch.Tensor:
    """The reference recipe's normalised RGB tensor (3, S, S) of one image (before its BGR flip)."""
    model_cfg = json.loads((folder / "config.json").read_text(encoding="utf-8"))["pretrained_cfg"]
    transform = create_transform(**resolve_data_config(model_cfg))
    return transform(_pad_square(_ensure_rgb(Image.open(path))))


def test_tag_images_and_validation_loop_take_a_timm_family_checkpoint(work: dict[str, Path], eva_run: Path) -> None:
    checkpoint = eva_run / "checkpoints" / "last"
    found = _tag_images_json(checkpoint, work["images"], work["root"] / "tags_ckpt.json")
    assert len(found) == 6 and all(0.0 <= v <= 1.0 for row in found.values() for v in row.values())
    out = work["root"] / "eval_eva"
    assert validation_loop.main(["--checkpoint", str(checkpoint), "--out", str(out), "--num-workers", "0"]) == 0
    assert json.loads((out / "metrics.json").read_text(encoding="utf-8"))["num_samples"] > 0
    shutil.rmtree(out)
