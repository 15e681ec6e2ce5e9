"""The run's result files written off the training thread: the LoRA saved every few hundred steps took the training
thread 1.75–2.26 s at r128 (0.65 GB; issue 12), and the GPU sat idle for it.

The caller stages the file first (a CPU copy, `lora_file.stage_lora_file`), so training may change the weights as
soon as `submit` returns; the write itself (atomic: a temporary file, fsync, rename) runs in one worker thread, in
submission order. A failed write is raised, naming the file, by the next `wait` or `submit`: the trainer waits before
every save and at the end of the run, so a run whose file did not reach the disk never reports success. The worker is
not a daemon thread: a process that exits after an error still finishes the last staged file (writes hold no lock
and join no collective, so nothing can keep them waiting on another process).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor

logger = logging.getLogger(__name__)


class BackgroundWriteFailed(RuntimeError):
    """A background write raised; the file it names keeps its previous content (the writes are atomic)."""


class BackgroundWrites:
    """Writes run in one worker thread, in order; `wait` returns once every submitted write is on disk."""

    def __init__(self) -> None:
        self._executor: ThreadPoolExecutor | None = None
        self._pending: list[tuple[str, Future]] = []

    def submit(self, label: str, write: Callable[[], None]) -> None:
        """Run ``write`` (it must touch only data it owns) in the worker; ``label`` names its file in errors.
        Earlier writes that already failed are raised here, before anything new is queued."""
        self._raise_finished_failures()
        if self._executor is None:
            self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="result-write")
        self._pending.append((label, self._executor.submit(write)))

    def wait(self) -> None:
        """Block until every submitted write has finished; raise the first failure (the others are logged)."""
        pending, self._pending = self._pending, []
        failures = []
        for label, future in pending:
            error = future.exception()
            if error is not None:
                failures.append((label, error))
        for label, error in failures[1:]:
            logger.error("writing %s failed too: %s: %s", label, type(error).__name__, error)
        if failures:
            label, error = failures[0]
            raise BackgroundWriteFailed(f"writing {label} failed: {type(error).__name__}: {error}") from error

    def close(self, *, raise_error: bool = True) -> None:
        """`wait`, then stop the worker. With ``raise_error=False`` (cleaning up after another error) a failed
        write is logged instead of raised. Idempotent."""
        try:
            self.wait()
        except BackgroundWriteFailed as error:
            if raise_error:
                raise
            logger.error("%s", error)
        finally:
            if self._executor is not None:
                self._executor.shutdown(wait=True)
                self._executor = None

    def _raise_finished_failures(self) -> None:
        if any(future.done() and future.exception() is not None for _, future in self._pending):
            self.wait()
