"""The jobs of the runs folder for the frontend's jobs panel, and the one scheduler of this ComfyUI process.

Routes (registered by `nodes.register_with_comfyui` through `comfy_bridge`):

* ``GET  /whetstone/jobs``: every run folder with its state, GPUs, step/ETA, last loss, a loss sparkline, its LoRA
  (or, for a full fine-tune that saved it, its model in diffusion_models) and the EMA of it when the run kept one;
* ``GET  /whetstone/jobs/report?run=<name>``: the engine's report (PNG) of one run;
* ``POST /whetstone/jobs/stop``   ``{"run": "<name>"}``: save and stop (the engine's polite stop);
* ``POST /whetstone/jobs/resume`` ``{"run": "<name>"}``: queue an ended run again, continuing from its checkpoint.

Only stop and resume write anything. Every run folder is untrusted (read with `nodes.run_files`); only numbers and
short strings go back to the browser.
"""

from __future__ import annotations

import io
import json
import logging
import os
import threading
from pathlib import Path

from ..training.engine.config import TrainConfig
from ..training.engine.ema import ema_path
from ..training.engine.report import render_report
from ..training.hardware.discovery import discover
from ..training.run.events import STATUS_FILE, SUMMARY_FILE
from ..training.run.jobs import JobRecord, JobStore, find, job_state, parse_gpu_ids
from ..training.run.launch import CONFIG_FILE
from ..training.run.scheduler import Scheduler
from . import comfy_bridge, paths, preview_jobs
from .run_files import (  # noqa: F401 (re-exported: the routes' readers of a run folder)
    EVENTS_TAIL_BYTES,
    MAX_JSON_BYTES,
    RequestRefused,
    internal_error,
    number,
    read_object,
    read_plain,
    recent_events,
    run_folder,
    runs_root,
    text,
    whole,
)

logger = logging.getLogger(__name__)

ROUTE = "/whetstone/jobs"
MAX_BODY_BYTES = 4096
SPARK_POINTS = 64
MAX_LISTED = 200
MODEL_SAVED_STATES = ("completed", "stopped")  # a full fine-tune writes its model as it ends, and only then
GPUS_ENV = "WHETSTONE_JOB_GPUS"  # "0,1": the GPUs this ComfyUI's jobs may use (default: every visible GPU)
PACK_ROOT = Path(__file__).resolve().parents[1]

_schedulers: dict[Path, Scheduler] = {}
_schedulers_mutex = threading.Lock()


# ---------------------------------------------------------------------------------------------------------------------
# The scheduler of this process


def machine_gpus() -> list[int]:
    """The GPUs jobs may be placed on: ``WHETSTONE_JOB_GPUS`` when set, else every GPU this process sees."""
    configured = os.environ.get(GPUS_ENV)
    if configured is not None:
        gpus = list(parse_gpu_ids(configured, GPUS_ENV) or ())
        logger.info("jobs may use GPUs %s (%s)", gpus, GPUS_ENV)
        return gpus
    count = discover().gpu_count
    logger.info("jobs may use GPUs %s (every GPU this ComfyUI sees)", list(range(count)))
    return list(range(count))


def scheduler() -> Scheduler:
    """The scheduler of the runs folder (made, and its thread started, on first use)."""
    root = runs_root()
    with _schedulers_mutex:
        if root not in _schedulers:
            root.mkdir(parents=True, exist_ok=True)
            _schedulers[root] = Scheduler(root, machine_gpus(), cwd=PACK_ROOT)
            _schedulers[root].start_thread()
        return _schedulers[root]


def resume_scheduling() -> None:
    """At ComfyUI start: if the runs folder has a job queue (jobs queued or running before a restart), schedule it."""
    root = runs_root()
    if JobStore(root).path.is_file():
        logger.info("found the job queue of %s: scheduling its jobs", root)
        scheduler()


def sparkline(events: list[dict]) -> list[float]:
    losses = [loss for loss in (number(e.get("loss")) for e in events) if loss is not None]
    if len(losses) <= SPARK_POINTS:
        return losses
    size = len(losses) / SPARK_POINTS
    buckets = [losses[int(i * size) : max(int((i + 1) * size), int(i * size) + 1)] for i in range(SPARK_POINTS)]
    return [sum(b) / len(b) for b in buckets]


def eta_seconds(events: list[dict], total: int | None) -> float | None:
    if not events or total is None:
        return None
    last = events[-1]
    if number(last.get("eta_s")) is not None:
        return number(last["eta_s"])
    first = events[0]
    start, end = number(first.get("time")), number(last.get("time"))
    if start is None or end is None or last["step"] <= first["step"]:
        return None
    return max(0.0, (end - start) / (last["step"] - first["step"]) * (total - last["step"]))


def lora_name(config: dict) -> str | None:
    """The LoRA's name in ComfyUI's loras list when the run's file exists inside a loras folder, else None."""
    run = config.get("run") if isinstance(config.get("run"), dict) else {}
    value = run.get("lora_path")
    if not isinstance(value, str) or not value or len(value) > paths.MAX_PATH_CHARS:
        return None
    path = Path(value)
    try:
        for root in paths.lora_roots().roots:
            root = root.resolve()
            if path.is_absolute() and path.parent.resolve() == root and not path.is_symlink() and path.is_file():
                return path.name
    except (OSError, ValueError) as refused:  # a name too long for the filesystem, a NUL byte: no file of the run
        logger.debug("lora_path %r is not offered: %s", value[:80], refused)
    return None


def model_name(config: dict, run_dir: Path, state: str) -> str | None:
    """A full fine-tune's model as named in ComfyUI's diffusion_models list, once the run has saved it; else None.

    Offered only for a run of mode full that ended saving it (completed or stopped), whose ``run.model_path`` passes
    `saved_name`."""
    run = config.get("run") if isinstance(config.get("run"), dict) else {}
    value = run.get("model_path")
    if config.get("mode") != "full" or state not in MODEL_SAVED_STATES or not isinstance(value, str):
        return None
    return saved_name(value, paths.diffusion_model_roots(), "run.model_path", run_dir)


def ema_name(config: dict, run_dir: Path, offered: str | None, field: str, roots: paths.AllowedRoots) -> str | None:
    """The EMA twin (`training.engine.ema.ema_path`: ``<name>_ema`` beside it) of the run's offered LoRA or model
    (``offered``, from ``run.<field>``), named as ComfyUI lists it; else None. Offered when the run's summary reports
    that very file as its ``ema_file`` and it passes `saved_name` (an EMA LoRA is saved with the LoRA: both are as
    new as the run)."""
    if offered is None:
        return None
    twin = str(ema_path(Path(config["run"][field])))
    if read_object(run_dir / SUMMARY_FILE).get("ema_file") != twin:
        return None
    return saved_name(twin, roots, f"the EMA of run.{field}", run_dir)


def saved_name(value: str, roots: paths.AllowedRoots, field: str, run_dir: Path) -> str | None:
    """A file the run saved, as named in ComfyUI's list of ``roots`` (its folder); None unless ``value`` is an absolute
    path to a plain file (not a link) inside one of the roots (no link out on the way), listed by ComfyUI, and no
    older than the run's config.json (an earlier run of the same name may have left one)."""
    try:
        path = paths.confine(value, roots, field, must_exist=True)
        if not Path(value).is_absolute() or Path(value).is_symlink():
            raise paths.PathRefused(f"{field}={value!r} is not an absolute path to a plain file")
        if path.stat().st_mtime < os.stat(run_dir / CONFIG_FILE, follow_symlinks=False).st_mtime:
            raise paths.PathRefused(f"{path} is older than the run's {CONFIG_FILE}: an earlier run's")
    except (paths.PathRefused, OSError) as refused:
        logger.debug("run %s: %s is not offered: %s", run_dir.name, field, refused)
        return None
    root = next(r.resolve() for r in roots.roots if path.is_relative_to(r.resolve()))
    name = path.relative_to(root).as_posix()
    return name if name in comfy_bridge.list_files(roots.label) else None


def describe_job(run_dir: Path, record: JobRecord | None) -> dict | None:
    status_path = run_dir / STATUS_FILE
    if status_path.is_symlink() or (record is None and not status_path.is_file()):
        return None  # not a job (no status), or a status that is a link: never read through it
    state, message = job_state(run_dir, record)
    if not state:
        return None
    config = read_object(run_dir / CONFIG_FILE)
    run = config.get("run") if isinstance(config.get("run"), dict) else {}
    total = whole(run.get("steps"))
    events = recent_events(run_dir)
    last = events[-1] if events else {}
    gpus = list(record.assigned) if record and record.launched else list(record.gpu_ids or ()) if record else []
    lora, model = lora_name(config), model_name(config, run_dir, state)
    return {
        "run": run_dir.name,
        "state": state,
        "message": text(message),
        "gpus": gpus,
        "gpu_count": record.gpu_count if record else len(gpus),
        "step": last.get("step"),
        "total_steps": total,
        "eta_s": eta_seconds(events, total) if state in ("running", "stopping") else None,
        "loss": number(last.get("loss")),
        "img_per_s": number(last.get("img_per_s")),
        "sparkline": sparkline(events),
        "lora_name": lora,
        "model_name": model,
        "ema_lora_name": ema_name(config, run_dir, lora, "lora_path", paths.lora_roots()),
        "ema_model_name": ema_name(config, run_dir, model, "model_path", paths.diffusion_model_roots()),
        "queued_at": number(record.queued_at) if record else None,
        "has_report": bool(events),
        "summary": {k: number(v) for k, v in read_object(run_dir / SUMMARY_FILE).items() if number(v) is not None},
        "previews": preview_jobs.card(run_dir),
    }


def list_jobs() -> dict:
    """Every job of the runs folder: the queue's first (in FIFO order), then the other runs, newest first."""
    root = runs_root()
    records = JobStore(root).read() if root.is_dir() else []
    queued = [r.run for r in records]
    names = queued + [name for name in run_names(root) if name not in queued]
    listed = []
    for name in names[:MAX_LISTED]:
        try:
            job = describe_job(run_folder(name), find(records, name))
        except RequestRefused:
            continue
        except Exception:  # one run folder (removed while listed, or hostile) must not take the list down: logged
            logger.exception("run %s left out of the jobs list", name)
            continue
        if job is not None:
            listed.append(job)
    return {"root": str(root), "jobs": listed}


def run_names(root: Path) -> list[str]:
    """The runs root's folders (not links), newest first; one removed while listed is left out."""
    folders = []
    if root.is_dir():
        for entry in os.scandir(root):
            try:
                if not entry.is_symlink() and entry.is_dir(follow_symlinks=False):
                    folders.append((entry.stat(follow_symlinks=False).st_mtime, entry.name))
            except OSError:
                continue
    return [name for _, name in sorted(folders, reverse=True)]


# ---------------------------------------------------------------------------------------------------------------------
# Actions


def parse_body(body: bytes | None) -> str:
    """The run name of a POST body ``{"run": "<name>"}``; RequestRefused for anything else."""
    if body is None or len(body) > MAX_BODY_BYTES:
        raise RequestRefused(f"the request body must be JSON of at most {MAX_BODY_BYTES} bytes")
    try:
        data = json.loads(body.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise RequestRefused(f"the request body is not JSON: {error}") from None
    if not isinstance(data, dict) or set(data) != {"run"}:
        raise RequestRefused('the request body must be {"run": "<run name>"}')
    return data["run"]


def stop_job(name: object) -> dict:
    run_dir = run_folder(name)
    try:
        done = scheduler().stop(run_dir.name)
    except LookupError as error:
        raise RequestRefused(f"{error} (only jobs started in the background can be stopped here)", 404) from None
    return {"run": run_dir.name, "result": done}


def resume_job(name: object) -> dict:
    """Queue the run again with resume on in its config (validated like any config), with its earlier GPUs."""
    run_dir = run_folder(name)
    config_path = run_dir / CONFIG_FILE
    if read_plain(config_path, MAX_JSON_BYTES) is None:
        raise RequestRefused(f"run {run_dir.name!r} has no config.json to resume from", 404)
    state, _ = job_state(run_dir, find(scheduler().store.read(), run_dir.name))
    if state not in ("stopped", "failed"):
        raise RequestRefused(f"run {run_dir.name!r} is {state or 'not a job'}; only a stopped or failed run resumes")
    try:
        config = TrainConfig.load(config_path)
    except ValueError as error:
        raise RequestRefused(str(error)) from None
    if not config.run.resume:
        config.run.resume = True
        config.save(config_path)
    plan = config.plan or {}
    world = plan.get("world_size") if isinstance(plan.get("world_size"), int) else 1
    gpus = world if plan.get("device", "cuda") == "cuda" and config.plan else 0
    default = JobRecord(run=run_dir.name, gpu_count=gpus, world_size=max(1, world))
    record = scheduler().resume(run_dir.name, default=default)
    return {"run": run_dir.name, "result": "queued", "gpu_count": record.gpu_count}


def report_png(name: object) -> bytes:
    run_dir = run_folder(name)
    image = render_report(recent_events(run_dir), size=(1000, 620))
    buffer = io.BytesIO()
    image.convert("RGB").save(buffer, format="PNG")
    return buffer.getvalue()


def respond(action: str, query: dict[str, str], body: bytes | None) -> tuple[int, object]:
    """(HTTP status, JSON body or PNG bytes) for ``GET list|report`` and ``POST stop|resume``."""
    try:
        if action == "list":
            return 200, list_jobs()
        if action == "report":
            return 200, report_png(query.get("run", ""))
        if action == "stop":
            return 200, stop_job(parse_body(body))
        if action == "resume":
            return 200, resume_job(parse_body(body))
    except RequestRefused as error:
        return error.status, {"error": str(error)}
    except ValueError as error:  # FolderBusy and the scheduler's refusals: the message says what to do
        return 409, {"error": str(error)}
    except Exception as error:  # a bug or the disk: the browser gets one line, the log the traceback
        return internal_error(f"jobs {action}", error)
    return 404, {"error": f"unknown jobs action {action!r}"}
