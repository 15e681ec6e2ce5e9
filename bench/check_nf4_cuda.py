"""On a GPU: the in-graph NF4 dequantisation (training/engine/nf4_frozen.py, and the Triton kernel of
training/engine/nf4_kernel.py) against bitsandbytes' CUDA kernel, bit for bit, at Z-Image's block shapes, eager and
compiled; the layer's forward and input gradient against the PyTorch path; and that a compiled layer keeps no
dequantised weight for its backward. Prints one line per check; exits 1 on any failure.

    python3 bench/check_nf4_cuda.py
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

SHAPES = ((11520, 3840), (3840, 3840), (10240, 3840), (3840, 10240), (15360, 256))  # qkv, o, w1/w3, w2, adaLN


def check_shape(out_features: int, in_features: int) -> bool:
    import bitsandbytes as bnb

    torch.manual_seed(0)
    linear = nn.Linear(in_features, out_features, bias=False, device="cuda", dtype=torch.bfloat16)
    layer = to_nf4(linear.requires_grad_(False), compute_dtype=torch.bfloat16)
    reference = bnb.functional.dequantize_4bit(layer.weight.data, layer.weight.quant_state)
    frozen = FrozenNF4Linear(layer)
    tensors = [getattr(frozen, name) for name in BUFFER_NAMES]
    args = (*frozen.layout.shape, frozen.layout.blocksize, frozen.layout.nested_blocksize)
    dequantize, _ = nf4_kernel.operators()
    torch_path = dequantize_nf4(dict(zip(BUFFER_NAMES, tensors)), frozen.layout)
    compiled_torch = torch.compile(lambda: dequantize_nf4(dict(zip(BUFFER_NAMES, tensors)), frozen.layout))()
    kernel, compiled_kernel = dequantize(*tensors, *args), torch.compile(lambda: dequantize(*tensors, *args))()
    weights = {
        "torch": torch_path,
        "torch compiled": compiled_torch,
        "kernel": kernel,
        "kernel compiled": compiled_kernel,
    }
    exact = {name: torch.equal(weight, reference) for name, weight in weights.items()}
    x = torch.randn(4096, in_features, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    out = frozen(x)  # the Triton path on CUDA
    grad = torch.randn_like(out)
    (grad_x,) = torch.autograd.grad(out, x, grad)
    same_forward = torch.equal(out, x.detach() @ reference.t())
    same_grad = torch.equal(grad_x, grad @ reference)
    ok = all(exact.values()) and same_forward and same_grad
    print(
        f"{out_features}x{in_features}: weights identical {exact}; forward {same_forward}, input gradient {same_grad}"
    )
    return ok


class Adapted(nn.Module):
    """An NF4 linear with a trainable low-rank path beside it, as a LoRA layer has."""

    def __init__(self, frozen: FrozenNF4Linear) -> None:
        super().__init__()
        self.frozen = frozen
        self.down = nn.Linear(frozen.in_features, 16, bias=False, device="cuda", dtype=torch.bfloat16)
        self.up = nn.Linear(16, frozen.out_features, bias=False, device="cuda", dtype=torch.bfloat16)

    def forward(self, x):
        return torch.nn.functional.silu(self.frozen(x) + self.up(self.down(x)))


def check_saved() -> bool:
    torch.manual_seed(0)
    linear = nn.Linear(3840, 10240, bias=False, device="cuda", dtype=torch.bfloat16).requires_grad_(False)
    frozen = FrozenNF4Linear(to_nf4(linear, compute_dtype=torch.bfloat16))
    weight = frozen.weight
    model = torch.compile(Adapted(frozen))
    x = torch.randn(2048, 3840, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    model(x).square().mean().backward()  # compile
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda tensor: saved.append(tensor) or tensor, lambda t: t):
        model(x).square().mean().backward()
    kept = any(t.shape == weight.shape and torch.equal(t, weight) for t in saved)
    big = sum(t.numel() * t.element_size() for t in saved) / 2**20
    print(f"compiled layer: {len(saved)} tensors saved for backward, {big:.1f} MiB; dequantised weight kept: {kept}")
    return bool(saved) and not kept


def main() -> int:
    results = [check_shape(*shape) for shape in SHAPES] + [check_saved()]
    return 0 if all(results) else 1


if __name__ == "__main__":
    raise SystemExit(main())
