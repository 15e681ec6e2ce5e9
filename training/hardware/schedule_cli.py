"""``plan --resolution-schedule``: plan every shape of a multi-resolution shard set (``shape_plan``) and write the
config's ``resolutions`` section (the schedule, plus the micro-batch and accumulation the planner picked per
resolution), so a CLI user trains a mix or a progressive schedule from one command."""

from __future__ import annotations

import argparse
import logging

from .discovery import HardwareProfile
from .memory import GIB
from .request import PlanRequest
from .shape_plan import ShapePlan, dataset_shapes, plan_shapes

logger = logging.getLogger(__name__)

SCHEDULES = ("none", "mix", "progressive")


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


def schedule_section(args: argparse.Namespace) -> dict:
    """The ``resolutions`` schedule the flags describe (the engine's ``ResolutionSection`` validates it)."""
    if args.resolution_schedule == "mix":
        if args.resolution_stages:
            raise ValueError("--resolution-stages is for --resolution-schedule progressive, not mix")
        weights = _pairs(args.resolution_weights, "--resolution-weights")
        return {"schedule": "mix", "weights": {str(r): w for r, w in weights}}
    if args.resolution_weights:
        raise ValueError("--resolution-weights is for --resolution-schedule mix, not progressive")
    stages = _pairs(args.resolution_stages, "--resolution-stages")
    return {"schedule": "progressive", "stages": [[r, until] for r, until in stages]}


def scheduled_resolutions(section: dict) -> list[int]:
    if section["schedule"] == "mix":
        return sorted(int(r) for r in section["weights"])
    return sorted({stage[0] for stage in section["stages"]})


def plan_schedule(args: argparse.Namespace, request: PlanRequest, profile: HardwareProfile) -> tuple[ShapePlan, dict]:
    """(the per-shape plan, the config's whole ``resolutions`` section) for the flags' schedule."""
    if request.dataset is None:
        raise ValueError("--resolution-schedule needs --shards: the shard set packed at several resolutions")
    section = schedule_section(args)
    packed = dataset_shapes(request.dataset)
    wanted = scheduled_resolutions(section)
    missing = [r for r in wanted if r not in packed]
    if missing:
        raise ValueError(
            f"--resolution-schedule names {', '.join(map(str, missing))} px, which {request.dataset.path} was not "
            f"packed at (it has {', '.join(map(str, sorted(packed)))}): pack them, or schedule what is there"
        )
    shapes = plan_shapes(request, profile, {r: packed[r] for r in wanted})
    logger.info("resolution schedule %s over %s px: %s", section["schedule"], wanted, shapes.section())
    return shapes, section | shapes.section()


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
