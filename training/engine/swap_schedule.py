"""Which swapped block sits in which device slot, and when: the pure part of block swap (``block_swap`` carries the
actions out on a CUDA side stream, or on the CPU in tests).

A micro-step uses the swapped blocks in forward order, then in reverse in the backward (a checkpointed block's
recompute runs inside its backward). The schedule keeps the next ``slots`` distinct blocks of that sequence in the
slots: when a use ends, the slot of a block not needed among the next ones is evicted and the next block is loaded
into it, so block i + 1 is copied while block i computes. The last blocks of the forward are the first of the
backward and stay; the last of the backward are the first of the next forward and stay too.

Every call returns the actions to perform now, in order: ``evict`` (the compute stream is done with the slot's
block once what is queued has run), ``load`` (copy a block into a slot) and ``wait`` (the compute stream waits for
a block's copy before using it). ``trace`` records the events seen, for tests and logs.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

logger = logging.getLogger(__name__)

#: Device slots: the block computing and the one being copied for it to use next (``hardware.offload`` prices it).
SWAP_SLOTS = 2
FORWARD, BACKWARD, IDLE = "forward", "backward", "idle"


@dataclass(frozen=True)
class Action:
    kind: str  # "evict", "load" or "wait"
    block: int
    slot: int


class SwapSchedule:
    """The slot plan for ``blocks`` swapped blocks (indices 0..blocks-1 in forward order) and ``slots`` slots."""

    def __init__(self, blocks: int, slots: int = SWAP_SLOTS) -> None:
        if slots < 1 or blocks <= slots:
            raise ValueError(
                f"block swap needs more swapped blocks ({blocks}) than device slots ({slots}) and >= 1 slot"
            )
        self.blocks = blocks
        self.uses: list[tuple[str, int]] = [(FORWARD, b) for b in range(blocks)]
        self.uses += [(BACKWARD, b) for b in reversed(range(blocks))]
        self.slots: list[int | None] = [None] * slots
        self.position = 0  # the use in progress, or the next one
        self.phase = IDLE
        self.grad_pass = False  # some block of this forward will run a backward
        self.trace: list[tuple[str, int]] = []

    def forward(self, block: int) -> list[Action]:
        """Block ``block`` is about to run its forward (or, inside its own backward, its recompute)."""
        if self.phase == BACKWARD and self.uses[self.position] == (BACKWARD, block):
            self.trace.append(("recompute", block))
            return self._ensure(block)
        index = self.uses.index((FORWARD, block))
        if self.phase != IDLE and index < self.position:
            logger.debug("block swap: a new forward began before the last pass ended (its backward did not run)")
            self.grad_pass = False
        self.phase, self.position = FORWARD, index
        self.trace.append(("forward", block))
        return self._ensure(block)

    def forward_done(self, block: int, *, needs_backward: bool) -> list[Action]:
        """Block ``block``'s forward is queued; ``needs_backward``: its output takes part in a backward."""
        self.grad_pass = self.grad_pass or needs_backward
        self.position = self.uses.index((FORWARD, block)) + 1
        if block == self.blocks - 1 and not self.grad_pass:
            return self.pass_done()  # the last block of a forward without backward (no_grad: previews)
        return self._refill()

    def backward(self, block: int) -> list[Action]:
        """The gradient of block ``block``'s output is ready: its backward (and recompute) is next."""
        self.phase, self.position = BACKWARD, self.uses.index((BACKWARD, block))
        self.trace.append(("backward", block))
        return self._ensure(block)

    def pass_done(self) -> list[Action]:
        """The backward has finished (or a forward without one): prefetch for the next forward."""
        self.phase, self.position, self.grad_pass = IDLE, 0, False
        self.trace.append(("end", -1))
        return self._refill()

    def _wanted(self) -> list[int]:
        wanted: list[int] = []
        for _, block in self.uses[self.position :]:
            if block not in wanted:
                wanted.append(block)
                if len(wanted) == len(self.slots):
                    break
        return wanted

    def _refill(self) -> list[Action]:
        wanted = self._wanted()
        actions = []
        for block in wanted:
            if block in self.slots:
                continue
            slot = next(i for i, held in enumerate(self.slots) if held not in wanted)
            if self.slots[slot] is not None:
                actions.append(Action("evict", self.slots[slot], slot))
            self.slots[slot] = block
            actions.append(Action("load", block, slot))
        return actions

    def _ensure(self, block: int) -> list[Action]:
        actions = self._refill()  # the current use is the first wanted: its block is in a slot after this
        return [*actions, Action("wait", block, self.slots.index(block))]


def replay(schedule: SwapSchedule, events: Sequence[tuple[str, int]]) -> list[Action]:
    """Feed ``events`` ("forward", "forward_done", "forward_nograd", "backward", "end") and collect the actions."""
    actions: list[Action] = []
    for kind, block in events:
        if kind == "forward":
            actions += schedule.forward(block)
        elif kind in ("forward_done", "forward_nograd"):
            actions += schedule.forward_done(block, needs_backward=kind == "forward_done")
        elif kind == "backward":
            actions += schedule.backward(block)
        elif kind == "end":
            actions += schedule.pass_done()
        else:
            raise ValueError(f"unknown swap event {kind!r}")
    return actions
