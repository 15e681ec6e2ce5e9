"""Measure the per-token activation coefficients on the device: one main block, at the target token count.

Runs the block (with whatever adapters or quantisation the run uses) forward and backward twice, plain and
checkpointed, reading ``torch.cuda.memory_allocated`` / ``max_memory_allocated`` around each. Takes seconds.
Feed the result to ``MemoryModel.calibrated_from_probe``.
"""

from __future__ import annotations

import logging

import torch
from torch.utils.checkpoint import checkpoint

from ..model.config import ZImageConfig
from .memory import ActivationCoefficients, analytic_coefficients

logger = logging.getLogger(__name__)


def probe_coefficients(
    block: torch.nn.Module,
    config: ZImageConfig,
    *,
    micro_batch: int,
    tokens_per_sample: int,
    mode: str,
    lora_rank: int,
    device: torch.device | str = "cuda",
) -> ActivationCoefficients:
    """Measured bytes per token of ``block`` (a main, modulated block) at ``micro_batch`` x ``tokens_per_sample``.
    ``shared`` stays analytic (RoPE tables and embeddings are not part of a block)."""
    device = torch.device(device)
    if device.type != "cuda":
        raise ValueError(f"the memory probe needs a CUDA device, got {device}; plan with analytic coefficients")
    tokens = micro_batch * tokens_per_sample
    inputs = _inputs(config, micro_batch, tokens_per_sample, device)
    _run(block, inputs, checkpointed=False)  # warm-up: cuBLAS workspaces and kernels load once
    saved, forward_extra, backward_extra = _run(block, inputs, checkpointed=False)
    checkpointed, _, _ = _run(block, inputs, checkpointed=True)
    analytic = analytic_coefficients(config, mode, lora_rank)
    result = ActivationCoefficients(
        block=saved / tokens,
        checkpointed=checkpointed / tokens,
        backward_extra=backward_extra / tokens,
        forward_extra=forward_extra / tokens,
        shared=analytic.shared,
        source=f"probe {mode} r{lora_rank} at {tokens} tokens",
    )
    logger.info(
        "probe: block %.0f B/token (analytic %.0f), checkpointed %.0f, backward extra %.0f, forward extra %.0f",
        result.block,
        analytic.block,
        result.checkpointed,
        result.backward_extra,
        result.forward_extra,
    )
    return result


def _inputs(config: ZImageConfig, micro_batch: int, tokens: int, device: torch.device) -> dict:
    dtype = torch.bfloat16
    x = torch.randn(micro_batch, tokens, config.dim, device=device, dtype=dtype, requires_grad=True)
    angles = torch.rand(micro_batch, tokens, 1, config.head_dim // 2, device=device) * 6.28
    adaln = torch.randn(micro_batch, config.modulation_dim, device=device, dtype=dtype)
    return {"x": x, "rope": (angles.cos(), angles.sin()), "adaln": adaln}


def _run(block: torch.nn.Module, inputs: dict, checkpointed: bool) -> tuple[int, int, int]:
    """(bytes kept after the forward, forward temporaries, backward work beyond what existed before it)."""
    x, rope, adaln = inputs["x"], inputs["rope"], inputs["adaln"]
    x.grad = None
    trainable = [p for p in block.parameters() if p.requires_grad]
    for param in trainable:
        param.grad = None
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    if checkpointed:
        out = checkpoint(block, x, rope, None, adaln, use_reentrant=False)
    else:
        out = block(x, rope, None, adaln)
    torch.cuda.synchronize()
    after = torch.cuda.memory_allocated()
    forward_extra = torch.cuda.max_memory_allocated() - after
    kept = after - before - out.numel() * out.element_size()
    grad_out = torch.randn_like(out)
    torch.cuda.synchronize()
    start = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    out.backward(grad_out)
    torch.cuda.synchronize()
    grads = sum(p.grad.numel() * p.grad.element_size() for p in trainable if p.grad is not None)
    backward_extra = torch.cuda.max_memory_allocated() - start - grads
    del out, grad_out
    x.grad = None
    for param in trainable:
        param.grad = None
    return kept, forward_extra, max(0, backward_extra)
