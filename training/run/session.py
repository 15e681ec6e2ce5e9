"""What every engine entry point does around training, on every rank: hold the run folder, clear an earlier
attempt's tracebacks, and record a failure while the folder is still held."""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from ..lock import LOCK_FILE, FolderBusy, hold_folder
from .failure import bind_run, recorded, rotate_errors, unbind_run

logger = logging.getLogger(__name__)


@contextlib.contextmanager
def run_session(
    run_dir: str | os.PathLike,
    *,
    rank: int,
    world_size: int,
    plan: dict[str, Any] | None = None,
    agree: Callable[[bool], bool] | None = None,
) -> Iterator[str]:
    """Rank 0 takes the run folder's lock (or adopts its launcher's); ``agree(ok)`` (a collective every rank calls:
    True when every rank's ``ok`` is True) makes all ranks refuse together, before any of them writes into a folder
    that another run holds. Yields how rank 0 holds the folder: 'acquired', 'adopted', or 'other rank'.

    Raises `FolderBusy` (a ValueError: exit code 2 on the CLI) when the folder is taken, and a ValueError on every
    rank when some rank does not see the folder rank 0 holds (another node's local disk)."""
    run_dir = Path(run_dir)
    with contextlib.ExitStack() as stack:
        how, refusal = "other rank", None
        if rank == 0:
            try:
                how = stack.enter_context(hold_folder(run_dir, "training"))
            except FolderBusy as error:
                refusal = error
        if agree is not None and not agree(refusal is None) and refusal is None:
            refusal = FolderBusy(f"rank 0 could not take the run folder {run_dir}; its message says why")
        if refusal is not None:
            raise refusal
        if agree is not None and world_size > 1:
            _check_shared(run_dir, rank=rank, agree=agree)
        if how == "acquired":
            rotate_errors(run_dir)  # a launcher that holds the folder has done this before starting us
        bind_run(run_dir, rank=rank, world_size=world_size, plan=plan)
        try:
            with recorded():
                yield how
        finally:
            unbind_run()


def _check_shared(run_dir: Path, *, rank: int, agree: Callable[[bool], bool]) -> None:
    """Every rank writes its part of each checkpoint into the run folder, so all ranks need the same folder: each one
    looks for the lock file rank 0 holds there (after the first agreement, so rank 0 already holds it)."""
    sees = (run_dir / LOCK_FILE).is_file()
    if not sees:
        logger.error("rank %d does not see %s: its run folder is not the one rank 0 holds", rank, run_dir / LOCK_FILE)
    if not agree(sees):
        raise ValueError(
            f"run.output_dir {run_dir} is not one shared folder: a rank on another node does not see the lock file "
            f"rank 0 holds in it (a per-node disk?); put the run folder on a file system every node mounts at the "
            f"same path (docs/scaling.md)"
        )
