"""The only module of the pack that touches ComfyUI: folder_paths, comfy.*, server.PromptServer.

Every ComfyUI import happens inside a function, so this module (and the whole pack) imports cleanly where ComfyUI
is absent (CI, the training CLI). Tests replace these functions with fakes; nothing else in the pack needs to know
whether ComfyUI is running.
"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

#: Folder names this pack registers with folder_paths (shard sets, run folders). LoRAs use ComfyUI's "loras".
DATASETS_FOLDER = "whetstone_datasets"
RUNS_FOLDER = "whetstone_runs"
LORAS_FOLDER = "loras"
DIFFUSION_MODELS_FOLDER = "diffusion_models"


class ComfyUIUnavailable(RuntimeError):
    """A node needed ComfyUI (folders, models) but runs outside it."""


def comfyui_present() -> bool:
    """True inside a ComfyUI process: main.py has imported folder_paths before any custom node is loaded."""
    return "folder_paths" in sys.modules


def _folder_paths():
    if not comfyui_present():
        raise ComfyUIUnavailable("this node needs a running ComfyUI (folder_paths is not loaded)")
    import folder_paths

    return folder_paths


# ---------------------------------------------------------------------------------------------------------------------
# Folders


def register_folders() -> None:
    """Register whetstone_datasets and whetstone_runs (default: <models>/whetstone_*). Idempotent; no-op without ComfyUI.

    A path configured in extra_model_paths.yaml under the same name stays first and so receives new folders.
    """
    if not comfyui_present():
        return
    folder_paths = _folder_paths()
    for name in (DATASETS_FOLDER, RUNS_FOLDER):
        folder_paths.add_model_folder_path(name, os.path.join(folder_paths.models_dir, name), is_default=False)


def folder_roots(folder_name: str) -> list[Path]:
    """The configured folders of a folder_paths name, first = where new files are written."""
    folder_paths = _folder_paths()
    if folder_name in (DATASETS_FOLDER, RUNS_FOLDER):
        register_folders()
    return [Path(p) for p in folder_paths.get_folder_paths(folder_name)]


def input_directory() -> Path:
    return Path(_folder_paths().get_input_directory())


def output_directory() -> Path:
    return Path(_folder_paths().get_output_directory())


def temp_directory() -> Path:
    return Path(_folder_paths().get_temp_directory())


def list_files(folder_name: str) -> list[str]:
    """ComfyUI's file list for a folder name (used for combo inputs); [] outside ComfyUI."""
    if not comfyui_present():
        return []
    return list(_folder_paths().get_filename_list(folder_name))


def full_path(folder_name: str, filename: str) -> Path:
    """Resolve a combo choice through folder_paths (which refuses names escaping the folder)."""
    return Path(_folder_paths().get_full_path_or_raise(folder_name, filename))


# ---------------------------------------------------------------------------------------------------------------------
# Progress, interruption, websocket events


class _NoProgress:
    def update_absolute(self, value: int, total: int | None = None, preview: Any = None) -> None:
        return None


def progress_bar(total: int, node_id: str | None = None):
    """comfy.utils.ProgressBar; every update is also an interrupt point (it raises when the user pressed Cancel)."""
    if not comfyui_present():
        return _NoProgress()
    import comfy.utils

    return comfy.utils.ProgressBar(total, node_id=node_id)


def interrupt_requested() -> bool:
    """True once the user pressed Cancel; does not clear the flag."""
    if not comfyui_present():
        return False
    import comfy.model_management

    return comfy.model_management.processing_interrupted()


def raise_if_interrupted() -> None:
    """Raise ComfyUI's InterruptProcessingException (clearing the flag) if Cancel was pressed."""
    if not comfyui_present():
        return
    import comfy.model_management

    comfy.model_management.throw_exception_if_processing_interrupted()


def send_event(event: str, data: dict) -> None:
    """Send a custom websocket event to the client that queued the running prompt."""
    if not comfyui_present():
        return
    from server import PromptServer

    server = PromptServer.instance
    server.send_sync(event, data, server.client_id)


def add_get_route(path: str, respond) -> None:
    """Serve ``GET path`` from ComfyUI's server: ``respond(query) -> (status, JSON body)``; a no-op outside ComfyUI."""
    if not comfyui_present():
        return
    from aiohttp import web
    from server import PromptServer

    async def handler(request):
        status, body = respond(dict(request.rel_url.query))
        return web.json_response(body, status=status)

    PromptServer.instance.routes.get(path)(handler)


def add_route(method: str, path: str, respond, *, max_body_bytes: int = 4096) -> None:
    """Serve ``method path``: ``respond(query, body) -> (status, JSON-able or PNG bytes)``; the body (POST) is read
    up to ``max_body_bytes`` + 1 bytes, so an oversized one arrives oversized and is refused, never read whole."""
    if not comfyui_present():
        return
    from aiohttp import web
    from server import PromptServer

    async def handler(request):
        body = await request.content.read(max_body_bytes + 1) if request.method == "POST" else None
        status, payload = respond(dict(request.rel_url.query), body)
        if isinstance(payload, bytes):
            return web.Response(body=payload, status=status, content_type="image/png")
        return web.json_response(payload, status=status)

    getattr(PromptServer.instance.routes, method.lower())(path)(handler)


def unload_models() -> None:
    """Unload every model ComfyUI holds and empty the CUDA cache, so a plan measures free VRAM for training."""
    if not comfyui_present():
        return
    import comfy.model_management

    comfy.model_management.unload_all_models()
    comfy.model_management.soft_empty_cache(True)


# ---------------------------------------------------------------------------------------------------------------------
# Encoders and LoRA patching


def vae_encode(vae, images_bhwc):
    """ComfyUI VAE: IMAGE [B, H, W, C] in 0..1 -> raw latents [B, 16, H/8, W/8] (before the latent format)."""
    return vae.encode(images_bhwc)


def process_latent_in(latents):
    """The Z-Image (Flux) latent format the DiT sees: (z - 0.1159) * 0.3611, as model.process_latent_in applies."""
    import comfy.latent_formats

    return comfy.latent_formats.Flux().process_in(latents)


def clip_encode(clip, text: str):
    """ComfyUI CLIP conditioning for one prompt: (cond [1, L, D], attention_mask [1, L] or None)."""
    tokens = clip.tokenize(text)
    out = clip.encode_from_tokens(tokens, return_dict=True)
    return out["cond"], out.get("attention_mask")


def load_lora_state_dict(path: Path) -> dict:
    import comfy.utils

    return comfy.utils.load_torch_file(str(path), safe_load=True)


def lora_key_map(model) -> dict:
    """comfy.lora's map from every LoRA module name ComfyUI understands for this model to its weight key."""
    import comfy.lora

    return comfy.lora.model_lora_keys_unet(model.model, {})


def patch_model_with_lora(model, lora_state_dict: dict, key_map: dict, strength: float):
    """Clone the ModelPatcher and add the LoRA patches; returns (patched model, patch count, applied count)."""
    import comfy.lora
    import comfy.lora_convert

    converted = comfy.lora_convert.convert_lora(lora_state_dict)
    patches = comfy.lora.load_lora(converted, key_map, log_missing=False)
    patched = model.clone()
    applied = patched.add_patches(patches, strength)
    return patched, len(patches), len(applied)


def load_diffusion_model(path: Path):
    """ComfyUI's own diffusion-model loader (UNETLoader's): returns (ModelPatcher, missing keys, unexpected keys),
    the keys compared as ``load_state_dict(strict=False)`` inside it compares them (it only logs them)."""
    import comfy.sd
    from safetensors import safe_open

    patcher = comfy.sd.load_diffusion_model(str(path))
    if patcher is None:
        raise ValueError(f"ComfyUI does not recognise {path} as a diffusion model")
    with safe_open(str(path), framework="pt") as handle:  # the header's names only
        file_keys = set(handle.keys())
    model_keys = set(patcher.model.diffusion_model.state_dict())
    return patcher, sorted(model_keys - file_keys), sorted(file_keys - model_keys)
