"""Preview latents -> PNGs and a grid (steps down, prompts across), for the CLI, the Train node and the report.

Decoding takes any ``decode`` function from DiT-format latents [B, 16, h, w] to pixels [B, 3, H, W] in 0..1: the CLI
passes `training.model.flux_vae.FluxVAE.decode` of the VAE file, the node the wired ComfyUI VAE's weights in the same
decoder. PNGs are written atomically as ``previews/step_0000100_p000.png`` beside the latents, one latent decoded
at a time; a preview already decoded is not decoded again.
"""

from __future__ import annotations

import io
import logging
import os
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

from ..atomic import write_bytes_atomic
from .preview import MAX_LATENT_SIDE, PREVIEW_DIR, PreviewError, read_preview, read_preview_events

logger = logging.getLogger(__name__)

Decoder = Callable[[torch.Tensor], torch.Tensor]
GRID_CELL = 192  # pixels per preview in the grid (longest side)
LABEL_WIDTH = 70
HEADER_HEIGHT = 22
MAX_GRID_SIDE = 4096  # pixels: Preview Settings makes at most 2048
MAX_GRID_PIXELS = 2048 * 2048


def image_path(run_dir: str | os.PathLike, step: int, prompt: int) -> Path:
    return Path(run_dir) / PREVIEW_DIR / f"step_{step:07d}_p{prompt:03d}.png"


def to_image(pixels: torch.Tensor) -> Image.Image:
    """[3, H, W] in 0..1 -> an RGB PIL image (rounded as ComfyUI's SaveImage: clip(255·x))."""
    array = np.clip(255.0 * pixels.movedim(0, -1).float().cpu().numpy(), 0, 255).astype(np.uint8)
    return Image.fromarray(array)


def event_images(run_dir: str | os.PathLike, event: dict) -> list[Path]:
    """The PNG paths of one preview event (one per prompt)."""
    return [image_path(run_dir, event["step"], i) for i in range(len(event.get("prompts", [])))]


def is_decoded(run_dir: str | os.PathLike, event: dict) -> bool:
    """Every PNG of the event is a plain file written after its latents (a resumed run that sampled the step again
    needs decoding again); False while the latents file is missing."""
    try:
        latents_time = (Path(run_dir) / PREVIEW_DIR / str(event["file"])).stat().st_mtime
        paths = event_images(run_dir, event)
        return bool(paths) and all(
            not p.is_symlink() and p.is_file() and p.stat().st_mtime >= latents_time for p in paths
        )
    except OSError:
        return False


def decode_preview(run_dir: str | os.PathLike, event: dict, decode: Decoder, *, max_side: int = MAX_LATENT_SIDE):
    """The PNGs of one preview event, decoded one latent at a time (the memory of one image, whatever the count)."""
    latents = read_preview(run_dir, event, max_side=max_side)
    paths = event_images(run_dir, event)
    if len(paths) != len(latents):
        raise PreviewError(f"the preview of step {event['step']} lists {len(paths)} prompts for {len(latents)} latents")
    for path, latent in zip(paths, latents, strict=True):
        buffer = io.BytesIO()
        to_image(decode(latent[None])[0]).save(buffer, format="PNG")
        write_bytes_atomic(path, buffer.getvalue())
    logger.info("decoded the previews of step %d (%d images)", event["step"], len(paths))
    return paths


def decode_new_previews(run_dir: str | os.PathLike, decode: Decoder) -> list[tuple[dict, list[Path]]]:
    """PNGs for every preview event whose images are not there yet; returns (event, its PNG paths) for those."""
    return [
        (event, decode_preview(run_dir, event, decode))
        for event in read_preview_events(run_dir)
        if not is_decoded(run_dir, event)
    ]


def preview_grid(run_dir: str | os.PathLike, *, max_rows: int = 8) -> Image.Image | None:
    """The decoded previews as one image: a row per preview step (the latest ``max_rows``), a column per prompt.
    None when no preview has been decoded yet. The run folder is untrusted: the events' width and height are used
    only when they are whole numbers of pixels (else the cells are square), and a PNG that is not one, or larger than
    MAX_GRID_PIXELS, leaves its cell blank (logged) rather than failing the report or filling the memory."""
    rows = []
    for event in read_preview_events(run_dir):
        paths = event_images(run_dir, event)
        if paths and all(p.is_file() and not p.is_symlink() for p in paths):
            rows.append((event, paths))
    if not rows:
        return None
    rows = rows[-max_rows:]
    columns = max(len(paths) for _, paths in rows)
    width, height = _side(rows[0][0].get("width")), _side(rows[0][0].get("height"))
    if width is None or height is None:
        width = height = 1
    scale = GRID_CELL / max(width, height)
    cell = (max(1, round(width * scale)), max(1, round(height * scale)))
    grid = Image.new("RGB", (LABEL_WIDTH + columns * cell[0], HEADER_HEIGHT + len(rows) * cell[1]), (255, 255, 255))
    draw = ImageDraw.Draw(grid)
    font = ImageFont.load_default()
    for column, prompt in enumerate(rows[-1][0].get("prompts", [])[:columns]):
        draw.text((LABEL_WIDTH + column * cell[0] + 4, 4), str(prompt)[:28], fill=(40, 40, 40), font=font)
    for row, (event, paths) in enumerate(rows):
        top = HEADER_HEIGHT + row * cell[1]
        draw.text((4, top + cell[1] // 2 - 6), f"step {event['step']}", fill=(40, 40, 40), font=font)
        for column, path in enumerate(paths):
            image = _cell_image(path, cell)
            if image is not None:
                grid.paste(image, (LABEL_WIDTH + column * cell[0], top))
    return grid


def _side(value) -> int | None:
    """A preview's width or height in pixels as the event records it, when it is one (1..MAX_GRID_SIDE)."""
    return value if isinstance(value, int) and not isinstance(value, bool) and 1 <= value <= MAX_GRID_SIDE else None


def _cell_image(path: Path, cell: tuple[int, int]) -> Image.Image | None:
    """One PNG resized to its grid cell; None (logged) for a file that is not an image or is too large to load."""
    try:
        with Image.open(path) as image:
            if image.width * image.height > MAX_GRID_PIXELS:
                logger.warning("%s is %dx%d pixels, over %d: left out of the grid", path, *image.size, MAX_GRID_PIXELS)
                return None
            return image.convert("RGB").resize(cell)
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as error:  # PIL raises all of these
        logger.warning("%s is not a preview image (%s): left out of the grid", path, error)
        return None
