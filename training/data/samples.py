"""Turning one input file into one shard sample: caption + fitted image (threaded), then encoders (main thread)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save as safetensors_bytes

from .buckets import Bucket, make_buckets
from .captions import Caption, CaptionIndex, CaptionRejected, printable_name
from .encoders import LATENT_CHANNELS, LATENT_DOWNSCALE, LatentEncoder, TextEncoder
from .images import FittedImage, ImageRejected, encode_image, fit_image_file
from .inputs import InputFile, Skip
from .shards import EMPTY_CAPTION_KEY, ShardSample

LATENT_KEY = "latent"
CAPTION_FEATURES_KEY = "caption_features"
TENSORS_EXTENSION = "safetensors"


@dataclass(frozen=True, slots=True)
class Prepared:
    item: InputFile
    caption: Caption
    fitted: FittedImage
    image_bytes: bytes | None
    pixels: torch.Tensor | None  # [3, H, W] float in [0, 1], only when a latent encoder will need it
    #: The pack resolution this sample is stored at; None in a single-resolution pack (whose keys and metadata
    #: stay as they always were).
    resolution: int | None = None

    @property
    def notes(self) -> tuple[tuple[str, str], ...]:
        """(kind, message) notes on how the caption and the image were read."""
        return self.caption.notes + self.fitted.notes


@dataclass(kw_only=True)
class SampleBuilder:
    #: resolution -> its aspect buckets, ascending; more than one entry makes a multi-resolution pack.
    bucket_sets: dict[int, list[Bucket]]
    captions: CaptionIndex
    upscale: bool
    background: tuple[int, int, int]
    max_image_pixels: int
    image_format: str | None  # None: do not store the image
    image_quality: int
    storage_dtype: torch.dtype
    latent_encoder: LatentEncoder | None
    text_encoder: TextEncoder | None
    #: The real input folder: an input that resolves outside it when read is refused unless follow_external_links.
    real_root: Path | None = None
    follow_external_links: bool = False

    def empty_caption_bytes(self) -> bytes | None:
        """The text encoder's features of the empty caption as safetensors bytes (None without a text encoder)."""
        if self.text_encoder is None:
            return None
        features = self.text_encoder.encode([""])[0].to(self.storage_dtype).contiguous()
        return safetensors_bytes({EMPTY_CAPTION_KEY: features})

    @classmethod
    def from_config(cls, config, latent_encoder: LatentEncoder | None, text_encoder: TextEncoder | None):
        captions = CaptionIndex.load(
            config.input_dir,
            config.metadata_file,
            sidecar_extensions=config.sidecar_extensions,
            missing_caption=config.missing_caption,
            max_caption_chars=config.max_caption_chars,
            follow_external_links=config.follow_external_links,
        )
        return cls(
            bucket_sets={
                resolution: make_buckets(resolution, max_aspect_ratio=config.max_aspect_ratio)
                for resolution in config.resolutions
            },
            captions=captions,
            upscale=config.too_small == "upscale",
            background=config.background,
            max_image_pixels=config.max_image_pixels,
            image_format=config.image_format if config.store_image else None,
            image_quality=config.image_quality,
            storage_dtype=getattr(torch, config.storage_dtype),
            latent_encoder=latent_encoder,
            text_encoder=text_encoder,
            real_root=config.input_dir.resolve(),
            follow_external_links=config.follow_external_links,
        )

    @property
    def multi_resolution(self) -> bool:
        return len(self.bucket_sets) > 1

    def prepare(self, item: InputFile) -> list[Prepared] | Skip:
        """The decoded sample fitted at every pack resolution it covers (ascending), or why it is skipped.
        Thread-safe (no encoder calls). An image too small for some resolutions is kept at the others; one too
        small for all is skipped with the smallest resolution's reason."""
        escape = self._escaping_target(item.path)
        if escape is not None:
            shown = printable_name(str(escape))
            reason = f"became a symbolic link to {shown}, outside the folder, after the folder was listed; not read"
            return Skip(item.relative, reason, "link_outside")
        try:
            caption = self.captions.caption_for(item.path, item.relative)
        except CaptionRejected as rejection:
            return Skip(item.relative, str(rejection), rejection.kind)
        prepared, too_small = [], None
        for resolution, buckets in self.bucket_sets.items():
            try:
                fitted = fit_image_file(
                    item.path,
                    buckets,
                    upscale=self.upscale,
                    background=self.background,
                    max_image_pixels=self.max_image_pixels,
                )
            except ImageRejected as rejection:
                if rejection.kind != "too_small":
                    return Skip(item.relative, str(rejection), rejection.kind)
                too_small = too_small or rejection
                continue
            prepared.append(self._prepared(item, caption, fitted, resolution if self.multi_resolution else None))
        if not prepared:
            return Skip(item.relative, str(too_small), too_small.kind)
        return prepared

    def _prepared(self, item: InputFile, caption: Caption, fitted: FittedImage, resolution: int | None) -> Prepared:
        image_bytes = encode_image(fitted.image, self.image_format, self.image_quality) if self.image_format else None
        pixels = None
        if self.latent_encoder is not None:
            pixels = torch.from_numpy(np.array(fitted.image)).permute(2, 0, 1).float().div_(255.0)
        return Prepared(
            item=item, caption=caption, fitted=fitted, image_bytes=image_bytes, pixels=pixels, resolution=resolution
        )

    def _escaping_target(self, path: Path) -> Path | None:
        if self.real_root is None or self.follow_external_links:
            return None
        target = path.resolve()
        return None if target.is_relative_to(self.real_root) else target

    def build(self, prepared: Prepared) -> ShardSample:
        """Runs the encoders and serialises the sample's tar members."""
        return self.build_batch([prepared])[0]

    def build_batch(self, batch: list[Prepared]) -> list[ShardSample]:
        """build() for several samples, the encoders called once per bucket (latents) and once per batch (captions)."""
        latents: list[torch.Tensor | None] = [None] * len(batch)
        if self.latent_encoder is not None:
            by_bucket: dict[str, list[int]] = {}
            for index, prepared in enumerate(batch):
                by_bucket.setdefault(prepared.fitted.plan.bucket.name, []).append(index)
            for indices in by_bucket.values():
                encoded = self._encode_latents([batch[i].pixels for i in indices], batch[indices[0]].fitted.plan.bucket)
                for index, latent in zip(indices, encoded):
                    latents[index] = latent
        captions: list[torch.Tensor | None] = [None] * len(batch)
        if self.text_encoder is not None:
            captions = self._encode_captions([prepared.caption.text for prepared in batch])
        return [self._sample(p, latent, caption) for p, latent, caption in zip(batch, latents, captions)]

    def _sample(self, prepared: Prepared, latent: torch.Tensor | None, caption: torch.Tensor | None) -> ShardSample:
        bucket = prepared.fitted.plan.bucket
        tensors, caption_tokens = {}, None
        if latent is not None:
            tensors[LATENT_KEY] = latent
        if caption is not None:
            tensors[CAPTION_FEATURES_KEY] = caption
            caption_tokens = int(caption.shape[0])
        meta = {
            "source": prepared.item.relative,
            "bucket": bucket.name,
            "original_size": list(prepared.fitted.original_size),
            "caption_source": prepared.caption.source,
        }
        key = prepared.item.key
        if prepared.resolution is not None:
            meta["resolution"] = prepared.resolution
            key = f"{key}_r{prepared.resolution}"  # one sample per stored size; keys stay dot-free
        members = [("json", json.dumps(meta, ensure_ascii=False, sort_keys=True).encode("utf-8"))]
        if tensors:
            members.append((TENSORS_EXTENSION, safetensors_bytes(tensors)))
        members.append(("txt", prepared.caption.text.encode("utf-8")))
        if prepared.image_bytes is not None:
            members.append((self.image_format, prepared.image_bytes))
        return ShardSample(
            key=key,
            members=tuple(members),
            bucket=bucket.name,
            caption_tokens=caption_tokens,
            resolution=prepared.resolution,
        )

    def _encode_latents(self, pixels: list[torch.Tensor], bucket: Bucket) -> list[torch.Tensor]:
        latent = self.latent_encoder.encode(torch.stack(pixels))
        expected = (len(pixels), LATENT_CHANNELS, bucket.height // LATENT_DOWNSCALE, bucket.width // LATENT_DOWNSCALE)
        if tuple(latent.shape) != expected:
            raise ValueError(
                f"latent encoder {self.latent_encoder.identity!r} returned {tuple(latent.shape)} for "
                f"{len(pixels)} {bucket.name} images; expected {expected}"
            )
        return [one.detach().to("cpu", self.storage_dtype).contiguous() for one in latent]

    def _encode_captions(self, texts: list[str]) -> list[torch.Tensor]:
        encoded = self.text_encoder.encode(texts)
        for features in encoded:
            if features.ndim != 2 or features.shape[1] != self.text_encoder.feature_dim:
                raise ValueError(
                    f"text encoder {self.text_encoder.identity!r} returned {tuple(features.shape)}; "
                    f"expected [tokens, {self.text_encoder.feature_dim}]"
                )
        if len(encoded) != len(texts):
            raise ValueError(f"text encoder {self.text_encoder.identity!r} returned {len(encoded)} of {len(texts)}")
        return [features.detach().to("cpu", self.storage_dtype).contiguous() for features in encoded]

    def describe(self) -> dict:
        """The manifest's record of what each sample holds and which encoders made it."""
        return {
            "latent_encoder": getattr(self.latent_encoder, "identity", None),
            "text_encoder": getattr(self.text_encoder, "identity", None),
            "text_feature_dim": getattr(self.text_encoder, "feature_dim", None),
            "storage_dtype": str(self.storage_dtype).removeprefix("torch."),
            "image_format": self.image_format,
            "members": ["json", "txt"]
            + ([TENSORS_EXTENSION] if self.latent_encoder or self.text_encoder else [])
            + ([self.image_format] if self.image_format else []),
        }
