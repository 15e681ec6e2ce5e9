"""`pack` and `inspect` subcommands. The package entry point calls `register(subparsers)`."""

from __future__ import annotations

import argparse
import io
import json
import logging
from itertools import islice
from pathlib import Path

from PIL import Image
from safetensors.torch import load as load_safetensors

from ..cli_support import float_in, int_in, pixels, user_error
from .distributed_pack import pack_distributed, torchrun_group
from .encoders import REPACK_HINT, missing_encodings
from .images import DEFAULT_MAX_IMAGE_PIXELS
from .outcomes import report_kinds, summary_lines
from .pack import PackConfig, PackError, pack_dataset
from .progress import ProgressDisplay
from .shards import load_manifest, read_json, read_samples

logger = logging.getLogger(__name__)


def register(subparsers) -> None:
    """Adds `pack` and `inspect` to an argparse subparsers object; each sets func(args) -> exit code."""
    pack = subparsers.add_parser(
        "pack",
        help="pack an image folder into WebDataset shards; with --vae and --text-encoder the shards are trainable",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    pack.add_argument("input_dir", type=Path, help="folder of images (searched recursively) with captions")
    pack.add_argument("output_dir", type=Path, help="where shards, manifest.json and report.json go (not inside input)")
    pack.add_argument("--name", default="data", help="shard name prefix: <name>-000000.tar")
    pack.add_argument("--samples-per-shard", type=int_in(1), default=1000, help="samples in each .tar shard")
    pack.add_argument(
        "--resolution",
        type=_resolutions,
        default=1024,
        help="bucket area is resolution²: 512, 768, 1024, ...; several (512,768,1024) store each image at every "
        "resolution it covers, aspect-bucketed per resolution, in one shard set",
    )
    pack.add_argument(
        "--max-aspect-ratio",
        type=float_in(1, low_open=False),
        default=3.0,
        help="widest bucket shape (3.0: 3:1 and 1:3)",
    )
    pack.add_argument("--too-small", choices=("skip", "upscale"), default="skip", help="images smaller than a bucket")
    pack.add_argument("--background", default="255,255,255", help="R,G,B composited under transparency")
    pack.add_argument("--image-format", choices=("jpg", "png", "webp"), default="jpg", help="stored image format")
    pack.add_argument("--image-quality", type=int_in(1, 100), default=95, help="JPEG/WebP quality 1..100")
    pack.add_argument("--metadata", type=Path, default=None, help="metadata.jsonl/.csv; none: one at the input root")
    pack.add_argument("--missing-caption", choices=("empty", "skip"), default="empty", help="images without a caption")
    pack.add_argument("--max-caption-chars", type=int_in(1), default=4000, help="longer captions are cut")
    pack.add_argument(
        "--max-image-pixels", type=int_in(1), default=DEFAULT_MAX_IMAGE_PIXELS, help="larger images are refused"
    )
    pack.add_argument(
        "--follow-external-links",
        action="store_true",
        help="pack images, captions and folders that symbolic links lead to outside input_dir (off: reported only)",
    )
    pack.add_argument("--threads", type=int_in(1, 256), default=2, help="image decode threads")
    _add_encoder_arguments(pack)
    pack.set_defaults(func=run_pack)

    inspect = subparsers.add_parser("inspect", help="summarise a shard set: counts, buckets, a few decoded samples")
    inspect.add_argument("shards", type=Path, help="shard folder or its manifest.json")
    inspect.add_argument("--samples", type=int_in(0), default=3, help="how many samples to decode and show")
    inspect.set_defaults(func=run_inspect)


def _add_encoder_arguments(pack) -> None:
    encoders = pack.add_argument_group(
        "encoders (both needed for shards that train; without them the shards hold raw images)"
    )
    encoders.add_argument("--vae", type=Path, default=None, help="Z-Image's VAE: ComfyUI's models/vae/ae.safetensors")
    encoders.add_argument(
        "--text-encoder",
        type=Path,
        default=None,
        help="Z-Image's text encoder: ComfyUI's models/text_encoders/qwen_3_4b.safetensors (bf16)",
    )
    encoders.add_argument(
        "--tokenizer",
        type=Path,
        default=None,
        help="Qwen tokenizer: a folder with vocab.json + merges.txt or a tokenizer.json; none: ComfyUI's "
        "comfy/text_encoders/qwen25_tokenizer, found from COMFYUI_PATH, the text encoder's or this repo's location",
    )
    encoders.add_argument(
        "--device", choices=("auto", "cuda", "cpu"), default="auto", help="where the encoders run (auto: GPU if any)"
    )
    encoders.add_argument(
        "--encode-batch", type=int_in(1, 4096), default=1, help="samples per encoder call (e.g. 8 on a large GPU)"
    )
    encoders.add_argument(
        "--storage-dtype",
        choices=("bfloat16", "float32"),
        default="bfloat16",
        help="dtype of the stored latents and caption features (bfloat16: half the size, what the node stores)",
    )
    encoders.add_argument(
        "--store-images", action="store_true", help="also store the resized images (always on without --vae)"
    )


def _encoders(args: argparse.Namespace):
    """(latent encoder, text encoder) from --vae / --text-encoder, each None when not given."""
    if (args.vae is None) != (args.text_encoder is None):
        logger.warning("only one of --vae / --text-encoder given: the shards will not train (%s)", REPACK_HINT)
    latent_encoder = text_encoder = None
    if args.vae is not None:
        from ..model.flux_vae import FluxLatentEncoder

        latent_encoder = FluxLatentEncoder(args.vae, device=args.device)
    if args.text_encoder is not None:
        from ..model.qwen3 import Qwen3TextEncoder

        text_encoder = Qwen3TextEncoder(args.text_encoder, tokenizer=args.tokenizer, device=args.device)
    return latent_encoder, text_encoder


def _resolutions(text: str) -> int | tuple[int, ...]:
    """An argparse type: one side in px, or several separated by commas (512,768,1024)."""
    sides = tuple(pixels(part.strip()) for part in text.split(","))
    return sides[0] if len(sides) == 1 else sides


def _parse_background(text: str) -> tuple[int, int, int]:
    try:
        red, green, blue = (int(part) for part in text.split(","))
    except ValueError as error:
        raise ValueError(f"--background={text!r} must be three integers like 255,255,255") from error
    return red, green, blue


def run_pack(args: argparse.Namespace) -> int:
    try:
        config = PackConfig(
            input_dir=args.input_dir,
            output_dir=args.output_dir,
            name=args.name,
            samples_per_shard=args.samples_per_shard,
            resolution=args.resolution,
            max_aspect_ratio=args.max_aspect_ratio,
            too_small=args.too_small,
            background=_parse_background(args.background),
            store_image=args.store_images or args.vae is None,
            image_format=args.image_format,
            image_quality=args.image_quality,
            metadata_file=args.metadata,
            missing_caption=args.missing_caption,
            max_caption_chars=args.max_caption_chars,
            max_image_pixels=args.max_image_pixels,
            follow_external_links=args.follow_external_links,
            num_threads=args.threads,
            encode_batch=args.encode_batch,
            storage_dtype=args.storage_dtype,
        )
        latent_encoder, text_encoder = _encoders(args)
        with torchrun_group() as group:  # under torchrun with several ranks: a distributed pack
            progress = ProgressDisplay("pack" if group is None else "pack (rank 0's share)", "img")
            encoders = {"latent_encoder": latent_encoder, "text_encoder": text_encoder}
            try:
                if group is None:
                    result = pack_dataset(config, **encoders, progress=progress)
                else:
                    shown = progress if group.rank == 0 else None
                    result = pack_distributed(config, group=group, **encoders, progress=shown)
            finally:
                progress.close()
    except (ValueError, PackError) as error:
        return user_error("pack", str(error))
    if result is None:  # a distributed pack's other ranks: rank 0 reports
        return 0
    print(f"packed {result.samples} samples into {len(result.shards)} shards in {result.output_dir}")
    if len(result.resolutions) > 1:
        for resolution, buckets in result.resolutions.items():
            print(f"  {resolution} px: {sum(buckets.values())} samples in {len(buckets)} buckets")
    for bucket, count in sorted(result.buckets.items(), key=lambda item: -item[1]):
        print(f"  {bucket:>10}: {count}")
    skipped, noted = report_kinds(read_json(result.report_path))
    for line in summary_lines(skipped, noted, total=result.samples + result.skipped, render_setting=_flag):
        print(line)
    if skipped or noted:
        print(f"every skipped or noted file, with its reason: {result.report_path}")
    if latent_encoder is None or text_encoder is None:
        print(f"note: these shards hold raw images; train needs encoded shards: {REPACK_HINT}")
    return 0


def _flag(name: str, value: str) -> str:
    """A pack setting spelled as this CLI's flag: --too-small upscale."""
    flag = "--" + name.replace("_", "-")
    return flag if value == "true" else f"{flag} {value}"


def run_inspect(args: argparse.Namespace) -> int:
    try:
        shard_dir, manifest = load_manifest(args.shards)
    except ValueError as error:
        return user_error("inspect", str(error))
    print(summarize(shard_dir, manifest, samples=args.samples))
    return 0


def summarize(shard_dir: Path, manifest: dict, *, samples: int = 3) -> str:
    """Human-readable summary of a shard set, with the first `samples` samples decoded."""
    contents = manifest["contents"]
    total_bytes = sum(s["bytes"] for s in manifest["shards"])
    lines = [
        f"{shard_dir}: {manifest['samples']} samples in {len(manifest['shards'])} shards "
        f"({total_bytes / 1e6:.1f} MB), {manifest['skipped']} inputs skipped",
        f"latent encoder: {contents['latent_encoder']}; text encoder: {contents['text_encoder']} "
        f"(dim {contents['text_feature_dim']}); dtype {contents['storage_dtype']}; image: {contents['image_format']}",
    ]
    missing = missing_encodings(contents)
    if missing:
        what = "raw images" if contents["image_format"] else "no image data"
        lines.append(f"note: these shards hold {what} and no {' and no '.join(missing)}; train needs encoded shards: "
                     f"{REPACK_HINT}")  # fmt: skip
    lines += [
        "buckets:",
    ]
    lines += [f"  {name:>10}: {count}" for name, count in sorted(manifest["buckets"].items(), key=lambda i: -i[1])]
    paths = [shard_dir / s["name"] for s in manifest["shards"]]
    for sample in islice(read_samples(paths), samples):
        lines.append(f"sample {sample['__key__']}: {_describe_sample(sample)}")
    return "\n".join(lines)


def _describe_sample(sample: dict) -> str:
    meta = json.loads(sample["json"])
    caption = sample["txt"].decode("utf-8")
    parts = [f"source={meta['source']!r}", f"bucket={meta['bucket']}", f"caption={caption[:80]!r}"]
    if "safetensors" in sample:
        tensors = load_safetensors(sample["safetensors"])
        parts += [
            f"{name}={list(t.shape)} {str(t.dtype).removeprefix('torch.')}" for name, t in sorted(tensors.items())
        ]
    for extension in ("jpg", "png", "webp"):
        if extension in sample:
            with Image.open(io.BytesIO(sample[extension])) as image:
                parts.append(f"image={image.width}x{image.height} {image.format}")
    return ", ".join(parts)
