"""On a GPU: the in-graph NF4 dequantisation (training/engine/nf4_frozen.py) against bitsandbytes' CUDA kernel, bit for
bit, at Z-Image's block shapes, eager and compiled. Prints one line per shape; exits 1 on any difference.

    python3 bench/check_nf4_cuda.py
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from training.engine.nf4_frozen import FrozenNF4Linear  # noqa: E402
from training.engine.quantize import to_nf4  # noqa: E402

SHAPES = ((11520, 3840), (3840, 3840), (10240, 3840), (3840, 10240), (15360, 256))  # qkv, o, w1/w3, w2, adaLN


def main() -> int:
    import bitsandbytes as bnb

    failures = 0
    for out_features, in_features in SHAPES:
        torch.manual_seed(0)
        linear = nn.Linear(in_features, out_features, bias=False, device="cuda", dtype=torch.bfloat16)
        layer = to_nf4(linear.requires_grad_(False), compute_dtype=torch.bfloat16)
        reference = bnb.functional.dequantize_4bit(layer.weight.data, layer.weight.quant_state)
        frozen = FrozenNF4Linear(layer)
        compiled = torch.compile(lambda module: module.weight)(frozen)
        x = torch.randn(4096, in_features, device="cuda", dtype=torch.bfloat16)
        product = (frozen(x) - x @ reference.t()).abs().max().item()
        exact = torch.equal(frozen.weight, reference) and torch.equal(compiled, reference)
        failures += not exact or product != 0
        print(f"{out_features}x{in_features}: weights identical {exact}, forward max |diff| {product:.3g}")
    return 1 if failures else 0


if __name__ == "__main__":
    raise SystemExit(main())
