"""Process group and device of this process: from torchrun's environment, or a one-process group without it.

A process group always exists while training (a one-rank group backed by an in-memory store when the process was not
started by torchrun), so FSDP2 and the metric all-reduces take one code path for 1..N processes.
"""

from __future__ import annotations

import datetime
import logging
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

logger = logging.getLogger(__name__)

_TORCHRUN_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


@dataclass(kw_only=True, frozen=True)
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    backend: str

    def __post_init__(self):
        if not 0 <= self.rank < self.world_size:
            raise ValueError(f"rank {self.rank} is outside world_size {self.world_size}; check RANK and WORLD_SIZE")
        if self.local_rank < 0:
            raise ValueError(f"LOCAL_RANK must be >= 0, got {self.local_rank}")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def is_cuda(self) -> bool:
        return self.device.type == "cuda"


def launched_by_torchrun() -> bool:
    return all(name in os.environ for name in _TORCHRUN_VARS)


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name, str(default))
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"environment variable {name}={value!r} is not an integer; torchrun sets it") from None


def select_device(local_rank: int) -> torch.device:
    """cuda:<local_rank> when CUDA is available (one GPU per process), else the CPU."""
    if not torch.cuda.is_available():
        logger.info("device: cpu (CUDA is not available)")
        return torch.device("cpu")
    count = torch.cuda.device_count()
    if local_rank >= count:
        raise ValueError(
            f"LOCAL_RANK={local_rank} but only {count} CUDA device(s) are visible; "
            f"start at most {count} processes per node (torchrun --nproc_per_node {count})"
        )
    device = torch.device("cuda", local_rank)
    torch.cuda.set_device(device)
    logger.info("device: %s (%s), one GPU per process", device, torch.cuda.get_device_name(device))
    return device


def init_distributed(*, timeout_s: int) -> DistInfo:
    """Join torchrun's process group (env://), or make a one-process group; NCCL on CUDA, gloo on the CPU."""
    torchrun = launched_by_torchrun()
    rank, world_size = (_env_int("RANK", 0), _env_int("WORLD_SIZE", 1)) if torchrun else (0, 1)
    local_rank = _env_int("LOCAL_RANK", 0) if torchrun else 0
    device = select_device(local_rank)
    backend = "nccl" if device.type == "cuda" else "gloo"
    timeout = datetime.timedelta(seconds=timeout_s)
    if dist.is_initialized():
        raise RuntimeError("a torch.distributed process group already exists in this process; train once per process")
    if torchrun:
        extra = {"device_id": device} if device.type == "cuda" else {}
        dist.init_process_group(backend=backend, timeout=timeout, **extra)
        logger.info(
            "joined process group: rank %d of %d (node %s of %s, local rank %d), backend %s, timeout %d s",
            *(rank, world_size, os.environ.get("GROUP_RANK", "?"), os.environ.get("GROUP_WORLD_SIZE", "?")),
            *(local_rank, backend, timeout_s),
        )
    else:
        dist.init_process_group(backend=backend, store=dist.HashStore(), rank=0, world_size=1, timeout=timeout)
        logger.info("single process (not started by torchrun): one-rank %s group", backend)
    return DistInfo(rank=rank, world_size=world_size, local_rank=local_rank, device=device, backend=backend)


def shutdown_distributed() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum a small tensor over ranks in place (a no-op for one rank) and return it."""
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor
