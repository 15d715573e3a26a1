"""run_lock.py: the run folder lock, between real processes."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import psutil
import pytest

from run_lock import LOCK_NAME, LockHolder, RunLock, RunLockError, holder_state, read_lock

ROOT = Path(__file__).resolve().parents[1]

# A process that takes the lock, says so, and holds it until its stdin closes.
HOLDER = textwrap.dedent("""
    import sys
    sys.path.insert(0, {root!r})
    from run_lock import RunLock
    lock = RunLock(sys.argv[1], log=lambda m: print(m, flush=True)).acquire()
    print("locked", flush=True)
    sys.stdin.read()
    lock.release()
    print("released", flush=True)
""").format(root=str(ROOT))

# A process that tries to take the lock once: exit 0 and 'locked' on success, exit 2 and the message otherwise.
TRY_ONCE = textwrap.dedent("""
    import sys
    sys.path.insert(0, {root!r})
    from run_lock import RunLock, RunLockError
    try:
        lock = RunLock(sys.argv[1], log=lambda m: print(m, flush=True)).acquire()
    except RunLockError as exc:
        print(f"error: {{exc}}", file=sys.stderr)
        sys.exit(2)
    print("locked", flush=True)
    sys.stdin.read()
""").format(root=str(ROOT))


def start_holder(run_dir: Path, code: str = HOLDER) -> subprocess.Popen:
    """Start a lock-holding process and wait until it holds the lock."""
    proc = subprocess.Popen(
        [sys.executable, "-c", code, str(run_dir)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    line = proc.stdout.readline()
    assert line.strip() == "locked", line + proc.stderr.read()
    return proc


def fake_lock(path: Path, **changes: object) -> LockHolder:
    """Write a lock record of this process with some fields changed."""
    holder = LockHolder.of_this_process(run_id=None)
    data = {**holder.__dict__, **changes}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data), encoding="utf-8")
    return LockHolder.from_json(data, path)


@pytest.mark.e2e
def test_second_process_fails_at_once_while_the_first_holds(tmp_path: Path) -> None:
    run_dir = tmp_path / "runs" / "exp"
    first = start_holder(run_dir)
    try:
        holder = read_lock(run_dir / LOCK_NAME)
        assert holder is not None and holder.pid == first.pid
        assert holder.hostname == socket.gethostname()
        assert holder.create_time == pytest.approx(psutil.Process(first.pid).create_time(), abs=0.01)
        assert "-c" in holder.command and holder.started_at and len(holder.lock_id) == 32

        t0 = time.monotonic()
        second = subprocess.run([sys.executable, "-c", TRY_ONCE, str(run_dir)], capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL)
        elapsed = time.monotonic() - t0
        assert second.returncode == 2
        message = second.stderr.strip()
        assert len(message.splitlines()) == 1
        assert str(run_dir) in message and f"pid {first.pid} on {socket.gethostname()}" in message
        assert holder.started_at in message and "experiment_name" in message and "STOP" in message
        assert elapsed < 10  # no waiting for the holder: interpreter start-up only
        assert first.poll() is None and read_lock(run_dir / LOCK_NAME).lock_id == holder.lock_id
    finally:
        out, _ = first.communicate("", timeout=60)
    assert "released" in out and not (run_dir / LOCK_NAME).exists()
    with RunLock(run_dir) as again:  # free once the first one is gone
        assert again.held


@pytest.mark.e2e
def test_lock_of_a_sigkilled_process_is_taken_over(tmp_path: Path) -> None:
    run_dir = tmp_path / "exp"
    victim = start_holder(run_dir)
    victim.kill()  # SIGKILL on POSIX, TerminateProcess on Windows: no clean-up runs
    messages: list[str] = []
    try:
        # Not reaped yet: on POSIX the pid is a zombie, which must count as gone.
        deadline = time.monotonic() + 10
        while psutil.pid_exists(victim.pid) and psutil.Process(victim.pid).status() != psutil.STATUS_ZOMBIE:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        assert (run_dir / LOCK_NAME).exists()
        with RunLock(run_dir, log=messages.append) as lock:
            assert read_lock(run_dir / LOCK_NAME).pid == os.getpid()
            assert lock.held
    finally:
        victim.wait(timeout=30)
    assert len(messages) == 1 and f"pid {victim.pid}" in messages[0] and "no longer running" in messages[0]
    assert not (run_dir / LOCK_NAME).exists()


def test_reused_pid_is_detected_by_its_start_time(tmp_path: Path) -> None:
    # Our own (live) pid, but a start time an hour off: the process that wrote it is gone.
    me = psutil.Process()
    stale = fake_lock(tmp_path / LOCK_NAME, create_time=me.create_time() - 3600.0, lock_id="0" * 32)
    assert holder_state(stale) == "stale"
    messages: list[str] = []
    lock = RunLock(tmp_path, log=messages.append).acquire()
    assert read_lock(tmp_path / LOCK_NAME).lock_id == lock.holder.lock_id != stale.lock_id
    assert len(messages) == 1
    lock.release()
    # The same pid with the right start time is alive and is not taken over.
    live = fake_lock(tmp_path / LOCK_NAME, lock_id="1" * 32)
    assert holder_state(live) == "alive"
    with pytest.raises(RunLockError, match="in use by another training process"):
        RunLock(tmp_path).acquire()
    assert read_lock(tmp_path / LOCK_NAME).lock_id == "1" * 32


def test_lock_from_another_host_is_never_taken_over(tmp_path: Path) -> None:
    # A pid that does not exist here: on this host that would be stale, on another host nobody can tell.
    foreign = fake_lock(tmp_path / LOCK_NAME, hostname="gpu-node-7.example", pid=2**22 + 12345, lock_id="2" * 32)
    assert holder_state(foreign) == "foreign"
    with pytest.raises(RunLockError) as info:
        RunLock(tmp_path).acquire()
    message = str(info.value)
    assert "gpu-node-7.example" in message and str(tmp_path / LOCK_NAME) in message and "delete" in message
    assert len(message.splitlines()) == 1
    assert read_lock(tmp_path / LOCK_NAME).lock_id == "2" * 32


def test_release_leaves_a_lock_that_is_not_ours(tmp_path: Path) -> None:
    lock = RunLock(tmp_path).acquire()
    fake_lock(tmp_path / LOCK_NAME, lock_id="3" * 32)  # e.g. replaced by hand meanwhile
    lock.release()
    assert read_lock(tmp_path / LOCK_NAME).lock_id == "3" * 32
    lock.release()  # idempotent


def test_context_manager_releases_on_error(tmp_path: Path) -> None:
    with pytest.raises(KeyError), RunLock(tmp_path / "new" / "run"):
        assert (tmp_path / "new" / "run" / LOCK_NAME).is_file()
        raise KeyError("boom")
    assert not (tmp_path / "new" / "run" / LOCK_NAME).exists()


def test_unreadable_lock_is_an_error_naming_the_file(tmp_path: Path) -> None:
    (tmp_path / LOCK_NAME).write_text("{not json", encoding="utf-8")
    with pytest.raises(RunLockError, match="cannot be read.*delete"):
        RunLock(tmp_path).acquire()
    assert (tmp_path / LOCK_NAME).read_text(encoding="utf-8") == "{not json"


@pytest.mark.e2e
def test_released_at_interpreter_exit(tmp_path: Path) -> None:
    code = f"import sys; sys.path.insert(0, {str(ROOT)!r}); from run_lock import RunLock; RunLock({str(tmp_path)!r}).acquire(); sys.exit(3)"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 3, proc.stderr
    assert not (tmp_path / LOCK_NAME).exists()


@pytest.mark.e2e
def test_racing_take_overs_of_one_stale_lock_have_one_winner(tmp_path: Path) -> None:
    me = psutil.Process()
    fake_lock(tmp_path / LOCK_NAME, create_time=me.create_time() - 3600.0, lock_id="4" * 32)
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", TRY_ONCE, str(tmp_path)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        for _ in range(4)
    ]
    try:
        # Winners hold the lock until stdin closes, so a loser cannot take it after a winner let go.
        deadline = time.monotonic() + 60
        while sum(p.poll() is not None for p in procs) < 3 and time.monotonic() < deadline:
            time.sleep(0.05)
        losers = [p for p in procs if p.poll() is not None]
        assert len(losers) == 3 and all(p.returncode == 2 for p in losers)
        winner = next(p for p in procs if p.poll() is None)
        assert read_lock(tmp_path / LOCK_NAME).pid == winner.pid
        for p in losers:
            assert "in use by another training process" in p.stderr.read()
    finally:
        for p in procs:
            p.communicate("", timeout=60)
