"""``python -m training export-diffusers``: an adapter file of ours in the form diffusers' Z-Image pipeline loads."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

import torch

logger = logging.getLogger(__name__)


def register(subparsers) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "export-diffusers",
        help="write an adapter file (LoRA/DoRA/LoKr/LoHa) in the form diffusers' ZImagePipeline.load_lora_weights loads",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--lora", required=True, type=Path, help="the adapter file a run wrote (.safetensors)")
    parser.add_argument(
        "--out",
        type=Path,
        default=None,
        help="the file to write (default: <lora stem>.diffusers.safetensors beside it)",
    )
    parser.add_argument(
        "--base", type=Path, default=None, help="DoRA only: the base model it trained on (its magnitude needs it)"
    )
    parser.set_defaults(func=run)
    return parser


def base_reader(path: Path):
    """Our weight name → that weight of the model file ``path`` (float32), one at a time."""
    from .weights import stream_tensors, tensor_shapes

    shapes = tensor_shapes(path)

    def read(name: str) -> torch.Tensor:
        if name not in shapes:
            raise ValueError(f"--base {path} has no weight {name}: not the model this adapter was trained on")
        return next(stream_tensors(path, [name], dtype=torch.float32))[1]

    return read


def run(args: argparse.Namespace) -> int:
    from .diffusers_file import export_diffusers

    if args.lora.suffix != ".safetensors" or (args.out is not None and args.out.suffix != ".safetensors"):
        raise ValueError(f"--lora {args.lora} / --out {args.out}: adapter files end in .safetensors")
    base = base_reader(args.base) if args.base is not None else None
    out = export_diffusers(args.lora, args.out, base=base)
    print(f"wrote {out}: load it with ZImagePipeline.load_lora_weights({str(out)!r})")
    return 0
