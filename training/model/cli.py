"""``python -m training extract-lora``: a LoRA (ComfyUI format) of a chosen rank from a full fine-tune and its base."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from ..cli_support import int_in
from .targets import DEFAULT_TARGETS, LORA_TARGETS

logger = logging.getLogger(__name__)


def register(subparsers) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "extract-lora",
        help="extract a LoRA of a chosen rank (SVD of the weight change) from a full fine-tune",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--base", required=True, type=Path, help="the model the fine-tune started from")
    parser.add_argument("--tuned", required=True, type=Path, help="the fine-tune (e.g. its model.safetensors)")
    parser.add_argument("--rank", type=int_in(1, 1024), default=32, help="LoRA rank: higher keeps more of the change")
    parser.add_argument("--targets", choices=LORA_TARGETS, default=DEFAULT_TARGETS, help="which linears get a LoRA")
    parser.add_argument("--out", required=True, type=Path, help="the LoRA file to write (.safetensors)")
    parser.set_defaults(func=run)
    return parser


def run(args: argparse.Namespace) -> int:
    from .extract import extract_lora, save_extracted

    if args.out.suffix != ".safetensors":
        raise ValueError(f"--out {args.out}: a LoRA file ends in .safetensors")
    extracted = extract_lora(args.base, args.tuned, rank=args.rank, targets=args.targets)
    save_extracted(extracted, args.out, rank=args.rank, targets=args.targets, source=args.tuned.name)
    worst = max(extracted.errors, key=extracted.errors.get)
    print(
        f"wrote {args.out}: rank {args.rank}, {len(extracted.errors)} modules; relative error of the weight change "
        f"mean {extracted.mean_error:.4f}, worst {extracted.errors[worst]:.4f} ({worst})"
    )
    return 0
