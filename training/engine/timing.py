"""The rate of a timed window of step events, checked against the wall clock (what every benchmark reports).

The engine's ``step_s`` is taken after the device has finished the step (`step_clock`); each event's ``time`` is the
host's wall clock when the event was written. Over a window of steps the two must agree: the sum of the step times
against the wall time from the end of the last step before the window to the end of its last step. A difference
of more than ``tolerance`` means a timer that a user's stopwatch would not reproduce, and is an error.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass


class TimingMismatch(RuntimeError):
    """The engine's step times and the wall clock disagree over a timed window."""


@dataclass(kw_only=True, frozen=True)
class WindowRate:
    steps: int
    images: float
    wall_s: float  # from the event before the window to the window's last event
    engine_s: float  # the sum of the engine's step times over the window
    median_step_s: float

    @property
    def img_per_s(self) -> float:
        """The wall-clock rate: what a user waits for."""
        return self.images / self.wall_s

    @property
    def engine_img_per_s(self) -> float:
        return self.images / self.engine_s

    @property
    def disagreement(self) -> float:
        return abs(self.engine_s / self.wall_s - 1.0)


def window_rate(events: list[dict], *, warmup: int, tolerance: float = 0.03) -> WindowRate:
    """Rate over ``events[warmup:]`` (step events in order; ``warmup`` >= 1 so the window has a start time)."""
    if warmup < 1:
        raise ValueError(f"warmup must be >= 1 (the window starts at the end of the last warm-up step), got {warmup}")
    if len(events) <= warmup:
        raise ValueError(f"need more than {warmup} step events for a timed window, got {len(events)}")
    timed = events[warmup:]
    wall_s = timed[-1]["time"] - events[warmup - 1]["time"]
    engine_s = sum(e["step_s"] for e in timed)
    images = sum(e["img_per_s"] * e["step_s"] for e in timed)
    rate = WindowRate(
        steps=len(timed),
        images=images,
        wall_s=wall_s,
        engine_s=engine_s,
        median_step_s=statistics.median(e["step_s"] for e in timed),
    )
    if wall_s <= 0 or rate.disagreement > tolerance:
        raise TimingMismatch(
            f"engine step times sum to {engine_s:.4f} s but the wall clock says {wall_s:.4f} s over "
            f"{len(timed)} steps ({rate.disagreement:.1%} apart, tolerance {tolerance:.0%}): the step timer is not "
            "measuring what a user waits for"
        )
    return rate
