"""Optimiser (AdamW, fused on CUDA; 8-bit AdamW from bitsandbytes), LR schedule and gradient clipping."""

from __future__ import annotations

import logging
import math

import torch
from torch import nn
from torch.optim.lr_scheduler import LambdaLR

from .config import OptimSection

logger = logging.getLogger(__name__)


def trainable_parameters(model: nn.Module) -> list[nn.Parameter]:
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("the model has no trainable parameter; attach LoRA or use mode 'full'")
    return params


def build_optimizer(params: list[nn.Parameter], optim: OptimSection, *, device: torch.device) -> torch.optim.Optimizer:
    kwargs = dict(lr=optim.lr, betas=optim.betas, eps=optim.eps, weight_decay=optim.weight_decay)
    count = sum(p.numel() for p in params)
    if optim.optimizer == "adamw8bit":
        if any(_is_dtensor(p) for p in params):
            raise ValueError(
                "optim.optimizer 'adamw8bit' cannot step FSDP2-sharded (DTensor) parameters; "
                "use 'adamw' with mode 'full', or a LoRA/QLoRA mode"
            )
        try:
            import bitsandbytes as bnb
        except ImportError as error:
            raise ValueError(
                f"optim.optimizer 'adamw8bit' needs bitsandbytes ({error}); pip install bitsandbytes, or use 'adamw'"
            ) from error
        logger.info("optimizer: bitsandbytes AdamW8bit over %d parameters", count)
        return bnb.optim.AdamW8bit(params, **kwargs)
    fused = device.type == "cuda" and all(p.device.type == "cuda" for p in params)
    logger.info(
        "optimizer: torch AdamW over %d parameters, %s",
        count,
        "fused (parameters on CUDA)" if fused else "foreach (fused is used when every parameter is on CUDA)",
    )
    return torch.optim.AdamW(params, fused=fused, **kwargs) if fused else torch.optim.AdamW(params, **kwargs)


def lr_factor(step: int, *, warmup_steps: int, total_steps: int, schedule: str) -> float:
    """Multiplier of the base LR for optimizer step ``step`` (0-based): linear warmup, then constant or cosine to 0."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    if schedule == "constant":
        return 1.0
    if schedule == "cosine":
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
    raise ValueError(f"unknown LR schedule {schedule!r}; choose 'constant' or 'cosine'")


def build_scheduler(optimizer: torch.optim.Optimizer, optim: OptimSection, *, total_steps: int) -> LambdaLR:
    lr_factor(0, warmup_steps=optim.warmup_steps, total_steps=total_steps, schedule=optim.schedule)  # validates
    return LambdaLR(
        optimizer,
        lambda step: lr_factor(step, warmup_steps=optim.warmup_steps, total_steps=total_steps, schedule=optim.schedule),
    )


def clip_gradients(params: list[nn.Parameter], max_norm: float) -> torch.Tensor:
    """Clip to ``max_norm`` (0: measure only); returns the total norm before clipping as a plain local tensor.

    DDP grads are already averaged, so every rank computes the same norm; FSDP2 grads are DTensor shards, whose norm
    comes back as a DTensor and is reduced over ranks by ``full_tensor``.
    """
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        raise RuntimeError("no parameter has a gradient after backward; the trainable parameters are not in the graph")
    if max_norm > 0:
        norm = torch.nn.utils.clip_grad_norm_(params, max_norm, foreach=True)
    else:
        norm = torch.nn.utils.get_total_norm(grads, foreach=True)
    return norm.full_tensor() if _is_dtensor(norm) else norm


def _is_dtensor(tensor) -> bool:
    from torch.distributed.tensor import DTensor

    return isinstance(tensor, DTensor)
