"""The step time a user waits for: from the end of the previous step to the moment the device has finished this one.

CUDA kernels run asynchronously: reading the host clock right after the last launch measures how fast the host
queued the work, not how long the device took to do it. Two clocks keep that contract:

- `StepClock` (off CUDA, and where a test stands in for the device): `mark` waits for the device, then reads the host
  clock, at the end of each step's dispatch.
- `EventStepClock` (CUDA): `mark` records a timing event on the device's stream after the step's last kernel, and
  `lap` waits for that event alone and returns the device time between it and the previous step's event. The host
  need not wait at the step's end, so it can queue the next step while the device finishes this one
  (`step_lookahead`), and the GPU does not idle while the host logs, reads metrics back or prepares a batch.

Laps are chained end to end, so the sum of the laps is the wall-clock time of the timed window: whatever runs
between two steps (logging, a checkpoint's staging, a stop check) is part of the next step's time, as a user's
stopwatch would count it (an event is reached only when the device gets there, so time the device waits for the
host is counted too).
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


def step_clock(device: torch.device) -> StepClock | EventStepClock:
    """The clock for ``device``: CUDA events on a GPU, the host clock elsewhere."""
    return EventStepClock(device) if device.type == "cuda" else StepClock(device_waiter(device))


def step_lookahead(device: torch.device, world_size: int) -> tuple[bool, str]:
    """Whether the host queues step n+1 before reading step n's metrics back, and why."""
    if device.type != "cuda":
        return False, f"{device.type} runs each kernel as it is called: there is no queue to keep full"
    if world_size > 1:
        return False, (
            f"{world_size} processes agree on a stop request in each step's metrics all-reduce, so each rank reads "
            "its step's metrics back before the next step and all ranks stop at the same step"
        )
    return True, "one process: the next step is queued while the GPU finishes this one (metrics read one step late)"


class StepClock:
    """Chained host-clock step timer; ``wait_for_device`` is called before every clock read at a step's end."""

    def __init__(self, wait_for_device: Callable[[], None], *, clock: Callable[[], float] = time.perf_counter) -> None:
        self._wait = wait_for_device
        self._clock = clock
        self._last_end: float | None = None

    def start(self) -> None:
        """Mark the start of a step; only the first call (or the first after `reset`) sets the mark."""
        if self._last_end is None:
            self._last_end = self._clock()

    def mark(self) -> float:
        """At the end of a step's dispatch: wait for the device, then read the clock."""
        if self._last_end is None:
            raise RuntimeError("StepClock.mark called before start")
        self._wait()
        return self._clock()

    def lap(self, mark: float | None = None) -> float:
        """The seconds from the previous lap's end (or `start`) to ``mark`` (default: `mark` now)."""
        end = self.mark() if mark is None else mark
        elapsed, self._last_end = end - self._last_end, end
        return elapsed

    def reset(self) -> None:
        """Forget the last mark (after a pause that is not training, e.g. a final save before a resumed run)."""
        self._last_end = None


class EventStepClock:
    """Chained step timer from CUDA events: each lap is the device time between two step ends."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self._last_end: torch.cuda.Event | None = None

    def _record(self) -> torch.cuda.Event:
        event = torch.cuda.Event(enable_timing=True)
        event.record(torch.cuda.current_stream(self.device))
        return event

    def start(self) -> None:
        if self._last_end is None:
            self._last_end = self._record()

    def mark(self) -> torch.cuda.Event:
        """At the end of a step's dispatch: an event the device reaches once it has done the step."""
        if self._last_end is None:
            raise RuntimeError("EventStepClock.mark called before start")
        return self._record()

    def lap(self, mark: torch.cuda.Event | None = None) -> float:
        """Wait until the device has reached ``mark`` (default: a mark now); the seconds since the previous lap."""
        end = self.mark() if mark is None else mark
        end.synchronize()
        elapsed = self._last_end.elapsed_time(end) / 1000
        self._last_end = end
        return elapsed

    def reset(self) -> None:
        self._last_end = None
