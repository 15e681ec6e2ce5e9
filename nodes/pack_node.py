"""Pack Dataset: an image folder (with captions) -> a WebDataset shard set in the whetstone_datasets folder."""

from __future__ import annotations

import json
import logging

from ..training.data.outcomes import report_kinds, summary_lines
from ..training.data.pack import PackConfig, PackInterrupted, pack_dataset
from . import comfy_bridge, paths
from .encoders import ComfyLatentEncoder, ComfyTextEncoder
from .validation import Choice, Int, SettingRefused, Text, Toggle, check_all, declare
from .values import DATASET_TYPE, DatasetRef

logger = logging.getLogger(__name__)

REPORT_LINES = 20

WIDGETS = {
    "image_folder": Text(
        "my_images",
        "Folder of images (and .txt/.caption sidecars or metadata.jsonl/csv) inside ComfyUI's input or output folder, "
        "e.g. 'my_images' for ComfyUI/input/my_images. Absolute paths must lie inside those folders.",
    ),
    "dataset_name": Text(
        "my_dataset",
        "Name of the shard set to create in the whetstone_datasets folder (letters, digits, '_', '-', '.'). Packing "
        "again with the same name and settings reuses the finished shards; an interrupted pack resumes.",
        max_chars=64,
    ),
    "resolution": Int(1024, 256, 4096, "Training resolution: buckets have about resolution² pixels.", step=16),
    "samples_per_shard": Int(1000, 1, 100_000, "Samples per .tar shard (about 1000 keeps shards around 100 MB)."),
    "too_small": Choice(("skip", "upscale"), "Images smaller than their bucket: skip them, or upscale (bicubic)."),
    "missing_caption": Choice(("empty", "skip"), "Images without a caption: train with an empty caption, or skip."),
    "store_images": Toggle(False, "Also store the resized images in the shards (always on when no VAE is connected)."),
}

#: Optional (prompts saved before it stay valid): more pack resolutions, for Training Plan's resolution_schedule.
MORE_RESOLUTIONS = Text(
    "",
    "Also pack at these resolutions (comma-separated sides, e.g. 512,768) for Training Plan's resolution_schedule: "
    "each image is stored once per resolution it covers (too_small decides the others). Empty: resolution only.",
    128,
)
OPTIONAL = {
    "more_resolutions": MORE_RESOLUTIONS.declare(),
    "vae": ("VAE", {"tooltip": "Z-Image's VAE (the Flux ae.safetensors): stores latents so training skips the VAE."}),
    "clip": ("CLIP", {"tooltip": "Z-Image's text encoder (Qwen3-4B): stores caption features for training."}),
}


class PackDataset:
    DESCRIPTION = (
        "Packs a folder of images and captions into WebDataset shards for training, encoding latents with the "
        "connected VAE and caption features with the connected text encoder. Shows a progress bar per image; Cancel "
        "keeps the finished shards and the next run resumes. Skipped files are listed in the report."
    )
    CATEGORY = "Whetstone"
    FUNCTION = "pack"
    OUTPUT_NODE = True
    RETURN_TYPES = (DATASET_TYPE, "STRING")
    RETURN_NAMES = ("dataset", "report")
    OUTPUT_TOOLTIPS = (
        "The packed shard set, for Train.",
        "What was packed: samples, shards, buckets, and every skipped file with its reason.",
    )

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": declare(WIDGETS), "optional": OPTIONAL, "hidden": {"unique_id": "UNIQUE_ID"}}

    def pack(self, vae=None, clip=None, unique_id=None, more_resolutions="", **settings):
        values = check_all(WIDGETS, settings)
        more = MORE_RESOLUTIONS.check("more_resolutions", more_resolutions)
        image_dir = paths.confine(values["image_folder"], paths.image_roots(), "image_folder", must_exist=True)
        if not image_dir.is_dir():
            raise paths.PathRefused(f"image_folder={values['image_folder']!r} is a file, not a folder of images")
        output_dir = paths.new_child(paths.dataset_roots(), values["dataset_name"], "dataset_name")
        config = PackConfig(
            input_dir=image_dir,
            output_dir=output_dir,
            resolution=pack_resolutions(values["resolution"], more),
            samples_per_shard=values["samples_per_shard"],
            too_small=values["too_small"],
            missing_caption=values["missing_caption"],
            store_image=values["store_images"] or vae is None,
            follow_external_links=False,  # a shared folder's links must never make the node read outside it
        )
        latent_encoder = ComfyLatentEncoder(vae) if vae is not None else None
        text_encoder = ComfyTextEncoder(clip) if clip is not None else None
        result = self._run_pack(config, latent_encoder, text_encoder, unique_id)
        dataset = DatasetRef(
            path=result.output_dir,
            samples=result.samples,
            skipped=result.skipped,
            buckets=dict(result.buckets),
            latent_encoder=getattr(latent_encoder, "identity", None),
            text_encoder=getattr(text_encoder, "identity", None),
        )
        report = describe_pack(result)
        return {"ui": {"text": [report]}, "result": (dataset, report)}

    @staticmethod
    def _run_pack(config, latent_encoder, text_encoder, unique_id):
        bar = comfy_bridge.progress_bar(1, node_id=unique_id)

        def progress(done: int, total: int) -> None:
            if not comfy_bridge.interrupt_requested():  # an interrupted bar would raise mid-shard; should_stop ends it
                bar.update_absolute(done, max(total, 1))

        try:
            return pack_dataset(
                config,
                latent_encoder=latent_encoder,
                text_encoder=text_encoder,
                progress=progress,
                should_stop=comfy_bridge.interrupt_requested,
            )
        except PackInterrupted:
            logger.info("packing %s interrupted; finished shards are kept and the next run resumes", config.output_dir)
            comfy_bridge.raise_if_interrupted()
            raise


def pack_resolutions(resolution: int, more: str) -> int | tuple[int, ...]:
    """``resolution``, or it and ``more_resolutions`` ascending (PackConfig's several resolutions)."""
    extra = set()
    for part in filter(None, (item.strip() for item in more.split(","))):
        low, high = WIDGETS["resolution"].min, WIDGETS["resolution"].max
        if not part.isdigit() or int(part) % 16 or not low <= int(part) <= high:
            raise SettingRefused(
                f"more_resolutions={more!r}: {part!r} must be a side in px, a multiple of 16 in {low}..{high}, "
                "written like 512,768"
            )
        extra.add(int(part))
    return tuple(sorted({resolution, *extra})) if extra - {resolution} else resolution


def _widget_setting(name: str, value: str) -> str | None:
    """A pack setting as this node's widget (None: the node has no such widget, e.g. follow_external_links)."""
    return f"{name}='{value}'" if name in WIDGETS else None


def describe_pack(result) -> str:
    """A short, readable report: counts, buckets, what was skipped or noted by kind with how to keep it, and the first
    skipped files with reasons."""
    lines = [
        f"Packed {result.samples} samples into {len(result.shards)} shards in {result.output_dir}"
        + (f" ({result.reused_shards} reused)" if result.reused_shards else ""),
        "Buckets: " + ", ".join(f"{name}: {count}" for name, count in sorted(result.buckets.items())),
    ]
    if not result.skipped:
        lines.append("Skipped: 0")
    if result.report_path.is_file():
        report = json.loads(result.report_path.read_text(encoding="utf-8"))
        kinds, noted = report_kinds(report)
        lines += summary_lines(kinds, noted, total=result.samples + result.skipped, render_setting=_widget_setting)
        skipped = report.get("skipped", [])
        for entry in skipped[:REPORT_LINES]:
            lines.append(f"  {entry.get('path')}: {entry.get('reason')}")
        if len(skipped) > REPORT_LINES:
            lines.append(f"  ... and {len(skipped) - REPORT_LINES} more in {result.report_path}")
    return "\n".join(lines)
