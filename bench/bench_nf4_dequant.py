"""On a GPU: the NF4 dequantisation alone, per formulation, against bitsandbytes' CUDA kernel (issue 12: the in-graph
dequantisation costs ~25 ms of QLoRA's step against ~15 ms for bitsandbytes' kernel). Prints, per weight shape, the
time and the effective bandwidth (NF4 + absmax read, bf16 written) of each, and whether it equals bitsandbytes'.

    python3 bench/bench_nf4_dequant.py
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
import triton
import triton.language as tl
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from training.engine.nf4_frozen import BUFFER_NAMES, FrozenNF4Linear, dequantize_nf4  # noqa: E402
from training.engine.quantize import to_nf4  # noqa: E402

SHAPES = ((10240, 3840), (3840, 10240), (3840, 3840))


def int32_indices(buffers, layout):
    blocks = buffers["absmax"].numel()
    nested_scale = buffers["nested_absmax"][:, None].expand(-1, layout.nested_blocksize).reshape(-1)[:blocks]
    absmax = buffers["nested_code"][buffers["absmax"].int()] * nested_scale + buffers["offset"]
    packed = buffers["packed"].int()
    codes = torch.stack((packed >> 4, packed & 0x0F), dim=-1).reshape(-1)
    values = buffers["code"][codes].reshape(-1, layout.blocksize) * absmax.reshape(-1, 1)
    return values.reshape(layout.shape).to(layout.dtype)


@triton.jit
def _nf4_kernel(packed, absmax, nested_absmax, nested_code, code, offset, out, n_bytes,
                HALF_BLOCK: tl.constexpr, NESTED: tl.constexpr, BYTES: tl.constexpr):  # fmt: skip
    start = tl.program_id(0) * BYTES
    index = start + tl.arange(0, BYTES)
    mask = index < n_bytes
    byte = tl.load(packed + index, mask=mask, other=0).to(tl.int32)
    block = index // HALF_BLOCK
    quantised = tl.load(absmax + block, mask=mask, other=0).to(tl.int32)
    scale = tl.load(nested_code + quantised, mask=mask, other=0.0) * tl.load(
        nested_absmax + block // NESTED, mask=mask, other=0.0
    ) + tl.load(offset)
    high = tl.load(code + (byte >> 4), mask=mask, other=0.0) * scale
    low = tl.load(code + (byte & 15), mask=mask, other=0.0) * scale
    pairs = tl.interleave(high, low).to(tl.bfloat16)
    where = 2 * start + tl.arange(0, 2 * BYTES)
    tl.store(out + where, pairs, mask=where < 2 * n_bytes)


def triton_kernel(buffers, layout):
    packed = buffers["packed"]
    out = torch.empty(layout.shape, dtype=torch.bfloat16, device=packed.device)
    n_bytes, per_program = packed.numel(), 1024
    _nf4_kernel[(triton.cdiv(n_bytes, per_program),)](
        packed, buffers["absmax"], buffers["nested_absmax"], buffers["nested_code"], buffers["code"],
        buffers["offset"], out, n_bytes, HALF_BLOCK=layout.blocksize // 2, NESTED=layout.nested_blocksize,
        BYTES=per_program,
    )  # fmt: skip
    return out


COMPILED_TODAY = torch.compile(dequantize_nf4)
COMPILED_INT32 = torch.compile(int32_indices)


def candidates_for(layer, buffers, layout) -> dict:
    import bitsandbytes as bnb

    return {
        "bitsandbytes": lambda: bnb.functional.dequantize_4bit(layer.weight.data, layer.weight.quant_state),
        "torch, compiled (today)": lambda: COMPILED_TODAY(buffers, layout),
        "torch int32, compiled": lambda: COMPILED_INT32(buffers, layout),
        "triton kernel": lambda: triton_kernel(buffers, layout),
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
