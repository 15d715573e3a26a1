"""Who owns a run folder: its lock, its run id (lineage), and refusing a fresh run into an old run.

- `claim_run_folder` is what training calls first, right after joining the torchrun group and
  before anything reads or writes the folder: rank 0 takes the folder's lock (run_lock.py),
  refuses a fresh run (no --resume) into a folder that already holds a run, picks the next free
  `name-2`, `name-3`, ... instead when asked to (`--new-run-folder`), and mints or reads the run id;
  every other rank waits for rank 0's outcome (one broadcast) and gets the same folder and id or
  the same error.
- The run id (a uuid) is minted when a run starts fresh and kept in `<run>/run.json` across
  resumes. Training copies that file into every checkpoint folder it writes (`run_record_text`),
  so the checkpoint pruner can tell this lineage's checkpoints from any other's
  (`is_own_checkpoint`): it deletes only folders whose run id is this run's. Folders without a
  run id (written before lineage existed) are never deleted automatically.
"""

from __future__ import annotations

import json
import re
import uuid
from collections.abc import Callable
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from checkpoint_store import BEST_POINTER, LAST_POINTER, checkpoints_dir, parse_step
from file_io import atomic_write_text, load_json_file
from run_lock import LOCK_NAME, RunLock, RunLockError

__all__ = [
    "NEW_FOLDER_FLAG",
    "RUN_RECORD_NAME",
    "RunClaim",
    "RunFolderInUseError",
    "RunRecord",
    "checkpoint_run_id",
    "claim_run_folder",
    "existing_run",
    "is_own_checkpoint",
    "next_free_run_dir",
    "read_run_record",
    "refuse_fresh_run",
    "run_record_text",
]

RUN_RECORD_NAME = "run.json"
NEW_FOLDER_FLAG = "--new-run-folder"  # the trainer's opt-in flag for a suffixed new folder
# Files at the top of a run folder that mean "a run was started here" (besides checkpoints).
RUN_FILES = ("config.yaml", "metrics.jsonl", RUN_RECORD_NAME)
_UUID_HEX = re.compile(r"^[0-9a-f]{32}$")
MAX_SUFFIX = 1000


class RunFolderInUseError(RunLockError):
    """A fresh run was pointed at a folder that already holds a run (one line saying what to do)."""


@dataclass(frozen=True)
class RunRecord:
    """`<run>/run.json`: the lineage id of the run living in a folder."""

    run_id: str
    experiment_name: str
    created_at: str  # ISO 8601, UTC, when the run started fresh

    @classmethod
    def new(cls, experiment_name: str, run_id: str | None = None) -> RunRecord:
        """A fresh record (a new random run id unless one is given)."""
        return cls(
            run_id=run_id or uuid.uuid4().hex, experiment_name=experiment_name, created_at=datetime.now(timezone.utc).isoformat(timespec="seconds")
        )

    @classmethod
    def from_json(cls, data: Any, path: Path) -> RunRecord:
        """Validate a parsed run.json (untrusted data); ValueError names the file."""
        if not isinstance(data, dict) or not isinstance(data.get("run_id"), str) or not _UUID_HEX.match(data["run_id"]):
            raise ValueError(f"{path}: not a run record (expected a JSON object with a 32-hex-digit run_id)")
        return cls(run_id=data["run_id"], experiment_name=str(data.get("experiment_name", "")), created_at=str(data.get("created_at", "")))


def run_record_text(record: RunRecord) -> str:
    """run.json's text; training also writes it into every checkpoint folder (files dict)."""
    return json.dumps(asdict(record), indent=2) + "\n"


def read_run_record(folder: str | Path) -> RunRecord | None:
    """The run.json of a run folder or a checkpoint folder; None when there is none."""
    path = Path(folder) / RUN_RECORD_NAME
    if not path.is_file():
        return None
    return RunRecord.from_json(load_json_file(path, RUN_RECORD_NAME), path)


def checkpoint_run_id(step_folder: str | Path) -> str | None:
    """The run id a checkpoint folder was written by; None when it has none or an unreadable one."""
    try:
        record = read_run_record(step_folder)
    except ValueError:
        return None  # damaged: unknown lineage, so never pruned
    return None if record is None else record.run_id


def is_own_checkpoint(step_folder: str | Path, run_id: str) -> bool:
    """Whether this run lineage wrote the checkpoint folder (the pruner deletes only these)."""
    return checkpoint_run_id(step_folder) == run_id


# --------------------------------------------------------------------------------------------
# Does a folder already hold a run?
# --------------------------------------------------------------------------------------------


def existing_run(run_dir: str | Path) -> list[str]:
    """What marks `run_dir` as holding a run: e.g. ['3 checkpoints', 'config.yaml']; [] for none."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        return []
    found = []
    ckpt = checkpoints_dir(run_dir)
    if ckpt.is_dir():
        steps = [p for p in ckpt.iterdir() if p.is_dir() and parse_step(p.name) is not None]
        pointers = [name for name in (LAST_POINTER, BEST_POINTER) if (ckpt / name).is_file()]
        if steps:
            found.append(f"{len(steps)} checkpoint{'s' if len(steps) != 1 else ''}")
        elif pointers:
            found.append("checkpoint pointers " + "/".join(pointers))
    found.extend(name for name in RUN_FILES if (run_dir / name).is_file())
    return found


def refuse_fresh_run(run_dir: str | Path) -> None:
    """Raise RunFolderInUseError when a fresh run (no --resume) would land in an earlier run's folder."""
    run_dir = Path(run_dir)
    found = existing_run(run_dir)
    if not found:
        return
    other = next_free_run_dir(run_dir)
    if any("checkpoint" in item for item in found):
        todo = f"continue it with --resume latest, start another with --set experiment_name=NAME, or pass {NEW_FOLDER_FLAG} to train into {other}"
    else:
        todo = (
            f"it has no checkpoint to resume: delete the folder, start with --set experiment_name=NAME, "
            f"or pass {NEW_FOLDER_FLAG} to train into {other}"
        )
    raise RunFolderInUseError(
        f"{run_dir} already holds a run ({', '.join(found)}); refusing to start a fresh "
        f"one there (it would mix logs and replace its checkpoints): {todo}"
    )


def next_free_run_dir(run_dir: str | Path) -> Path:
    """`run_dir` if it holds no run, else the first of name-2, name-3, ... that holds none and is unlocked."""
    run_dir = Path(run_dir)
    for n in range(1, MAX_SUFFIX + 1):
        candidate = run_dir if n == 1 else run_dir.with_name(f"{run_dir.name}-{n}")
        if not existing_run(candidate) and not (candidate / LOCK_NAME).exists():
            return candidate
    raise RunFolderInUseError(f"{run_dir}: {run_dir.name}-2 ... {run_dir.name}-{MAX_SUFFIX} all hold runs; choose another experiment_name")


# --------------------------------------------------------------------------------------------
# Claiming a folder at start-up
# --------------------------------------------------------------------------------------------


@dataclass
class RunClaim:
    """The folder a process trains into, its run id, and (rank 0) the lock it holds."""

    run_dir: Path
    run_id: str
    lock: RunLock | None  # rank 0 only
    note: str | None = None  # a line worth printing (a new folder was chosen, a legacy run got an id)
    fresh: bool = False  # a fresh run (rank 0): abandon() may undo the claim
    created: tuple[Path, ...] = ()  # folders the claim created, deepest first (rank 0, fresh runs)

    def release(self) -> None:
        """Release the lock (rank 0); safe to call on every rank and more than once."""
        if self.lock is not None:
            self.lock.release()

    def abandon(self) -> None:
        """Undo a fresh claim whose run stopped before training (a setup error): remove its
        run.json, release the lock and remove the folders the claim created if they are empty, so
        that the same command runs again once the setting is fixed. Files other code wrote stay."""
        if not self.fresh or self.lock is None or not self.lock.held:
            self.release()
            return
        try:
            record = read_run_record(self.run_dir)
        except ValueError:
            record = None  # not the record this claim wrote: leave it
        if record is not None and record.run_id == self.run_id:
            (self.run_dir / RUN_RECORD_NAME).unlink(missing_ok=True)
        self.release()
        for folder in self.created:
            try:
                folder.rmdir()
            except OSError:  # not empty (other files were written) or already gone
                break


def _missing_folders(folder: Path) -> tuple[Path, ...]:
    """`folder` and its parents that do not exist yet, deepest first (what creating it will add)."""
    return tuple(p for p in (folder, *folder.parents) if not p.exists())


def _lock_fresh_folder(run_dir: Path, new_folder: bool, run_id: str, log: Callable[[str], None] | None) -> tuple[RunLock, tuple[Path, ...]]:
    """Lock `run_dir` for a fresh run, or with new_folder the first free suffixed folder; also
    returns the folders that locking created."""
    if not new_folder:
        created = _missing_folders(run_dir)
        lock = RunLock(run_dir, run_id=run_id, log=log).acquire()
        try:
            refuse_fresh_run(run_dir)  # checked under the lock, so no other process can start there meanwhile
        except RunFolderInUseError:
            lock.release()
            raise
        return lock, created
    for n in range(1, MAX_SUFFIX + 1):
        candidate = run_dir if n == 1 else run_dir.with_name(f"{run_dir.name}-{n}")
        if existing_run(candidate):
            continue
        created = _missing_folders(candidate)
        try:
            lock = RunLock(candidate, run_id=run_id, log=log).acquire()
        except RunLockError:
            continue  # another process is starting there right now
        if not existing_run(candidate):
            return lock, created
        lock.release()
    raise RunFolderInUseError(f"{run_dir}: {run_dir.name}-2 ... {run_dir.name}-{MAX_SUFFIX} all hold runs; choose another experiment_name")


def _claim_on_this_process(run_dir: Path, resume: bool, new_folder: bool, log: Callable[[str], None] | None) -> RunClaim:
    """Rank 0's part: lock, refuse or choose the folder, read or mint the run id."""
    note = None
    write_record = not resume
    created: tuple[Path, ...] = ()
    if resume:
        try:
            record = read_run_record(run_dir)
        except ValueError as exc:
            raise RunFolderInUseError(
                f"{exc}; restore it from a checkpoint folder's {RUN_RECORD_NAME} or delete it to give the run a new id"
            ) from exc
        if record is None:  # a run from before lineage existed: it gets an id now
            record = RunRecord.new(run_dir.name)
            write_record = True
            note = (
                f"{run_dir / RUN_RECORD_NAME}: new run id {record.run_id}; checkpoints written before it have none and are never pruned automatically"
            )
        lock = RunLock(run_dir, run_id=record.run_id, log=log).acquire()
    else:
        run_id = uuid.uuid4().hex
        lock, created = _lock_fresh_folder(run_dir, new_folder, run_id, log)
        record = RunRecord.new(lock.run_dir.name, run_id)
        if lock.run_dir != run_dir:
            note = f"run folder: {lock.run_dir} ({run_dir} already holds a run)"
    if write_record:
        try:
            atomic_write_text(lock.run_dir / RUN_RECORD_NAME, run_record_text(record))
        except OSError:
            lock.release()
            raise
    return RunClaim(run_dir=lock.run_dir, run_id=record.run_id, lock=lock, note=note, fresh=not resume, created=created)


def claim_run_folder(
    run_dir: str | Path,
    *,
    resume: bool,
    new_folder: bool = False,
    rank: int = 0,
    share: Callable[[list], Any] | None = None,
    log: Callable[[str], None] | None = None,
) -> RunClaim:
    """Lock the run folder (rank 0) and agree on folder and run id across ranks.

    Raises RunLockError (another live process holds the folder, a lock from another host, or the
    folder cannot be created) or RunFolderInUseError (a fresh run into an earlier run's folder) on every rank. `share(box)` must
    broadcast the one-element list `box` from rank 0 in place (torch.distributed.broadcast_object_list
    does); None for a single process.
    """
    run_dir = Path(run_dir)
    claim: RunClaim | None = None
    outcome: dict[str, Any] = {}
    if rank == 0:
        try:
            claim = _claim_on_this_process(run_dir, resume, new_folder, log)
            outcome = {"run_dir": str(claim.run_dir), "run_id": claim.run_id, "note": claim.note}
        except RunLockError as exc:  # RunFolderInUseError included
            outcome = {"error": str(exc), "in_use": isinstance(exc, RunFolderInUseError)}
        except OSError as exc:  # e.g. no permission to create the folder: every rank must hear of it
            outcome = {"error": f"{run_dir}: cannot claim the run folder ({exc})", "in_use": False}
    if share is not None:
        box: list = [outcome]
        share(box)
        outcome = box[0]
    if "error" in outcome:
        raise (RunFolderInUseError if outcome["in_use"] else RunLockError)(outcome["error"])
    if claim is None:
        claim = RunClaim(run_dir=Path(outcome["run_dir"]), run_id=outcome["run_id"], lock=None, note=outcome["note"])
    return claim
