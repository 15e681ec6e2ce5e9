"""The ``demo`` subcommand: ``python -m training demo [--output DIR]``. See `training.apps.demo`."""

from __future__ import annotations

import argparse
from pathlib import Path

from ..cli_support import int_in


def register(subparsers) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "demo",
        help="CPU demo: pack a generated image set, plan, train a tiny LoRA, report",
        description=(
            "Runs the whole pipeline on the CPU in a few minutes: draws a small captioned image set, packs it with "
            "the test encoders, plans for the CPU tier, trains a LoRA on the tiny Z-Image model, writes the LoRA, "
            "a loss plot and summary.json, and checks the LoRA file reloads and applies."
        ),
    )
    parser.add_argument(
        "--output", type=Path, default=None, help="output folder, reused if given (default: a new temporary folder)"
    )
    parser.add_argument(
        "--steps", type=int_in(10, 10_000), default=100, help="optimizer steps (a few dozen show the loss falling)"
    )
    parser.add_argument("--seed", type=int_in(0, 2**32 - 1), default=0)
    parser.set_defaults(func=demo_command)
    return parser


def demo_command(args: argparse.Namespace) -> int:
    from .demo import DemoSettings, run_demo

    result = run_demo(DemoSettings(output=args.output, steps=args.steps, seed=args.seed))
    print(
        f"\nWhetstone demo finished in {result.seconds:.0f} s\n"
        f"  loss (smoothed): {result.first_loss:.4f} -> {result.last_loss:.4f}\n"
        f"  LoRA:       {result.lora_file}\n"
        f"  loss plot:  {result.report_png}\n"
        f"  summary:    {result.summary_json}\n"
        f"  run folder: {result.run_dir} (events.jsonl, status.json, checkpoints/)"
    )
    return 0
