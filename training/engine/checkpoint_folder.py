"""The ``<run>/checkpoints`` folder (its layout: ``training.engine.checkpoint``): which steps are complete, and the
renames that make a checkpoint visible, prune old ones, set damaged ones aside and clear an earlier attempt's
leftovers. A folder goes out of sight (a hidden name) before it is deleted, so a kill never leaves one half deleted.
Only rank 0 changes the folder."""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path

from ..atomic import fsync_directory
from .checkpoint_files import MANIFEST, STEP_FOLDER

logger = logging.getLogger("training.engine.checkpoint")  # the Checkpointer's messages, under its name


def step_dir_name(step: int) -> str:
    return f"step-{step:06d}"


def complete_steps(root: Path) -> list[int]:
    """The steps whose folder is visible and has its manifest (written last), oldest first; links are not followed."""
    if not root.is_dir():
        return []
    steps = []
    for entry in root.iterdir():
        match = STEP_FOLDER.match(entry.name)
        if match and not entry.is_symlink() and (entry / MANIFEST).is_file():
            steps.append(int(match[1]))
    return sorted(steps)


def remove_partials(root: Path) -> None:
    """Delete the hidden folders an earlier attempt left (unfinished, being replaced or being removed)."""
    for entry in root.iterdir():
        if entry.name.startswith(".step-") and entry.is_dir() and not entry.is_symlink():
            logger.info("removing an unfinished checkpoint of an earlier attempt: %s", entry)
            shutil.rmtree(entry)


def publish(root: Path, step: int, partial: Path, token: str) -> Path:
    """Rename the written ``partial`` folder to the visible step folder and return it."""
    final = root / step_dir_name(step)
    stale = root / f".{step_dir_name(step)}.replaced-{token}"
    if final.exists():  # the same step saved again (a resumed run): out of sight first, deleted after
        os.replace(final, stale)
    os.replace(partial, final)
    fsync_directory(root)
    if stale.exists():
        shutil.rmtree(stale)
    return final


def prune(root: Path, keep: int, token: str) -> None:
    """Delete all but the newest ``keep`` complete checkpoints."""
    for old in complete_steps(root)[:-keep]:
        removing = root / f".{step_dir_name(old)}.removing-{token}"
        os.replace(root / step_dir_name(old), removing)  # out of sight first: never half deleted
        shutil.rmtree(removing)
        logger.info("removed old checkpoint step %d", old)


def set_aside(root: Path, steps: list[int], token: str) -> None:
    """Rename damaged checkpoints to ``step-N.damaged-<token>``: kept for inspection, never resumed or pruned."""
    for step in steps:
        name = step_dir_name(step)
        os.replace(root / name, root / f"{name}.damaged-{token}")
