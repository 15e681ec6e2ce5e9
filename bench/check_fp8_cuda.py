"""On a GPU: the FP8 rowwise quantisation kernel (training/engine/fp8_kernel.py) against `fp8_frozen.quantize_rows`
eager, bit for bit, at Z-Image's activation shapes (512² bs4: 4,608 rows); its time against the PyTorch ops eager and
compiled (CUDA events, 50 calls each); and an FP8 layer's forward and input gradient, eager and compiled, with the
kernel against the PyTorch ops. Prints one line per check; exits 1 on any failure.

    python3 bench/check_fp8_cuda.py
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_nf4_dequant import timed  # noqa: E402

from training.engine import fp8_kernel  # noqa: E402
from training.engine.fp8_frozen import FrozenFP8Linear, quantize_rows  # noqa: E402

SHAPES = ((4608, 3840), (4608, 10240), (4608, 11520), (512, 3840))  # block input, FFN hidden, qkv grad, captions


def check_shape(rows: int, columns: int) -> bool:
    torch.manual_seed(rows + columns)
    x = torch.randn(rows, columns, device="cuda", dtype=torch.bfloat16) * 3
    kernel = fp8_kernel.quantize_rows_op()
    (values, scales), (expected, expected_scales) = kernel(x), quantize_rows(x)
    exact = torch.equal(values.view(torch.uint8), expected.view(torch.uint8)) and torch.equal(scales, expected_scales)
    compiled = torch.compile(quantize_rows)
    times = {"eager": timed(lambda: quantize_rows(x)), "compiled": timed(lambda: compiled(x)),
             "kernel": timed(lambda: kernel(x))}  # fmt: skip
    moved = x.numel() * 3 + rows * 4  # bf16 read, e4m3 written, one float32 scale per row
    rates = ", ".join(f"{name} {s * 1e6:.1f} µs ({moved / s / 1e12:.2f} TB/s)" for name, s in times.items())
    print(f"{rows}x{columns}: identical {exact}; {rates}")
    return exact


def check_layer(compiled: bool) -> bool:
    torch.manual_seed(0)
    linear = nn.Linear(3840, 10240, bias=False, device="cuda", dtype=torch.bfloat16).requires_grad_(False)
    with_kernel, with_ops = FrozenFP8Linear(linear), FrozenFP8Linear(linear)
    with_ops.kernel = False
    x = torch.randn(4, 1152, 3840, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    grad = torch.randn(4, 1152, 10240, device="cuda", dtype=torch.bfloat16)
    results = []
    for layer in (with_kernel, with_ops):
        run = torch.compile(layer) if compiled and layer is with_kernel else layer
        out = run(x)
        results.append((out.detach(), torch.autograd.grad(out, x, grad)[0]))
    same = all(torch.equal(a, b) for a, b in zip(*results))
    print(f"layer {'compiled' if compiled else 'eager'}: kernel {with_kernel.kernel}; forward and input gradient "
          f"identical to the PyTorch ops' {same}")  # fmt: skip
    return with_kernel.kernel and same


def main() -> int:
    fp8_kernel.ENABLED = True
    available = fp8_kernel.available(torch.bfloat16)
    print(f"kernel available (self-check passed): {available}")
    ok = available and all([check_shape(*shape) for shape in SHAPES])
    ok = all([check_layer(False), check_layer(True)]) and ok
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
