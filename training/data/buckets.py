"""Aspect-ratio buckets for a target pixel area, and the resize-then-crop geometry that fits an image to one."""

from __future__ import annotations

import math
from dataclasses import dataclass

#: Bucket sides are multiples of this: the VAE downsamples by 8 and the DiT patchifies latents by 2.
SIDE_MULTIPLE = 16


@dataclass(frozen=True, slots=True, order=True)
class Bucket:
    """A training resolution. Ordered by (width, height) so bucket lists sort deterministically."""

    width: int
    height: int

    @property
    def name(self) -> str:
        return f"{self.width}x{self.height}"

    @property
    def aspect(self) -> float:
        return self.width / self.height

    @classmethod
    def parse(cls, name: str) -> Bucket:
        width, height = name.split("x")
        return cls(int(width), int(height))


def make_buckets(resolution: int, *, max_aspect_ratio: float = 3.0) -> list[Bucket]:
    """Buckets of area close to but not above `resolution`², sides multiples of 16, aspect within max_aspect_ratio.

    For every height h (a multiple of 16) the widest width with w*h <= area is taken, so each bucket is the largest
    of its shape. Sorted by aspect ratio, narrowest first.
    """
    if resolution < SIDE_MULTIPLE or resolution % SIDE_MULTIPLE:
        raise ValueError(
            f"resolution={resolution} must be a positive multiple of {SIDE_MULTIPLE} (e.g. 512, 768, 1024)"
        )
    if max_aspect_ratio < 1.0:
        raise ValueError(f"max_aspect_ratio={max_aspect_ratio} must be >= 1.0 (e.g. 3.0 allows 3:1 and 1:3)")
    area = resolution * resolution
    buckets: set[Bucket] = set()
    for height in range(SIDE_MULTIPLE, area // SIDE_MULTIPLE + 1, SIDE_MULTIPLE):
        width = (area // height) // SIDE_MULTIPLE * SIDE_MULTIPLE
        if width < SIDE_MULTIPLE:
            break
        if max(width / height, height / width) <= max_aspect_ratio + 1e-9:
            buckets.add(Bucket(width, height))
    return sorted(buckets, key=lambda b: (b.aspect, b.width))


def nearest_bucket(width: int, height: int, buckets: list[Bucket]) -> Bucket:
    """The bucket whose aspect ratio is closest in log space; ties go to the larger area, then the wider bucket."""
    log_aspect = math.log(width / height)
    return min(buckets, key=lambda b: (abs(math.log(b.aspect) - log_aspect), -b.width * b.height, -b.width))


@dataclass(frozen=True, slots=True)
class FitPlan:
    """How to map a source image onto a bucket: scale so it covers the bucket, then centre-crop."""

    bucket: Bucket
    scale: float
    #: Crop box in source pixels (left, top, right, bottom); resizing this box to the bucket gives the output.
    source_box: tuple[float, float, float, float]

    @property
    def needs_upscale(self) -> bool:
        return self.scale > 1.0 + 1e-9


def plan_fit(width: int, height: int, bucket: Bucket) -> FitPlan:
    """Scale to cover the bucket, centre-crop the excess. The box always lies inside the image (Pillow refuses a
    box offset of -5.7e-14), so the side that limits the scale is chosen in exact integer arithmetic and kept whole."""
    if width <= 0 or height <= 0:
        raise ValueError(f"image size {width}x{height} must be positive")
    if bucket.width * height >= bucket.height * width:  # the bucket is relatively wider: the full width is used
        scale = bucket.width / width
        crop_height = bucket.height * width / bucket.width  # <= height exactly, and rounding keeps it so
        top = (height - crop_height) / 2
        box = (0.0, top, float(width), height - top)
    else:  # the bucket is relatively taller: the full height is used
        scale = bucket.height / height
        crop_width = bucket.width * height / bucket.height
        left = (width - crop_width) / 2
        box = (left, 0.0, width - left, float(height))
    return FitPlan(bucket=bucket, scale=scale, source_box=box)
