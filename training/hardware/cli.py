"""``python -m training plan``: print the plan for this machine or for a simulated tier, optionally for a shard set
(``--shards``: its real bucket shapes and caption lengths), and write the run config that follows it
(``--write-config``), so ``python -m training train --config`` runs exactly what was planned."""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

from ..cli_support import float_in, int_in, pixels
from ..engine.recipe_flags import add_recipe_flags, recipe_sections
from ..model.config import PRESETS, ZImageConfig
from ..model.targets import DEFAULT_LORA_RANK, DEFAULT_TARGETS, LORA_TARGETS
from ..vocabulary import ADAPTER_TYPES, LR_SCALINGS, MODES, OPTIMIZERS
from . import schedule_cli
from .discovery import discover
from .plan import PlanRefused, PlanRequest, make_plan
from .tiers import load_tiers, nearest_tier, simulated_profile

logger = logging.getLogger(__name__)
CAPTION_LENGTHS = {"longest": None, "p99": 99, "p95": 95, "p90": 90}


def register(subparsers) -> argparse.ArgumentParser:
    """Add the ``plan`` subcommand; its ``func`` returns the exit code (0 planned, 2 refused or a mistake)."""
    parser = subparsers.add_parser(
        "plan",
        help="plan micro-batch, checkpointing and parallelism for a GPU setup",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    _add_job_arguments(parser)
    _add_training_and_machine_arguments(parser)
    schedule_cli.add_arguments(parser)
    _add_output_arguments(parser)
    add_recipe_flags(parser)
    parser.set_defaults(func=run)
    return parser


def _add_job_arguments(parser: argparse.ArgumentParser) -> None:
    """What is trained: mode, model, image size, adapter, batch and captions (typed, or a shard set's)."""
    parser.add_argument("--mode", choices=MODES, default="lora", help="lora, qlora or full fine-tune")
    parser.add_argument(
        "--model",
        default="z-image",
        help=f"a model preset ({', '.join(PRESETS)}; 'tiny' is the smoke model) or a .safetensors weights file",
    )
    parser.add_argument("--resolution", type=pixels, nargs="+", default=[1024], help="side px, or width height")
    parser.add_argument("--rank", type=int_in(1, 1024), default=DEFAULT_LORA_RANK, help="LoRA rank")
    parser.add_argument("--targets", choices=LORA_TARGETS, default=DEFAULT_TARGETS, help="LoRA target preset")
    parser.add_argument(
        "--adapter",
        choices=ADAPTER_TYPES,
        default="lora",
        help="adapter type for lora/qlora: lora, dora, lokr or loha (qlora: lora or dora); its memory is priced",
    )
    parser.add_argument(
        "--batch", type=int_in(1, 1_000_000), default=None, help="target global batch (default: the tier's)"
    )
    parser.add_argument(
        "--caption-tokens", type=int_in(1, 8192), default=128, help="caption length in tokens (without --shards)"
    )
    parser.add_argument(
        "--shards", type=Path, default=None, help="plan for this shard set's buckets and caption lengths"
    )
    parser.add_argument(
        "--caption-length",
        choices=tuple(CAPTION_LENGTHS),
        default="longest",
        help="plan for the longest caption (longer ones refuse the run) or a percentile (longer ones are truncated)",
    )


def _add_training_and_machine_arguments(parser: argparse.ArgumentParser) -> None:
    """The learning rate and optimizer, and the machines planned for (this one, or a simulated tier)."""
    parser.add_argument("--lr", type=float_in(0, 1), default=1e-4, help="base learning rate for one GPU")
    parser.add_argument("--lr-scaling", choices=LR_SCALINGS, default="sqrt")
    parser.add_argument(
        "--optimizer",
        choices=("auto", *OPTIMIZERS),
        default="auto",
        help="optimizer (priced in the plan); auto: the mode's default, AdamW",
    )
    parser.add_argument("--tier", default=None, help=f"plan for a simulated tier: {', '.join(sorted(load_tiers()))}")
    parser.add_argument(
        "--nodes", type=int_in(1, 4096), default=None, help="machines of a multi-node run (default: the tier's, else 1)"
    )
    parser.add_argument(
        "--inter-node-gbps",
        type=float_in(0, 10_000),
        default=None,
        help="GB/s of each node's network interface (default: the tier's, else 12.5 = 100 Gb/s)",
    )


def _add_output_arguments(parser: argparse.ArgumentParser) -> None:
    """How the plan is printed, and the run config written beside it."""
    parser.add_argument("--json", action="store_true", help="print the plan as JSON instead of a table")
    parser.add_argument(
        "--write-config",
        type=Path,
        default=None,
        metavar="RUN/config.json",
        help="also write the run config that follows the plan (needs --shards; train it with train --config)",
    )
    parser.add_argument("--steps", type=int_in(1, 10_000_000), default=1000, help="optimizer steps, for --write-config")


def run(args: argparse.Namespace) -> int:
    try:
        plan, request, profile = _plan(args)
        shapes, resolutions = None, None
        if args.resolution_schedule != "none":
            shapes, resolutions = schedule_cli.plan_schedule(args, request, profile)
            plan = shapes.base
    except PlanRefused as refusal:
        print(json.dumps({"refused": str(refusal)}) if args.json else str(refusal))
        return 2
    except ValueError as error:
        logger.error("plan: %s", error)
        return 2
    if args.json:
        print(json.dumps(plan.to_dict() | ({"shapes": shapes.to_dict()["shapes"]} if shapes else {}), indent=2))
    else:
        print(plan.table() + ("\n" + schedule_cli.shapes_table(shapes) if shapes else ""))
    if args.write_config is not None:
        try:
            _write_config(args, plan, resolutions)
        except ValueError as error:
            logger.error("plan --write-config: %s", error)
            return 2
    return 0


def _plan(args: argparse.Namespace):
    from ..data.stats import read_dataset_stats

    tiers = load_tiers()
    if args.tier is not None and args.tier not in tiers:
        raise ValueError(f"--tier {args.tier!r} is not a known tier: choose one of {', '.join(sorted(tiers))}")
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
        lora_targets=args.targets,
        adapter=args.adapter,
        target_global_batch=args.batch,
        lr_base=args.lr,
        lr_scaling=args.lr_scaling,
        model=model_config(args.model),
        dataset=None if args.shards is None else read_dataset_stats(args.shards),
        caption_percentile=CAPTION_LENGTHS[args.caption_length],
        nodes=args.nodes,
        inter_node_gbps=args.inter_node_gbps,
        optimizer=None if args.optimizer == "auto" else args.optimizer,
    )
    return make_plan(request, profile, tier=tier if args.tier else None), request, profile


def model_config(model: str) -> ZImageConfig:
    """A preset by name, or the shape of a weights file (its header only)."""
    if model in PRESETS:
        return PRESETS[model]
    path = Path(model)
    if not path.is_file():
        raise ValueError(f"--model {model!r} is neither a preset ({', '.join(PRESETS)}) nor a weights file")
    from ..model.weights import infer_config, read_header

    return infer_config({key: shape for key, (_, shape) in read_header(path).items()})


def _write_config(args: argparse.Namespace, plan, resolutions: dict | None = None) -> None:
    from ..engine.config import TrainConfig

    if args.shards is None:
        raise ValueError("--write-config needs --shards: the shard set the run trains on (pack one first)")
    model = {"preset": args.model} if args.model in PRESETS else {"weights": str(Path(args.model).resolve())}
    recipe = recipe_sections(args)
    config = TrainConfig.from_plan(
        plan,
        run={"output_dir": str(args.write_config.resolve().parent), "steps": args.steps},
        model=model | recipe["model"],
        objective=recipe["objective"],
        data={"shards": str(args.shards.resolve())},
        **({"resolutions": resolutions} if resolutions else {}),
    )
    config.save(args.write_config)
    logger.info("wrote %s: python -m training train --config %s", args.write_config, args.write_config)
