"""What DoRA, LoKr and LoHa cost beyond LoRA in one training step, from how peft computes each (bf16 autocast):

    dora  per token: each target saves its base output and its scaled LoRA output for the magnitude's gradient
          (``(m/‖W+ΔW‖ - 1)·Wx + m/‖W+ΔW‖·s·BAx``): 2 x out bf16 values per target. Transient per layer: peft
          rebuilds B@A through an identity [in, in] (fp32, and its bf16 autocast copy), the [in, out] product, and
          W + s·B@A for the row norm (bf16 base copy, fp32 sum).
    lokr  no rank-r output per token (the adapter is a weight, not a side branch); per block kept for its
    loha  backward: the bf16 copy of each target's delta weight that F.linear saves. Transient per layer: the
          float32 delta, its bf16 copy, and in the backward its bf16 gradient and fp32 cast-back.

LoRA's own terms are in ``activations.analytic_coefficients``; this module only adds the differences.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..model.config import ZImageConfig
from ..model.targets import linear_shapes, target_preset
from ..vocabulary import ADAPTER_TYPES

BF16 = 2
FP32 = 4


@dataclass(kw_only=True, frozen=True)
class AdapterTerms:
    """Bytes an adapter type adds (or removes, when negative) relative to LoRA."""

    per_token_block: float  # per token of one non-checkpointed block, added to the block coefficient
    per_block: int  # kept by each non-checkpointed block whatever the tokens (LoKr/LoHa delta weights)
    transient: int  # alive while one layer is computed (forward or backward), at most one layer at a time


def _targets(model: ZImageConfig, targets: str) -> list[tuple[int, int]]:
    """(in, out) of each targeted linear of a main (modulated) block."""
    shapes = linear_shapes(model, modulated=True)
    return [shapes[name] for name in target_preset(targets).modules if name in shapes]


def adapter_terms(model: ZImageConfig, adapter: str, lora_rank: int, targets: str, lora_output_bytes: int):
    """The ``AdapterTerms`` of ``adapter`` (all zero for LoRA). ``lora_output_bytes``: the bytes of one rank-r
    output value in LoRA's coefficient (fp32 when peft casts inputs to fp32 adapters, else bf16)."""
    if adapter not in ADAPTER_TYPES:
        raise ValueError(f"adapter {adapter!r} is not one of {ADAPTER_TYPES}")
    linears = _targets(model, targets)
    if adapter == "lora":
        return AdapterTerms(per_token_block=0.0, per_block=0, transient=0)
    if adapter == "dora":
        outputs = sum(out for _, out in linears)
        transient = max((FP32 + BF16) * i * i + FP32 * i * o + (BF16 + FP32) * i * o for i, o in linears)
        return AdapterTerms(per_token_block=float(2 * BF16 * outputs), per_block=0, transient=transient)
    # LoKr / LoHa: the analytic block counts 5 rank-r outputs that these types do not have
    weights = sum(i * o for i, o in linears)
    transient = max((FP32 + BF16 + BF16 + FP32) * i * o for i, o in linears)
    return AdapterTerms(
        per_token_block=-5.0 * lora_rank * lora_output_bytes, per_block=BF16 * weights, transient=transient
    )
