"""Exact resume, end to end: a run killed (SIGKILL) or stopped (SIGTERM, STOP file) and resumed with
`--resume latest` ends with bit-identical weights and per-step losses to an uninterrupted run."""

from __future__ import annotations

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

pytestmark = [pytest.mark.e2e, pytest.mark.skipif(sys.platform == "win32", reason="uses POSIX signals")]

STEPS = 36  # about 1.3 epochs of the 600-image demo at batch 16: the resume crosses an epoch boundary
RESUME_RUN = TINY_RUN + [
    "data.batch_size=16",
    f"training.max_steps={STEPS}",
    "training.epochs=3",
    "checkpoint.every_steps=6",
    "validation.every_steps=12",
    "model.drop_path_rate=0.1",
    "training.ema_decay=0.9",
    "checkpoint.keep_last=10",
    "data.num_workers=2",
    # the loss of the code these tests compare with (FORMAT_1_COMMIT), the default until plain BCE
    "loss.gamma_neg=4",
    "loss.clip=0.05",
]


def train_args(data: Path, name: str, extra: list[str] = ()) -> list[str]:
    args = [str(ROOT / "train_direct.py"), "--config", str(ROOT / "configs" / "demo.yaml")]
    for o in RESUME_RUN + [f"data.root={data}", "output_root=runs", f"experiment_name={name}", *extra]:
        args += ["--set", o]
    return args


def step_losses(run_dir: Path) -> dict[int, float]:
    return {e["step"]: e["loss"] for e in read_jsonl(run_dir / "metrics.jsonl") if e["type"] == "train"}


def final_weights(run_dir: Path) -> dict[str, torch.Tensor]:
    last = (run_dir / "checkpoints" / "last").read_text(encoding="utf-8").strip()
    assert last == f"step_{STEPS}", last
    folder = run_dir / "checkpoints" / last
    return {**load_file(str(folder / "model.safetensors")), **{f"ema.{k}": v for k, v in load_file(str(folder / "ema.safetensors")).items()}}


def assert_same_run(a: Path, b: Path) -> None:
    la, lb = step_losses(a), step_losses(b)
    assert sorted(la) == list(range(1, STEPS + 1)) and la == lb  # exact float equality, every step
    wa, wb = final_weights(a), final_weights(b)
    assert wa.keys() == wb.keys()
    for k in wa:
        assert torch.equal(wa[k], wb[k]), k


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory, demo_data: Path) -> tuple[Path, Path]:
    work = tmp_path_factory.mktemp("resume")
    proc = run_cli(train_args(demo_data, "ref"), cwd=work)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return work, work / "runs" / "ref"


def start_and_interrupt(work: Path, args: list[str], run_dir: Path, after_step: int, how: str) -> subprocess.Popen:
    """Start training, wait for the checkpoint of `after_step`, then interrupt the process ("kill", "term", "stopfile";
    "none" leaves it running)."""
    proc = subprocess.Popen(
        [sys.executable, *args], cwd=work, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=dict(os.environ, PYTHONUNBUFFERED="1")
    )
    marker = run_dir / "checkpoints" / f"step_{after_step}" / "COMPLETE"
    deadline = time.monotonic() + 240
    while not marker.exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            out, err = proc.communicate()
            pytest.fail(f"run ended before its step {after_step} checkpoint: {err[-2000:]}")
        time.sleep(0.05)
    if how == "kill":
        proc.send_signal(signal.SIGKILL)
    elif how == "term":
        proc.send_signal(signal.SIGTERM)
    elif how == "stopfile":
        (run_dir / "STOP").write_text("", encoding="utf-8")
    elif how != "none":  # "none": the caller interrupts it another way
        raise ValueError(f"unknown interruption {how!r}")
    return proc


def test_sigkill_then_resume_is_bit_identical(reference: tuple[Path, Path], demo_data: Path) -> None:
    work, ref_dir = reference
    run_dir = work / "runs" / "killed"
    proc = start_and_interrupt(work, train_args(demo_data, "killed"), run_dir, after_step=18, how="kill")
    proc.communicate(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    resumed = run_cli(train_args(demo_data, "killed") + ["--resume", "latest"], cwd=work)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert_same_run(ref_dir, run_dir)


@pytest.mark.parametrize("how", ["term", "stopfile"])
def test_safe_stop_then_resume_is_bit_identical(reference: tuple[Path, Path], demo_data: Path, how: str) -> None:
    work, ref_dir = reference
    name = f"stopped_{how}"
    run_dir = work / "runs" / name
    proc = start_and_interrupt(work, train_args(demo_data, name), run_dir, after_step=24, how=how)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err[-3000:]
    assert "resume with:" in out and "--resume latest" in out
    stopped_at = int((run_dir / "checkpoints" / "last").read_text(encoding="utf-8").strip().split("_")[1])
    assert 24 <= stopped_at < STEPS
    if how == "stopfile":
        (run_dir / "STOP").unlink()
    resumed = run_cli(train_args(demo_data, name) + ["--resume", "latest"], cwd=work)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert_same_run(ref_dir, run_dir)


def test_resume_with_changed_batch_size_is_refused(reference: tuple[Path, Path], demo_data: Path) -> None:
    work, _ = reference
    proc = run_cli(train_args(demo_data, "ref", ["data.batch_size=8"]) + ["--resume", "latest"], cwd=work)
    assert proc.returncode == 2
    assert "data.batch_size: 16 -> 8" in proc.stderr and "--accept-schedule-change" in proc.stderr


def test_resume_after_training_files_changed_is_refused_or_restarts_the_epoch(reference: tuple[Path, Path], demo_data: Path, tmp_path: Path) -> None:
    """A training sample deleted between stop and resume: refused with a message naming the change
    and the flag; with --accept-data-change the run goes on from the checkpoint, the epoch started over."""
    import json
    import shutil

    work, _ = reference
    data = tmp_path / "demo"
    shutil.copytree(demo_data, data)
    name = "data_changed"
    run_dir = work / "runs" / name
    proc = start_and_interrupt(work, train_args(data, name), run_dir, after_step=12, how="term")
    proc.communicate(timeout=120)
    sample_id = json.loads((run_dir / "split.json").read_text(encoding="utf-8"))["train"][0]
    (data / sample_id).unlink()  # a folder scan's sample id is the image's path below the root
    refused = run_cli(train_args(data, name) + ["--resume", "latest"], cwd=work)
    assert refused.returncode == 2
    assert "training samples changed" in refused.stderr and "1 vanished" in refused.stderr and "--accept-data-change" in refused.stderr
    accepted = run_cli(train_args(data, name) + ["--resume", "latest", "--accept-data-change"], cwd=work)
    assert accepted.returncode == 0, accepted.stderr[-3000:]
    events = [e for e in read_jsonl(run_dir / "metrics.jsonl") if e.get("kind") == "data_changed"]
    assert len(events) == 1 and events[0]["split"]["vanished"] == 1
    assert (run_dir / "checkpoints" / "last").read_text(encoding="utf-8").strip() == f"step_{STEPS}"


def test_incomplete_newest_checkpoint_is_skipped(reference: tuple[Path, Path], demo_data: Path, tmp_path: Path) -> None:
    import shutil

    work, ref_dir = reference
    copy = work / "runs" / "partial"
    shutil.copytree(ref_dir, copy)
    crashed = copy / "checkpoints" / f"step_{STEPS + 6}"
    crashed.mkdir()
    (crashed / "model.safetensors").write_bytes(b"torn write")
    proc = run_cli(train_args(demo_data, "partial") + ["--resume", "latest"], cwd=work)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert f"step_{STEPS}" in [
        e.get("checkpoint", "").rsplit("/", 1)[-1].rsplit("\\", 1)[-1] for e in read_jsonl(copy / "metrics.jsonl") if e.get("kind") == "resumed"
    ]


# The last commit before checkpoint_store took over the checkpoint folder; its checkpoints keep
# the best value in run_state and have no "best" or "monitor" entry.
FORMAT_1_COMMIT = "2c420e3861f53752a5726724151408247b4606a2"
KEYS_AFTER_FORMAT_1 = ("training.memory_check=",)  # config keys FORMAT_1_COMMIT's code does not know


@pytest.fixture(scope="module")
def format_1_code(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The project as of FORMAT_1_COMMIT, extracted from the local git history (no network)."""
    import io
    import shutil
    import tarfile

    git = shutil.which("git")
    if git is None or not (ROOT / ".git").exists():
        pytest.skip("needs git and the project's history")
    found = subprocess.run([git, "-C", str(ROOT), "cat-file", "-e", f"{FORMAT_1_COMMIT}^{{commit}}"], capture_output=True)
    if found.returncode != 0:
        pytest.skip(f"commit {FORMAT_1_COMMIT[:7]} is not in this clone's history (shallow clone?)")
    archive = subprocess.run([git, "-C", str(ROOT), "archive", "--format=tar", FORMAT_1_COMMIT], capture_output=True, check=True).stdout
    dest = tmp_path_factory.mktemp("format1_code")
    with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
        tar.extractall(dest, filter="data")
    return dest


def assert_close_run(a: Path, b: Path) -> None:
    """The same run up to float rounding between two versions of the code: per-step losses within
    1e-5 relative, validation mAP within 1e-4, final weights and EMA within 1% of each tensor's
    largest value. Measured on the demo: a faithful resume differs by at most 2e-7 (losses) and
    0.2% (weights); leaving out the RNG or the optimizer state moves the losses by over 3%, and
    leaving out the EMA moves the EMA weights by 6%."""
    la, lb = step_losses(a), step_losses(b)
    assert sorted(la) == sorted(lb) == list(range(1, STEPS + 1))
    for step in la:
        assert abs(la[step] - lb[step]) <= 1e-5 * abs(la[step]), (step, la[step], lb[step])
    va = {e["step"]: e["mAP"] for e in read_jsonl(a / "metrics.jsonl") if e["type"] == "val"}
    vb = {e["step"]: e["mAP"] for e in read_jsonl(b / "metrics.jsonl") if e["type"] == "val"}
    assert va.keys() == vb.keys() and all(abs(va[s] - vb[s]) <= 1e-4 for s in va), (va, vb)
    wa, wb = final_weights(a), final_weights(b)
    assert wa.keys() == wb.keys()
    for k in wa:
        assert float((wa[k] - wb[k]).abs().max()) <= 1e-2 * float(wa[k].abs().max()), k


def test_checkpoint_of_the_previous_code_resumes_to_the_same_run(reference: tuple[Path, Path], demo_data: Path, format_1_code: Path) -> None:
    """A run trained by the code before checkpoint_store, resumed by this code from its step-18
    checkpoint (best value in run_state, no "best" or "monitor" entry), ends as the old code's
    own uninterrupted run does; and that run is this code's run too (same seed, same metrics)."""
    import shutil

    work, ref_dir = reference
    args = train_args(demo_data, "format1")
    # settings the old code did not have yet (it had no memory check to switch off) are left out
    pairs = [(a, b) for a, b in zip(args[3::2], args[4::2]) if not b.startswith(KEYS_AFTER_FORMAT_1)]
    old_args = [str(format_1_code / "train_direct.py"), "--config", str(format_1_code / "configs" / "demo.yaml")]
    old_args += [x for pair in pairs for x in pair]
    old = run_cli(old_args, cwd=work)
    assert old.returncode == 0, old.stderr[-3000:]
    old_dir = work / "runs" / "format1"
    saved = torch.load(old_dir / "checkpoints" / "step_18" / "training_state.pt", weights_only=True)
    assert "best" not in saved and "best_metric" in saved["run_state"]  # really the old layout
    assert_close_run(ref_dir, old_dir)
    copy = work / "runs" / "format1_resumed"
    shutil.copytree(old_dir, copy)
    resumed = run_cli(train_args(demo_data, "format1_resumed") + ["--resume", str(copy / "checkpoints" / "step_18")], cwd=work)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert_close_run(old_dir, copy)
    rewritten = torch.load(copy / "checkpoints" / f"step_{STEPS}" / "training_state.pt", weights_only=True)
    assert set(rewritten) == set(saved) | {"best", "monitor", "micro_batches", "train_data_fingerprint"}  # the other entries keep their keys
    assert set(rewritten["run_state"]) == set(saved["run_state"]) - {"best_metric", "best_step"}
    old_final = torch.load(old_dir / "checkpoints" / f"step_{STEPS}" / "training_state.pt", weights_only=True)
    assert rewritten["best"]["metric"] == "mAP" and rewritten["best"]["step"] == old_final["run_state"]["best_step"]
    assert abs(rewritten["best"]["value"] - old_final["run_state"]["best_metric"]) <= 1e-4
