"""The training plan: every decision the engine needs (micro-batch, accumulation, checkpoint depth, parallelism,
precision, lr, ...) with the reason for it, made from a ``PlanRequest``, a ``HardwareProfile`` and a tier.

Every automatic decision is logged as ``(name, value, reason)``. ``TrainingPlan`` round-trips through JSON: the
node writes it into the run folder for the training child process.
"""

from __future__ import annotations

import dataclasses
import logging
import math

from .dataset_fit import fit_request_to_dataset
from .discovery import HardwareProfile
from .fitting import (
    Setting,
    alternatives,
    budget_bytes,
    estimate,
    fewest_checkpointed_blocks,
    largest_fitting_batch,
    least_memory_depth,
)
from .levers import choose_levers
from .memory import GIB, MemoryModel, image_tokens_for, padded
from .network import job_nodes, plan_network
from .offload import swap_bytes_per_micro_step
from .plan_choices import OPTIMIZER_LR, ema_decision, optimizer_decision, place_ema
from .request import PlanRefused, PlanRequest
from .tiers import Tier, load_tiers, nearest_tier, simulated_profile
from .training_plan import TrainingPlan, show_value

__all__ = [
    "PlanRefused",
    "PlanRequest",
    "TrainingPlan",
    "checkpoint_depth_for",
    "make_plan",
    "maximum_batch_size",
]

logger = logging.getLogger(__name__)
EIGHT_RANK_NCCL_TIMEOUT_S = 3600
RECOMPUTE_SHARE = 1 / 3  # a checkpointed block runs its forward twice: +1/3 of forward+backward
SMALL_BATCH_PENALTY = 0.3
EFFICIENT_TOKENS = 4096  # tokens per matmul from which an H100-class GPU is busy


class _Decisions(list):
    def add(self, name: str, value, reason: str):
        logger.info("plan: %s = %s (%s)", name, show_value(value, name), reason)
        self.append((name, value, reason))
        return value


# -------------------------------------------------------------------------------------------------------------
# public sizing functions


def maximum_batch_size(
    request: PlanRequest, profile: HardwareProfile, checkpoint_depth: int, memory_model: MemoryModel | None = None
) -> int:
    """Largest micro-batch that fits each GPU at ``checkpoint_depth`` (0 if none), with the request's settings."""
    memory_model = memory_model or MemoryModel(model=request.model)
    tier, _ = nearest_tier(profile)
    request = fit_request_to_dataset(request, _Decisions())
    setting = _setting(request, profile, tier, memory_model, _Decisions())
    budget = budget_bytes(profile, _margin(request, tier), memory_model)
    setting = choose_levers(request, profile, setting, memory_model, budget, _Decisions())
    return largest_fitting_batch(request, setting, checkpoint_depth, memory_model, budget)


def checkpoint_depth_for(
    request: PlanRequest, profile: HardwareProfile, micro_batch: int, memory_model: MemoryModel | None = None
) -> int | None:
    """Fewest main blocks (from the first) to checkpoint so ``micro_batch`` fits; None when nothing does."""
    memory_model = memory_model or MemoryModel(model=request.model)
    tier, _ = nearest_tier(profile)
    request = fit_request_to_dataset(request, _Decisions())
    setting = _setting(request, profile, tier, memory_model, _Decisions())
    budget = budget_bytes(profile, _margin(request, tier), memory_model)
    setting = choose_levers(request, profile, setting, memory_model, budget, _Decisions())
    return fewest_checkpointed_blocks(request, setting, micro_batch, memory_model, budget)


# -------------------------------------------------------------------------------------------------------------
# the plan


def make_plan(
    request: PlanRequest,
    profile: HardwareProfile,
    tier: Tier | None = None,
    memory_model: MemoryModel | None = None,
) -> TrainingPlan:
    """Decide everything, or raise ``PlanRefused`` listing the alternatives that would fit (and, for a full
    fine-tune, the smallest tier that trains it)."""
    try:
        return _make_plan(request, profile, tier, memory_model)
    except PlanRefused as refused:
        if request.mode != "full":
            raise
        model = memory_model or MemoryModel(model=request.model)
        state = sum(model.fixed_bytes("full", 1, "fsdp2", 0, optimizer=request.optimizer).values())
        why = (
            f"a full fine-tune keeps float32 weights, gradients and {request.optimizer} states ({state / GIB:.0f} GiB "
            "on one GPU before activations; no fused-backward optimizer step or per-layer offload exists yet)"
        )
        smallest = smallest_tier_for(request, memory_model)
        reason = f"{refused.reason}; {why}; {smallest}"
        raise PlanRefused(refused.request, reason, refused.alternatives, refused.budget_bytes) from None


def smallest_tier_for(request: PlanRequest, memory_model: MemoryModel | None = None) -> str:
    """A sentence naming the tier with the least GPU memory in all on which ``request`` plans, or saying none does."""
    tiers = sorted(load_tiers().values(), key=lambda t: (t.nodes * t.gpu_count * t.gpu_memory_mib, t.gpu_count))
    for candidate in tiers:
        if not candidate.gpu_count:
            continue
        try:
            plan = _make_plan(
                dataclasses.replace(request, world_size=None), simulated_profile(candidate), candidate, memory_model
            )
        except PlanRefused:
            continue
        return (
            f"the smallest tier that trains it is {candidate.name} ({candidate.nodes * candidate.gpu_count} x "
            f"{candidate.gpu_memory_bytes / GIB:.0f} GiB, {plan.parallelism}, predicted peak "
            f"{plan.predicted_peak_bytes / GIB:.1f} GiB per GPU)"
        )
    return "no tier trains it"


def _make_plan(
    request: PlanRequest, profile: HardwareProfile, tier: Tier | None, memory_model: MemoryModel | None
) -> TrainingPlan:
    memory_model = memory_model or MemoryModel(model=request.model)
    if request.ema == "auto":
        return _place_ema(request, profile, tier, memory_model)
    decisions = _Decisions()
    tier = _tier(request, profile, tier, decisions)
    request = fit_request_to_dataset(request, decisions)
    setting = _setting(request, profile, tier, memory_model, decisions)
    margin = _margin(request, tier)
    budget = decisions.add("budget_bytes", budget_bytes(profile, margin, memory_model), _budget_reason(profile, margin))
    request, source = _with_global_target(request, tier)
    setting = choose_levers(request, profile, setting, memory_model, budget, decisions)
    micro, depth = _size(request, profile, setting, memory_model, budget, decisions)
    accum = decisions.add(
        "grad_accum",
        request.target_micro_batch(setting.world_size) // micro,
        f"reach the global batch {request.target_global_batch} ({source})",
    )
    peak = estimate(request, setting, micro, depth, memory_model, grad_accum=accum)
    nodes = _nodes(request, tier, setting, accum, memory_model, decisions)
    return TrainingPlan(
        mode=request.mode,
        world_size=setting.world_size,
        micro_batch=micro,
        grad_accum=accum,
        global_batch=micro * accum * setting.world_size,
        checkpoint_depth=depth,
        precision=_precision(profile, decisions),
        parallelism=setting.parallelism,
        fsdp_cpu_offload=setting.cpu_offload,
        compile=setting.compiled,
        attention_backend=setting.attention_backend,
        nccl_timeout_s=_nccl_timeout(tier, setting.world_size, decisions),
        optimizer=optimizer_decision(request, decisions),
        ema=ema_decision(request, memory_model, decisions),
        lr=_lr(request, setting.world_size, decisions),
        lr_scaling=request.lr_scaling,
        predicted_peak_bytes=decisions.add("predicted_peak_bytes", peak.peak_bytes, peak.describe()),
        budget_bytes=budget,
        resolution=request.width_height,
        caption_tokens=request.caption_tokens,
        lora_rank=request.lora_rank,
        lora_targets=request.lora_targets,
        lora_dtype=_lora_dtype(request, memory_model, decisions),
        tier=tier.name,
        memory_breakdown=dict(peak.breakdown),
        decisions=list(decisions),
        caption_overflow=request.caption_overflow,
        buckets=tuple(sorted(request.dataset.buckets)) if request.dataset else (),
        device="cuda" if profile.gpus else "cpu",
        nodes=nodes,
        base_storage=setting.base_storage,
        swap_blocks=setting.swap_blocks,
        swap_bytes_per_step=accum * swap_bytes_per_micro_step(request.model, setting.base_storage, setting.swap_blocks),
        adapter=request.adapter,
    )


def _tier(request: PlanRequest, profile: HardwareProfile, tier: Tier | None, decisions) -> Tier:
    """The caller's tier, else the one nearest the machine; a mode the tier does not default to is noted."""
    if tier is None:
        tier, reason = nearest_tier(profile)
        decisions.add("tier", tier.name, reason)
    else:
        decisions.add("tier", tier.name, "chosen by the caller")
    if request.mode not in tier.modes_allowed:
        decisions.add("mode", request.mode, f"not a default of tier {tier.name} ({', '.join(tier.modes_allowed)})")
    return tier


def _with_global_target(request: PlanRequest, tier: Tier) -> tuple[PlanRequest, str]:
    """The request with its global batch set (the requested one, else the tier's default) and where it came from."""
    source = "requested" if request.target_global_batch else f"tier {tier.name} default"
    global_target = request.target_global_batch or tier.target_global_batch
    return dataclasses.replace(request, target_global_batch=global_target), source


def _nodes(request: PlanRequest, tier: Tier, setting: Setting, accum: int, memory_model: MemoryModel, decisions) -> int:
    """The machines the job spans (``network.plan_network``), its traffic priced on the trainable parameters."""
    trainable = memory_model.trainable_count(
        request.mode, request.lora_rank, request.lora_targets, request.trainable_params, request.adapter
    )
    return plan_network(request, tier, setting, accum, trainable, decisions)


def _size(request, profile, setting, memory_model, budget, decisions) -> tuple[int, int]:
    """(micro-batch, checkpoint depth): the largest divisor of the per-rank target that fits with the least-memory
    depth, then the fewest checkpointed blocks for it. Refuses when not even one sample fits."""
    target = request.target_micro_batch(setting.world_size)
    if request.micro_batch is not None:
        micro = decisions.add("micro_batch", request.micro_batch, "requested")
        target = max(target, micro)
    else:
        deepest = least_memory_depth(request, setting, memory_model)
        fitting = largest_fitting_batch(request, setting, deepest, memory_model, budget)
        if fitting == 0:
            _refuse(request, profile, setting, memory_model, budget, "one sample does not fit even with checkpointing")
        micro, why = _fastest_micro_batch(request, setting, memory_model, budget, target, fitting)
        decisions.add("micro_batch", micro, why)
    if request.checkpoint_depth is not None:
        depth = decisions.add("checkpoint_depth", request.checkpoint_depth, "requested")
        if estimate(request, setting, micro, depth, memory_model).peak_bytes > budget:
            _refuse(request, profile, setting, memory_model, budget, f"micro-batch {micro} at depth {depth} is over")
        return micro, depth
    depth = fewest_checkpointed_blocks(request, setting, micro, memory_model, budget)
    if depth is None:
        _refuse(request, profile, setting, memory_model, budget, f"micro-batch {micro} does not fit at any depth")
    reason = "no checkpointing needed" if depth == 0 else f"fewest of {request.model.n_layers} blocks that fit"
    decisions.add("checkpoint_depth", depth, reason)
    return micro, depth


def _fastest_micro_batch(request, setting, memory_model, budget, target: int, fitting: int) -> tuple[int, str]:
    """Among divisors of the per-rank target that fit (the global batch stays exact), the one with the least
    estimated time per sample: recomputing a checkpointed block costs ~1/3 of its forward+backward, and micro-batches
    under ``EFFICIENT_TOKENS`` tokens leave the GPU partly idle."""
    tokens = tokens_per_sample(request)
    layers = request.model.n_layers

    def cost(micro: int) -> float:
        depth = fewest_checkpointed_blocks(request, setting, micro, memory_model, budget)
        recompute = 1 + RECOMPUTE_SHARE * depth / layers
        return recompute * (1 + SMALL_BATCH_PENALTY * max(0.0, 1 - micro * tokens / EFFICIENT_TOKENS))

    candidates = [m for m in range(1, min(fitting, target) + 1) if target % m == 0]
    best = min(candidates, key=lambda m: (cost(m), -m))
    return best, (
        f"divisor of {target} samples per GPU with the least estimated time per sample "
        f"(up to {fitting} fit; checkpointing and small batches cost time)"
    )


def _refuse(request, profile, setting, memory_model, budget, reason: str):
    options = alternatives(request, profile, setting, memory_model, budget)
    logger.warning("plan refused: %s; %d alternatives fit", reason, len(options))
    raise PlanRefused(request, reason, options, budget)


def _setting(request, profile, tier, memory_model, decisions) -> Setting:
    gpus = profile.gpu_count
    per_node = request.world_size or max(1, gpus)
    if gpus and per_node > gpus:
        raise ValueError(f"PlanRequest.world_size {per_node} exceeds the {gpus} GPU(s) found; use at most {gpus}")
    nodes = job_nodes(request, profile, tier)
    found = f"{gpus} GPU(s) visible" if gpus else "no GPU: one CPU process"
    if nodes == 1:
        world = decisions.add("world_size", per_node, "requested" if request.world_size else found)
    else:
        source = "requested" if request.nodes else f"tier {tier.name}"
        decisions.add("nodes", nodes, f"{source}: every node runs the same plan; the run folder is shared")
        per_node_why = "requested" if request.world_size else (f"{gpus} GPU(s) per node" if gpus else found)
        world = decisions.add("world_size", per_node * nodes, f"{per_node_why} x {nodes} nodes")
    parallelism = _parallelism(request, profile, world, decisions)
    offload = decisions.add(
        "fsdp_cpu_offload", request.fsdp_cpu_offload, "requested" if request.fsdp_cpu_offload else "not needed"
    )
    return Setting(
        world_size=world,
        parallelism=parallelism,
        attention_backend=_attention_backend(request, profile, tier, decisions),
        compiled=_compile(request, profile, tier, decisions),
        cpu_offload=offload,
    )


def _parallelism(request, profile, world, decisions) -> str:
    """What the engine runs (``parallelize.resolve_strategy``): FSDP2 for full fine-tuning, also on one rank (its
    mixed-precision policy computes the fp32 master weights in bf16); DDP for LoRA/QLoRA on several ranks."""
    if request.mode == "full":
        why = "shard weights, gradients and AdamW states" if world > 1 else "fp32 master weights with bf16 compute"
        return decisions.add("parallelism", "fsdp2", f"full fine-tune: {why}")
    if world == 1:
        return decisions.add("parallelism", "none", "one GPU" if profile.gpus else "CPU")
    return decisions.add("parallelism", "ddp", "LoRA weights replicate; DDP with gradient bucket views")


def _attention_backend(request, profile, tier, decisions) -> str:
    if request.attention_backend:
        return decisions.add("attention_backend", request.attention_backend, "requested")
    if not profile.gpus:
        return decisions.add("attention_backend", "math", "CPU: SDPA math kernel")
    if profile.gpus[0].compute_capability < (8, 0):
        return decisions.add("attention_backend", "efficient", "flash attention needs compute capability >= 8.0")
    return decisions.add("attention_backend", tier.attention_backend, f"tier {tier.name} default")


def _compile(request, profile, tier, decisions) -> bool:
    if request.compile is not None:
        return decisions.add("compile", request.compile, "requested")
    if not profile.gpus:
        return decisions.add("compile", False, "CPU: compile time outweighs the gain")
    return decisions.add("compile", tier.compile, f"tier {tier.name} default")


def _margin(request: PlanRequest, tier: Tier) -> float:
    return tier.safety_margin if request.safety_margin is None else request.safety_margin


def _budget_reason(profile: HardwareProfile, margin: float) -> str:
    if not profile.gpus:
        return f"host RAM less {margin:.0%} safety margin"
    return (
        f"free {profile.min_free_bytes() / GIB:.1f} GiB on the fullest GPU, less the CUDA context, "
        f"less {margin:.0%} for fragmentation"
    )


def _precision(profile: HardwareProfile, decisions) -> str:
    if not profile.gpus:
        return decisions.add("precision", "fp32", "CPU: the engine computes in float32 (no bf16 autocast on CPU)")
    if profile.gpus[0].fp8:
        reason = (
            "bf16 weights and activations; this GPU has FP8 (cc >= 8.9): run.fp8 computes the frozen base in FP8 "
            "(1.28x at 512² on an H200, loss within 0.13% over 200 steps: docs/benchmarks.md), off by default"
        )
    else:
        reason = "bf16 weights and activations"
    return decisions.add("precision", "bf16", reason)


def _nccl_timeout(tier: Tier, world: int, decisions) -> int:
    if world >= 8 and tier.nccl_timeout_s < EIGHT_RANK_NCCL_TIMEOUT_S:
        return decisions.add("nccl_timeout_s", EIGHT_RANK_NCCL_TIMEOUT_S, "8+ ranks: checkpoint saves stall longer")
    return decisions.add("nccl_timeout_s", tier.nccl_timeout_s, f"tier {tier.name} default")


def _place_ema(request: PlanRequest, profile, tier, memory_model) -> TrainingPlan:
    return place_ema(request, lambda changed: make_plan(changed, profile, tier, memory_model), bool(profile.gpus))


def _lr(request: PlanRequest, world: int, decisions) -> float:
    if request.optimizer in OPTIMIZER_LR:
        own, reason = OPTIMIZER_LR[request.optimizer]
        return decisions.add("lr", own, f"{reason}; lr_base and {request.lr_scaling} scaling do not apply")
    factor = {"sqrt": math.sqrt(world), "linear": float(world), "none": 1.0}[request.lr_scaling]
    reason = f"lr_base {request.lr_base:g} x {factor:.3g} ({request.lr_scaling} of {world} data-parallel ranks)"
    return decisions.add("lr", request.lr_base * factor, reason)


def _lora_dtype(request: PlanRequest, memory_model: MemoryModel, decisions) -> str:
    if request.mode == "full":
        return decisions.add("lora_dtype", "none", "full fine-tune: fp32 master weights, bf16 compute")
    dtype = "fp32" if memory_model.lora_param_bytes == 4 else "bf16"
    return decisions.add("lora_dtype", dtype, "adapter weights and AdamW states (fused AdamW on CUDA)")


def tokens_per_sample(request: PlanRequest) -> int:
    return image_tokens_for(request.width_height, request.model) + padded(
        request.caption_tokens, request.model.seq_multiple
    )
