"""The plan's optimizer and EMA decisions (``plan.make_plan`` records them): the optimizer with its stated default
per mode and the learning rate an optimizer sets itself, and where the EMA of the trained weights lives."""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable
from typing import TYPE_CHECKING

from ..vocabulary import DEFAULT_OPTIMIZER
from .memory import GIB, MemoryModel
from .request import PlanRefused, PlanRequest

if TYPE_CHECKING:
    from .training_plan import TrainingPlan

logger = logging.getLogger("training.hardware.plan")

#: Optimizers whose lr is not a step size the data-parallel scaling applies to: Prodigy estimates the step itself
#: (lr multiplies it, 1.0 its authors' value); Adafactor's step is relative to each parameter's RMS and lr caps it
#: (torch's default 1e-2). The plan uses these and says so.
OPTIMIZER_LR: dict[str, tuple[float, str]] = {
    "prodigy": (1.0, "Prodigy estimates its own step size; lr multiplies it (1.0, its authors' value)"),
    "adafactor": (1e-2, "Adafactor's step is relative to each weight's RMS; lr caps it (1e-2, torch's default)"),
}


def place_ema(request: PlanRequest, make: Callable[[PlanRequest], TrainingPlan], on_gpu: bool) -> TrainingPlan:
    """ema 'auto': on the GPU when training keeps its micro-batch and checkpoint depth with it there (no copy per
    step), else in host RAM. ``make`` plans a request (``make_plan`` on this machine and tier)."""
    host = make(dataclasses.replace(request, ema="cpu"))
    if request.fsdp_cpu_offload:
        return _with_reason(host, "ema", "auto: the offloaded weights are in host RAM, and so is their EMA")
    try:
        on_device = make(dataclasses.replace(request, ema="device"))
    except PlanRefused:
        on_device = None
    if on_device is not None and (on_device.micro_batch, on_device.checkpoint_depth) == (
        host.micro_batch,
        host.checkpoint_depth,
    ):
        where = "the GPU" if on_gpu else "the training process's memory"
        return _with_reason(on_device, "ema", f"auto: fits on {where} without changing the batch or checkpointing")
    return _with_reason(
        host, "ema", "auto: on the GPU it would cost batch or checkpointing; kept in host RAM (copied each step)"
    )


def _with_reason(plan: TrainingPlan, name: str, reason: str) -> TrainingPlan:
    logger.info("plan: %s = %s (%s)", name, getattr(plan, name), reason)
    plan.decisions = [(n, v, reason if n == name else r) for n, v, r in plan.decisions]
    return plan


def ema_decision(request: PlanRequest, memory_model: MemoryModel, decisions) -> str:
    if request.ema == "off":
        return decisions.add("ema", "off", "not requested")
    count = memory_model.trainable_count(
        request.mode, request.lora_rank, request.lora_targets, request.trainable_params
    )
    size = f"{count * 4 / GIB:.2f} GiB of float32 for {count:,} trained weights"
    if request.ema == "cpu":
        return decisions.add("ema", "cpu", f"requested in host RAM: {size}, not in the GPU estimate")
    return decisions.add("ema", "device", f"requested on the training device: {size}, in the estimate")


def optimizer_decision(request: PlanRequest, decisions) -> str:
    default = DEFAULT_OPTIMIZER[request.mode]
    if request.optimizer == default:
        reason = f"the default of mode {request.mode} (the optimizer the tiers were measured with)"
    else:
        reason = f"requested (mode {request.mode} defaults to {default})"
    return decisions.add("optimizer", request.optimizer, f"{reason}; its state is in the memory estimate")
