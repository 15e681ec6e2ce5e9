"""The pack's ComfyUI nodes: thin adapters over training/ (ComfyUI types, paths, progress, interruption)."""

from __future__ import annotations

import functools
import logging

from . import comfy_bridge, jobs_api, preview_jobs, run_history
from .hardware_node import HardwareProfile
from .lora_node import LoadTrainedLoRA
from .model_node import LoadTrainedModel
from .multinode import MultiNode
from .pack_node import PackDataset
from .plan_node import TrainingPlan
from .previews import PreviewSettings
from .report_node import TrainingReport
from .train_node import Train
from .wait_node import WaitForRun

logger = logging.getLogger(__name__)

NODE_CLASS_MAPPINGS = {
    "WhetstonePackDataset": PackDataset,
    "WhetstoneHardwareProfile": HardwareProfile,
    "WhetstoneTrainingPlan": TrainingPlan,
    "WhetstoneTrain": Train,
    "WhetstoneLoadTrainedLoRA": LoadTrainedLoRA,
    "WhetstoneLoadTrainedModel": LoadTrainedModel,
    "WhetstoneTrainingReport": TrainingReport,
    "WhetstoneMultiNode": MultiNode,
    "WhetstonePreviewSettings": PreviewSettings,
    "WhetstoneWaitForRun": WaitForRun,
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
    "WhetstonePreviewSettings": "Preview Settings (Whetstone)",
    "WhetstoneWaitForRun": "Wait for Run (Whetstone)",
}


def register_with_comfyui() -> None:
    """Register the whetstone_datasets / whetstone_runs folders and the chart's history route; no-op outside ComfyUI."""
    comfy_bridge.register_folders()
    comfy_bridge.add_get_route(run_history.ROUTE, run_history.respond)
    for method, action in (("GET", "list"), ("GET", "report"), ("POST", "stop"), ("POST", "resume")):
        path = jobs_api.ROUTE if action == "list" else f"{jobs_api.ROUTE}/{action}"
        comfy_bridge.add_route(method, path, functools.partial(jobs_api.respond, action))
    for action, path in (("previews", preview_jobs.ROUTE), ("preview_image", preview_jobs.IMAGE_ROUTE)):
        comfy_bridge.add_route("GET", path, functools.partial(preview_jobs.respond, action))
    if comfy_bridge.comfyui_present():
        try:
            jobs_api.resume_scheduling()  # jobs queued or running before a restart go on
        except Exception:  # the nodes must still load; the jobs panel's first request starts the scheduler
            logger.exception("could not resume the background jobs at start; opening the Jobs panel retries")
