"""The checkpoint folder: its names, writing it, finding it and reading it back.

Training writes checkpoints through this module; evaluation, `--init-from`, resume and export
read them through it. The layout (format 1) is:

    <run>/checkpoints/step_<N>/   model.safetensors        the weights
                                  ema.safetensors          the EMA weights (runs with EMA only)
                                  training_state.pt        optimizer, schedule, counters, RNG (tensors
                                                           and plain types only, read with weights_only=True)
                                  config.yaml              the resolved run config
                                  vocabulary.json          the tag vocabulary
                                  model_config.json        the model's config (tag_bias_init dropped): VisionTransformerConfig,
                                                           or TimmTaggerConfig with "family": "timm"
                                  preprocess.json          letterbox and normalisation parameters
                                  COMPLETE                 written last: the folder is whole
    <run>/checkpoints/last, best  text files naming a step folder

A folder is written under a hidden temporary name and moved into place with `os.replace`, so a
crash mid-write never leaves a folder that looks complete. `last` and `best` are small text files
rather than symlinks because creating a symlink on Windows needs extra rights.
"""

from __future__ import annotations

import json
import os
import pickle
import shutil
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import yaml
from safetensors.torch import load_file, save_file

from Configuration_System import ConfigError, RootConfig, config_from_dict, dump_config
from file_io import atomic_write_text, load_json_file, replace_with_retry
from image_preprocess import PreprocessParams
from timm_tagger import TaggerConfig, tagger_config_from_dict
from vocabulary import TagVocabulary
from wd_release import release_layout, release_problem

CHECKPOINT_FORMAT_VERSION = 1

CHECKPOINTS_DIR = "checkpoints"  # inside the run folder
STEP_PREFIX = "step_"
LAST_POINTER = "last"
BEST_POINTER = "best"
COMPLETE_MARKER = "COMPLETE"
MODEL_WEIGHTS = "model.safetensors"
EMA_WEIGHTS = "ema.safetensors"
TRAINING_STATE = "training_state.pt"
CONFIG_FILE = "config.yaml"
VOCABULARY_FILE = "vocabulary.json"
MODEL_CONFIG_FILE = "model_config.json"
PREPROCESS_FILE = "preprocess.json"


# --------------------------------------------------------------------------------------------
# Names
# --------------------------------------------------------------------------------------------


def checkpoints_dir(run_dir: str | Path) -> Path:
    """The folder holding a run's step folders and its last/best pointers."""
    return Path(run_dir) / CHECKPOINTS_DIR


def run_dir_of(checkpoint_folder: str | Path) -> Path:
    """The run folder a step folder belongs to (`<run>/checkpoints/step_<N>`)."""
    return Path(checkpoint_folder).parent.parent


def step_folder_name(step: int) -> str:
    """`step_<N>`, the folder name of the checkpoint after optimizer step N."""
    return f"{STEP_PREFIX}{int(step)}"


def parse_step(name: str) -> int | None:
    """N of a `step_<N>` folder name; None for any other name (e.g. a user's `step_old`)."""
    if not name.startswith(STEP_PREFIX):
        return None
    digits = name[len(STEP_PREFIX) :]
    return int(digits) if digits.isascii() and digits.isdigit() else None


# --------------------------------------------------------------------------------------------
# Writing
# --------------------------------------------------------------------------------------------


def checkpoint_files(cfg: RootConfig, vocabulary_json: str, model_config: TaggerConfig, preprocess: PreprocessParams) -> dict[str, str]:
    """The text files of a checkpoint folder (name -> content): what evaluation and export read back."""
    return {
        CONFIG_FILE: dump_config(cfg),
        VOCABULARY_FILE: vocabulary_json,
        # tag_bias_init only matters at initialisation: not thousands of numbers in every checkpoint
        MODEL_CONFIG_FILE: json.dumps({**model_config.to_dict(), "tag_bias_init": None}, indent=2),
        PREPROCESS_FILE: json.dumps(preprocess.to_dict(), indent=2),
    }


@dataclass
class CheckpointPayload:
    """Everything one checkpoint folder holds, already on the CPU."""

    step: int
    model_state: dict[str, torch.Tensor]
    training_state: dict[str, Any]
    files: dict[str, str]  # text files: name -> content (see checkpoint_files)
    ema_state: dict[str, torch.Tensor] | None = None
    is_best: bool = False


def _to_cpu(obj: Any) -> Any:
    """Deep copy of nested containers with every tensor copied to the CPU."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().to("cpu", copy=True)
    if isinstance(obj, dict):
        return {k: _to_cpu(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_to_cpu(v) for v in obj)
    return obj


def snapshot_state(
    model_state: Mapping[str, torch.Tensor], training_state: Mapping[str, Any], ema_state: Mapping[str, torch.Tensor] | None
) -> tuple[dict, dict, dict | None]:
    """Copy model, training and EMA state to the CPU at a step boundary (for async writes)."""
    return (_to_cpu(dict(model_state)), _to_cpu(dict(training_state)), _to_cpu(dict(ema_state)) if ema_state is not None else None)


def _save_safetensors(tensors: Mapping[str, torch.Tensor], path: Path) -> None:
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path))


def _fsync_dir_files(folder: Path) -> None:
    for p in folder.iterdir():
        # "r+b": Windows flushes only handles opened for writing
        with open(p, "r+b") as fh:
            os.fsync(fh.fileno())


class CheckpointManager:
    """Writes the checkpoint folders of one run, moves the last/best pointers and prunes old folders.

    `owns(step_folder)` says whether this run's lineage wrote a folder (run_folder.is_own_checkpoint
    bound to the run id); pruning considers only those, so a folder left by another run (or by a
    version of the trainer without run ids) is never deleted. None: every folder counts as own.
    """

    def __init__(self, checkpoint_dir: str | Path, keep_last: int = 3, owns: Callable[[Path], bool] | None = None) -> None:
        """Manage `checkpoint_dir`, keeping the newest `keep_last` own step folders (plus best and last)."""
        if keep_last < 1:
            raise ValueError(f"keep_last must be >= 1, got {keep_last}")
        self.dir = Path(checkpoint_dir)
        self.keep_last = keep_last
        self.owns = owns

    def write(self, payload: CheckpointPayload) -> Path:
        """Write one checkpoint folder atomically, update pointers, prune; returns the folder."""
        self.dir.mkdir(parents=True, exist_ok=True)
        name = step_folder_name(payload.step)
        final = self.dir / name
        tmp = self.dir / f".tmp_{name}_{os.getpid()}"
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir()
        try:
            _save_safetensors(payload.model_state, tmp / MODEL_WEIGHTS)
            if payload.ema_state is not None:
                _save_safetensors(payload.ema_state, tmp / EMA_WEIGHTS)
            torch.save(payload.training_state, tmp / TRAINING_STATE)
            for fname, text in payload.files.items():
                (tmp / fname).write_text(text, encoding="utf-8")
            _fsync_dir_files(tmp)
            (tmp / COMPLETE_MARKER).write_text(f"step {payload.step}\n", encoding="utf-8")
            if final.exists():  # a rewrite of the same step (e.g. final save after a periodic one)
                shutil.rmtree(final)
            replace_with_retry(tmp, final)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        atomic_write_text(self.dir / LAST_POINTER, name + "\n")
        if payload.is_best:
            atomic_write_text(self.dir / BEST_POINTER, name + "\n")
        self.prune()
        return final

    def prune(self) -> list[Path]:
        """Delete own complete step folders beyond the newest keep_last own ones, never the best or
        last; returns the deleted folders."""
        keep = {_pointer_target(self.dir / BEST_POINTER), _pointer_target(self.dir / LAST_POINTER)}
        own = [path for _, path in complete_steps(self.dir) if self.owns is None or self.owns(path)]
        deleted = [path for path in own[: -self.keep_last] if path.name not in keep]
        for path in deleted:
            shutil.rmtree(path, ignore_errors=True)
        return deleted


class AsyncCheckpointWriter:
    """Writes checkpoints on a background thread; errors surface in the training loop.

    `submit` takes a payload already copied to the CPU (so training can go on mutating the live
    tensors) and returns at once; at most one write is in flight, a second submit waits for the
    first. A failed write (disk full, permission) is raised by the next `submit`, `check` or
    `wait` call; the earlier checkpoints are untouched because a write only replaces its own
    folder.
    """

    def __init__(self, manager: CheckpointManager, enabled: bool = True, on_written: Callable[[Path, float], None] | None = None) -> None:
        """Write through `manager`; `enabled=False` writes in the calling thread; `on_written(folder, seconds)`."""
        self.manager = manager
        self.enabled = enabled
        self.on_written = on_written
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None

    def _run(self, payload: CheckpointPayload) -> None:
        start = time.perf_counter()
        try:
            folder = self.manager.write(payload)
        except BaseException as exc:  # re-raised in the training thread by check()
            self._error = exc
            return
        if self.on_written is not None:
            self.on_written(folder, time.perf_counter() - start)

    def submit(self, payload: CheckpointPayload) -> None:
        """Queue a write (waits for the previous one first)."""
        self.wait()
        if not self.enabled:
            self._run(payload)
            self.check()
            return
        self._thread = threading.Thread(target=self._run, args=(payload,), name="checkpoint-writer", daemon=True)
        self._thread.start()

    def check(self) -> None:
        """Raise the error of a failed background write, once."""
        if self._error is not None:
            err, self._error = self._error, None
            raise RuntimeError(f"writing a checkpoint failed: {err}") from err

    def wait(self) -> None:
        """Block until the write in flight is done, then raise its error if any."""
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        self.check()


# --------------------------------------------------------------------------------------------
# Finding
# --------------------------------------------------------------------------------------------


def _pointer_target(pointer: Path) -> str | None:
    """The step folder name a last/best pointer file holds (None when absent or empty)."""
    if not pointer.is_file():
        return None
    return pointer.read_text(encoding="utf-8", errors="replace").strip() or None


def complete_steps(checkpoint_dir: str | Path) -> list[tuple[int, Path]]:
    """(step, folder) of every complete checkpoint in a checkpoints folder, oldest first."""
    folder = Path(checkpoint_dir)
    if not folder.is_dir():
        return []
    found = []
    for p in folder.iterdir():
        step = parse_step(p.name)
        if step is not None and p.is_dir() and (p / COMPLETE_MARKER).is_file():
            found.append((step, p))
    return sorted(found)


def latest_checkpoint(checkpoint_dir: str | Path) -> Path | None:
    """The newest complete checkpoint folder (folders without COMPLETE are ignored)."""
    steps = complete_steps(checkpoint_dir)
    return steps[-1][1] if steps else None


def is_checkpoint_reference(path: str | Path) -> bool:
    """Whether a path names a checkpoint (a folder or a last/best pointer) rather than a weights file."""
    p = Path(path)
    return p.is_dir() or (p.is_file() and p.name in (LAST_POINTER, BEST_POINTER))


def is_release_folder(path: str | Path) -> bool:
    """Whether `path` is a released WD tagger folder (wd_release's layout, complete or not), not a checkpoint step folder."""
    path = Path(path)
    return path.is_dir() and not (path / COMPLETE_MARKER).is_file() and release_layout(path) is not None


def resolve_checkpoint(path: str | Path) -> Path:
    """A step folder, or a `last`/`best` pointer file, to a complete step folder."""
    path = Path(path)
    if path.is_file():
        target = _pointer_target(path) or ""
        if parse_step(target) is None:
            raise FileNotFoundError(
                f"checkpoint not found: {path} is neither a step folder nor a last/best pointer naming one (it holds {target[:40]!r})"
            )
        path = path.parent / target
    if not path.is_dir():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    if is_release_folder(path):
        # a release folder is not a half-written checkpoint: say what it is (and what a bad one lacks)
        problem = release_problem(path)
        raise ValueError(
            problem
            or f"{path} is a released WD tagger folder (config.json + model.safetensors + selected_tags.csv), not a training checkpoint (step_<N> folder)"
        )
    if not (path / COMPLETE_MARKER).is_file():
        raise FileNotFoundError(f"checkpoint {path} is incomplete (no {COMPLETE_MARKER} marker): it was not fully written")
    return path


def find_resume_checkpoint(resume: str | None, run_dir: Path) -> Path | None:
    """The checkpoint folder --resume names (None when not resuming)."""
    if resume is None:
        return None
    if resume == "latest":
        folder = latest_checkpoint(checkpoints_dir(run_dir))
        if folder is None:
            raise FileNotFoundError(f"--resume latest: no complete checkpoint in {checkpoints_dir(run_dir)}")
        return folder
    return resolve_checkpoint(resume)


# --------------------------------------------------------------------------------------------
# Reading
# --------------------------------------------------------------------------------------------


def load_model_state(folder: str | Path, ema: bool = False) -> dict[str, torch.Tensor]:
    """Weights from a checkpoint folder (ema=True: the EMA weights)."""
    path = Path(folder) / (EMA_WEIGHTS if ema else MODEL_WEIGHTS)
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found" + (" (the run had no EMA)" if ema else ""))
    return load_file(str(path))


def has_ema(folder: str | Path) -> bool:
    """Whether a checkpoint folder holds EMA weights."""
    return (Path(folder) / EMA_WEIGHTS).is_file()


def load_training_state(folder: str | Path) -> dict[str, Any]:
    """training_state.pt, refusing anything but tensors and plain types."""
    path = Path(folder) / TRAINING_STATE
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise ValueError(f"{path} holds objects other than tensors and plain types; refusing to load it ({str(exc).splitlines()[0]})") from exc
    if not isinstance(state, dict) or state.get("format_version") != CHECKPOINT_FORMAT_VERSION:
        raise ValueError(f"{path} is not a training state of format {CHECKPOINT_FORMAT_VERSION}")
    return state


def read_checkpoint_json(folder: str | Path, name: str) -> Any:
    """One JSON file of a checkpoint folder (FileNotFoundError / ValueError name it)."""
    return load_json_file(Path(folder) / name, name)


def read_run_config(folder: str | Path) -> RootConfig:
    """The run config a checkpoint was written with (validated like any config file)."""
    path = Path(folder) / CONFIG_FILE
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise FileNotFoundError(f"{path} not found: not a checkpoint folder") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}".splitlines()[0]) from exc
    return config_from_dict(data or {}, where=f"{path}: ")


@dataclass
class CheckpointContents:
    """What a model needs from a checkpoint folder: its shape, tags, preprocessing and weights."""

    folder: Path
    step: int | None  # None when the folder is not named step_<N>
    model_config: TaggerConfig  # VisionTransformerConfig or TimmTaggerConfig: timm_tagger.build_tagger builds either
    vocab: TagVocabulary
    preprocess: PreprocessParams
    state_dict: dict[str, torch.Tensor]  # the model's (or, with ema=True, the EMA's) weights


def read_checkpoint(path: str | Path, *, ema: bool = False) -> CheckpointContents:
    """Model config, vocabulary, preprocessing and weights of a step folder or last/best pointer."""
    folder = resolve_checkpoint(path)
    vocab = TagVocabulary.load(folder / VOCABULARY_FILE)
    model_config = tagger_config_from_dict(read_checkpoint_json(folder, MODEL_CONFIG_FILE))
    if model_config.num_tags != len(vocab):
        raise ValueError(f"{folder}: model has {model_config.num_tags} tag outputs but the vocabulary {len(vocab)} tags")
    state_dict = load_model_state(folder, ema=ema)
    preprocess = PreprocessParams.from_dict(read_checkpoint_json(folder, PREPROCESS_FILE))
    return CheckpointContents(folder, parse_step(folder.name), model_config, vocab, preprocess, state_dict)
