"""Train: plan + shard set + model -> a run folder, the engine in a child process, live progress, a LoRA."""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from ..training.data.stats import read_dataset_stats
from ..training.engine.config import TrainConfig
from ..training.engine.variant_setup import run_variant
from ..training.hardware.dataset_fit import check_plan_against_dataset
from ..training.run.events import EVENTS_FILE, EventTail, read_summary
from ..training.run.launch import CONFIG_FILE, RunProcess, TrainingFailed, failure_message, outcome, train_command
from . import background, comfy_bridge, multinode, paths, preview_jobs, previews, variant_inputs
from .validation import Choice, Float, Int, Text, Toggle, check_all
from .values import DATASET_TYPE, MACHINES_TYPE, PLAN_TYPE, RUN_TYPE, RunRef

logger = logging.getLogger(__name__)

PACK_ROOT = Path(__file__).resolve().parents[1]
PROGRESS_EVENT = "whetstone.progress"
POLL_SECONDS = 1.0
STOP_TIMEOUT_SECONDS = 600.0

WIDGETS = {
    "run_name": Text(
        "my_lora",
        "Name of the run (folder in whetstone_runs) and of the LoRA file (<name>.safetensors in loras). The same "
        "name with resume on continues a stopped run.",
        64,
    ),
    "steps": Int(1000, 1, 1_000_000, "Optimizer steps to train."),
    "save_every": Int(
        250, 0, 1_000_000, "Save a resumable checkpoint and the LoRA every N steps (0: only at the end)."
    ),
    "warmup_steps": Int(0, 0, 100_000, "Steps over which the learning rate ramps up from 0."),
    "schedule": Choice(("constant", "cosine"), "Learning-rate schedule after warmup."),
    "caption_dropout": Float(0.1, 0.0, 1.0, "Fraction of steps trained on the empty caption (keeps CFG working)."),
    "seed": Int(
        0,
        0,
        2**31 - 1,
        "Random seed for noise, timesteps and data order (kept between queues, so a resumed run continues exactly).",
        control_after_generate=False,
    ),
    "resume": Toggle(True, "Continue from the newest checkpoint in the run folder if there is one."),
}


FINE_TUNES_SUBFOLDER = "whetstone"  # diffusion_models/whetstone/<run_name>.safetensors: never a base model's name


#: Optional inputs (prompts written before them stay valid): the EMA the plan placed (Training Plan's ema).
EMA_WIDGETS = {
    "ema_decay": Float(
        0.999,
        0.5,
        0.9999,
        "EMA decay per step (with ema on in the plan): 0.999 averages about the last 1000 steps.",
        0.0001,
    ),
    "ema_start_step": Int(0, 0, 1_000_000, "The EMA equals the trained weights until this step, then averages."),
}


def build_config(
    plan,
    dataset_dir: Path,
    model_path: Path,
    run_dir: Path,
    lora_path: Path,
    values: dict,
    preview: dict | None = None,
    run: dict | None = None,
):
    """The engine's TrainConfig: the plan's decisions (``TrainConfig.from_plan``) and the node's settings, after the
    plan is checked against the shard set (a bucket or caption it did not count refuses, with the numbers)."""
    check_plan_against_dataset(plan, read_dataset_stats(dataset_dir))
    return TrainConfig.from_plan(
        plan,
        run={
            "output_dir": str(run_dir),
            "lora_path": str(lora_path),
            "steps": values["steps"],
            "save_every": values["save_every"],
            "seed": values["seed"],
            "resume": values["resume"],
            **(run or {}),
        },
        model={"weights": str(model_path), **values.get("variant", {})},
        data={"shards": str(dataset_dir), "caption_dropout": values["caption_dropout"]},
        optim={"warmup_steps": values["warmup_steps"], "schedule": values["schedule"]},
        preview=preview or {},
        ema={key: values.get(f"ema_{key}", EMA_WIDGETS[f"ema_{key}"].default) for key in ("decay", "start_step")},
        **({"resolutions": plan.resolutions} if getattr(plan, "resolutions", None) else {}),  # a ScheduledPlan's
    )


def finished_text(state: str, message: str, run_name: str, lora_name: str, *, folder: str = "loras") -> str:
    """How a run ended, in words (the engine's message starts with the state): for a stop, what was saved and how
    to resume. ``folder``: where the result is ("diffusion_models" for a full fine-tune's model)."""
    what = "LoRA" if folder == "loras" else "model"
    if state == "completed":
        return f"{message}; {what} {lora_name} saved in {folder}"
    if state == "stopped":
        return (
            f"{message}: the {what} so far ({lora_name}) and a resumable checkpoint are saved; queue again with resume "
            f"on and run_name {run_name!r} to continue"
        )
    return f"failed: {message}"


def fine_tune_path(run_name: str, base_model: Path) -> tuple[Path, str]:
    """(file, name in the diffusion_models list) of a full fine-tune's result; refuses to overwrite its base."""
    folder = paths.new_child(paths.diffusion_model_roots(), FINE_TUNES_SUBFOLDER, "run_name")
    path = folder / f"{run_name}.safetensors"
    if path == base_model.resolve():
        raise ValueError(
            f"run_name {run_name!r} would write the fine-tune over the model it trains ({base_model}); choose "
            "another run_name"
        )
    return path, f"{FINE_TUNES_SUBFOLDER}/{path.name}"


def stopping_text(step: int | None) -> str:
    at = f" step {step}" if step is not None else " the current step"
    return f"Stopping… finishing{at}, then saving the LoRA and a resumable checkpoint."


class Progress:
    """Turns new step events into the node's progress bar and throttled websocket updates for the chart."""

    def __init__(self, node_id, run_name: str, total_steps: int) -> None:
        self.node_id = node_id
        self.run_name = run_name
        self.total_steps = total_steps
        self.bar = comfy_bridge.progress_bar(total_steps, node_id=node_id)
        self.first_time: tuple[int, float] | None = None
        self.last_step: int | None = None

    def send(self, kind: str, **data) -> None:
        comfy_bridge.send_event(PROGRESS_EVENT, {"node": self.node_id, "run": self.run_name, "kind": kind, **data})

    def update(self, events: list[dict]) -> None:
        last = events[-1]
        step = last["step"]
        self.last_step = step
        self.bar.update_absolute(min(step, self.total_steps), self.total_steps)
        self.send(
            "progress",
            points=[[e["step"], e.get("loss")] for e in events],
            step=step,
            total_steps=self.total_steps,
            loss=last.get("loss"),
            lr=last.get("lr"),
            img_per_s=last.get("img_per_s"),
            peak_mem_gb=last.get("peak_mem_gb", last.get("gpu_mem_used_gb")),
            eta_s=last.get("eta_s", self._eta(step, last.get("time"))),
        )

    def _eta(self, step: int, now: float | None) -> float | None:
        if now is None:
            return None
        if self.first_time is None:
            self.first_time = (step, now)
            return None
        first_step, first_now = self.first_time
        if step <= first_step:
            return None
        return (now - first_now) / (step - first_step) * (self.total_steps - step)


def follow(process: RunProcess, progress: Progress, poll_seconds: float = POLL_SECONDS, watcher=None) -> bool:
    """Poll the run until the child exits; returns True when the user interrupted (the child was asked to stop).

    Any exception here (including ComfyUI's interrupt raised by a progress update) stops the child politely first.
    """
    tail = EventTail(process.run_dir / EVENTS_FILE)
    try:
        while process.running():
            if comfy_bridge.interrupt_requested():
                progress.send("stopping", message=stopping_text(progress.last_step))
                process.request_stop()
                process.wait(STOP_TIMEOUT_SECONDS)
                return True
            events = tail.read_new()
            if events:
                progress.update(events)
            if watcher is not None:
                watcher.poll()
            time.sleep(poll_seconds)
        events = tail.read_new()
        if events:
            progress.update(events)
        if watcher is not None:
            watcher.poll(final=True)  # every preview of the ended run, waiting for one being decoded elsewhere
        return False
    except BaseException:
        process.request_stop()  # a no-op once the child has exited; the wait settles its status and frees the folder
        process.wait(STOP_TIMEOUT_SECONDS)
        raise


def save_run_files(run_dir: Path, config, preview_settings) -> None:
    """What the engine reads from the claimed folder: the preview prompts' features (when linked), the config."""
    if preview_settings is not None:
        previews.write_prompts(preview_settings, run_dir)
    config.save(run_dir / CONFIG_FILE)


class Train:
    DESCRIPTION = (
        "Trains with the plan on the shard set: writes a run folder (config, events, checkpoints) and runs the "
        "engine in a separate process (torchrun when the plan uses several GPUs), showing progress and a live loss "
        "chart. Cancel stops after the current step, saving the LoRA and a resumable checkpoint. Outputs the run "
        "and the LoRA name; on failure the error shows the engine's traceback and the run folder."
    )
    CATEGORY = "Whetstone"
    FUNCTION = "train"
    OUTPUT_NODE = True
    RETURN_TYPES = (RUN_TYPE, "STRING", "STRING")
    RETURN_NAMES = ("run", "lora_name", "report")
    OUTPUT_TOOLTIPS = (
        "The finished run, for Load Trained LoRA (Load Trained Model for mode full) and Training Report.",
        "The LoRA's name in ComfyUI's loras list (mode full: the model's name in diffusion_models).",
        "How the run ended: state, steps, final loss, files.",
    )

    @classmethod
    def INPUT_TYPES(cls):
        models = comfy_bridge.list_files(comfy_bridge.DIFFUSION_MODELS_FOLDER)
        return {
            "required": {
                "plan": (PLAN_TYPE, {"tooltip": "From Training Plan: batch, checkpointing, GPUs, learning rate."}),
                "dataset": (DATASET_TYPE, {"tooltip": "From Pack Dataset: the shard set to train on."}),
                "model_name": (models, {"tooltip": "The Z-Image diffusion model to train (the one planned for)."}),
                **{name: widget.declare() for name, widget in WIDGETS.items()},
            },
            "optional": {
                **variant_inputs.train_inputs(),
                "machines": (
                    MACHINES_TYPE,
                    {"tooltip": "From Multi-Node Run: train on several machines (none: this one)."},
                ),
                "preview_settings": (
                    previews.PREVIEWS_TYPE,
                    {"tooltip": "From Preview Settings: prompts to sample while training, shown in this node."},
                ),
                **{name: widget.declare() for name, widget in background.WIDGETS.items()},
                **{name: widget.declare() for name, widget in EMA_WIDGETS.items()},
            },
            "hidden": {"unique_id": "UNIQUE_ID"},
        }

    @classmethod
    def VALIDATE_INPUTS(cls, run_name):
        """At queue time, before Pack and Plan run: a run name that cannot be a folder and file name."""
        try:
            paths.check_name(run_name, "run_name")
        except paths.PathRefused as error:
            return str(error)
        return True

    def train(self, plan, dataset, model_name, unique_id=None, preview_settings=None, **settings):
        options, several, values = read_settings(settings)
        files = run_files(plan, dataset, model_name, paths.check_name(values["run_name"], "run_name"))
        preview = previews.preview_section(files.run_dir, preview_settings.values) if preview_settings else None
        full = {"model_path": str(files.tuned_path)} if files.tuned_path is not None else {}
        config = build_config(
            plan, files.dataset_dir, files.model_path, files.run_dir, files.lora_path, values, preview, full
        )
        run_variant(config)  # Turbo with nothing protecting its distillation: refused here, naming the fixes
        per_node = multinode.gpus_per_node(plan, several)
        machines = multinode.plan_multinode(several, files.run_dir / CONFIG_FILE, per_node, PACK_ROOT)
        config = multinode.across_nodes(config, machines)
        command = (
            train_command(files.run_dir / CONFIG_FILE, plan.world_size) if machines is None else machines.this_node
        )
        process = RunProcess(files.run_dir, command, cwd=PACK_ROOT, lock_for_child=machines is None)
        process.claim()  # refuses a folder that a live run holds, before anything in it is written
        save_files = functools.partial(save_run_files, files.run_dir, config, preview_settings)
        if options.background:
            tuned = (files.tuned_path, files.tuned_name)
            submitted = (process, save_files, plan, options, files.lora_path, tuned, preview_settings)
            return background.submit(*submitted, total_steps=values["steps"])
        progress = start_here(
            process, save_files, machines, node_id=unique_id, run_name=files.run_name, steps=values["steps"]
        )
        watcher = None
        if preview_settings is not None:
            watcher = previews.PreviewWatcher(files.run_dir, files.run_name, unique_id, preview_settings.decode)
            preview_jobs.remember(preview_settings.vae, preview_settings.decode)  # the jobs panel decodes with it too
        interrupted = follow(process, progress, watcher=watcher)
        result = outcome(files.run_dir, process.wait(STOP_TIMEOUT_SECONDS))
        return finished_output(result, files, progress, machines, interrupted=interrupted)


def read_settings(settings: dict) -> tuple[background.BackgroundOptions, object, dict]:
    """(background options, Multi-Node Run's machines or None, the checked widget values) of the node's inputs."""
    options = background.options({name: settings.pop(name) for name in background.WIDGETS if name in settings})
    several = settings.pop("machines", None)  # from Multi-Node Run (optional)
    if options.background and several is not None:
        raise ValueError("background is for runs on this machine: turn it off, or unlink Multi-Node Run")
    ema = {name: widget.default for name, widget in EMA_WIDGETS.items()} | {
        name: settings.pop(name) for name in EMA_WIDGETS if name in settings
    }
    values = check_all(WIDGETS, settings) | check_all(EMA_WIDGETS, ema)
    values["variant"] = variant_inputs.model_settings(settings)
    return options, several, values


@dataclass(frozen=True)
class RunFiles:
    """Where a run reads and writes: its folder, its LoRA, the shard set, the base model, and (mode full) the
    fine-tune's file and its name in diffusion_models."""

    run_name: str
    run_dir: Path
    lora_path: Path
    dataset_dir: Path
    model_path: Path
    tuned_path: Path | None
    tuned_name: str | None

    @property
    def result(self) -> tuple[str, str]:
        """(the result's name, its ComfyUI folder): the fine-tune's model, else the LoRA."""
        return (self.tuned_name, "diffusion_models") if self.tuned_name else (self.lora_path.name, "loras")


def run_files(plan, dataset, model_name: str, run_name: str) -> RunFiles:
    """The run's paths, each confined to its ComfyUI folder (refused, naming the input, when it is not)."""
    run_dir = paths.new_child(paths.run_roots(), run_name, "run_name")
    lora_path = paths.new_child(paths.lora_roots(), f"{run_name}.safetensors", "run_name")
    dataset_dir = paths.confine(str(dataset.path), paths.dataset_roots(), "dataset", must_exist=True)
    model_path = comfy_bridge.full_path(comfy_bridge.DIFFUSION_MODELS_FOLDER, model_name)
    tuned_path, tuned_name = fine_tune_path(run_name, model_path) if plan.mode == "full" else (None, None)
    return RunFiles(
        run_name=run_name,
        run_dir=run_dir,
        lora_path=lora_path,
        dataset_dir=dataset_dir,
        model_path=model_path,
        tuned_path=tuned_path,
        tuned_name=tuned_name,
    )


def start_here(
    process: RunProcess, save_files: Callable[[], None], machines, *, node_id, run_name: str, steps: int
) -> Progress:
    """Start the run in the foreground: free ComfyUI's models, write the run's files, announce the run to the node
    and start the child; the claimed folder is released when any of it fails. Returns the node's progress."""
    try:
        comfy_bridge.unload_models()  # the plan counted on a free GPU: ComfyUI's VAE and text encoder give it
        save_files()
        progress = Progress(node_id, run_name, steps)
        progress.send("start", total_steps=steps)
        if machines is not None:
            progress.send("nodes", commands=machines.others, text=multinode.announce(machines, process.run_dir))
        process.start()
    except BaseException:
        process.release()
        raise
    return progress


def finished_output(result, files: RunFiles, progress: Progress, machines, *, interrupted: bool) -> dict:
    """The node's output once the run ended: the end event, the user's interrupt or the failure raised, else the run,
    the result's name and the report."""
    result_name, folder = files.result
    ended = finished_text(result.state, result.message, files.run_name, result_name, folder=folder)
    progress.send("end", state=result.state, message=ended)
    if interrupted:
        logger.info("training %s stopped by the user: %s", files.run_name, result.message)
        comfy_bridge.raise_if_interrupted()
    if result.state == "failed":
        raise TrainingFailed(failure_message(files.run_dir, result))
    summary = read_summary(files.run_dir) or {}
    run = RunRef(
        run_dir=files.run_dir,
        lora_path=files.lora_path,
        lora_name=files.lora_path.name,
        state=result.state,
        summary=summary,
        model_path=files.tuned_path,
        model_name=files.tuned_name,
    )
    result_line = f"model: {files.tuned_path}" if files.tuned_path is not None else f"LoRA: {files.lora_path}"
    if summary.get("ema_file"):
        result_line += f"\nEMA of the weights: {summary['ema_file']}"
    report = f"{ended}\nrun folder: {files.run_dir}\n{result_line}"
    if machines is not None:
        report += f"\nnodes: {machines.nodes} (the others' commands: {files.run_dir / multinode.OTHER_NODES_FILE})"
    return {"ui": {"text": [report]}, "result": (run, result_name, report)}
