"""Write the CPU smoke model: the smallest Z-Image ComfyUI's loaders recognise, with random weights.

``python -m tools.make_smoke_model <ComfyUI>/models/diffusion_models`` writes ``z_image_smoke_bf16.safetensors``
(about 1.7 GiB): dim 3840 (ComfyUI detects Z-Image by it), one main block, two refiners of each kind. The CPU smoke
workflow (workflows/Whetstone 01 - cpu ...) plans, trains and samples it; its images are noise.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from training.engine.build import random_model
from training.model.weights import save_weights

from .make_workflows import SMOKE_CONFIG, SMOKE_MODEL


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folder", type=Path, help="where to write it, e.g. ComfyUI/models/diffusion_models")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if not args.folder.is_dir():
        parser.error(f"{args.folder} is not a folder")
    model = random_model(SMOKE_CONFIG, dtype=torch.bfloat16, device=torch.device("cpu"), seed=args.seed)
    path = save_weights(model, args.folder / SMOKE_MODEL, layout="comfy", metadata={"whetstone": "cpu smoke model"})
    print(f"written: {path} ({path.stat().st_size / 2**30:.2f} GiB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
