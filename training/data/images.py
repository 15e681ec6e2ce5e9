"""Opening untrusted image files: validation, EXIF orientation, mode conversion to RGB, and fitting to a bucket."""

from __future__ import annotations

import io
import struct
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

from .buckets import Bucket, FitPlan, nearest_bucket, plan_fit

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff", ".gif")

#: Pillow's default limit; anything larger is refused as a possible decompression bomb.
DEFAULT_MAX_IMAGE_PIXELS = 89_478_485

_TRANSPOSED_ORIENTATIONS = {5, 6, 7, 8}  # EXIF orientations that swap width and height
_EXIF_ORIENTATION_TAG = 0x0112


class ImageRejected(Exception):
    """The file cannot become a training sample; the message is the reason written to report.json, `kind` a key of
    outcomes.SKIP_KINDS."""

    def __init__(self, reason: str, kind: str = "unreadable") -> None:
        super().__init__(reason)
        self.kind = kind


@dataclass(frozen=True, slots=True)
class FittedImage:
    image: Image.Image  # RGB, exactly bucket-sized
    original_size: tuple[int, int]  # (width, height) after EXIF orientation
    plan: FitPlan
    notes: tuple[tuple[str, str], ...] = ()  # (kind, message); kinds are keys of outcomes.NOTE_KINDS


def fit_image_file(
    path: Path,
    buckets: list[Bucket],
    *,
    upscale: bool,
    background: tuple[int, int, int],
    max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS,
) -> FittedImage:
    """Open `path`, orient it, convert it to RGB and resize-then-crop it to its nearest bucket.

    Raises ImageRejected with a human-readable reason for anything that cannot be used.
    """
    try:
        size = path.stat().st_size
    except OSError as error:  # moved or deleted after the folder was listed, or not permitted
        raise ImageRejected(
            f"could not be read ({type(error).__name__}: {error.strerror})", "unreadable_file"
        ) from error
    if size == 0:
        raise ImageRejected("empty file (0 bytes)", "empty_file")
    with warnings.catch_warnings():
        # We apply our own pixel limit below; Pillow's warning would only be noise.
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        try:
            with Image.open(path) as image:
                return _fit_open_image(image, buckets, upscale, background, max_image_pixels)
        except Image.DecompressionBombError as error:
            raise ImageRejected(f"refused: possible decompression bomb ({error})", "too_large") from error
        except (FileNotFoundError, PermissionError) as error:
            reason = f"could not be read ({type(error).__name__}: {error.strerror})"
            raise ImageRejected(reason, "unreadable_file") from error
        except (OSError, SyntaxError, ValueError, EOFError, IndexError, struct.error) as error:
            # Pillow signals corrupt or truncated data through any of these, depending on the codec.
            raise ImageRejected(f"unreadable image: {type(error).__name__}: {error}") from error


def _fit_open_image(
    image: Image.Image, buckets: list[Bucket], upscale: bool, background: tuple[int, int, int], max_pixels: int
) -> FittedImage:
    width, height = image.size
    if width * height > max_pixels:
        raise ImageRejected(
            f"refused: possible decompression bomb ({width}x{height} = {width * height} pixels "
            f"exceeds max_image_pixels={max_pixels})",
            "too_large",
        )
    frames = getattr(image, "n_frames", 1)
    notes = (("animated", f"animated ({frames} frames): the first frame was used"),) if frames > 1 else ()
    orientation = image.getexif().get(_EXIF_ORIENTATION_TAG, 1)
    oriented = (height, width) if orientation in _TRANSPOSED_ORIENTATIONS else (width, height)
    plan = plan_fit(*oriented, nearest_bucket(*oriented, buckets))
    if plan.needs_upscale and not upscale:
        raise ImageRejected(
            f"too small: {oriented[0]}x{oriented[1]} is smaller than its bucket {plan.bucket.name} "
            "(set too_small='upscale' to keep it)",
            "too_small",
        )
    _request_draft(image, plan)
    image.load()
    rgb = ImageOps.exif_transpose(to_rgb(image, background))
    plan = plan_fit(*rgb.size, plan.bucket)  # the JPEG draft may have shrunk the source
    resample = Image.Resampling.BICUBIC if plan.needs_upscale else Image.Resampling.LANCZOS
    fitted = rgb.resize((plan.bucket.width, plan.bucket.height), resample, box=plan.source_box, reducing_gap=3.0)
    return FittedImage(image=fitted, original_size=oriented, plan=plan, notes=notes)


def _request_draft(image: Image.Image, plan: FitPlan) -> None:
    """Let JPEG decode at 1/2, 1/4 or 1/8 scale when the result still covers the bucket (scale is uniform, so
    the un-rotated size maps correctly)."""
    if image.format != "JPEG" or plan.scale >= 0.5:
        return
    needed = (int(image.width * plan.scale) + 1, int(image.height * plan.scale) + 1)
    image.draft("RGB", needed)


def to_rgb(image: Image.Image, background: tuple[int, int, int]) -> Image.Image:
    """Any Pillow mode to 8-bit RGB; transparency is composited over `background`."""
    if image.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        return Image.fromarray(_high_depth_to_uint8(image), mode="L").convert("RGB")
    has_alpha = image.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in image.info
    if has_alpha:
        rgba = image.convert("RGBA")
        canvas = Image.new("RGBA", rgba.size, (*background, 255))
        return Image.alpha_composite(canvas, rgba).convert("RGB")
    if image.mode == "RGB":
        return image
    return image.convert("RGB")


def _high_depth_to_uint8(image: Image.Image) -> np.ndarray:
    values = np.asarray(image).astype(np.float64)
    if image.mode == "F":
        values = values * 255.0 if values.max(initial=0.0) <= 1.0 else values
    else:  # 16-bit data (Pillow may hand it over as 32-bit "I")
        values = values / 257.0
    return np.clip(np.rint(values), 0, 255).astype(np.uint8)


def encode_image(image: Image.Image, image_format: str, quality: int) -> bytes:
    """Deterministic bytes for the stored resized image (no metadata, fixed settings)."""
    buffer = io.BytesIO()
    if image_format == "jpg":
        image.save(buffer, format="JPEG", quality=quality, subsampling=0 if quality >= 90 else 2, optimize=False)
    elif image_format == "png":
        image.save(buffer, format="PNG", compress_level=6)
    elif image_format == "webp":
        image.save(buffer, format="WEBP", quality=quality, method=4)
    else:
        raise ValueError(f"image_format={image_format!r} must be one of 'jpg', 'png', 'webp'")
    return buffer.getvalue()
