"""LoRA's up-projection computed in the base's GEMM: ``y = [x | s·h] @ [W | B]ᵀ`` with ``h = x Aᵀ``.

peft computes ``y = x Wᵀ + s·(x Aᵀ) Bᵀ`` as separate products: the adapter's output, as large as the base's [M, N],
is written by one GEMM and read back to be added, and the backward reads the output gradient once more for
``grad_y B``. Concatenated along the reduction dimension the two products are one GEMM whose output is written once,
and the backward's ``grad_y [W | B]`` gives the base's input gradient and ``grad_y B`` in one pass over ``grad_y``
(issue 12: ~1.1 GB less memory traffic a main block at 512² batch 4; +2–4% a step at 512², +2% at 1024²,
measured). The sum is accumulated in float32 inside the GEMM and rounded once, where peft rounds the base output,
the adapter output and their sum to bf16 each. Inductor fuses the concatenation into the kernel that produces x.

The layout makes the concatenated weight free: each layer keeps one buffer ``combined_t`` [K + r, N] whose first K
rows are Wᵀ (the base weight becomes a transposed view of them, no copy of the 6 B-parameter base) and whose last r
rows mirror Bᵀ in the base's dtype. The float32 B stays peft's trainable parameter; a forward pre-hook on the model
copies every B into its rows before each forward (`_MirrorB`; 170 cast-copies, ~1.7 ms a step for r128 on every
block linear, measured), so the optimizer, checkpoints, EMA and the adapter files see peft's layers unchanged. The
rows are current for forwards through the model (every engine path); a block called on its own after B changed
would see the previous B. Plain LoRA without dropout, bias or peft variants only; DoRA, the other adapter types and
FP8 bases keep peft's path. The shared storage is set up on the device: move the model before applying it.

QLoRA's NF4 base (`nf4_frozen.FrozenNF4Linear`) is dequantised for every product anyway, so there is nothing to
mirror: the dequantisation writes W's rows beside B's (`nf4_frozen.weight_beside`, one Triton kernel on CUDA) and
the same GEMM follows; the backward dequantises [W | B] again, as QLoRA's own path does for W (H200, 2026-12-04:
+2.6% at 512² bs4, the 200-step loss curve within 0.16% of peft's QLoRA path). Where the beside kernel's self-check
fails on a device, QLoRA keeps peft's path.
"""

from __future__ import annotations

import logging

import torch
from peft.tuners.lora.layer import Linear as LoraLinear
from torch import nn

from ..model.adapters import ADAPTER
from . import nf4_kernel
from .nf4_frozen import BUFFER_NAMES, FrozenNF4Linear, grad_beside, weight_beside

logger = logging.getLogger(__name__)


def _concat_backward(ctx, grad_out, x, down, a, times_combined, times_b):
    """x's, A's and B's gradients of ``[x | s·(x Aᵀ)] @ [W | B]ᵀ``; ``times_combined(g)`` is ``g @ [W | B]``,
    ``times_b(g)`` is ``g @ B``."""
    in_features = x.shape[1]
    grad_x = None
    if ctx.needs_input_grad[0]:
        both = times_combined(grad_out)  # [M, K + r]: grad_out @ W beside grad_out @ B
        grad_down = both[:, in_features:] * ctx.scale
        grad_x = both[:, :in_features] + grad_down @ a  # Inductor fuses the add into the consumer
    else:  # the first adapted layer after frozen blocks: no base-sized product for an unused gradient
        grad_down = times_b(grad_out) * ctx.scale
    grad_a = (grad_down.t() @ x).to(ctx.dtypes[0])
    grad_b = (grad_out.t() @ down).to(ctx.dtypes[1])
    return grad_x, grad_a, grad_b


class _ConcatLoraMatmul(torch.autograd.Function):
    """``[x | s·(x Aᵀ)] @ combined_t`` for x [M, K]; gradients for x, A and B (given for its gradient only: its
    values are read from ``combined_t``'s last r rows)."""

    @staticmethod
    def forward(ctx, x, combined_t, lora_a, lora_b, scale):
        dtype = combined_t.dtype
        x = x.to(dtype)
        a = lora_a.to(dtype)
        down = (x @ a.t()) * scale  # [M, r]
        out = torch.cat((x, down), dim=1) @ combined_t
        ctx.save_for_backward(x, down, a, combined_t)
        ctx.scale, ctx.dtypes = scale, (lora_a.dtype, lora_b.dtype)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        x, down, a, combined_t = ctx.saved_tensors
        b_rows = combined_t[x.shape[1] :]
        grad_x, grad_a, grad_b = _concat_backward(
            ctx, grad_out.to(combined_t.dtype), x, down, a, lambda g: g @ combined_t.t(), lambda g: g @ b_rows.t()
        )
        return grad_x, None, grad_a, grad_b, None


class _ConcatNF4LoraMatmul(torch.autograd.Function):
    """``[x | s·(x Aᵀ)] @ [W | B]ᵀ`` for QLoRA's NF4 base W: ``[W | B]`` is dequantised in the forward with B written
    beside W's rows (`nf4_frozen.weight_beside`), and again for the input gradient; nothing base-sized is saved."""

    @staticmethod
    def forward(ctx, x, lora_a, lora_b, scale, layout, kernel, *tensors):
        dtype = layout.dtype
        x, a, b = x.to(dtype), lora_a.to(dtype), lora_b.to(dtype)
        down = (x @ a.t()) * scale  # [M, r]
        out = torch.cat((x, down), dim=1) @ weight_beside(tensors, layout, b, kernel=kernel).t()
        ctx.save_for_backward(x, down, a, b, *tensors)
        ctx.scale, ctx.dtypes, ctx.layout, ctx.kernel = scale, (lora_a.dtype, lora_b.dtype), layout, kernel
        return out

    @staticmethod
    def backward(ctx, grad_out):
        x, down, a, b, *tensors = ctx.saved_tensors
        layout = ctx.layout
        grad_x, grad_a, grad_b = _concat_backward(
            ctx,
            grad_out.to(layout.dtype),
            x,
            down,
            a,
            lambda g: grad_beside(g, tuple(tensors), layout, b, kernel=ctx.kernel),
            lambda g: g @ b,
        )
        return grad_x, grad_a, grad_b, None, None, None, *([None] * len(tensors))


class ConcatLoraLinear(LoraLinear):
    """peft's LoRA ``Linear`` (its class is switched in place by `apply_lora_concat`) computing through
    `_ConcatLoraMatmul` while its one adapter is active and unmerged; peft's own forward otherwise (adapters disabled
    for a base-model preview, merged, other adapters or per-call arguments)."""

    combined_t: torch.Tensor

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        if args or kwargs or self.disable_adapters or self.merged or list(self.active_adapters) != [ADAPTER]:
            return super().forward(x, *args, **kwargs)
        shape = x.shape
        with torch.autocast(x.device.type, enabled=False):  # explicit dtypes: the base's, as autocast would pick
            out = self._concat_product(x.reshape(-1, shape[-1]))
        return out.reshape(*shape[:-1], out.shape[-1])

    def _concat_product(self, rows: torch.Tensor) -> torch.Tensor:
        lora_a, lora_b = self.lora_A[ADAPTER].weight, self.lora_B[ADAPTER].weight
        return _ConcatLoraMatmul.apply(rows, self.combined_t, lora_a, lora_b, self.scaling[ADAPTER])


class ConcatNF4LoraLinear(ConcatLoraLinear):
    """The same over QLoRA's `FrozenNF4Linear` base (`_ConcatNF4LoraMatmul`): B is read where it is, no mirror."""

    nf4_kernel_beside: bool

    def _concat_product(self, rows: torch.Tensor) -> torch.Tensor:
        base = self.get_base_layer()
        tensors = (getattr(base, name) for name in BUFFER_NAMES)
        lora_a, lora_b = self.lora_A[ADAPTER].weight, self.lora_B[ADAPTER].weight
        out = _ConcatNF4LoraMatmul.apply(
            rows, lora_a, lora_b, self.scaling[ADAPTER], base.layout, self.nf4_kernel_beside, *tensors
        )
        return out.to(rows.dtype)  # peft's QLoRA path returns its input's dtype (`FrozenNF4Linear` casts back)


def concat_eligible(layer: nn.Module) -> str | None:
    """None when ``layer`` can take the concatenated path, else why not."""
    if type(layer) is not LoraLinear:
        return f"{type(layer).__name__} is not peft's plain LoRA Linear"
    base = layer.get_base_layer()
    if type(base) is FrozenNF4Linear:
        if base.bias is not None or base.compute_dtype != base.layout.dtype:
            return "the NF4 base has a bias or computes in another dtype than its weight's"
        if base.layout.kernel and not nf4_kernel.available(base.layout.dtype, beside=True):
            return "the NF4 kernel writing beside B failed its self-check (the plain kernel beats the PyTorch ops)"
    elif type(base) is not nn.Linear or base.bias is not None or base.weight.requires_grad or layer.fan_in_fan_out:
        return "the base is not a frozen bias-free nn.Linear or NF4 linear"
    if list(layer.lora_A) != [ADAPTER] or layer.use_dora.get(ADAPTER, False) or layer.merged:
        return "the layer holds other adapters, DoRA or a merged adapter"
    if layer.lora_variant or layer.lora_bias.get(ADAPTER, False) or layer.lora_B[ADAPTER].bias is not None:
        return "the adapter is a peft variant or has a bias"
    if not isinstance(layer.lora_dropout[ADAPTER], nn.Identity):
        return "LoRA dropout is on"
    return None


def _combine(layer: nn.Module) -> None:
    base = layer.get_base_layer()
    if type(base) is FrozenNF4Linear:
        layer.nf4_kernel_beside = base.layout.kernel  # `concat_eligible` checked the kernel's beside pair
        layer.__class__ = ConcatNF4LoraLinear
        return
    weight = base.weight.detach()
    lora_b = layer.lora_B[ADAPTER].weight
    combined_t = torch.empty(
        weight.shape[1] + lora_b.shape[1], weight.shape[0], dtype=weight.dtype, device=weight.device
    )
    with torch.no_grad():
        combined_t[: weight.shape[1]].copy_(weight.t())
        combined_t[weight.shape[1] :].copy_(lora_b.t())
    layer.register_buffer("combined_t", combined_t, persistent=False)
    base.weight = nn.Parameter(combined_t[: weight.shape[1]].t(), requires_grad=False)  # a view: W stored once
    layer.__class__ = ConcatLoraLinear


class _MirrorB:
    """Forward pre-hook: copy every layer's trainable B into its ``combined_t`` rows before each forward through the
    model. Every forward, not only when B's version changed: the fused AdamW (the engine's default on CUDA) updates B
    without bumping its version counter, and a version-gated copy trained with the first B forever (found by the
    200-step loss curve, 2026-12-03). The rows are written through ``.data``, which leaves ``combined_t``'s version
    as it was: a second forward before a backward rewrites the rows with the values they hold and the pending
    backward stays valid, as on peft's path. (Changing B between a forward and its backward, which peft refuses,
    would go unnoticed here.)"""

    def __init__(self, layers: list[nn.Module]) -> None:
        self.layers = layers

    def __call__(self, module: nn.Module, args) -> None:
        rows = [layer.combined_t.data[layer.get_base_layer().in_features :] for layer in self.layers]  # looked up
        sources = [layer.lora_B[ADAPTER].weight.detach().t() for layer in self.layers]  # each time: never stale
        with torch.no_grad():
            torch._foreach_copy_(rows, sources)


def apply_lora_concat(model: nn.Module) -> int:
    """Put every eligible LoRA layer of ``model`` on the concatenated path; returns how many. Layers that are not
    eligible (or already converted) keep their forward (the first reason is logged)."""
    from ..model.lora import lora_layers

    layers, skipped = [], {}
    for name, layer in lora_layers(model).items():
        reason = concat_eligible(layer)
        if reason is None:
            _combine(layer)
            layers.append(layer)
        else:
            skipped.setdefault(reason, name)
    for reason, name in skipped.items():
        logger.info("LoRA concatenated GEMMs: %s keeps peft's path (%s)", name, reason)
    mirrored = [layer for layer in layers if type(layer) is ConcatLoraLinear]
    if mirrored:
        model.register_forward_pre_hook(_MirrorB(mirrored))
    return len(layers)
