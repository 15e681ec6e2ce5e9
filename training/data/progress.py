"""A progress display for long CLI jobs: a one-line bar with rate and ETA on a terminal, log lines otherwise."""

from __future__ import annotations

import logging
import sys
import time
from typing import TextIO

logger = logging.getLogger(__name__)

BAR_WIDTH = 28
TTY_INTERVAL_S = 0.2
LOG_INTERVAL_S = 15.0


def format_duration(seconds: float) -> str:
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, seconds = divmod(rest, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{seconds:02d}s" if minutes else f"{seconds}s"


class ProgressDisplay:
    """Call with (done, total); the rate counts only work done in this process (a resumed job starts mid-way)."""

    def __init__(self, label: str, unit: str = "img", *, stream: TextIO | None = None, clock=time.monotonic) -> None:
        self.label, self.unit, self.clock = label, unit, clock
        self.stream = stream if stream is not None else sys.stderr
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self._start: tuple[float, int] | None = None
        self._last_shown = float("-inf")
        self._drawn = False

    def line(self, done: int, total: int) -> str:
        now = self.clock()
        if self._start is None:
            self._start = (now, done)
        elapsed, progressed = now - self._start[0], done - self._start[1]
        rate = progressed / elapsed if elapsed > 0 and progressed > 0 else None
        eta = format_duration((total - done) / rate) if rate else "?"
        filled = BAR_WIDTH * done // max(total, 1)
        bar = "#" * filled + "." * (BAR_WIDTH - filled)
        speed = f"{rate:.2f} {self.unit}/s" if rate else f"- {self.unit}/s"
        return f"{self.label} [{bar}] {done}/{total} {speed} ETA {eta}"

    def __call__(self, done: int, total: int) -> None:
        text = self.line(done, total)
        now, finished = self.clock(), done >= total
        interval = TTY_INTERVAL_S if self.tty else LOG_INTERVAL_S
        if not finished and now - self._last_shown < interval:
            return
        self._last_shown = now
        if self.tty:
            self.stream.write("\r" + text)
            self.stream.flush()
            self._drawn = True
        else:
            logger.info("%s", text)

    def close(self) -> None:
        """End the bar's line on a terminal (call once the job is over, successful or not)."""
        if self._drawn:
            self.stream.write("\n")
            self.stream.flush()
            self._drawn = False
