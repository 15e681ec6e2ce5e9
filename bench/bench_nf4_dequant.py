"""On a GPU: the NF4 dequantisation alone, per formulation, against bitsandbytes' CUDA kernel (issue 12: the in-graph
dequantisation costs ~25 ms of QLoRA's step against ~15 ms for bitsandbytes' kernel). Prints, per weight shape, the
time and the effective bandwidth (NF4 + absmax read, bf16 written) of each, and whether it equals bitsandbytes'.

    python3 bench/bench_nf4_dequant.py
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from training.engine import nf4_kernel  # noqa: E402
from training.engine.nf4_frozen import BUFFER_NAMES, FrozenNF4Linear, dequantize_nf4  # noqa: E402
from training.engine.quantize import to_nf4  # noqa: E402

SHAPES = ((10240, 3840), (3840, 10240), (3840, 3840))


COMPILED_TODAY = torch.compile(dequantize_nf4)


def candidates_for(layer, buffers, layout) -> dict:
    """bitsandbytes' kernel, Inductor's kernel for the PyTorch ops, and the pack's Triton kernel (`nf4_kernel`)."""
    import bitsandbytes as bnb

    dequantize, _ = nf4_kernel.operators()
    args = (*(buffers[name] for name in BUFFER_NAMES), *layout.shape, layout.blocksize, layout.nested_blocksize)
    return {
        "bitsandbytes": lambda: bnb.functional.dequantize_4bit(layer.weight.data, layer.weight.quant_state),
        "torch, compiled": lambda: COMPILED_TODAY(buffers, layout),
        "triton kernel": lambda: dequantize(*args),
    }


def timed(function, repeats: int = 50) -> float:
    for _ in range(3):
        function()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(repeats):
        function()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / repeats / 1000


def main() -> int:
    import bitsandbytes as bnb

    for shape in SHAPES:
        torch.manual_seed(0)
        linear = nn.Linear(shape[1], shape[0], bias=False, device="cuda", dtype=torch.bfloat16).requires_grad_(False)
        layer = to_nf4(linear, compute_dtype=torch.bfloat16)
        frozen = FrozenNF4Linear(layer)
        buffers = {name: getattr(frozen, name) for name in BUFFER_NAMES}
        reference = bnb.functional.dequantize_4bit(layer.weight.data, layer.weight.quant_state)
        numel = shape[0] * shape[1]
        moved = numel / 2 + buffers["absmax"].numel() + numel * 2
        candidates = candidates_for(layer, buffers, frozen.layout)
        for name, function in candidates.items():
            seconds = timed(function)
            same = torch.equal(function(), reference)
            print(
                f"{shape[0]}x{shape[1]} {name:24s} {seconds * 1e6:8.1f} µs {moved / seconds / 1e12:5.2f} TB/s equal {same}"
            )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
