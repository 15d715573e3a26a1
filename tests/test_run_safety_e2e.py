"""Run safety, end to end with train_direct.py as a process: one training process per run folder,
no fresh run into an earlier run's folder, a stale lock taken over on resume, and an out-of-memory
error answered by micro-batches with the unsplit run's losses (an injected fault on the CPU)."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import ROOT, TINY_RUN, read_jsonl, run_cli
from micro_batching import OOM_FAULT_ENV

pytestmark = [pytest.mark.e2e, pytest.mark.skipif(sys.platform == "win32", reason="uses POSIX signals")]

STEPS = 16
RUN = TINY_RUN + [
    "data.batch_size=16",
    f"training.max_steps={STEPS}",
    "training.epochs=2",
    "checkpoint.every_steps=4",
    "validation.every_steps=8",
    "checkpoint.keep_last=2",
    "model.drop_path_rate=0.0",
]
FAULT = {OOM_FAULT_ENV: "4"}  # a micro-batch above 4 images "runs out of memory"


def train_args(data: Path, name: str, extra: list[str] = ()) -> list[str]:
    args = [str(ROOT / "train_direct.py"), "--config", str(ROOT / "configs" / "demo.yaml")]
    for o in RUN + [f"data.root={data}", "output_root=runs", f"experiment_name={name}", *extra]:
        args += ["--set", o]
    return args


def start(work: Path, args: list[str], env: dict[str, str] | None = None) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, *args],
        cwd=work,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=dict(os.environ, PYTHONUNBUFFERED="1", **(env or {})),
    )


def wait_for(path: Path, proc: subprocess.Popen, timeout: float = 240) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            _, err = proc.communicate()
            pytest.fail(f"{path} never appeared: {err[-2000:]}")
        time.sleep(0.05)


def step_losses(run_dir: Path) -> dict[int, float]:
    events = [e for e in read_jsonl(run_dir / "metrics.jsonl") if e["type"] == "train"]
    steps = [e["step"] for e in events]
    assert len(steps) == len(set(steps)), "a step logged twice"
    return {e["step"]: e["loss"] for e in events}


def last_weights(run_dir: Path) -> dict[str, torch.Tensor]:
    last = (run_dir / "checkpoints" / "last").read_text(encoding="utf-8").strip()
    assert last == f"step_{STEPS}", last
    return load_file(str(run_dir / "checkpoints" / last / "model.safetensors"))


def folder_digest(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def work(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("safety")


@pytest.mark.timeout(900)  # four tiny training runs on two shared cores
def test_injected_out_of_memory_continues_in_micro_batches_and_resumes_exactly(work: Path, demo_data: Path) -> None:
    """Batches of 16 'run out of memory' above micro-batches of 4: the run re-plans (16 -> 8 -> 4),
    logs and saves the split, and its per-step losses equal the unsplit run's within 1e-6
    relative. A copy killed with SIGKILL resumes (taking over the dead process's lock) with the
    saved split and ends bit-identical to the uninterrupted split run."""
    ref = run_cli(train_args(demo_data, "unsplit"), cwd=work)
    assert ref.returncode == 0, ref.stderr[-3000:]
    oom = run_cli(train_args(demo_data, "oom"), cwd=work, env=FAULT)
    assert oom.returncode == 0, oom.stderr[-3000:]
    assert "micro-batches: out of memory (CUDA out of memory (injected" in oom.stdout
    assert "now batches of 16 as 4 micro-batches of 4 (same gradient)" in oom.stdout
    oom_dir = work / "runs" / "oom"
    plans = [e for e in read_jsonl(oom_dir / "metrics.jsonl") if e.get("kind") == "micro_batches"]
    assert [(e["step"], e["micro_batch"]) for e in plans] == [(0, 16), (0, 8), (0, 4)]
    saved = torch.load(oom_dir / "checkpoints" / f"step_{STEPS}" / "training_state.pt", weights_only=True)
    assert saved["micro_batches"] == {"batch_size": 16, "micro_batch": 4, "accumulation": 4}
    assert "micro_batch_size: 4" in (oom_dir / "config.yaml").read_text(encoding="utf-8")
    unsplit, split = step_losses(work / "runs" / "unsplit"), step_losses(oom_dir)
    assert sorted(unsplit) == sorted(split) == list(range(1, STEPS + 1))
    worst = max(abs(unsplit[s] - split[s]) / abs(unsplit[s]) for s in unsplit)
    assert worst <= 1e-6, worst

    killed_dir = work / "runs" / "killed"
    proc = start(work, train_args(demo_data, "killed"), env=FAULT)
    wait_for(killed_dir / "checkpoints" / "step_8" / "COMPLETE", proc)
    proc.send_signal(signal.SIGKILL)
    proc.communicate(timeout=60)
    assert (killed_dir / "run.lock").is_file()  # left behind by the killed process
    resumed = run_cli(train_args(demo_data, "killed") + ["--resume", "latest"], cwd=work, env=FAULT)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "run lock: took over" in resumed.stdout and "no longer running" in resumed.stdout
    assert "micro-batches: batches of 16 as 4 micro-batches of 4 (same gradient) (auto: the checkpoint's split)" in resumed.stdout
    assert "out of memory" not in resumed.stdout  # the saved split was used from the first step
    assert not (killed_dir / "run.lock").exists()
    assert step_losses(killed_dir) == split  # exact float equality, every step
    wa, wb = last_weights(oom_dir), last_weights(killed_dir)
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_second_process_on_one_experiment_stops_at_once(work: Path, demo_data: Path) -> None:
    """While one run trains, the same command stops within seconds with the lock's one-line
    message; the first run finishes untouched (every step logged once, its checkpoints intact)."""
    run_dir = work / "runs" / "twice"
    first = start(work, train_args(demo_data, "twice"))
    wait_for(run_dir / "run.lock", first)
    t0 = time.monotonic()
    second = run_cli(train_args(demo_data, "twice"), cwd=work, timeout=120)
    elapsed = time.monotonic() - t0
    out, err = first.communicate(timeout=300)
    assert first.returncode == 0, err[-3000:]
    assert second.returncode == 2, second.stderr[-2000:]
    lines = [line for line in second.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "is in use by another training process" in lines[0] and f"pid {first.pid}" in lines[0]
    assert elapsed < 30, elapsed  # interpreter and torch import on 2 busy cores; no data scan, no model
    assert sorted(step_losses(run_dir)) == list(range(1, STEPS + 1))
    assert [e["kind"] for e in read_jsonl(run_dir / "metrics.jsonl") if e.get("kind") in ("micro_batches", "end")] == ["micro_batches", "end"]
    assert not (run_dir / "run.lock").exists()


def test_fresh_run_into_an_existing_run_folder_is_refused(work: Path, demo_data: Path) -> None:
    """A fresh run (no --resume) with an old run's experiment_name is refused in one line before it
    writes anything, and every file of the old run is unchanged; --new-run-folder trains into
    NAME-2, whose pruning leaves the old run's checkpoints alone."""
    run_dir = work / "runs" / "twice"  # finished by the previous test
    if not (run_dir / "checkpoints" / "best").is_file():
        pytest.skip("needs the run of test_second_process_on_one_experiment_stops_at_once")
    before = folder_digest(run_dir)
    refused = run_cli(train_args(demo_data, "twice"), cwd=work, timeout=120)
    assert refused.returncode == 2
    lines = [line for line in refused.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "already holds a run" in lines[0] and "--new-run-folder" in lines[0], refused.stderr
    assert folder_digest(run_dir) == before
    other = run_cli(train_args(demo_data, "twice", ["training.max_steps=4"]) + ["--new-run-folder"], cwd=work)
    assert other.returncode == 0, other.stderr[-3000:]
    assert "runs/twice-2" in other.stdout
    assert folder_digest(run_dir) == before
    first_id = json.loads((run_dir / "run.json").read_text(encoding="utf-8"))["run_id"]
    second_id = json.loads((work / "runs" / "twice-2" / "run.json").read_text(encoding="utf-8"))["run_id"]
    assert first_id != second_id
    copied = json.loads((work / "runs" / "twice-2" / "checkpoints" / "step_4" / "run.json").read_text(encoding="utf-8"))
    assert copied["run_id"] == second_id
