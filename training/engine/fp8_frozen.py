"""FP8 for the frozen base of adapter training: every frozen block linear is quantised to float8 e4m3 once.

A frozen weight never changes, so quantising it on every call (what torchao's float8 training does, built for
weights that train) is wasted work. `FrozenFP8Linear` keeps two e4m3 copies made once from the bf16 weight W
[out, in]: W itself with one scale per output channel, for the forward ``x @ W.T``, and W.T [in, out] with one scale
per input channel, for the input gradient ``grad_out @ W``; ``torch._scaled_mm`` wants its second operand
column-major, and these two layouts are exactly that for the two products. Activations and output gradients are
quantised per row (rowwise scaling) on the fly. No weight gradient is ever computed. The two copies take the bytes
of the one bf16 weight they replace.
"""

from __future__ import annotations

import logging

import torch
from torch import nn

logger = logging.getLogger(__name__)

FP8 = torch.float8_e4m3fn
FP8_MAX = torch.finfo(FP8).max
_EPS = 1e-12


def quantize_rows(tensor: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(e4m3 tensor, float32 scale per row [rows, 1]) with ``tensor ≈ fp8.float() * scale``."""
    amax = tensor.abs().amax(dim=-1, keepdim=True).float().clamp(min=_EPS)
    scale = amax * (1 / FP8_MAX)  # what CUDA computes for ``amax / FP8_MAX`` anyway; the CPU the same
    return (tensor.float() / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8), scale


def _scaled_matmul(a: torch.Tensor, b_rows: torch.Tensor, b_scale: torch.Tensor, out_dtype: torch.dtype):
    """``a @ b.T`` for a [M, K] activation and b given as e4m3 rows [N, K] with scales [1, N] (contiguous)."""
    a_fp8, a_scale = quantize_rows(a)  # Inductor fuses this into the kernel that produces ``a``
    return torch._scaled_mm(a_fp8, b_rows.t(), scale_a=a_scale, scale_b=b_scale, out_dtype=out_dtype)


class _FrozenFP8Matmul(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight_fp8, weight_scale, weight_t_fp8, weight_t_scale):
        ctx.save_for_backward(weight_t_fp8, weight_t_scale)
        ctx.out_dtype = x.dtype
        return _scaled_matmul(x, weight_fp8, weight_scale, x.dtype)

    @staticmethod
    def backward(ctx, grad_out):
        weight_t_fp8, weight_t_scale = ctx.saved_tensors
        grad_in = _scaled_matmul(grad_out.contiguous(), weight_t_fp8, weight_t_scale, ctx.out_dtype)
        return grad_in, None, None, None, None


class FrozenFP8Linear(nn.Module):
    """A frozen ``nn.Linear`` computed in FP8 with weights quantised once (see the module docstring)."""

    def __init__(self, linear: nn.Linear, *, compute_dtype: torch.dtype = torch.bfloat16) -> None:
        super().__init__()
        if linear.weight.requires_grad:
            raise ValueError("FrozenFP8Linear is for frozen weights; this layer's weight requires grad")
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.compute_dtype = compute_dtype
        weight = linear.weight.detach()
        weight_fp8, weight_scale = quantize_rows(weight)
        weight_t_fp8, weight_t_scale = quantize_rows(weight.t().contiguous())
        weight_scale, weight_t_scale = weight_scale.reshape(1, -1), weight_t_scale.reshape(1, -1)  # _scaled_mm's [1, N]
        # not persistent: the frozen base is never saved from here (LoRA files and checkpoints hold the adapters)
        self.register_buffer("weight_fp8", weight_fp8, persistent=False)
        self.register_buffer("weight_scale", weight_scale, persistent=False)
        self.register_buffer("weight_t_fp8", weight_t_fp8, persistent=False)
        self.register_buffer("weight_t_scale", weight_t_scale, persistent=False)
        bias = None if linear.bias is None else linear.bias.detach().to(compute_dtype)
        self.register_buffer("bias", bias, persistent=False)

    @property
    def weight(self) -> torch.Tensor:
        """The dequantised weight (for code that inspects ``.weight``: shapes, dtype, merges); not used in forward."""
        return (self.weight_fp8.float() * self.weight_scale.t()).to(self.compute_dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        rows = x.reshape(-1, shape[-1]).to(self.compute_dtype)
        out = _FrozenFP8Matmul.apply(rows, self.weight_fp8, self.weight_scale, self.weight_t_fp8, self.weight_t_scale)
        if self.bias is not None:
            out = out + self.bias
        return out.reshape(*shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, e4m3 rowwise, frozen"


def fp8_eligible(linear: nn.Module) -> bool:
    """A frozen plain linear whose sizes ``_scaled_mm`` accepts (multiples of 16)."""
    return (
        type(linear) is nn.Linear
        and not linear.weight.requires_grad
        and linear.in_features % 16 == 0
        and linear.out_features % 16 == 0
    )


def convert_frozen_linears(blocks: list[nn.Module], *, compute_dtype: torch.dtype = torch.bfloat16) -> int:
    """Replace every eligible frozen ``nn.Linear`` inside ``blocks`` (peft's ``base_layer`` included) in place."""
    count = 0
    for block in blocks:
        for name, module in list(block.named_modules()):
            if not name or not fp8_eligible(module):
                continue
            parent_name, _, child = name.rpartition(".")
            parent = block.get_submodule(parent_name) if parent_name else block
            setattr(parent, child, FrozenFP8Linear(module, compute_dtype=compute_dtype))
            count += 1
    return count
