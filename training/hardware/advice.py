"""What to change next when a plan runs out of memory: the planner's own ladder, used by the engine's OOM message.

The order is the planner's: more activation checkpointing (the planner picks the fewest blocks that fit), a smaller
micro-batch with the same global batch through accumulation, then what ``fitting.alternatives`` offers when nothing
fits: CPU offload for full fine-tuning (the only mode the engine shards), a lighter mode, a lower resolution."""

from __future__ import annotations

from typing import Any

from .fitting import LOWER_RESOLUTIONS

#: The lighter mode the planner offers for each mode (its base weights take less memory).
LIGHTER_MODE = {"lora": "qlora"}
SMALLEST_ADVISED_SIDE = 512


def next_plan(plan: dict[str, Any]) -> tuple[dict[str, Any] | None, str]:
    """The cheapest change that lowers peak memory, as (changed plan, 'set ...'), or (None, why nothing is left)."""
    depth, layers = int(plan.get("checkpoint_depth", 0)), int(plan.get("n_layers", 0))
    micro, accum = int(plan.get("micro_batch", 1)), int(plan.get("grad_accum", 1))
    if layers and depth < layers:
        deeper = min(layers, depth + max(2, layers // 4))
        return {**plan, "checkpoint_depth": deeper}, f"set run.checkpoint_depth {depth} -> {deeper}"
    if micro > 1:
        change = {"micro_batch": micro // 2, "grad_accum": accum * 2}
        reason = f"set run.micro_batch {micro} -> {micro // 2} and run.grad_accum {accum} -> {accum * 2}"
        return {**plan, **change}, reason
    if plan.get("mode") == "full" and not plan.get("fsdp_cpu_offload"):
        return {**plan, "fsdp_cpu_offload": True}, "set run.fsdp_cpu_offload true (or add GPUs)"
    lighter = LIGHTER_MODE.get(plan.get("mode"))
    if lighter:
        return {**plan, "mode": lighter}, f"switch to mode {lighter!r} (4-bit base weights)"
    side = _smallest_side(plan.get("resolution"))
    lower = next((s for s in LOWER_RESOLUTIONS if s < side and s >= SMALLEST_ADVISED_SIDE), None)
    if lower is not None:
        return {**plan, "resolution": lower}, f"train at {lower} px (pack the data at that resolution)"
    return None, "no smaller plan exists: use a GPU with more memory or more GPUs"


def next_plan_hint(plan: dict[str, Any]) -> str:
    changed, reason = next_plan(plan)
    return f"Next plan that should fit: {reason}." if changed is not None else f"{reason[0].upper()}{reason[1:]}."


def _smallest_side(resolution) -> int:
    if isinstance(resolution, (list, tuple)):
        return min(int(side) for side in resolution) if resolution else 0
    return int(resolution or 0)
