"""The ``train`` subcommand: ``python -m training train --config RUN/config.json``, alone or under torchrun."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from ..cli_support import USER_ERROR

logger = logging.getLogger(__name__)


def register(subparsers) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "train",
        help="train a LoRA, QLoRA or full fine-tune from a run config",
        description=(
            "Train from one validated config file. One process: python -m training train --config run/config.json. "
            "N GPUs: torchrun --nproc_per_node N -m training train --config run/config.json."
        ),
    )
    parser.add_argument("--config", required=True, type=Path, help="the run's config.json (see TrainConfig)")
    parser.add_argument(
        "--nproc-per-node",
        type=int,
        default=None,
        metavar="N",
        help="start N training processes (torchrun for N > 1) under the launcher the Train node uses: it holds the "
        "run folder, forwards Ctrl+C as a polite stop and names a rank that dies; without it, train in this process",
    )
    parser.set_defaults(func=train_command)
    return parser


def train_command(args: argparse.Namespace) -> int:
    """Exit code: 0 completed or stopped on request, 2 for a config or setup mistake (the message says what to fix)."""
    from .config import TrainConfig

    try:
        config = TrainConfig.load(args.config)
        check_paths(config)
    except ValueError as error:
        logger.error("%s", error)
        return USER_ERROR
    from .divergence import TrainingDiverged
    from .trainer import run_training  # torch: imported once the config is known to be good

    try:
        if args.nproc_per_node is not None:
            from ..run.launch import launch

            return launch(args.config, Path(config.run.output_dir), args.nproc_per_node)
        return run_training(config)
    except (ValueError, TrainingDiverged) as error:
        logger.error("training stopped: %s", error)
        return USER_ERROR


def check_paths(config) -> None:
    """What the config names on disk, checked before any rank starts (a ValueError naming the key and the fix)."""
    output_dir = Path(config.run.output_dir)
    if output_dir.exists() and not output_dir.is_dir():
        raise ValueError(f"run.output_dir {output_dir} is a file, not a folder: give a folder for the run")
    lora_dir = config.run.lora_file.parent
    if lora_dir.exists() and not lora_dir.is_dir():
        raise ValueError(f"run.lora_path {config.run.lora_file}: {lora_dir} is a file, not a folder")
    if config.model.weights and not Path(config.model.weights).exists():
        raise ValueError(
            f"model.weights {config.model.weights} does not exist: give the diffusion model's .safetensors file "
            "(in ComfyUI: models/diffusion_models), or fix the path"
        )
    from .variant_setup import check_adapter_path, run_variant

    check_adapter_path(config)
    run_variant(config)  # a Turbo run with nothing protecting its distillation stops here, naming the fixes
