"""Reusable page-locked host buffers for the LoRA files a save writes in the background (issue 12).

An r128 LoRA file is 0.64 GB of bf16. Copied the plain way (a blocking ``.to("cpu")`` per tensor into fresh
pageable memory), the training thread waited for every copy and for the first touch of every page: on an H200 the
step after each LoRA save took 0.30–0.75 s instead of 0.24. `HostStaging` copies into page-locked buffers, one per
(slot, tensor name), reused by every save, queued on the tensors' CUDA stream without waiting: stream order keeps
each copy ahead of the next optimizer step that changes its source, so training goes on at once, and the writer
waits for the copies (`HostCopies.wait`) before it reads a byte. Measured on the H200: no step after a save slower
than 0.29 s. A slot is one result file (the LoRA, its EMA twin): the next save reuses a slot's buffers only once the
previous write has finished (the trainer waits for it first).

Allocating page-locked memory runs at about 1 GB/s and blocked the training thread even from another thread (it
appears to wait for the device), so only `prepare` allocates, at a step boundary where the device is idle anyway (the
trainer: after the first step, 0.64 GB in about 0.4 s). Until then, and whenever page-locked memory is not used, the
copies are made the plain way. It is used only while every slot's buffers together take at most a quarter of host
RAM and half of what is available when they are allocated (block swap and CPU offload pin memory too), and a failed
allocation falls back to the plain way. The choice is logged once, with its reason.

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

from ..hardware.discovery import host_available_bytes, host_ram_bytes

logger = logging.getLogger(__name__)

PINNED_SHARE_OF_RAM = 0.25  # the largest share of host RAM the reusable page-locked buffers may take
PINNED_SHARE_OF_AVAILABLE = 0.5  # ... and of the RAM available when they are allocated

Entries = list[tuple[str, torch.Tensor]]


@dataclass(eq=False)
class HostCopies:
    """(name, CPU tensor) pairs whose values are final once `wait` returns (a slot's buffers are reused by its
    next `HostStaging.copy`)."""

    tensors: Entries
    ready: torch.cuda.Event | None = None  # recorded after the last queued device-to-host copy

    def wait(self) -> None:
        if self.ready is not None:
            self.ready.synchronize()


class HostStaging:
    """Reusable page-locked host buffers per slot and tensor name (see the module docstring)."""

    def __init__(
        self,
        purpose: str,
        *,
        ram_bytes: Callable[[], int] = host_ram_bytes,
        available_bytes: Callable[[], int] = host_available_bytes,
    ) -> None:
        self.purpose = purpose  # what the copies are for, in the log: "LoRA staging"
        self._ram_bytes, self._available_bytes = ram_bytes, available_bytes
        self._buffers: dict[tuple[str, str], torch.Tensor] = {}
        self._pinned = False  # set by a successful `prepare`

    def prepare(self, slots: dict[str, Entries]) -> None:
        """Allocate the buffers of every slot for tensors like its entries, now (at a step boundary: see the module
        docstring); later calls do nothing."""
        if self._pinned or self._buffers:
            return
        wanted = {(slot, name): tensor for slot, entries in slots.items() for name, tensor in _unique(entries)}
        wanted = {key: tensor for key, tensor in wanted.items() if _on_cuda(tensor)}
        if not wanted:
            return
        fits, reason = pinned_staging_fits(
            sum(map(_nbytes, wanted.values())), ram_bytes=self._ram_bytes(), available_bytes=self._available_bytes()
        )
        logger.info("%s: %s", self.purpose, reason)
        if not fits:
            return
        started = time.perf_counter()
        try:
            for key, tensor in wanted.items():
                self._buffers[key] = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=True)
        except RuntimeError as error:  # out of page-locked memory: the plain way still works
            self._buffers.clear()
            logger.warning("%s: allocating page-locked buffers failed (%s); copying the plain way", self.purpose, error)
            return
        self._pinned = True
        logger.info("%s: %d page-locked buffers allocated in %.2f s", self.purpose, len(wanted), _since(started))

    def copy(self, entries: Entries, *, slot: str = "") -> HostCopies:
        """Host copies of ``entries`` (one per distinct tensor, under each of its names): device tensors with a
        prepared buffer are copied asynchronously, everything else the plain way."""
        copies, done, streams = [], {}, set()
        for name, tensor in entries:
            host = done.get(id(tensor))
            if host is None:
                buffer = self._buffers.get((slot, name)) if self._pinned and _on_cuda(tensor) else None
                if buffer is not None and buffer.shape == tensor.shape and buffer.dtype == tensor.dtype:
                    host = buffer.copy_(tensor.detach(), non_blocking=True)
                    streams.add(torch.cuda.current_stream(tensor.device))
                else:
                    host = tensor.detach().to("cpu", copy=True)
                done[id(tensor)] = host
            copies.append((name, host))
        if not streams:
            return HostCopies(copies)
        if len(streams) != 1:
            raise ValueError(f"{self.purpose}: the tensors are on several CUDA streams or devices: {streams}")
        ready = torch.cuda.Event()
        ready.record(streams.pop())
        return HostCopies(copies, ready)


def pinned_staging_fits(state_bytes: int, *, ram_bytes: int, available_bytes: int) -> tuple[bool, str]:
    """Whether ``state_bytes`` of buffers get page-locked memory on a host with ``ram_bytes`` of RAM, of which
    ``available_bytes`` are available now, and why."""
    limit = int(min(ram_bytes * PINNED_SHARE_OF_RAM, available_bytes * PINNED_SHARE_OF_AVAILABLE))
    fits = state_bytes <= limit
    how = (
        "into reusable page-locked host buffers, the training thread not waiting"
        if fits
        else "the plain way, the training thread waiting for the copy"
    )
    reason = (
        f"{state_bytes / 1e9:.2f} GB copied {how} ({'within' if fits else 'more than'} {limit / 1e9:.1f} GB: "
        f"{PINNED_SHARE_OF_RAM:.0%} of host RAM, at most {PINNED_SHARE_OF_AVAILABLE:.0%} of the "
        f"{available_bytes / 1e9:.1f} GB available)"
    )
    return fits, reason


def _unique(entries: Entries) -> Entries:
    """The first name of each distinct tensor (q, k and v share A), as `HostStaging.copy` keys its buffer."""
    return list({id(tensor): (name, tensor) for name, tensor in reversed(entries)}.values())[::-1]


def _on_cuda(tensor: torch.Tensor) -> bool:
    """A plain tensor on a CUDA device (a DTensor shard's file copy is made the plain way, as before)."""
    return type(tensor) in (torch.Tensor, torch.nn.Parameter) and tensor.device.type == "cuda"


def _nbytes(tensor: torch.Tensor) -> int:
    return tensor.numel() * tensor.element_size()


def _since(started: float) -> float:
    return time.perf_counter() - started
