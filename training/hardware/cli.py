"""``python -m training plan``: print the plan for this machine or for a simulated tier."""

from __future__ import annotations

import argparse
import json
import logging

from ..vocabulary import LR_SCALINGS, MODES
from .discovery import discover
from .plan import PlanRefused, PlanRequest, make_plan
from .tiers import load_tiers, nearest_tier, simulated_profile

logger = logging.getLogger(__name__)


def register(subparsers) -> argparse.ArgumentParser:
    """Add the ``plan`` subcommand; its ``func`` returns the exit code (0 planned, 2 refused)."""
    parser = subparsers.add_parser("plan", help="plan micro-batch, checkpointing and parallelism for a GPU setup")
    parser.add_argument("--mode", choices=MODES, default="lora", help="lora, qlora or full fine-tune")
    parser.add_argument("--resolution", type=int, nargs="+", default=[1024], help="side px, or width height")
    parser.add_argument("--rank", type=int, default=128, help="LoRA rank")
    parser.add_argument("--batch", type=int, default=None, help="target global batch (default: the tier's)")
    parser.add_argument("--caption-tokens", type=int, default=128, help="caption length in tokens")
    parser.add_argument("--lr", type=float, default=1e-4, help="base learning rate for one GPU")
    parser.add_argument("--lr-scaling", choices=LR_SCALINGS, default="sqrt")
    parser.add_argument("--tier", default=None, help=f"plan for a simulated tier: {', '.join(sorted(load_tiers()))}")
    parser.add_argument("--json", action="store_true", help="print the plan as JSON instead of a table")
    parser.set_defaults(func=run)
    return parser


def run(args: argparse.Namespace) -> int:
    tiers = load_tiers()
    if args.tier is not None and args.tier not in tiers:
        raise ValueError(f"--tier {args.tier!r} is not one of {sorted(tiers)}")
    if args.tier:
        tier, profile = tiers[args.tier], simulated_profile(tiers[args.tier])
    else:
        profile = discover()
        tier, _ = nearest_tier(profile, tiers)
    resolution = args.resolution[0] if len(args.resolution) == 1 else tuple(args.resolution[:2])
    request = PlanRequest(
        mode=args.mode,
        resolution=resolution,
        caption_tokens=args.caption_tokens,
        lora_rank=args.rank,
        target_global_batch=args.batch,
        lr_base=args.lr,
        lr_scaling=args.lr_scaling,
    )
    try:
        plan = make_plan(request, profile, tier=tier if args.tier else None)
    except PlanRefused as refusal:
        print(json.dumps({"refused": str(refusal)}) if args.json else str(refusal))
        return 2
    print(json.dumps(plan.to_dict(), indent=2) if args.json else plan.table())
    return 0
