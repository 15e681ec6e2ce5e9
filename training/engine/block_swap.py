"""Block swap: the frozen weights of the first main blocks live in pinned host memory and are copied to the device
ahead of their use, in the forward and in the backward, on a side CUDA stream ordered by events.

Applied by ``parallelize`` with hooks on the blocks (the model code knows nothing of it). ``SwapSchedule`` decides
the order; this module carries it out. Each swapped block's frozen tensors (parameters that do not train and
buffers: bf16 weights, or ``fp8_storage``'s e4m3 weights and scales) are packed into one pinned host buffer and
copied in one transfer into one of ``SWAP_SLOTS`` device slots; the tensors are pointed (``.data``) at their slot
while the block is resident and back at the host copy when it is evicted, so a use out of schedule fails with a
device mismatch instead of reading another block's weights. The LoRA parameters never move.

Swapped blocks must be checkpointed: autograd keeps the frozen weight a matmul used until its backward, which here
would be a slot that meanwhile holds another block; a checkpointed block saves nothing in its forward and recomputes
in its backward, when it is resident again. On the CPU (tests) the "device" slots are host tensors and an evicted
block's tensors hold NaN, so a use out of schedule shows in the loss.
"""

from __future__ import annotations

import functools
import logging
import time
from dataclasses import dataclass, field

import torch
from torch import nn

from .swap_schedule import SWAP_SLOTS, Action, SwapSchedule

logger = logging.getLogger(__name__)

ALIGN = 256  # bytes: every tensor of a packed block starts at a multiple (any dtype's view of the bytes is valid)


@dataclass
class _Packed:
    """One swapped block: its frozen tensors, their byte offsets, the pinned host bytes and the evicted views."""

    tensors: list[torch.Tensor]
    offsets: list[int]
    host: torch.Tensor  # uint8, pinned on CUDA runs
    home: list[torch.Tensor]  # what an evicted tensor holds: its host view (CUDA) or NaN (CPU)

    @property
    def nbytes(self) -> int:
        return self.host.numel()


@dataclass
class SwapStats:
    """Counters since the last ``BlockSwap.take_stats``; times need ``measure`` (CUDA events)."""

    loads: int = 0
    bytes: int = 0
    copy_s: float = 0.0  # side-stream time spent copying
    stall_s: float = 0.0  # compute-stream time spent waiting for copies
    events: list = field(default_factory=list, repr=False)

    @property
    def hidden_share(self) -> float | None:
        """Share of the copy time hidden behind compute (1 - stall / copy)."""
        return None if self.copy_s <= 0 else max(0.0, 1.0 - self.stall_s / self.copy_s)


def _frozen_tensors(block: nn.Module) -> list[torch.Tensor]:
    tensors, seen = [], set()
    for module in block.modules():
        candidates = [p for p in module._parameters.values() if p is not None and not p.requires_grad]
        candidates += [b for b in module._buffers.values() if b is not None]
        for tensor in candidates:
            if id(tensor) not in seen:
                seen.add(id(tensor))
                tensors.append(tensor)
    return tensors


def _view(flat: torch.Tensor, offset: int, like: torch.Tensor) -> torch.Tensor:
    size = like.numel() * like.element_size()
    return flat[offset : offset + size].view(like.dtype).view(like.shape)


def _pack(block: nn.Module, *, pin: bool, poison: bool) -> _Packed:
    tensors = _frozen_tensors(block)
    offsets, total = [], 0
    for tensor in tensors:
        if not tensor.is_floating_point() or not tensor.is_contiguous():
            raise ValueError(
                f"block swap moves contiguous floating-point tensors; this block holds a {tensor.dtype} tensor of "
                f"strides {tensor.stride()}"
            )
        offsets.append(total)
        total += -(-tensor.numel() * tensor.element_size() // ALIGN) * ALIGN
    host = torch.empty(total, dtype=torch.uint8, pin_memory=pin)
    home = []
    for tensor, offset in zip(tensors, offsets, strict=True):
        view = _view(host, offset, tensor)
        view.copy_(tensor.detach())
        home.append(torch.full_like(view, float("nan")) if poison else view)
    return _Packed(tensors=tensors, offsets=offsets, host=host, home=home)


class BlockSwap:
    """Hooks and copies for ``blocks`` (the inner modules of the swapped main blocks, in forward order)."""

    def __init__(self, blocks: list[nn.Module], device: torch.device, *, measure: bool = False) -> None:
        self.device = device
        self.cuda = device.type == "cuda"
        self.measure = measure and self.cuda
        self.schedule = SwapSchedule(len(blocks))
        self.packed = [_pack(block, pin=self.cuda, poison=not self.cuda) for block in blocks]
        for packed in self.packed:
            for tensor, home in zip(packed.tensors, packed.home, strict=True):
                tensor.data = home
        slot_bytes = max(p.nbytes for p in self.packed)
        self.slots = [torch.empty(slot_bytes, dtype=torch.uint8, device=device) for _ in range(SWAP_SLOTS)]
        self.side = torch.cuda.Stream(device) if self.cuda else None
        self.compute = torch.cuda.current_stream(device) if self.cuda else None
        self.ready: list = [None] * SWAP_SLOTS
        self.free: list = [None] * SWAP_SLOTS
        self.stats = SwapStats()
        self._callback_queued = False
        self.handles = []
        for index, block in enumerate(blocks):
            self.handles.append(block.register_forward_pre_hook(functools.partial(self._before, index)))
            self.handles.append(block.register_forward_hook(functools.partial(self._after, index)))

    @property
    def host_bytes(self) -> int:
        return sum(p.nbytes for p in self.packed)

    @property
    def slot_bytes(self) -> int:
        return sum(s.numel() for s in self.slots)

    # -- hooks

    def _before(self, index: int, module, args) -> None:
        self._run(self.schedule.forward(index))

    def _after(self, index: int, module, args, output) -> None:
        if self.schedule.phase == "backward":  # a recompute inside the backward: the block stays for its backward
            return
        needs = torch.is_grad_enabled() and isinstance(output, torch.Tensor) and output.requires_grad
        if needs:
            output.register_hook(functools.partial(self._on_grad, index))
        self._run(self.schedule.forward_done(index, needs_backward=needs))

    def _on_grad(self, index: int, grad):
        if not self._callback_queued:
            self._callback_queued = True
            torch.autograd.Variable._execution_engine.queue_callback(self._backward_done)
        self._run(self.schedule.backward(index))
        return None

    def _backward_done(self) -> None:
        self._callback_queued = False
        self._run(self.schedule.pass_done())

    # -- actions

    def _run(self, actions: list[Action]) -> None:
        for action in actions:
            getattr(self, f"_{action.kind}")(action.block, action.slot)

    def _evict(self, block: int, slot: int) -> None:
        if self.cuda:
            self.free[slot] = self.compute.record_event()
        packed = self.packed[block]
        for tensor, home in zip(packed.tensors, packed.home, strict=True):
            tensor.data = home

    def _load(self, block: int, slot: int) -> None:
        packed, flat = self.packed[block], self.slots[slot]
        self.stats.loads += 1
        self.stats.bytes += packed.nbytes
        if self.cuda:
            with torch.cuda.stream(self.side):
                if self.free[slot] is not None:
                    self.side.wait_event(self.free[slot])
                start = self._mark(self.side)
                flat[: packed.nbytes].copy_(packed.host, non_blocking=True)
                self.ready[slot] = torch.cuda.Event(enable_timing=self.measure)  # elapsed_time needs timing on both
                self.ready[slot].record(self.side)
                if start is not None:
                    self.stats.events.append(("copy", start, self.ready[slot]))
        else:
            flat[: packed.nbytes].copy_(packed.host)
        for tensor, offset in zip(packed.tensors, packed.offsets, strict=True):
            tensor.data = _view(flat, offset, tensor)

    def _wait(self, block: int, slot: int) -> None:
        if not self.cuda or self.ready[slot] is None:
            return
        before = self._mark(self.compute)
        self.compute.wait_event(self.ready[slot])
        after = self._mark(self.compute)
        if before is not None:
            self.stats.events.append(("stall", before, after))

    def _mark(self, stream):
        if not self.measure:
            return None
        event = torch.cuda.Event(enable_timing=True)
        event.record(stream)
        return event

    def take_stats(self) -> SwapStats:
        """The counters since the last call (synchronises the device to read the event times when measuring)."""
        stats, self.stats = self.stats, SwapStats()
        if stats.events:
            torch.cuda.synchronize(self.device)
            for kind, start, end in stats.events:
                seconds = start.elapsed_time(end) / 1000
                if kind == "copy":
                    stats.copy_s += seconds
                else:
                    stats.stall_s += seconds
            stats.events = []
        return stats


def apply_block_swap(model: nn.Module, swap_blocks: int, device: torch.device, *, measure: bool = False) -> BlockSwap:
    """Swap the first ``swap_blocks`` main blocks (all checkpointed) and place everything else on ``device``."""
    layers = list(model.layers)
    if not 0 < swap_blocks <= len(layers):
        raise ValueError(f"run.swap_blocks={swap_blocks} must be in 1..{len(layers)} (the main blocks)")
    inner = []
    for index, layer in enumerate(layers[:swap_blocks]):
        wrapped = getattr(layer, "_checkpoint_wrapped_module", None)
        if wrapped is None:
            raise ValueError(
                f"run.swap_blocks={swap_blocks} but main block {index} is not checkpointed: swapped blocks must be "
                f"(set run.checkpoint_depth >= {swap_blocks})"
            )
        inner.append(wrapped)
    started = time.perf_counter()
    swap = BlockSwap(inner, device, measure=measure)
    model._block_swap = swap
    moved = place_on_device(model, device)
    total = len(layers) + len(model.noise_refiner) + len(model.context_refiner)
    logger.info(
        "block swap: %d of %d blocks in %s host memory (%.2f GiB), %d device slots (%.2f GiB), %d blocks resident; "
        "%d other tensors placed on %s (%.1f s)",
        swap_blocks,
        total,
        "pinned" if swap.cuda else "CPU",
        swap.host_bytes / 2**30,
        SWAP_SLOTS,
        swap.slot_bytes / 2**30,
        total - swap_blocks,
        moved,
        device,
        time.perf_counter() - started,
    )
    return swap


def place_on_device(model: nn.Module, device: torch.device) -> int:
    """Move every parameter and buffer not already on ``device`` and not held by block swap; returns the count."""
    swap = getattr(model, "_block_swap", None)
    held = {id(t) for p in swap.packed for t in p.tensors} if swap is not None else set()
    moved = 0
    for tensor in [*model.parameters(), *model.buffers()]:
        if id(tensor) in held or _on(tensor, device):
            continue
        tensor.data = tensor.data.to(device)
        moved += 1
    return moved


def _on(tensor: torch.Tensor, device: torch.device) -> bool:
    here = tensor.device
    return here.type == device.type and (device.index is None or here.index in (None, device.index))


def block_swap_of(model: nn.Module) -> BlockSwap | None:
    """The ``BlockSwap`` that ``apply_block_swap`` attached to ``model`` (None without block swap)."""
    return getattr(model, "_block_swap", None)
