"""Background mode of the Train node: queue the run as a job of the runs folder and return its handle at once.

The job's GPUs are the user's (``gpus``: '0,1') or any free ones the plan's GPU count needs; the scheduler
(`nodes.jobs_api.scheduler`) starts it when they are free, in its own session, so it outlives this ComfyUI. The run
folder stays the contract: Wait for Run, the jobs panel and a restarted ComfyUI all read it.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

from ..training.run.jobs import parse_gpu_ids
from . import comfy_bridge, jobs_api, preview_jobs
from .validation import Text, Toggle, check_all
from .values import RunRef

logger = logging.getLogger(__name__)

WIDGETS = {
    "background": Toggle(
        False,
        "Start the run as a background job and go on at once (the queue is free for sampling); follow it in the "
        "Whetstone jobs panel, and use Wait for Run to sample its LoRA in the same queue. Off: train here until done.",
    ),
    "gpus": Text(
        "auto",
        "Background jobs: 'auto' takes as many free GPUs as the plan has (none another job holds); '0,1' pins the "
        "job to those GPUs. The job waits in the queue until they are free.",
        64,
    ),
}


@dataclass(frozen=True)
class BackgroundOptions:
    background: bool
    gpu_ids: tuple[int, ...] | None


def options(given: dict) -> BackgroundOptions:
    """The checked options (absent ones take their defaults: workflows saved before they existed)."""
    values = check_all(WIDGETS, {name: given.get(name, widget.default) for name, widget in WIDGETS.items()})
    return BackgroundOptions(background=values["background"], gpu_ids=parse_gpu_ids(values["gpus"], "gpus"))


def gpu_request(plan, gpu_ids: tuple[int, ...] | None) -> int:
    """How many GPUs the job takes: the plan's (none for a CPU plan); pinned GPUs must be as many."""
    count = plan.world_size if plan.device == "cuda" else 0
    if gpu_ids is not None and len(gpu_ids) != count:
        raise ValueError(
            f"gpus={','.join(map(str, gpu_ids))} names {len(gpu_ids)} GPU(s) but the plan is for {count}: name "
            f"{count} GPU(s), or set Training Plan's gpu_count to {len(gpu_ids)}"
        )
    return count


def submit(
    process,
    save_files: Callable[[], None],
    plan,
    chosen: BackgroundOptions,
    lora_path,
    tuned=(None, None),
    preview_settings=None,
    total_steps: int | None = None,
):
    """Write the run's files (config...) while the folder is claimed, hand the run to the scheduler; the node's
    output at once. ``tuned``: a full fine-tune's (model path, name in diffusion_models), else (None, None);
    ``preview_settings``: Preview Settings' request, whose decoder is kept in the handle for Wait for Run and
    remembered for the jobs panel's decoding (`nodes.preview_jobs`). The ui's ``whetstone_background`` names the
    job, so the node's chart and preview strip follow it (js/whetstone.js polls its history and its previews)."""
    decode_previews = preview_settings.decode if preview_settings is not None else None
    run_dir = process.run_dir
    try:
        count = gpu_request(plan, chosen.gpu_ids)
        save_files()
    finally:
        process.release()  # the scheduler's launcher takes the folder again when the job starts
    comfy_bridge.unload_models()  # the plan counted on free GPUs; ComfyUI's models reload when a sampler needs them
    record = jobs_api.scheduler().submit(
        run_dir.name, gpu_count=count, gpu_ids=chosen.gpu_ids, world_size=plan.world_size
    )
    state = "queued" if not record.launched else "starting"
    where = f"GPUs {list(record.assigned)}" if record.assigned else ("the CPU" if not count else "GPUs when free")
    model_path, model_name = tuned
    result = f"model (when saved): {model_path}" if model_path is not None else f"LoRA (when saved): {lora_path}"
    report = (
        f"background job {run_dir.name}: {state} on {where}; follow it in the Whetstone jobs panel\n"
        f"run folder: {run_dir}\n{result}"
    )
    logger.info("%s", report.splitlines()[0])
    run = RunRef(
        run_dir=run_dir,
        lora_path=lora_path,
        lora_name=lora_path.name,
        state=state,
        summary={},
        model_path=model_path,
        model_name=model_name,
        decode_previews=decode_previews,
    )
    if preview_settings is not None:
        preview_jobs.remember(preview_settings.vae, decode_previews)
        report += (
            "\npreviews: sampled by the run, decoded with the wired VAE on this ComfyUI's CPU when shown (this node, "
            "the jobs panel)"
        )
    job = {"run": run_dir.name, "total_steps": total_steps, "submitted_at": record.queued_at}
    ui = {"text": [report], "whetstone_background": [job]}
    return {"ui": ui, "result": (run, model_name or lora_path.name, report)}
