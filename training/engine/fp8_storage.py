"""The frozen base of adapter training stored in FP8: a memory lever, where ``fp8_frozen`` is a speed lever.

`Fp8StoredLinear` keeps one e4m3 copy of the frozen weight W [out, in] with a float32 scale per output row (1 byte
per weight plus 4 per row, half of bf16) and upcasts it to the compute dtype when it runs, forward and backward: the
upcast weight is a temporary of one layer, never saved for the backward (the backward upcasts again). The matmuls run
in the compute dtype, so this works on any GPU and on the CPU; ``fp8_frozen``'s FP8 matmuls keep two e4m3 copies
(as many bytes as bf16) and need compute capability 8.9.
"""

from __future__ import annotations

import logging

import torch
from torch import nn

from .fp8_frozen import quantize_rows

logger = logging.getLogger(__name__)


def dequantize(weight_fp8: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return (weight_fp8.to(torch.float32) * scale).to(dtype)


class _StoredMatmul(torch.autograd.Function):
    """``x @ W.T`` with W upcast from e4m3 here and again in the backward; only the e4m3 tensors are saved."""

    @staticmethod
    def forward(ctx, x, weight_fp8, scale):
        ctx.save_for_backward(weight_fp8, scale)
        return x @ dequantize(weight_fp8, scale, x.dtype).t()

    @staticmethod
    def backward(ctx, grad_out):
        weight_fp8, scale = ctx.saved_tensors
        return grad_out @ dequantize(weight_fp8, scale, grad_out.dtype), None, None


class Fp8StoredLinear(nn.Module):
    """A frozen ``nn.Linear`` whose weight is stored in e4m3 with per-row scales (see the module docstring)."""

    def __init__(self, linear: nn.Linear, *, compute_dtype: torch.dtype) -> None:
        super().__init__()
        if linear.weight.requires_grad:
            raise ValueError("Fp8StoredLinear is for frozen weights; this layer's weight requires grad")
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.compute_dtype = compute_dtype
        weight_fp8, scale = quantize_rows(linear.weight.detach())
        # not persistent: the frozen base is never saved from here (LoRA files and checkpoints hold the adapters)
        self.register_buffer("weight_fp8", weight_fp8, persistent=False)
        self.register_buffer("weight_scale", scale, persistent=False)
        bias = None if linear.bias is None else linear.bias.detach().to(compute_dtype)
        self.register_buffer("bias", bias, persistent=False)

    @property
    def weight(self) -> torch.Tensor:
        """The upcast weight (for code that inspects ``.weight``: shapes, dtype); not used by ``forward``."""
        return dequantize(self.weight_fp8, self.weight_scale, self.compute_dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = torch.get_autocast_dtype(x.device.type) if torch.is_autocast_enabled(x.device.type) else x.dtype
        with torch.autocast(x.device.type, enabled=False):
            out = _StoredMatmul.apply(x.to(dtype), self.weight_fp8, self.weight_scale)
            return out if self.bias is None else out + self.bias.to(dtype)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, e4m3 rowwise storage, frozen"


def convert_to_fp8_storage(blocks: list[nn.Module], *, compute_dtype: torch.dtype, device: torch.device) -> int:
    """Replace every frozen plain ``nn.Linear`` inside ``blocks`` (peft's ``base_layer`` included) in place, one block
    at a time on ``device``: a block built on the host reaches the device as e4m3, so the device never holds the bf16
    base."""
    count = 0
    for block in blocks:
        for name, module in list(block.named_modules()):
            if not name or type(module) is not nn.Linear or module.weight.requires_grad:
                continue
            parent_name, _, child = name.rpartition(".")
            parent = block.get_submodule(parent_name) if parent_name else block
            staged = module.to(device)
            setattr(parent, child, Fp8StoredLinear(staged, compute_dtype=compute_dtype))
            del staged
            count += 1
    logger.info(
        "FP8 base storage: %d frozen block linears stored in e4m3 with a float32 scale per row (1 byte per weight), "
        "upcast to %s per layer in the forward and the backward",
        count,
        compute_dtype,
    )
    return count
