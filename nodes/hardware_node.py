"""Hardware Profile: what this machine has (GPUs, links, RAM, disk) and the tier it is closest to."""

from __future__ import annotations

import logging

from ..training.hardware.discovery import discover
from ..training.hardware.tiers import nearest_tier
from . import comfy_bridge
from .validation import Toggle, check_all, declare
from .values import HARDWARE_TYPE, HardwareChoice

logger = logging.getLogger(__name__)

WIDGETS = {
    "free_comfyui_memory": Toggle(
        True,
        "Unload ComfyUI's models and empty its GPU cache before measuring, so the free memory is what training can "
        "use (they reload when needed).",
    ),
}


def describe_hardware(choice: HardwareChoice) -> str:
    profile = choice.profile
    lines = [profile.describe(), f"Disk free for runs: {profile.disk_free_bytes / 2**30:.0f} GiB", choice.reason]
    for index, gpu in enumerate(profile.gpus):
        lines.append(f"GPU {index}: {gpu.name}, {gpu.free_bytes / 2**30:.1f} of {gpu.total_bytes / 2**30:.1f} GiB free")
    lines.extend(f"Note: {note}" for note in profile.notes)
    return "\n".join(lines)


class HardwareProfile:
    DESCRIPTION = (
        "Measures this machine (GPUs and their free memory, links between them, CPU cores, RAM, free disk where "
        "runs are written) and names the nearest hardware tier. Runs again on every queue, since free memory changes."
    )
    CATEGORY = "Whetstone"
    FUNCTION = "measure"
    OUTPUT_NODE = True
    RETURN_TYPES = (HARDWARE_TYPE, "STRING")
    RETURN_NAMES = ("hardware", "summary")
    OUTPUT_TOOLTIPS = (
        "This machine's profile and nearest tier, for Training Plan.",
        "A readable summary: GPUs, free memory, links, tier and why.",
    )

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": declare(WIDGETS)}

    @classmethod
    def IS_CHANGED(cls, **_inputs):
        return float("nan")  # free memory changes between queues: always measure again

    def measure(self, **settings):
        values = check_all(WIDGETS, settings)
        if values["free_comfyui_memory"]:
            comfy_bridge.unload_models()
        runs_root = comfy_bridge.folder_roots(comfy_bridge.RUNS_FOLDER)[0]
        runs_root.mkdir(parents=True, exist_ok=True)
        profile = discover(output_dir=runs_root)
        tier, reason = nearest_tier(profile)
        choice = HardwareChoice(profile=profile, tier=tier, reason=reason)
        summary = describe_hardware(choice)
        return {"ui": {"text": [summary]}, "result": (choice, summary)}
