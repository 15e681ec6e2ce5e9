"""The loaders of a resolution schedule: per scheduled resolution, a ShardLoader over that resolution's buckets
(from the manifest's ``resolutions`` section) or synthetic batches of that size, each with its own micro-batch."""

from __future__ import annotations

import logging
from pathlib import Path

from torch import nn

from ..data.encoders import require_encoded
from ..data.shards import load_manifest
from ..data.stats import resolution_buckets
from .build import load_empty_caption
from .config import TrainConfig
from .distributed import DistInfo
from .shapes import ResolutionStreams
from .synthetic import SyntheticBatches

logger = logging.getLogger(__name__)


def build_resolution_streams(config: TrainConfig, dist_info: DistInfo, model: nn.Module):
    """(ResolutionStreams, empty-caption features)."""
    section, run, data = config.resolutions, config.run, config.data
    if data.synthetic:
        loaders = {
            resolution: SyntheticBatches(
                model_config=model.config,
                resolution=resolution,
                caption_tokens=data.caption_tokens,
                micro_batch=section.sizes(resolution, run)[0],
                grad_accum=section.sizes(resolution, run)[1],
                rank=dist_info.rank,
                world_size=dist_info.world_size,
                seed=run.seed,
                device=dist_info.device,
            )
            for resolution in section.resolutions
        }
        empty = next(iter(loaders.values())).empty_caption()
        return ResolutionStreams(section, loaders, run=run), empty
    from ..data.loader import ShardLoader

    buckets = scheduled_buckets(config, dist_info.world_size)
    empty = load_empty_caption(config, dist_info.device)
    loaders = {
        resolution: ShardLoader(
            data.shards,
            batch_size=section.sizes(resolution, run)[0],
            rank=dist_info.rank,
            world_size=dist_info.world_size,
            num_workers=data.num_workers,
            shuffle_buffer=data.shuffle_buffer,
            seed=run.seed,
            even_batches=dist_info.world_size > 1,
            buckets=frozenset(buckets[resolution]),
        )
        for resolution in section.resolutions
    }
    return ResolutionStreams(section, loaders, run=run), empty


def scheduled_buckets(config: TrainConfig, world_size: int) -> dict[int, dict[str, int]]:
    """Each scheduled resolution's buckets and counts, refusing a resolution the shard set lacks or one with fewer
    samples than a global batch (naming the numbers and the fix)."""
    folder, manifest = load_manifest(Path(config.data.shards))
    contents = manifest.get("contents")
    if isinstance(contents, dict):
        require_encoded(contents, config.data.shards)
    packed = resolution_buckets(manifest, f"{folder} (manifest.json)")
    missing = [r for r in config.resolutions.resolutions if r not in packed]
    if missing:
        raise ValueError(
            f"resolutions.schedule trains {', '.join(map(str, missing))} px but {config.data.shards} was packed at "
            f"{', '.join(map(str, sorted(packed))) or 'an unknown resolution'} px: repack with --resolution "
            f"{','.join(map(str, sorted(set(packed) | set(missing))))} or change the schedule"
        )
    run = config.run
    global_batch = run.micro_batch * run.grad_accum * world_size
    for resolution in config.resolutions.resolutions:
        samples = sum(packed[resolution].values())
        if samples < global_batch:
            raise ValueError(
                f"{config.data.shards} holds {samples} samples at {resolution} px, fewer than one global batch of "
                f"{global_batch} (run.micro_batch {run.micro_batch} x run.grad_accum {run.grad_accum} x {world_size} "
                "process(es)): add images, pack with too_small=upscale, or lower the batch"
            )
        logger.info("%d px: %d samples in buckets %s", resolution, samples, ", ".join(sorted(packed[resolution])))
    return {r: packed[r] for r in config.resolutions.resolutions}
