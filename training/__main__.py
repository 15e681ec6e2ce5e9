"""Whetstone's command line: ``python -m training <command> ...``.

Each command lives next to the code it drives and is imported only when chosen, so ``train`` under torchrun does
not pay for the packer's imports and vice versa.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys

# command → (module with register(subparsers), one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "pack": ("training.data.cli", "pack an image folder into WebDataset shards"),
    "inspect": ("training.data.cli", "summarise a shard set"),
    "plan": ("training.hardware.cli", "plan micro-batch, checkpoint depth and parallelism for this machine or a tier"),
    "train": ("training.engine.cli", "train from a run config (plain python or under torchrun)"),
    "demo": ("training.apps.demo_cli", "CPU demo: pack a generated image set, plan, train a tiny LoRA, report"),
}


def build_parser(command: str | None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m training", description=__doc__.splitlines()[0])
    parser.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    if command in COMMANDS:
        importlib.import_module(COMMANDS[command][0]).register(subparsers)
    else:
        for name, (_, help_text) in COMMANDS.items():
            subparsers.add_parser(name, help=help_text)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    command = next((a for a in argv if a in COMMANDS), None)
    parser = build_parser(command)
    args = parser.parse_args(argv)
    rank = os.environ.get("RANK")  # set by torchrun: tell the ranks' interleaved lines apart
    prefix = f"[rank {rank}] " if rank is not None else ""
    logging.basicConfig(level=args.log_level, format=f"%(asctime)s {prefix}%(levelname)s %(name)s: %(message)s")
    if not hasattr(args, "func"):
        parser.error(f"{args.command!r} needs its arguments: python -m training {args.command} --help")
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
