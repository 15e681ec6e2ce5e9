"""Helpers for the data tests: programmatic images of every kind (good and bad) and encoder spies."""

from __future__ import annotations

import io
import struct
import zlib
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from training.data.encoders import TestLatentEncoder, TestTextEncoder

PIL_FORMATS = {
    ".jpg": "JPEG",
    ".jpeg": "JPEG",
    ".png": "PNG",
    ".webp": "WEBP",
    ".bmp": "BMP",
    ".tif": "TIFF",
    ".tiff": "TIFF",
}


def noise_image(width: int, height: int, seed: int = 0, mode: str = "RGB") -> Image.Image:
    rng = np.random.default_rng(seed)
    channels = {"RGB": 3, "RGBA": 4, "L": 1}[mode]
    array = rng.integers(0, 256, (height, width, channels), dtype=np.uint8)
    return Image.fromarray(array.squeeze(-1) if channels == 1 else array, mode=mode)


def save_image(path: Path, image: Image.Image, **options) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, format=PIL_FORMATS[path.suffix.lower()], **options)
    return path


def write_caption(image_path: Path, text: str | bytes, extension: str = ".txt") -> None:
    data = text.encode("utf-8") if isinstance(text, str) else text
    image_path.with_suffix(extension).write_bytes(data)


def make_dataset(folder: Path, count: int, *, sizes=((96, 64), (64, 96), (80, 80)), seed: int = 0) -> list[Path]:
    """`count` noise PNGs cycling through `sizes` (three buckets at resolution 64), each with a sidecar caption."""
    paths = []
    for index in range(count):
        width, height = sizes[index % len(sizes)]
        path = save_image(folder / f"img{index:03d}.png", noise_image(width, height, seed=seed + index))
        write_caption(path, f"caption number {index}")
        paths.append(path)
    return paths


def jpeg_bytes(image: Image.Image, **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", **options)
    return buffer.getvalue()


def png_header_only(width: int, height: int) -> bytes:
    """A tiny PNG that declares width x height pixels: the classic decompression-bomb shape."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")
    )


class SpyLatentEncoder(TestLatentEncoder):
    """TestLatentEncoder that keeps every output it returned, in call order."""

    __test__ = False

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.outputs: list[torch.Tensor] = []

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        latents = super().encode(images)
        self.outputs.extend(latents.clone())
        return latents


class SpyTextEncoder(TestTextEncoder):
    __test__ = False

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.outputs: list[torch.Tensor] = []

    def encode(self, captions: list[str]) -> list[torch.Tensor]:
        features = super().encode(captions)
        self.outputs.extend(f.clone() for f in features)
        return features


def shard_bytes(folder: Path) -> dict[str, bytes]:
    """Every visible output file (shards, manifest, report) by name."""
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if not p.name.startswith(".")}
