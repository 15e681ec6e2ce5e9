"""Activation bytes per token of one Z-Image training step; ``memory.MemoryModel`` multiplies them by the tokens and
adds the weights, gradients and optimizer states.

Per transformer block, derived from ``training/model/layers.py`` for eager bf16 with
LoRA (peft) on qkv, out, w1, w2, w3 (d = dim, h = ffn hidden, r = rank, H = heads). Autograd saves a tensor only for the
inputs that need a gradient, so a frozen Linear keeps nothing and the LoRA A-matmul keeps the Linear's input:

    norms     4 RMSNorms upcast their input to fp32 and save it              16d
    qk-norm   q and k upcast (a copy of a view of qkv) and saved              8d
    linears   inputs of qkv, out, w1/w3 (shared) in bf16; w2 input (2h)       6d + 2h
              with fp32 adapters peft casts each input to fp32 (w1, w3 apart)  18d + 4h
    attention flash keeps q, k (after RoPE), v (a view: all of qkv lives)    4d + 6d, plus 4H for the logsumexp
    SwiGLU    w1 output (silu input), silu output, w3 output                  6h
    LoRA      the rank-r A output of each of the 5 targets                    5r x adapter bytes
    rstd      fp32 per token: 4 norms + q/k per head                          16 + 8H

Full fine-tuning drops the LoRA outputs and adds 32d: the bf16 norm outputs multiplied by trainable modulation
(8d) and, because the norm weights train, each RMSNorm's normalised fp32 output (24d).
A checkpointed block keeps only its input (2d). The ``probe`` module replaces these numbers with measurements.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

from ..model.config import ZImageConfig
from ..vocabulary import LORA_MODES

BF16 = 2
FP32 = 4


@dataclass(kw_only=True, frozen=True)
class ActivationCoefficients:
    """Per-token bytes of one sample's activations; multiply by tokens (image + caption, padded) × micro-batch."""

    block: float  # kept by one non-checkpointed block until its backward
    checkpointed: float  # kept by one checkpointed block (its input)
    backward_extra: float  # gradients and temporaries of the block being differentiated, beyond ``block``
    forward_extra: float  # temporaries of the block being computed in the forward
    shared: float  # RoPE tables, positions and embeddings, kept once
    source: str = "analytic"

    def __post_init__(self) -> None:
        for name in ("block", "checkpointed", "backward_extra", "forward_extra", "shared"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or value < 0 or math.isnan(value):
                raise ValueError(f"ActivationCoefficients.{name} must be a number >= 0 bytes per token, got {value!r}")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def analytic_coefficients(
    model: ZImageConfig,
    mode: str,
    lora_rank: int,
    compiled: bool = False,
    lora_param_bytes: int = FP32,
    lora_input_fp32: bool | None = None,
) -> ActivationCoefficients:
    """The table in the module docstring, as numbers. ``compiled``: Inductor recomputes the fp32 norm and qk-norm
    inputs (24d) and the SiLU output (2h) from bf16 tensors, saving the four bf16 norm inputs (8d) instead.
    ``lora_input_fp32``: whether peft casts each LoRA input to the adapter dtype (None: when adapters are fp32). The
    engine turns that cast off under bf16 autocast, where the adapter matmuls run in bf16 anyway."""
    d, h, heads = model.dim, model.ffn_hidden_dim, model.n_heads
    if lora_input_fp32 is None:
        lora_input_fp32 = lora_param_bytes == FP32
    block = 16 * d + 8 * d + 10 * d + 6 * h + 12 * heads + 16  # norms, qk-norm, attention, SwiGLU, lse + rstd
    if mode == "full" or not lora_input_fp32:
        block += 6 * d + 2 * h  # Linear inputs in bf16 (the out input is the attention output itself)
    else:  # peft casts each input to the fp32 adapter dtype; w1 and w3 cast theirs separately
        block += 18 * d + 4 * h
    lora_output_bytes = FP32 if lora_input_fp32 else BF16
    block += 5 * lora_rank * lora_output_bytes if mode in LORA_MODES else 32 * d
    if compiled:
        block -= 16 * d + 2 * h
    # Backward of one block: the incoming and outgoing residual gradients, the fp32 gradient of a norm input,
    # and the four hidden-width gradients of SwiGLU alive at once (w2 input, silu output, w1 and w3 outputs).
    backward_extra = 2 * BF16 * d + 2 * FP32 * d + 4 * BF16 * h
    # Forward of one block: qkv in fp32 for RoPE (q and k) and the SwiGLU product before w2.
    forward_extra = 2 * FP32 * d + 2 * BF16 * h
    shared = 2 * 2 * (model.head_dim // 2) * FP32 + 3 * 3 * 8 + 2 * BF16 * d
    return ActivationCoefficients(
        block=float(block),
        checkpointed=float(BF16 * d),
        backward_extra=float(backward_extra),
        forward_extra=float(forward_extra),
        shared=float(shared),
        source="analytic-compiled" if compiled else "analytic",
    )
