"""Benchmark start-up at Danbooru scale: scan, sample table, vocabulary, split, restart, workers.

Generates N sidecar pairs cheaply (one small JPEG hard-linked N times, 1,000 files a folder,
20,000 tags with Zipf-like frequencies, 10-40 tags a sample, both sidecar conventions: half
``X.json`` with a tag string, half ``X.jpg.json`` with a tag list and categories), once per N under
``--work`` (reused by later runs), then measures and prints one JSON object:

* ``in_process``: the scan (cold: no scan index; warm: the index saved by the cold one, data
  unchanged), split and vocabulary times, the sample table's bytes per sample (its arrays) and
  the main process's RSS growth over the whole setup, per sample;
* ``workers``: RSS growth of a fork and a spawn child that reads every sample's metadata (id, path,
  tags) once, as a DataLoader worker does over an epoch (it must not grow with the samples touched);
* ``train``: wall time of ``train_direct.py`` from launch to its first optimizer step, cold (no
  run folder, no scan index) and on ``--resume latest`` with unchanged data (a tiny model, so the
  figures are the data start-up), the CPU seconds of the whole run, and the peak memory of every
  process of the run by role (``TreeWatcher``: main, the scan's pool workers, loader workers; the
  kernel's high-water mark of each, and for loader workers, which share pages with the main
  process, their private memory too);
* ``train_baseline`` / ``train_above_baseline``: the same at ``--baseline`` samples (default
  5,000) and how much higher each process peaks, in bytes a sample of the difference (a role the
  small run lacks, such as the scan pool, is held against the small run's main process);
* ``kernels``: what the design choices rest on, old way against new: the RSS a scan run in the
  measuring process leaves behind once it is deleted, the scan in one process against the pool
  (one process a core), and the flip audit and vocabulary count per record against the table's
  arrays (best of 2 alternating rounds each).

Example: python benchmarks/bench_scale.py --samples 1000000 --json-out /tmp/scale.json
"""

from __future__ import annotations

import argparse
import gc
import json
import multiprocessing
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import psutil

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

NUM_TAGS = 20_000
PER_FOLDER = 1_000
_LINKS_PER_FILE = 50_000
# the memory targets are stated above a run of this size (what a small dataset costs anyway: torch, the model)
BASELINE_SAMPLES = 5_000
_CATEGORIES = ("general", "character", "copyright", "artist")


def tag_names(n: int) -> list[str]:
    """n distinct booru-like tag names."""
    stems = ("hair", "eyes", "dress", "smile", "sky", "ribbon", "sword", "cat", "flower", "school")
    return [f"{stems[i % len(stems)]}_{i:05d}" for i in range(n)]


def generate(root: Path, samples: int, seed: int = 0) -> float:
    """Write `samples` image+sidecar pairs under root (skipped when already complete); seconds spent."""
    marker = root / f".complete-{samples}"
    if marker.is_file():
        return 0.0
    started = time.perf_counter()
    if root.exists():
        shutil.rmtree(root)
    root.mkdir(parents=True)
    from PIL import Image

    bases = root.parent / "bases"
    bases.mkdir(exist_ok=True)
    names = tag_names(NUM_TAGS)
    rng = np.random.default_rng(seed)
    # Zipf-like: tag k drawn with weight 1/(k+1)^1.1 (a few tags on most images, a long tail)
    weights = 1.0 / np.arange(1, NUM_TAGS + 1) ** 1.1
    weights /= weights.sum()
    counts = rng.integers(10, 41, size=samples)
    drawn = rng.choice(NUM_TAGS, size=int(counts.sum()), p=weights)
    ratings = "gsqe"
    at = 0
    for i in range(samples):
        folder = root / f"{i // PER_FOLDER:05d}"
        if i % PER_FOLDER == 0:
            folder.mkdir()
        if i % _LINKS_PER_FILE == 0:  # file systems cap hard links per file (ext4: 65,000)
            base = bases / f"base-{i // _LINKS_PER_FILE}.jpg"
            Image.new("RGB", (48, 40), (200, 120, 40)).save(base, quality=90)
        tags = sorted({names[t] for t in drawn[at : at + counts[i]]})
        at += counts[i]
        stem = f"post_{i:08d}"
        os.link(base, folder / f"{stem}.jpg")
        if i % 2:
            doc = {"tags": " ".join(tags), "rating": ratings[i % 4]}
            (folder / f"{stem}.json").write_text(json.dumps(doc), encoding="utf-8")
        else:
            doc = {"tags": tags, "rating": ratings[i % 4], "categories": [_CATEGORIES[hash(t) % 4] for t in tags]}
            (folder / f"{stem}.jpg.json").write_text(json.dumps(doc), encoding="utf-8")
    marker.write_text("ok", encoding="utf-8")
    return time.perf_counter() - started


def rss() -> int:
    """This process's resident set size in bytes."""
    return psutil.Process().memory_info().rss


def _touch_all(dataset: Any, queue: Any) -> None:
    """In a child: read every sample's metadata once; report the RSS growth (bytes)."""
    gc.collect()
    before = psutil.Process().memory_info()
    total = 0
    for i in range(len(dataset)):
        total += len(dataset.sample_id(i)) + len(dataset.image_path(i)) + int(dataset.tag_indices(i).size)
    after = psutil.Process().memory_info()
    queue.put({"rss_growth_bytes": after.rss - before.rss, "rss_bytes": after.rss, "touched": len(dataset), "checksum": total})


def worker_growth(dataset: Any, method: str) -> dict[str, Any]:
    """RSS growth of a `method` child process that touches every sample of `dataset`."""
    ctx = multiprocessing.get_context(method)
    queue = ctx.Queue()
    started = time.perf_counter()
    proc = ctx.Process(target=_touch_all, args=(dataset, queue))
    proc.start()
    result = queue.get(timeout=1800)
    proc.join()
    result["seconds"] = round(time.perf_counter() - started, 2)
    return result


def _config(work: Path, root: Path) -> Any:
    """The benchmark's run configuration: a tiny model, the generated data, one step."""
    from Configuration_System import load_config

    return load_config(None, overrides=_overrides(work, root))


def _overrides(work: Path, root: Path) -> list[str]:
    """--set overrides of the tiny one-step run over the generated data."""
    return [
        f"data.root={root}",
        f"output_root={work / 'runs'}",
        f"data.scan_index_dir={work / 'scan_index'}",
        "experiment_name=scale",
        "data.image_size=32",
        "data.batch_size=8",
        "data.num_workers=1",
        "data.max_val_samples=64",
        "data.val_fraction=0.01",
        "model.preset=tiny",
        "model.patch_size=8",
        "model.embed_dim=32",
        "model.depth=1",
        "model.num_heads=2",
        "training.max_steps=100000",
        "training.memory_check=false",
        "monitor.log_every_steps=1",
        "monitor.tensorboard=false",
        "validation.every_steps=0",
    ]


def in_process(work: Path, root: Path) -> dict[str, Any]:
    """Setup phases in this process: cold and warm scan, split, vocabulary, table size, RSS."""
    import data_setup
    from dataset_split import split_records
    from vocabulary import build_vocabulary

    cfg = _config(work, root)
    shutil.rmtree(work / "scan_index", ignore_errors=True)
    gc.collect()
    rss0 = rss()
    out: dict[str, Any] = {}
    t = time.perf_counter()
    scan = data_setup.scan_from_config(cfg, root)
    out["scan_cold_s"] = round(time.perf_counter() - t, 2)
    t = time.perf_counter()
    scan = data_setup.scan_from_config(cfg, root)
    out["scan_warm_s"] = round(time.perf_counter() - t, 2)
    records = scan.records
    out["samples"] = len(records)
    t = time.perf_counter()
    split = split_records(records, val_fraction=0.01, seed=0, max_val=64)
    out["split_s"] = round(time.perf_counter() - t, 2)
    t = time.perf_counter()
    vocab, _ = build_vocabulary(split.train, min_frequency=2)
    out["vocabulary_s"] = round(time.perf_counter() - t, 2)
    out["vocabulary_tags"] = len(vocab)
    table_bytes = getattr(records, "nbytes", None)
    if table_bytes is not None:
        out["table_bytes_per_sample"] = round(table_bytes / max(1, len(records)), 1)
    del split
    gc.collect()
    out["rss_growth_bytes_per_sample"] = round((rss() - rss0) / max(1, len(records)), 1)
    return out


def _train_records(metrics: Path) -> int:
    """Training-step records in metrics.jsonl so far."""
    return metrics.read_text(encoding="utf-8").count('"type": "train"') if metrics.is_file() else 0


def _peak_rss(proc: psutil.Process) -> int:
    """The process's peak resident set so far: the kernel's high-water mark (VmHWM) on Linux, the
    peak working set on Windows, else the current RSS (then only as good as the polling)."""
    try:
        with open(f"/proc/{proc.pid}/status", encoding="ascii") as handle:
            for line in handle:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    info = proc.memory_info()
    return int(getattr(info, "peak_wset", info.rss))


class TreeWatcher:
    """Polls a process and all its descendants: each one's peak RSS, its parent, when it was first
    seen, and (for loader workers, which share pages with a forked parent) its peak private memory.

    A process that ends between two polls loses at most its last 50 ms of growth (the high-water
    mark is read from the kernel, so a spike between polls still counts)."""

    def __init__(self, pid: int, interval: float = 0.05) -> None:
        """Start polling `pid`'s tree on a thread."""
        self.root = psutil.Process(pid)
        self.interval = interval
        self.started = time.perf_counter()
        self.procs: dict[int, dict[str, Any]] = {}
        self.marks: dict[str, float] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def mark(self, name: str) -> None:
        """Remember when `name` happened (the first time), in seconds since the launch."""
        self.marks.setdefault(name, time.perf_counter() - self.started)

    def _poll(self, uss_due: bool) -> None:
        """One look at every process of the tree."""
        try:
            tree = [self.root] + self.root.children(recursive=True)
        except psutil.Error:
            return
        now = time.perf_counter() - self.started
        for proc in tree:
            try:
                info = self.procs.get(proc.pid)
                if info is None:
                    info = self.procs[proc.pid] = {
                        "parent": proc.ppid(),
                        "cmdline": " ".join(proc.cmdline())[:300],
                        "first_seen_s": now,
                        "peak_rss": 0,
                        "peak_uss": None,
                    }
                info["last_seen_s"] = now
                info["peak_rss"] = max(info["peak_rss"], _peak_rss(proc))
                if uss_due and info.get("measure_uss"):
                    info["peak_uss"] = max(info["peak_uss"] or 0, proc.memory_full_info().uss)
                for mark in self.marks:  # each process's peaks so far when a mark was first seen
                    info.setdefault("at", {}).setdefault(mark, (info["peak_rss"], info["peak_uss"]))
            except psutil.Error:  # ended between the listing and the look
                continue

    def _run(self) -> None:
        """Poll until stopped; private memory (a page-map walk, slower) every 10th poll."""
        count = 0
        while not self._stop.is_set():
            self._poll(count % 10 == 0)
            count += 1
            self._stop.wait(self.interval)

    def want_uss(self, pid: int) -> None:
        """Also follow `pid`'s private memory from now on."""
        if pid in self.procs:
            self.procs[pid]["measure_uss"] = True

    def stop(self) -> None:
        """Stop polling."""
        self._stop.set()
        self._thread.join()

    def listing(self) -> list[dict[str, Any]]:
        """Every process seen, in order of appearance: role, parent, when seen, peak (for the record)."""
        roles = self._role_map()
        return [
            {
                "role": roles[pid],
                "pid": pid,
                "parent": info["parent"],
                "seen_s": [round(info["first_seen_s"], 2), round(info.get("last_seen_s", 0.0), 2)],
                "peak_rss_bytes": info["peak_rss"],
                **{f"peak_rss_at_{mark}_bytes": rss for mark, (rss, _) in info.get("at", {}).items()},
                "command": info["cmdline"][:120],
            }
            for pid, info in sorted(self.procs.items(), key=lambda kv: kv[1]["first_seen_s"])
        ]

    def _role_map(self) -> dict[int, str]:
        """pid -> role: main (train_direct.py), scan_child (the spawned process a big scan runs in),
        scan_pool_worker (the processes the scan parses sidecars and checks images on),
        loader_worker (started by the main process after the scan: DataLoader workers),
        other (multiprocessing's resource tracker, anything else)."""
        main_pid = self.root.pid
        scan_done = self.marks.get("data_line", float("inf"))
        # before the scan's summary the main process starts only the scan's spawned processes; anything
        # else then (the resource tracker, a library's helper program) is neither scan nor loader
        tracker = {
            pid
            for pid, info in self.procs.items()
            if "resource_tracker" in info["cmdline"] or (info["first_seen_s"] < scan_done and "spawn_main" not in info["cmdline"])
        }
        tracker.discard(main_pid)
        early = [pid for pid, info in self.procs.items() if info["parent"] == main_pid and info["first_seen_s"] < scan_done and pid not in tracker]
        parents = {info["parent"] for pid, info in self.procs.items() if pid not in tracker}
        roles: dict[int, str] = {main_pid: "main"}
        for pid in early:
            # the one process the main one starts for the scan (it starts the pools itself); several
            # without children of their own are the pools of a scan run in the main process
            roles[pid] = "scan_child" if pid in parents or len(early) == 1 else "scan_pool_worker"
        for pid, info in self.procs.items():
            if pid in roles:
                continue
            if pid in tracker:
                roles[pid] = "other"
            elif info["parent"] == main_pid:
                roles[pid] = "loader_worker"
            else:
                roles[pid] = "scan_pool_worker" if roles.get(info["parent"]) == "scan_child" else "other"
        return roles

    def roles(self, upto: str = "first_step") -> dict[str, Any]:
        """Per role (see _role_map), over the processes of the start-up (those seen before the
        `upto` mark): how many, the largest peak RSS up to that mark (a process that ended before
        it: its whole life), the largest peak to the run's end (which adds the stop and its
        checkpoint), and for loader workers the largest peak of private memory (their RSS counts
        pages shared with the parent)."""
        out: dict[str, dict[str, Any]] = {}
        until = self.marks.get(upto, float("inf"))
        for pid, role in self._role_map().items():
            info = self.procs[pid]
            if info["first_seen_s"] > until:
                continue
            rss, uss = info.get("at", {}).get(upto, (info["peak_rss"], info["peak_uss"]))
            entry = out.setdefault(role, {"processes": 0, "peak_rss_bytes": 0, "peak_rss_to_exit_bytes": 0})
            entry["processes"] += 1
            entry["peak_rss_bytes"] = max(entry["peak_rss_bytes"], rss)
            entry["peak_rss_to_exit_bytes"] = max(entry["peak_rss_to_exit_bytes"], info["peak_rss"])
            if uss is not None:
                entry["peak_private_bytes"] = max(entry.get("peak_private_bytes", 0), uss)
        return out


def _wait(proc: subprocess.Popen, timeout: float) -> float | None:
    """Wait for `proc` to end; the CPU seconds it and the processes it waited for used (None where
    the OS has no wait4)."""
    if not hasattr(os, "wait4"):
        proc.wait(timeout=timeout)
        return None
    deadline = time.perf_counter() + timeout
    while True:
        pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
        if pid:
            proc.returncode = os.waitstatus_to_exitcode(status)
            return usage.ru_utime + usage.ru_stime
        if time.perf_counter() > deadline:
            proc.kill()
            raise subprocess.TimeoutExpired(proc.args, timeout)
        time.sleep(0.05)


def time_to_first_step(work: Path, root: Path, resume: bool, timeout: float) -> dict[str, Any]:
    """Launch train_direct.py; seconds until metrics.jsonl shows its first training step, and the
    peak memory of every process of the run by role (TreeWatcher.roles). The run is then stopped
    with a STOP file (a checkpoint is written), so that the next call can resume it."""
    run_dir = work / "runs" / "scale"
    metrics = run_dir / "metrics.jsonl"
    cmd = [sys.executable, str(REPO_ROOT / "train_direct.py")] + [a for o in _overrides(work, root) for a in ("--set", o)]
    if resume:
        cmd += ["--resume", "latest"]
    seen = _train_records(metrics)
    started = time.perf_counter()
    # unbuffered: the scan's summary line must arrive when it is printed (it marks the scan's end)
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    proc = subprocess.Popen(cmd, cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    watcher = TreeWatcher(proc.pid)
    lines: list[str] = []

    def read() -> None:
        for line in proc.stdout:
            # the scan's summary, then the split's: the main process's peak so far is noted at each
            if line.startswith("data:"):
                watcher.mark("data_line")
            elif line.startswith("split:"):
                watcher.mark("split_line")
            lines.append(line.rstrip("\n"))

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    first = None
    while proc.poll() is None and time.perf_counter() - started < timeout:
        if "data_line" in watcher.marks:  # the loader workers start after the scan: their private memory too
            for pid, info in list(watcher.procs.items()):
                if info["parent"] == proc.pid and info["first_seen_s"] >= watcher.marks["data_line"]:
                    watcher.want_uss(pid)
        if _train_records(metrics) > seen:
            first = time.perf_counter() - started
            watcher.mark("first_step")
            (run_dir / "STOP").write_text("", encoding="utf-8")
            break
        time.sleep(0.05)
    try:
        cpu = _wait(proc, timeout)
    finally:
        watcher.stop()
        reader.join(timeout=10)
    (run_dir / "STOP").unlink(missing_ok=True)
    result: dict[str, Any] = {"first_step_s": None if first is None else round(first, 2), "exit_code": proc.returncode}
    # CPU seconds of the whole run (it, the scan's pool, the loader workers), the figure to compare
    # when other work shares the machine; the run goes on a little past its first step to stop
    result["cpu_s"] = None if cpu is None else round(cpu, 1)
    result["processes"] = watcher.roles()
    result["process_list"] = watcher.listing()
    result["lines"] = [line for line in lines if line.startswith(("data:", "split:", "scan index"))]
    if first is None or proc.returncode != 0:
        result["output_tail"] = "\n".join(lines)[-2000:]
    return result


def train_starts(work: Path, root: Path, timeout: float) -> dict[str, Any]:
    """A cold start (no run folder, no scan index) and then a resume of it, with unchanged data."""
    shutil.rmtree(work / "runs" / "scale", ignore_errors=True)
    shutil.rmtree(work / "scan_index", ignore_errors=True)
    return {
        "cold": time_to_first_step(work, root, resume=False, timeout=timeout),
        "resume": time_to_first_step(work, root, resume=True, timeout=timeout),
    }


def above_baseline(run: dict[str, Any], base: dict[str, Any], extra_samples: int) -> dict[str, Any]:
    """Per start and role: how much higher each process peaks than in the smaller run, in bytes a
    sample of the difference (the figure the memory targets are stated in)."""
    out: dict[str, Any] = {}
    for phase in ("cold", "resume"):
        ours, theirs = run[phase]["processes"], base[phase]["processes"]
        out[phase] = {}
        for role, entry in ours.items():
            if role == "other":  # the resource tracker and short-lived forks: nothing of the data
                continue
            for key in ("peak_rss_bytes", "peak_private_bytes"):
                if key in entry:
                    # a process the small run did not need (the scan's pool) is held against what
                    # the small run's main process needed for the same work
                    below = theirs.get(role, theirs["main"]).get(key, theirs["main"]["peak_rss_bytes"])
                    out[phase].setdefault(role, {})[key.replace("_bytes", "_above_per_sample")] = round((entry[key] - below) / extra_samples, 1)
    return out


def _scan_then_free(root: str, queue: Any) -> None:
    """In a fresh child: scan here, delete the result, report RSS before, with and after (bytes)."""
    from dataset_scan import scan_dataset

    gc.collect()
    before = rss()
    scan = scan_dataset(root)
    samples, with_scan = len(scan.records), rss()
    del scan
    gc.collect()
    queue.put({"samples": samples, "rss_with_scan": with_scan - before, "rss_after_del": rss() - before})


def _best_of(rounds: int, variants: dict[str, Any]) -> dict[str, float]:
    """Seconds of each callable, best of `rounds` alternating rounds."""
    best: dict[str, float] = {}
    for _ in range(rounds):
        for name, fn in variants.items():
            started = time.perf_counter()
            fn()
            best[name] = min(best.get(name, float("inf")), time.perf_counter() - started)
    return {k: round(v, 3) for k, v in best.items()}


def kernels(root: Path) -> dict[str, Any]:
    """Old way against new for the pieces the start-up design rests on (see the module docstring)."""
    from data_setup import flip_audit
    from dataset_scan import scan_dataset
    from file_io import resolve_resource
    from orientation_handler import OrientationHandler
    from vocabulary import build_vocabulary

    ctx = multiprocessing.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=_scan_then_free, args=(str(root), queue))
    proc.start()
    heap = queue.get(timeout=3600)
    proc.join()
    n = heap["samples"]
    out: dict[str, Any] = {"heap_kept_after_an_in_process_scan_bytes_per_sample": round(heap["rss_after_del"] / n, 1), **heap}
    out["scan_s"] = _best_of(1, {"here": lambda: scan_dataset(root, processes=1), "pool": lambda: scan_dataset(root, parallel_min=0)})
    table = scan_dataset(root, verify="none").records
    records = list(table)
    vocab, _ = build_vocabulary(table, min_frequency=2)
    handler = OrientationHandler.from_file(resolve_resource("configs/orientation_map.json"))
    out["flip_audit_s"] = _best_of(2, {"per_record": lambda: flip_audit(records, vocab, handler), "table": lambda: flip_audit(table, vocab, handler)})
    out["vocabulary_s"] = _best_of(
        2, {"per_record": lambda: build_vocabulary(records, min_frequency=2), "table": lambda: build_vocabulary(table, min_frequency=2)}
    )
    return out


def main(argv: list[str] | None = None) -> int:
    """Generate the data (once), measure, print JSON."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=100_000)
    parser.add_argument("--work", type=Path, default=Path("/tmp/oppai_bench_scale"))
    parser.add_argument("--skip", default="", help="comma list of phases to skip: in_process,workers,train,kernels")
    parser.add_argument("--timeout", type=float, default=1800.0)
    parser.add_argument("--json-out", type=Path)
    parser.add_argument(
        "--baseline",
        type=int,
        help=f"also time the starts at this many samples and report each process's peak above it (default {BASELINE_SAMPLES} when --samples is larger; 0: none)",
    )
    args = parser.parse_args(argv)
    skip = set(filter(None, args.skip.split(",")))
    work = args.work / str(args.samples)
    root = work / "data"
    result: dict[str, Any] = {"samples": args.samples, "cpus": os.cpu_count()}
    result["generate_s"] = round(generate(root, args.samples), 1)
    if "in_process" not in skip:
        result["in_process"] = in_process(work, root)
    if "workers" not in skip:
        import data_setup

        cfg = _config(work, root)
        bundle = data_setup.prepare_data(cfg, work / "runs" / "workers", log=None)
        result["workers"] = {m: worker_growth(bundle.train_dataset, m) for m in ("fork", "spawn")}
        del bundle
    if "train" not in skip:
        result["train"] = train_starts(work, root, args.timeout)
        baseline = args.baseline if args.baseline is not None else (BASELINE_SAMPLES if args.samples > BASELINE_SAMPLES else 0)
        if 0 < baseline < args.samples:
            base_work = args.work / str(baseline)
            generate(base_work / "data", baseline)
            base = train_starts(base_work, base_work / "data", args.timeout)
            result["train_baseline"] = {"samples": baseline, **base}
            result["train_above_baseline"] = above_baseline(result["train"], base, args.samples - baseline)
    if "kernels" not in skip:
        result["kernels"] = kernels(root)
    text = json.dumps(result, indent=2)
    print(text)
    if args.json_out:
        args.json_out.write_text(text + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
