"""The one launcher of a training run: the Train node, ``python -m training train --nproc-per-node N`` and the tests.

`RunProcess` takes the run folder's lock (`lock.FolderLock`) before anything is written, moves an earlier attempt's
tracebacks aside, marks the run 'starting', and starts ``python -m training train --config <run>/config.json`` (or the
same under torch.distributed.run) with an argument list, never a shell, in its own session, so a run survives a
ComfyUI restart and the user's Ctrl+C in ComfyUI's terminal does not reach it twice. Its output goes to
``<run>/train.log``. When the child has gone, `settle_status` makes ``status.json`` final (a rank killed by a signal
wrote nothing: the launcher names it) and the lock is released.

Stopping is polite: one SIGINT to the direct child (torchrun forwards it to every worker once); the engine finishes
the step, saves a valid LoRA and a resumable checkpoint and exits 0 with status "stopped". Only if it does not exit
within the timeout is its process group killed.
"""

from __future__ import annotations

import errno
import logging
import os
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from ..lock import FolderLock
from .events import read_status, write_status
from .failure import ERROR_FILE, rotate_errors, settle_status

logger = logging.getLogger(__name__)

LOG_FILE = "train.log"
CONFIG_FILE = "config.json"
TAIL_CHARS = 4000
LAUNCHER_TAIL_BYTES = 200_000  # enough of the log for torchrun's failure summary


def train_command(config_path: Path, world_size: int) -> list[str]:
    """The argument list that trains from config_path: plain python for one process, torchrun for several."""
    if world_size < 1:
        raise ValueError(f"world_size={world_size} must be at least 1")
    engine = ["-m", "training", "train", "--config", str(config_path)]
    if world_size == 1:
        return [sys.executable, *engine]
    launcher = ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(world_size)]
    return [sys.executable, *launcher, "--max-restarts", "0", *engine]


@dataclass
class RunOutcome:
    state: str  # completed | stopped | failed
    message: str
    returncode: int | None


class TrainingFailed(RuntimeError):
    """The engine process failed; the message carries its last traceback and the run folder."""


class RunProcess:
    """One engine child process for one run folder, from the lock to the final status.

    ``claim()`` (called by ``start()`` if not before) takes the folder: call it before writing the config into a
    folder that may belong to a live run. Raises `lock.FolderBusy` when another process holds it."""

    def __init__(
        self, run_dir: Path, command: list[str], *, cwd: Path | None = None, env=None, lock_for_child: bool = True
    ) -> None:
        """``lock_for_child=False`` (a multi-node run): the folder's lock is held until the child starts, then let
        go, for the engine's global rank 0 to take on whichever node torchrun's rendezvous puts it."""
        self.run_dir = Path(run_dir)
        self.lock_for_child = lock_for_child
        self.command = list(command)
        self.cwd = cwd
        self.env = dict(os.environ if env is None else env)
        self.process: subprocess.Popen | None = None
        self.returncode: int | None = None
        self._lock = FolderLock(self.run_dir, "training")
        self._log = None
        self._log_start = 0  # this attempt's output starts here in the (appended) log

    def claim(self) -> None:
        if self._lock.fd is None:
            self._lock.acquire()

    def start(self) -> None:
        self.claim()
        try:
            rotate_errors(self.run_dir)
            write_status(
                self.run_dir, "starting", f"launching {Path(self.command[0]).name} {' '.join(self.command[1:6])}"
            )
            self._log = open_append(self.run_dir / LOG_FILE)
            self._log_start = self._log.tell()
            logger.info("starting training: %s (cwd %s)", self.command, self.cwd)
            inherited = {"env": {**self.env, **self._lock.child_env()}, "pass_fds": (self._lock.fd,)}
            if not self.lock_for_child:
                self._lock.release()
                inherited = {"env": self.env}
                logger.info("the run folder's lock goes to the engine's rank 0, on whichever node it runs")
            self.process = subprocess.Popen(  # noqa: S603 (an argument list, no shell)
                self.command,
                cwd=self.cwd,
                stdin=subprocess.DEVNULL,
                stdout=self._log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                **inherited,  # pass_fds: the lock outlives this launcher while the child runs
            )
        except BaseException:
            self.release()
            raise

    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def request_stop(self) -> None:
        """One SIGINT to the direct child: the engine (or torchrun, forwarding once) saves and exits."""
        if self.running():
            logger.info("asking training (pid %d) to stop after this step", self.process.pid)
            self.process.send_signal(signal.SIGINT)

    def exited_within(self, timeout_s: float | None) -> bool:
        """Wait up to ``timeout_s`` for the child to exit (no settling, no kill); True if it has."""
        try:
            self.process.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            return False
        return True

    def wait(self, timeout_s: float | None) -> int:
        """Wait for exit; kill the process group if it outlives timeout_s; settle the status and release the folder.
        Returns the exit code (the same again on later calls)."""
        if self.returncode is not None:
            return self.returncode
        try:
            code = self.process.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            logger.error("training (pid %d) did not stop within %.0f s; killing it", self.process.pid, timeout_s)
            os.killpg(self.process.pid, signal.SIGKILL)
            code = self.process.wait()
        try:
            settle_status(self.run_dir, returncode=code, launcher_output=self.log_tail(LAUNCHER_TAIL_BYTES))
        finally:
            self.returncode = code
            self.release()
        return code

    def log_tail(self, limit: int) -> str:
        """The last ``limit`` bytes this attempt wrote to the log (earlier attempts' output is not this one's)."""
        try:
            with open(self.run_dir / LOG_FILE, "rb") as handle:
                handle.seek(max(self._log_start, os.fstat(handle.fileno()).st_size - limit))
                return handle.read().decode("utf-8", errors="replace")
        except FileNotFoundError:
            return ""

    def release(self) -> None:
        if self._log is not None:
            self._log.close()
            self._log = None
        self._lock.release()


def open_append(path: Path):
    """``path`` opened for appending in binary; a link there is refused, never followed out of the run folder."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
    except OSError as error:
        if error.errno != errno.ELOOP:
            raise
        raise ValueError(f"{path} is a link; the files of a run folder are never links: remove it") from None
    return os.fdopen(fd, "ab")


def supervise(command: list[str], run_dir: str | os.PathLike, *, timeout_s: float | None = None, env=None) -> int:
    """Run a training command to its end under `RunProcess` (lock, log, final status). Past ``timeout_s`` it is
    asked to stop, and killed a minute later. Returns the command's exit code."""
    process = RunProcess(Path(run_dir), command, env=env)
    process.start()
    try:
        if not process.exited_within(timeout_s):
            logger.error("training command ran over %s s: stopping it", timeout_s)
            process.request_stop()
    finally:
        code = process.wait(60)
    return code


def launch(config_path: Path, run_dir: Path, world_size: int) -> int:
    """The CLI's launcher (``train --nproc-per-node N``): the engine in a child as the Train node starts it, Ctrl+C
    and SIGTERM forwarded as a polite stop, the status settled at the end. Returns the child's exit code."""
    process = RunProcess(run_dir, train_command(config_path, world_size))
    process.start()
    forward = lambda signum, frame: process.request_stop()  # noqa: E731 (each signal: one polite stop request)
    previous = {sig: signal.signal(sig, forward) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        code = process.wait(None)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    result = outcome(run_dir, code)
    (logger.error if result.state == "failed" else logger.info)("training %s: %s", result.state, result.message)
    if result.state == "failed":
        logger.error("tracebacks: %s and %s", run_dir / ERROR_FILE, run_dir / LOG_FILE)
    return code


def outcome(run_dir: Path, returncode: int | None) -> RunOutcome:
    """What the (settled) status says: completed, stopped, or failed with its message."""
    status = read_status(run_dir) or {}
    state = status.get("state")
    if state in ("completed", "stopped", "failed"):
        return RunOutcome(state, status.get("message", ""), returncode)
    recorded = f" (its status still said {state!r}: {status.get('message', '')})" if state else ""
    return RunOutcome(
        "failed", f"the training process exited with code {returncode} without a final status{recorded}", returncode
    )


USER_MISTAKE_EXIT = 2  # the engine's exit code for a mistake in the config or the data (the message names the fix)
TRACEBACK_START = "Traceback (most recent call last)"


def failure_message(run_dir: Path, result: RunOutcome) -> str:
    """The error shown to the user: one line saying what failed (and the fix), then the details below it.

    A user's mistake (exit code 2) needs no traceback: the message names the input and the fix, and the log keeps
    the rest. Otherwise the details are the child's last traceback, once (torchrun, the failure record and the log
    repeat it), or the log's tail when there is none."""
    headline = f"Training failed: {result.message} (exit code {result.returncode})"
    if result.returncode == USER_MISTAKE_EXIT:
        log_text = tail_text(run_dir / LOG_FILE)
        said = [line for line in log_text.splitlines() if " ERROR " in line or line.startswith("error:")][-3:]
        reported = "".join(f"\n{line}" for line in said if result.message not in line)
        return f"{headline}{reported}\nRun folder: {run_dir}; the full log is {run_dir / LOG_FILE}"
    details = last_traceback(tail_text(run_dir / ERROR_FILE) or tail_text(run_dir / LOG_FILE))
    return f"{headline}\nRun folder: {run_dir}\n--- details: the training process's last traceback ---\n{details}"


def last_traceback(text: str) -> str:
    """The last Python traceback in ``text`` (a log may hold the same one several times), else ``text`` itself."""
    start = text.rfind(TRACEBACK_START)
    return (text[start:] if start >= 0 else text).rstrip()


def tail_text(path: Path, chars: int = TAIL_CHARS) -> str:
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except FileNotFoundError:
        return ""
    return text[-chars:]
