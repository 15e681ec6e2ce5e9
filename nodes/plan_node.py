"""Training Plan: hardware (measured, or a tier to plan for another machine) + model + job -> a TrainingPlan."""

from __future__ import annotations

import logging

from ..training.data.stats import read_dataset_stats
from ..training.engine.quantize import qlora_unavailable
from ..training.hardware.discovery import discover
from ..training.hardware.panel import plan_panel
from ..training.hardware.plan import PlanRequest, make_plan
from ..training.hardware.schedule_cli import SCHEDULES, ScheduleInputs, plan_resolutions
from ..training.hardware.tiers import load_tiers, nearest_tier, simulated_profile
from ..training.model.targets import DEFAULT_LORA_RANK, DEFAULT_TARGETS, LORA_TARGETS
from ..training.model.weights import infer_config, read_header
from ..training.run.jobs import JobStore, held_gpus, subset_profile
from ..training.vocabulary import ADAPTER_TYPES, MODES, OPTIMIZERS
from . import comfy_bridge, paths
from .validation import Choice, Float, Int, Text, Toggle, check_all
from .values import DATASET_TYPE, HARDWARE_TYPE, PLAN_TYPE, HardwareChoice

logger = logging.getLogger(__name__)

MEASURED = "measured (hardware input)"
CAPTION_LENGTHS = {"longest": None, "p99": 99, "p95": 95, "p90": 90}
AUTO_OPTIMIZER = "auto"


def tier_names() -> tuple[str, ...]:
    return (MEASURED, *sorted(load_tiers()))


WIDGETS = {
    "tier": Choice(
        tier_names(),
        "Plan for the measured hardware (link Hardware Profile), or for a tier to prepare a run for another machine.",
    ),
    "mode": Choice(MODES, "LoRA (bf16 base), QLoRA (4-bit base, least memory) or full fine-tune."),
    "lora_rank": Int(
        DEFAULT_LORA_RANK, 1, 1024, "LoRA rank: capacity of the adapter (16-64 for styles and characters)."
    ),
    "lora_targets": Choice(LORA_TARGETS, "Which layers get LoRA adapters.", default=DEFAULT_TARGETS),
    "adapter": Choice(
        ADAPTER_TYPES,
        "Adapter type (lora/qlora modes): LoRA; DoRA (LoRA + a learned magnitude per row); LoKr (Kronecker, far "
        "fewer parameters); LoHa (Hadamard, twice LoRA's). QLoRA takes LoRA or DoRA. Each is priced by the plan.",
    ),
    "resolution": Int(1024, 256, 4096, "Training resolution (square side in pixels, as packed).", step=16),
    "target_batch": Int(0, 0, 4096, "Global batch per optimizer step; 0 uses the tier's default."),
    "learning_rate": Float(1e-4, 1e-7, 1e-2, "Base learning rate; the plan scales it with the number of GPUs.", 1e-6),
    "caption_tokens": Int(
        128, 8, 2048, "Caption length in tokens the memory plan assumes when no dataset is linked (else read from it)."
    ),
    "caption_length": Choice(
        tuple(CAPTION_LENGTHS),
        "Plan for the longest encoded caption (a longer one refuses the run), or for a percentile of the dataset's "
        "caption lengths: longer captions are then truncated to it, saving memory.",
    ),
    "optimizer": Choice(
        (AUTO_OPTIMIZER, *OPTIMIZERS),
        "Optimizer; the plan prices its state. auto: the mode's default, AdamW (full fine-tuning runs only AdamW). "
        "prodigy and adafactor set their own learning rate; adamw8bit is warned against on Base.",
    ),
    "ema": Choice(
        ("off", "auto", "device", "cpu"),
        "Keep an EMA (float32 running average) of the trained weights, saved beside the result as <name>_ema: on "
        "the GPU (priced in the plan), in host RAM, or auto (the GPU when it costs no batch or checkpointing).",
    ),
    "free_comfyui_memory": Toggle(
        True, "With measured hardware: unload ComfyUI's models and measure free GPU memory again before planning."
    ),
}


SHARING = {
    "gpu_count": Int(
        0,
        0,
        1024,
        "0: plan for every GPU of the machine (or tier). N: plan for N of them, for a background job that shares the "
        "machine with others (Train's background and gpus); the plan measures N GPUs no other job holds.",
    ),
}


#: Optional (prompts saved before them stay valid): a resolution schedule over a shard set packed at several
#: resolutions, planned per shape as ``python -m training plan --resolution-schedule`` plans it.
SCHEDULE_WIDGETS = {
    "resolution_schedule": Choice(
        SCHEDULES,
        "With a dataset packed at several resolutions: none trains them as one stream; mix draws each step's "
        "resolution by resolution_weights; progressive trains them in order by resolution_stages. Every shape is "
        "planned and gets its own micro-batch (the plan is for the largest; the resolution input is not used).",
    ),
    "resolution_weights": Text("", "mix: RES=WEIGHT pairs, e.g. 512=0.3,1024=0.7.", 256),
    "resolution_stages": Text(
        "", "progressive: each resolution until this fraction of the steps, e.g. 512=0.4,1024=1.0.", 256
    ),
}
SCHEDULE_INPUTS = ScheduleInputs(
    schedule="resolution_schedule",
    weights="resolution_weights",
    stages="resolution_stages",
    dataset="the dataset input",
)


class TrainingPlan:
    DESCRIPTION = (
        "Decides how to train on the chosen hardware: micro-batch, gradient accumulation, activation-checkpoint "
        "depth, parallelism (DDP or FSDP2 across GPUs), precision and learning rate, each with its reason, shown as "
        "a table in the node. Refuses with alternatives that would fit when nothing fits."
    )
    CATEGORY = "Whetstone"
    FUNCTION = "plan"
    OUTPUT_NODE = True
    RETURN_TYPES = (PLAN_TYPE, "STRING")
    RETURN_NAMES = ("plan", "table")
    OUTPUT_TOOLTIPS = ("The plan, for Train.", "The decision table: every setting with its reason.")

    @classmethod
    def INPUT_TYPES(cls):
        models = comfy_bridge.list_files(comfy_bridge.DIFFUSION_MODELS_FOLDER)
        return {
            "required": {
                "model_name": (models, {"tooltip": "The Z-Image diffusion model to train (its size sets the memory)."}),
                **{name: widget.declare() for name, widget in WIDGETS.items()},
            },
            "optional": {
                **{name: widget.declare() for name, widget in SHARING.items()},
                **{name: widget.declare() for name, widget in SCHEDULE_WIDGETS.items()},
                "hardware": (HARDWARE_TYPE, {"tooltip": "From Hardware Profile; needed with 'measured'."}),
                "dataset": (
                    DATASET_TYPE,
                    {"tooltip": "From Pack Dataset: plan for its real bucket shapes and caption lengths."},
                ),
            },
        }

    @classmethod
    def VALIDATE_INPUTS(cls, mode):
        """At queue time: a mode whose backend this Python lacks is refused before anything runs."""
        if mode == "qlora" and (missing := qlora_unavailable()):
            return missing
        return True

    def plan(self, model_name, hardware=None, dataset=None, **settings):
        sharing = check_all(SHARING, {name: settings.pop(name, w.default) for name, w in SHARING.items()})
        schedule = check_all(SCHEDULE_WIDGETS, {n: settings.pop(n, w.default) for n, w in SCHEDULE_WIDGETS.items()})
        values = check_all(WIDGETS, settings)
        model_path = comfy_bridge.full_path(comfy_bridge.DIFFUSION_MODELS_FOLDER, model_name)
        model_config = infer_config({key: shape for key, (_, shape) in read_header(model_path).items()})
        profile, tier = self._hardware(values, hardware)
        if sharing["gpu_count"] and sharing["gpu_count"] != profile.gpu_count:
            runs_root = comfy_bridge.folder_roots(comfy_bridge.RUNS_FOLDER)[0]
            held = held_gpus(runs_root, JobStore(runs_root).read()) if runs_root.is_dir() else set()
            profile, _, _ = subset_profile(profile, sharing["gpu_count"], held)
            tier = nearest_tier(profile)[0]  # the subset's tier: its batch defaults and margins, not the machine's
        request = PlanRequest(
            mode=values["mode"],
            resolution=values["resolution"],
            caption_tokens=values["caption_tokens"],
            lora_rank=values["lora_rank"],
            lora_targets=values["lora_targets"],
            adapter=values["adapter"],
            target_global_batch=values["target_batch"] or None,
            lr_base=values["learning_rate"],
            model=model_config,
            dataset=None if dataset is None else read_dataset_stats(self._dataset_dir(dataset)),
            caption_percentile=CAPTION_LENGTHS[values["caption_length"]],
            optimizer=None if values["optimizer"] == AUTO_OPTIMIZER else values["optimizer"],
            ema=values["ema"],
        )
        if schedule["resolution_schedule"] == "none":
            training_plan = make_plan(request, profile, tier)
        else:
            texts = schedule["resolution_weights"], schedule["resolution_stages"]
            shapes, _ = plan_resolutions(schedule["resolution_schedule"], *texts, request, profile, SCHEDULE_INPUTS)
            training_plan = shapes.base  # a ScheduledPlan: Train writes its resolutions section into the config
        logger.info("%s", training_plan.table())
        table = plan_panel(training_plan)
        return {"ui": {"text": [table]}, "result": (training_plan, table)}

    @staticmethod
    def _dataset_dir(dataset):
        return paths.confine(str(dataset.path), paths.dataset_roots(), "dataset", must_exist=True)

    @staticmethod
    def _hardware(values: dict, hardware: HardwareChoice | None):
        if values["tier"] != MEASURED:
            tier = load_tiers()[values["tier"]]
            return simulated_profile(tier), tier
        if hardware is None:
            raise ValueError("tier is 'measured' but no hardware is linked: link Hardware Profile or choose a tier")
        if values["free_comfyui_memory"] and not hardware.simulated:
            comfy_bridge.unload_models()
            runs_root = comfy_bridge.folder_roots(comfy_bridge.RUNS_FOLDER)[0]
            profile = discover(output_dir=runs_root if runs_root.is_dir() else None)
            return profile, nearest_tier(profile)[0]
        return hardware.profile, hardware.tier
