"""Tests for benchmarks/bench_scale.py: a small run over generated data prints complete, sane JSON,
and the process watcher names each process of a run by its role."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.e2e  # runs the benchmark, which starts processes

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))

import bench_scale  # noqa: E402  (benchmarks/ is not a package)


def test_small_run_reports_every_phase(tmp_path: Path) -> None:
    """300 generated samples (and a 150-sample baseline): every phase reports, the scan keeps them
    all, the reused scan equals the first, the table is compact, workers do not grow, each start
    names its processes with their peaks and CPU time, and both sides of each kernel ran."""
    proc = subprocess.run(
        [
            sys.executable,
            str(ROOT / "benchmarks" / "bench_scale.py"),
            "--samples",
            "300",
            "--baseline",
            "150",
            "--work",
            str(tmp_path),
            "--timeout",
            "240",
        ],
        capture_output=True,
        text=True,
        encoding="utf-8",
        timeout=400,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout)
    data = tmp_path / "300" / "data"
    assert len(list(data.rglob("*.jpg"))) == 300 and len(list(data.rglob("*.json"))) == 300
    assert out["in_process"]["samples"] == 300 and 0 < out["in_process"]["table_bytes_per_sample"] < 300
    for method in ("fork", "spawn"):
        assert out["workers"][method]["touched"] == out["workers"]["fork"]["touched"] > 250
    for run in (out["train"], out["train_baseline"]):
        for phase in ("cold", "resume"):
            start = run[phase]
            assert start["exit_code"] == 0 and start["first_step_s"] > 0 and start["cpu_s"] > 0
            roles = start["processes"]
            assert roles["main"]["processes"] == 1 and roles["loader_worker"]["processes"] == 1  # data.num_workers=1
            assert roles["main"]["peak_rss_bytes"] > 50 << 20 and roles["main"]["peak_rss_to_exit_bytes"] >= roles["main"]["peak_rss_bytes"]
            # a small folder is scanned in the main process
            assert "scan_child" not in roles and "scan_pool_worker" not in roles, start["process_list"]
    assert "from the scan index" in out["train"]["resume"]["lines"][0]
    assert set(out["train_above_baseline"]["cold"]) == {"main", "loader_worker"}
    k = out["kernels"]
    assert k["samples"] == 300 and k["rss_with_scan"] > 0
    assert set(k["scan_s"]) == {"here", "pool"} and set(k["flip_audit_s"]) == set(k["vocabulary_s"]) == {"per_record", "table"}


def test_processes_are_named_by_role() -> None:
    """The main process, the scan's pool (spawned before the scan's summary), a fork of the main
    process before it (a helper's fork), the resource tracker, and the loader workers after it."""
    watcher = bench_scale.TreeWatcher(os.getpid())
    watcher.stop()
    main = os.getpid()
    cmd = "python train_direct.py --set x=1"
    spawned = "python -c from multiprocessing.spawn import spawn_main; spawn_main(tracker_fd=8)"

    def proc(parent: int, cmdline: str, first: float, peak: int) -> dict:
        return {"parent": parent, "cmdline": cmdline, "first_seen_s": first, "last_seen_s": first + 1, "peak_rss": peak, "peak_uss": None}

    watcher.procs = {
        main: proc(0, cmd, 0.0, 900),
        1: proc(main, "python -c from multiprocessing.resource_tracker import main;main(7)", 1.0, 10),
        7: proc(main, "/bin/sh -c ldconfig -p", 0.5, 3),
        2: proc(main, spawned, 1.0, 600),
        3: proc(main, spawned, 1.0, 610),
        4: proc(main, cmd, 1.5, 800),
        5: proc(main, cmd, 9.0, 500),
        6: proc(main, cmd, 20.0, 700),
    }
    watcher.procs[5]["at"] = {"first_step": (450, 30)}
    watcher.marks = {"data_line": 5.0, "first_step": 10.0}
    assert watcher._role_map() == {
        main: "main",
        1: "other",
        2: "scan_pool_worker",
        3: "scan_pool_worker",
        4: "other",
        5: "loader_worker",
        6: "loader_worker",
        7: "other",
    }
    roles = watcher.roles()
    assert roles["scan_pool_worker"] == {"processes": 2, "peak_rss_bytes": 610, "peak_rss_to_exit_bytes": 610}
    assert roles["loader_worker"] == {
        "processes": 1,
        "peak_rss_bytes": 450,
        "peak_rss_to_exit_bytes": 500,
        "peak_private_bytes": 30,
    }  # 6 came after the first step
    watcher.procs[2]["parent"] = 3  # one process started for the scan, which started the other: a scan child and its pool
    assert watcher._role_map()[3] == "scan_child" and watcher._role_map()[2] == "scan_pool_worker"
