"""Tests for checkpoint_store: layout, pointers, pruning, atomic writes, safe loading, the reader."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import checkpoint_store as S


def payload(step: int, value: float = 1.0, best: bool = False) -> S.CheckpointPayload:
    return S.CheckpointPayload(
        step=step,
        model_state={"w": torch.full((2, 3), value)},
        training_state={"format_version": S.CHECKPOINT_FORMAT_VERSION, "step": step},
        files={"config.yaml": "a: 1\n"},
        ema_state={"w": torch.zeros(2, 3)},
        is_best=best,
    )


def test_checkpoint_layout_pointers_and_prune(tmp_path: Path) -> None:
    mgr = S.CheckpointManager(tmp_path / "checkpoints", keep_last=2)
    mgr.write(payload(10, best=True))
    mgr.write(payload(20))
    mgr.write(payload(30))
    names = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    assert names == ["best", "last", "step_10", "step_20", "step_30"]  # step_10 kept: it is the best
    mgr.write(payload(40))
    names = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    assert names == ["best", "last", "step_10", "step_30", "step_40"]
    folder = S.resolve_checkpoint(tmp_path / "checkpoints" / "last")
    assert folder.name == "step_40"
    assert sorted(p.name for p in folder.iterdir()) == ["COMPLETE", "config.yaml", "ema.safetensors", "model.safetensors", "training_state.pt"]
    assert S.resolve_checkpoint(tmp_path / "checkpoints" / "best").name == "step_10"
    assert torch.equal(S.load_model_state(folder)["w"], torch.ones(2, 3))
    assert S.load_training_state(folder)["step"] == 40


def test_latest_skips_incomplete_folders(tmp_path: Path) -> None:
    mgr = S.CheckpointManager(tmp_path, keep_last=5)
    mgr.write(payload(5))
    crashed = tmp_path / "step_9"
    crashed.mkdir()
    (crashed / "model.safetensors").write_bytes(b"partial")
    assert S.latest_checkpoint(tmp_path).name == "step_5"
    with pytest.raises(FileNotFoundError, match="incomplete"):
        S.resolve_checkpoint(crashed)


class Pickled:
    """Any class instance: weights_only loading must refuse it."""


def test_pickled_training_state_refused(tmp_path: Path) -> None:
    folder = tmp_path / "step_1"
    folder.mkdir()
    torch.save({"format_version": S.CHECKPOINT_FORMAT_VERSION, "obj": Pickled()}, folder / "training_state.pt")
    with pytest.raises(ValueError, match="refusing to load"):
        S.load_training_state(folder)


def test_async_writer_surfaces_errors_and_keeps_old(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    mgr = S.CheckpointManager(tmp_path, keep_last=3)
    writer = S.AsyncCheckpointWriter(mgr)
    writer.submit(payload(1))
    writer.wait()

    def disk_full(*args: object, **kwargs: object) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(S.torch, "save", disk_full)
    writer.submit(payload(2))
    with pytest.raises(RuntimeError, match="No space left"):
        writer.wait()
    assert S.latest_checkpoint(tmp_path).name == "step_1"
    assert not any(p.name.startswith(".tmp") for p in tmp_path.iterdir())
    assert (tmp_path / "last").read_text(encoding="utf-8").strip() == "step_1"


def test_snapshot_is_a_copy() -> None:
    w = torch.ones(3)
    model_state, train_state, _ = S.snapshot_state({"w": w}, {"opt": {"m": w}}, None)
    w.add_(1)
    assert torch.equal(model_state["w"], torch.ones(3)) and torch.equal(train_state["opt"]["m"], torch.ones(3))


def test_step_names_parse_strictly() -> None:
    assert S.step_folder_name(40) == "step_40" and S.parse_step("step_40") == 40
    for name in ("step_old", "step_", "step_-3", "step_1_000", "step_+5", "last", "best", "Step_4", "step_4 "):
        assert S.parse_step(name) is None, name


def test_complete_steps_ignore_foreign_and_unfinished_folders(tmp_path: Path) -> None:
    mgr = S.CheckpointManager(tmp_path, keep_last=5)
    mgr.write(payload(3))
    mgr.write(payload(12))
    (tmp_path / "step_old").mkdir()
    (tmp_path / "step_old" / S.COMPLETE_MARKER).write_text("", encoding="utf-8")
    (tmp_path / "step_20").mkdir()
    assert [step for step, _ in S.complete_steps(tmp_path)] == [3, 12]
    assert S.complete_steps(tmp_path / "missing") == [] and S.latest_checkpoint(tmp_path / "missing") is None


def test_pointer_must_name_a_step_folder(tmp_path: Path) -> None:
    S.CheckpointManager(tmp_path, keep_last=2).write(payload(7))
    (tmp_path / "last").write_text("../../elsewhere\n", encoding="utf-8")
    with pytest.raises(FileNotFoundError, match="neither a step folder nor a last/best pointer"):
        S.resolve_checkpoint(tmp_path / "last")
    assert S.is_checkpoint_reference(tmp_path / "last") and S.is_checkpoint_reference(tmp_path / "step_7")
    weights = tmp_path / "vit.safetensors"
    weights.write_bytes(b"")
    assert not S.is_checkpoint_reference(weights)
    assert S.run_dir_of(tmp_path / "runs" / "r" / "checkpoints" / "step_7") == tmp_path / "runs" / "r"


def _written_checkpoint(tmp_path: Path, step: int = 9) -> tuple[Path, dict, object]:
    """A full checkpoint folder as training writes it, from a tiny model, vocabulary and config."""
    from Configuration_System import load_config
    from image_preprocess import PreprocessParams
    from model_architecture import SimplifiedTagger, VisionTransformerConfig
    from vocabulary import TagVocabulary

    cfg = load_config(None, ["data.image_size=32", "model.patch_size=8", "experiment_name=ckpt"])
    vocab = TagVocabulary(["cat", "dog", "red"], {"cat": 5, "dog": 3, "red": 1}, {"cat": "general"})
    vocab_path = vocab.save(tmp_path / "vocabulary.json")
    model_cfg = VisionTransformerConfig.from_preset(
        "tiny", image_size=32, patch_size=8, num_tags=3, embed_dim=16, depth=1, num_heads=2, tag_bias_init=[0.5, 0.3, 0.1]
    )
    torch.manual_seed(0)
    model = SimplifiedTagger(model_cfg)
    preprocess = PreprocessParams(image_size=32, pad_color=(0, 0, 0), mean=(0.4, 0.5, 0.6), std=(0.2, 0.3, 0.4))
    ema = {k: v + 1 for k, v in model.state_dict().items()}
    files = S.checkpoint_files(cfg, vocab_path.read_text(encoding="utf-8"), model_cfg, preprocess)
    assert set(files) == {S.CONFIG_FILE, S.VOCABULARY_FILE, S.MODEL_CONFIG_FILE, S.PREPROCESS_FILE}
    mgr = S.CheckpointManager(S.checkpoints_dir(tmp_path / "run"), keep_last=2)
    folder = mgr.write(
        S.CheckpointPayload(
            step=step, model_state=model.state_dict(), ema_state=ema, files=files, training_state={"format_version": S.CHECKPOINT_FORMAT_VERSION}
        )
    )
    return (folder, {"cfg": cfg, "vocab": vocab, "model_cfg": model_cfg, "model": model, "preprocess": preprocess, "ema": ema}, mgr)


def test_reader_returns_what_training_wrote(tmp_path: Path) -> None:
    import dataclasses

    folder, wrote, _ = _written_checkpoint(tmp_path)
    assert sorted(p.name for p in folder.iterdir()) == sorted(
        [
            S.COMPLETE_MARKER,
            S.MODEL_WEIGHTS,
            S.EMA_WEIGHTS,
            S.TRAINING_STATE,
            S.CONFIG_FILE,
            S.VOCABULARY_FILE,
            S.MODEL_CONFIG_FILE,
            S.PREPROCESS_FILE,
        ]
    )
    got = S.read_checkpoint(folder.parent / S.LAST_POINTER)
    assert got.folder == folder and got.step == 9
    assert got.model_config == dataclasses.replace(wrote["model_cfg"], tag_bias_init=None)  # not stored
    assert got.vocab.index_to_tag == ["cat", "dog", "red"] and got.vocab.tag_frequencies["cat"] == 5
    assert got.preprocess == wrote["preprocess"]
    expected = wrote["model"].state_dict()
    assert got.state_dict.keys() == expected.keys() and all(torch.equal(got.state_dict[k], expected[k]) for k in expected)
    ema = S.read_checkpoint(folder, ema=True).state_dict
    assert all(torch.equal(ema[k], wrote["ema"][k]) for k in expected)
    assert S.read_run_config(folder) == wrote["cfg"]
    assert S.has_ema(folder)


def test_reader_errors_name_the_file(tmp_path: Path) -> None:
    import json

    folder, _, _ = _written_checkpoint(tmp_path)
    (folder / S.EMA_WEIGHTS).unlink()
    with pytest.raises(FileNotFoundError, match="ema.safetensors not found .the run had no EMA"):
        S.read_checkpoint(folder, ema=True)
    config = json.loads((folder / S.MODEL_CONFIG_FILE).read_text(encoding="utf-8"))
    (folder / S.MODEL_CONFIG_FILE).write_text(json.dumps({**config, "num_tags": 4}), encoding="utf-8")
    with pytest.raises(ValueError, match="4 tag outputs but the vocabulary 3 tags"):
        S.read_checkpoint(folder)
    (folder / S.CONFIG_FILE).write_text("data: [unclosed\n", encoding="utf-8")
    with pytest.raises(ValueError, match="config.yaml: not valid YAML"):
        S.read_run_config(folder)
    (folder / S.CONFIG_FILE).unlink()
    with pytest.raises(FileNotFoundError, match="not a checkpoint folder"):
        S.read_run_config(folder)


def test_prune_deletes_only_own_folders_and_never_best(tmp_path: Path) -> None:
    """A folder another run (or an older trainer) left is never pruned, and neither is best."""
    ckpt = tmp_path / "checkpoints"
    foreign = S.CheckpointManager(ckpt, keep_last=1)
    foreign.write(payload(1))
    foreign.write(payload(2, best=True))  # step_1 pruned by its own writer: still one lineage here
    mine = {3, 4, 5, 6}
    mgr = S.CheckpointManager(ckpt, keep_last=2, owns=lambda p: S.parse_step(p.name) in mine)
    mgr.write(payload(3, best=True))
    mgr.write(payload(4))
    mgr.write(payload(5))
    assert sorted(p.name for p in ckpt.iterdir() if p.is_dir()) == ["step_2", "step_3", "step_4", "step_5"]
    mgr.write(payload(6))  # step_3 is best, step_2 is not this run's: only step_4 goes
    assert sorted(p.name for p in ckpt.iterdir() if p.is_dir()) == ["step_2", "step_3", "step_5", "step_6"]
    assert mgr.prune() == []
