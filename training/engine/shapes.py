"""What each optimizer step trains on: its resolution, micro-batch, accumulation, batch stream and objective.

A run without a resolution schedule has one ``FixedShape``. With one (``resolutions.schedule``), ``ResolutionStreams``
holds one loader per resolution -- a ShardLoader restricted to that resolution's buckets, or synthetic batches of that
size -- each with its own micro-batch, and asks the schedule which of them a step reads. Its state is every
loader's position; the schedule itself is a function of the step, so a resume continues it exactly.
"""

from __future__ import annotations

import dataclasses
import logging
import statistics
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from ..data.batches import Batch
from .objective import FlowObjective
from .resolution_schedule import ResolutionSection
from .sigma_shift import resolution_shift

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class StepShape:
    resolution: int | None  # None: no resolution schedule
    micro_batch: int
    grad_accum: int
    batches: Iterator[Batch]
    objective: FlowObjective


class FixedShape:
    """Every step the same: the run's micro-batch and accumulation over the one batch stream."""

    def __init__(self, run, batches: Iterator[Batch], objective: FlowObjective) -> None:
        self._shape = StepShape(None, run.micro_batch, run.grad_accum, batches, objective)
        self.batches = batches

    def at(self, step: int) -> StepShape:
        return self._shape


class ResolutionStreams:
    """One loader per scheduled resolution; ``state_dict`` / ``load_state_dict`` cover all of them."""

    batches = None  # one stream per resolution, in each step's StepShape

    def __init__(self, section: ResolutionSection, loaders: dict[int, object], *, run) -> None:
        self.section, self.loaders, self.run = section, loaders, run
        self._shapes: dict[int, StepShape] = {}

    def bind(self, make_batches: Callable[[object], Iterator[Batch]], objective: FlowObjective) -> ResolutionStreams:
        """Each loader's endless batch stream (``make_batches``) and each resolution's objective (its σ shift)."""
        if self.section.shift_rule != "constant" and getattr(objective, "shift_rule", "fixed") != "fixed":
            raise ValueError(
                f"resolutions.shift_rule {self.section.shift_rule!r} and objective.shift_rule "
                f"{objective.shift_rule!r} would both scale the σ shift by resolution: keep one (the objective's "
                "follows each batch's token count, the resolutions section each pack resolution)"
            )
        for resolution, loader in self.loaders.items():
            micro, accum = self.section.sizes(resolution, self.run)
            shift = resolution_shift(
                objective.shift, resolution, reference=self.section.shift_reference, rule=self.section.shift_rule
            )
            logger.info(
                "%d px: micro-batch %d x %d accumulation, σ shift %.3g (%s)",
                resolution,
                micro,
                accum,
                shift,
                "objective.shift at every resolution"
                if self.section.shift_rule == "constant"
                else f"objective.shift {objective.shift:g} x {resolution}/{self.section.shift_reference} (SD3 §5.3.2)",
            )
            shaped = dataclasses.replace(objective, shift=shift)
            self._shapes[resolution] = StepShape(resolution, micro, accum, make_batches(loader), shaped)
        return self

    def at(self, step: int) -> StepShape:
        return self._shapes[self.section.resolution_at(step, self.run.steps, self.run.seed)]

    def state_dict(self) -> dict:
        return {"resolutions": {str(r): loader.state_dict() for r, loader in self.loaders.items()}}

    def load_state_dict(self, state: dict) -> None:
        saved = state.get("resolutions") if isinstance(state, dict) else None
        if not isinstance(saved, dict) or sorted(saved) != sorted(str(r) for r in self.loaders):
            found = sorted(saved) if isinstance(saved, dict) else "no resolution schedule"
            raise ValueError(
                f"the checkpoint's loader state holds resolutions {found} but resolutions.schedule trains "
                f"{sorted(self.loaders)}: resume with the saved run's resolutions section"
            )
        for resolution, loader in self.loaders.items():
            loader.load_state_dict(saved[str(resolution)])


def step_shapes(loader, run, objective: FlowObjective, make_batches: Callable[[object], Iterator[Batch]]):
    """The run's shapes: a bound ``ResolutionStreams`` for a resolution schedule, else one ``FixedShape``."""
    if isinstance(loader, ResolutionStreams):
        return loader.bind(make_batches, objective)
    return FixedShape(run, make_batches(loader), objective)


def shape_metrics(shape: StepShape, sizes: list[tuple[int, int]], loss: float) -> dict:
    """A scheduled step's event keys: its resolution, image shape, micro-batch and loss under its resolution."""
    if shape.resolution is None:
        return {}
    return {
        "resolution": shape.resolution,
        "shape": batch_shape(sizes),
        "micro_batch": shape.micro_batch,
        "loss_by_resolution": {str(shape.resolution): loss},
    }


def batch_shape(sizes: list[tuple[int, int]]) -> str:
    """The step's image shape 'WxH' (its micro-batches' buckets), or 'mixed' when they differ."""
    return f"{sizes[0][0]}x{sizes[0][1]}" if len(set(sizes)) == 1 else "mixed"


def shape_summary(history: list[dict]) -> dict:
    """Per resolution and per image shape: steps, mean loss and median step time. A shape's first step compiles
    and warms up, so it is left out of the step time where the shape has others."""
    by_resolution: dict[str, list[dict]] = {}
    by_shape: dict[str, list[dict]] = {}
    for event in history:
        if event.get("resolution") is not None:
            by_resolution.setdefault(str(event["resolution"]), []).append(event)
        if event.get("shape"):
            by_shape.setdefault(event["shape"], []).append(event)

    def describe(events: list[dict]) -> dict:
        timed = events[1:] or events
        return {
            "steps": len(events),
            "mean_loss": statistics.fmean(e["loss"] for e in events),
            "median_step_s": statistics.median(e["step_s"] for e in timed),
            "peak_mem_gb": max(e["peak_mem_gb"] for e in events),
        }

    return {
        "by_resolution": {k: describe(v) for k, v in sorted(by_resolution.items(), key=lambda i: int(i[0]))},
        "by_shape": {k: describe(v) for k, v in sorted(by_shape.items())},
    }
