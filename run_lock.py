"""One training process per run folder: an exclusive lock file in the folder.

The lock is `<run>/run.lock`, created with `os.open(O_CREAT | O_EXCL)` (atomic on POSIX and on
Windows) and holding JSON: the holder's pid, host name, process start time (psutil
`create_time`), command line, start date, a random lock id and the run id. A second process that
finds it gets one line naming the folder, the holder and what to do.

A lock is stale, and is taken over with a message, only when it was written on THIS host and its
process is gone: the pid no longer exists, is a zombie, or belongs to a process started at another
time (pid reuse; containers restart their processes with the same small pids). A lock written on
another host is never taken over: this machine cannot see that host's processes, so the error says
which host holds it and to delete the file if that machine is no longer training. Two processes
taking over the same stale lock at once are serialised by a second O_EXCL file
(`run.lock.takeover`), so exactly one wins.

The lock is released by `release()`, by leaving a `with` block and, as a backstop, at interpreter
exit (atexit). A SIGKILLed or crashed process leaves its lock behind; the next start sees that the
process is gone and takes it over.

torchrun: only rank 0 takes the lock; the other ranks take none and wait for rank 0's outcome
(`run_folder.claim_run_folder` does this), so no rank touches the folder before the lock exists.
The holder's pid is rank 0's: when a torchrun job dies, rank 0 dies with it and the lock becomes
stale like any other. This module imports nothing from the project and not torch, so it stays
cheap to import in tools and tests.
"""

from __future__ import annotations

import atexit
import json
import os
import socket
import sys
import time
import uuid
from collections.abc import Callable
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import psutil

__all__ = ["LOCK_NAME", "LockHolder", "RunLock", "RunLockError", "holder_state", "read_lock"]

LOCK_NAME = "run.lock"
TAKEOVER_SUFFIX = ".takeover"
# psutil derives a start time from boot time + start ticks; boot time can read 1 s apart between
# calls on some kernels, so start times closer than this are the same process. A reused pid
# started within 2 s of the original process is not a realistic case.
CREATE_TIME_TOLERANCE_S = 2.0
# A lock file is created empty and filled a moment later; readers retry this long before calling
# it unreadable.
PARTIAL_READ_WAIT_S = 1.0
# How long acquire() keeps trying while other processes race for a stale or vanishing lock.
CONTENDED_WAIT_S = 5.0


class RunLockError(RuntimeError):
    """The run folder is locked by another process (or its lock cannot be read): one line saying what to do."""


@dataclass(frozen=True)
class LockHolder:
    """What a lock file records about the process that holds it."""

    pid: int
    hostname: str
    create_time: float  # psutil.Process(pid).create_time(), seconds since the epoch
    command: str
    started_at: str  # ISO 8601, UTC
    lock_id: str  # random, tells this lock from a later one by the same process
    run_id: str | None = None

    @classmethod
    def of_this_process(cls, run_id: str | None) -> LockHolder:
        """The record for the calling process."""
        me = psutil.Process()
        return cls(
            pid=os.getpid(),
            hostname=socket.gethostname(),
            create_time=me.create_time(),
            command=" ".join([sys.executable, *sys.argv]),
            started_at=datetime.now(timezone.utc).isoformat(timespec="seconds"),
            lock_id=uuid.uuid4().hex,
            run_id=run_id,
        )

    @classmethod
    def from_json(cls, data: Any, path: Path) -> LockHolder:
        """Validate a parsed lock file (untrusted data); ValueError names the file."""
        if not isinstance(data, dict):
            raise ValueError(f"{path}: not a lock record (expected a JSON object)")
        try:
            holder = cls(
                pid=int(data["pid"]),
                hostname=str(data["hostname"]),
                create_time=float(data["create_time"]),
                command=str(data.get("command", "")),
                started_at=str(data.get("started_at", "")),
                lock_id=str(data["lock_id"]),
                run_id=None if data.get("run_id") is None else str(data["run_id"]),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"{path}: not a lock record ({type(exc).__name__}: {exc})") from exc
        if holder.pid <= 0:
            raise ValueError(f"{path}: not a lock record (pid {holder.pid})")
        return holder

    def describe(self) -> str:
        """'pid 123 on host, started 2026-...' for messages."""
        return f"pid {self.pid} on {self.hostname}, started {self.started_at or 'at an unknown time'}"


def read_lock(path: str | Path, wait_s: float = PARTIAL_READ_WAIT_S) -> LockHolder | None:
    """The holder recorded in a lock file; None when there is no file. A file that stays
    unparseable for `wait_s` (a writer may be between create and write) raises ValueError."""
    path = Path(path)
    deadline = time.monotonic() + wait_s
    while True:
        try:
            return LockHolder.from_json(json.loads(path.read_bytes().decode("utf-8")), path)
        except FileNotFoundError:
            return None
        # PermissionError: Windows refuses to open a file that is being deleted.
        except (PermissionError, UnicodeDecodeError, json.JSONDecodeError, ValueError) as exc:
            if time.monotonic() >= deadline:
                raise ValueError(f"{path}: unreadable lock file ({exc})") from exc
        time.sleep(0.05)


def holder_state(holder: LockHolder) -> str:
    """'alive', 'stale' (this host, process gone or pid reused) or 'foreign' (another host)."""
    if holder.hostname != socket.gethostname():
        return "foreign"
    try:
        proc = psutil.Process(holder.pid)
        if proc.status() == psutil.STATUS_ZOMBIE:  # exited, not yet reaped by its parent
            return "stale"
        started = proc.create_time()
    except psutil.NoSuchProcess:
        return "stale"
    except psutil.AccessDenied:
        return "alive"  # another user's live process: cannot compare start times, so do not take it over
    return "alive" if abs(started - holder.create_time) <= CREATE_TIME_TOLERANCE_S else "stale"


def _create_exclusive(path: Path, payload: bytes) -> bool:
    """Create `path` holding `payload` if it does not exist; False when it already exists."""
    try:
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY | getattr(os, "O_BINARY", 0), 0o644)
    except FileExistsError:
        return False
    try:
        os.write(fd, payload)
        os.fsync(fd)
    finally:
        os.close(fd)
    return True


def _unlink(path: Path, attempts: int = 10, delay_s: float = 0.05) -> None:
    """Remove a file if it exists; retried briefly on Windows, where a reader holding it open blocks deletion."""
    for attempt in range(attempts):
        try:
            path.unlink(missing_ok=True)
            return
        except PermissionError:
            if attempt == attempts - 1:
                raise
            time.sleep(delay_s * (attempt + 1))


class RunLock:
    """The exclusive lock of one run folder; use as a context manager or acquire()/release()."""

    def __init__(self, run_dir: str | Path, run_id: str | None = None, log: Callable[[str], None] | None = None) -> None:
        """Lock `run_dir` (created if missing); `log` receives the take-over message (default: stderr)."""
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / LOCK_NAME
        self.run_id = run_id
        self.log = log if log is not None else (lambda msg: print(msg, file=sys.stderr))
        self.holder: LockHolder | None = None  # set while this object holds the lock

    @property
    def held(self) -> bool:
        """True while this object holds the lock."""
        return self.holder is not None

    def acquire(self) -> RunLock:
        """Take the lock or raise RunLockError; a stale lock of this host is taken over (logged)."""
        if self.held:
            return self
        self.run_dir.mkdir(parents=True, exist_ok=True)
        mine = LockHolder.of_this_process(self.run_id)
        payload = (json.dumps(asdict(mine), indent=2) + "\n").encode("utf-8")
        deadline = time.monotonic() + CONTENDED_WAIT_S
        while time.monotonic() < deadline:  # retried while the lock vanishes or others take it over
            if _create_exclusive(self.path, payload):
                self._hold(mine)
                return self
            try:
                other = read_lock(self.path)
            except ValueError as exc:
                raise RunLockError(
                    f"{self.run_dir} has a lock file that cannot be read ({exc}); if no training "
                    f"is running in this folder, delete {self.path} and start again"
                ) from exc
            if other is None:
                continue
            state = holder_state(other)
            if state == "alive":
                raise RunLockError(
                    f"{self.run_dir} is in use by another training process ({other.describe()}: {other.command}); "
                    f"wait for it to finish, stop it (Ctrl+C, or a file named STOP in {self.run_dir}), "
                    "or train into another folder with --set experiment_name=NAME"
                )
            if state == "foreign":
                raise RunLockError(
                    f"{self.run_dir} is locked by a training process on another machine ({other.describe()}); "
                    f"this machine ({socket.gethostname()}) cannot check whether it still runs: if it does not, "
                    f"delete {self.path} and start again"
                )
            if self._take_over(other, payload):
                self.log(f"run lock: took over {self.path} left by {other.describe()}, which is no longer running")
                self._hold(mine)
                return self
            time.sleep(0.05)  # another process is taking it over: look again once it is done
        guard = self.path.with_name(self.path.name + TAKEOVER_SUFFIX)
        raise RunLockError(
            f"{self.run_dir}: could not take the run lock {self.path} within {CONTENDED_WAIT_S:.0f} s "
            f"(other processes keep taking it over); try again, and if no other training is starting "
            f"here, delete {guard}"
        )

    def _take_over(self, stale: LockHolder, payload: bytes) -> bool:
        """Replace the stale lock by ours; False when another process changed it first."""
        guard = self.path.with_name(self.path.name + TAKEOVER_SUFFIX)
        guard_payload = json.dumps(asdict(LockHolder.of_this_process(self.run_id))).encode("utf-8")
        if not _create_exclusive(guard, guard_payload):
            self._clear_dead_guard(guard)
            return False
        try:
            try:
                current = read_lock(self.path)
            except ValueError:
                return False
            if current is not None and current.lock_id != stale.lock_id:
                return False  # someone else took over (or the holder restarted) meanwhile
            _unlink(self.path)
            return _create_exclusive(self.path, payload)
        finally:
            _unlink(guard)

    @staticmethod
    def _clear_dead_guard(guard: Path) -> None:
        """Remove a take-over guard left by a process that died inside a take-over."""
        try:
            holder = read_lock(guard, wait_s=0.2)
        except ValueError:
            return  # being written right now, or damaged: the next try looks again
        if holder is not None and holder_state(holder) == "stale":
            _unlink(guard)

    def _hold(self, mine: LockHolder) -> None:
        self.holder = mine
        atexit.register(self.release)

    def release(self) -> None:
        """Remove the lock file if it is still ours (idempotent)."""
        if self.holder is None:
            return
        mine, self.holder = self.holder, None
        atexit.unregister(self.release)
        try:
            current = read_lock(self.path, wait_s=0.0)
        except ValueError:
            return  # not ours any more (damaged by something else): leave it for a person to look at
        if current is not None and current.lock_id == mine.lock_id:
            _unlink(self.path)

    def __enter__(self) -> RunLock:
        """Acquire on entry."""
        return self.acquire()

    def __exit__(self, *exc_info: object) -> None:
        """Release on exit, error or not."""
        self.release()
