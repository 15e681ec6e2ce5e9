"""The LoRA target table is the one definition: the planner's parameter count equals peft's for every preset."""

from __future__ import annotations

import typing

import pytest
import torch

from training.engine import config as engine_config
from training.engine import config_sections
from training.hardware.memory import MemoryModel, lora_params
from training.hardware.request import PlanRequest
from training.model.config import PRESETS
from training.model.lora import LoraSettings, attach_lora, lora_layers
from training.model.targets import LORA_TARGETS, TARGET_PRESETS, LoraTargets, infer_targets
from training.model.zimage import ZImageTransformer
from training.vocabulary import ATTENTION_BACKENDS, MODES, Mode


def trainable_on_meta(preset: str, rank: int, targets: str) -> tuple[int, list[str]]:
    """peft's trainable parameter count on the real model, built on the meta device (no memory, no init)."""
    with torch.device("meta"):
        model = ZImageTransformer(PRESETS[preset])
        attach_lora(model, LoraSettings(rank=rank, targets=targets))
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return trainable, sorted(lora_layers(model))


@pytest.mark.parametrize("targets", LORA_TARGETS)
@pytest.mark.parametrize("preset", ["z-image", "tiny"])
def test_memory_model_counts_what_peft_trains(preset, targets):
    rank = 128 if preset == "z-image" else 4
    trainable, _ = trainable_on_meta(preset, rank, targets)
    assert lora_params(PRESETS[preset], rank, targets) == trainable


def test_all_preset_counts_adaln_adapters():
    """The adaLN adapters of 'all' (32 modulated blocks at rank 128: ~64 M parameters, ~0.95 GiB of fp32 weights,
    gradients and AdamW states) are in the planner's fixed bytes."""
    model = PRESETS["z-image"]
    extra = lora_params(model, 128, "all") - lora_params(model, 128, "attention+ffn+refiners")
    assert extra == 32 * 128 * (256 + 4 * 3840)
    memory = MemoryModel()
    fixed = {t: sum(memory.fixed_bytes("lora", 1, "none", 128, lora_targets=t).values()) for t in LORA_TARGETS}
    assert (fixed["all"] - fixed["attention+ffn+refiners"]) / 2**30 == pytest.approx(0.95, abs=0.01)


@pytest.mark.parametrize("targets", LORA_TARGETS)
def test_infer_targets_recovers_every_preset(targets):
    _, modules = trainable_on_meta("tiny", 2, targets)
    assert infer_targets(modules) == targets


def test_vocabularies_are_defined_once():
    assert LORA_TARGETS == typing.get_args(LoraTargets) == tuple(TARGET_PRESETS)
    assert MODES == typing.get_args(Mode)
    assert config_sections.LORA_TARGETS is LORA_TARGETS and engine_config.MODES is MODES
    for bad, field in (("bogus", "lora_targets"), ("bogus", "attention_backend")):
        with pytest.raises(ValueError, match=field):
            PlanRequest(mode="lora", resolution=512, **{field: bad})
    assert "flash" in ATTENTION_BACKENDS
