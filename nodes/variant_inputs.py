"""The nodes' Base/Turbo inputs (optional, so workflows saved before them still load): which Z-Image variant the
model is, and how a Turbo run keeps its distillation (``training.engine.variant_setup``)."""

from __future__ import annotations

from ..training.vocabulary import MODEL_VARIANT_CHOICES, TURBO_TRAININGS
from . import comfy_bridge
from .validation import Choice

NO_ADAPTER = "none"

MODEL_VARIANT = Choice(
    MODEL_VARIANT_CHOICES,
    "Which Z-Image the model is: base or turbo. The weights look the same, so 'auto' only reads the model file's "
    "name ('turbo' in it: Turbo).",
)
TURBO_TRAINING = Choice(
    TURBO_TRAININGS,
    "Turbo only. adapter: merge training_adapter (ostris' Turbo training adapter) into the model while training; "
    "dedistilled: the model is De-Turbo; raw: train Turbo as it is (breaks its 8-step distillation).",
)


def variant_value(settings: dict) -> str:
    return MODEL_VARIANT.check("model_variant", settings.get("model_variant", MODEL_VARIANT.default))


def turbo_training_value(settings: dict) -> str:
    return TURBO_TRAINING.check("turbo_training", settings.get("turbo_training", TURBO_TRAINING.default))


def train_inputs() -> dict[str, tuple]:
    """The Train node's optional inputs: the variant, and for Turbo how it is protected and with which adapter."""
    adapters = [NO_ADAPTER, *comfy_bridge.list_files(comfy_bridge.LORAS_FOLDER)]
    adapter_tip = "Turbo with turbo_training 'adapter': the de-distillation LoRA (from the loras folder)."
    return {
        "model_variant": MODEL_VARIANT.declare(),
        "turbo_training": TURBO_TRAINING.declare(),
        "training_adapter": (adapters, {"default": NO_ADAPTER, "tooltip": adapter_tip}),
    }


def model_settings(settings: dict) -> dict[str, str]:
    """The config's model.variant / turbo_training / training_adapter from the Train node's optional inputs."""
    adapter = settings.get("training_adapter", NO_ADAPTER)
    if not isinstance(adapter, str) or (adapter != NO_ADAPTER and ".." in adapter):
        raise ValueError(f"training_adapter={adapter!r} must be a name from the loras list or {NO_ADAPTER!r}")
    path = "" if adapter == NO_ADAPTER else str(comfy_bridge.full_path(comfy_bridge.LORAS_FOLDER, adapter))
    return {
        "variant": variant_value(settings),
        "turbo_training": turbo_training_value(settings),
        "training_adapter": path,
    }
