"""The ``previews`` subcommand: encode validation prompts for a run's ``preview.features``, and decode a run's preview
latents to PNGs (plus ``previews/grid.png``) with the VAE file.

    python -m training previews encode prompts.safetensors --text-encoder qwen_3_4b.safetensors \\
        --prompt "a photo of sks dog" --prompt "sks dog on the moon" [--negative "blurry"]
    python -m training previews decode RUN_FOLDER --vae ae.safetensors
"""

from __future__ import annotations

import argparse
import io
import logging
from pathlib import Path

from ..cli_support import USER_ERROR

logger = logging.getLogger(__name__)


def register(subparsers) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "previews", help="encode preview prompts, or decode a run's previews to PNGs", description=__doc__
    )
    actions = parser.add_subparsers(dest="action", metavar="ACTION", required=True)
    encode = actions.add_parser("encode", help="encode prompts into a preview.features file")
    encode.add_argument("output", type=Path, help="the .safetensors file to write (give it as preview.features)")
    encode.add_argument("--text-encoder", required=True, type=Path, help="ComfyUI's qwen_3_4b.safetensors")
    encode.add_argument("--tokenizer", type=Path, default=None, help="as for pack (default: found as pack finds it)")
    encode.add_argument("--prompt", action="append", required=True, help="a validation prompt (repeat for more)")
    encode.add_argument("--negative", default=None, help="the negative prompt for cfg > 1 (default: the empty one)")
    encode.add_argument("--device", default="auto", help="auto, cpu or cuda (default: %(default)s)")
    encode.set_defaults(func=encode_command)
    decode = actions.add_parser("decode", help="decode a run's preview latents to PNGs and a grid")
    decode.add_argument("run", type=Path, help="the run folder (run.output_dir)")
    decode.add_argument("--vae", required=True, type=Path, help="ComfyUI's models/vae/ae.safetensors")
    decode.add_argument("--device", default="auto", help="auto, cpu or cuda (default: %(default)s)")
    decode.set_defaults(func=decode_command)
    return parser


def encode_command(args: argparse.Namespace) -> int:
    from ..model.qwen3 import Qwen3TextEncoder
    from .preview import save_prompt_features

    if not args.text_encoder.is_file():
        logger.error("--text-encoder %s does not exist: give ComfyUI's qwen_3_4b.safetensors", args.text_encoder)
        return USER_ERROR
    encoder = Qwen3TextEncoder(args.text_encoder, tokenizer=args.tokenizer, device=args.device)
    positives = encoder.encode(list(args.prompt))
    negative = encoder.encode([args.negative or ""])[0]
    save_prompt_features(args.output, list(args.prompt), positives, negative)
    logger.info("wrote %d prompt(s) to %s: set preview.features to it", len(positives), args.output)
    return 0


def decode_command(args: argparse.Namespace) -> int:
    from ..atomic import write_bytes_atomic
    from ..model.encoder_files import pick_device
    from ..model.flux_vae import FluxVAE, comfy_vae_dtype
    from .preview import PREVIEW_DIR, read_preview_events
    from .preview_images import decode_new_previews, preview_grid

    if not args.run.is_dir():
        logger.error("%s is not a run folder: give run.output_dir of a run", args.run)
        return USER_ERROR
    if not read_preview_events(args.run):
        logger.error("%s has no previews yet (previews.jsonl): set preview.features in its config", args.run)
        return USER_ERROR
    if not args.vae.is_file():
        logger.error("--vae %s does not exist: give ComfyUI's models/vae/ae.safetensors", args.vae)
        return USER_ERROR
    device = pick_device(args.device)
    vae = FluxVAE.load(args.vae, device=device, dtype=comfy_vae_dtype(device), decoder=True)
    written = decode_new_previews(args.run, vae.decode)
    grid = preview_grid(args.run)
    if grid is not None:
        buffer = io.BytesIO()
        grid.save(buffer, format="PNG")
        write_bytes_atomic(args.run / PREVIEW_DIR / "grid.png", buffer.getvalue())
    logger.info("decoded %d preview step(s); images and grid.png in %s", len(written), args.run / PREVIEW_DIR)
    return 0
