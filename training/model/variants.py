"""Z-Image-Base vs Z-Image-Turbo: the one table of per-variant sampling settings, and which variant a run trains.

The weights cannot tell the two apart reliably (docs/training.md §1 has the evidence): both have the same keys and
shapes, ComfyUI 0.8 loads both as its one ``ZImage`` model class (``comfy/supported_models.py``), and the only
weight-derived signal known, a newer ComfyUI's fp16 check on the spread of ``layers.28.ffn_norm1.weight``, is a
precision heuristic that fine-tunes and merges can move. So the variant is an explicit choice
(``model.variant`` / ``--model-variant`` / the nodes' ``model_variant``); "auto" reads only the weights file's name
and says so in the log.

Readers of the table (the preview sampler, the Train node's defaults): ``variant_settings(name)``.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

from ..vocabulary import MODEL_VARIANT_CHOICES, MODEL_VARIANTS

logger = logging.getLogger(__name__)

#: The LoRA file metadata key naming the variant a LoRA was trained for ("base" or "turbo").
LORA_VARIANT_KEY = "model_variant"
#: ostris' training adapter for Turbo (ai-toolkit, musubi ``--base_weights``, diffusion-pipe ``merge_adapters``).
TURBO_ADAPTER_HINT = "ostris/zimage_turbo_training_adapter (zimage_turbo_training_adapter_v2.safetensors)"
DE_TURBO_HINT = "ostris' De-Turbo weights (z_image_de_turbo_v1_bf16.safetensors)"


@dataclass(frozen=True, kw_only=True)
class VariantSettings:
    """How a variant is sampled, in ComfyUI's terms (KSampler steps and cfg, ModelSampling shift)."""

    name: str
    title: str
    distilled: bool  # few-step distilled (Decoupled-DMD + DMDR): training breaks the distillation unless protected
    sampling_shift: float  # ComfyUI's: ZImage.sampling_settings, and the ModelSamplingAuraFlow of Comfy's templates
    reference_shift: float  # the diffusers scheduler_config.json shift of the published model
    steps: int  # KSampler steps
    cfg: float  # KSampler cfg; 1.0: no guidance (one model call per step); diffusers guidance_scale = cfg − 1
    cfg_range: tuple[float, float]  # the documented useful range of cfg
    preview_steps: int  # KSampler steps of a training preview (enough to recognise the subject; see docs/training.md)
    sources: tuple[str, ...]

    @property
    def uses_cfg(self) -> bool:
        return self.cfg != 1.0


VARIANTS: dict[str, VariantSettings] = {
    "base": VariantSettings(
        name="base",
        title="Z-Image (Base)",
        distilled=False,
        sampling_shift=3.0,
        reference_shift=6.0,
        steps=50,
        cfg=4.0,
        cfg_range=(4.0, 7.0),
        preview_steps=20,  # 2/5 of the 50: 80 model calls for 2 prompts at cfg 4 (3.3 s on an H200 at 512²)
        sources=(
            "ComfyUI 0.8 comfy/supported_models.py ZImage.sampling_settings shift 3.0 (one class for both variants)",
            "Comfy-Org/workflow_templates templates/image_z_image.json: ModelSamplingAuraFlow 3, KSampler 50 steps, "
            "cfg 4, note 'Steps 30~50, cfg 5~7'",
            "Tongyi-MAI/Z-Image scheduler/scheduler_config.json shift 6.0, as read by zhutao100/zimage.swift "
            "docs/z-image.md and unslothai/unsloth PR #8291 (both third-party readings, they agree)",
            "Tongyi-MAI/Z-Image model card: 28-50 steps, guidance_scale 3-5 (= ComfyUI cfg 4-6), negative prompts",
        ),
    ),
    "turbo": VariantSettings(
        name="turbo",
        title="Z-Image-Turbo",
        distilled=True,
        sampling_shift=3.0,
        reference_shift=3.0,
        steps=8,
        cfg=1.0,
        cfg_range=(1.0, 1.0),
        preview_steps=8,  # its full distilled count: fewer steps are not what the user will render
        sources=(
            "ComfyUI 0.8 comfy/supported_models.py ZImage.sampling_settings shift 3.0",
            "Comfy-Org/workflow_templates templates/image_z_image_turbo.json: ModelSamplingAuraFlow 3, KSampler "
            "8 steps, cfg 1",
            "Tongyi-MAI/Z-Image-Turbo scheduler_config.json shift 3.0 (candle z_image_turbo(); zimage.swift docs)",
            "Tongyi-MAI/Z-Image-Turbo model card: num_inference_steps 9 (8 DiT forwards), guidance_scale 0",
        ),
    ),
}


def variant_settings(name: str) -> VariantSettings:
    """The settings of "base" or "turbo" (resolve "auto" first with ``resolve_variant``)."""
    if name not in VARIANTS:
        raise ValueError(f"model variant must be one of {MODEL_VARIANTS} (resolve 'auto' first), got {name!r}")
    return VARIANTS[name]


def resolve_variant(choice: str, weights: str | os.PathLike | None) -> tuple[str, str]:
    """(variant, reason): the explicit choice, or for "auto" the weights file's name ("turbo" in it: Turbo)."""
    if choice not in MODEL_VARIANT_CHOICES:
        raise ValueError(f"model.variant must be one of {MODEL_VARIANT_CHOICES}, got {choice!r}")
    if choice != "auto":
        return choice, f"model.variant = {choice!r}"
    if not weights:
        return "base", "model.variant 'auto' with random init: nothing distilled to protect, trained as Base"
    name = Path(weights).name
    if "turbo" in name.lower():
        return "turbo", f"model.variant 'auto': the weights file name {name!r} contains 'turbo'"
    return "base", (
        f"model.variant 'auto': the weights file name {name!r} does not contain 'turbo', so Base (the weights "
        "themselves cannot tell Base from Turbo: set model.variant to 'turbo' if this is Turbo)"
    )


def lora_variant(metadata: dict[str, str], origin: str) -> str | None:
    """The variant a LoRA file's metadata records (None: not recorded, e.g. another trainer's file)."""
    value = metadata.get(LORA_VARIANT_KEY)
    if value is None:
        return None
    if value not in MODEL_VARIANTS:
        raise ValueError(f"{origin}: metadata {LORA_VARIANT_KEY}={value!r} is not one of {MODEL_VARIANTS}")
    return value


def read_lora_variant(path: str | os.PathLike) -> str | None:
    """The recorded variant of a LoRA file, from its safetensors header only (no tensor is read)."""
    from safetensors import safe_open

    with safe_open(os.fspath(path), framework="pt") as handle:
        metadata = handle.metadata() or {}
    return lora_variant(metadata, os.fspath(path))


def mismatch_warning(trained_for: str | None, applied_to: str, lora_name: str) -> str | None:
    """A warning when a LoRA trained for one variant is applied to the other (None: nothing to warn)."""
    if trained_for is None or trained_for == applied_to:
        return None
    was, now = VARIANTS[trained_for].title, VARIANTS[applied_to].title
    return (
        f"WARNING: {lora_name} was trained on {was} but is applied to {now}. Base is not Turbo's parent "
        f"(diffusion-pipe#503): expect a weaker or broken effect. Use a LoRA trained on {now}, or set "
        f"model_variant to {trained_for!r} if the model really is {was}."
    )
