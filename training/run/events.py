"""What a run tells the world while it trains: ``events.jsonl``, ``status.json``, ``summary.json`` in the run folder.

Only rank 0 writes. One JSON line per step, flushed at once, so the ComfyUI node (another process) can follow a run
live with `read_events` or `EventTail`. Status and summary are replaced atomically, so a reader never sees half a file;
on a full disk, where no new file can be written, a status is rewritten in place instead (a run must never be left
"running" because its final status could not be written). GPU
utilisation, memory and power come from NVML, sampled by a background thread so a step never waits on the driver.

Metric names the loop is expected to use (all optional except ``step``; the report reads them): ``loss``,
``loss_sigma`` ({bucket label: loss}), ``grad_norm``, ``lr``, ``img_per_s``, ``data_wait``, ``step_s``, ``peak_mem_gb``,
``gc_s`` and ``gc_generation`` (rank 0's garbage-collector pauses in the step, `training.engine.gc_pauses`).
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import math
import os
import threading
import time
from pathlib import Path
from typing import Any

from ..atomic import write_json_atomic
from ..hardware.discovery import visible_nvml_handles

logger = logging.getLogger(__name__)

EVENTS_FILE = "events.jsonl"
STATUS_FILE = "status.json"
SUMMARY_FILE = "summary.json"
STATES = ("starting", "running", "completed", "stopped", "failed")
TERMINAL_STATES = ("completed", "stopped", "failed")
MAX_OBJECT_BYTES = 1 << 20  # status.json, summary.json: a real one is a few hundred bytes


def load_json(text: str | bytes) -> Any:
    """``json.loads`` of text from a run folder (untrusted): every way it fails is a ValueError, with its reason. Not
    only JSONDecodeError: an integer of more digits than ``sys.get_int_max_str_digits()`` (4300) raises a plain
    ValueError, nesting deeper than the parser's recursion limit a RecursionError (re-raised here as ValueError)."""
    try:
        return json.loads(text)
    except RecursionError:
        raise ValueError("JSON nested too deeply") from None


# ---------------------------------------------------------------------------- status


def write_status(run_dir: str | os.PathLike, state: str, message: str = "", **extra: Any) -> dict[str, Any]:
    """Replace ``<run>/status.json`` atomically. Any rank (or the launcher) may call this; the last writer wins."""
    if state not in STATES:
        raise ValueError(f"status state must be one of {STATES}, got {state!r}")
    status = {"state": state, "message": message, "time": time.time(), "pid": os.getpid(), **extra}
    path = Path(run_dir) / STATUS_FILE
    try:
        write_json_atomic(path, _jsonable(status), sort_keys=True)
    except OSError as error:
        if error.errno not in (errno.ENOSPC, errno.EDQUOT):
            raise
        _rewrite_in_place(path, json.dumps(_jsonable(status), sort_keys=True) + "\n", error)
    return status


def _rewrite_in_place(path: Path, text: str, error: OSError) -> None:
    """Best effort on a full disk: overwrite the existing status file's blocks (no new file, usually no new block)."""
    logger.error("the disk is full (%s): rewriting %s in place", error.strerror, path)
    data = text.encode("utf-8")
    try:
        fd = os.open(path, os.O_WRONLY | os.O_NOFOLLOW)
        try:
            os.pwrite(fd, data + b" " * max(0, os.fstat(fd).st_size - len(data)), 0)  # pad: no truncation window
            os.ftruncate(fd, len(data))
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError as second:
        logger.error("could not write %s at all (%s): the run's final status is lost; free disk space", path, second)
        raise error from second


def read_status(run_dir: str | os.PathLike) -> dict[str, Any] | None:
    """The run's status, or None before the run wrote one (or when the file is not a JSON object: logged)."""
    return _read_json_object(Path(run_dir) / STATUS_FILE)


def read_summary(run_dir: str | os.PathLike) -> dict[str, Any] | None:
    """The run's summary.json (written when it completed or stopped), or None."""
    return _read_json_object(Path(run_dir) / SUMMARY_FILE)


def _read_json_object(path: Path) -> dict[str, Any] | None:
    try:
        with open(path, "rb") as handle:
            raw = handle.read(MAX_OBJECT_BYTES + 1)
    except FileNotFoundError:
        return None
    if len(raw) > MAX_OBJECT_BYTES:
        logger.warning("%s is over %d bytes, not a run's status or summary; ignoring it", path, MAX_OBJECT_BYTES)
        return None
    try:
        data = load_json(raw.decode("utf-8"))
    except ValueError as error:  # not UTF-8, not JSON, an integer too long to convert, nesting too deep
        logger.warning("%s is not valid JSON (%s); ignoring it", path, error)
        return None
    if not isinstance(data, dict):
        logger.warning("%s holds a %s, not an object; ignoring it", path, type(data).__name__)
        return None
    return data


# ---------------------------------------------------------------------------- events


class EventTail:
    """Reads the complete new lines of events.jsonl since the last call (a half-written last line waits)."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
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
                event = load_json(line)
            except ValueError:  # not JSON, an integer too long to convert, nesting too deep
                self.bad_lines += 1
                logger.warning("%s: skipping a line that is not JSON: %.80s", self.path, line)
                continue
            if isinstance(event, dict) and isinstance(event.get("step"), int):
                events.append(event)
        return events


def read_events(run_dir: str | os.PathLike, *, resumed_history: bool = True) -> list[dict[str, Any]]:
    """Step events of a run, oldest first; [] before the first step.

    A half-written last line (the writer is live, or was killed mid-write) is skipped; so is, with a warning, any other
    line that is not JSON. With ``resumed_history`` a resumed run's curve is the one it actually trained: when a step
    number comes again, the earlier entries from that step on (written after the last checkpoint, then lost) are dropped.
    """
    path = Path(run_dir) / EVENTS_FILE
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except FileNotFoundError:
        return []
    lines = text.split("\n")
    events: list[dict[str, Any]] = []
    bad = 0
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            event = load_json(line)
        except ValueError:  # not JSON (or a line being written), an integer too long to convert, nesting too deep
            if number < len(lines):  # a complete (newline-terminated) line that is not JSON
                bad += 1
            continue
        if not isinstance(event, dict) or not isinstance(event.get("step"), int):
            bad += 1
            continue
        if resumed_history:
            while events and events[-1]["step"] >= event["step"]:
                events.pop()
        events.append(event)
    if bad:
        logger.warning("%s: skipped %d line(s) that are not step events", path, bad)
    return events


class RunLog:
    """Step events, status and summary of one run; a no-op on ranks other than 0 (status excepted: see `status`)."""

    def __init__(self, run_dir: str | os.PathLike, *, rank: int, world_size: int = 1, tensorboard: bool = True) -> None:
        if rank < 0 or world_size < 1 or rank >= world_size:
            raise ValueError(f"RunLog needs 0 <= rank < world_size, got rank={rank}, world_size={world_size}")
        self.run_dir = Path(run_dir)
        self.rank = rank
        self.world_size = world_size
        self.start_time = time.time()
        self._file = None
        self._board = None
        self._gpu: GpuSampler | None = None
        if rank != 0:
            return
        self.run_dir.mkdir(parents=True, exist_ok=True)
        path = self.run_dir / EVENTS_FILE
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
        self._file = os.fdopen(fd, "a", encoding="utf-8")  # closed in close(); a link there is refused, not followed
        if path.stat().st_size and not _ends_with_newline(path):
            self._file.write("\n")  # isolate a line cut off by a killed writer
        self._gpu = GpuSampler.start()
        self._board = _open_tensorboard(self.run_dir / "tensorboard") if tensorboard else None

    def step(self, metrics: dict[str, Any]) -> None:
        """Append one step's metrics (must hold an int ``step``) with wall time and GPU readings; flushed at once."""
        if not isinstance(metrics.get("step"), int):
            raise ValueError(f"RunLog.step needs an int 'step' in metrics, got keys {sorted(metrics)}")
        if self._file is None:
            return
        now = time.time()
        event = {"time": now, "elapsed_s": now - self.start_time, **metrics}
        if self._gpu is not None:
            event.update(self._gpu.latest())
        self._file.write(json.dumps(_jsonable(event), separators=(",", ":")) + "\n")
        self._file.flush()
        if self._board is not None:
            _board_scalars(self._board, event)

    def status(self, state: str, message: str = "", **extra: Any) -> None:
        """Rank 0 writes ``status.json``; other ranks only log (a failing rank uses `failure.record`, which writes)."""
        if self.rank != 0:
            logger.debug("rank %d: status %s %s", self.rank, state, message)
            return
        write_status(self.run_dir, state, message, world_size=self.world_size, **extra)

    def summary(self, data: dict[str, Any]) -> None:
        if self.rank == 0:
            write_json_atomic(self.run_dir / SUMMARY_FILE, _jsonable(data), sort_keys=True)

    def close(self) -> None:
        if self._gpu is not None:
            self._gpu.stop()
            self._gpu = None
        if self._board is not None:
            self._board.close()
            self._board = None
        if self._file is not None:
            file, self._file = self._file, None
            try:
                file.close()
            except OSError as error:  # a full disk: the step that failed raised already; do not mask it here
                logger.error("could not flush %s: %s", self.run_dir / EVENTS_FILE, error)

    def __enter__(self) -> RunLog:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()


def _ends_with_newline(path: Path) -> bool:
    with open(path, "rb") as handle:
        handle.seek(-1, os.SEEK_END)
        return handle.read(1) == b"\n"


def _jsonable(value: Any) -> Any:
    """Plain JSON: tensors and numpy scalars become numbers, non-finite floats become null, paths become strings."""
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if hasattr(value, "item") and callable(value.item) and getattr(value, "ndim", 0) == 0:
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    raise ValueError(f"cannot write {type(value).__name__} {value!r} as JSON; log a number, string, list or dict")


# ---------------------------------------------------------------------------- GPU readings (NVML)


class GpuSampler:
    """Reads utilisation, memory and power of the visible GPUs every ``interval_s`` in a daemon thread."""

    def __init__(self, handles: list, interval_s: float) -> None:
        self._handles = handles
        self._interval_s = interval_s
        self._latest: dict[str, float] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="whetstone-nvml", daemon=True)

    @classmethod
    def start(cls, interval_s: float = 1.0) -> GpuSampler | None:
        """A running sampler, or None where NVML or GPUs are absent (CPU machines)."""
        try:
            import pynvml

            pynvml.nvmlInit()
            handles = visible_nvml_handles(pynvml)
        except Exception as error:  # NVML missing, no driver, no GPU: GPU readings are optional
            logger.debug("no GPU readings: %s", error)
            return None
        if not handles:
            return None
        sampler = cls(handles, interval_s)
        sampler._sample()
        sampler._thread.start()
        return sampler

    def latest(self) -> dict[str, float]:
        return dict(self._latest)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)

    def _loop(self) -> None:
        while not self._stop.wait(self._interval_s):
            try:
                self._sample()
            except Exception as error:  # a driver hiccup must not kill training; readings just stop
                logger.warning("NVML sampling stopped: %s", error)
                self._latest = {}
                return

    def _sample(self) -> None:
        import pynvml

        util, mem, power = [], [], []
        for handle in self._handles:
            util.append(pynvml.nvmlDeviceGetUtilizationRates(handle).gpu)
            mem.append(pynvml.nvmlDeviceGetMemoryInfo(handle).used / 2**30)
            with contextlib.suppress(pynvml.NVMLError):  # some boards do not report power
                power.append(pynvml.nvmlDeviceGetPowerUsage(handle) / 1000.0)
        self._latest = {
            "gpu_util_pct": sum(util) / len(util),
            "gpu_mem_used_gb": max(mem),
            "gpu_count": len(self._handles),
            **({"gpu_power_w": sum(power)} if power else {}),
        }


# ---------------------------------------------------------------------------- TensorBoard and profiler


def _open_tensorboard(folder: Path):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:  # optional: needs the tensorboard package
        logger.debug("TensorBoard not installed; no TensorBoard logs")
        return None
    return SummaryWriter(log_dir=str(folder))


def _board_scalars(board, event: dict[str, Any]) -> None:
    step = event["step"]
    for key, value in event.items():
        if key in ("step", "time") or isinstance(value, bool):
            continue
        if isinstance(value, (int, float)):
            board.add_scalar(key, value, step)
        elif isinstance(value, dict):
            for sub, sub_value in value.items():
                if isinstance(sub_value, (int, float)) and not isinstance(sub_value, bool):
                    board.add_scalar(f"{key}/{sub}", sub_value, step)


@contextlib.contextmanager
def maybe_profile(step: int, profile_steps, run_dir: str | os.PathLike, *, rank: int = 0):
    """Profile this step with ``torch.profiler`` if it is in ``profile_steps``; the Chrome trace goes to
    ``<run>/profile/step-<step>-rank<r>.json`` (open in chrome://tracing or Perfetto)."""
    if step not in profile_steps:
        yield None
        return
    import torch
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
    folder = Path(run_dir) / "profile"
    folder.mkdir(parents=True, exist_ok=True)
    with profile(activities=activities, record_shapes=True, profile_memory=True, with_stack=False) as profiler:
        yield profiler
    path = folder / f"step-{step:06d}-rank{rank}.json"
    profiler.export_chrome_trace(str(path))
    logger.info("profiled step %d: %s", step, path)
