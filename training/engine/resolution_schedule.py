"""Which pack resolution each optimizer step trains at: the config section ``resolutions`` and its schedule.

Every step trains one resolution (its micro-batches never mix shapes across resolutions, and each micro-batch is one
aspect bucket). The schedule is a pure function of (step, total steps, seed), so a resumed run continues the same
schedule with nothing saved but the step:

- ``none``: today's behaviour, one stream over the whole shard set.
- ``mix``: each step draws its resolution with the given weights (``{"512": 0.3, "1024": 0.7}``) from a generator
  seeded by (seed, step).
- ``progressive``: ``stages`` [[512, 0.4], [1024, 1.0]] trains 512 px for the first 40 % of the steps
  (round(0.4 · steps)), then 1024 px to the end.

``micro_batch`` / ``grad_accum`` per resolution (what the planner picks per shape, ``hardware.shape_plan``) must
keep the effective batch: micro_batch[r] x grad_accum[r] = run.micro_batch x run.grad_accum for every r, so the
global batch, the learning rate and every sample's random draws stay the same across resolutions. Unset
resolutions use run.micro_batch and run.grad_accum.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, field

from ..vocabulary import RESOLUTION_SCHEDULES
from .sigma_shift import SHIFT_RULES


def _resolution_key(key, where: str) -> int:
    text = str(key)
    if not text.isdigit() or int(text) % 16 or int(text) < 16:
        raise ValueError(f'{where}: key {key!r} must be a pack resolution in px, a multiple of 16 such as "512"')
    return int(text)


def _positive_int(value, where: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 4096:
        raise ValueError(f"{where}: must be an integer in 1..4096, got {value!r}")
    return value


@dataclass(kw_only=True)
class ResolutionSection:
    schedule: str = "none"
    weights: dict[str, float] = field(default_factory=dict)  # mix: resolution -> weight (> 0)
    stages: tuple[tuple[int, float], ...] = ()  # progressive: [resolution, until this fraction of the steps]
    micro_batch: dict[str, int] = field(default_factory=dict)
    grad_accum: dict[str, int] = field(default_factory=dict)
    shift_rule: str = "constant"  # "sqrt_area": σ shift scaled per resolution (sigma_shift.py, SD3 §5.3.2)
    shift_reference: int = 1024  # the resolution objective.shift is meant for

    def __post_init__(self) -> None:
        if self.schedule not in RESOLUTION_SCHEDULES:
            raise ValueError(f"resolutions.schedule must be one of {RESOLUTION_SCHEDULES}, got {self.schedule!r}")
        if self.shift_rule not in SHIFT_RULES:
            raise ValueError(f"resolutions.shift_rule must be one of {SHIFT_RULES}, got {self.shift_rule!r}")
        _resolution_key(self.shift_reference, "resolutions.shift_reference")
        self._check_weights()
        self._check_stages()
        for name in ("micro_batch", "grad_accum"):
            values = getattr(self, name)
            if not isinstance(values, dict):
                raise ValueError(f"resolutions.{name}: must be an object of resolution: count, got {values!r}")
            for key, value in values.items():
                _resolution_key(key, f"resolutions.{name}")
                _positive_int(value, f"resolutions.{name}[{key!r}]")
        if self.schedule == "none" and (self.micro_batch or self.grad_accum):
            raise ValueError("resolutions.micro_batch/grad_accum need a resolutions.schedule ('mix' or 'progressive')")
        for name in ("micro_batch", "grad_accum"):
            stray = sorted(set(getattr(self, name)) - {str(r) for r in self.resolutions}, key=int)
            if stray and self.active:
                raise ValueError(
                    f"resolutions.{name} names {', '.join(stray)} px, which the schedule does not train "
                    f"({', '.join(map(str, self.resolutions))}): remove them or add them to the schedule"
                )

    def _check_weights(self) -> None:
        if not isinstance(self.weights, dict):
            raise ValueError(f"resolutions.weights: must be an object of resolution: weight, got {self.weights!r}")
        for key, weight in self.weights.items():
            _resolution_key(key, "resolutions.weights")
            number = isinstance(weight, (int, float)) and not isinstance(weight, bool)
            if not number or not math.isfinite(weight) or weight <= 0:
                raise ValueError(f"resolutions.weights[{key!r}]: must be a number > 0, got {weight!r}")
        if self.schedule == "mix" and not self.weights:
            raise ValueError('resolutions.schedule "mix" needs resolutions.weights, e.g. {"512": 0.3, "1024": 0.7}')
        if self.schedule != "mix" and self.weights:
            raise ValueError(f'resolutions.weights is for schedule "mix", not {self.schedule!r}: remove it')

    def _check_stages(self) -> None:
        stages = []
        for index, stage in enumerate(self.stages):
            where = f"resolutions.stages[{index}]"
            if not isinstance(stage, (list, tuple)) or len(stage) != 2:
                raise ValueError(f"{where}: must be [resolution, until fraction], e.g. [512, 0.4], got {stage!r}")
            resolution, until = _resolution_key(stage[0], where), stage[1]
            number = isinstance(until, (int, float)) and not isinstance(until, bool)
            if not number or not 0 < until <= 1 or (stages and until <= stages[-1][1]):
                raise ValueError(f"{where}: the fraction {until!r} must be in (0, 1] and above the previous stage's")
            stages.append((resolution, float(until)))
        self.stages = tuple(stages)
        if self.schedule == "progressive" and (not stages or stages[-1][1] != 1.0):
            raise ValueError('resolutions.stages must end at 1.0, e.g. [[512, 0.4], [1024, 1.0]] for "progressive"')
        if self.schedule != "progressive" and stages:
            raise ValueError(f'resolutions.stages is for schedule "progressive", not {self.schedule!r}: remove it')

    @property
    def active(self) -> bool:
        return self.schedule != "none"

    @property
    def resolutions(self) -> tuple[int, ...]:
        """The resolutions the schedule trains, ascending."""
        if self.schedule == "mix":
            return tuple(sorted(int(key) for key in self.weights))
        return tuple(sorted({resolution for resolution, _ in self.stages}))

    def resolution_at(self, step: int, total_steps: int, seed: int) -> int:
        """The resolution of optimizer step ``step`` (0-based) of ``total_steps``."""
        if self.schedule == "mix":
            keys = sorted(self.weights, key=int)
            choice = random.Random(f"resolution:{seed}:{step}").choices(keys, [self.weights[k] for k in keys])[0]
            return int(choice)
        if self.schedule == "progressive":
            for resolution, until in self.stages:
                if step < round(until * total_steps):
                    return resolution
            return self.stages[-1][0]
        raise ValueError("resolutions.schedule is 'none': the run has no resolution schedule")

    def sizes(self, resolution: int, run) -> tuple[int, int]:
        """(micro-batch, grad accumulation) of ``resolution``; the effective batch must equal the run's."""
        micro = self.micro_batch.get(str(resolution), run.micro_batch)
        accum = self.grad_accum.get(str(resolution), run.grad_accum)
        if micro * accum != run.micro_batch * run.grad_accum:
            raise ValueError(
                f"resolutions: {resolution} px has micro_batch {micro} x grad_accum {accum} = {micro * accum} samples "
                f"per step and rank, but run.micro_batch {run.micro_batch} x run.grad_accum {run.grad_accum} = "
                f"{run.micro_batch * run.grad_accum}: every resolution must keep the effective batch"
            )
        return micro, accum
