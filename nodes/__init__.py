"""The pack's ComfyUI nodes: thin adapters over training/ (ComfyUI types, paths, progress, interruption)."""

from __future__ import annotations

from . import comfy_bridge, run_history
from .hardware_node import HardwareProfile
from .lora_node import LoadTrainedLoRA
from .model_node import LoadTrainedModel
from .multinode import MultiNode
from .pack_node import PackDataset
from .plan_node import TrainingPlan
from .report_node import TrainingReport
from .train_node import Train

NODE_CLASS_MAPPINGS = {
    "WhetstonePackDataset": PackDataset,
    "WhetstoneHardwareProfile": HardwareProfile,
    "WhetstoneTrainingPlan": TrainingPlan,
    "WhetstoneTrain": Train,
    "WhetstoneLoadTrainedLoRA": LoadTrainedLoRA,
    "WhetstoneLoadTrainedModel": LoadTrainedModel,
    "WhetstoneTrainingReport": TrainingReport,
    "WhetstoneMultiNode": MultiNode,
}

NODE_DISPLAY_NAME_MAPPINGS = {
    "WhetstonePackDataset": "Pack Dataset (Whetstone)",
    "WhetstoneHardwareProfile": "Hardware Profile (Whetstone)",
    "WhetstoneTrainingPlan": "Training Plan (Whetstone)",
    "WhetstoneTrain": "Train (Whetstone)",
    "WhetstoneLoadTrainedLoRA": "Load Trained LoRA (Whetstone)",
    "WhetstoneLoadTrainedModel": "Load Trained Model (Whetstone)",
    "WhetstoneTrainingReport": "Training Report (Whetstone)",
    "WhetstoneMultiNode": "Multi-Node Run (Whetstone)",
}


def register_with_comfyui() -> None:
    """Register the whetstone_datasets / whetstone_runs folders and the chart's history route; no-op outside ComfyUI."""
    comfy_bridge.register_folders()
    comfy_bridge.add_get_route(run_history.ROUTE, run_history.respond)
