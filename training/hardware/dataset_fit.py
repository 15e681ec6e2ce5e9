"""The dataset's side of the plan: which image shapes and which caption length the memory plan must hold, and the
re-check of a finished plan against a shard set before a run starts.

With a dataset, the plan is made for its largest bucket (the most image tokens: batches hold one bucket each) and for
its longest encoded caption, or for a stated percentile of the caption lengths, the longer captions then truncated by
the engine (``data.max_caption_tokens``, ``data.caption_overflow``). Without one it plans from the typed resolution and
caption length, and ``check_plan_against_dataset`` refuses a run whose data would exceed them."""

from __future__ import annotations

import dataclasses
import logging

from ..data.stats import DatasetStats
from .memory import image_tokens_for
from .request import PlanRequest

logger = logging.getLogger(__name__)


class PlanDatasetMismatch(ValueError):
    """The shard set holds shapes or captions the plan did not count memory for."""


def largest_bucket(stats: DatasetStats, request: PlanRequest) -> tuple[int, int]:
    """The bucket (width, height) with the most image tokens (ties: the most pixels)."""
    return max(stats.buckets, key=lambda wh: (image_tokens_for(wh, request.model), wh[0] * wh[1], wh))


def fit_request_to_dataset(request: PlanRequest, decisions) -> PlanRequest:
    """``request`` with the resolution and caption length the plan holds, each logged in ``decisions`` with why."""
    stats = request.dataset
    typed_side = "x".join(map(str, request.width_height))
    if stats is None:
        decisions.add(
            "resolution", list(request.width_height), "typed (no dataset linked: the Train node checks the shards)"
        )
        return _caption_from_typed(request, decisions, "no dataset linked")
    decisions.add("dataset", stats.samples, stats.describe())
    side = largest_bucket(stats, request)
    differs = f"; the typed {typed_side} is not what the shards hold" if side != request.width_height else ""
    decisions.add(
        "resolution",
        list(side),
        f"the largest of the dataset's {len(stats.buckets)} bucket(s), "
        f"{image_tokens_for(side, request.model)} image tokens{differs}",
    )
    request = dataclasses.replace(request, resolution=side)
    if stats.caption_histogram is None:
        return _caption_from_typed(request, decisions, "the manifest has no caption-length statistics (older pack)")
    if request.caption_percentile is None:
        tokens = stats.caption_tokens_max
        reason = (
            f"the dataset's longest encoded caption (mean {_mean_tokens(stats):.0f}, p99 {stats.caption_tokens_at(99)})"
        )
    else:
        tokens = stats.caption_tokens_at(request.caption_percentile)
        longer = stats.captions_longer_than(tokens)
        reason = (
            f"p{request.caption_percentile:g} of the dataset's encoded captions (longest {stats.caption_tokens_max}); "
            f"{longer} of {stats.samples} sample(s) are longer and will be truncated to it"
        )
    decisions.add("caption_tokens", tokens, reason)
    _add_overflow(request, decisions)
    return dataclasses.replace(request, caption_tokens=tokens)


def _mean_tokens(stats: DatasetStats) -> float:
    histogram = stats.caption_histogram or {}
    return sum(t * n for t, n in histogram.items()) / max(1, sum(histogram.values()))


def _caption_from_typed(request: PlanRequest, decisions, why: str) -> PlanRequest:
    decisions.add("caption_tokens", request.caption_tokens, f"typed ({why})")
    _add_overflow(request, decisions)
    return request


def _add_overflow(request: PlanRequest, decisions) -> None:
    if request.caption_overflow == "truncate":
        reason = "a caption percentile was chosen: longer captions are cut to caption_tokens (the count is logged)"
    else:
        reason = "no caption is cut: a longer one stops the run before it starts (choose a percentile to truncate)"
    decisions.add("caption_overflow", request.caption_overflow, reason)


def check_plan_against_dataset(plan, stats: DatasetStats) -> None:
    """Refuse (``PlanDatasetMismatch``, with the numbers and the fix) when the shard set holds a bucket with more image
    tokens than the plan counted, or captions longer than planned that the plan would not truncate."""
    planned = image_tokens_for(tuple(plan.resolution))
    problems = []
    over = sorted((wh for wh in stats.buckets if image_tokens_for(wh) > planned), key=lambda wh: wh[0] * wh[1])
    if over:
        side = "x".join(map(str, plan.resolution))
        shapes = ", ".join(
            f"{w}x{h} ({image_tokens_for((w, h))} tokens, {stats.buckets[(w, h)]} samples)" for w, h in over
        )
        problems.append(f"buckets {shapes} exceed the planned {side} ({planned} image tokens)")
    longest = stats.caption_tokens_max
    if longest is not None and longest > plan.caption_tokens and plan.caption_overflow != "truncate":
        longer = stats.captions_longer_than(plan.caption_tokens)
        problems.append(
            f"{longer} caption(s) are longer than the planned {plan.caption_tokens} tokens (longest {longest})"
        )
    if not problems:
        if longest is None:
            logger.info(
                "dataset %s has no caption-length statistics: the engine enforces the plan's length", stats.path
            )
        return
    raise PlanDatasetMismatch(
        f"the plan does not fit the dataset {stats.path}: {'; '.join(problems)}. Fix: link this dataset to the Training "
        "Plan's dataset input (CLI: plan --shards) so it plans for the real shapes and captions, or plan a larger "
        "resolution / caption_tokens, or choose a caption percentile to truncate the longest captions."
    )
