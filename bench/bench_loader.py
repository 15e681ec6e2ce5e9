"""Data benchmarks on CPU: ShardLoader throughput on cached 512² samples, and packing versus a plain PIL loop.

    .venv/bin/python bench/bench_loader.py --samples 4096 --tokens 96 --pack-images 300

Cached samples hold a bf16 latent [16, 64, 64] and bf16 caption features [L, 2560] (L uniform in tokens/2..3*tokens/2).
"""

from __future__ import annotations

import argparse
import io
import logging
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from training.data.buckets import make_buckets, nearest_bucket, plan_fit  # noqa: E402
from training.data.loader import ShardLoader  # noqa: E402
from training.data.pack import PackConfig, pack_dataset  # noqa: E402

logger = logging.getLogger("bench_loader")


class BenchLatentEncoder:
    """Cheap stand-in for the VAE: 8x8 average pool tiled to 16 channels (the benchmark measures I/O, not the VAE)."""

    identity = "bench-avgpool8"

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        return F.avg_pool2d(images, 8).repeat(1, 6, 1, 1)[:, :16]


class BenchTextEncoder:
    """Random [L, 2560] features with L in tokens/2 .. 3*tokens/2, seeded by the caption."""

    identity = "bench-random-2560"
    feature_dim = 2560

    def __init__(self, tokens: int) -> None:
        self.tokens = tokens

    def encode(self, captions: list[str]) -> list[torch.Tensor]:
        out = []
        for caption in captions:
            generator = torch.Generator().manual_seed(hash(caption) % 2**31)
            length = int(torch.randint(self.tokens // 2, self.tokens * 3 // 2 + 1, (1,), generator=generator))
            out.append(torch.randn(length, self.feature_dim, generator=generator))
        return out


def build_cached_shards(workdir: Path, samples: int, tokens: int | None) -> Path:
    """Packs `samples` tiny PNGs upscaled to 512²; tokens=None leaves out caption features (latents only)."""
    source = workdir / "tiny"
    if not source.exists():
        source.mkdir(parents=True)
        rng = np.random.default_rng(0)
        for index in range(samples):
            Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(source / f"{index:06d}.png")
            (source / f"{index:06d}.txt").write_text(f"sample {index}")
    output = workdir / f"cached-{tokens}"
    config = PackConfig(input_dir=source, output_dir=output, resolution=512, too_small="upscale")
    text_encoder = BenchTextEncoder(tokens) if tokens else None
    pack_dataset(config, latent_encoder=BenchLatentEncoder(), text_encoder=text_encoder)
    return output


def loader_throughput(shards: Path, *, batch_size: int, num_workers: int, epochs: int) -> float:
    loader = ShardLoader(shards, batch_size=batch_size, num_workers=num_workers, shuffle_buffer=1000, pin_memory=False)
    list(loader)  # warm the page cache and the workers' imports
    start, count = time.perf_counter(), 0
    for _ in range(epochs):
        for batch in loader:
            count += len(batch)
    return count / (time.perf_counter() - start)


def build_photo_folder(folder: Path, images: int) -> None:
    folder.mkdir(parents=True)
    rng = np.random.default_rng(1)
    for index in range(images):
        width, height = (1600, 1200) if index % 2 else (1200, 1600)
        smooth = rng.integers(0, 256, (height // 40, width // 40, 3), dtype=np.uint8)
        image = Image.fromarray(smooth).resize((width, height), Image.Resampling.BILINEAR)
        image.save(folder / f"photo{index:05d}.jpg", quality=90)
        (folder / f"photo{index:05d}.txt").write_text(f"photo {index}")


def plain_pil_loop(folder: Path, resolution: int) -> float:
    """The naive baseline: open, convert, cover-resize, crop, re-encode to JPEG, one image at a time."""
    buckets = make_buckets(resolution)
    paths = sorted(folder.glob("*.jpg"))
    start = time.perf_counter()
    for path in paths:
        with Image.open(path) as image:
            rgb = image.convert("RGB")
        plan = plan_fit(*rgb.size, nearest_bucket(*rgb.size, buckets))
        fitted = rgb.resize((plan.bucket.width, plan.bucket.height), Image.Resampling.LANCZOS, box=plan.source_box)
        fitted.save(io.BytesIO(), format="JPEG", quality=95)
        _ = path.with_suffix(".txt").read_text()
    return len(paths) / (time.perf_counter() - start)


def pack_throughput(folder: Path, output: Path, resolution: int, threads: int) -> float:
    config = PackConfig(
        input_dir=folder, output_dir=output, resolution=resolution, store_image=True, num_threads=threads
    )
    start = time.perf_counter()
    result = pack_dataset(config)
    return result.samples / (time.perf_counter() - start)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--samples", type=int, default=4096, help="cached 512² samples for the loader benchmark")
    parser.add_argument("--tokens", type=int, default=96, help="mean caption length in tokens")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--pack-images", type=int, default=300, help="1600x1200 JPEGs for the packing benchmark")
    parser.add_argument("--workdir", type=Path, default=None)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="whetstone-bench-"))
    print(
        f"# {platform.node()} {platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}"
    )
    try:
        for tokens in (None, args.tokens):
            shards = build_cached_shards(workdir, args.samples, tokens)
            contents = f"latents + caption features L~{tokens}x2560" if tokens else "latents only"
            for workers in (0, 1, 2):
                rate = loader_throughput(shards, batch_size=args.batch_size, num_workers=workers, epochs=args.epochs)
                print(f"loader  512² {contents}, batch {args.batch_size}, workers {workers}: {rate:,.0f} samples/s")
        photos = workdir / "photos"
        build_photo_folder(photos, args.pack_images)
        for resolution in (512, 1024):
            baseline = plain_pil_loop(photos, resolution)
            print(f"pack    {resolution}² plain PIL loop: {baseline:,.1f} images/s")
            for threads in (1, 2):
                rate = pack_throughput(photos, workdir / f"packed-{resolution}-{threads}", resolution, threads)
                print(
                    f"pack    {resolution}² pack_dataset threads {threads}: {rate:,.1f} images/s ({rate / baseline:.2f}x)"
                )
    finally:
        if args.workdir is None:
            shutil.rmtree(workdir)
    return 0


if __name__ == "__main__":
    sys.exit(main())
