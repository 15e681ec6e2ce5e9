"""Background jobs of one runs folder: the FIFO queue, GPU assignment, and each job's state, without ComfyUI.

The queue is ``<runs>/.whetstone-jobs/jobs.json`` (one record per run folder, in FIFO order), replaced atomically
while its folder lock is held, so several ComfyUI processes (or a restarted one) share it. A record says what a job
asked for (how many GPUs, or which ones) and, once launched, what it got (its GPUs, the launcher's child PID and that
process's start time). The run folder stays the contract: a job's state is read from ``status.json`` and from whether
the run folder's lock is held right now (`lock.folder_locked`, the kernel's answer), never from a PID in a file
alone. A PID is only signalled after `verified_pid` proved it is the process that started with this job and that
it holds this run folder's lock file open.

Everything read from the queue file is untrusted: names are checked, numbers bounded, a malformed record is logged
and dropped, and nothing in it is ever executed (the command is rebuilt from code).
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import re
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from ..atomic import write_json_atomic
from ..hardware.discovery import HardwareProfile
from ..lock import LOCK_FILE, FolderBusy, FolderLock, folder_locked
from .events import TERMINAL_STATES, load_json, read_status

logger = logging.getLogger(__name__)

JOBS_DIR = ".whetstone-jobs"
JOBS_FILE = "jobs.json"
JOBS_VERSION = 1
JOB_STATES = ("queued", "starting", "running", "stopping", "stopped", "completed", "failed")
MAX_GPUS = 1024
MAX_JOBS = 1000
QUEUE_LOCK_WAIT_S = 10.0
_RUN_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
ENDED_UNREPORTED = (
    "the training process ended without a final status (killed, or the machine restarted); resume continues from "
    "the newest checkpoint"
)


def check_run_name(name: object, field: str = "run") -> str:
    """A run folder's name: a plain name inside the runs folder (no '/', no '..', no leading dot)."""
    if not isinstance(name, str) or not _RUN_NAME.match(name) or ".." in name:
        raise ValueError(
            f"{field}={str(name)[:80]!r} is not a run name: letters, digits, '_', '-', '.', at most 64 characters"
        )
    return name


def _gpu_tuple(value: object, field: str) -> tuple[int, ...]:
    if not isinstance(value, (list, tuple)) or len(value) > MAX_GPUS:
        raise ValueError(f"{field}={str(value)[:80]} must be a list of at most {MAX_GPUS} GPU indices")
    if any(isinstance(g, bool) or not isinstance(g, int) or not 0 <= g < MAX_GPUS for g in value):
        raise ValueError(f"{field}={list(value)[:16]} must hold GPU indices 0..{MAX_GPUS - 1}")
    if len(set(value)) != len(value):
        raise ValueError(f"{field}={list(value)} names a GPU twice")
    return tuple(value)


@dataclass(kw_only=True)
class JobRecord:
    """One job of the queue. ``gpu_ids`` pins it to those GPUs; None takes any ``gpu_count`` free ones."""

    run: str
    gpu_count: int = 0
    gpu_ids: tuple[int, ...] | None = None
    world_size: int = 1
    queued_at: float = 0.0
    assigned: tuple[int, ...] = ()
    launched_at: float | None = None
    pid: int | None = None
    pid_start: int | None = None  # the launched process's start time (clock ticks after boot, /proc/<pid>/stat)
    launcher_pid: int | None = None  # the process that launched it (its 'starting' status is not the engine's)
    stop_requested_at: float | None = None
    stop_signalled_at: float | None = None

    def __post_init__(self) -> None:
        check_run_name(self.run, "JobRecord.run")
        for name in ("gpu_count", "world_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= MAX_GPUS:
                raise ValueError(f"JobRecord.{name}={value!r} must be a whole number in 0..{MAX_GPUS}")
        if self.world_size < 1:
            raise ValueError(f"JobRecord.world_size={self.world_size} must be at least 1")
        if self.gpu_ids is not None:
            self.gpu_ids = _gpu_tuple(self.gpu_ids, "JobRecord.gpu_ids")
            if len(self.gpu_ids) != self.gpu_count:
                raise ValueError(f"JobRecord.gpu_ids={list(self.gpu_ids)} must hold gpu_count={self.gpu_count} GPUs")
        self.assigned = _gpu_tuple(self.assigned, "JobRecord.assigned")
        for name in ("queued_at", "launched_at", "stop_requested_at", "stop_signalled_at"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))):
                raise ValueError(f"JobRecord.{name}={value!r} must be a time in seconds")
        for name in ("pid", "pid_start", "launcher_pid"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise ValueError(f"JobRecord.{name}={value!r} must be a positive whole number")

    @property
    def launched(self) -> bool:
        return self.launched_at is not None

    def to_dict(self) -> dict:
        data = dataclasses.asdict(self)
        data["gpu_ids"] = None if self.gpu_ids is None else list(self.gpu_ids)
        data["assigned"] = list(self.assigned)
        return data

    @classmethod
    def from_dict(cls, data: object) -> JobRecord:
        if not isinstance(data, dict):
            raise ValueError(f"a job record must be an object, got {type(data).__name__}")
        unknown = sorted(set(data) - {f.name for f in dataclasses.fields(cls)})
        if unknown:
            raise ValueError(f"a job record has unknown keys {unknown[:8]}")
        return cls(**data)

    def requeued(self, now: float) -> JobRecord:
        """The same request back in the queue (resume): nothing launched, nothing assigned."""
        return JobRecord(
            run=self.run, gpu_count=self.gpu_count, gpu_ids=self.gpu_ids, world_size=self.world_size, queued_at=now
        )


# ---------------------------------------------------------------------------------------------------------------------
# The queue file


class JobStore:
    """The queue of one runs folder: `read` for a consistent snapshot, `edit` to change it under the queue's lock."""

    def __init__(self, runs_root: str | os.PathLike) -> None:
        self.root = Path(runs_root)
        self.folder = self.root / JOBS_DIR
        self.path = self.folder / JOBS_FILE

    def read(self) -> list[JobRecord]:
        """The records in FIFO order; a file that is not ours, or a malformed record, is logged and left out."""
        try:
            if self.path.is_symlink() or self.folder.is_symlink():
                logger.warning("%s is a link; the job queue is never read through a link", self.path)
                return []
            data = load_json(self.path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return []
        except ValueError as error:  # not UTF-8 or JSON, an integer too long to convert, nesting too deep
            logger.warning("%s is not valid JSON (%s): treating the queue as empty", self.path, error)
            return []
        if not isinstance(data, dict) or not isinstance(data.get("jobs"), list):
            logger.warning("%s is not a job queue (no 'jobs' list): treating it as empty", self.path)
            return []
        records, seen = [], set()
        for entry in data["jobs"][:MAX_JOBS]:
            try:
                record = JobRecord.from_dict(entry)
            except (TypeError, ValueError) as error:
                logger.warning("%s: dropping a malformed job record (%s)", self.path, error)
                continue
            if record.run not in seen:
                seen.add(record.run)
                records.append(record)
        return records

    def write(self, records: Sequence[JobRecord]) -> None:
        if self.folder.is_symlink():
            raise ValueError(f"{self.folder} is a link; remove it (the job queue is never written through a link)")
        body = {"version": JOBS_VERSION, "jobs": [r.to_dict() for r in records]}
        write_json_atomic(self.path, body, sort_keys=True)

    @contextlib.contextmanager
    def edit(self) -> Iterator[list[JobRecord]]:
        """``with store.edit() as records:`` change the list in place; it is written back when the block ends."""
        with self.locked():
            records = self.read()
            yield records
            self.write(records)

    @contextlib.contextmanager
    def locked(self, wait_s: float = QUEUE_LOCK_WAIT_S) -> Iterator[None]:
        """The queue's lock, waited for (another thread or process edits for milliseconds at a time)."""
        if self.folder.is_symlink():
            raise ValueError(f"{self.folder} is a link; remove it (the job queue is never written through a link)")
        lock = FolderLock(self.folder, "job queue edit")
        deadline = time.monotonic() + wait_s
        while True:
            try:
                lock.acquire()
                break
            except FolderBusy:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.02)
        try:
            yield
        finally:
            lock.release()


def find(records: Sequence[JobRecord], run: str) -> JobRecord | None:
    return next((r for r in records if r.run == run), None)


# ---------------------------------------------------------------------------------------------------------------------
# GPU assignment


def holds_gpus(runs_root: Path, record: JobRecord) -> bool:
    """A launched job holds its GPUs while its run folder is locked (its process, or its launcher, is alive)."""
    return record.launched and folder_locked(runs_root / record.run)


def held_gpus(runs_root: Path, records: Sequence[JobRecord]) -> set[int]:
    return {gpu for r in records if holds_gpus(runs_root, r) for gpu in r.assigned}


def choose_gpus(record: JobRecord, machine: Sequence[int], held: set[int]) -> tuple[int, ...] | None:
    """The GPUs this job gets now, or None while it must wait: its pinned set when all are free, else the first
    ``gpu_count`` free GPUs of the machine."""
    if record.gpu_ids is not None:
        return record.gpu_ids if not set(record.gpu_ids) & held else None
    free = [gpu for gpu in machine if gpu not in held]
    return tuple(free[: record.gpu_count]) if len(free) >= record.gpu_count else None


def check_request(gpu_count: int, gpu_ids: Sequence[int] | None, machine: Sequence[int]) -> None:
    """Refuse a job that could never start on this machine (it would block the FIFO queue forever)."""
    if gpu_ids is not None:
        missing = sorted(set(gpu_ids) - set(machine))
        if missing:
            raise ValueError(f"gpus {missing} are not on this machine (GPUs {list(machine) or 'none'}); choose others")
    elif gpu_count > len(machine):
        raise ValueError(
            f"the job needs {gpu_count} GPU(s) but this machine has {len(machine)}: plan for fewer (Training Plan "
            "gpu_count)"
        )


def subset_profile(
    profile: HardwareProfile, count: int, held: set[int] = frozenset()
) -> tuple[HardwareProfile, tuple[int, ...], str]:
    """The machine as a job of ``count`` GPUs sees it, for its plan: the first ``count`` GPUs no job of ours holds
    (their measured free memory). When fewer are free the job will queue for GPUs that are busy now: those count
    with the free memory of the freest GPU of the same model, the memory they will have once their job ends.
    Returns (profile, the GPUs planned for, the reason)."""
    if not 1 <= count <= profile.gpu_count:
        raise ValueError(f"gpu_count={count} must be within 1..{profile.gpu_count} (the GPUs of this machine)")
    free = [i for i in range(profile.gpu_count) if i not in held]
    chosen = (free + [i for i in range(profile.gpu_count) if i in held])[:count]
    gpus = []
    for index in chosen:
        gpu = profile.gpus[index]
        if index in held:
            same = [g.free_bytes for g in profile.gpus if g.name == gpu.name]
            gpu = dataclasses.replace(gpu, free_bytes=max(same))
        gpus.append(gpu)
    busy = sorted(set(chosen) & set(held))
    reason = f"{count} of {profile.gpu_count} GPUs: {list(chosen)}" + (
        f" ({busy} are held by other jobs now: planned with the free memory they will have, the job waits for them)"
        if busy
        else (f", none held by another job (held: {sorted(held)})" if held else "")
    )
    logger.info("plan for %s", reason)
    return dataclasses.replace(profile, gpus=tuple(gpus)), tuple(chosen), reason


def child_visible_devices(assigned: Sequence[int], parent: str | None) -> str:
    """``CUDA_VISIBLE_DEVICES`` for a job's child: the assigned indices, translated through the launcher's own
    setting (index i of a ComfyUI started with ``CUDA_VISIBLE_DEVICES=2,3`` is its entry i)."""
    if parent is None:
        return ",".join(str(gpu) for gpu in assigned)
    entries = [entry.strip() for entry in parent.split(",") if entry.strip()]
    outside = [gpu for gpu in assigned if gpu >= len(entries)]
    if outside:
        raise ValueError(f"GPUs {outside} are not among this process's CUDA_VISIBLE_DEVICES={parent!r}")
    return ",".join(entries[gpu] for gpu in assigned)


def parse_gpu_ids(text: str, field: str = "gpus") -> tuple[int, ...] | None:
    """'auto' (or empty): None; '0,1': (0, 1). Anything else is refused, naming the field."""
    value = text.strip().lower()
    if value in ("", "auto"):
        return None
    parts = [part.strip() for part in value.split(",")]
    if not all(part.isdigit() and len(part) <= 4 for part in parts):
        raise ValueError(f"{field}={text[:40]!r} must be 'auto' or GPU indices like '0,1'")
    return _gpu_tuple([int(part) for part in parts], field)


# ---------------------------------------------------------------------------------------------------------------------
# Liveness and state


def process_start_ticks(pid: int) -> int | None:
    """When process ``pid`` started (clock ticks after boot), None when there is no such process. A PID reused by
    another process has another start time."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text(encoding="ascii", errors="replace")
    except OSError:
        return None
    fields = text[text.rfind(")") + 2 :].split()  # the command name may hold spaces and ')'
    return int(fields[19]) if len(fields) > 19 and fields[19].isdigit() else None


def process_holds(pid: int, path: Path) -> bool:
    """True when process ``pid`` has the file ``path`` open (the lock file a launcher passed to its child)."""
    try:
        target = os.stat(path, follow_symlinks=False)
        descriptors = os.listdir(f"/proc/{pid}/fd")
    except OSError:
        return False
    for name in descriptors:
        with contextlib.suppress(OSError):
            held = os.stat(f"/proc/{pid}/fd/{name}")
            if (held.st_dev, held.st_ino) == (target.st_dev, target.st_ino):
                return True
    return False


def verified_pid(runs_root: Path, record: JobRecord) -> int | None:
    """The job's process ID when it is provably that job's live process: same start time as recorded, and holding
    the run folder's lock file open while the folder is locked. None otherwise (never signal a guess)."""
    if record.pid is None or record.pid_start is None:
        return None
    run_dir = runs_root / record.run
    if process_start_ticks(record.pid) != record.pid_start or not folder_locked(run_dir):
        return None
    return record.pid if process_holds(record.pid, run_dir / LOCK_FILE) else None


def ready_for_stop(run_dir: Path, record: JobRecord) -> bool:
    """True once the engine itself has reported (its stop handler is installed): a SIGINT before that would kill it
    without saving. The launcher's own 'starting' status carries the launcher's PID."""
    status = read_status(run_dir) or {}
    if status.get("state") == "running":
        return True
    return status.get("state") == "starting" and status.get("pid") not in (None, record.launcher_pid)


def job_state(run_dir: Path, record: JobRecord | None) -> tuple[str, str]:
    """(state, message) of a run folder and its queue record; ('', '') for a folder that is no job (no status)."""
    if record is not None and not record.launched:
        return "queued", "waiting for GPUs" if record.gpu_count else "waiting to start"
    status = read_status(run_dir) or {}
    state = status.get("state") if isinstance(status.get("state"), str) else ""
    message = status.get("message") if isinstance(status.get("message"), str) else ""
    if folder_locked(run_dir):
        stop_asked = record is not None and record.stop_requested_at is not None
        if state in TERMINAL_STATES:  # written, and the process is exiting: final once the folder is free
            return ("stopping" if state == "stopped" or stop_asked else "running"), message
        if stop_asked:
            return "stopping", "finishing the step, then saving the LoRA and a checkpoint"
        return (state if state in ("starting", "running") else "starting"), message
    if state in TERMINAL_STATES:
        return state, message
    if state:
        return "failed", ENDED_UNREPORTED
    if record is not None:
        return "failed", "the job was launched but its process never reported a status"
    return "", ""
