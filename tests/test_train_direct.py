"""End-to-end tests of train_direct.py as a process, plus its small pure helpers."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml

import train_direct as T
from Configuration_System import ConfigError, load_config
from conftest import ROOT, TrainedRun, read_jsonl, run_cli
from tagger_init import init_model_weights
from vocabulary import TagVocabulary


def frequency_baseline_map(run_dir: Path) -> float:
    """mAP of scoring every validation image with each tag's training frequency (a constant per
    tag): each tag's AP is then its prevalence in the validation split."""
    vocab = json.loads((run_dir / "vocabulary.json").read_text(encoding="utf-8"))
    split = json.loads((run_dir / "split.json").read_text(encoding="utf-8"))
    val_ids = set(split["val"])
    data_root = Path(yaml.safe_load((run_dir / "config.yaml").read_text(encoding="utf-8"))["data"]["root"])
    from dataset_scan import scan_dataset

    records = [r for r in scan_dataset(data_root).records if r.sample_id in val_ids]
    records = [r for r in records if any(t in vocab["tag_to_index"] for t in r.tags)]
    aps = []
    for tag in vocab["index_to_tag"]:
        positives = sum(tag in r.tags for r in records)
        if positives:
            aps.append(positives / len(records))
    return sum(aps) / len(aps)


@pytest.mark.e2e
def test_run_folder_layout(trained_run: TrainedRun) -> None:
    run = trained_run.run_dir
    for name in ("config.yaml", "vocabulary.json", "data_report.json", "metrics.jsonl", "split.json"):
        assert (run / name).is_file(), name
    assert any((run / "tensorboard").iterdir())
    ckpts = run / "checkpoints"
    last = (ckpts / "last").read_text(encoding="utf-8").strip()
    best = (ckpts / "best").read_text(encoding="utf-8").strip()
    for step_dir in {last, best}:
        files = {p.name for p in (ckpts / step_dir).iterdir()}
        assert {"model.safetensors", "training_state.pt", "config.yaml", "vocabulary.json", "COMPLETE"} <= files
    report = json.loads((run / "data_report.json").read_text(encoding="utf-8"))
    assert report["used"]["train"] > 0 and report["used"]["val"] > 0
    audit = report["flip_audit"]  # the demo's text mark forbids flipping
    assert audit["considered"] == report["used"]["train"] and audit["vetoed_by_forbid_tag"].get("text", 0) > 0
    train_events = [e for e in read_jsonl(run / "metrics.jsonl") if e["type"] == "train"]
    flipped = sum(e["augment/flipped"] for e in train_events)
    vetoed = sum(e["augment/flip_vetoed"] for e in train_events)
    assert flipped > 0 and vetoed > 0 and vetoed < flipped
    resolved = yaml.safe_load((run / "config.yaml").read_text(encoding="utf-8"))
    assert resolved["data"]["image_size"] == 32 and resolved["model"]["embed_dim"] == 64


@pytest.mark.e2e
def test_loss_falls_and_map_beats_frequency_baseline(trained_run: TrainedRun) -> None:
    events = read_jsonl(trained_run.run_dir / "metrics.jsonl")
    losses = [e["loss"] for e in events if e["type"] == "train"]
    assert len(losses) >= 40
    first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    # plain BCE with the tag-bias init starts near the tag-frequency prior's loss, so the fall is
    # a smaller share of the total than the focal loss's was; the mAP check below is the real test
    assert last < 0.95 * first, (first, last)
    vals = [e for e in events if e["type"] == "val"]
    assert vals, "no validation event"
    baseline = frequency_baseline_map(trained_run.run_dir)
    assert vals[-1]["mAP"] > baseline + 0.15, (vals[-1]["mAP"], baseline)
    assert any(e.get("checkpoint/write_seconds", 0) > 0 for e in events if e["type"] == "train")
    assert "done: finished" in trained_run.proc.stdout
    assert "data: " in trained_run.proc.stdout and "val step" in trained_run.proc.stdout


@pytest.mark.e2e
def test_console_says_each_event_once(trained_run: TrainedRun) -> None:
    """An event with a sentence of its own (the micro-batch plan, the end) reaches the console once,
    not also as a '[kind] ...' line; no other console line repeats; paths are shown relative to
    where the command ran."""
    lines = trained_run.proc.stdout.splitlines()
    events = {e["kind"] for e in read_jsonl(trained_run.run_dir / "metrics.jsonl") if e["type"] == "event"}
    assert {"micro_batches", "end"} <= events
    for kind, sentence in (("micro_batches", "micro-batches: "), ("end", "done: ")):
        assert sum(line.startswith(sentence) for line in lines) == 1, (kind, lines)
        assert not any(line.startswith(f"[{kind}]") for line in lines), (kind, lines)
    once = [line for line in lines if not line.startswith(("ep ", "val step"))]
    assert len(once) == len(set(once)), once
    evaluate = [line for line in lines if line.startswith("evaluate with: ")]
    assert len(evaluate) == 1 and evaluate[0].endswith(" validation_loop.py --checkpoint runs/e2e/checkpoints/best --out runs/e2e/eval"), evaluate
    assert str(trained_run.workdir) not in trained_run.proc.stdout


@pytest.mark.e2e
def test_validation_loop_reproduces_best_map(trained_run: TrainedRun, tmp_path: Path) -> None:
    run = trained_run.run_dir
    best_step = int((run / "checkpoints" / "best").read_text(encoding="utf-8").strip().split("_")[1])
    reported = [e for e in read_jsonl(run / "metrics.jsonl") if e["type"] == "val" and e["step"] == best_step]
    assert reported
    proc = run_cli(
        [str(ROOT / "validation_loop.py"), "--checkpoint", str(run / "checkpoints" / "best"), "--out", str(tmp_path / "eval")], cwd=tmp_path
    )
    assert proc.returncode == 0, proc.stderr
    metrics = json.loads((tmp_path / "eval" / "metrics.json").read_text(encoding="utf-8"))
    assert abs(metrics["mAP"] - reported[-1]["mAP"]) < 1e-4
    assert abs(metrics["f1_micro"] - reported[-1]["f1_micro"]) < 1e-4
    for key in ("mAP", "f1_micro", "f1_macro", "rating_accuracy", "num_samples", "num_tags"):
        assert key in metrics


@pytest.mark.parametrize(
    "override, fragment",
    [
        ("data.bach_size=8", "did you mean 'data.batch_size'"),
        ("training.epochs=many", "training.epochs must be an integer"),
        ("data.root=/nonexistent/dataset", "/nonexistent/dataset"),
    ],
)
@pytest.mark.e2e
def test_bad_config_stops_before_work(tmp_path: Path, override: str, fragment: str) -> None:
    proc = run_cli(
        [
            str(ROOT / "train_direct.py"),
            "--config",
            str(ROOT / "configs" / "demo.yaml"),
            "--set",
            "data.demo_images=0",
            "--set",
            override,
            "--set",
            "output_root=runs",
        ],
        cwd=tmp_path,
        timeout=120,
    )
    assert proc.returncode == 2
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and fragment in lines[0], proc.stderr
    assert not (tmp_path / "runs").exists(), "nothing may be written before the config and data are valid"


@pytest.mark.e2e
def test_resume_latest_without_checkpoint_is_a_clear_error(tmp_path: Path) -> None:
    proc = run_cli(
        [str(ROOT / "train_direct.py"), "--config", str(ROOT / "configs" / "demo.yaml"), "--resume", "latest", "--set", "output_root=runs"],
        cwd=tmp_path,
        timeout=120,
    )
    assert proc.returncode == 2 and "no complete checkpoint" in proc.stderr


def test_schedule_helpers() -> None:
    cfg = load_config(
        None,
        [
            "data.batch_size=64",
            "training.grad_accum_steps=2",
            "training.reference_batch_size=256",
            "training.learning_rate=0.001",
            "training.lr_scaling=linear",
        ],
    )
    assert T.effective_learning_rate(cfg, world_size=2) == pytest.approx(0.001)
    cfg.training.lr_scaling = "sqrt"
    assert T.effective_learning_rate(cfg, world_size=1) == pytest.approx(0.001 * 0.5**0.5)
    assert T.steps_per_epoch(10, 3) == 4  # a partial window at the end is a step
    cfg.training.epochs, cfg.training.max_steps = 3, 5
    assert T.total_optimizer_steps(cfg, 4) == 5
    sig = T.schedule_signature(cfg, 1)
    changed = dict(sig, **{"data.batch_size": 32})
    with pytest.raises(ConfigError, match="--accept-schedule-change"):
        T.check_resume_compatible(sig, changed, accept=False)
    assert T.check_resume_compatible(sig, changed, accept=True) == ["data.batch_size: 64 -> 32"]


def test_format_1_run_state_restores_and_hands_its_best_over() -> None:
    from training_utils import BestMetric

    run_state = {
        "step": 18,
        "epoch": 0,
        "batch_in_epoch": 18,
        "images_seen": 288,
        "best_metric": 0.4,
        "best_step": 12,
        "last_val_step": 12,
        "last_ckpt_step": 18,
    }
    state = T.with_best_entry({"format_version": 1, "run_state": run_state})
    restored = T.RunState()
    restored.load_state_dict(state["run_state"])
    assert restored == T.RunState(step=18, epoch=0, batch_in_epoch=18, images_seen=288, last_val_step=12, last_ckpt_step=18)
    best = BestMetric("mAP")
    best.load_state_dict(state["best"])
    assert (best.value, best.step) == (0.4, 12)
    newer = {"metric": "mAP", "value": 0.5, "step": 30}
    assert T.with_best_entry({"run_state": run_state, "best": newer})["best"] == newer
    with pytest.raises(ValueError, match="run_state lacks epoch"):
        T.RunState().load_state_dict({"step": 1, "batch_in_epoch": 0, "images_seen": 0, "last_val_step": None, "last_ckpt_step": None})


def test_sampler_position_saves_the_loop_position() -> None:
    from batching import ResumableSampler

    sampler = ResumableSampler(100, batch_size=10, seed=3)
    sampler.set_epoch(1)  # the sampler still at the finished epoch: the loop has moved on
    position = T.SamplerPosition(sampler, T.RunState(epoch=2, batch_in_epoch=4))
    saved = position.state_dict()
    assert (saved["epoch"], saved["start_batch"]) == (2, 4)
    fresh = ResumableSampler(100, batch_size=10, seed=3)
    T.SamplerPosition(fresh, T.RunState()).load_state_dict(saved)
    assert (fresh.epoch, fresh.start_batch) == (2, 4)
    with pytest.raises(ValueError, match="batch_size"):
        T.SamplerPosition(ResumableSampler(100, batch_size=20, seed=3), T.RunState()).load_state_dict(saved)


@pytest.mark.e2e
def test_tensorboard_has_training_validation_and_pictures(trained_run: TrainedRun) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(trained_run.run_dir / "tensorboard"), size_guidance={"images": 0, "tensors": 0})
    acc.Reload()
    tags = acc.Tags()
    for name in (
        "train/loss",
        "train/loss/tags",
        "train/loss/rating",
        "train/grad_norm",
        "train/lr",
        "val/mAP",
        "val/f1_micro",
        "val/rating_accuracy",
        "perf/images_per_s",
    ):
        assert name in tags["scalars"], (name, tags["scalars"])
    assert "val/examples" in tags["images"]
    assert any(t.startswith("val/pr") for t in tags["tensors"]), tags["tensors"]
    steps = [e.step for e in acc.Scalars("train/loss")]
    assert steps == sorted(steps) and len(steps) == len(set(steps))


def test_init_from_timm_layout_weights_loads_backbone_only(tmp_path: Path) -> None:
    from safetensors.torch import save_file

    from model_architecture import SimplifiedTagger, VisionTransformerConfig

    cfg = VisionTransformerConfig.from_preset("tiny", image_size=32, patch_size=8, num_tags=5, embed_dim=32, depth=2, num_heads=2)
    import torch as torch_mod

    torch_mod.manual_seed(0)
    source = SimplifiedTagger(cfg)
    save_file({k: v.contiguous() for k, v in source.backbone_state_dict().items()}, str(tmp_path / "vit.safetensors"))
    torch_mod.manual_seed(1)
    target = SimplifiedTagger(cfg)
    head_before = target.tag_head.weight.detach().clone()
    vocab = TagVocabulary(["a", "b", "c", "d", "e"])
    summary, record = init_model_weights(target, vocab, str(tmp_path / "vit.safetensors"))
    assert record["kind"] == "timm_weights"
    assert f"loaded {len(source.backbone_state_dict())} tensors, 0 missing" in summary
    for k, v in source.backbone_state_dict().items():
        assert torch_mod.equal(target.state_dict()[k], v), k
    assert torch_mod.equal(target.tag_head.weight, head_before)
    with pytest.raises(FileNotFoundError, match="nope.safetensors"):
        init_model_weights(target, vocab, str(tmp_path / "nope.safetensors"))


class _NaNLoss(torch.nn.Module):
    """A loss that turns non-finite from the third call on, to exercise the guarded step."""

    def __init__(self, inner: torch.nn.Module) -> None:
        super().__init__()
        self.inner, self.calls = inner, 0

    def forward(self, outputs: dict, tags: torch.Tensor, ratings: torch.Tensor) -> tuple:
        self.calls += 1
        total, parts = self.inner(outputs, tags, ratings)
        if self.calls >= 3:
            total = total * float("nan")
        return total, parts


@pytest.mark.e2e
def test_nonfinite_steps_are_skipped_counted_and_stop_the_run(
    demo_data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    import training_setup
    from conftest import TINY_RUN

    real_build_loss = training_setup.build_loss
    monkeypatch.setattr(training_setup, "build_loss", lambda *a, **k: _NaNLoss(real_build_loss(*a, **k)))
    monkeypatch.chdir(tmp_path)
    args = ["--config", str(ROOT / "configs" / "demo.yaml")]
    for o in TINY_RUN + [
        f"data.root={demo_data}",
        "data.num_workers=0",
        "experiment_name=nan",
        "training.max_consecutive_skips=4",
        "checkpoint.every_steps=2",
        "checkpoint.keep_last=5",
    ]:
        args += ["--set", o]
    assert T.main(args) == 3
    err = capsys.readouterr().err
    assert "4 optimizer steps in a row had a non-finite loss" in err and "last good state" in err
    run = tmp_path / "runs" / "nan"
    skipped = {e["step"]: e["skipped_steps"] for e in read_jsonl(run / "metrics.jsonl") if e["type"] == "train"}
    assert skipped == {1: 0, 2: 0, 3: 1, 4: 2, 5: 3, 6: 4}
    from safetensors.torch import load_file

    assert (run / "checkpoints" / "last").read_text(encoding="utf-8").strip() == "step_6"
    good = load_file(str(run / "checkpoints" / "step_2" / "model.safetensors"))
    final = load_file(str(run / "checkpoints" / "step_6" / "model.safetensors"))
    assert all(torch.equal(good[k], final[k]) for k in good)  # skipped updates changed nothing


@pytest.mark.e2e
def test_accumulation_with_a_partial_window_at_epoch_end(demo_data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from conftest import TINY_RUN

    monkeypatch.chdir(tmp_path)
    args = ["--config", str(ROOT / "configs" / "demo.yaml")]
    for o in TINY_RUN + [
        f"data.root={demo_data}",
        "data.num_workers=0",
        "experiment_name=accum",
        "training.grad_accum_steps=4",
        "training.epochs=2",
        "validation.every_steps=0",
        "checkpoint.every_steps=0",
        "training.scheduler=cosine_restarts",
    ]:
        args += ["--set", o]
    assert T.main(args) == 0
    run = tmp_path / "runs" / "accum"
    split = json.loads((run / "split.json").read_text(encoding="utf-8"))
    batches = len(split["train"]) // 32
    assert batches % 4, "the test needs an epoch that does not divide into whole windows"
    per_epoch = -(-batches // 4)
    steps = [e["step"] for e in read_jsonl(run / "metrics.jsonl") if e["type"] == "train"]
    assert steps == list(range(1, 2 * per_epoch + 1))
    vals = [e["step"] for e in read_jsonl(run / "metrics.jsonl") if e["type"] == "val"]
    assert vals == [per_epoch, 2 * per_epoch]  # validation at each epoch end
    assert (run / "checkpoints" / "last").read_text(encoding="utf-8").strip() == f"step_{2 * per_epoch}"


@pytest.mark.e2e
def test_spawned_workers_give_the_same_run(trained_run: TrainedRun) -> None:
    """Windows starts DataLoader workers with spawn: the end-to-end run must work there and, since
    augmentation randomness comes from (seed, epoch, index), give exactly the same losses."""
    from conftest import TINY_RUN

    args = [str(ROOT / "train_direct.py"), "--config", str(ROOT / "configs" / "demo.yaml")]
    for o in TINY_RUN + [f"data.root={trained_run.data}", "output_root=runs", "experiment_name=e2e_spawn", "data.worker_start_method=spawn"]:
        args += ["--set", o]
    proc = run_cli(args, cwd=trained_run.workdir)
    assert proc.returncode == 0, proc.stderr[-3000:]
    spawned = read_jsonl(trained_run.workdir / "runs" / "e2e_spawn" / "metrics.jsonl")
    forked = read_jsonl(trained_run.run_dir / "metrics.jsonl")

    def pick(events: list[dict], kind: str, key: str) -> list[tuple[int, float]]:
        return [(e["step"], e[key]) for e in events if e["type"] == kind]

    assert pick(spawned, "train", "loss") == pick(forked, "train", "loss")
    assert pick(spawned, "val", "mAP") == pick(forked, "val", "mAP")


@pytest.mark.e2e
def test_prepared_cache_run_matches_decoding(trained_run: TrainedRun) -> None:
    """data.cache_dir builds the cache on first use; training from it sees the same pixels, so the
    run is identical to decoding every image; the dataset folder is left untouched."""
    from conftest import TINY_RUN

    before = sorted(p.name for p in trained_run.data.rglob("*"))
    cache = trained_run.workdir / "cache32"
    args = [str(ROOT / "train_direct.py"), "--config", str(ROOT / "configs" / "demo.yaml")]
    for o in TINY_RUN + [f"data.root={trained_run.data}", "output_root=runs", "experiment_name=e2e_cache", f"data.cache_dir={cache}"]:
        args += ["--set", o]
    proc = run_cli(args, cwd=trained_run.workdir)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "cache: " in proc.stdout and "decoded" in proc.stdout
    assert (cache / "index.json").is_file() and (cache / "entries.npy").is_file()
    cached = read_jsonl(trained_run.workdir / "runs" / "e2e_cache" / "metrics.jsonl")
    decoded = read_jsonl(trained_run.run_dir / "metrics.jsonl")
    assert [(e["step"], e["loss"]) for e in cached if e["type"] == "train"] == [(e["step"], e["loss"]) for e in decoded if e["type"] == "train"]
    assert sorted(p.name for p in trained_run.data.rglob("*")) == before


@pytest.mark.e2e
def test_run_on_a_twenty_percent_broken_dataset(tmp_path: Path) -> None:
    """num_workers=2 over a corpus where 20% of the samples are broken: the run completes, the
    audit counts every reason, and a file that only fails when decoded in a worker is replaced
    and counted."""
    import broken_corpus as bc
    from conftest import TINY_RUN

    outside = bc.write_image(tmp_path / "outside.jpg")
    corpus = bc.make_broken_corpus(tmp_path / "root", good=47, copies=1, outside_target=outside)
    args = [str(ROOT / "train_direct.py"), "--config", str(ROOT / "configs" / "demo.yaml")]
    for o in TINY_RUN + [
        f"data.root={corpus.root}",
        "output_root=runs",
        "experiment_name=broken",
        "data.verify=header",
        "data.max_bad_fraction=0.25",
        "data.batch_size=8",
        "data.val_fraction=0.1",
        "training.epochs=3",
        "augment.flip_prob=0",
    ]:
        args += ["--set", o]
    proc = run_cli(args, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads((tmp_path / "runs" / "broken" / "data_report.json").read_text(encoding="utf-8"))
    assert report["skipped"] == corpus.expected_skips("header")
    assert report["num_samples"] == corpus.expected_records("header")
    # the truncated JPEG passes the header check, lands in training, and fails in a worker
    split = json.loads((tmp_path / "runs" / "broken" / "split.json").read_text(encoding="utf-8"))
    assert corpus.decode_only_ids[0] in split["train"]
    replaced = report["replaced_during_training"]
    assert replaced["failed"] >= 1 and set(replaced["by_reason"]) == {"image_undecodable"}
    assert "samples failed in workers and were replaced (image_undecodable: " in proc.stdout
    line = [ln for ln in proc.stdout.splitlines() if ln.startswith("data: ")][0]
    for reason, count in corpus.expected_skips("header").items():
        assert f"{reason}: {count}" in line


@pytest.mark.e2e
def test_training_from_a_manifest_matches_the_sidecar_scan(trained_run: TrainedRun) -> None:
    """data.manifest (JSON Lines of {file, tags, rating}) gives the same samples, so the same run."""
    from conftest import TINY_RUN
    from dataset_scan import scan_dataset

    records = scan_dataset(trained_run.data).records
    manifest = trained_run.workdir / "index.jsonl"
    manifest.write_text(
        "".join(json.dumps({"file": r.sample_id, "tags": list(r.tags), "rating": r.rating}) + "\n" for r in records), encoding="utf-8"
    )
    args = [str(ROOT / "train_direct.py"), "--config", str(ROOT / "configs" / "demo.yaml")]
    for o in TINY_RUN + [
        f"data.root={trained_run.data}",
        f"data.manifest={manifest}",
        "output_root=runs",
        "experiment_name=e2e_manifest",
        "training.max_steps=10",
    ]:
        args += ["--set", o]
    proc = run_cli(args, cwd=trained_run.workdir)
    assert proc.returncode == 0, proc.stderr[-3000:]
    from_manifest = read_jsonl(trained_run.workdir / "runs" / "e2e_manifest" / "metrics.jsonl")
    assert f"data: {len(records)} samples used, 0 skipped" in proc.stdout
    split_a = json.loads((trained_run.workdir / "runs" / "e2e_manifest" / "split.json").read_text(encoding="utf-8"))
    split_b = json.loads((trained_run.run_dir / "split.json").read_text(encoding="utf-8"))
    assert sorted(split_a["val"]) == sorted(split_b["val"])
    assert len([e for e in from_manifest if e["type"] == "train"]) == 10


@pytest.mark.e2e
def test_batch_larger_than_the_training_split_is_a_clear_error(demo_data: Path, tmp_path: Path) -> None:
    proc = run_cli(
        [
            str(ROOT / "train_direct.py"),
            "--config",
            str(ROOT / "configs" / "demo.yaml"),
            "--set",
            f"data.root={demo_data}",
            "--set",
            "data.batch_size=4096",
            "--set",
            "output_root=runs",
            "--set",
            "data.image_size=32",
        ],
        cwd=tmp_path,
        timeout=120,
    )
    assert proc.returncode == 2
    assert "data.batch_size=4096" in proc.stderr and "no full batch" in proc.stderr


def test_progressive_resolution_schedule_and_checks() -> None:
    """Small images for the epochs that start before the share of the steps, then full size; the
    size must be a multiple of the patch below data.image_size; a resize is antialiased bilinear."""
    from image_preprocess import resize_images
    from training_setup import check_resume_compatible, schedule_signature, train_image_size

    cfg = load_config(
        None, ["data.image_size=64", "model.patch_size=16", "data.progressive_image_size=32", "data.progressive_share=0.5", "training.epochs=4"]
    )
    # 10 steps an epoch, 40 in all: epochs starting at steps 0 and 10 are small, 20 and 30 full
    assert [train_image_size(cfg, e, 10, 40) for e in range(4)] == [32, 32, 64, 64]
    assert [train_image_size(cfg, e, 10, 25) for e in range(3)] == [32, 32, 64]  # max_steps 25: the switch at 12.5 waits for step 20
    off = load_config(None, ["data.image_size=64", "model.patch_size=16"])
    assert {train_image_size(off, e, 10, 40) for e in range(4)} == {64}
    for bad in ("24", "64", "80"):
        with pytest.raises(ConfigError, match="progressive_image_size"):
            load_config(None, ["data.image_size=64", "model.patch_size=16", f"data.progressive_image_size={bad}"])
    images = torch.rand(2, 3, 64, 64)
    small = resize_images(images, 32)
    reference = torch.nn.functional.interpolate(images, size=(32, 32), mode="bilinear", antialias=True, align_corners=False)
    assert small.shape == (2, 3, 32, 32) and torch.equal(small, reference) and resize_images(images, 64) is images
    # a checkpoint from before the recipe keys (trained with the asymmetric focal loss, then the
    # default) resumes under the old loss without a change, and is refused under the new default
    added = ("data.progressive_image_size", "data.progressive_share", "training.layer_decay", "data.repeat_factor_threshold")
    focal = load_config(None, ["data.image_size=64", "model.patch_size=16", "loss.gamma_neg=4", "loss.clip=0.05"])
    old = {k: v for k, v in schedule_signature(focal, 1).items() if k not in added and not k.startswith("loss.")}
    assert check_resume_compatible(old, schedule_signature(focal, 1), accept=False) == []
    with pytest.raises(ConfigError, match=r"loss.gamma_neg: 4.0 -> 0.0; loss.clip: 0.05 -> 0.0"):
        check_resume_compatible(old, schedule_signature(off, 1), accept=False)
    with pytest.raises(ConfigError, match="data.progressive_image_size"):
        check_resume_compatible(old, schedule_signature(cfg, 1), accept=False)
