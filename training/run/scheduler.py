"""Starts the queued jobs of a runs folder on free GPUs, reaps the ones this process launched, stops on request.

One `Scheduler` per runs folder and process (the ComfyUI server, a test). `tick` is the whole policy, run every
second by `start_thread` (and after every submit or stop):

1. reap: a child this process launched that has exited is waited for, its final status settled, its folder freed;
2. orphans: a launched job whose run folder is no longer locked and whose status never became final (killed with its
   launcher gone, a reboot) is marked failed;
3. launch: strictly first-in first-out, the first queued job gets its GPUs when they are free (`jobs.choose_gpus`:
   none another live job of this folder holds); a later job never overtakes it.

A job's child runs in its own session (`launch.RunProcess`) with the lock descriptor inherited, so it outlives this
process; a new Scheduler after a restart sees it through the run folder's lock and the queue record, and stops it
only through a `jobs.verified_pid`.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from ..lock import FolderBusy, folder_locked
from .events import TERMINAL_STATES, read_status, write_status
from .jobs import (
    ENDED_UNREPORTED,
    JobRecord,
    JobStore,
    check_request,
    check_run_name,
    child_visible_devices,
    choose_gpus,
    find,
    held_gpus,
    process_start_ticks,
    ready_for_stop,
    verified_pid,
)
from .launch import CONFIG_FILE, RunProcess, train_command

logger = logging.getLogger(__name__)

TICK_SECONDS = 1.0
REAP_TIMEOUT_S = 60.0


class Scheduler:
    """``command_for(config_path, world_size)`` builds the child's argument list (`launch.train_command`)."""

    def __init__(
        self,
        runs_root: str | os.PathLike,
        machine_gpus: Sequence[int],
        *,
        command_for: Callable[[Path, int], list[str]] = train_command,
        cwd: str | os.PathLike | None = None,
        env: dict[str, str] | None = None,
    ) -> None:
        self.root = Path(runs_root)
        self.machine = tuple(machine_gpus)
        self.store = JobStore(self.root)
        self.command_for = command_for
        self.cwd = None if cwd is None else Path(cwd)
        self.env = dict(os.environ if env is None else env)
        self.processes: dict[str, RunProcess] = {}  # the children this process launched, until reaped
        self._mutex = threading.Lock()
        self._thread: threading.Thread | None = None
        self._halt = threading.Event()

    # ---------------------------------------------------------------- requests

    def submit(self, run: str, *, gpu_count: int, gpu_ids: Sequence[int] | None, world_size: int) -> JobRecord:
        """Queue the run folder ``<root>/<run>`` (its config.json written) and start it if its GPUs are free."""
        check_run_name(run)
        check_request(gpu_count, gpu_ids, self.machine)
        record = JobRecord(
            run=run,
            gpu_count=gpu_count,
            gpu_ids=None if gpu_ids is None else tuple(gpu_ids),
            world_size=world_size,
            queued_at=time.time(),
        )
        with self.store.edit() as records:
            earlier = find(records, run)
            if earlier is not None and (not earlier.launched or folder_locked(self.root / run)):
                raise FolderBusy(f"run {run!r} is already queued or running; stop it first or choose another name")
            records[:] = [r for r in records if r.run != run] + [record]
        logger.info("queued job %s (%s)", run, describe_request(record))
        self.tick()
        return find(self.store.read(), run) or record

    def stop(self, run: str) -> str:
        """Save and stop: a queued job leaves the queue; a running one gets the one polite SIGINT the engine turns
        into 'finish the step, save the LoRA and a checkpoint'. Returns what was done."""
        check_run_name(run)
        with self.store.edit() as records:
            record = find(records, run)
            if record is None:
                raise LookupError(f"no job {run!r} in the queue of {self.root}")
            if not record.launched:
                records.remove(record)
                write_status(self.root / run, "stopped", "removed from the queue before it started")
                logger.info("job %s removed from the queue", run)
                return "dequeued"
            if verified_pid(self.root, record) is None:
                return "not running"
            record.stop_requested_at = record.stop_requested_at or time.time()
            self._signal_stop(record)
            return "stopping"

    def _signal_stop(self, record: JobRecord) -> None:
        """The one SIGINT, once the engine can honour it (`jobs.ready_for_stop`); until then the request waits."""
        if record.stop_signalled_at is not None or not ready_for_stop(self.root / record.run, record):
            return
        pid = verified_pid(self.root, record)
        if pid is None:
            return
        os.kill(pid, signal.SIGINT)
        record.stop_signalled_at = time.time()
        logger.info("asked job %s (pid %d) to save and stop", record.run, pid)

    def resume(self, run: str, *, default: JobRecord) -> JobRecord:
        """Queue an ended run again with its earlier request (else ``default``'s); its config must resume."""
        check_run_name(run)
        if folder_locked(self.root / run):
            raise FolderBusy(f"run {run!r} is still running; stop it first")
        with self.store.edit() as records:
            earlier = find(records, run)
            if earlier is not None and not earlier.launched:
                return earlier
            record = (earlier or default).requeued(time.time())
            check_request(record.gpu_count, record.gpu_ids, self.machine)
            records[:] = [r for r in records if r.run != run] + [record]
        logger.info("job %s queued again to resume (%s)", run, describe_request(record))
        self.tick()
        return record

    # ---------------------------------------------------------------- the policy

    def tick(self) -> None:
        with self._mutex:
            self._reap()
            with self.store.edit() as records:
                self._settle_orphans(records)
                for record in records:
                    if record.stop_requested_at is not None and record.launched:
                        self._signal_stop(record)
                self._launch_next(records)

    def _reap(self) -> None:
        for run, process in list(self.processes.items()):
            if process.running():
                continue
            code = process.wait(REAP_TIMEOUT_S)
            del self.processes[run]
            logger.info("job %s ended (exit code %s): %s", run, code, (read_status(process.run_dir) or {}).get("state"))

    def _settle_orphans(self, records: list[JobRecord]) -> None:
        for record in records:
            run_dir = self.root / record.run
            if not record.launched or record.run in self.processes or folder_locked(run_dir):
                continue
            status = read_status(run_dir) or {}
            if status.get("state") not in TERMINAL_STATES:
                logger.warning("job %s: %s", record.run, ENDED_UNREPORTED)
                write_status(run_dir, "failed", ENDED_UNREPORTED)

    def _launch_next(self, records: list[JobRecord]) -> None:
        held = held_gpus(self.root, records)
        for record in records:
            if record.launched:
                continue
            gpus = choose_gpus(record, self.machine, held)
            if gpus is None:
                logger.debug("job %s waits: GPUs %s are held", record.run, sorted(held))
                return  # first in, first out: no later job overtakes the one waiting
            if not self._launch(record, gpus):
                return
            held |= set(gpus)

    def _launch(self, record: JobRecord, gpus: tuple[int, ...]) -> bool:
        """Start the job's child on ``gpus``; False when the run folder is busy (the job waits). A folder that cannot
        start a run fails the job (status 'failed', saying why) so that it does not block the queue."""
        run_dir = self.root / record.run
        env = {**self.env, "CUDA_DEVICE_ORDER": self.env.get("CUDA_DEVICE_ORDER", "PCI_BUS_ID")}
        env["CUDA_VISIBLE_DEVICES"] = child_visible_devices(gpus, self.env.get("CUDA_VISIBLE_DEVICES"))
        command = self.command_for(run_dir / CONFIG_FILE, record.world_size)
        process = RunProcess(run_dir, command, cwd=self.cwd, env=env)
        try:
            process.start()
        except FolderBusy as error:
            logger.warning("job %s waits: %s", record.run, error)
            return False
        except (OSError, ValueError) as error:  # a broken run folder (a link for train.log, no disk space)
            message = f"could not start: {error}"
            logger.error("job %s %s", record.run, message)
            record.launched_at = time.time()  # done with: it no longer blocks the queue; resume queues it again
            write_status(run_dir, "failed", message)
            return True
        record.assigned = gpus
        record.launched_at = time.time()
        record.pid = process.process.pid
        record.pid_start = process_start_ticks(record.pid)
        record.launcher_pid = os.getpid()
        self.processes[record.run] = process
        logger.info(
            "started job %s on %s (CUDA_VISIBLE_DEVICES=%s, pid %d)",
            record.run,
            f"GPUs {list(gpus)}" if gpus else "the CPU",
            env["CUDA_VISIBLE_DEVICES"],
            record.pid,
        )
        return True

    # ---------------------------------------------------------------- the thread

    def start_thread(self, interval_s: float = TICK_SECONDS) -> None:
        """Tick every ``interval_s`` in a daemon thread (idempotent). A failing tick is logged and retried."""
        if self._thread is not None and self._thread.is_alive():
            return
        self._halt.clear()
        self._thread = threading.Thread(target=self._loop, args=(interval_s,), name="whetstone-jobs", daemon=True)
        self._thread.start()

    def stop_thread(self) -> None:
        self._halt.set()
        if self._thread is not None:
            self._thread.join(timeout=10)

    def _loop(self, interval_s: float) -> None:
        while not self._halt.wait(interval_s):
            try:
                self.tick()
            except Exception:  # a full disk or a broken queue file must not end the scheduling for good
                logger.exception("job scheduler tick failed (retrying in %.0f s)", interval_s)


def describe_request(record: JobRecord) -> str:
    if record.gpu_ids is not None:
        return f"GPUs {list(record.gpu_ids)}, {record.world_size} process(es)"
    if record.gpu_count:
        return f"any {record.gpu_count} free GPU(s), {record.world_size} process(es)"
    return "CPU"
