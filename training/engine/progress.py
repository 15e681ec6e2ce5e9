"""What a person at the terminal sees while ``train`` runs: one progress line (step, loss, img/s, ETA and the phase:
"loading weights", "compiling", "saving", ...), redrawn in place when stderr is a terminal, plain log lines every
`LOG_INTERVAL_S` otherwise (a pipe, a file, the ComfyUI node's child process). Rank 0 only; the metrics are the ones
the loop already logs to ``events.jsonl``, so the bar costs no device sync.
"""

from __future__ import annotations

import logging
import sys
import threading
import time
from collections.abc import Callable
from typing import TextIO

from ..data.progress import format_duration

logger = logging.getLogger(__name__)

LOG_INTERVAL_S = 10.0  # without a terminal: a step line at most this often (and at the first and the last step)
TICK_S = 0.5  # with a terminal: the line is redrawn this often, so a long phase shows its seconds counting
BAR_WIDTH = 20
CLEAR_LINE = "\r\x1b[K"
GLYPHS = ("█", "░", "…")  # done, to do, ellipsis; ASCII where the terminal's encoding lacks them
ASCII_GLYPHS = ("#", "-", "...")


class Progress:
    """Call `phase` when the run enters a silent stretch, `step` after each optimizer step, `close` at the end."""

    def __init__(
        self,
        total_steps: int,
        *,
        rank: int = 0,
        stream: TextIO | None = None,
        terminal: bool | None = None,
        clock: Callable[[], float] = time.monotonic,
        tick_s: float | None = TICK_S,
    ) -> None:
        self.total_steps = total_steps
        self.enabled = rank == 0
        self.stream = stream if stream is not None else sys.stderr
        self.terminal = self.enabled and (self.stream.isatty() if terminal is None else terminal)
        self.clock = clock
        self.glyphs = GLYPHS if _can_encode(self.stream, "".join(GLYPHS)) else ASCII_GLYPHS
        self._lock = threading.Lock()
        self._phase, self._phase_since = "starting", clock()
        self._step: int | None = None
        self._metrics: dict = {}
        self._first: tuple[int, float] | None = None  # (step, time) after the first step: ETA leaves compile out
        self._last_line = -float("inf")
        self._visible = False
        self._log_pending = False  # a log line was just let through: the ticker waits one tick for it to be written
        self._stop = threading.Event()
        self._filters: list[tuple[logging.Handler, logging.Filter]] = []
        self._ticker = None
        if self.terminal:
            self._hook_log_handlers()
            if tick_s:
                self._ticker = threading.Thread(
                    target=self._tick, args=(tick_s,), name="whetstone-progress", daemon=True
                )
                self._ticker.start()

    def phase(self, text: str) -> None:
        """A stretch without steps begins (loading weights, compiling, saving): shown with its seconds counting."""
        if not self.enabled:
            return
        with self._lock:
            self._phase, self._phase_since = text, self.clock()
        if self.terminal:
            self._draw()
        else:
            logger.info("%s...", text)

    def step(self, step: int, metrics: dict) -> None:
        if not self.enabled:
            return
        now = self.clock()
        with self._lock:
            self._step, self._metrics = step, metrics
            self._phase, self._phase_since = "training", now
            if self._first is None:
                self._first = (step, now)
        if self.terminal:
            self._draw()
        elif now - self._last_line >= LOG_INTERVAL_S or step in (self._first[0], self.total_steps):
            self._last_line = now
            logger.info("%s", self.describe())

    def describe(self) -> str:
        """The progress line without the bar: 'step 120/1000 (12%) | loss 0.1234 | 3.4 img/s | ETA 4m12s | phase'."""
        with self._lock:
            step, metrics, phase, since = self._step, self._metrics, self._phase, self._phase_since
        parts = []
        if step is not None:
            parts.append(f"step {step}/{self.total_steps} ({100 * step // self.total_steps}%)")
            if metrics.get("loss") is not None:
                parts.append(f"loss {metrics['loss']:.4f}")
            if metrics.get("img_per_s") is not None:
                parts.append(f"{metrics['img_per_s']:.2f} img/s")
            parts.append(f"ETA {self._eta()}")
        if phase != "training" or step is None:
            parts.append(f"{phase}{self.glyphs[2]} {self.clock() - since:.0f} s")
        return " | ".join(parts)

    def close(self) -> None:
        self._stop.set()
        if self._ticker is not None:
            self._ticker.join(timeout=2)
        for handler, log_filter in self._filters:
            handler.removeFilter(log_filter)
        self._filters = []
        if self.terminal and self._visible:
            with self._lock:
                self.stream.write("\n")
                self.stream.flush()
                self._visible = False

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    # ------------------------------------------------------------------------ internals

    def _eta(self) -> str:
        if self._first is None or self._step is None or self._step <= self._first[0]:
            return "--"
        rate = (self._step - self._first[0]) / max(self.clock() - self._first[1], 1e-9)
        return format_duration((self.total_steps - self._step) / rate)

    def _draw(self) -> None:
        text = self.describe()
        done = (self._step or 0) / self.total_steps
        filled = int(BAR_WIDTH * done)
        bar = self.glyphs[0] * filled + self.glyphs[1] * (BAR_WIDTH - filled)
        with self._lock:
            self.stream.write(f"{CLEAR_LINE}[{bar}] {text}")
            self.stream.flush()
            self._visible = True

    def _tick(self, interval_s: float) -> None:
        while not self._stop.wait(interval_s):
            with self._lock:
                skip, self._log_pending = self._log_pending, False
            if not skip:
                self._draw()

    def _hook_log_handlers(self) -> None:
        """A log line written to our stream first clears the bar (the next draw puts it back below the line)."""
        progress = self

        class ClearBar(logging.Filter):
            def filter(self, record: logging.LogRecord) -> bool:
                with progress._lock:
                    if progress._visible:
                        progress.stream.write(CLEAR_LINE)
                        progress._visible = False
                    progress._log_pending = True
                return True

        for handler in logging.getLogger().handlers:
            if getattr(handler, "stream", None) is self.stream:
                log_filter = ClearBar()
                handler.addFilter(log_filter)
                self._filters.append((handler, log_filter))


def _can_encode(stream: TextIO, text: str) -> bool:
    try:
        text.encode(getattr(stream, "encoding", None) or "ascii")
    except (UnicodeEncodeError, LookupError):
        return False
    return True
