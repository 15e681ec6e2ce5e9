"""How much of each step Python's garbage collector took. A collection holds the interpreter lock, so the training
thread stops launching work while it runs, whichever thread triggered it; a full (generation 2) collection over a
heap of compiled graphs can be long enough to see (issue 12: one 0.83 s step among 0.25 s ones on an H200, not
explained by anything else the run logged). Each step's event carries ``gc_s`` (seconds in collections since the
previous step's event) and ``gc_generation`` (the oldest generation collected, or null), so such a step names its
cause.

After the first step, `freeze_setup` moves every object still alive (the model, the compiled graphs and their
caches, which live as long as the run) into the collector's permanent generation (``gc.freeze``): a later full
collection walks only what the steps allocated since. Measured on an H200 (150-step compiled LoRA runs, 0.24 s a
step): a 0.36 s generation-2 pause before it; none in the 148 steps after it in four runs, for a collection of
0.55–0.70 s once. The objects are unfrozen on exit.
"""

from __future__ import annotations

import gc
import logging
import time
from collections.abc import Callable

logger = logging.getLogger("training.engine.trainer")

NOTABLE_PAUSE_S = 0.1  # a collection at least this long is logged with its step


class GcPauses:
    """Counts collector time between `take` calls while entered (a ``gc.callbacks`` hook; removed on exit)."""

    def __init__(self, *, clock: Callable[[], float] = time.perf_counter) -> None:
        self._clock = clock
        self._started: float | None = None
        self._seconds = 0.0
        self._generation: int | None = None
        self._froze = False

    def __enter__(self) -> GcPauses:
        gc.callbacks.append(self._on_collection)
        return self

    def __exit__(self, *exc_info) -> None:
        gc.callbacks.remove(self._on_collection)
        if self._froze:
            gc.unfreeze()

    def freeze_setup(self) -> None:
        """One full collection, then every survivor into the permanent generation (see the module docstring). Not
        when something else in this process froze objects already: unfreezing at the end would release them too."""
        if gc.get_freeze_count():
            logger.info("garbage collector: %d objects were frozen already; not freezing", gc.get_freeze_count())
            return
        started = self._clock()
        gc.collect()
        gc.freeze()
        self._froze = True
        logger.info(
            "garbage collector: %d objects alive after the first step (model, compiled graphs) frozen in %.2f s, so "
            "later full collections skip them", gc.get_freeze_count(), self._clock() - started,
        )  # fmt: skip

    def take(self, step: int) -> dict:
        """``gc_s`` and ``gc_generation`` since the previous call (then zeroed); a notable pause is logged."""
        seconds, generation = self._seconds, self._generation
        self._seconds, self._generation = 0.0, None
        if seconds >= NOTABLE_PAUSE_S:
            logger.info("step %d: Python's garbage collector paused training for %.2f s (generation %d)",
                        step, seconds, generation)  # fmt: skip
        return {"gc_s": seconds, "gc_generation": generation}

    def _on_collection(self, phase: str, info: dict) -> None:
        if phase == "start":
            self._started = self._clock()
            return
        if self._started is None:  # entered during a collection: its start was not seen
            return
        self._seconds += self._clock() - self._started
        self._started = None
        self._generation = max(info["generation"], -1 if self._generation is None else self._generation)
