"""Measure the per-token activation coefficients on the device: one main block, at the target token count.

The block is run exactly as the engine runs it: the peft-wrapped (for QLoRA: NF4) main block of the engine-built
model, forward under ``torch.autocast("cuda", torch.bfloat16)`` with peft's LoRA input cast off (``Trainer.build``
turns it off), backward outside autocast. It runs forward and backward twice, plain and checkpointed, reading
``torch.cuda.memory_allocated`` / ``max_memory_allocated`` around each. Takes seconds. Feed the result to
``MemoryModel.calibrated_from_probe``.
"""

from __future__ import annotations

import contextlib
import logging

import torch
from torch.utils.checkpoint import checkpoint

from ..model.config import ZImageConfig
from ..model.lora import lora_layers
from .activations import ActivationCoefficients, analytic_coefficients

logger = logging.getLogger(__name__)

CHECKPOINT_WRAPPED = "_checkpoint_wrapped_module"  # torch's checkpoint_wrapper, as training.engine.parallelize uses


def probe_coefficients(
    block: torch.nn.Module,
    config: ZImageConfig,
    *,
    micro_batch: int,
    tokens_per_sample: int,
    mode: str,
    lora_rank: int,
    device: torch.device | str = "cuda",
    autocast_dtype: torch.dtype | None = torch.bfloat16,
    lora_input_cast: bool | None = False,
) -> ActivationCoefficients:
    """Measured bytes per token of ``block`` (a main, modulated block) at ``micro_batch`` x ``tokens_per_sample``.

    ``autocast_dtype``: the forward's autocast dtype (None: no autocast). ``lora_input_cast``: peft's cast of each
    LoRA input to the adapter dtype during the probe (None: leave the block as it is); the engine's defaults are
    bf16 autocast and no cast. A checkpoint-wrapped block is unwrapped. ``shared`` stays analytic (RoPE tables and
    embeddings are not part of a block)."""
    device = torch.device(device)
    if device.type != "cuda":
        raise ValueError(f"the memory probe needs a CUDA device, got {device}; plan with analytic coefficients")
    block = getattr(block, CHECKPOINT_WRAPPED, block)
    tokens = micro_batch * tokens_per_sample
    inputs = _inputs(config, micro_batch, tokens_per_sample, device)
    with _lora_input_cast(block, lora_input_cast):
        _run(block, inputs, checkpointed=False, autocast_dtype=autocast_dtype)  # warm-up: workspaces, kernels
        saved, forward_extra, backward_extra = _run(block, inputs, checkpointed=False, autocast_dtype=autocast_dtype)
        checkpointed, _, _ = _run(block, inputs, checkpointed=True, autocast_dtype=autocast_dtype)
    # The checkpoint keeps a reference to its input, which the probe made beforehand; in the model that input is the
    # previous block's output, alive only because the checkpoint holds it.
    checkpointed += inputs["x"].numel() * inputs["x"].element_size()
    input_fp32 = bool(lora_input_cast) and mode != "full"
    analytic = analytic_coefficients(config, mode, lora_rank, lora_input_fp32=input_fp32)
    autocast = f"{autocast_dtype} autocast".replace("torch.", "") if autocast_dtype else "no autocast"
    result = ActivationCoefficients(
        block=saved / tokens,
        checkpointed=checkpointed / tokens,
        backward_extra=backward_extra / tokens,
        forward_extra=forward_extra / tokens,
        shared=analytic.shared,
        source=f"probe {mode} r{lora_rank} at {tokens} tokens, {autocast}",
    )
    logger.info(
        "probe: block %.0f B/token (analytic %.0f), checkpointed %.0f (%.0f), backward extra %.0f (%.0f), "
        "forward extra %.0f (%.0f)",
        result.block,
        analytic.block,
        result.checkpointed,
        analytic.checkpointed,
        result.backward_extra,
        analytic.backward_extra,
        result.forward_extra,
        analytic.forward_extra,
    )
    return result


@contextlib.contextmanager
def _lora_input_cast(block: torch.nn.Module, enabled: bool | None):
    """Set peft's ``cast_input_dtype_enabled`` on every LoRA layer of ``block`` for the probe, then restore it."""
    layers = list(lora_layers(block).values()) if enabled is not None else []
    before = [layer.cast_input_dtype_enabled for layer in layers]
    for layer in layers:
        layer.cast_input_dtype_enabled = enabled
    try:
        yield
    finally:
        for layer, value in zip(layers, before, strict=True):
            layer.cast_input_dtype_enabled = value


def _inputs(config: ZImageConfig, micro_batch: int, tokens: int, device: torch.device) -> dict:
    """The main blocks' inputs as the engine makes them: a bf16 residual stream (the embedders run under autocast),
    float32 RoPE tables [B, S, 1, head_dim / 2] and a bf16 adaLN input."""
    dtype = torch.bfloat16
    x = torch.randn(micro_batch, tokens, config.dim, device=device, dtype=dtype, requires_grad=True)
    angles = torch.rand(micro_batch, tokens, 1, config.head_dim // 2, device=device) * 6.28
    adaln = torch.randn(micro_batch, config.modulation_dim, device=device, dtype=dtype)
    return {"x": x, "rope": (angles.cos(), angles.sin()), "adaln": adaln}


def _forward(block: torch.nn.Module, inputs: dict, checkpointed: bool, autocast_dtype: torch.dtype | None):
    x, rope, adaln = inputs["x"], inputs["rope"], inputs["adaln"]
    autocast = torch.autocast("cuda", dtype=autocast_dtype) if autocast_dtype else contextlib.nullcontext()
    with autocast:
        if checkpointed:
            return checkpoint(block, x, rope, None, adaln, use_reentrant=False)
        return block(x, rope, None, adaln)


def _run(block: torch.nn.Module, inputs: dict, checkpointed: bool, autocast_dtype) -> tuple[int, int, int]:
    """(bytes kept after the forward, forward temporaries, backward work beyond what existed before it)."""
    x = inputs["x"]
    x.grad = None
    trainable = [p for p in block.parameters() if p.requires_grad]
    for param in trainable:
        param.grad = None
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    out = _forward(block, inputs, checkpointed, autocast_dtype)
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
