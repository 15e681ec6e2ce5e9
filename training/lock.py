"""One exclusive lock per folder: two trainings in one run folder, or two packs into one output, would destroy each
other's files (in-flight checkpoints, temporary shards). Like `atomic`, this module imports nothing from the rest of
``training``, so every part of it may use it.

The lock is ``fcntl.flock`` on ``<folder>/.whetstone.lock``, so the kernel releases it when the holder exits in any way
(``kill -9`` included): a file left by a killed holder is not a lock. The file records the holder's PID for the
message a refused process shows, and is removed when its holder releases it (a finished pack leaves a clean folder).

A launcher (the Train node, ``python -m training train --nproc-per-node N``) takes the run folder's lock before it
writes anything, then starts the engine with the lock's descriptor inherited (so the lock outlives the launcher if
ComfyUI goes away mid-run) and with `HOLDER_ENV` naming itself. The engine's rank 0 then *adopts* the lock instead of
refusing it: the folder is locked, and by the launcher that started it. Ranks other than 0 never touch the lock.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
from collections.abc import Iterator
from pathlib import Path

logger = logging.getLogger(__name__)

LOCK_FILE = ".whetstone.lock"
_ATTEMPTS = 20
HOLDER_ENV = "WHETSTONE_LOCK_HOLDER"  # "<pid>:<folder>" of the launcher holding a folder's lock for its children


class FolderBusy(ValueError):
    """Another live process holds the folder's lock (a user's mistake: exit code 2 on the CLI)."""


class FolderLock:
    """``with FolderLock(folder, "training"):`` holds the folder exclusively; raises `FolderBusy` if another process
    does. Not re-entrant: a second lock on the same folder in one process is refused too."""

    def __init__(self, folder: str | os.PathLike, purpose: str) -> None:
        self.folder = Path(folder)
        self.purpose = purpose
        self.path = self.folder / LOCK_FILE
        self.fd: int | None = None

    def acquire(self) -> FolderLock:
        if self.fd is not None:
            raise RuntimeError(f"{self.path} is already held by this FolderLock")
        self.folder.mkdir(parents=True, exist_ok=True)
        for _ in range(_ATTEMPTS):
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                raise FolderBusy(busy_message(self.folder, self.purpose)) from None
            except BaseException:
                os.close(fd)
                raise
            if _same_file(fd, self.path):
                self.fd = fd
                _record_holder(fd, os.getpid())
                logger.debug("locked %s for %s (pid %d)", self.folder, self.purpose, os.getpid())
                return self
            os.close(fd)  # the holder removed the file between our open and our flock: lock the new one
        raise FolderBusy(busy_message(self.folder, self.purpose))

    def release(self) -> None:
        """Remove the lock file (while still holding it, so no one locks a removed file) and release the lock."""
        if self.fd is not None:
            fd, self.fd = self.fd, None
            try:
                if _same_file(fd, self.path):
                    self.path.unlink()
            finally:
                os.close(fd)  # closing the last descriptor of the open file releases the flock

    def child_env(self) -> dict[str, str]:
        """Environment entries telling a child process (and its torchrun workers) that this launcher holds the lock."""
        if self.fd is None:
            raise RuntimeError(f"{self.path} is not held: acquire() first")
        return {HOLDER_ENV: f"{os.getpid()}:{self.folder.resolve()}"}

    def __enter__(self) -> FolderLock:
        return self.acquire()

    def __exit__(self, *exc_info) -> None:
        self.release()


@contextlib.contextmanager
def hold_folder(folder: str | os.PathLike, purpose: str) -> Iterator[str]:
    """Hold ``folder`` for this block: adopt the lock when the launcher that started this process holds it, else take
    it. Yields 'adopted' or 'acquired'; raises `FolderBusy` when another process holds it."""
    if launcher_holds(folder):
        _record_holder_path(Path(folder) / LOCK_FILE, os.getpid())  # the message now names the process that trains
        logger.info("run folder %s is held for this process by its launcher", folder)
        yield "adopted"
        return
    with FolderLock(folder, purpose):
        yield "acquired"


def launcher_holds(folder: str | os.PathLike) -> bool:
    """True when `HOLDER_ENV` names this folder and the lock file is locked by that launcher right now."""
    holder = os.environ.get(HOLDER_ENV, "")
    pid_text, _, named = holder.partition(":")
    if not pid_text.isdigit() or not named or Path(named) != Path(folder).resolve():
        return False
    path = Path(folder) / LOCK_FILE
    return _is_locked(path) and read_holder(path) in (int(pid_text), os.getpid())


def folder_locked(folder: str | os.PathLike) -> bool:
    """True while some live process holds ``folder``'s lock (the kernel's answer: a file left by a killed holder is no
    lock). A job's liveness is this, never a PID read from a file."""
    return _is_locked(Path(folder) / LOCK_FILE)


def read_holder(path: Path) -> int | None:
    """The PID recorded in a lock file, None when there is none (or the file is not one of ours)."""
    try:
        with open(path, "rb") as handle:
            text = handle.read(32).decode("ascii", errors="replace").strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None


def busy_message(folder: Path, purpose: str) -> str:
    pid = read_holder(folder / LOCK_FILE)
    who = f"process {pid}" if pid is not None else "another process"
    return (
        f"{folder} is in use by {who} (another {purpose} in the same folder would destroy its files); "
        f"wait for it to finish, stop it, or choose another folder"
    )


def _is_locked(path: Path) -> bool:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)  # also drops the probe's lock if it got one
    return False


def _same_file(fd: int, path: Path) -> bool:
    try:
        on_disk = os.stat(path, follow_symlinks=False)
    except FileNotFoundError:
        return False
    held = os.fstat(fd)
    return (held.st_dev, held.st_ino) == (on_disk.st_dev, on_disk.st_ino)


def _record_holder(fd: int, pid: int) -> None:
    data = f"{pid}\n".encode("ascii")
    os.ftruncate(fd, 0)
    os.pwrite(fd, data, 0)


def _record_holder_path(path: Path, pid: int) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
    try:
        _record_holder(fd, pid)
    finally:
        os.close(fd)
