"""Shared fixtures (a small generated demo dataset, one short real training run of the CLI) and the
test tiers: a test that starts a process must be marked `e2e` (the fast tier never does)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# A micro model and short run: enough to learn something in well under a minute on 2 cores.
TINY_RUN = [
    "data.image_size=32",
    "data.batch_size=32",
    "data.num_workers=2",
    "data.val_fraction=0.25",
    "model.preset=tiny",
    "model.patch_size=8",
    "model.embed_dim=64",
    "model.depth=2",
    "model.num_heads=2",
    "model.drop_path_rate=0.0",
    "training.epochs=4",
    "training.learning_rate=0.003",
    "training.warmup_steps=3",
    "validation.every_steps=20",
    "checkpoint.every_steps=20",
    "monitor.log_every_steps=1",
    "monitor.console_interval_s=0",
    "monitor.system_stats_interval_s=0",
    # The CPU memory check measures a step in a child process (~3 s a start): on for the session's trained_run (the
    # check wired into a real start), tests/test_machine_fit.py checks its figures; off for the other short runs.
    "training.memory_check=false",
]


# Fixtures whose use makes a test end-to-end (they run the training CLI).
E2E_FIXTURES = frozenset({"trained_run"})


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Mark every test that uses an end-to-end fixture as `e2e`."""
    for item in items:
        if E2E_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.e2e)


class _ProcessInFastTier(subprocess.Popen):
    """Stands in for subprocess.Popen in unmarked tests: starting a process belongs to the e2e tier."""

    def __init__(self, args: object, *rest: object, **kwargs: object) -> None:
        raise AssertionError(f"this test starts a process ({args!r}); mark it @pytest.mark.e2e")


@pytest.fixture(autouse=True)
def _fast_tier_starts_no_process(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> None:
    """Keep the fast tier honest: an unmarked test that starts a subprocess fails, naming the fix."""
    if request.node.get_closest_marker("e2e") is None:
        monkeypatch.setattr(subprocess, "Popen", _ProcessInFastTier)


def run_cli(args: list[str], cwd: Path, timeout: float = 300, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """Run one of the project's scripts as a user would, from `cwd`."""
    full_env = dict(os.environ, PYTHONUNBUFFERED="1", **(env or {}))
    return subprocess.run([sys.executable, *args], cwd=cwd, capture_output=True, text=True, timeout=timeout, env=full_env, encoding="utf-8")


def read_jsonl(path: Path) -> list[dict]:
    """All events of a metrics.jsonl file."""
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


@pytest.fixture(scope="session")
def demo_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """600 demo images at 32 px, generated once per session."""
    from demo_dataset import generate_demo_dataset

    return generate_demo_dataset(tmp_path_factory.mktemp("data") / "demo", num_images=600, seed=1, image_size=32)


@dataclass
class TrainedRun:
    """A finished training run of train_direct.py."""

    run_dir: Path
    proc: subprocess.CompletedProcess
    data: Path
    workdir: Path


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory: pytest.TempPathFactory, demo_data: Path) -> TrainedRun:
    """train_direct.py run as a process on the demo data (the end-to-end path of the README)."""
    work = tmp_path_factory.mktemp("work")
    overrides = TINY_RUN + [f"data.root={demo_data}", "output_root=runs", "experiment_name=e2e", "training.memory_check=true"]
    args = [str(ROOT / "train_direct.py"), "--config", str(ROOT / "configs" / "demo.yaml")]
    for o in overrides:
        args += ["--set", o]
    proc = run_cli(args, cwd=work)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return TrainedRun(work / "runs" / "e2e", proc, demo_data, work)
