"""QLoRA's base: every ``nn.Linear`` of the transformer blocks becomes a bitsandbytes NF4 ``Linear4bit`` with double
quantisation. Done before LoRA is attached (peft wraps 4-bit layers), one layer at a time so the bf16 copy of the
weights is freed as it goes. Embedders and the final layer (0.2 % of the weights) stay in the model dtype."""

from __future__ import annotations

import importlib.util
import logging

import torch
from torch import nn

logger = logging.getLogger(__name__)

QUANT_TYPE = "nf4"


def qlora_unavailable() -> str | None:
    """Why mode 'qlora' cannot run in this Python (bitsandbytes is not installed), or None; found without importing it."""
    if importlib.util.find_spec("bitsandbytes") is None:
        return (
            "mode 'qlora' needs bitsandbytes, which is not installed in this Python: pip install bitsandbytes "
            "(with ComfyUI's python in ComfyUI), or use mode 'lora'"
        )
    return None


def _bnb():
    try:
        import bitsandbytes as bnb
    except ImportError as error:
        raise ValueError(
            f"mode 'qlora' needs bitsandbytes ({error}); pip install bitsandbytes, or use mode 'lora'"
        ) from error
    return bnb


def to_nf4(linear: nn.Linear, *, compute_dtype: torch.dtype) -> nn.Module:
    """An NF4 ``Linear4bit`` (double quantisation) holding ``linear``'s weight, on ``linear``'s device."""
    bnb = _bnb()
    device = linear.weight.device
    layer = bnb.nn.Linear4bit(
        linear.in_features,
        linear.out_features,
        bias=linear.bias is not None,
        compute_dtype=compute_dtype,
        compress_statistics=True,
        quant_type=QUANT_TYPE,
        device="meta",
    )
    weight = linear.weight.detach()
    layer.weight = bnb.nn.Params4bit(
        weight, requires_grad=False, compress_statistics=True, quant_type=QUANT_TYPE, module=layer
    ).to(device)  # .to() on a not-yet-quantised Params4bit quantises it
    if linear.bias is not None:
        layer.bias = nn.Parameter(linear.bias.detach(), requires_grad=False)
    return layer


def quantize_blocks(model: nn.Module, blocks: list[nn.Module], *, compute_dtype: torch.dtype) -> int:
    """Replace every ``nn.Linear`` inside ``blocks`` by its NF4 version in place; returns how many were replaced."""
    count, before, after = 0, 0, 0
    for block in blocks:
        for name, module in list(block.named_modules()):
            if type(module) is not nn.Linear:
                continue
            parent_name, _, child = name.rpartition(".")
            parent = block.get_submodule(parent_name)
            before += module.weight.numel() * module.weight.element_size()
            quantized = to_nf4(module, compute_dtype=compute_dtype)
            after += quantized_bytes(quantized)
            setattr(parent, child, quantized)
            del module
            count += 1
    if count == 0:
        raise ValueError("found no nn.Linear to quantise in the transformer blocks (already quantised?)")
    logger.info(
        "QLoRA: %d block linears → NF4 with double quantisation: %.2f GiB → %.2f GiB (compute dtype %s)",
        count,
        before / 2**30,
        after / 2**30,
        compute_dtype,
    )
    return count


def quantized_bytes(layer: nn.Module) -> int:
    """Bytes of a Linear4bit's packed weight plus its quantisation statistics."""
    weight = layer.weight
    total = weight.numel() * weight.element_size()
    state = weight.quant_state
    total += state.absmax.numel() * state.absmax.element_size()
    if state.nested:
        total += state.state2.absmax.numel() * state.state2.absmax.element_size()
    return total


def nf4_layers(model: nn.Module) -> dict[str, nn.Module]:
    """Name → every bitsandbytes 4-bit linear of ``model`` (for checks and tests)."""
    bnb = _bnb()
    return {name: m for name, m in model.named_modules() if isinstance(m, bnb.nn.Linear4bit)}
