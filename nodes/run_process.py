"""Launching the training engine in a child process and following it through its run folder (no ComfyUI here).

The child is `python -m training train --config <run>/config.json` (or the same under torch.distributed.run), started
with an argument list (never a shell) in its own session, so a run survives a ComfyUI restart and the user's Ctrl+C
in ComfyUI's terminal does not reach it twice. Its output goes to `<run>/train.log`.

Stopping is polite: one SIGINT to the direct child (torchrun forwards it to every worker once); the engine finishes
the step, saves a valid LoRA and a resumable checkpoint and exits 0 with status "stopped". Only if it does not exit
within `stop_timeout_s` is it killed.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

logger = logging.getLogger(__name__)

LOG_FILE = "train.log"
ERROR_FILE = "error.txt"
STATUS_FILE = "status.json"
EVENTS_FILE = "events.jsonl"
SUMMARY_FILE = "summary.json"
TAIL_CHARS = 4000


def train_command(config_path: Path, world_size: int) -> list[str]:
    """The argument list that trains from config_path: plain python for one process, torchrun for several."""
    if world_size < 1:
        raise ValueError(f"world_size={world_size} must be at least 1")
    engine = ["-m", "training", "train", "--config", str(config_path)]
    if world_size == 1:
        return [sys.executable, *engine]
    launcher = ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(world_size)]
    return [sys.executable, *launcher, *engine]


class EventTail:
    """Reads the complete new lines of events.jsonl since the last call (a half-written last line waits)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.offset = 0
        self.bad_lines = 0

    def read_new(self) -> list[dict]:
        try:
            with open(self.path, "rb") as handle:
                handle.seek(self.offset)
                chunk = handle.read()
        except FileNotFoundError:
            return []
        complete = chunk.rfind(b"\n") + 1
        self.offset += complete
        events = []
        for line in chunk[:complete].decode("utf-8", errors="replace").splitlines():
            if not line.strip():
                continue
            try:
                event = json.loads(line)
            except json.JSONDecodeError:
                self.bad_lines += 1
                logger.warning("%s: skipping a line that is not JSON: %.80s", self.path, line)
                continue
            if isinstance(event, dict) and isinstance(event.get("step"), int):
                events.append(event)
        return events


@dataclass
class RunOutcome:
    state: str  # completed | stopped | failed
    message: str
    returncode: int | None


class TrainingFailed(RuntimeError):
    """The engine process failed; the message carries its last traceback and the run folder."""


class EngineProcess:
    """One engine child process for one run folder."""

    def __init__(self, run_dir: Path, command: list[str], cwd: Path) -> None:
        self.run_dir = run_dir
        self.command = command
        self.cwd = cwd
        self.process: subprocess.Popen | None = None
        self._log = None

    def start(self) -> None:
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self._log = open(self.run_dir / LOG_FILE, "ab")  # noqa: SIM115 (closed in wait/close)
        logger.info("starting training: %s (cwd %s)", self.command, self.cwd)
        self.process = subprocess.Popen(  # noqa: S603 (an argument list built by train_command, no shell)
            self.command,
            cwd=self.cwd,
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )

    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def request_stop(self) -> None:
        """One SIGINT to the direct child: the engine (or torchrun, forwarding once) saves and exits."""
        if self.running():
            logger.info("asking training (pid %d) to stop after this step", self.process.pid)
            self.process.send_signal(signal.SIGINT)

    def wait(self, timeout_s: float) -> int:
        """Wait for exit; kill the process group if it outlives timeout_s. Returns the exit code."""
        try:
            code = self.process.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            logger.error("training (pid %d) did not stop within %.0f s; killing it", self.process.pid, timeout_s)
            os.killpg(self.process.pid, signal.SIGKILL)
            code = self.process.wait()
        self.close()
        return code

    def close(self) -> None:
        if self._log is not None:
            self._log.close()
            self._log = None


def read_json_file(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None


def tail_text(path: Path, chars: int = TAIL_CHARS) -> str:
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except FileNotFoundError:
        return ""
    return text[-chars:]


def outcome(run_dir: Path, returncode: int | None) -> RunOutcome:
    """What the run says about itself (status.json), or "failed" when it died without saying."""
    status = read_json_file(run_dir / STATUS_FILE) or {}
    state = status.get("state")
    if state in ("completed", "stopped") and returncode == 0:
        return RunOutcome(state, status.get("message", ""), returncode)
    if state == "failed":
        return RunOutcome("failed", status.get("message", ""), returncode)
    recorded = f" (its status still said {state!r}: {status.get('message', '')})" if state else ""
    return RunOutcome(
        "failed", f"the training process exited with code {returncode} without a final status{recorded}", returncode
    )


def failure_message(run_dir: Path, result: RunOutcome) -> str:
    """The error shown in ComfyUI: what failed, the child's last traceback (or log tail), and where to look."""
    traceback_text = tail_text(run_dir / ERROR_FILE) or tail_text(run_dir / LOG_FILE)
    return (
        f"Training failed (exit code {result.returncode}): {result.message}\n"
        f"Run folder: {run_dir}\n"
        f"--- last output of the training process ---\n{traceback_text.rstrip()}"
    )
