"""``plan --resolution-schedule``: plan every shape of a multi-resolution shard set (``shape_plan``) and write the
config's ``resolutions`` section (the schedule, plus the micro-batch and accumulation the planner picked per
resolution), so a CLI user trains a mix or a progressive schedule from one command. The Training Plan node plans
the same way (``plan_resolutions`` with its input names), so the node and the CLI write the same section."""

from __future__ import annotations

import argparse
import dataclasses
import logging
from dataclasses import dataclass

from ..vocabulary import RESOLUTION_SCHEDULES
from .discovery import HardwareProfile
from .memory import GIB
from .request import PlanRequest
from .shape_plan import ShapePlan, dataset_shapes, plan_shapes
from .training_plan import TrainingPlan

logger = logging.getLogger(__name__)

SCHEDULES = RESOLUTION_SCHEDULES  # the config's resolutions.schedule: "none", "mix", "progressive"


@dataclass(frozen=True)
class ScheduleInputs:
    """What the user named the schedule's inputs (the messages name them): CLI flags, or the node's inputs."""

    schedule: str
    weights: str
    stages: str
    dataset: str


CLI_INPUTS = ScheduleInputs(
    schedule="--resolution-schedule", weights="--resolution-weights", stages="--resolution-stages", dataset="--shards"
)


@dataclass(kw_only=True)
class ScheduledPlan(TrainingPlan):
    """The plan of a resolution schedule's largest shape, carrying the config's whole ``resolutions`` section (the
    schedule and the micro-batch / accumulation per resolution) to whatever writes the run config."""

    resolutions: dict


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--resolution-schedule",
        choices=SCHEDULES,
        default="none",
        help="with --shards packed at several resolutions: mix them by --resolution-weights, or train them in "
        "order by --resolution-stages; every shape is planned and gets its own micro-batch",
    )
    parser.add_argument("--resolution-weights", default="", metavar="RES=W,...", help="mix: e.g. 512=0.3,1024=0.7")
    parser.add_argument(
        "--resolution-stages",
        default="",
        metavar="RES=UNTIL,...",
        help="progressive: each resolution until this fraction of the steps, e.g. 512=0.4,1024=1.0",
    )


def _pairs(text: str, flag: str) -> list[tuple[int, float]]:
    pairs = []
    for item in filter(None, (part.strip() for part in text.split(","))):
        resolution, sep, value = item.partition("=")
        try:
            if not sep:
                raise ValueError
            pairs.append((int(resolution), float(value)))
        except ValueError:
            raise ValueError(
                f"{flag} {text!r}: write RES=NUMBER pairs separated by commas, e.g. 512=0.4,1024=1.0"
            ) from None
    if not pairs:
        raise ValueError(f"{flag} is empty: give RES=NUMBER pairs, e.g. 512=0.4,1024=1.0")
    return pairs


def schedule_section(schedule: str, weights: str, stages: str, names: ScheduleInputs = CLI_INPUTS) -> dict:
    """The ``resolutions`` schedule the inputs describe (the engine's ``ResolutionSection`` validates it)."""
    if schedule == "mix":
        if stages:
            raise ValueError(f"{names.stages} is for {names.schedule} progressive, not mix")
        pairs = _pairs(weights, names.weights)
        return {"schedule": "mix", "weights": {str(r): w for r, w in pairs}}
    if weights:
        raise ValueError(f"{names.weights} is for {names.schedule} mix, not progressive")
    pairs = _pairs(stages, names.stages)
    return {"schedule": "progressive", "stages": [[r, until] for r, until in pairs]}


def scheduled_resolutions(section: dict) -> list[int]:
    if section["schedule"] == "mix":
        return sorted(int(r) for r in section["weights"])
    return sorted({stage[0] for stage in section["stages"]})


def plan_schedule(args: argparse.Namespace, request: PlanRequest, profile: HardwareProfile) -> tuple[ShapePlan, dict]:
    """(the per-shape plan, the config's whole ``resolutions`` section) for the flags' schedule."""
    schedule = (args.resolution_schedule, args.resolution_weights, args.resolution_stages)
    return plan_resolutions(*schedule, request, profile, CLI_INPUTS)


def plan_resolutions(
    schedule: str,
    weights: str,
    stages: str,
    request: PlanRequest,
    profile: HardwareProfile,
    names: ScheduleInputs = CLI_INPUTS,
) -> tuple[ShapePlan, dict]:
    """(the per-shape plan, whose ``base`` is a ``ScheduledPlan`` recording the schedule as a decision, the config's
    whole ``resolutions`` section) for a schedule given as text, RES=NUMBER pairs, like the CLI's flags."""
    if request.dataset is None:
        raise ValueError(f"{names.schedule} needs {names.dataset}: the shard set packed at several resolutions")
    section = schedule_section(schedule, weights, stages, names)
    packed = dataset_shapes(request.dataset)
    if len(packed) < 2:
        raise ValueError(
            f"{names.schedule} {schedule}: {request.dataset.path} was packed at one resolution "
            f"({', '.join(map(str, packed))} px), so there is nothing to schedule: set {names.schedule} to none, or "
            "pack the images at several resolutions (python -m training pack IMAGES SHARDS --resolution 512,1024)"
        )
    wanted = scheduled_resolutions(section)
    missing = [r for r in wanted if r not in packed]
    if missing:
        raise ValueError(
            f"{names.schedule} names {', '.join(map(str, missing))} px, which {request.dataset.path} was not "
            f"packed at (it has {', '.join(map(str, sorted(packed)))}): pack them, or schedule what is there"
        )
    shapes = plan_shapes(request, profile, {r: packed[r] for r in wanted})
    logger.info("resolution schedule %s over %s px: %s", section["schedule"], wanted, shapes.section())
    section = section | shapes.section()
    base = dataclasses.replace(shapes.base, decisions=[*shapes.base.decisions, _decision(section, shapes)])
    scheduled = ScheduledPlan(**{f.name: getattr(base, f.name) for f in dataclasses.fields(base)}, resolutions=section)
    return dataclasses.replace(shapes, base=scheduled), section


def _decision(section: dict, shapes: ShapePlan) -> tuple[str, str, str]:
    """The plan table's row for the schedule: what trains when, and the micro-batch planned per resolution."""
    if section["schedule"] == "mix":
        order = ", ".join(
            f"{r} px weight {w:g}" for r, w in sorted(section["weights"].items(), key=lambda i: int(i[0]))
        )
    else:
        order = ", then ".join(f"{r} px until {until:g} of the steps" for r, until in section["stages"])
    sizes = ", ".join(f"{r} px {shapes.resolution(r)[0]} x {shapes.resolution(r)[1]}" for r in shapes.resolutions)
    largest = "x".join(map(str, shapes.base.resolution))
    reason = (
        f"{order}; micro-batch x accumulation per resolution: {sizes} (every bucket planned; the settings above "
        f"are for the largest, {largest})"
    )
    logger.info("plan: resolution_schedule = %s (%s)", section["schedule"], reason)
    return "resolution_schedule", section["schedule"], reason


def shapes_table(shapes: ShapePlan) -> str:
    """One line per planned shape, printed after the plan's table."""
    lines = ["resolution  shape        micro-batch x accumulation  fits  predicted peak"]
    for fit in shapes.shapes:
        shape = f"{fit.shape[0]}x{fit.shape[1]}"
        plan = f"{fit.micro_batch} x {fit.grad_accum}"
        lines.append(
            f"{fit.resolution:<10}  {shape:<11}  {plan:<26}  {fit.fits:<4}  {fit.predicted_peak_bytes / GIB:.1f} GiB"
        )
    return "\n".join(lines)
