"""QLoRA's NF4 base as plain tensors, dequantised inside the compiled blocks (a Triton kernel on CUDA, `nf4_kernel`;
PyTorch ops elsewhere, which ``torch.compile`` fuses into one kernel).

bitsandbytes' ``Linear4bit`` dequantises through its own custom ops, each a Python function that calls the CUDA
library through ctypes: two per linear and direction (the nested absmax, then the weight), ~680 per step for Z-Image.
The GPU work equals bf16 LoRA's, but those calls leave the GPU waiting on the host (`docs/benchmarks.md`, QLoRA
profile). `FrozenNF4Linear` holds the very same packed tensors (no copy, the same bytes) as buffers and computes the
same numbers — a 16-entry code lookup times the block's absmax, whose nested 8-bit form is a 256-entry lookup times
its own block scale plus the offset, all in float32 as bitsandbytes does — so the compiled blocks see plain tensors
and the dequantisation is part of their graph. The weight is dequantised again for the input gradient instead of
being kept (what keeps QLoRA's memory); no weight gradient is computed.
"""

from __future__ import annotations

import dataclasses
import logging

import torch
from torch import nn

from . import nf4_kernel

logger = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True, kw_only=True)
class NF4Layout:
    """What the packed tensors mean: the weight's shape and dtype, and the two block sizes."""

    shape: tuple[int, int]
    dtype: torch.dtype
    blocksize: int
    nested_blocksize: int
    kernel: bool = False  # CUDA tensors take `nf4_kernel`'s Triton kernel (its operators are registered)

    def __post_init__(self) -> None:
        numel = self.shape[0] * self.shape[1]
        if numel % self.blocksize or self.blocksize % 2:
            raise ValueError(f"NF4 weight {self.shape} is not a whole number of blocks of {self.blocksize}")


def dequantize_nf4(buffers: dict[str, torch.Tensor], layout: NF4Layout, *, for_backward: bool = False) -> torch.Tensor:
    """The weight [out, in] in ``layout.dtype`` from the packed NF4 tensors (double quantisation).

    ``for_backward`` writes the high nibble as ``(p >> 4) & 15`` instead of ``p >> 4`` (the same number): compiled,
    the backward's dequantisation would otherwise be merged with the forward's (common subexpressions), and the
    partitioner would then keep the whole dequantised weight for the backward's matmul instead of recomputing it
    (tests/test_engine_nf4_frozen.py checks what a compiled layer saves)."""
    blocks = buffers["absmax"].numel()
    nested_scale = buffers["nested_absmax"][:, None].expand(-1, layout.nested_blocksize).reshape(-1)[:blocks]
    absmax = buffers["nested_code"][buffers["absmax"].long()] * nested_scale + buffers["offset"]
    packed = buffers["packed"]
    high = ((packed >> 4) & 0x0F) if for_backward else (packed >> 4)
    codes = torch.stack((high.long(), (packed & 0x0F).long()), dim=-1).reshape(-1)
    values = buffers["code"][codes].reshape(-1, layout.blocksize) * absmax.reshape(-1, 1)
    return values.reshape(layout.shape).to(layout.dtype)


BUFFER_NAMES = ("packed", "absmax", "nested_absmax", "nested_code", "offset", "code")


def _layout_args(layout: NF4Layout) -> tuple[int, int, int, int]:
    return (*layout.shape, layout.blocksize, layout.nested_blocksize)


class _NF4Matmul(torch.autograd.Function):
    """``x @ W.t()`` for the NF4 weight W, dequantised in the forward and again for the input gradient (on CUDA by
    `nf4_kernel`'s Triton kernel, elsewhere by `dequantize_nf4`)."""

    @staticmethod
    def forward(ctx, x, layout, *tensors):
        ctx.layout = layout
        ctx.save_for_backward(*tensors)
        if layout.kernel and tensors[0].is_cuda:
            return x @ torch.ops.whetstone.nf4_dequantize(*tensors, *_layout_args(layout)).to(x.dtype).t()
        return x @ dequantize_nf4(dict(zip(BUFFER_NAMES, tensors)), layout).to(x.dtype).t()

    @staticmethod
    def backward(ctx, grad_out):
        tensors, layout = ctx.saved_tensors, ctx.layout
        if layout.kernel and tensors[0].is_cuda:
            grad_in = torch.ops.whetstone.nf4_grad_input(grad_out, *tensors, *_layout_args(layout))
            return (grad_in, None, *([None] * len(BUFFER_NAMES)))
        weight = dequantize_nf4(dict(zip(BUFFER_NAMES, tensors)), layout, for_backward=True)
        return (grad_out @ weight.to(grad_out.dtype), None, *([None] * len(BUFFER_NAMES)))


def weight_beside(tensors: tuple, layout: NF4Layout, beside: torch.Tensor, *, kernel: bool) -> torch.Tensor:
    """``[W | beside]`` [out, in + r] in ``layout.dtype`` from the packed tensors (``BUFFER_NAMES`` order); ``kernel``:
    CUDA tensors take `nf4_kernel.beside_operators`, which write W's rows beside ``beside`` without a copy."""
    if kernel and tensors[0].is_cuda:
        return torch.ops.whetstone.nf4_dequantize_beside(beside, *tensors, *_layout_args(layout))
    weight = dequantize_nf4(dict(zip(BUFFER_NAMES, tensors)), layout)
    return torch.cat((weight, beside.to(layout.dtype)), dim=1)


def grad_beside(grad: torch.Tensor, tensors: tuple, layout: NF4Layout, beside: torch.Tensor, *, kernel: bool):
    """``grad @ [W | beside]`` [M, in + r], W dequantised again (see `dequantize_nf4`'s ``for_backward``)."""
    if kernel and tensors[0].is_cuda:
        return torch.ops.whetstone.nf4_grad_input_beside(grad, beside, *tensors, *_layout_args(layout))
    weight = dequantize_nf4(dict(zip(BUFFER_NAMES, tensors)), layout, for_backward=True)
    return grad @ torch.cat((weight, beside.to(layout.dtype)), dim=1).to(grad.dtype)


class FrozenNF4Linear(nn.Module):
    """A bitsandbytes NF4 ``Linear4bit`` (double quantisation) as plain buffers; see the module docstring."""

    def __init__(self, layer: nn.Module) -> None:
        super().__init__()
        state = layer.weight.quant_state
        if state.quant_type != "nf4" or not state.nested or layer.weight.requires_grad:
            raise ValueError("FrozenNF4Linear takes a frozen NF4 Linear4bit with double quantisation")
        self.layout = NF4Layout(
            shape=tuple(state.shape),
            dtype=state.dtype,
            blocksize=state.blocksize,
            nested_blocksize=state.state2.blocksize,
            kernel=nf4_kernel.available(state.dtype),  # its self-check registered the two operators
        )
        self.out_features, self.in_features = self.layout.shape
        self.compute_dtype = layer.compute_dtype or state.dtype  # what Linear4bit casts its input to
        tensors = {
            "packed": layer.weight.data.reshape(-1),
            "absmax": state.absmax,
            "nested_absmax": state.state2.absmax,
            "nested_code": state.state2.code,
            "offset": torch.as_tensor(state.offset, dtype=torch.float32, device=state.absmax.device),
            "code": state.code,
        }
        for name in BUFFER_NAMES:  # not persistent: the frozen base is never saved from here
            self.register_buffer(name, tensors[name], persistent=False)
        bias = None if layer.bias is None else layer.bias.detach()
        self.register_buffer("bias", bias, persistent=False)

    @property
    def weight(self) -> torch.Tensor:
        """The dequantised weight (for code that reads ``.weight``: DoRA's norm, merges); not used in forward."""
        return dequantize_nf4(self._buffers_by_name(), self.layout)

    def _buffers_by_name(self) -> dict[str, torch.Tensor]:
        return {name: getattr(self, name) for name in BUFFER_NAMES}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, x.shape[-1]).to(self.compute_dtype)
        out = _NF4Matmul.apply(rows, self.layout, *(getattr(self, name) for name in BUFFER_NAMES))
        if self.bias is not None:
            out = out + self.bias.to(out.dtype)
        return out.reshape(*x.shape[:-1], self.out_features).to(x.dtype)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, nf4 double-quantised, frozen"


def convert_nf4_linears(blocks: list[nn.Module]) -> int:
    """Replace every bitsandbytes 4-bit linear inside ``blocks`` (peft's ``base_layer`` included) in place."""
    import bitsandbytes as bnb

    count = 0
    for block in blocks:
        for name, module in list(block.named_modules()):
            if not isinstance(module, bnb.nn.Linear4bit):
                continue
            parent_name, _, child = name.rpartition(".")
            parent = block.get_submodule(parent_name) if parent_name else block
            setattr(parent, child, FrozenNF4Linear(module))
            count += 1
    return count
