"""Wait for Run: a background run's handle -> its result once saved (or the run's end), so a workflow can still
train, then sample, in one queue; with Preview Settings linked to that Train it decodes the run's previews as they
come (as the foreground Train node does). The result is the LoRA, or for a full fine-tune the model it writes to
diffusion_models at its end (as the foreground Train node outputs them). Cancel stops the waiting, not the job (the
jobs panel stops jobs)."""

from __future__ import annotations

import dataclasses
import logging
import time
from dataclasses import dataclass
from pathlib import Path

from ..training.run.jobs import JobStore, find, job_state
from . import comfy_bridge, paths, previews
from .jobs_api import describe_job
from .validation import Choice, Int, check_all, declare
from .values import RUN_TYPE, RunRef

logger = logging.getLogger(__name__)

POLL_SECONDS = 1.0
ENDED = ("completed", "stopped", "failed")

WIDGETS = {
    "until": Choice(
        ("lora", "end"),
        "lora: go on as soon as the run has saved a LoRA (its first save, or its end; mode full: its model, saved at "
        "the end); end: wait until the run ends.",
    ),
    "timeout_minutes": Int(0, 0, 100_000, "Give up after this many minutes (0: wait as long as it takes)."),
}


@dataclass(frozen=True)
class RunResult:
    """The file a run hands to the next node: its LoRA, or a full fine-tune's model in diffusion_models."""

    path: Path
    name: str  # in ComfyUI's loras list, or the diffusion_models list
    what: str  # "LoRA" or "model", for messages


def run_result(run: RunRef) -> RunResult:
    if run.model_path is not None:
        return RunResult(path=Path(run.model_path), name=run.model_name or Path(run.model_path).name, what="model")
    return RunResult(path=Path(run.lora_path), name=run.lora_name, what="LoRA")


def fresh(path: Path, since: float) -> bool:
    """The file exists and was written by this job (not left by an earlier run of the same name)."""
    try:
        return path.is_file() and not path.is_symlink() and path.stat().st_mtime >= since
    except OSError:
        return False


class WaitForRun:
    DESCRIPTION = (
        "Waits for a run that Train started in the background: until it has saved a LoRA (or until it ends), then "
        "outputs the run and the LoRA's name for Load Trained LoRA or a LoRA loader. A full fine-tune (mode full) "
        "gives its model, saved at its end: the run for Load Trained Model and the model's name in diffusion_models. "
        "With Preview Settings linked to that Train, it decodes the run's previews as they come, for Training "
        "Report's grid. Cancel stops the waiting; the job goes on (stop it in the Whetstone jobs panel)."
    )
    CATEGORY = "Whetstone"
    FUNCTION = "wait"
    RETURN_TYPES = (RUN_TYPE, "STRING", "STRING")
    RETURN_NAMES = ("run", "lora_name", "state")
    OUTPUT_TOOLTIPS = (
        "The run, for Load Trained LoRA (Load Trained Model for mode full) and Training Report.",
        "The LoRA's name in ComfyUI's loras list (mode full: the model's name in diffusion_models).",
        "The run's state when the waiting ended, and its message.",
    )

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {"run": (RUN_TYPE, {"tooltip": "From Train (background on)."}), **declare(WIDGETS)},
            "hidden": {"unique_id": "UNIQUE_ID"},
        }

    @classmethod
    def IS_CHANGED(cls, **_inputs):
        return float("nan")  # the run goes on between queues: look again every time

    def wait(self, run, unique_id=None, **settings):
        values = check_all(WIDGETS, settings)
        run_dir = paths.confine(str(run.run_dir), paths.run_roots(), "run", must_exist=True)
        store = JobStore(run_dir.parent)
        record = find(store.read(), run_dir.name)
        since = record.queued_at if record is not None else 0.0
        result = run_result(run)
        deadline = time.monotonic() + 60 * values["timeout_minutes"] if values["timeout_minutes"] else None
        bar = None
        watcher = None
        if run.decode_previews is not None:  # Preview Settings linked to the background Train
            watcher = previews.PreviewWatcher(run_dir, run_dir.name, unique_id, run.decode_previews)
        while True:
            record = find(store.read(), run_dir.name)
            state, message = job_state(run_dir, record)
            if watcher is not None:
                watcher.poll()  # the previews sampled so far, decoded into the run folder and sent to this node
            if state in ENDED or (values["until"] == "lora" and fresh(result.path, since)):
                break
            comfy_bridge.raise_if_interrupted()
            if deadline is not None and time.monotonic() > deadline:
                raise TimeoutError(f"run {run_dir.name} is still {state} after {values['timeout_minutes']} minute(s)")
            job = describe_job(run_dir, record) or {}
            if job.get("total_steps"):
                bar = bar or comfy_bridge.progress_bar(job["total_steps"])
                bar.update_absolute(
                    min(job["step"] or 0, job["total_steps"]), job["total_steps"]
                )  # also a Cancel point
            time.sleep(POLL_SECONDS)
        if watcher is not None:
            watcher.poll(final=True)  # the ended run's last previews, waiting for one being decoded elsewhere
        if state == "failed":
            raise RuntimeError(f"run {run_dir.name} failed: {message}\nRun folder: {run_dir}")
        if not fresh(result.path, since):
            raise RuntimeError(f"run {run_dir.name} ended ({state}: {message}) without saving its {result.what}")
        logger.info("run %s: %s (%s); %s %s", run_dir.name, state, message, result.what, result.name)
        done = dataclasses.replace(run, run_dir=run_dir, state=state, summary={})
        return (done, result.name, f"{state}: {message}")
