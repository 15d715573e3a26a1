"""Tests for the config tree: loading, unknown keys, types, ranges, overrides, dump, reference."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

import Configuration_System as C

ROOT = Path(__file__).resolve().parents[1]


def write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "cfg.yaml"
    p.write_text(text, encoding="utf-8")
    return p


def test_defaults_and_design_keys_exist() -> None:
    cfg = C.load_config(None)
    for key in (
        "experiment_name",
        "output_root",
        "data.root",
        "data.image_size",
        "data.batch_size",
        "data.num_workers",
        "model.preset",
        "model.patch_size",
        "training.epochs",
        "training.max_steps",
        "training.learning_rate",
        "training.seed",
        "checkpoint.every_steps",
        "validation.every_steps",
    ):
        node = cfg
        for part in key.split("."):
            node = getattr(node, part)  # getattr raises if one of these keys was removed or renamed


def test_unknown_key_names_nearest(tmp_path: Path) -> None:
    p = write(tmp_path, "data:\n  bach_size: 8\n")
    with pytest.raises(C.ConfigError) as err:
        C.load_config(p)
    msg = str(err.value)
    assert "data.bach_size" in msg and "data.batch_size" in msg and str(p) in msg


def test_unknown_section_names_nearest(tmp_path: Path) -> None:
    with pytest.raises(C.ConfigError, match="trainig.*did you mean 'training'"):
        C.load_config(write(tmp_path, "trainig:\n  epochs: 1\n"))


@pytest.mark.parametrize(
    "text, fragment",
    [
        ("data:\n  batch_size: eight\n", "data.batch_size must be an integer"),
        ("data:\n  batch_size: 2.5\n", "data.batch_size must be an integer"),
        ("data:\n  pin_memory: 1\n", "data.pin_memory must be true or false"),
        ("training:\n  learning_rate: -0.1\n", "training.learning_rate must be > 0.0"),
        ("model:\n  preset: huge\n", "model.preset must be one of"),
        ("data:\n  image_size: 100\nmodel:\n  patch_size: 16\n", "divisible by model.patch_size"),
        ("data:\n  mean: [0.5, 0.5]\n", "data.mean must be a list of 3 numbers"),
        ("data: 5\n", "section 'data' must be a mapping"),
        ("- a\n- b\n", "top level must be a mapping"),
    ],
)
def test_bad_values_rejected(tmp_path: Path, text: str, fragment: str) -> None:
    with pytest.raises(C.ConfigError, match=fragment):
        C.load_config(write(tmp_path, text))


def test_int_accepted_for_float_and_whole_float_for_int(tmp_path: Path) -> None:
    cfg = C.load_config(write(tmp_path, "training:\n  learning_rate: 1\n  epochs: 3.0\n"))
    assert cfg.training.learning_rate == 1.0 and isinstance(cfg.training.learning_rate, float)
    assert cfg.training.epochs == 3 and isinstance(cfg.training.epochs, int)


def test_overrides_are_typed_and_checked() -> None:
    cfg = C.load_config(
        None, ["data.batch_size=12", "training.learning_rate=3e-4", "data.pin_memory=false", "experiment_name=2024", "data.mean=[0.1, 0.2, 0.3]"]
    )
    assert cfg.data.batch_size == 12
    assert cfg.training.learning_rate == pytest.approx(3e-4)
    assert cfg.data.pin_memory is False
    assert cfg.experiment_name == "2024"
    assert cfg.data.mean == [0.1, 0.2, 0.3]
    with pytest.raises(C.ConfigError, match="did you mean 'training.epochs'"):
        C.load_config(None, ["training.epoch=3"])
    with pytest.raises(C.ConfigError, match="is a section"):
        C.load_config(None, ["training=3"])
    with pytest.raises(C.ConfigError, match="section.key=value"):
        C.load_config(None, ["training.epochs"])


def test_missing_file_names_path(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="nope.yaml"):
        C.load_config(tmp_path / "nope.yaml")


def test_dump_round_trips(tmp_path: Path) -> None:
    cfg = C.load_config(ROOT / "configs" / "demo.yaml", ["training.epochs=2"])
    out = tmp_path / "resolved.yaml"
    C.save_config(cfg, out)
    again = C.config_from_dict(yaml.safe_load(out.read_text(encoding="utf-8")))
    assert again == cfg


def test_reference_file_is_current_and_documents_every_key() -> None:
    committed = (ROOT / "configs" / "unified_config.yaml").read_text(encoding="utf-8")
    assert committed == C.reference_yaml(), "regenerate: python Configuration_System.py reference --out configs/unified_config.yaml"
    loaded = yaml.safe_load(committed)
    assert C.config_from_dict(loaded) == C.RootConfig()
    lines = committed.splitlines()
    for i, line in enumerate(lines):
        stripped = line.strip()
        if stripped and not stripped.startswith("#") and ":" in stripped:
            assert lines[i - 1].strip().startswith("#"), f"key without a comment: {stripped}"


@pytest.mark.e2e
def test_cli_check_reports_one_line(tmp_path: Path) -> None:
    p = write(tmp_path, "model:\n  pach_size: 8\n")
    proc = subprocess.run([sys.executable, str(ROOT / "Configuration_System.py"), "check", str(p)], capture_output=True, text=True, cwd=tmp_path)
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0
    assert "model.pach_size" in proc.stderr and "model.patch_size" in proc.stderr


def test_flat_hparams_has_every_training_key_as_a_scalar() -> None:
    """flat_hparams: one 'section.key' per field of data, model, loss and training; lists become their text."""
    cfg = C.load_config(None, ["data.image_size=48"])
    flat = C.flat_hparams(cfg)
    for section in ("data", "model", "loss", "training"):
        assert {k for k in flat if k.startswith(section + ".")} == {f"{section}.{k}" for k in vars(getattr(cfg, section))}
    assert flat["data.image_size"] == 48 and flat["data.mean"] == str(cfg.data.mean)
    assert all(isinstance(v, (int, float, str, bool)) for v in flat.values())
