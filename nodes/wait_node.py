"""Wait for Run: a background run's handle -> its LoRA once saved (or the run's end), so a workflow can still
train, then sample, in one queue. Cancel stops the waiting, not the job (the jobs panel stops jobs)."""

from __future__ import annotations

import logging
import time

from ..training.run.jobs import JobStore, find, job_state
from . import comfy_bridge, paths
from .jobs_api import describe_job
from .validation import Choice, Int, check_all, declare
from .values import RUN_TYPE, RunRef

logger = logging.getLogger(__name__)

POLL_SECONDS = 1.0
ENDED = ("completed", "stopped", "failed")

WIDGETS = {
    "until": Choice(
        ("lora", "end"),
        "lora: go on as soon as the run has saved a LoRA (its first save, or its end); end: wait until the run ends.",
    ),
    "timeout_minutes": Int(0, 0, 100_000, "Give up after this many minutes (0: wait as long as it takes)."),
}


def fresh_lora(run: RunRef, since: float) -> bool:
    """The run's LoRA file exists and was written by this job (not left by an earlier run of the same name)."""
    try:
        return run.lora_path.is_file() and not run.lora_path.is_symlink() and run.lora_path.stat().st_mtime >= since
    except OSError:
        return False


class WaitForRun:
    DESCRIPTION = (
        "Waits for a run that Train started in the background: until it has saved a LoRA (or until it ends), then "
        "outputs the run and the LoRA's name for Load Trained LoRA or a LoRA loader. Cancel stops the waiting; "
        "the job goes on (stop it in the Whetstone jobs panel)."
    )
    CATEGORY = "Whetstone"
    FUNCTION = "wait"
    RETURN_TYPES = (RUN_TYPE, "STRING", "STRING")
    RETURN_NAMES = ("run", "lora_name", "state")
    OUTPUT_TOOLTIPS = (
        "The run, for Load Trained LoRA and Training Report.",
        "The LoRA's name in ComfyUI's loras list.",
        "The run's state when the waiting ended, and its message.",
    )

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"run": (RUN_TYPE, {"tooltip": "From Train (background on)."}), **declare(WIDGETS)}}

    @classmethod
    def IS_CHANGED(cls, **_inputs):
        return float("nan")  # the run goes on between queues: look again every time

    def wait(self, run, **settings):
        values = check_all(WIDGETS, settings)
        run_dir = paths.confine(str(run.run_dir), paths.run_roots(), "run", must_exist=True)
        store = JobStore(run_dir.parent)
        record = find(store.read(), run_dir.name)
        since = record.queued_at if record is not None else 0.0
        deadline = time.monotonic() + 60 * values["timeout_minutes"] if values["timeout_minutes"] else None
        bar = None
        while True:
            record = find(store.read(), run_dir.name)
            state, message = job_state(run_dir, record)
            if state in ENDED or (values["until"] == "lora" and fresh_lora(run, since)):
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
        if state == "failed":
            raise RuntimeError(f"run {run_dir.name} failed: {message}\nRun folder: {run_dir}")
        if not fresh_lora(run, since):
            raise RuntimeError(f"run {run_dir.name} ended ({state}: {message}) without saving a LoRA")
        logger.info("run %s: %s (%s); LoRA %s", run_dir.name, state, message, run.lora_name)
        done = RunRef(run_dir=run_dir, lora_path=run.lora_path, lora_name=run.lora_name, state=state, summary={})
        return (done, run.lora_name, f"{state}: {message}")
