"""Helpers shared by the export, tagging, kohya-reader and tagger-init tests.

They build references that do not go through the code under test's graph: the checkpoint's own
`SimplifiedTagger` run on `normalize_images` of the validation images, its logits put in
selected_tags.csv order by tag name and shifted by the export's reported calibration.
"""

from __future__ import annotations

import csv
import json
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch

from checkpoint_eval import LoadedCheckpoint, load_checkpoint_for_eval
from conftest import ROOT, TrainedRun, run_cli
from data_setup import prepare_eval_data
from image_preprocess import load_image, normalize_images

# Tags of the demo vocabulary re-labelled as characters, so the character block is exercised.
CHARACTER_TAGS = ("red", "blue", "green")


def characterised_checkpoint(run: TrainedRun, dest: Path) -> Path:
    """A copy of the run's best checkpoint whose vocabulary calls CHARACTER_TAGS characters."""
    best = run.run_dir / "checkpoints" / (run.run_dir / "checkpoints" / "best").read_text(encoding="utf-8").strip()
    folder = dest / "checkpoints" / best.name
    shutil.copytree(best, folder)
    vocab_path = folder / "vocabulary.json"
    data = json.loads(vocab_path.read_text(encoding="utf-8"))
    for tag in CHARACTER_TAGS:
        assert tag in data["tag_categories"], tag
        data["tag_categories"][tag] = "character"
    vocab_path.write_text(json.dumps(data), encoding="utf-8")
    return folder


def export(checkpoint: Path, out: Path, *extra: str) -> subprocess.CompletedProcess:
    """Run export_model.py as a user would; asserts it succeeded."""
    proc = run_cli([str(ROOT / "export_model.py"), "--checkpoint", str(checkpoint), "--out", str(out), "--num-workers", "0", *extra], cwd=out.parent)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def read_csv_rows(path: Path) -> list[list[str]]:
    """selected_tags.csv as the csv module reads it (header included)."""
    with open(path, encoding="utf-8", newline="") as handle:
        return list(csv.reader(handle))


@dataclass
class Validation:
    """The checkpoint's validation images at the export size, with labels."""

    paths: list[str]
    images: np.ndarray  # (N, S, S, 3) uint8 RGB, letterboxed as in training
    tags: list[tuple[str, ...]]
    ratings: np.ndarray  # (N,) int, -1 unknown


def validation_images(ck: LoadedCheckpoint) -> Validation:
    """The run's validation split (as validation_loop computes it), loaded with the checkpoint's preprocessing."""
    data = prepare_eval_data(ck.cfg, ck.vocab, ck.preprocess, log=None)
    records = data.val_records
    images = np.stack([load_image(r.image_path, ck.preprocess) for r in records])
    return Validation([r.image_path for r in records], images, [tuple(r.tags) for r in records], np.asarray([r.rating for r in records]))


def load(checkpoint: Path) -> LoadedCheckpoint:
    """The checkpoint on the CPU, eval mode."""
    ck = load_checkpoint_for_eval(checkpoint, torch.device("cpu"))
    ck.model.eval()
    return ck


def reference_logits(ck: LoadedCheckpoint, names: list[str], shifts: dict[str, float], images: np.ndarray) -> np.ndarray:
    """(N, 4 + T) logits in `names` order (4 ratings first): the checkpoint's heads, tags shifted by name."""
    batch = torch.from_numpy(images).permute(0, 3, 1, 2)  # (N, 3, S, S) uint8
    with torch.no_grad():
        out = ck.model(normalize_images(batch, ck.preprocess.mean, ck.preprocess.std))
    columns = [ck.vocab.tag_to_index[n] for n in names[4:]]
    tags = out["tag_logits"][:, columns].double() + torch.tensor([shifts[n] for n in names[4:]], dtype=torch.float64)
    return torch.cat([out["rating_logits"].double(), tags], dim=1).numpy()


def reference_probabilities(logits: np.ndarray) -> np.ndarray:
    """Softmax over the first 4 columns, sigmoid over the rest."""
    ratings = np.exp(logits[:, :4] - logits[:, :4].max(axis=1, keepdims=True))
    ratings /= ratings.sum(axis=1, keepdims=True)
    return np.concatenate([ratings, 1.0 / (1.0 + np.exp(-logits[:, 4:]))], axis=1)


def onnx_probabilities(folder: Path, images_rgb: np.ndarray, batch_size: int = 64) -> np.ndarray:
    """model.onnx on RGB uint8 images (N, S, S, 3), fed as the contract says: NHWC float32 BGR 0..255."""
    session = ort.InferenceSession(str(folder / "model.onnx"), providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    bgr = images_rgb[..., ::-1].astype(np.float32)
    rows = [session.run(None, {name: bgr[i : i + batch_size]})[0] for i in range(0, len(bgr), batch_size)]
    return np.concatenate(rows)
