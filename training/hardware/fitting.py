"""What fits: the memory budget, the largest micro-batch, the fewest checkpointed blocks, and the alternatives
offered when nothing fits. Pure functions over a ``PlanRequest`` and a ``HardwareProfile``."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from .discovery import HardwareProfile
from .memory import GIB, MemoryEstimate, MemoryModel, image_tokens_for, padded
from .request import PlanRequest

MAX_MICRO_BATCH = 1024
LOWER_RESOLUTIONS = (1024, 768, 512, 384, 256)
HOST_RAM_USABLE = 0.8  # share of host RAM that CPU-offloaded state may take


@dataclass(kw_only=True, frozen=True)
class Setting:
    """Everything besides the request that decides memory: where and how the step runs."""

    world_size: int
    parallelism: str
    attention_backend: str
    compiled: bool
    cpu_offload: bool = False
    base_storage: str = "bf16"  # adapter modes: "fp8" stores the frozen block linears in e4m3 (``levers``)
    swap_blocks: int = 0  # main blocks streamed from pinned host memory (block swap); they are checkpointed


@dataclass(kw_only=True, frozen=True)
class Alternative:
    """A configuration that would fit when the requested one does not."""

    description: str
    changes: dict
    micro_batch: int
    checkpoint_depth: int
    predicted_peak_bytes: int
    budget_bytes: int

    def line(self) -> str:
        return (
            f"{self.description}: micro-batch {self.micro_batch}, checkpoint depth {self.checkpoint_depth}, "
            f"predicted peak {self.predicted_peak_bytes / GIB:.1f} of {self.budget_bytes / GIB:.1f} GiB"
        )


def budget_bytes(profile: HardwareProfile, safety_margin: float, memory_model: MemoryModel) -> int:
    """Bytes ``max_memory_allocated`` may reach on the fullest GPU: free memory less the CUDA context, less a
    safety margin for allocator fragmentation. CPU: host RAM less the margin."""
    if not profile.gpus:
        return int(profile.ram_bytes * (1 - safety_margin))
    usable = max(0, profile.min_free_bytes() - memory_model.cuda_context_bytes)
    return int(usable * (1 - safety_margin))


def estimate(
    request: PlanRequest,
    setting: Setting,
    micro_batch: int,
    checkpoint_depth: int,
    memory_model: MemoryModel,
    grad_accum: int | None = None,
) -> MemoryEstimate:
    """Predicted peak of one rank; ``grad_accum`` defaults to what reaching the request's micro target needs."""
    if grad_accum is None:
        target = request.target_micro_batch(setting.world_size)
        grad_accum = max(1, -(-target // micro_batch)) if target else 1
    return memory_model.predict_peak(
        request.mode,
        micro_batch,
        image_tokens_for(request.width_height, request.model),
        padded(request.caption_tokens, request.model.seq_multiple),
        checkpoint_depth,
        setting.world_size,
        request.lora_rank,
        lora_targets=request.lora_targets,
        parallelism=setting.parallelism,
        grad_accum=grad_accum,
        cpu_offload=setting.cpu_offload,
        compiled=setting.compiled,
        attention_backend=setting.attention_backend,
        trainable_params=request.trainable_params,
        optimizer=request.optimizer,
        base_storage=setting.base_storage,
        swap_blocks=setting.swap_blocks,
        adapter=request.adapter,
        ema_on_device=request.ema == "device",
    )


def least_memory_depth(request: PlanRequest, setting: Setting, memory_model: MemoryModel) -> int:
    """The depth with the lowest peak (checkpointing the very last block saves nothing: its recompute follows
    its forward at once). Swapped blocks are always checkpointed: the depth starts at their count."""
    depths = range(setting.swap_blocks, request.model.n_layers + 1)
    return min(depths, key=lambda d: (estimate(request, setting, 1, d, memory_model).peak_bytes, -d))


def fits(request, setting, micro_batch, depth, memory_model, budget) -> bool:
    return estimate(request, setting, micro_batch, depth, memory_model).peak_bytes <= budget


def largest_fitting_batch(request, setting, depth, memory_model, budget) -> int:
    """Largest micro-batch whose peak fits ``budget`` at ``depth``; 0 if not even one sample fits."""
    if not fits(request, setting, 1, depth, memory_model, budget):
        return 0
    low, high = 1, 2
    while high <= MAX_MICRO_BATCH and fits(request, setting, high, depth, memory_model, budget):
        low, high = high, high * 2
    high = min(high, MAX_MICRO_BATCH + 1)
    while high - low > 1:
        middle = (low + high) // 2
        low, high = (middle, high) if fits(request, setting, middle, depth, memory_model, budget) else (low, middle)
    return low


def fewest_checkpointed_blocks(request, setting, micro_batch, memory_model, budget) -> int | None:
    """Fewest main blocks, counted from the first, to checkpoint so ``micro_batch`` fits; None if none does (at
    least the swapped blocks, which are the first ones)."""
    for depth in range(setting.swap_blocks, request.model.n_layers + 1):
        if fits(request, setting, micro_batch, depth, memory_model, budget):
            return depth
    return None


def best_fit(request, setting, memory_model, budget) -> tuple[int, MemoryEstimate] | None:
    """(depth, estimate) for micro-batch 1 at the fewest checkpointed blocks that fit, else None."""
    depth = fewest_checkpointed_blocks(request, setting, 1, memory_model, budget)
    if depth is None:
        return None
    return depth, estimate(request, setting, 1, depth, memory_model)


def alternatives(
    request: PlanRequest, profile: HardwareProfile, setting: Setting, memory_model: MemoryModel, budget: int
) -> list[Alternative]:
    """Configurations that would fit and that the engine runs: a lighter mode, a lower resolution, and for full
    fine-tuning FSDP2 over more GPUs or CPU offload (the engine shards only full fine-tuning)."""
    found: list[Alternative] = []
    for mode in ("qlora", "lora"):
        if mode != request.mode:
            other = dataclasses.replace(request, mode=mode, fsdp_cpu_offload=False, base_storage=None, swap_blocks=None)
            lighter = _with_levers(other, profile, _lora_setting(setting), memory_model, budget)
            _add(found, f"mode {mode}{_lever_words(lighter)}", {"mode": mode}, other, lighter, memory_model, budget)
    if request.mode == "full":
        _add_sharding(found, request, profile, setting, memory_model, budget)
    for side in LOWER_RESOLUTIONS:
        if side < min(request.width_height):
            lower = dataclasses.replace(request, resolution=side)
            if _add(found, f"resolution {side}px", {"resolution": side}, lower, setting, memory_model, budget):
                break
    return found


def _add_sharding(found, request, profile, setting, memory_model, budget) -> None:
    gpus_needed = _gpus_for_fsdp(request, setting, memory_model, budget)
    if gpus_needed:
        sharded = dataclasses.replace(setting, world_size=gpus_needed, parallelism="fsdp2")
        changes = {"world_size": gpus_needed, "parallelism": "fsdp2"}
        _add(found, f"FSDP2 across {gpus_needed} GPUs like these", changes, request, sharded, memory_model, budget)
    offload = dataclasses.replace(setting, parallelism="fsdp2", cpu_offload=True)
    host_bytes = _offloaded_host_bytes(request, offload, memory_model)
    if host_bytes <= profile.ram_bytes * HOST_RAM_USABLE:
        description = f"FSDP2 CPU offload (needs ~{host_bytes / GIB:.0f} GiB host RAM)"
        _add(found, description, {"fsdp_cpu_offload": True}, request, offload, memory_model, budget)


def _add(found, description, changes, request, setting, memory_model, budget) -> bool:
    fit = best_fit(request, setting, memory_model, budget)
    if fit is None:
        return False
    depth, peak = fit
    found.append(
        Alternative(
            description=description,
            changes=changes,
            micro_batch=1,
            checkpoint_depth=depth,
            predicted_peak_bytes=peak.peak_bytes,
            budget_bytes=budget,
        )
    )
    return True


class _Unlogged(list):
    def add(self, name, value, reason):
        self.append((name, value, reason))
        return value


def _with_levers(request, profile, setting, memory_model, budget) -> Setting:
    """Mode lora's setting with the small-card levers the plan would choose (``levers``); others unchanged."""
    from .levers import choose_levers

    return choose_levers(request, profile, setting, memory_model, budget, _Unlogged())


def _lever_words(setting: Setting) -> str:
    words = ["FP8 base"] if setting.base_storage == "fp8" else []
    words += [f"{setting.swap_blocks} blocks swapped"] if setting.swap_blocks else []
    return f" ({', '.join(words)})" if words else ""


def _lora_setting(setting: Setting) -> Setting:
    parallelism = "ddp" if setting.world_size > 1 else "none"
    return dataclasses.replace(setting, parallelism=parallelism, cpu_offload=False, base_storage="bf16", swap_blocks=0)


def _gpus_for_fsdp(request, setting, memory_model, budget, most: int = 64) -> int | None:
    for world_size in range(max(2, setting.world_size + 1), most + 1):
        sharded = dataclasses.replace(setting, world_size=world_size, parallelism="fsdp2")
        if best_fit(request, sharded, memory_model, budget) is not None:
            return world_size
    return None


def _offloaded_host_bytes(request: PlanRequest, setting: Setting, memory_model: MemoryModel) -> int:
    """Host bytes of the state that CPU offload moves off the GPUs (all ranks of the machine together)."""
    on_gpu = dataclasses.replace(setting, cpu_offload=False, world_size=1, parallelism="none")
    fixed = memory_model.fixed_bytes(
        request.mode,
        1,
        on_gpu.parallelism,
        request.lora_rank,
        lora_targets=request.lora_targets,
        trainable_params=request.trainable_params,
        optimizer=request.optimizer,
        adapter=request.adapter,
    )
    if request.mode == "full":
        return fixed["trainable"] + fixed["grads"] + fixed["optimizer"]
    return fixed["weights"]
