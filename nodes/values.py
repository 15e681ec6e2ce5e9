"""The values that flow along Whetstone links between nodes (custom ComfyUI types), and their type names."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

DATASET_TYPE = "WHETSTONE_DATASET"
HARDWARE_TYPE = "WHETSTONE_HARDWARE"
PLAN_TYPE = "WHETSTONE_PLAN"
RUN_TYPE = "WHETSTONE_RUN"
MACHINES_TYPE = "WHETSTONE_MACHINES"


@dataclass(frozen=True)
class DatasetRef:
    """A finished shard set: its folder (holding manifest.json) and what it holds."""

    path: Path
    samples: int
    skipped: int
    buckets: dict[str, int] = field(default_factory=dict)
    latent_encoder: str | None = None
    text_encoder: str | None = None


@dataclass(frozen=True)
class HardwareChoice:
    """A hardware profile (measured here, or simulated from a tier) and the tier it is closest to."""

    profile: Any  # training.hardware.discovery.HardwareProfile
    tier: Any  # training.hardware.tiers.Tier
    reason: str
    simulated: bool = False


@dataclass(frozen=True)
class RunRef:
    """A training run folder and its outcome."""

    run_dir: Path
    lora_path: Path
    lora_name: str  # the name in ComfyUI's loras list
    state: str  # "completed" or "stopped"
    summary: dict = field(default_factory=dict)
    model_path: Path | None = None  # mode 'full': the fine-tuned transformer (in diffusion_models), else None
    model_name: str | None = None  # its name in ComfyUI's diffusion_models list
    # A background run with Preview Settings: the wired VAE's decoder (latents -> pixels), for Wait for Run to turn
    # the engine's preview latents into images as the foreground Train node does. Lives in this process only.
    decode_previews: Any = None
