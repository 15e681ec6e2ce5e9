"""Reusable page-locked host buffers for the LoRA file a save writes in the background (issue 12).

An r128 LoRA file is 0.64 GB of bf16. Copied the plain way (a blocking ``.to("cpu")`` per tensor into fresh
pageable memory), the training thread waited for every copy and for the first touch of every page: on an H200 the
step after each LoRA save took 0.30–0.75 s instead of 0.24. `HostStaging` copies into page-locked buffers, one per
tensor name, reused by every save, queued on the tensors' CUDA stream without waiting: stream order keeps each copy
ahead of the next optimizer step that changes its source, so training goes on at once, and the writer waits for the
copies (`HostCopies.wait`) before it reads a byte. Measured on the H200: no step after a save slower than 0.29 s.

Allocating page-locked memory runs at about 1 GB/s and blocked the training thread even from another thread (it
appears to wait for the device), so `prepare` allocates the buffers at a step boundary, where the device is idle
anyway (the trainer: after the first step, 0.64 GB in about 0.4 s); a copy of a tensor with no buffer yet allocates
one there and then. The next save reuses the buffers only once the previous
write has finished (the trainer waits for it first). Page-locked memory is held for the run's life and cannot be
paged out, so it is used only while the copies take at most a quarter of host RAM; otherwise, or for CPU tensors, the
copies are made the plain way. The choice is logged once, with its reason.

Measured and not used for the resumable checkpoints (3.4 GB for an r128 LoRA with AdamW): page-locking them took
4.3–4.8 s once, against 0.38 s saved at each later checkpoint, about even at the default of ten saves a run
(`docs/benchmarks.md`, 2026-12-04, second session).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from ..hardware.discovery import host_ram_bytes

logger = logging.getLogger(__name__)

PINNED_SHARE_OF_RAM = 0.25  # the largest share of host RAM the reusable page-locked buffers may take


@dataclass(eq=False)
class HostCopies:
    """(name, CPU tensor) pairs whose values are final once `wait` returns (their buffers are reused by the next
    `HostStaging.copy`)."""

    tensors: list[tuple[str, torch.Tensor]]
    ready: torch.cuda.Event | None = None  # recorded after the last queued device-to-host copy

    def wait(self) -> None:
        if self.ready is not None:
            self.ready.synchronize()


class HostStaging:
    """Reusable page-locked host buffers, one per tensor name (see the module docstring)."""

    def __init__(self, purpose: str, *, ram_bytes: Callable[[], int] = host_ram_bytes) -> None:
        self.purpose = purpose  # what the copies are for, in the log: "LoRA staging", "EMA LoRA staging"
        self._ram_bytes = ram_bytes
        self._buffers: dict[str, torch.Tensor] = {}
        self._pinned: bool | None = None  # decided at the first `prepare` or copy of device tensors

    def prepare(self, entries: list[tuple[str, torch.Tensor]]) -> None:
        """Allocate the buffers for tensors like ``entries`` now (at a step boundary: see the module docstring)."""
        unique = {id(tensor): (name, tensor) for name, tensor in reversed(entries)}  # first name, as `copy` uses
        wanted = [(name, tensor) for name, tensor in unique.values() if _on_cuda(tensor)]
        if not wanted or not self._use_pinned(sum(_nbytes(tensor) for _, tensor in wanted)):
            return
        started = time.perf_counter()
        for name, tensor in wanted:
            self._buffer(name, tensor.shape, tensor.dtype)
        logger.info("%s: %d page-locked buffers allocated in %.2f s", self.purpose, len(wanted), _since(started))

    def copy(self, entries: list[tuple[str, torch.Tensor]]) -> HostCopies:
        """Host copies of ``entries``; device tensors are copied asynchronously when the buffers are page-locked. A
        tensor given under several names is copied once."""
        on_device = [(name, tensor) for name, tensor in entries if _on_cuda(tensor)]
        if not on_device or not self._use_pinned(sum(_nbytes(tensor) for _, tensor in on_device)):
            return HostCopies([(name, tensor.detach().to("cpu", copy=True)) for name, tensor in entries])
        copies, streams, done = [], {}, {}
        for name, tensor in entries:
            if id(tensor) in done:
                copies.append((name, done[id(tensor)]))
                continue
            if not _on_cuda(tensor):
                host = tensor.detach().to("cpu", copy=True)
            else:
                host = self._buffer(name, tensor.shape, tensor.dtype)
                host.copy_(tensor.detach(), non_blocking=True)
                streams[tensor.device] = torch.cuda.current_stream(tensor.device)
            done[id(tensor)] = host
            copies.append((name, host))
        if len(streams) != 1:
            raise ValueError(f"a rank's training state is on one CUDA device, found {sorted(map(str, streams))}")
        ready = torch.cuda.Event()
        ready.record(next(iter(streams.values())))
        return HostCopies(copies, ready)

    def _use_pinned(self, state_bytes: int) -> bool:
        if self._pinned is None:
            self._pinned, reason = pinned_staging_fits(state_bytes, self._ram_bytes())
            logger.info("%s: %s", self.purpose, reason)
        return self._pinned

    def _buffer(self, name: str, shape: torch.Size, dtype: torch.dtype) -> torch.Tensor:
        buffer = self._buffers.get(name)
        if buffer is None or buffer.shape != shape or buffer.dtype != dtype:
            buffer = torch.empty(shape, dtype=dtype, pin_memory=True)
            self._buffers[name] = buffer
        return buffer


def pinned_staging_fits(state_bytes: int, ram_bytes: int) -> tuple[bool, str]:
    """Whether a state of ``state_bytes`` gets page-locked buffers on a host with ``ram_bytes``, and why."""
    limit = int(ram_bytes * PINNED_SHARE_OF_RAM)
    if state_bytes <= limit:
        how = "into reusable page-locked host buffers, the training thread not waiting"
    else:
        how = "the plain way, the training thread waiting for the copy"
    relation = "within" if state_bytes <= limit else "more than"
    reason = (
        f"{state_bytes / 1e9:.2f} GB copied {how} ({relation} {limit / 1e9:.1f} GB, "
        f"{PINNED_SHARE_OF_RAM:.0%} of host RAM)"
    )
    return state_bytes <= limit, reason


def _on_cuda(tensor: torch.Tensor) -> bool:
    """A plain tensor on a CUDA device (a DTensor shard's file copy is made the plain way, as before)."""
    return type(tensor) in (torch.Tensor, torch.nn.Parameter) and tensor.device.type == "cuda"


def _nbytes(tensor: torch.Tensor) -> int:
    return tensor.numel() * tensor.element_size()


def _since(started: float) -> float:
    return time.perf_counter() - started
