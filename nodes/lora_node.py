"""Load Trained LoRA: MODEL + a LoRA (from a run or the loras list) -> patched MODEL, refusing keys that match nothing."""

from __future__ import annotations

import logging

from ..training.model.variants import VARIANTS, mismatch_warning, read_lora_variant
from . import comfy_bridge, paths
from .lora_keys import match_keys
from .validation import Float, check_all
from .values import RUN_TYPE
from .variant_inputs import MODEL_VARIANT, variant_value

logger = logging.getLogger(__name__)

WIDGETS = {
    "strength": Float(1.0, -10.0, 10.0, "How strongly the LoRA changes the model (1.0 = as trained, 0 = off)."),
}


class LoraKeysUnmatched(ValueError):
    """Some tensors of the LoRA file would change nothing in this model."""


class LoadTrainedLoRA:
    DESCRIPTION = (
        "Applies a LoRA to a diffusion model with ComfyUI's own LoRA patching. Takes the LoRA of a connected Train "
        "run, or one chosen from the loras folder. Unlike the stock loader it fails, listing the keys, when any key "
        "of the file matches nothing in the model (a LoRA for another model or a broken export)."
    )
    CATEGORY = "Whetstone"
    FUNCTION = "load"
    RETURN_TYPES = ("MODEL", "STRING")
    RETURN_NAMES = ("model", "report")
    OUTPUT_TOOLTIPS = ("The model with the LoRA applied.", "Which file was applied and how many weights it patches.")

    @classmethod
    def INPUT_TYPES(cls):
        loras = comfy_bridge.list_files(comfy_bridge.LORAS_FOLDER)
        return {
            "required": {
                "model": ("MODEL", {"tooltip": "The Z-Image diffusion model to patch (from Load Diffusion Model)."}),
                "lora_name": (loras, {"tooltip": "A LoRA from ComfyUI's loras folder; ignored when a run is linked."}),
                **{name: widget.declare() for name, widget in WIDGETS.items()},
            },
            "optional": {
                "run": (RUN_TYPE, {"tooltip": "A finished Train run: its LoRA is used instead of lora_name."}),
                "model_variant": MODEL_VARIANT.declare(),
            },
        }

    @classmethod
    def VALIDATE_INPUTS(cls, lora_name, input_types):
        """At queue time: lora_name must be in the loras list unless a Train run is linked (then it is unused).

        Taking ``input_types`` replaces ComfyUI's link type checks for this node, so they are done here.
        """
        for name, expected in (("model", "MODEL"), ("run", RUN_TYPE)):
            received = input_types.get(name)
            if received is not None and received not in (expected, "*"):
                return f"{name} is linked to a {received} output; it needs {expected}"
        if lora_name is not None and (
            not isinstance(lora_name, str) or ".." in lora_name or lora_name.startswith(("/", "\\"))
        ):
            return f"lora_name={lora_name!r} must be a name from the loras list"
        if "run" in input_types:
            return True
        if not lora_name:
            return "lora_name: no LoRA chosen; pick one from the loras list or link a Train run to `run`"
        if lora_name not in comfy_bridge.list_files(comfy_bridge.LORAS_FOLDER):
            return (
                f"lora_name {lora_name!r} is not in the loras folder; pick one from the list, or link a Train run "
                "to `run` to use the LoRA it trains"
            )
        return True

    def load(self, model, lora_name, strength, run=None, model_variant="auto"):
        strength = check_all(WIDGETS, {"strength": strength})["strength"]
        applied_to = variant_value({"model_variant": model_variant})
        lora_path = self._lora_path(lora_name, run)
        state = comfy_bridge.load_lora_state_dict(lora_path)
        key_map = comfy_bridge.lora_key_map(model)
        match = match_keys(state.keys(), key_map)
        if not match.ok:
            raise LoraKeysUnmatched(
                f"LoRA {lora_path} does not fit this model: {match.describe()}. Was it trained for a different model "
                "(Z-Image needs a Z-Image LoRA)?"
            )
        if strength == 0:
            report = f"{lora_path.name}: strength 0, model unchanged ({len(match.modules)} modules match)"
            return {"ui": {"text": [report]}, "result": (model, report)}
        patched, patch_count, applied_count = comfy_bridge.patch_model_with_lora(model, state, key_map, strength)
        if patch_count != len(match.modules) or applied_count != patch_count:
            raise LoraKeysUnmatched(
                f"LoRA {lora_path}: {len(match.modules)} modules in the file, {patch_count} patches built, "
                f"{applied_count} applied to the model; every module must patch exactly one weight"
            )
        report = f"{lora_path.name}: {applied_count} weights patched at strength {strength:g}, 0 unmatched keys"
        logger.info(report)
        report = _with_variant_check(report, lora_path, applied_to)
        return {"ui": {"text": [report]}, "result": (patched, report)}

    @staticmethod
    def _lora_path(lora_name, run):
        if run is not None:
            allowed = paths.AllowedRoots("loras or runs", (*paths.lora_roots().roots, *paths.run_roots().roots))
            return paths.confine(str(run.lora_path), allowed, "run.lora_path", must_exist=True)
        if not lora_name:
            raise ValueError("no LoRA chosen: pick one in lora_name or link a Train run")
        return comfy_bridge.full_path(comfy_bridge.LORAS_FOLDER, lora_name)


def _with_variant_check(report: str, lora_path, applied_to: str) -> str:
    """The report, with a warning first when the LoRA's recorded variant is not the model's (``model_variant``)."""
    trained_for = read_lora_variant(lora_path)
    if trained_for is None:
        return report
    if applied_to == "auto":
        note = (
            f"{lora_path.name} was trained on {VARIANTS[trained_for].title}; set model_variant to check that the "
            "model is that variant (the weights cannot tell)"
        )
        logger.info(note)
        return f"{report}\n{note}"
    warning = mismatch_warning(trained_for, applied_to, lora_path.name)
    if warning is None:
        return f"{report}\ntrained on {VARIANTS[trained_for].title}, as the model"
    logger.warning(warning)
    return f"{warning}\n{report}"
