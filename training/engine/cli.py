"""The ``train`` subcommand: ``python -m training train --config RUN/config.json``, alone or under torchrun."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

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
    parser.set_defaults(func=train_command)
    return parser


def train_command(args: argparse.Namespace) -> int:
    """Exit code: 0 completed or stopped on request, 2 for a config or setup mistake (the message says what to fix)."""
    from .config import TrainConfig
    from .trainer import TrainingDiverged, run_training

    try:
        config = TrainConfig.load(args.config)
    except ValueError as error:
        logger.error("%s", error)
        return 2
    try:
        return run_training(config)
    except (ValueError, TrainingDiverged) as error:
        logger.error("training stopped: %s", error)
        return 2
