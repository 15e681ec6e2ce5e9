"""Load Trained Model: a full fine-tune's transformer (from a run or the diffusion_models list) -> MODEL, through
ComfyUI's own diffusion-model loader, refusing a file whose keys do not all match the model ComfyUI builds."""

from __future__ import annotations

import logging

from . import comfy_bridge, paths
from .values import RUN_TYPE

logger = logging.getLogger(__name__)
_SHOWN = 5  # keys listed in a refusal


class ModelKeysMismatch(ValueError):
    """ComfyUI's loader left model weights unset or file tensors unused."""


class LoadTrainedModel:
    DESCRIPTION = (
        "Loads a full fine-tune's Z-Image transformer with ComfyUI's own diffusion-model loader (as Load Diffusion "
        "Model does). Takes the model of a connected Train run (mode full), or one chosen from diffusion_models (the "
        "Train node writes them to diffusion_models/whetstone/<run_name>.safetensors). Unlike the stock loader it "
        "fails, listing the keys, when any weight is missing or any tensor of the file is unused."
    )
    CATEGORY = "Whetstone"
    FUNCTION = "load"
    RETURN_TYPES = ("MODEL", "STRING")
    RETURN_NAMES = ("model", "report")
    OUTPUT_TOOLTIPS = ("The fine-tuned diffusion model, for KSampler.", "Which file was loaded and its key check.")

    @classmethod
    def INPUT_TYPES(cls):
        models = comfy_bridge.list_files(comfy_bridge.DIFFUSION_MODELS_FOLDER)
        return {
            "required": {
                "model_name": (
                    models,
                    {"tooltip": "A model from diffusion_models (whetstone/ holds fine-tunes); ignored with a run."},
                ),
            },
            "optional": {
                "run": (RUN_TYPE, {"tooltip": "A finished Train run of mode full: its model is loaded instead."}),
            },
        }

    @classmethod
    def VALIDATE_INPUTS(cls, model_name, input_types):
        """At queue time: model_name must be in the list unless a Train run is linked (it does not exist yet).

        Taking ``input_types`` replaces ComfyUI's link type checks for this node, so they are done here."""
        received = input_types.get("run")
        if received is not None and received not in (RUN_TYPE, "*"):
            return f"run is linked to a {received} output; it needs {RUN_TYPE}"
        if model_name is not None and (
            not isinstance(model_name, str) or ".." in model_name or model_name.startswith(("/", "\\"))
        ):
            return f"model_name={model_name!r} must be a name from the diffusion_models list"
        if "run" in input_types:
            return True
        if not model_name or model_name not in comfy_bridge.list_files(comfy_bridge.DIFFUSION_MODELS_FOLDER):
            return (
                f"model_name {model_name!r} is not in the diffusion_models folder; pick one from the list, or link a "
                "Train run of mode full to `run`"
            )
        return True

    def load(self, model_name, run=None):
        path = self._model_path(model_name, run)
        patcher, missing, unexpected = comfy_bridge.load_diffusion_model(path)
        if missing or unexpected:
            raise ModelKeysMismatch(
                f"{path} does not fit the model ComfyUI built for it: {len(missing)} weight(s) missing "
                f"({', '.join(missing[:_SHOWN])}), {len(unexpected)} tensor(s) unused "
                f"({', '.join(unexpected[:_SHOWN])}). Is it a Z-Image transformer (Whetstone's full fine-tune)?"
            )
        report = f"{path.name}: loaded with ComfyUI's diffusion-model loader, 0 missing and 0 unexpected keys"
        logger.info(report)
        return {"ui": {"text": [report]}, "result": (patcher, report)}

    @staticmethod
    def _model_path(model_name, run):
        if run is not None:
            if run.model_path is None:
                raise ValueError(
                    f"the linked run {run.run_dir.name!r} trained a LoRA, not the full model: use Load Trained LoRA, "
                    "or train with mode full"
                )
            return paths.confine(str(run.model_path), paths.diffusion_model_roots(), "run.model_path", must_exist=True)
        if not model_name:
            raise ValueError("no model chosen: pick one in model_name or link a Train run of mode full")
        return comfy_bridge.full_path(comfy_bridge.DIFFUSION_MODELS_FOLDER, model_name)
