"""How a run fails: a traceback in the run folder, a clear ``status.json``, and no rank left hanging.

Three layers, each writing what only it knows:

* `record` (on every rank's entry point, after `bind_run`): the rank's traceback goes to ``error-rank<r>.txt``; the
  first rank to fail also writes ``error.txt`` and status 'failed' with a one-line message (for CUDA OOM: the plan
  that failed and the next plan that should fit; for a full disk: which folder to free). Any ``BaseException`` counts
  (torch's ``CheckpointException`` is not an ``Exception``). It wraps torch elastic's ``@record`` so torchrun's
  summary shows the traceback too. `rotate_errors` moves an earlier attempt's tracebacks aside when a run starts.
* torchrun (``--max-restarts 0``): when a rank dies, the agent sends SIGTERM to the others and SIGKILL 30 s later;
  a survivor blocked in a gloo collective gets an error as soon as the dead peer's socket closes.
* the launcher (`training.run.launch`, which calls `settle_status` after its child exits): a rank killed by a signal
  writes nothing, so the launcher, which sees the exit codes, makes the final status name the rank that failed first.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import functools
import logging
import os
import re
import signal
import tempfile
import traceback
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from ..atomic import write_text_atomic
from ..hardware.advice import next_plan, next_plan_hint  # noqa: F401 - the planner's policy, re-exported
from .events import TERMINAL_STATES, read_status, write_status

logger = logging.getLogger(__name__)

COLLECTIVE_FAILED = "a collective failed"  # a rank's failure that another rank's death explains

ERROR_FILE = "error.txt"
RANK_ERROR_GLOB = "error-rank*.txt"
PREVIOUS_PREFIX = "previous-"  # an earlier attempt's error files, moved aside by `rotate_errors`


class StoppedWithAnotherRank(RuntimeError):
    """Raised on the ranks that stop because another rank failed (agreed in a collective): that rank writes the run's
    error.txt and status; these write only their own traceback file."""


@dataclasses.dataclass(kw_only=True)
class RunContext:
    """What `record` needs to know to write a failure: set by the loop once the config is read."""

    run_dir: Path
    rank: int = 0
    world_size: int = 1
    plan: dict[str, Any] = dataclasses.field(default_factory=dict)

    def __post_init__(self) -> None:
        self.run_dir = Path(self.run_dir)
        if not 0 <= self.rank < self.world_size:
            raise ValueError(f"RunContext needs 0 <= rank < world_size, got rank={self.rank}, world={self.world_size}")


_context: RunContext | None = None


def bind_run(run_dir: str | os.PathLike, *, rank: int, world_size: int, plan: dict[str, Any] | None = None) -> None:
    """Tell `record` where this process's run lives and which plan it runs (micro_batch, checkpoint_depth, ...)."""
    global _context
    _context = RunContext(run_dir=Path(run_dir), rank=rank, world_size=world_size, plan=dict(plan or {}))


def unbind_run() -> None:
    """Forget the bound run (its entry point returned): a later failure in this process is not written there."""
    global _context
    _context = None


def record(fn):
    """Decorator for entry points: failures are written to the bound run folder, then re-raised."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        with recorded():
            return fn(*args, **kwargs)

    from torch.distributed.elastic.multiprocessing.errors import record as elastic_record

    return elastic_record(wrapper)


@contextlib.contextmanager
def recorded() -> Iterator[None]:
    """Write any failure of the block to the bound run folder (if one is bound), then re-raise it."""
    try:
        yield
    except KeyboardInterrupt:
        if _context is not None:
            write_status(_context.run_dir, "stopped", "interrupted by a second signal: stopped without saving")
        raise
    except SystemExit as exit_request:
        if _context is not None and exit_request.code not in (0, None):
            write_failure(_context, exit_request)
        raise
    except BaseException as error:  # CheckpointException and other non-Exception failures must be recorded too
        if _context is not None:
            write_failure(_context, error)
        raise


def write_failure(context: RunContext, error: BaseException) -> str:
    """Write this rank's traceback; the first failing rank of the run also writes error.txt and the status (a rank
    that only stops with another, `StoppedWithAnotherRank`, never does).

    Best effort on a broken disk: a traceback that cannot be written is logged, and the status is still attempted
    (`write_status` falls back to rewriting the file in place when the disk is full)."""
    text = "".join(traceback.format_exception(error))
    message = f"rank {context.rank}: {failure_message(error, context)}"
    logger.error("%s", message)
    run_dir = context.run_dir
    first = not isinstance(error, StoppedWithAnotherRank)
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        write_text_atomic(run_dir / f"error-rank{context.rank}.txt", text)
        first = first and _create_exclusive(run_dir / ERROR_FILE, f"{message}\n\n{text}")
    except OSError as write_error:
        logger.error("could not write the traceback to %s (%s); it follows here:\n%s", run_dir, write_error, text)
    if first:
        write_status(run_dir, "failed", message, rank=context.rank, plan=context.plan)
    return message


def rotate_errors(run_dir: str | os.PathLike) -> list[Path]:
    """Move an earlier attempt's error files to ``previous-<name>`` (replacing older ones), so that this attempt's
    error.txt and status name this attempt's failure. Returns the moved files' new paths."""
    run_dir = Path(run_dir)
    moved = []
    for path in [run_dir / ERROR_FILE, *sorted(run_dir.glob(RANK_ERROR_GLOB))]:
        if path.is_symlink():  # not ours (a shared folder): never followed, and it would block this run's error.txt
            logger.warning("removing the link %s (error files are never links)", path)
            path.unlink()
        elif path.is_file():
            target = path.with_name(PREVIOUS_PREFIX + path.name)
            os.replace(path, target)
            moved.append(target)
    if moved:
        logger.info("moved the previous attempt's error files aside: %s", ", ".join(p.name for p in moved))
    return moved


def failure_message(error: BaseException, context: RunContext) -> str:
    oom = _find(error, torch.OutOfMemoryError)
    if oom is not None:
        return oom_message(oom, context.plan)
    full = _find_errno(error, errno.ENOSPC)
    if full is not None:
        where = f" writing {full.filename}" if getattr(full, "filename", None) else ""
        return (
            f"the disk is full ({full.strerror or 'No space left on device'}{where}): free space on the drive of "
            f"{context.run_dir}, then train again with resume on (the newest complete checkpoint is kept)"
        )
    if _find(error, torch.distributed.DistError) is not None or re.search(r"gloo|NCCL|connection", str(error), re.I):
        return (
            f"{COLLECTIVE_FAILED} ({_first_line(error)}); another rank has probably died: "
            "see the launcher's report for which one"
        )
    inner = _wrapped_failure(error)
    if inner is not None:  # torch's CheckpointException: {rank: (exception, stack)}; its str() starts with rank ids
        return f"{type(error).__name__} (the checkpoint could not be read or written): {type(inner).__name__}: " + (
            _first_line(inner)
        )
    return f"{type(error).__name__}: {_first_line(error)}"


def _wrapped_failure(error: BaseException) -> BaseException | None:
    failures = getattr(error, "failures", None)
    if not isinstance(failures, dict) or not failures:
        return None
    first = next(iter(failures.values()))
    inner = first[0] if isinstance(first, tuple) and first else first
    return inner if isinstance(inner, BaseException) else None


# ---------------------------------------------------------------------------- OOM


def plan_for_messages(config, *, n_layers: int, world_size: int = 1) -> dict[str, Any]:
    """What OOM messages name, from the TrainConfig that runs (its ``plan`` may be absent or overridden)."""
    run = config.run
    resolution = (config.plan or {}).get("resolution", config.data.resolution if config.data.synthetic else None)
    plan = {
        "mode": config.mode,
        "micro_batch": run.micro_batch,
        "grad_accum": run.grad_accum,
        "checkpoint_depth": run.checkpoint_depth,
        "n_layers": n_layers,
        "fsdp_cpu_offload": run.fsdp_cpu_offload,
        "world_size": world_size,
    }
    return plan if resolution is None else {**plan, "resolution": resolution}


def oom_message(error: BaseException, plan: dict[str, Any]) -> str:
    """'out of memory at <plan>; next: <change>' in one line."""
    return f"CUDA out of memory with {describe_plan(plan)} ({_first_line(error)}). {next_plan_hint(plan)}"


def describe_plan(plan: dict[str, Any]) -> str:
    parts = [f"mode {plan.get('mode', '?')}", f"micro-batch {plan.get('micro_batch', '?')}"]
    if "checkpoint_depth" in plan:
        parts.append(f"checkpoint depth {plan['checkpoint_depth']}/{plan.get('n_layers', '?')}")
    if "resolution" in plan:
        side = plan["resolution"]
        parts.append(f"{'x'.join(map(str, side)) if isinstance(side, (list, tuple)) else side} px")
    if plan.get("world_size", 1) > 1:
        parts.append(f"{plan['world_size']} GPUs")
    return ", ".join(parts)


# ---------------------------------------------------------------------------- launcher side


def parse_torchrun_failures(text: str) -> list[dict[str, Any]]:
    """Failures from torchrun's 'ChildFailedError' summary, root cause first: [{rank, local_rank, exitcode, pid,
    host, signal}], [] if the text holds none."""
    pattern = re.compile(
        r"host\s*:\s*(?P<host>\S+)\s+rank\s*:\s*(?P<rank>\d+)\s*\(local_rank:\s*(?P<local_rank>\d+)\)\s+"
        r"exitcode\s*:\s*(?P<exitcode>-?\d+)\s*\(pid:\s*(?P<pid>\d+)\)"
    )
    root = text.rfind("Root Cause")
    ordered = ([text[root:]] if root >= 0 else []) + [text[:root] if root >= 0 else text]
    failures, seen = [], set()
    for chunk in ordered:
        for match in pattern.finditer(chunk):
            failure = {k: (v if k == "host" else int(v)) for k, v in match.groupdict().items()}
            if failure["rank"] not in seen:
                seen.add(failure["rank"])
                failure["signal"] = _signal_name(failure["exitcode"])
                failures.append(failure)
    return failures


def root_cause(failures: list[dict[str, Any]], status: dict[str, Any]) -> dict[str, Any] | None:
    """The failure that explains the others. torchrun names the first it observed; but when the recorded failure
    is a rank's collective failing (a consequence) and another rank was killed by a signal, that kill is the cause:
    the surviving rank can record its error before torchrun notices the killed one."""
    if not failures:
        return None
    if status.get("state") == "failed" and COLLECTIVE_FAILED in status.get("message", ""):
        killed = next((f for f in failures if f.get("signal") and f["rank"] != status.get("rank")), None)
        if killed is not None:
            return killed
    return failures[0]


def describe_exit(failure: dict[str, Any]) -> str:
    how = f"was killed by {failure['signal']}" if failure.get("signal") else f"exited with code {failure['exitcode']}"
    where = f" on {failure['host']}" if failure.get("host") else ""
    return f"rank {failure['rank']} (pid {failure.get('pid', '?')}{where}) {how}"


def settle_status(run_dir: str | os.PathLike, *, returncode: int, launcher_output: str = "") -> dict[str, Any]:
    """Make ``status.json`` final after the job's process (torchrun or a single python) has exited.

    A failed job whose status does not already name its root cause gets one naming the first failed rank and its
    exit code or signal; a job that exited 0 without writing a final state is marked failed too."""
    run_dir = Path(run_dir)
    status = read_status(run_dir) or {"state": "starting", "message": ""}
    if returncode == 0:
        if status["state"] in TERMINAL_STATES:
            return status
        return write_status(run_dir, "failed", "the training process exited without reporting an outcome")
    failures = parse_torchrun_failures(launcher_output)
    root = root_cause(failures, status)
    if status["state"] == "failed" and (root is None or status.get("rank") == root["rank"]):
        return status  # the failing rank explained itself (its traceback is in error.txt)
    if status["state"] in ("stopped", "completed") and (root is None or root["signal"] in ("SIGTERM", "SIGINT")):
        return status  # a stop request the ranks honoured; torchrun itself exits non-zero on SIGTERM
    if root is not None:
        message = f"{describe_exit(root)}; the job stopped"
        extra = {"rank": root["rank"], "exit_code": root["exitcode"], "failures": failures}
    else:
        message = f"the training process {_describe_returncode(returncode)}"
        extra = {"exit_code": returncode}
    if status.get("message") and status["state"] == "failed":
        message += f" (then {_clip(status['message'], 240)})"
    return write_status(run_dir, "failed", message, **extra)


# ---------------------------------------------------------------------------- helpers


def _find(error: BaseException | None, kind: type) -> BaseException | None:
    seen = set()
    while error is not None and id(error) not in seen:
        if isinstance(error, kind):
            return error
        seen.add(id(error))
        error = error.__cause__ or error.__context__
    return None


def _find_errno(error: BaseException | None, number: int) -> OSError | None:
    seen = set()
    while error is not None and id(error) not in seen:
        if isinstance(error, OSError) and error.errno == number:
            return error
        seen.add(id(error))
        error = error.__cause__ or error.__context__
    return None


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return _clip(text.splitlines()[0], 300) if text else type(error).__name__


def _clip(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _signal_name(exitcode: int) -> str | None:
    number = -exitcode if exitcode < 0 else (exitcode - 128 if 128 < exitcode < 160 else 0)
    try:
        return signal.Signals(number).name if number else None
    except ValueError:
        return None


def _describe_returncode(returncode: int) -> str:
    name = _signal_name(returncode) if returncode < 0 else None
    return f"was killed by {name}" if name else f"exited with code {returncode}"


def _create_exclusive(path: Path, text: str) -> bool:
    """Create ``path`` with ``text`` complete or not at all; False if it exists (another rank failed first)."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
        os.link(tmp, path)
        return True
    except FileExistsError:
        return False
    finally:
        os.unlink(tmp)
