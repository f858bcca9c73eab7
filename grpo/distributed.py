"""Data-parallel training over processes started by ``torchrun``: gloo on CPU, NCCL on GPUs.

``torchrun`` (torch.distributed.run) starts the processes and sets RANK, LOCAL_RANK and
WORLD_SIZE; the stage starts it (grpo_agents/stages.py ``launch_ranks``), so one command
(``python -m tasks.train_policy``, ``dvc repro``, the Prefect task) runs either form. The helpers
here are no-ops in a single process, so the trainer reads the same either way.
"""

from __future__ import annotations

import logging
import os
from typing import Any

import torch
import torch.distributed as dist

log = logging.getLogger(__name__)


def is_worker() -> bool:
    """Whether this process was started by torchrun (as one of several ranks or alone)."""
    return "LOCAL_RANK" in os.environ and "WORLD_SIZE" in os.environ


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def world() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def is_main() -> bool:
    return rank() == 0


def device(preference: str) -> torch.device:
    """This process's device (``auto`` takes CUDA when available); under torchrun, a GPU is the
    rank's own (LOCAL_RANK)."""
    use_cuda = preference == "cuda" or (preference == "auto" and torch.cuda.is_available())
    if not use_cuda:
        return torch.device("cpu")
    local = int(os.environ.get("LOCAL_RANK", 0))
    torch.cuda.set_device(local)
    return torch.device("cuda", local)


def init(where: torch.device) -> None:
    """Under torchrun, join its process group: NCCL for CUDA, gloo for the CPU."""
    if is_worker() and not dist.is_initialized():
        dist.init_process_group("nccl" if where.type == "cuda" else "gloo")
        log.info("rank %d of %d on %s", rank(), world(), where)


def barrier() -> None:
    if world() > 1:
        dist.barrier()


def all_gather(obj: Any) -> list[Any]:
    """Every rank's ``obj``, in rank order (``[obj]`` in one process)."""
    if world() == 1:
        return [obj]
    out: list[Any] = [None] * world()
    dist.all_gather_object(out, obj)
    return out


def all_sum(values: list[float]) -> list[float]:
    """Element-wise sum over ranks."""
    if world() == 1:
        return list(values)
    t = torch.tensor(values, dtype=torch.float64)
    dist.all_reduce(t)
    return t.tolist()


def shard(items):
    """This rank's contiguous share of ``items`` (a list or tensor whose length the world divides)."""
    k = len(items) // world()
    return items[rank() * k : (rank() + 1) * k]
