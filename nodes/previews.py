"""Previews for the Train node: the Preview Settings node encodes the validation prompts with the wired CLIP before
the run (its output links to Train's optional ``preview_settings``); while the run trains, the engine's preview
latents are decoded with the wired VAE and sent to the Train node ("whetstone.preview") as images in ComfyUI's temp
folder (served by /view). A separate node keeps Train's widgets (and every saved workflow) as they were.

Decoding runs on the CPU with the wired VAE's weights in `training.model.flux_vae.FluxVAE` (ComfyUI's Flux decoder,
same operations): the training process holds the GPU the plan sized it for, so the node never competes with it for
memory. The PNGs go to the run folder (``previews/step_..._p000.png``, for the report's grid and later) and a copy to
``<temp>/whetstone_previews/<run>/`` for the browser. Preview Settings also records where its VAE came from
(`nodes.preview_vae`, ``<run>/preview_vae.json``), so a background run's previews decode with the same weights when
the jobs panel or the Train node shows them (`nodes.preview_jobs`), with no Wait for Run.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import torch

from ..training.atomic import write_bytes_atomic
from ..training.engine.preview import MAX_PROMPTS, PreviewError, save_prompt_features
from ..training.engine.preview_images import event_images
from ..training.model.flux_vae import FluxEncoderShape
from . import comfy_bridge, preview_jobs, preview_vae
from .encoders import ComfyTextEncoder
from .run_files import read_plain
from .validation import Float, Int, SettingRefused, Text, check_all, declare

logger = logging.getLogger(__name__)

PREVIEW_EVENT = "whetstone.preview"
PREVIEWS_TYPE = "WHETSTONE_PREVIEWS"
FEATURES_FILE = "preview_prompts.safetensors"
TEMP_SUBFOLDER = "whetstone_previews"
STEPS_PER_POLL = 2  # preview steps a node decodes per poll of its loop (the final poll: all)

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


def write_prompts(request: PreviewRequest, run_dir: Path) -> None:
    """The files the run's previews need: the prompts' features (for the engine), the VAE's record (for decoding)."""
    prompts = request.prompts
    save_prompt_features(run_dir / FEATURES_FILE, prompts.texts, prompts.positives, prompts.negative)
    preview_vae.write_source(run_dir, request.vae)


def vae_decoder(vae, prompt=None, unique_id=None):
    """(a CPU float32 decoder with the weights of a ComfyUI VAE object (Flux: Z-Image's 16-channel VAE), where it
    came from: `preview_vae.VaeSource`, for decoding a background run's previews later)."""
    model = getattr(vae, "first_stage_model", None)
    if not isinstance(model, torch.nn.Module):
        raise SettingRefused("the VAE input of Train is not a ComfyUI VAE; connect Load VAE with ae.safetensors")
    held = model.state_dict()
    shape = FluxEncoderShape.from_file({name: tuple(t.shape) for name, t in held.items()}, "the VAE connected to Train")
    if "decoder.conv_in.weight" not in held:
        raise SettingRefused("the VAE connected to Train has no decoder; connect Load VAE with ae.safetensors")
    decoder = preview_vae.decoder_state(held)
    source = preview_vae.wired_source(held, decoder, prompt, unique_id)
    logger.info("previews decode on the CPU with the connected VAE (the training process keeps the GPU)")
    return preview_vae.decoder_from_state(shape, decoder), source


class PreviewWatcher:
    """Decodes the run's new previews and sends them to the node; ``poll`` is called from the node's follow loop. A
    step the jobs panel's decoding got to first is sent as it is (`preview_jobs.PreviewDecoding.decode_here`). A step
    that cannot be decoded or sent is logged and skipped: Train's loop stops the training run on any exception, and a
    preview is not worth a run."""

    def __init__(self, run_dir: Path, run_name: str, node_id, decode) -> None:
        self.run_dir, self.run_name, self.node_id, self.decode = run_dir, run_name, node_id, decode
        self.sent: set[tuple[int, float]] = set()  # (step, its latents' time), shown or failed

    def poll(self, *, final: bool = False) -> None:
        """Decode and send the steps not sent yet, of the newest MAX_STEPS_LISTED (what the node's strip keeps),
        read from the tail of previews.jsonl; at most STEPS_PER_POLL of them, oldest first, so the node's loop soon
        checks ComfyUI's Cancel again. A step another thread decodes is left to a later poll. The ``final`` poll (the
        run has ended) does every step, waiting for one being decoded elsewhere."""
        budget = None if final else STEPS_PER_POLL
        for event in preview_jobs.read_events(self.run_dir)[-preview_jobs.MAX_STEPS_LISTED :]:
            key = (event["step"], preview_jobs.latents_time(self.run_dir, event))
            if key in self.sent:
                continue
            if budget is not None:
                if budget == 0:
                    return
                budget -= 1
            try:
                if not self.show(event, final=final):
                    continue  # the jobs panel's worker still decodes it: sent by a later poll
            except Exception as error:  # one step's files, the disk, the decoder: the run trains on without it
                logger.warning(
                    "run %s: the previews of step %d are not shown: %s",
                    self.run_name,
                    event["step"],
                    error,
                    exc_info=not isinstance(error, ValueError | OSError),
                )
            self.sent.add(key)  # shown, or failed: not tried again (until its latents are written again)

    def show(self, event: dict, *, final: bool) -> bool:
        """Decode one step (unless decoded) and send it; False while another thread decodes it (``final``: waits)."""
        decoded = preview_jobs.decoding().decode_here(self.run_dir, event, self.decode)
        while final and not decoded:
            decoded = preview_jobs.decoding().decode_here(self.run_dir, event, self.decode)
        if decoded:
            self.send(event, event_images(self.run_dir, event))
        return decoded

    def send(self, event: dict, paths: list[Path]) -> None:
        subfolder = f"{TEMP_SUBFOLDER}/{self.run_name}"
        folder = comfy_bridge.temp_directory() / TEMP_SUBFOLDER / self.run_name
        images = []
        for path in paths:
            data = read_plain(path, preview_jobs.MAX_IMAGE_BYTES)  # not through a link, not unbounded
            if data is None:
                raise PreviewError(f"{path} is not a plain PNG file of at most {preview_jobs.MAX_IMAGE_BYTES} bytes")
            write_bytes_atomic(folder / path.name, data, fsync=False)
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


@dataclass(frozen=True)
class PreviewRequest:
    """What Preview Settings hands to Train: the encoded prompts, a decoder with the VAE's weights, the settings."""

    prompts: EncodedPrompts
    decode: object  # latents [B, 16, h, w] -> pixels [B, 3, H, W]
    values: dict
    vae: preview_vae.VaeSource


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
            },
            "hidden": {"prompt": "PROMPT", "unique_id": "UNIQUE_ID"},  # the prompt names the VAE's file
        }

    def settings(self, clip, vae, prompt=None, unique_id=None, **settings):
        values = check_all(WIDGETS, settings)
        for name in ("width", "height"):
            if values[name] % 16:
                raise SettingRefused(f"{name}={values[name]} must be a multiple of 16")
        decode, source = vae_decoder(vae, prompt, unique_id)
        return (PreviewRequest(prompts=encode_prompts(clip, values), decode=decode, values=values, vae=source),)
