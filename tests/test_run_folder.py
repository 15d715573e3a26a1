"""run_folder.py: refusing a fresh run into an earlier run, suffixed folders, run lineage, ranks."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from run_folder import (
    RUN_RECORD_NAME,
    RunFolderInUseError,
    RunRecord,
    checkpoint_run_id,
    claim_run_folder,
    existing_run,
    is_own_checkpoint,
    next_free_run_dir,
    read_run_record,
    refuse_fresh_run,
    run_record_text,
)
from run_lock import LOCK_NAME, RunLock, read_lock

ROOT = Path(__file__).resolve().parents[1]


def fake_checkpoint(run_dir: Path, step: int, run_id: str | None) -> Path:
    """A step folder as training leaves it, with the run record of `run_id` (or none)."""
    folder = run_dir / "checkpoints" / f"step_{step}"
    folder.mkdir(parents=True)
    (folder / "COMPLETE").write_text(f"step {step}\n", encoding="utf-8")
    if run_id is not None:
        (folder / RUN_RECORD_NAME).write_text(run_record_text(RunRecord.new(run_dir.name, run_id)), encoding="utf-8")
    (run_dir / "checkpoints" / "last").write_text(f"step_{step}\n", encoding="utf-8")
    return folder


def test_existing_run_names_what_is_there(tmp_path: Path) -> None:
    assert existing_run(tmp_path / "missing") == []
    assert existing_run(tmp_path) == []
    (tmp_path / LOCK_NAME).write_text("{}", encoding="utf-8")  # a lock alone is not a run
    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "checkpoints" / "step_old").mkdir()  # a user's folder, not a checkpoint
    assert existing_run(tmp_path) == []
    (tmp_path / "metrics.jsonl").write_text("", encoding="utf-8")
    assert existing_run(tmp_path) == ["metrics.jsonl"]
    fake_checkpoint(tmp_path, 10, None)
    fake_checkpoint(tmp_path, 20, None)
    (tmp_path / "config.yaml").write_text("x: 1\n", encoding="utf-8")
    assert existing_run(tmp_path) == ["2 checkpoints", "config.yaml", "metrics.jsonl"]


def test_fresh_run_into_an_earlier_run_is_refused_in_one_line(tmp_path: Path) -> None:
    run_dir = tmp_path / "runs" / "exp"
    first = claim_run_folder(run_dir, resume=False)
    fake_checkpoint(run_dir, 5, first.run_id)
    (run_dir / "config.yaml").write_text("x: 1\n", encoding="utf-8")
    first.release()
    record_before = (run_dir / RUN_RECORD_NAME).read_text(encoding="utf-8")

    with pytest.raises(RunFolderInUseError) as info:
        claim_run_folder(run_dir, resume=False)
    message = str(info.value)
    assert len(message.splitlines()) == 1
    assert str(run_dir) in message and "1 checkpoint" in message
    assert "--resume latest" in message and "experiment_name" in message and "--new-run-folder" in message
    assert str(tmp_path / "runs" / "exp-2") in message
    assert not (run_dir / LOCK_NAME).exists()  # the refused process let go of the lock
    assert (run_dir / RUN_RECORD_NAME).read_text(encoding="utf-8") == record_before

    resumed = claim_run_folder(run_dir, resume=True)  # what the message says works
    assert resumed.run_id == first.run_id and resumed.note is None
    assert read_lock(run_dir / LOCK_NAME).run_id == first.run_id
    resumed.release()


def test_refusal_without_checkpoints_does_not_suggest_resuming(tmp_path: Path) -> None:
    (tmp_path / "config.yaml").write_text("x: 1\n", encoding="utf-8")  # e.g. killed before its first checkpoint
    with pytest.raises(RunFolderInUseError, match="no checkpoint to resume: delete the folder") as info:
        refuse_fresh_run(tmp_path)
    assert "--resume" not in str(info.value)


def test_new_run_folder_takes_the_first_free_suffix(tmp_path: Path) -> None:
    base = tmp_path / "exp"
    claims = [claim_run_folder(base, resume=False, new_folder=True) for _ in range(3)]
    assert [c.run_dir.name for c in claims] == ["exp", "exp-2", "exp-3"]
    assert claims[0].note is None and claims[1].note.startswith(f"run folder: {tmp_path / 'exp-2'}")
    assert len({c.run_id for c in claims}) == 3
    for c in claims:
        assert read_run_record(c.run_dir).run_id == c.run_id
        assert read_run_record(c.run_dir).experiment_name == c.run_dir.name
    # exp-4 is being started by a live process right now (locked, still empty): skipped
    busy = RunLock(tmp_path / "exp-4").acquire()
    for c in claims:
        c.release()
    fourth = claim_run_folder(base, resume=False, new_folder=True)
    assert fourth.run_dir.name == "exp-5"
    assert next_free_run_dir(base) == tmp_path / "exp-6"
    fourth.release()
    busy.release()
    assert next_free_run_dir(base) == tmp_path / "exp-4"
    assert next_free_run_dir(tmp_path / "unused") == tmp_path / "unused"


def test_run_id_is_kept_across_resumes_and_minted_for_legacy_runs(tmp_path: Path) -> None:
    fresh = claim_run_folder(tmp_path / "a", resume=False)
    fresh.release()
    for _ in range(2):
        again = claim_run_folder(tmp_path / "a", resume=True)
        assert again.run_id == fresh.run_id
        again.release()
    legacy = tmp_path / "legacy"
    fake_checkpoint(legacy, 3, None)
    claim = claim_run_folder(legacy, resume=True)
    assert "never pruned automatically" in claim.note
    assert read_run_record(legacy).run_id == claim.run_id
    claim.release()
    assert claim_run_folder(legacy, resume=True).run_id == claim.run_id


def test_damaged_run_record_is_refused(tmp_path: Path) -> None:
    (tmp_path / RUN_RECORD_NAME).write_text(json.dumps({"run_id": "../../etc"}), encoding="utf-8")
    with pytest.raises(RunFolderInUseError, match="not a run record"):
        claim_run_folder(tmp_path, resume=True)
    assert not (tmp_path / LOCK_NAME).exists()


def test_checkpoint_lineage(tmp_path: Path) -> None:
    mine, other = "a" * 32, "b" * 32
    own = fake_checkpoint(tmp_path, 1, mine)
    foreign = fake_checkpoint(tmp_path, 2, other)
    unknown = fake_checkpoint(tmp_path, 3, None)
    damaged = fake_checkpoint(tmp_path, 4, None)
    (damaged / RUN_RECORD_NAME).write_text("{", encoding="utf-8")
    assert checkpoint_run_id(own) == mine and checkpoint_run_id(unknown) is None and checkpoint_run_id(damaged) is None
    prunable = [p.name for p in (own, foreign, unknown, damaged) if is_own_checkpoint(p, mine)]
    assert prunable == ["step_1"]


def test_other_ranks_get_rank0s_outcome_without_touching_the_folder(tmp_path: Path) -> None:
    run_dir = tmp_path / "exp"
    boxes: list[list] = []
    claim0 = claim_run_folder(run_dir, resume=False, new_folder=False, rank=0, share=boxes.append)
    sent = boxes[0][0]

    def deliver(box: list) -> None:  # what broadcast_object_list does on a receiving rank
        box[0] = sent

    claim1 = claim_run_folder(tmp_path / "elsewhere", resume=False, rank=1, share=deliver)
    assert (claim1.run_dir, claim1.run_id, claim1.lock) == (run_dir, claim0.run_id, None)
    assert not (tmp_path / "elsewhere").exists()
    claim1.release()
    assert (run_dir / LOCK_NAME).exists()  # only rank 0's release lets go
    claim0.release()
    fake_checkpoint(run_dir, 1, claim0.run_id)

    boxes.clear()
    with pytest.raises(RunFolderInUseError):
        claim_run_folder(run_dir, resume=False, rank=0, share=boxes.append)
    sent = boxes[0][0]
    with pytest.raises(RunFolderInUseError, match="--resume latest"):
        claim_run_folder(run_dir, resume=False, rank=1, share=deliver)


RANKS = textwrap.dedent("""
    import os, sys
    sys.path.insert(0, {root!r})
    import torch.distributed as tdist
    from run_folder import claim_run_folder
    from run_lock import RunLockError
    from process_group import exit_process
    tdist.init_process_group("gloo")
    rank = tdist.get_rank()

    def say(line):
        # one write per line: the ranks share the pipe, and print's separate newline write interleaves
        os.write(1, (line + chr(10)).encode())

    try:
        claim = claim_run_folder(sys.argv[1], resume=False, rank=rank, share=tdist.broadcast_object_list)
        say(f"rank {{rank}} dir {{claim.run_dir}} id {{claim.run_id}} lock {{claim.lock is not None}}")
        tdist.barrier()
        claim.release()
    except RunLockError as exc:
        say(f"rank {{rank}} error {{type(exc).__name__}}")
    tdist.destroy_process_group()
    exit_process(0)
""").format(root=str(ROOT))


@pytest.mark.e2e
def test_torchrun_ranks_share_rank0s_lock(tmp_path: Path) -> None:
    script = tmp_path / "ranks.py"
    script.write_text(RANKS, encoding="utf-8")
    run_dir = tmp_path / "runs" / "exp"

    def torchrun() -> list[str]:
        proc = subprocess.run(
            [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", str(script), str(run_dir)],
            capture_output=True,
            text=True,
            timeout=240,
        )
        assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
        return sorted(line for line in proc.stdout.splitlines() if line.startswith("rank "))

    lines = torchrun()
    assert len(lines) == 2
    run_id = read_run_record(run_dir).run_id
    assert lines[0] == f"rank 0 dir {run_dir} id {run_id} lock True"
    assert lines[1] == f"rank 1 dir {run_dir} id {run_id} lock False"
    assert not (run_dir / LOCK_NAME).exists()
    fake_checkpoint(run_dir, 1, run_id)
    assert torchrun() == ["rank 0 error RunFolderInUseError", "rank 1 error RunFolderInUseError"]
    # A live holder elsewhere: both ranks hear of it.
    with RunLock(run_dir):
        lines = torchrun()
    assert lines == ["rank 0 error RunLockError", "rank 1 error RunLockError"]


def test_abandoned_fresh_claim_leaves_the_folder_as_it_was(tmp_path: Path) -> None:
    """A fresh run that stops at a setup error removes its run.json, lock and the folders it made,
    so the same command can start again; a resumed run's claim is only released."""
    run_dir = tmp_path / "runs" / "exp"
    claim = claim_run_folder(run_dir, resume=False)
    assert (run_dir / RUN_RECORD_NAME).is_file() and (run_dir / LOCK_NAME).is_file()
    claim.abandon()
    assert not (tmp_path / "runs").exists()
    claim = claim_run_folder(run_dir, resume=False)
    (run_dir / "split.json").write_text("{}", encoding="utf-8")  # written by the data setup
    claim.abandon()
    assert sorted(p.name for p in run_dir.iterdir()) == ["split.json"]
    claim_run_folder(run_dir, resume=False).release()  # not refused: no run started there
    resumed = claim_run_folder(run_dir, resume=True)
    resumed.abandon()
    assert (run_dir / RUN_RECORD_NAME).is_file() and not (run_dir / LOCK_NAME).exists()
