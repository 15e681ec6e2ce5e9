"""How many graphs ``torch.compile`` may build: the dynamo recompile limits from the number of image shapes a run
trains (its aspect buckets, over every scheduled resolution), and static shapes when there are several.

Each compiled block's code object gets one graph per (block kind, grad mode, token count); a run of one image shape
needs at most ``parallelize.COMPILE_RECOMPILE_LIMIT`` of them (caption lengths vary in steps of 32 tokens). With
several image shapes every one needs its own set, so the per-code limit is that budget times the number of shapes,
and the accumulated limit (all frames together) at least as much. Dynamo's default, after the second shape, is a
dynamic-shape graph that then serves every size: slower kernels and a guard failure for each new size; with the
shapes bounded and known, every block is compiled with ``dynamic=False`` instead (each shape compiled once, static).
Past the limit dynamo runs that code eagerly (logged by torch) instead of recompiling forever.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class CompileBounds:
    image_shapes: int
    recompile_limit: int
    dynamic: bool | None  # None: dynamo's automatic dynamic shapes; False: every shape static
    reason: str


def compile_bounds(image_shapes: int, per_shape: int) -> CompileBounds:
    if image_shapes < 1:
        raise ValueError(f"image_shapes must be >= 1, got {image_shapes}")
    limit = per_shape * image_shapes
    if image_shapes == 1:
        reason = f"one image shape: up to {per_shape} graphs per block code (block kinds x grad modes x captions)"
        return CompileBounds(1, limit, None, reason)
    reason = (
        f"{image_shapes} image shapes (buckets of the scheduled resolutions) x {per_shape} graphs each; shapes "
        "static (dynamic=False), each compiled once"
    )
    return CompileBounds(image_shapes, limit, False, reason)


def apply_limits(bounds: CompileBounds) -> None:
    """Raise (never lower) dynamo's per-code and accumulated recompile limits to the bounds'; logged with why."""
    import torch._dynamo

    config = torch._dynamo.config
    limit_name = "recompile_limit" if hasattr(config, "recompile_limit") else "cache_size_limit"
    setattr(config, limit_name, max(getattr(config, limit_name), bounds.recompile_limit))
    if hasattr(config, "accumulated_recompile_limit"):
        config.accumulated_recompile_limit = max(config.accumulated_recompile_limit, bounds.recompile_limit)
    logger.info("torch.compile: recompile limit %d (%s)", getattr(config, limit_name), bounds.reason)


def image_shape_count(config) -> int:
    """The image shapes a run trains: the scheduled resolutions' buckets (synthetic: one per resolution), or the
    shard set's buckets; 1 when unknown (a typed synthetic resolution)."""
    from ..data.shards import load_manifest
    from ..data.stats import resolution_buckets

    section, data = config.resolutions, config.data
    if data.synthetic:
        return len(section.resolutions) if section.active else 1
    folder, manifest = load_manifest(Path(data.shards))
    if not section.active:
        return max(1, len(manifest.get("buckets") or {}))
    packed = resolution_buckets(manifest, f"{folder} (manifest.json)")
    return max(1, sum(len(packed.get(resolution, {})) for resolution in section.resolutions))
