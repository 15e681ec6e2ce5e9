"""The adapter types beside LoRA, each through its peft tuner (wrap, don't replace): DoRA is ``LoraConfig(use_dora=True)``,
LoKr ``LoKrConfig``, LoHa ``LoHaConfig``. One place says, per type, which peft config builds it, which tensors it
trains, what weight it merges to (float32) and whether a 4-bit base can carry it.

Merged weights, as peft computes the layer's output (s = alpha / rank):
    lora  W + s·B@A
    dora  m / ‖W + s·B@A‖_row · (W + s·B@A)       (m: the trained magnitude, one per output row)
    lokr  W + s·kron(w1, w2)                        (w2 = w2_a @ w2_b when rank-decomposed)
    loha  W + s·(w1_a@w1_b) ⊙ (w2_a@w2_b)
"""

from __future__ import annotations

import re

import torch
from torch import nn

from ..vocabulary import ADAPTER_TYPES
from .targets import lokr_decompose_factor, qlora_unsupported  # noqa: F401  (re-exported: the rules live torch-free)

ADAPTER = "default"
#: The tensor names each type trains, as peft names them under ``<module>.<kind>.default``.
TRAINED_KINDS: dict[str, tuple[str, ...]] = {
    "lora": ("lora_A", "lora_B"),
    "dora": ("lora_A", "lora_B", "lora_magnitude_vector"),
    "lokr": ("lokr_w1", "lokr_w2", "lokr_w2_a", "lokr_w2_b"),
    "loha": ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b"),
}
assert tuple(TRAINED_KINDS) == ADAPTER_TYPES, "TRAINED_KINDS must list training.vocabulary.ADAPTER_TYPES in order"
_ALL_KINDS = sorted({kind for kinds in TRAINED_KINDS.values() for kind in kinds}, key=len, reverse=True)
PEFT_PARAM = re.compile(rf"^(?P<module>.+)\.(?P<kind>{'|'.join(_ALL_KINDS)})\.{ADAPTER}(?:\.weight)?$")
#: The ComfyUI-form DoRA magnitude our files carry ([out, 1]; see ``comfy_dora_scale``), under our names.
DORA_SCALE = "dora_scale"
#: Relative size of ComfyUI's epsilon in the row norm it divides by (float32 patching): torch.finfo(float32).eps.
COMFY_NORM_EPS = torch.finfo(torch.float32).eps


def peft_config(adapter: str, *, rank: int, alpha: float, dropout: float, names: list[str], lokr_factor: int = -1):
    """The peft config that builds ``adapter`` on the modules ``names`` (full names: matched exactly); a LoKr's
    ``decompose_factor`` is ``lokr_factor`` (``targets.lokr_decompose_factor``)."""
    if adapter in ("lora", "dora"):
        from peft import LoraConfig

        return LoraConfig(
            r=rank,
            lora_alpha=alpha,
            lora_dropout=dropout,
            target_modules=names,
            bias="none",
            use_dora=adapter == "dora",
        )
    if adapter == "lokr":
        from peft import LoKrConfig

        # peft's LoKr/LoHa have no input dropout: rank dropout (rows of the delta) stands in for it. Not module
        # dropout, which skips a layer's adapter for a step and so leaves its parameters unused under DDP.
        return LoKrConfig(r=rank, alpha=alpha, rank_dropout=dropout, target_modules=names, decompose_factor=lokr_factor)
    if adapter == "loha":
        from peft import LoHaConfig

        return LoHaConfig(r=rank, alpha=alpha, rank_dropout=dropout, target_modules=names)
    raise ValueError(f"unknown adapter type {adapter!r}; choose one of {list(ADAPTER_TYPES)}")


def layer_adapter_type(layer: nn.Module) -> str:
    """Which of ``ADAPTER_TYPES`` a peft layer carries."""
    from peft.tuners.loha import LoHaLayer
    from peft.tuners.lokr import LoKrLayer
    from peft.tuners.lora import LoraLayer

    if isinstance(layer, LoKrLayer):
        return "lokr"
    if isinstance(layer, LoHaLayer):
        return "loha"
    if isinstance(layer, LoraLayer):
        return "dora" if ADAPTER in layer.lora_magnitude_vector else "lora"
    raise TypeError(f"{type(layer).__name__} is not a peft LoRA/DoRA/LoKr/LoHa layer")


def base_weight(layer: nn.Module) -> torch.Tensor:
    """The frozen weight under a peft layer in float32 (a 4-bit base dequantized, as peft's DoRA sees it)."""
    from peft.utils.integrations import dequantize_module_weight

    return dequantize_module_weight(layer.get_base_layer()).float()


def delta_weight(layer: nn.Module, adapter: str) -> torch.Tensor:
    """s·ΔW of a LoRA, LoKr or LoHa layer in float32, from its parameters (not peft's dtype-following helpers)."""
    s = float(layer.scaling[ADAPTER])
    if adapter in ("lora", "dora"):
        return s * (layer.lora_B[ADAPTER].weight.float() @ layer.lora_A[ADAPTER].weight.float())
    if adapter == "lokr":
        w1 = layer.lokr_w1[ADAPTER].float()
        if ADAPTER in layer.lokr_w2:
            w2 = layer.lokr_w2[ADAPTER].float()
        else:
            w2 = layer.lokr_w2_a[ADAPTER].float() @ layer.lokr_w2_b[ADAPTER].float()
        return s * torch.kron(w1, w2)
    if adapter == "loha":
        p = {k: getattr(layer, k)[ADAPTER].float() for k in TRAINED_KINDS["loha"]}
        return s * (p["hada_w1_a"] @ p["hada_w1_b"]) * (p["hada_w2_a"] @ p["hada_w2_b"])
    raise ValueError(f"unknown adapter type {adapter!r}")


def merged_weight(layer: nn.Module) -> torch.Tensor:
    """The float32 weight that gives the peft layer's output without the adapter branch (see the module docstring)."""
    adapter = layer_adapter_type(layer)
    weight = base_weight(layer)
    merged = weight + delta_weight(layer, adapter)
    if adapter == "dora":
        magnitude = layer.lora_magnitude_vector[ADAPTER].weight.float()
        merged = merged * (magnitude / torch.linalg.norm(merged, dim=1)).unsqueeze(1)
    return merged


def comfy_dora_scale(layer: nn.Module) -> torch.Tensor:
    """The ``dora_scale`` [out, 1] with which ComfyUI 0.8 rebuilds this DoRA layer's merged weight exactly.

    ComfyUI's ``weight_decompose`` (a [out, 1] scale: the output axis) computes (W + ΔW) · scale / (‖W‖_row + eps),
    the norm being the *base* weight's, while peft's DoRA multiplies (W + ΔW) by m / ‖W + ΔW‖_row. So the file
    stores scale = m · (‖W‖_row + eps) / ‖W + ΔW‖_row, exact for the base the adapter was trained on (DoRA's
    magnitude is an absolute size of each row, tied to that base in any form)."""
    weight = base_weight(layer)
    magnitude = layer.lora_magnitude_vector[ADAPTER].weight.float()
    trained_norm = torch.linalg.norm(weight + delta_weight(layer, "dora"), dim=1)
    return (magnitude * (torch.linalg.norm(weight, dim=1) + COMFY_NORM_EPS) / trained_norm).unsqueeze(1)


def dora_magnitude_from_scale(layer: nn.Module, lora_a, lora_b, scale: torch.Tensor) -> torch.Tensor:
    """Inverse of ``comfy_dora_scale`` for a layer whose base is the one the file was trained on: peft's m."""
    weight = base_weight(layer)
    delta = float(layer.scaling[ADAPTER]) * (lora_b.float() @ lora_a.float())
    trained_norm = torch.linalg.norm(weight + delta, dim=1)
    return scale.float().reshape(-1) * trained_norm / (torch.linalg.norm(weight, dim=1) + COMFY_NORM_EPS)
