"""Optimisers (AdamW, fused on CUDA, the default of every mode; 8-bit AdamW from bitsandbytes; Prodigy from prodigyopt;
torch's Adafactor; schedule-free AdamW from schedulefree), LR schedule and gradient clipping."""

from __future__ import annotations

import contextlib
import importlib
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
    """The optimizer ``optim.optimizer`` names (the vocabulary is ``training.vocabulary.Optimizer``), in train mode."""
    count = sum(p.numel() for p in params)
    if optim.optimizer in ("prodigy", "adafactor", "schedulefree_adamw") and any(_is_dtensor(p) for p in params):
        raise ValueError(
            f"optim.optimizer {optim.optimizer!r} is not supported on FSDP2-sharded (DTensor) parameters (its "
            "per-tensor statistics would be per shard, and it is untested under FSDP2); use 'adamw' for mode 'full' "
            "on several GPUs, or train on one GPU"
        )
    builders = {
        "adamw": _adamw,
        "adamw8bit": _adamw8bit,
        "prodigy": _prodigy,
        "adafactor": _adafactor,
        "schedulefree_adamw": _schedulefree_adamw,
    }
    optimizer = builders[optim.optimizer](params, optim, device)
    logger.info("optimizer: %s over %d parameters", type(optimizer).__name__, count)
    if is_schedule_free(optimizer):
        # Train mode: the parameters hold the point gradients are taken at (see averaged_weights for saving). On a
        # fresh optimizer train() only sets this flag, but it would also leave an empty state per parameter, and
        # torch's get_state_dict (resume) then skips the zero-gradient step that creates the state to restore into.
        for group in optimizer.param_groups:
            group["train_mode"] = True
    return optimizer


def _adamw(params, optim: OptimSection, device: torch.device) -> torch.optim.Optimizer:
    kwargs = dict(lr=optim.lr, betas=optim.betas, eps=optim.eps, weight_decay=optim.weight_decay)
    fused = device.type == "cuda" and all(p.device.type == "cuda" for p in params)
    logger.info(
        "optimizer: torch AdamW, %s",
        "fused (parameters on CUDA)" if fused else "foreach (fused is used when every parameter is on CUDA)",
    )
    return torch.optim.AdamW(params, fused=fused, **kwargs) if fused else torch.optim.AdamW(params, **kwargs)


def _adamw8bit(params, optim: OptimSection, device: torch.device) -> torch.optim.Optimizer:
    if any(_is_dtensor(p) for p in params):
        raise ValueError(
            "optim.optimizer 'adamw8bit' cannot step FSDP2-sharded (DTensor) parameters; "
            "use 'adamw' with mode 'full', or a LoRA/QLoRA mode"
        )
    logger.warning(
        "optim.optimizer 'adamw8bit': 8-bit AdamW states are reported to degrade Z-Image-Base LoRAs "
        "(user report, ostris/ai-toolkit#696: quantised second moments lose the small updates Base needs); "
        "prefer 'adamw' (8 B/parameter) or 'adafactor' (factored, a fraction of a byte) when memory is short"
    )
    bnb = _optional("bitsandbytes", "bitsandbytes", "adamw8bit")
    return bnb.optim.AdamW8bit(params, lr=optim.lr, betas=optim.betas, eps=optim.eps, weight_decay=optim.weight_decay)


def _prodigy(params, optim: OptimSection, device: torch.device) -> torch.optim.Optimizer:
    prodigyopt = _optional("prodigyopt", "prodigyopt", "prodigy")
    if optim.lr < 0.1:
        logger.warning(
            "optim.optimizer 'prodigy' with optim.lr %g: Prodigy estimates the step size itself and lr multiplies "
            "it (1.0 is its usual value); a small lr makes it crawl",
            optim.lr,
        )
    optimizer = prodigyopt.Prodigy(
        params, lr=optim.lr, betas=optim.betas, eps=optim.eps, weight_decay=optim.weight_decay, fsdp_in_use=False
    )
    # Prodigy adds these two outputs (read by nothing) only once a step sees a gradient; the checkpoint restores into
    # the groups of a state initialised by a zero-gradient step, so they must exist from the start.
    for group in optimizer.param_groups:
        group.setdefault("d_denom", 0.0)
        group.setdefault("d_hat", group["d"])
    return optimizer


def _adafactor(params, optim: OptimSection, device: torch.device) -> torch.optim.Optimizer:
    """torch's own Adafactor (no new dependency): factored second moments, no first moment; betas and eps unused.
    Its step is relative: max(1e-3, RMS of the parameter) * min(lr, 1/sqrt(step)), so lr is a cap (1e-2 by default)."""
    logger.info(
        "optimizer: torch Adafactor (optim.betas and optim.eps do not apply: it keeps no first moment; its step is "
        "relative, max(1e-3, RMS of the parameter) x min(optim.lr, 1/sqrt(step)))"
    )
    if optim.lr < 1e-3:
        logger.warning(
            "optim.optimizer 'adafactor' with optim.lr %g: lr caps Adafactor's relative step (torch's default 1e-2); "
            "a zero-initialised LoRA B moves by about 1e-3 x lr per step, so a small lr barely trains",
            optim.lr,
        )
    return torch.optim.Adafactor(params, lr=optim.lr, weight_decay=optim.weight_decay)


def _schedulefree_adamw(params, optim: OptimSection, device: torch.device) -> torch.optim.Optimizer:
    schedulefree = _optional("schedulefree", "schedulefree", "schedulefree_adamw")
    # warmup is the LambdaLR's (build_scheduler), as for every optimizer: the optimizer's own stays off
    return schedulefree.AdamWScheduleFree(
        params, lr=optim.lr, betas=optim.betas, eps=optim.eps, weight_decay=optim.weight_decay, warmup_steps=0
    )


def _optional(module: str, package: str, choice: str):
    try:
        return importlib.import_module(module)
    except ImportError as error:
        raise ValueError(
            f"optim.optimizer {choice!r} needs the optional package {package} ({error}); "
            f"pip install {package}, or use 'adamw'"
        ) from error


def is_schedule_free(optimizer: torch.optim.Optimizer) -> bool:
    """Schedule-free optimizers keep train/eval modes: train holds the gradient point y, eval the average x."""
    return "train_mode" in optimizer.param_groups[0] and callable(getattr(optimizer, "eval", None))


@contextlib.contextmanager
def averaged_weights(optimizer: torch.optim.Optimizer, params: list[nn.Parameter]):
    """Inside: the parameters hold the weights to save. For a schedule-free optimizer that is its eval-mode average x;
    after, the train-mode weights are put back bit for bit (eval then train is not exact in floating point, and
    exact resume needs the same y a run that never saved has)."""
    if not is_schedule_free(optimizer):
        yield
        return
    kept = [p.detach().clone() for p in params]
    optimizer.eval()
    try:
        yield
    finally:
        optimizer.train()
        with torch.no_grad():
            for param, value in zip(params, kept, strict=True):
                param.copy_(value)


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
