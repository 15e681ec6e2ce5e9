"""Previews for the Train node: the Preview Settings node encodes the validation prompts with the wired CLIP before
the run (its output links to Train's optional ``preview_settings``); while the run trains, the engine's preview
latents are decoded with the wired VAE and sent to the Train node ("whetstone.preview") as images in ComfyUI's temp
folder (served by /view). A separate node keeps Train's widgets (and every saved workflow) as they were.

Decoding runs on the CPU with the wired VAE's weights in `training.model.flux_vae.FluxVAE` (ComfyUI's Flux decoder,
same operations): the training process holds the GPU the plan sized it for, so the node never competes with it for
memory. The PNGs go to the run folder (``previews/step_..._p000.png``, for the report's grid and later) and a copy to
``<temp>/whetstone_previews/<run>/`` for the browser.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import torch

from ..training.atomic import write_bytes_atomic
from ..training.engine.preview import MAX_PROMPTS, save_prompt_features
from ..training.engine.preview_images import decode_new_previews
from ..training.model.flux_vae import FluxEncoderShape, FluxVAE
from . import comfy_bridge
from .encoders import ComfyTextEncoder
from .validation import Float, Int, SettingRefused, Text, check_all, declare

logger = logging.getLogger(__name__)

PREVIEW_EVENT = "whetstone.preview"
PREVIEWS_TYPE = "WHETSTONE_PREVIEWS"
FEATURES_FILE = "preview_prompts.safetensors"
TEMP_SUBFOLDER = "whetstone_previews"

WIDGETS = {
    "validation_prompts": Text(
        "",
        "Preview prompts, one per line. Encoded with the connected CLIP before training; the images appear in the "
        "Train node as the run trains, sampled as ComfyUI's KSampler would (euler, simple, ComfyUI's shift).",
        16_384,
        multiline=True,
    ),
    "negative_prompt": Text("", "Negative prompt for previews with cfg above 1.", 2048),
    "every": Int(100, 0, 1_000_000, "Preview every N steps (and at the start and end); 0: at the end only."),
    "steps": Int(0, 0, 1000, "Sampler steps per preview; 0: the model variant's (Turbo 8, Base 20 of its 50)."),
    "cfg": Float(0.0, 0.0, 100.0, "ComfyUI cfg of the previews; 0: the model variant's (Turbo 1, Base 4)."),
    "seed": Int(0, 0, 2**31 - 1, "Noise seed of every preview.", control_after_generate=False),
    "width": Int(512, 64, 2048, "Preview width in pixels (a multiple of 16).", step=16),
    "height": Int(512, 64, 2048, "Preview height in pixels (a multiple of 16).", step=16),
}


def prompt_lines(text: str) -> list[str]:
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    if len(lines) > MAX_PROMPTS:
        raise SettingRefused(f"validation_prompts has {len(lines)} lines; at most {MAX_PROMPTS} prompts are allowed")
    return lines


@dataclass(frozen=True)
class EncodedPrompts:
    texts: list[str]
    positives: list[torch.Tensor]
    negative: torch.Tensor


def encode_prompts(clip, values: dict) -> EncodedPrompts:
    """The prompts' features; refuses an empty prompt list, naming the input."""
    texts = prompt_lines(values["validation_prompts"])
    if not texts:
        raise SettingRefused("validation_prompts is empty: write one preview prompt per line")
    encoder = ComfyTextEncoder(clip)
    positives = encoder.encode(texts)
    negative = encoder.encode([values["negative_prompt"]])[0]
    logger.info("encoded %d preview prompt(s) with the connected CLIP", len(texts))
    return EncodedPrompts(texts=texts, positives=positives, negative=negative)


def preview_section(run_dir: Path, values: dict) -> dict:
    """The run config's ``preview`` section for these settings (the features file lives in the run folder)."""
    return {
        "features": str(run_dir / FEATURES_FILE),
        "every": values["every"],
        "steps": values["steps"] or None,  # 0: the variant's (training.engine.preview.sampler_settings)
        "cfg": values["cfg"] or None,
        "seed": values["seed"],
        "width": values["width"],
        "height": values["height"],
    }


def write_prompts(prompts: EncodedPrompts, run_dir: Path) -> None:
    save_prompt_features(run_dir / FEATURES_FILE, prompts.texts, prompts.positives, prompts.negative)


def vae_decoder(vae):
    """A CPU float32 decoder with the weights of a ComfyUI VAE object (Flux: Z-Image's 16-channel VAE)."""
    model = getattr(vae, "first_stage_model", None)
    if not isinstance(model, torch.nn.Module):
        raise SettingRefused("the VAE input of Train is not a ComfyUI VAE; connect Load VAE with ae.safetensors")
    state = {name: t.detach().to("cpu", torch.float32) for name, t in model.state_dict().items()}
    shape = FluxEncoderShape.from_file(
        {name: tuple(t.shape) for name, t in state.items()}, "the VAE connected to Train"
    )
    if "decoder.conv_in.weight" not in state:
        raise SettingRefused("the VAE connected to Train has no decoder; connect Load VAE with ae.safetensors")
    logger.info("previews decode on the CPU with the connected VAE (the training process keeps the GPU)")
    return FluxVAE(shape, state).decode


class PreviewWatcher:
    """Decodes the run's new previews and sends them to the node; ``poll`` is called from the node's follow loop."""

    def __init__(self, run_dir: Path, run_name: str, node_id, decode) -> None:
        self.run_dir, self.run_name, self.node_id, self.decode = run_dir, run_name, node_id, decode
        self.sent = 0

    def poll(self) -> None:
        for event, paths in decode_new_previews(self.run_dir, self.decode):
            subfolder = f"{TEMP_SUBFOLDER}/{self.run_name}"
            folder = comfy_bridge.temp_directory() / TEMP_SUBFOLDER / self.run_name
            images = []
            for path in paths:
                write_bytes_atomic(folder / path.name, path.read_bytes(), fsync=False)
                images.append({"filename": path.name, "subfolder": subfolder, "type": "temp"})
            comfy_bridge.send_event(
                PREVIEW_EVENT,
                {
                    "node": self.node_id,
                    "run": self.run_name,
                    "step": event["step"],
                    "prompts": event.get("prompts", []),
                    "images": images,
                },
            )
            self.sent += 1


@dataclass(frozen=True)
class PreviewRequest:
    """What Preview Settings hands to Train: the encoded prompts, a decoder with the VAE's weights, the settings."""

    prompts: EncodedPrompts
    decode: object  # latents [B, 16, h, w] -> pixels [B, 3, H, W]
    values: dict


class PreviewSettings:
    DESCRIPTION = (
        "Preview images while training: encodes the validation prompts (one per line) with the CLIP now, before "
        "the run; link its output to Train's preview_settings. Train then samples them with the weights being "
        "trained every N steps, as ComfyUI's KSampler would (euler, simple schedule, the model's shift, ComfyUI's "
        "cfg), decodes them with this VAE and shows them in the Train node; Training Report adds them as a grid."
    )
    CATEGORY = "Whetstone"
    FUNCTION = "settings"
    RETURN_TYPES = (PREVIEWS_TYPE,)
    RETURN_NAMES = ("preview_settings",)
    OUTPUT_TOOLTIPS = ("Link to Train's preview_settings input.",)

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "clip": ("CLIP", {"tooltip": "Z-Image's text encoder (Qwen3-4B), as for Pack Dataset."}),
                "vae": ("VAE", {"tooltip": "Z-Image's VAE (ae.safetensors), for showing the previews."}),
                **declare(WIDGETS),
            }
        }

    def settings(self, clip, vae, **settings):
        values = check_all(WIDGETS, settings)
        for name in ("width", "height"):
            if values[name] % 16:
                raise SettingRefused(f"{name}={values[name]} must be a multiple of 16")
        decode = vae_decoder(vae)
        return (PreviewRequest(prompts=encode_prompts(clip, values), decode=decode, values=values),)
