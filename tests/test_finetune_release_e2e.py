"""Fine-tuning a released tagger with train_direct.py --init-from EXPORT_FOLDER, end to end.

The release is export_model.py's output for the session's trained run. The new dataset is the same
images with two tags taken away (`red`, `blue`) and three added (`crimson` and `azure` on the same
images, `round_shape` next to `circle`), so the new tags are learnable from what the release already
sees. The run's report counts are checked exactly, and after a short fine-tune each new tag's
validation AP must be above its frequency (what a tag the model cannot see would score), and the
added twin of `circle` must score about what `circle` (a kept row) scores.
"""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import pytest

from conftest import ROOT, TINY_RUN, TrainedRun, run_cli
from dataset_scan import scan_dataset
from wd_export_helpers import export

pytestmark = pytest.mark.e2e

RENAMED = {"red": "crimson", "blue": "azure"}
ADDED_NEXT_TO = {"circle": "round_shape"}
NEW_TAGS = ("crimson", "azure", "round_shape")


def _relabelled_dataset(source: Path, dest: Path) -> None:
    """Copy every usable image of `source` with a sidecar whose tags are renamed and added as above."""
    scan = scan_dataset(source)
    assert scan.records, "the demo data scanned to nothing"
    for record in scan.records:
        image = Path(record.image_path)
        rel = image.relative_to(source)
        target = dest / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(image, target)
        tags = [RENAMED.get(t, t) for t in record.tags]
        tags += [ADDED_NEXT_TO[t] for t in record.tags if t in ADDED_NEXT_TO]
        sidecar: dict[str, object] = {"tags": tags}
        if record.rating >= 0:
            sidecar["rating"] = int(record.rating)
        Path(f"{target}.json").write_text(json.dumps(sidecar), encoding="utf-8")


def _train(work: Path, data: Path, release: Path, name: str, *extra: str) -> str:
    """train_direct.py --init-from the release on `data`; returns stdout (asserts success)."""
    args = [str(ROOT / "train_direct.py"), "--config", str(ROOT / "configs" / "demo.yaml"), "--init-from", str(release)]
    for o in [*TINY_RUN, f"data.root={data}", "output_root=runs", f"experiment_name={name}", *extra]:
        args += ["--set", o]
    proc = run_cli(args, cwd=work)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout


@pytest.fixture(scope="module")
def setup(trained_run: TrainedRun, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path, list[str]]:
    """(work folder, relabelled data, export folder, the release's tags)."""
    work = tmp_path_factory.mktemp("finetune")
    release = work / "release"
    export(trained_run.run_dir / "checkpoints" / "best", release)
    with open(release / "selected_tags.csv", encoding="utf-8", newline="") as handle:
        release_tags = [row["name"] for row in csv.DictReader(handle) if row["category"] != "9"]
    for tag in [*RENAMED, *ADDED_NEXT_TO]:
        assert tag in release_tags, tag
    data = work / "data"
    _relabelled_dataset(trained_run.data, data)
    return work, data, release, release_tags


def test_build_mode_keeps_shared_rows_adds_and_drops_exactly_and_learns_new_tags(setup) -> None:
    work, data, release, release_tags = setup
    out = _train(work, data, release, "ft_build", "training.epochs=10")
    kept, new, dropped = len(release_tags) - len(RENAMED), len(NEW_TAGS), len(RENAMED)
    assert f"{kept} tags kept with their trained rows, {new} new, {dropped} dropped" in out, out[-3000:]
    report = json.loads((work / "runs" / "ft_build" / "data_report.json").read_text(encoding="utf-8"))
    init = report["init_from"]
    assert (init["kept"], init["new"], init["dropped"]) == (kept, new, dropped)
    assert sorted(init["new_tags"]) == sorted(NEW_TAGS) and sorted(init["dropped_tags"]) == sorted(RENAMED)

    after = _per_tag_ap(work, work / "runs" / "ft_build" / "checkpoints" / "best", work / "eval_build")
    for tag in NEW_TAGS:
        ap, frequency = after[tag]
        # A tag the model cannot see scores an AP near its frequency (the share of images that have it).
        assert ap > frequency + 0.08, (tag, ap, frequency)
    # round_shape has exactly circle's labels: the new row learns what the kept row already knew.
    assert after["round_shape"][0] >= after["circle"][0] - 0.1, (after["round_shape"], after["circle"])


def test_extend_mode_keeps_every_release_tag(setup) -> None:
    work, data, release, release_tags = setup
    out = _train(work, data, release, "ft_extend", "data.vocabulary_mode=extend", "training.max_steps=2")
    assert f"{len(release_tags)} tags kept with their trained rows, {len(NEW_TAGS)} new, 0 dropped" in out, out[-3000:]
    vocab = json.loads((work / "runs" / "ft_extend" / "vocabulary.json").read_text(encoding="utf-8"))
    assert vocab["index_to_tag"][: len(release_tags)] == release_tags
    assert sorted(vocab["index_to_tag"][len(release_tags) :]) == sorted(NEW_TAGS)


def _per_tag_ap(work: Path, checkpoint: Path, out: Path) -> dict[str, tuple[float, float]]:
    """validation_loop.py on a checkpoint: tag -> (AP, share of validation images with the tag)."""
    proc = run_cli([str(ROOT / "validation_loop.py"), "--checkpoint", str(checkpoint), "--out", str(out)], cwd=work)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    num_val = json.loads((out / "metrics.json").read_text(encoding="utf-8"))["num_samples"]
    with open(out / "per_tag.csv", encoding="utf-8", newline="") as handle:
        return {row["tag"]: (float(row["ap"]), int(row["support"]) / num_val) for row in csv.DictReader(handle)}
