"""This process's place in a training job: rank, device, and the torchrun process group.

A plain `python train_direct.py` is a job of one process; under `torchrun --nproc-per-node N`
each process reads its rank from the environment torchrun sets and joins the group.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass

import torch
import torch.distributed as tdist

from Configuration_System import ConfigError


@dataclass
class Distributed:
    """This process's place in a (possibly single-process) job."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        """True on the process that writes files."""
        return self.rank == 0


def usable_cpu_count() -> int:
    """CPUs this process may run on (its affinity where the OS has one): the count DataLoader checks
    num_workers against, and the processes a parallel start-up check may use."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def init_distributed(device_pref: str) -> tuple[Distributed, torch.device]:
    """Join the torchrun process group when launched by torchrun; pick this process's device."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    dist = Distributed(rank=int(os.environ.get("RANK", "0")), world_size=world, local_rank=int(os.environ.get("LOCAL_RANK", "0")))
    if device_pref == "auto":
        device = torch.device("cuda", dist.local_rank) if torch.cuda.is_available() else torch.device("cpu")
    else:
        device = torch.device(device_pref)
        if device.type == "cuda" and device.index is None:
            device = torch.device("cuda", dist.local_rank)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(f"training.device={device_pref} but CUDA is not available")
        torch.cuda.set_device(device)
    if world > 1:
        # NCCL where it exists (Linux CUDA builds); gloo on CPU and on Windows.
        nccl = device.type == "cuda" and tdist.is_nccl_available()
        tdist.init_process_group(backend="nccl" if nccl else "gloo")
    return dist, device


def any_rank(flag: bool, dist: Distributed, device: torch.device) -> bool:
    """True when `flag` is true on any rank (a collective call under DDP: every rank must make it)."""
    if dist.world_size == 1:
        return flag
    value = torch.tensor([1.0 if flag else 0.0], device=device)
    tdist.all_reduce(value, op=tdist.ReduceOp.MAX)
    return bool(value.item())


def broadcast_from_rank0(box: list) -> None:
    """Replace `box`'s items on every rank with rank 0's (picklable objects; a collective call under DDP)."""
    tdist.broadcast_object_list(box, src=0)


def exit_process(code: int) -> None:
    """Exit with `code`. Under torchrun, skip the interpreter's teardown once the process group is closed:
    torch's gloo objects then aborted a finished rank now and then ("terminate called without an active
    exception", SIGABRT), failing a job that had ended well."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)
