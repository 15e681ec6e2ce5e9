"""Planning every image shape of a multi-resolution run: one plan for the largest shape (it decides what is one
setting per run: checkpoint depth, compile, attention kernel, the global batch), then per shape the largest
micro-batch that fits at that depth and divides the per-rank samples of a step, so grad accumulation keeps the
effective batch at every resolution.

The engine reads a whole step of one resolution, whose micro-batches may come from any of its aspect buckets, so a
resolution's micro-batch is the smallest over its buckets (they share the area: the token counts differ only by
padding), its predicted peak the largest. ``section()`` is the config's ``resolutions`` micro_batch / grad_accum.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass

from .discovery import HardwareProfile
from .memory import MemoryModel
from .plan import make_plan, maximum_batch_size
from .request import PlanRefused, PlanRequest
from .training_plan import TrainingPlan

logger = logging.getLogger(__name__)


@dataclass(kw_only=True, frozen=True)
class ShapeFit:
    resolution: int
    shape: tuple[int, int]  # (width, height) px
    fits: int  # the largest micro-batch that fits at the run's checkpoint depth
    micro_batch: int  # what this shape trains with (its resolution's)
    grad_accum: int
    predicted_peak_bytes: int


@dataclass(kw_only=True, frozen=True)
class ShapePlan:
    base: TrainingPlan
    shapes: tuple[ShapeFit, ...]

    def resolution(self, resolution: int) -> tuple[int, int, int]:
        """(micro-batch, grad accumulation, predicted peak bytes) of ``resolution``."""
        fits = [s for s in self.shapes if s.resolution == resolution]
        if not fits:
            raise ValueError(f"resolution {resolution} was not planned; planned {sorted(self.resolutions)}")
        return fits[0].micro_batch, fits[0].grad_accum, max(s.predicted_peak_bytes for s in fits)

    @property
    def resolutions(self) -> tuple[int, ...]:
        return tuple(sorted({s.resolution for s in self.shapes}))

    def section(self) -> dict:
        """The config's ``resolutions`` micro_batch and grad_accum (merge with the schedule)."""
        return {
            "micro_batch": {str(r): self.resolution(r)[0] for r in self.resolutions},
            "grad_accum": {str(r): self.resolution(r)[1] for r in self.resolutions},
        }

    def to_dict(self) -> dict:
        return {
            "base": self.base.to_dict(),
            "shapes": [dataclasses.asdict(s) | {"shape": list(s.shape)} for s in self.shapes],
        }


def plan_shapes(
    request: PlanRequest,
    profile: HardwareProfile,
    shapes: dict[int, list[tuple[int, int]]],
    memory_model: MemoryModel | None = None,
) -> ShapePlan:
    """Plan ``shapes`` (pack resolution -> its buckets' (width, height)); see the module docstring."""
    if not shapes or not all(shapes.values()):
        raise ValueError(f"plan_shapes needs at least one bucket per resolution, got {shapes!r}")
    memory_model = memory_model or MemoryModel(model=request.model)
    everything = [shape for buckets in shapes.values() for shape in buckets]
    largest = max(everything, key=lambda wh: (wh[0] * wh[1], wh))
    base = make_plan(dataclasses.replace(request, resolution=largest), profile, None, memory_model)
    per_rank = base.micro_batch * base.grad_accum
    fixed = dict(
        dataset=None,
        caption_tokens=base.caption_tokens,
        caption_percentile=None,
        checkpoint_depth=base.checkpoint_depth,
        world_size=base.world_size,
        compile=base.compile,
        attention_backend=base.attention_backend,
        target_global_batch=base.global_batch,
    )
    fits: dict[tuple[int, int], int] = {}
    for shape in everything:
        shaped = dataclasses.replace(request, resolution=shape, micro_batch=None, **fixed)
        fits[shape] = maximum_batch_size(shaped, profile, base.checkpoint_depth, memory_model)
    planned = []
    for resolution, buckets in sorted(shapes.items()):
        fitting = min(fits[shape] for shape in buckets)
        micro = max((m for m in range(1, per_rank + 1) if per_rank % m == 0 and m <= fitting), default=0)
        if micro == 0:
            raise PlanRefused(request, f"one sample of {resolution} px does not fit at depth "
                              f"{base.checkpoint_depth} (planned for {largest[0]}x{largest[1]})", [],
                              base.budget_bytes)  # fmt: skip
        logger.info(
            "%d px: micro-batch %d x %d accumulation (up to %d fit at checkpoint depth %d; divisor of %d per rank)",
            resolution,
            micro,
            per_rank // micro,
            fitting,
            base.checkpoint_depth,
            per_rank,
        )
        for shape in buckets:
            at = make_plan(dataclasses.replace(request, resolution=shape, micro_batch=micro, **fixed), profile,
                           None, memory_model)  # fmt: skip
            planned.append(
                ShapeFit(
                    resolution=resolution,
                    shape=tuple(shape),
                    fits=fits[shape],
                    micro_batch=micro,
                    grad_accum=per_rank // micro,
                    predicted_peak_bytes=at.predicted_peak_bytes,
                )
            )
    return ShapePlan(base=base, shapes=tuple(planned))


def dataset_shapes(stats) -> dict[int, list[tuple[int, int]]]:
    """A shard set's (``DatasetStats``) buckets per pack resolution."""
    if not stats.resolutions:
        raise ValueError(f"{stats.path}: the manifest names no pack resolution; repack it to plan per resolution")
    return {resolution: sorted(buckets) for resolution, buckets in stats.resolutions.items()}
