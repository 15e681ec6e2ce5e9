"""The NF4 Triton kernel's operators (training/engine/nf4_kernel.py) on the CPU, through Triton's interpreter: they
take the packed tensors in `BUFFER_NAMES` order and compute the PyTorch path's float32 values (the beside pair: the same
weight with LoRA's B in the columns after it). Runs where Triton is
installed (a GPU machine's torch has it; the CPU build has not, so CI skips it); `bench/check_nf4_cuda.py` checks the
kernel bit for bit against bitsandbytes on a GPU."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

pytest.importorskip("triton")
pytest.importorskip("bitsandbytes")

REPO = Path(__file__).resolve().parents[1]

CHECK = textwrap.dedent(
    """
    import dataclasses
    import torch
    from torch import nn
    from training.engine import nf4_kernel
    from training.engine.nf4_frozen import BUFFER_NAMES, FrozenNF4Linear, dequantize_nf4
    from training.engine.quantize import to_nf4

    dequantize, grad_input = nf4_kernel.operators()
    dequantize_beside, grad_beside = nf4_kernel.beside_operators()
    for out_features, in_features in ((96, 80), (256, 512), (48, 64)):  # nested blocks partial in two
        torch.manual_seed(out_features)
        linear = nn.Linear(in_features, out_features, bias=False).to(torch.bfloat16).requires_grad_(False)
        frozen = FrozenNF4Linear(to_nf4(linear, compute_dtype=torch.bfloat16))
        tensors = [getattr(frozen, name) for name in BUFFER_NAMES]
        layout = frozen.layout
        weight = dequantize(*tensors, *layout.shape, layout.blocksize, layout.nested_blocksize)
        exact = dequantize_nf4(dict(zip(BUFFER_NAMES, tensors)), dataclasses.replace(layout, dtype=torch.float32))
        # the interpreter casts to bf16 by truncation, a GPU rounds to nearest even: either is the same float32 value
        truncated = (exact.view(torch.int32) & -65536).view(torch.float32).to(torch.bfloat16)
        assert ((weight == exact.to(torch.bfloat16)) | (weight == truncated)).all(), (out_features, in_features)
        grad = torch.randn(7, out_features, dtype=torch.bfloat16)
        got = grad_input(grad, *tensors, *layout.shape, layout.blocksize, layout.nested_blocksize)
        assert torch.equal(got, grad @ weight), (out_features, in_features)
        rank = 24 if out_features == 96 else 8  # 24: R not a power of 2, and 2,304 values: three copy programs
        beside = torch.randn(out_features, rank, dtype=torch.bfloat16)  # LoRA's B, written beside W's rows
        combined = dequantize_beside(beside, *tensors, *layout.shape, layout.blocksize, layout.nested_blocksize)
        assert combined.shape == (out_features, in_features + rank)
        assert torch.equal(combined[:, :in_features], weight) and torch.equal(combined[:, in_features:], beside)
        got = grad_beside(grad, beside, *tensors, *layout.shape, layout.blocksize, layout.nested_blocksize)
        assert torch.equal(got, grad @ combined), (out_features, in_features)
    print("ok")
    """
)


def test_the_operators_compute_the_pytorch_paths_values():
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": os.pathsep.join([str(REPO), *sys.path])}
    result = subprocess.run(
        [sys.executable, "-c", CHECK], cwd=REPO, env=env, capture_output=True, text=True, timeout=600
    )
    assert result.returncode == 0 and result.stdout.strip().endswith("ok"), (
        result.stdout[-2000:] + result.stderr[-4000:]
    )
