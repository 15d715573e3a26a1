"""Machine statistics for the training monitor: CPU, RAM, disk, DataLoader workers, GPU (NVML), CUDA memory.

Owns sampling and its background thread: `SystemStatsSampler` takes one reading, `NvmlGpu` reads
the GPU through NVML when the optional nvidia-ml-py package is installed, `SystemStatsThread` calls
a sampler every few seconds and hands each reading to a callback, and `cuda_memory_gib` reads this
process's CUDA allocator. Readings are flat {name: float} dicts; nothing here writes files. Reads
that fail never stop training: they are reported through a `count_error(kind)` callback.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psutil
import torch

__all__ = ["GIB", "NvmlGpu", "SystemStatsSampler", "SystemStatsThread", "cuda_memory_gib"]

GIB = float(1 << 30)


def cuda_memory_gib() -> dict[str, float]:
    """Peak allocated and reserved CUDA memory in GiB, only when this process already uses CUDA."""
    if not (torch.cuda.is_available() and torch.cuda.is_initialized()):
        return {}
    return {"gpu_mem_max_allocated_gb": torch.cuda.max_memory_allocated() / GIB, "gpu_mem_reserved_gb": torch.cuda.memory_reserved() / GIB}


class NvmlGpu:
    """One GPU read through NVML (nvidia-ml-py); constructed only when pynvml imports."""

    def __init__(self, pynvml: Any, handle: Any) -> None:
        """Keep the module and device handle."""
        self._nvml = pynvml
        self._handle = handle

    @classmethod
    def open(cls) -> NvmlGpu | None:
        """Open the GPU this process uses, or return None when NVML or a GPU is unavailable."""
        try:
            # Optional dependency (nvidia-ml-py): imported here so the project runs without it.
            import pynvml
        except ImportError:
            return None
        try:
            pynvml.nvmlInit()
        except pynvml.NVMLError:
            return None
        try:
            return cls(pynvml, cls._handle_for_current_device(pynvml))
        except (pynvml.NVMLError, ValueError):
            pynvml.nvmlShutdown()
            return None

    @staticmethod
    def _handle_for_current_device(pynvml: Any) -> Any:
        """NVML handle of torch's current CUDA device, mapped through CUDA_VISIBLE_DEVICES."""
        # Never initialise CUDA from the monitor: only ask torch when it is already set up.
        ordinal = torch.cuda.current_device() if torch.cuda.is_initialized() else 0
        visible = [v.strip() for v in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if v.strip()]
        if ordinal < len(visible):
            entry = visible[ordinal]
            if entry.isdigit():
                return pynvml.nvmlDeviceGetHandleByIndex(int(entry))
            return pynvml.nvmlDeviceGetHandleByUUID(entry)
        return pynvml.nvmlDeviceGetHandleByIndex(ordinal)

    def sample(self) -> tuple[dict[str, float], int]:
        """Read utilisation, memory, temperature and power; returns (values, number of failed reads)."""
        nv, h = self._nvml, self._handle
        out: dict[str, float] = {}
        failures = 0
        try:
            util = nv.nvmlDeviceGetUtilizationRates(h)
            out["gpu_util_percent"] = float(util.gpu)
            out["gpu_mem_util_percent"] = float(util.memory)
        except nv.NVMLError:
            failures += 1
        try:
            mem = nv.nvmlDeviceGetMemoryInfo(h)
            out["gpu_mem_used_gb"] = mem.used / GIB
            out["gpu_mem_total_gb"] = mem.total / GIB
        except nv.NVMLError:
            failures += 1
        try:
            out["gpu_temperature_c"] = float(nv.nvmlDeviceGetTemperature(h, nv.NVML_TEMPERATURE_GPU))
        except nv.NVMLError:
            failures += 1
        try:
            out["gpu_power_w"] = nv.nvmlDeviceGetPowerUsage(h) / 1000.0
        except nv.NVMLError:
            failures += 1  # many consumer boards do not report power
        return out, failures

    def close(self) -> None:
        """Shut NVML down."""
        try:
            self._nvml.nvmlShutdown()
        except self._nvml.NVMLError:
            pass  # already shut down: nothing left to release


class SystemStatsSampler:
    """One reading of CPU, RAM, process and DataLoader-worker RSS, free disk under a folder, and the GPU."""

    def __init__(self, disk_path: Path, count_error: Callable[[str], None], gpu: NvmlGpu | None = None) -> None:
        """Prime the CPU counters (their first reading is always 0.0); `gpu` is read when given."""
        self.disk_path = Path(disk_path)
        self._count_error = count_error
        self._gpu = gpu
        self._process = psutil.Process()
        self._process.cpu_percent(None)
        psutil.cpu_percent(None)

    def sample(self) -> dict[str, float]:
        """Take one reading; failed reads are left out and counted as "system_stats" (or "nvml")."""
        out: dict[str, float] = {}
        try:
            out["cpu_percent"] = float(psutil.cpu_percent(None))
            vm = psutil.virtual_memory()
            out["ram_percent"] = float(vm.percent)
            out["ram_used_gb"] = (vm.total - vm.available) / GIB
        except (psutil.Error, OSError):
            self._count_error("system_stats")
        proc = self._process
        try:
            with proc.oneshot():
                out["process_rss_gb"] = proc.memory_info().rss / GIB
                out["process_cpu_percent"] = float(proc.cpu_percent(None))
        except (psutil.Error, OSError):
            self._count_error("system_stats")
        workers_rss = 0
        try:
            children = proc.children(recursive=True)
        except (psutil.Error, OSError):
            children = []
            self._count_error("system_stats")
        for child in children:
            try:
                workers_rss += child.memory_info().rss
            except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
                continue  # workers come and go between listing and reading
        out["workers_rss_gb"] = workers_rss / GIB
        out["workers"] = float(len(children))
        try:
            out["disk_free_gb"] = psutil.disk_usage(str(self.disk_path)).free / GIB
        except (psutil.Error, OSError):
            self._count_error("system_stats")
        if self._gpu is not None:
            gpu_values, failures = self._gpu.sample()
            out.update(gpu_values)
            for _ in range(failures):
                self._count_error("nvml")
        return out

    def close(self) -> None:
        """Release the GPU handle (NVML), if any."""
        if self._gpu is not None:
            self._gpu.close()
            self._gpu = None


class SystemStatsThread:
    """Daemon thread: a reading at once (so every run has one), then one every interval until stop()."""

    def __init__(self, sampler: SystemStatsSampler, interval_s: float, deliver: Callable[[dict[str, float]], None]) -> None:
        """Start sampling; each reading goes to `deliver` on the sampling thread."""
        if not interval_s > 0:
            raise ValueError(f"system stats interval must be > 0 seconds, got {interval_s!r}")
        self.interval_s = float(interval_s)
        self._sampler = sampler
        self._deliver = deliver
        self._stop = threading.Event()
        self.thread = threading.Thread(target=self._run, name="TrainingMonitor-system", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        """Thread body: sample, deliver, wait; return as soon as stop() is called."""
        while True:
            self._deliver(self._sampler.sample())
            if self._stop.wait(self.interval_s):
                return

    def stop(self) -> None:
        """Ask the thread to finish and wait for it (at most max(5 s, interval))."""
        self._stop.set()
        self.thread.join(timeout=max(5.0, self.interval_s))
