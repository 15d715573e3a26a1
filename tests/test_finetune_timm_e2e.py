"""Fine-tuning a released WD v3 tagger of the timm family with train_direct.py, end to end.

The releases are shrunk copies of wd-vit-tagger-v3 and wd-eva02-large-tagger-v3 (the published
config.json with fewer, narrower blocks at 32 px; random timm weights; a 9/0/4 selected_tags.csv),
run as `train_direct.py --config configs/finetune.yaml --init-from FOLDER --set data.root=DIR` on
the demo data. The run's tags are pinned (data.vocabulary): the release's minus two (dropped), plus
three it never had (new). Checked: the report's counts exactly; each new tag's validation AP at
least 0.1 above its frequency (what a tag the model cannot see scores); with the body frozen for
the whole run every body tensor, and its EMA, bit-identical to the release and no optimizer state
for it; a run killed (SIGKILL) before the body unfreezes and resumed is bit-identical to the
uninterrupted one (per-step losses, weights, EMA).
"""

from __future__ import annotations

import signal
import sys
from collections import Counter
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from checkpoint_eval import evaluate
from checkpoint_store import read_checkpoint, read_run_config
from conftest import ROOT, read_jsonl, run_cli
from data_setup import build_eval_loader, prepare_eval_data
from dataset_scan import scan_dataset
from file_io import load_json_file
from test_resume_e2e import start_and_interrupt, step_losses
from timm_tagger import build_tagger
from vocabulary import TagVocabulary
from wd_release_helpers import write_release

pytestmark = [pytest.mark.e2e, pytest.mark.skipif(sys.platform == "win32", reason="uses POSIX signals")]

NEW = ["red", "blue", "white_background"]  # in the data, not in the release
DROPPED = ["long_hair", "hatsune_miku"]  # in the release, not in the data
CHARACTER = ["star", "yellow"]  # kept tags in the release's character block
STEPS = 26  # 2 epochs of 13 batches of 32 (442 training images)
RUN = [
    "data.num_workers=0",
    "data.batch_size=32",
    "data.val_fraction=0.25",
    "training.epochs=2",
    "training.learning_rate=0.003",
    "training.warmup_steps=3",
    "model.drop_path_rate=0.1",
    "training.ema_decay=0.9",
    "checkpoint.every_steps=6",
    "checkpoint.keep_last=20",
    "monitor.log_every_steps=1",
    "monitor.console_interval_s=0",
    "monitor.system_stats_interval_s=0",
    "monitor.tensorboard=false",
    "training.memory_check=false",  # the timm family's memory check has its own test (test_machine_fit)
]


def _train_args(release: Path, data: Path, vocabulary: Path, name: str, *extra: str) -> list[str]:
    args = [str(ROOT / "train_direct.py"), "--config", str(ROOT / "configs" / "finetune.yaml"), "--init-from", str(release)]
    for o in [f"data.root={data}", f"data.vocabulary={vocabulary}", "output_root=runs", f"experiment_name={name}", *RUN, *extra]:
        args += ["--set", o]
    return args


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory, demo_data: Path) -> tuple[Path, Path, dict[str, Path]]:
    """(work folder, vocabulary.json, {"vit": release, "eva02": release}) for the demo data."""
    work = tmp_path_factory.mktemp("finetune_timm")
    counts = Counter(tag for record in scan_dataset(demo_data).records for tag in record.tags)
    tags = sorted(t for t, n in counts.items() if 20 <= n <= 400)  # learnable, and a frequency below 1 on the training split
    assert set(NEW + CHARACTER) <= set(tags)
    vocabulary = work / "vocabulary.json"
    TagVocabulary(tags, {t: counts[t] for t in tags}).save(vocabulary)
    kept = [t for t in tags if t not in NEW]
    general = [t for t in kept if t not in CHARACTER] + DROPPED[:1]
    character = CHARACTER + DROPPED[1:]
    releases = {
        family: write_release(work / name, name, general, character, seed=1)
        for family, name in (("vit", "wd-vit-tagger-v3"), ("eva02", "wd-eva02-large-tagger-v3"))
    }
    return work, vocabulary, releases


def _check_counts(run_dir: Path, vocabulary: Path) -> None:
    init = load_json_file(run_dir / "data_report.json", "data_report.json")["init_from"]
    num_tags = len(TagVocabulary.load(vocabulary))
    assert (init["kept"], init["new"], init["dropped"]) == (num_tags - len(NEW), len(NEW), len(DROPPED))
    assert sorted(init["new_tags"]) == sorted(NEW) and sorted(init["dropped_tags"]) == sorted(DROPPED)


def _new_tags_learned(checkpoint: Path) -> dict[str, tuple[float, float]]:
    """tag -> (validation AP, share of validation images with it) for the new tags, in process."""
    contents = read_checkpoint(checkpoint)
    model = build_tagger(contents.model_config)
    model.load_state_dict(contents.state_dict)
    cfg = read_run_config(checkpoint)
    data = prepare_eval_data(cfg, contents.vocab, contents.preprocess, log=None)
    result = evaluate(model, build_eval_loader(cfg, data), torch.device("cpu"), contents.vocab, contents.preprocess, threshold=0.5)
    per_tag = result.computer.per_tag()
    n = len(data.val_records)
    out = {}
    for tag in NEW:
        i = contents.vocab.tag_to_index[tag]
        out[tag] = (float(per_tag["ap"][i]), float(per_tag["support"][i]) / n)
    return out


def test_vit_release_finetunes_and_resumes_exactly_across_the_unfreeze(setup, demo_data: Path) -> None:
    """Head alone for 10 steps, then the body at half the rate: counts exact, new tags learned; killed at
    step 6 (body still frozen) and resumed, the run ends bit-identical to the uninterrupted one."""
    work, vocabulary, releases = setup
    extra = ("training.freeze_body_steps=10", "training.body_lr_scale=0.5")
    reference = run_cli(_train_args(releases["vit"], demo_data, vocabulary, "vit_ref", *extra), cwd=work)
    assert reference.returncode == 0, reference.stdout[-3000:] + reference.stderr[-3000:]
    ref_dir = work / "runs" / "vit_ref"
    assert "model: timm vit_base_patch16_224(" in reference.stdout and "BGR input" in reference.stdout
    _check_counts(ref_dir, vocabulary)
    for tag, (ap, frequency) in _new_tags_learned(ref_dir / "checkpoints" / f"step_{STEPS}").items():
        assert ap >= frequency + 0.1, (tag, ap, frequency)

    run_dir = work / "runs" / "vit_killed"
    args = _train_args(releases["vit"], demo_data, vocabulary, "vit_killed", *extra)
    proc = start_and_interrupt(work, args, run_dir, after_step=6, how="kill")
    proc.communicate(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    resumed = run_cli(args + ["--resume", str(run_dir / "checkpoints" / "step_6")], cwd=work)  # before the unfreeze at 10
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    losses = step_losses(ref_dir)
    assert sorted(losses) == list(range(1, STEPS + 1)) and step_losses(run_dir) == losses  # exact float equality, every step
    for name in ("model.safetensors", "ema.safetensors"):
        ours = load_file(str(run_dir / "checkpoints" / f"step_{STEPS}" / name))
        theirs = load_file(str(ref_dir / "checkpoints" / f"step_{STEPS}" / name))
        assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours), name
    assert [e["kind"] for e in read_jsonl(run_dir / "metrics.jsonl") if e.get("kind") == "resumed"] == ["resumed"]


def test_eva02_release_with_the_body_frozen_learns_new_tags_and_keeps_every_body_tensor(setup, demo_data: Path) -> None:
    work, vocabulary, releases = setup
    args = _train_args(releases["eva02"], demo_data, vocabulary, "eva_frozen", "training.freeze_body_steps=-1", "training.learning_rate=0.02")
    proc = run_cli(args, cwd=work)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    run_dir = work / "runs" / "eva_frozen"
    _check_counts(run_dir, vocabulary)
    folder = run_dir / "checkpoints" / f"step_{STEPS}"
    release = load_file(str(releases["eva02"] / "model.safetensors"))
    for name in ("model.safetensors", "ema.safetensors"):
        body = {k[len("body.") :]: v for k, v in load_file(str(folder / name)).items() if k.startswith("body.")}
        assert body and set(body) == set(release) - {"head.weight", "head.bias"}, name
        assert all(torch.equal(v, release[k]) for k, v in body.items()), name
    optimizer = torch.load(folder / "training_state.pt", weights_only=True)["optimizer"]
    assert len(optimizer["state"]) == 4  # the two heads' weights and biases: nothing for the body
    for tag, (ap, frequency) in _new_tags_learned(folder).items():
        assert ap >= frequency + 0.1, (tag, ap, frequency)
