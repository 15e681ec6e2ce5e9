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

from .cli_support import Parser, run_command

# command → (module with register(subparsers), one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "pack": ("training.data.cli", "pack an image folder into WebDataset shards"),
    "inspect": ("training.data.cli", "summarise a shard set"),
    "plan": ("training.hardware.cli", "plan micro-batch, checkpoint depth and parallelism for this machine or a tier"),
    "train": ("training.engine.cli", "train from a run config (plain python or under torchrun)"),
    "previews": ("training.engine.preview_cli", "encode preview prompts; decode a run's previews to PNGs with the VAE"),
    "extract-lora": ("training.model.cli", "extract a LoRA (SVD to a chosen rank) from a full fine-tune"),
    "export-diffusers": ("training.model.export_cli", "write an adapter file in the form diffusers' Z-Image loads"),
    "launch": ("training.run.multinode", "print (or run) the torchrun command of each node of a multi-node run"),
    "demo": ("training.apps.demo_cli", "CPU demo: pack a generated image set, plan, train a tiny LoRA, report"),
}


LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")


def build_parser(command: str | None) -> argparse.ArgumentParser:
    parser = Parser(prog="python -m training", description=__doc__.splitlines()[0])
    parser.add_argument("--log-level", default="INFO", choices=LOG_LEVELS, help="(default: %(default)s)")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    if command in COMMANDS:
        importlib.import_module(COMMANDS[command][0]).register(subparsers)
    else:
        for name, (_, help_text) in COMMANDS.items():
            subparsers.add_parser(name, help=help_text)
    for subparser in subparsers.choices.values():  # also accepted after the command; SUPPRESS keeps the top one
        subparser.add_argument("--log-level", default=argparse.SUPPRESS, choices=LOG_LEVELS, help="as above")
    return parser


def configure_logging(level: str) -> None:
    rank = os.environ.get("RANK")  # set by torchrun: tell the ranks' interleaved lines apart
    prefix = f"[rank {rank}] " if rank is not None else ""
    logging.basicConfig(level=level, format=f"%(asctime)s {prefix}%(levelname)s %(name)s: %(message)s")
    if level != "DEBUG":
        # peft imports bitsandbytes whenever it is installed, even for plain LoRA, and bitsandbytes' CPU backend then
        # warns on every run that the optional `kernels` package is missing (its only message; shown under DEBUG).
        logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    command = next((a for a in argv if a in COMMANDS), None)
    parser = build_parser(command)
    args = parser.parse_args(argv)
    configure_logging(args.log_level)
    if not hasattr(args, "func"):
        parser.error(f"{args.command!r} needs its arguments: python -m training {args.command} --help")
    return run_command(args.command, lambda: args.func(args), argv)


if __name__ == "__main__":
    sys.exit(main())
