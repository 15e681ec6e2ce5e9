"""Which Z-Image variant a run trains, and keeping Turbo's distillation intact while it trains.

Training the distilled Turbo weights directly breaks the distillation: LoRAs come out blurry at 8 steps and need
~50 (DiffSynth#1251), grainy or learning nothing (musubi#769), or without effect (ai-toolkit#545). The peers'
remedies, all offered here: merge a de-distillation adapter into the frozen base for the run and leave it out of the
LoRA (ai-toolkit's training adapter; musubi ``--base_weights``; diffusion-pipe ``merge_adapters``), or train on
de-distilled weights (ostris' De-Turbo). A Turbo run with neither is refused unless ``model.turbo_training`` is
"raw", which trains anyway with a loud warning.

Imports no config class (``config.py`` calls ``check_variant_config`` from its validation): configs are duck-typed.
"""

from __future__ import annotations

import logging
from pathlib import Path

from ..model.variants import DE_TURBO_HINT, LORA_VARIANT_KEY, TURBO_ADAPTER_HINT, resolve_variant, variant_settings
from ..vocabulary import LORA_MODES

logger = logging.getLogger(__name__)

_TURBO_DAMAGE = (
    "training the distilled Turbo weights directly breaks their 8-step distillation: LoRAs come out blurry at 8 "
    "steps and need ~50 (DiffSynth#1251), grainy or learning nothing (musubi#769), or without effect (ai-toolkit#545)"
)


def check_variant_config(config) -> None:
    """The rules that need no file: a training adapter is for Turbo LoRA / QLoRA runs with turbo_training 'adapter'."""
    model = config.model
    if not model.training_adapter:
        return
    if model.variant == "base":
        raise ValueError(
            "model.training_adapter is a de-distillation adapter for Turbo, but model.variant is 'base': remove "
            "model.training_adapter, or set model.variant to 'turbo'"
        )
    if config.mode not in LORA_MODES:
        raise ValueError(
            "model.training_adapter with mode 'full': the adapter would stay merged into the fine-tuned weights; "
            f"fine-tune {DE_TURBO_HINT} with model.turbo_training 'dedistilled' instead, or train a LoRA"
        )
    if model.turbo_training != "adapter":
        raise ValueError(
            f"model.training_adapter is set but model.turbo_training is {model.turbo_training!r}: set "
            "model.turbo_training to 'adapter', or remove model.training_adapter"
        )


def run_variant(config) -> tuple[str, str]:
    """(variant, reason), refusing a Turbo run that nothing protects (a ValueError naming the fixes)."""
    variant, reason = resolve_variant(config.model.variant, config.model.weights)
    model = config.model
    if variant == "turbo" and model.turbo_training == "adapter" and not model.training_adapter:
        adapter = (
            f"set model.training_adapter to {TURBO_ADAPTER_HINT} (merged into the frozen base for the run, left "
            "out of the LoRA, as ai-toolkit does); "
            if config.mode in LORA_MODES
            else ""
        )
        raise ValueError(
            f"model.variant: this run trains Z-Image-Turbo ({reason}), and {_TURBO_DAMAGE}. Do one of: {adapter}"
            f"train on {DE_TURBO_HINT} with model.turbo_training 'dedistilled'; train Z-Image (Base) instead "
            "(model.variant 'base' if these weights are Base); or, knowing the result will likely need more steps "
            "and CFG, set model.turbo_training to 'raw'"
        )
    if variant == "base" and model.training_adapter:
        raise ValueError(
            f"model.training_adapter is set but the run trains Base ({reason}): set model.variant to 'turbo' if "
            "the weights are Turbo, or remove model.training_adapter"
        )
    return variant, reason


def check_adapter_path(config) -> None:
    """The adapter file exists (checked with the config's other paths, before any rank starts)."""
    adapter = config.model.training_adapter
    if adapter and not Path(adapter).is_file():
        raise ValueError(
            f"model.training_adapter {adapter} is not a file: give the de-distillation LoRA's .safetensors path "
            f"({TURBO_ADAPTER_HINT}), or fix the path"
        )


def prepare_variant(model, config) -> str:
    """Resolve the variant (logged with its reason) and protect a Turbo run as configured; before LoRA/QLoRA wrap.

    Returns "base" or "turbo", the variant the LoRA is for."""
    variant, reason = run_variant(config)
    settings = variant_settings(variant)
    logger.info(
        "model variant: %s (%s); sampled in ComfyUI with shift %g, %d steps, cfg %g",
        settings.title,
        reason,
        settings.sampling_shift,
        settings.steps,
        settings.cfg,
    )
    if variant != "turbo":
        return variant
    how = config.model.turbo_training
    if how == "adapter":
        from ..model.lora_file import merge_lora_file_into

        check_adapter_path(config)
        merge_lora_file_into(model, config.model.training_adapter, strict=True)
        logger.info(
            "Turbo: de-distillation adapter %s merged into the frozen base for this run; the saved LoRA leaves it "
            "out and is meant for plain Turbo",
            config.model.training_adapter,
        )
    elif how == "dedistilled":
        logger.info("Turbo: model.turbo_training 'dedistilled': the weights are taken as de-distilled (De-Turbo)")
    else:
        logger.warning(
            "Turbo: model.turbo_training 'raw': %s. Training anyway as configured; prefer model.training_adapter "
            "(%s) or %s",
            _TURBO_DAMAGE,
            TURBO_ADAPTER_HINT,
            DE_TURBO_HINT,
        )
    return variant


def lora_metadata(variant: str, config) -> dict[str, str]:
    """What a LoRA file records of the variant it was trained for (and how Turbo was protected)."""
    metadata = {LORA_VARIANT_KEY: variant}
    if variant == "turbo":
        metadata["turbo_training"] = config.model.turbo_training
        if config.model.training_adapter:
            metadata["training_adapter"] = Path(config.model.training_adapter).name
    return metadata
