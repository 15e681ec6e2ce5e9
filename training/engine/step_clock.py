"""The step time a user waits for: from the end of the previous step to the moment the device has finished this one.

CUDA kernels run asynchronously: reading the host clock right after the last launch measures how fast the host
queued the work, not how long the device took to do it. `StepClock.lap` first waits for the device (a
``torch.cuda.synchronize`` of the training device, which costs nothing measurable at a step boundary: the step's
metrics are read back to the host right after anyway), then reads the clock. Laps are chained end to end, so the
sum of the laps is the wall-clock time of the timed window: whatever runs between two steps (logging, a checkpoint's
staging, a stop check) is part of the next step's time, as a user's stopwatch would count it.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import torch


def device_waiter(device: torch.device) -> Callable[[], None]:
    """A function that returns once every kernel queued on ``device`` has finished (a no-op off CUDA)."""
    if device.type == "cuda":
        return lambda: torch.cuda.synchronize(device)
    return lambda: None


class StepClock:
    """Chained step timer; ``wait_for_device`` is called before every clock read at a step's end."""

    def __init__(self, wait_for_device: Callable[[], None], *, clock: Callable[[], float] = time.perf_counter) -> None:
        self._wait = wait_for_device
        self._clock = clock
        self._last_end: float | None = None

    def start(self) -> None:
        """Mark the start of a step; only the first call (or the first after `reset`) sets the mark."""
        if self._last_end is None:
            self._last_end = self._clock()

    def lap(self) -> float:
        """Wait for the device, then return the seconds since the previous lap (or since `start`)."""
        if self._last_end is None:
            raise RuntimeError("StepClock.lap called before start")
        self._wait()
        now = self._clock()
        elapsed, self._last_end = now - self._last_end, now
        return elapsed

    def reset(self) -> None:
        """Forget the last mark (after a pause that is not training, e.g. a final save before a resumed run)."""
        self._last_end = None
