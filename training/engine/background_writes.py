"""The run's result files written off the training thread: the LoRA saved every few hundred steps took the training
thread 1.75–2.26 s at r128 (0.65 GB; issue 12), and the GPU sat idle for it.

The caller stages the file first (a CPU copy, `lora_file.stage_lora_file`), so training may change the weights as
soon as `submit` returns; the write itself (atomic: a temporary file, fsync, rename) runs in one worker thread, in
submission order. A failed write is raised, naming the file, by the next `submit` or `wait`; `failed` tells without
waiting. The trainer asks after every step (every rank stops with rank 0), waits before every save and at the end of
the run, so a run whose file did not reach the disk never reports success. `wait` gives up after ``timeout_s`` (a stalled disk), naming the file. The worker is
not a daemon thread: a process that exits after an error still finishes the last staged file (the cleanup's `close`
does not wait for a write that already timed out).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout

logger = logging.getLogger(__name__)

DEFAULT_TIMEOUT_S = 1800.0  # as the checkpoint's: a LoRA or EMA file of any rank on a slow network disk fits


class BackgroundWriteFailed(RuntimeError):
    """A background write raised; the file it names keeps its previous content (the writes are atomic)."""


class BackgroundWrites:
    """Writes run in one worker thread, in order; `wait` returns once every submitted write is on disk."""

    def __init__(self, *, timeout_s: float = DEFAULT_TIMEOUT_S) -> None:
        if not timeout_s > 0:
            raise ValueError(f"BackgroundWrites timeout_s must be > 0 (seconds a write may take), got {timeout_s}")
        self.timeout_s = timeout_s
        self._executor: ThreadPoolExecutor | None = None
        self._pending: list[tuple[str, Future]] = []

    def submit(self, label: str, write: Callable[[], None]) -> None:
        """Run ``write`` (it must touch only data it owns) in the worker; ``label`` names its file in errors.
        Earlier writes that already failed are raised here, before anything new is queued."""
        if self.failed():
            self.wait()
        if self._executor is None:
            self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="result-write")
        self._pending.append((label, self._executor.submit(write)))

    def failed(self) -> bool:
        """Whether a finished write failed (no wait: the trainer asks each step and every rank learns the answer in
        the step's all-reduce, so a failure stops the whole run at the next step, not at the next save)."""
        return any(future.done() and future.exception() is not None for _, future in self._pending)

    def wait(self, timeout_s: float | None = None) -> None:
        """Block until every submitted write has finished (at most ``timeout_s`` in all, default the instance's);
        raise the first failure (the others are logged). A write still running after the timeout stays pending."""
        limit = self.timeout_s if timeout_s is None else timeout_s
        deadline = time.monotonic() + limit
        failures = []
        while self._pending:
            label, future = self._pending[0]
            try:
                error = future.exception(timeout=max(deadline - time.monotonic(), 0))
            except FutureTimeout:
                raise TimeoutError(
                    f"writing {label} did not finish within {limit:g} s: the disk may be stalled or full; the file "
                    "keeps its previous content (the write is atomic)"
                ) from None
            self._pending.pop(0)  # only once checked: an interrupted wait leaves the rest to the next one
            if error is not None:
                failures.append((label, error))
        for label, error in failures[1:]:
            logger.error("writing %s failed too: %s: %s", label, type(error).__name__, error)
        if failures:
            label, error = failures[0]
            raise BackgroundWriteFailed(f"writing {label} failed: {type(error).__name__}: {error}") from error

    def close(self, *, raise_error: bool = True, timeout_s: float | None = None) -> None:
        """`wait` (same ``timeout_s``), then stop the worker. With ``raise_error=False`` (cleaning up after another
        error) a failed or timed-out write is logged instead of raised. Idempotent."""
        try:
            self.wait(timeout_s)
        except (BackgroundWriteFailed, TimeoutError) as error:
            if raise_error:
                raise
            logger.error("%s", error)
        finally:
            if self._executor is not None:
                self._executor.shutdown(wait=not self._pending)  # a stalled write must not hold the cleanup
                self._executor = None
