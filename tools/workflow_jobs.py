"""What each template workflow trains and how it is planned: the jobs per tier, their order, the plan the Training
Plan node makes for them (the tier's simulated hardware) and the predicted throughput. ``tools.make_workflows``
turns these into files; ``tests/test_workflows.py`` recomputes every number from the planner.
"""

from __future__ import annotations

import math

from training.hardware.plan import PlanRequest, TrainingPlan, make_plan
from training.hardware.tiers import Tier, simulated_profile
from training.model.config import PRESETS, ZImageConfig
from training.model.flops import image_tokens_for, training_flops

from .workflow_pipeline import Job

#: The smallest Z-Image ComfyUI's loaders recognise (dim 3840, one main block, two refiners of each kind), random
#: weights, written by ``python -m tools.make_smoke_model``: the CPU smoke run trains and samples it.
SMOKE_MODEL = "z_image_smoke_bf16.safetensors"
SMOKE_CONFIG = PRESETS["z-image"].replace(n_layers=1)

#: Dense bf16 tensor-core peak per GPU (TFLOP/s) by tier, for the predicted throughput only.
PEAK_TFLOPS = {
    # RTX 4060 / 4070 / 4080: the 4090's 165 scaled by SM count and boost clock (24, 46 and 76 of its 128 SMs)
    "1x8GB": 30.2,
    "1x12GB": 58.5,
    "1x16GB": 97.4,
    "1x24GB": 165.0,  # RTX 4090
    "1x80GB": 989.0,  # H100 SXM
    "2xA10-24GB": 125.0,
    "4xA100-40GB-SXM": 312.0,
    "4xH100-80GB-NVLink4": 989.0,
    "8xA100-80GB-NVSwitch": 312.0,
    "2x8xH100-80GB-IB": 989.0,
}
ASSUMED_MFU = 0.4  # share of the bf16 peak spent on useful FLOPs; a guess until docs/benchmarks.md has measurements
RECOMPUTE_SHARE = 1 / 3  # a checkpointed block runs its forward again: +1/3 of its forward+backward

JOBS = {
    "1x8GB": Job(lora_rank=16, resolution=512),
    "1x12GB": Job(lora_rank=16),
    "1x16GB": Job(),
    "1x24GB": Job(),
    "1x80GB": Job(),
    "2xA10-24GB": Job(),
    "4xA100-40GB-SXM": Job(),
    "4xH100-80GB-NVLink4": Job(),
    "8xA100-80GB-NVSwitch": Job(),
    "2x8xH100-80GB-IB": Job(),
    "cpu": Job(
        lora_rank=8,
        resolution=256,
        caption_tokens=64,
        samples_seen=10,
        min_steps=10,
        save_every=5,
        warmup_steps=0,
        image_folder="whetstone_smoke_images",
        model=SMOKE_MODEL,
        sample_steps=4,
        prompt="a red circle on a white background",
        smoothing=2,
    ),
}

#: Full fine-tune workflows (FSDP2) for the tiers whose plan fits it at 1024 px without checkpointing, numbered
#: after the per-tier ones: Train writes the model to diffusion_models/whetstone/, Load Trained Model samples it.
FULL_JOBS = {
    "4xH100-80GB-NVLink4": Job(mode="full", save_every=100),
    "8xA100-80GB-NVSwitch": Job(mode="full", save_every=100),
}

#: The tiers in template (and README) order: one machine by size, then the tiers of several machines.
TIER_ORDER = (
    "cpu",
    "1x8GB",
    "1x12GB",
    "1x16GB",
    "1x24GB",
    "1x80GB",
    "2xA10-24GB",
    "4xA100-40GB-SXM",
    "4xH100-80GB-NVLink4",
    "8xA100-80GB-NVSwitch",
    "2x8xH100-80GB-IB",
)


def templates() -> list[tuple[str, Job]]:
    """(tier, job) of every template, in number order: one per tier, then the full fine-tunes."""
    return [(name, JOBS[name]) for name in TIER_ORDER] + list(FULL_JOBS.items())


def model_config(model_name: str) -> ZImageConfig:
    """The architecture the Training Plan node reads from this model file's header."""
    return SMOKE_CONFIG if model_name == SMOKE_MODEL else PRESETS["z-image"]


def plan_for(tier: Tier, job: Job) -> TrainingPlan:
    """The Training Plan node's plan for the job with ``tier`` in its tier widget (every node of a multi-node tier)."""
    request = PlanRequest(
        mode=job.mode,
        resolution=job.resolution,
        caption_tokens=job.caption_tokens,
        lora_rank=job.lora_rank,
        lora_targets=job.lora_targets,
        target_global_batch=tier.target_global_batch,
        lr_base=job.learning_rate,
        model=model_config(job.model),
    )
    return make_plan(request, simulated_profile(tier), tier=tier)


def inter_node_seconds(plan: TrainingPlan) -> float | None:
    """The planner's inter-node transfer time per optimizer step; None for a plan on one machine."""
    found = [value for name, value, _ in plan.decisions if name == "inter_node_s_per_step"]
    return found[0] if found else None


def predicted_images_per_second(plan: TrainingPlan, tier_name: str, config: ZImageConfig) -> float | None:
    """Useful training FLOPs per image (plus recomputed checkpointed blocks) at ASSUMED_MFU of the bf16 peak; across
    machines the planner's inter-node transfer time per step is added, as if none of it overlapped the compute."""
    peak = PEAK_TFLOPS.get(tier_name)
    if peak is None:
        return None
    tokens = image_tokens_for(plan.resolution, config)
    flops = training_flops(
        config, image_tokens=tokens, caption_tokens=plan.caption_tokens, full_finetune=plan.mode == "full"
    )
    flops *= 1 + RECOMPUTE_SHARE * plan.checkpoint_depth / config.n_layers
    compute_s = plan.global_batch * flops / (plan.world_size * peak * 1e12 * ASSUMED_MFU)
    return plan.global_batch / (compute_s + (inter_node_seconds(plan) or 0.0))


def steps_for(plan: TrainingPlan, job: Job) -> int:
    return max(job.min_steps, math.ceil(job.samples_seen / plan.global_batch))


#: What a tier's plan did when run, by tier: where, how long, the peak against the plan's prediction (the README's
#: "measured" column; every figure's command and table are in docs/benchmarks.md). Tiers not listed have not run.
MEASURED = {
    "1x8GB": "H200 capped to 8 GiB, 200 steps: 0 OOM, peak 6.98 GiB (predicted −2.8%); 2.35 img/s (8 steps alone)",
    "1x12GB": "H200 capped to 12 GiB, 200 steps: 0 OOM, peak 10.30 GiB (predicted +1.6%), 1.62 img/s",
    "1x16GB": "H200 capped to 16 GiB, 200 steps: 0 OOM, peak 13.53 GiB (predicted +0.8%), 1.67 img/s",
    "1x80GB": "H200, the workflow in a real ComfyUI, 16 steps: peak 47.2 GiB (predicted 49.1 GiB for its captions), "
    "3.87 img/s",
}
