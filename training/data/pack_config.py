"""`PackConfig`: every setting of a pack, validated when it is made (the ValueError names the field and the fix)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from .images import DEFAULT_MAX_IMAGE_PIXELS

#: Settings that do not change the output bytes and so are left out of the fingerprint.
_NON_OUTPUT_SETTINGS = ("output_dir", "num_threads", "encode_batch")


@dataclass(kw_only=True)
class PackConfig:
    input_dir: Path
    output_dir: Path
    name: str = "data"
    samples_per_shard: int = 1000
    #: Bucket area is resolution² (512, 768, 1024 or any multiple of 16). Several (e.g. (512, 1024)): every image is
    #: stored once per resolution it covers (too_small decides the others), each aspect-bucketed at that resolution.
    resolution: int | tuple[int, ...] = 1024
    max_aspect_ratio: float = 3.0
    #: Images that would need upscaling to cover their bucket: dropped ("skip") or upscaled with bicubic ("upscale").
    too_small: Literal["skip", "upscale"] = "skip"
    background: tuple[int, int, int] = (255, 255, 255)
    #: Store the resized image bytes as well (required when no latent encoder is given).
    store_image: bool = False
    image_format: Literal["jpg", "png", "webp"] = "jpg"
    image_quality: int = 95
    sidecar_extensions: tuple[str, ...] = (".txt", ".caption")
    #: metadata.jsonl / metadata.csv mapping file_name -> text; None looks for one at the input root.
    metadata_file: Path | None = None
    missing_caption: Literal["empty", "skip"] = "empty"
    max_caption_chars: int = 4000
    max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS
    storage_dtype: Literal["bfloat16", "float32"] = "bfloat16"
    #: Threads decoding and resizing images (output does not depend on it).
    num_threads: int = 2
    #: Follow symbolic links (to images, captions, folders) that lead out of input_dir; off, they are skipped and
    #: reported. The ComfyUI node never turns it on.
    follow_external_links: bool = False
    #: Samples per encoder call (same-bucket images share a VAE batch). Faster on a GPU; values agree to float
    #: rounding across batch sizes, and 1 reproduces the bytes of a one-at-a-time pack.
    encode_batch: int = 1

    def __post_init__(self) -> None:
        self.input_dir, self.output_dir = Path(self.input_dir), Path(self.output_dir)
        self.metadata_file = Path(self.metadata_file) if self.metadata_file is not None else None
        self.background = tuple(self.background)
        self.sidecar_extensions = tuple(self.sidecar_extensions)
        self.resolution = _normalized_resolution(self.resolution)
        self._check_choices()
        self._check_numbers()
        if not self.input_dir.is_dir():
            raise ValueError(f"PackConfig.input_dir={str(self.input_dir)!r} is not a folder; pass the image folder")
        if self.output_dir.resolve().is_relative_to(self.input_dir.resolve()):
            raise ValueError(
                f"PackConfig.output_dir={str(self.output_dir)!r} is inside input_dir={str(self.input_dir)!r}; "
                "choose an output folder outside the images"
            )
        if not self.name or any(c in self.name for c in "/\\.%") or self.name.startswith("-"):
            raise ValueError(f"PackConfig.name={self.name!r} must be a plain file-name prefix like 'data'")

    def _check_choices(self) -> None:
        choices = {
            "too_small": ("skip", "upscale"),
            "image_format": ("jpg", "png", "webp"),
            "missing_caption": ("empty", "skip"),
            "storage_dtype": ("bfloat16", "float32"),
        }
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ValueError(f"PackConfig.{name}={getattr(self, name)!r} must be one of {allowed}")
        if not isinstance(self.follow_external_links, bool):
            raise ValueError(f"PackConfig.follow_external_links={self.follow_external_links!r} must be True or False")

    def _check_numbers(self) -> None:
        for name in ("samples_per_shard", "max_caption_chars", "max_image_pixels", "num_threads", "encode_batch"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"PackConfig.{name}={value!r} must be a positive integer")
        for resolution in self.resolutions:
            if isinstance(resolution, bool) or not isinstance(resolution, int) or resolution % 16 or resolution < 64:
                raise ValueError(
                    f"PackConfig.resolution={self.resolution!r}: {resolution!r} must be a multiple of 16 and >= 64, "
                    "e.g. 1024 or (512, 768, 1024)"
                )
        if self.max_aspect_ratio < 1.0:
            raise ValueError(f"PackConfig.max_aspect_ratio={self.max_aspect_ratio} must be >= 1.0, e.g. 3.0")
        if len(self.background) != 3 or not all(isinstance(c, int) and 0 <= c <= 255 for c in self.background):
            raise ValueError(f"PackConfig.background={self.background!r} must be three ints in 0..255, e.g. (0, 0, 0)")
        if not 1 <= self.image_quality <= 100:
            raise ValueError(f"PackConfig.image_quality={self.image_quality} must be in 1..100 (95 is a good default)")

    @property
    def resolutions(self) -> tuple[int, ...]:
        """The pack's resolutions, ascending (one for a single-resolution pack)."""
        return self.resolution if isinstance(self.resolution, tuple) else (self.resolution,)

    @property
    def multi_resolution(self) -> bool:
        return len(self.resolutions) > 1

    def output_settings(self) -> dict:
        """Settings as JSON values, without those that cannot change the output bytes (output_dir, num_threads)."""
        settings = {}
        for item in dataclasses.fields(self):
            if item.name in _NON_OUTPUT_SETTINGS:
                continue
            value = getattr(self, item.name)
            settings[item.name] = (
                str(value) if isinstance(value, Path) else list(value) if isinstance(value, tuple) else value
            )
        return settings


def _normalized_resolution(value) -> int | tuple[int, ...]:
    """An int stays an int; a list or tuple becomes an ascending tuple without repeats, and one of a single value
    that value (so a one-resolution pack keeps the settings, fingerprint and bytes of a pack made before lists)."""
    if isinstance(value, (list, tuple)):
        if not value:
            raise ValueError("PackConfig.resolution=() is empty; give one resolution or several, e.g. (512, 1024)")
        if not all(isinstance(v, int) and not isinstance(v, bool) for v in value):
            raise ValueError(f"PackConfig.resolution={value!r} must hold integers, e.g. (512, 768, 1024)")
        unique = tuple(sorted(set(value)))
        return unique[0] if len(unique) == 1 else unique
    return value
