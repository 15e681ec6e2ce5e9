"""The FP8 rowwise quantisation kernel (training/engine/fp8_kernel.py) on the CPU, through Triton's interpreter: the
same scales as `fp8_frozen.quantize_rows` and the same e4m3 values, but for the interpreter's own two rounding flaws
(named below; a GPU converts with round-to-nearest-even, and `self_check` demands every bit there). Runs where Triton
is installed (CI's CPU torch has none, so it skips); `bench/check_fp8_cuda.py` checks the kernel on a GPU."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from training.engine import fp8_kernel

REPO = Path(__file__).resolve().parents[1]

CHECK = textwrap.dedent(
    """
    import torch
    from training.engine import fp8_kernel
    from training.engine.fp8_frozen import quantize_rows

    quantize = fp8_kernel.quantize_rows_op()
    torch.manual_seed(1)
    for columns in (1000, 3840, 48):
        rows = torch.cat([fp8_kernel.check_rows("cpu", columns), torch.randn(5, columns).to(torch.bfloat16)])
        (values, scales), (expected, expected_scales) = quantize(rows), quantize_rows(rows)
        assert torch.equal(scales, expected_scales), columns
        got, want = values.float(), expected.float()
        scaled = rows.float() / expected_scales
        # the interpreter rounds an exact half away from zero (a GPU: to even), rounding up to the next power of two
        # keeps the exponent (so 124.95 becomes 64, not 128), and truncates e4m3's subnormals (below 2**-6, steps of 2**-9);
        # every other value must be the same
        halfway = (scaled - got).abs() == (scaled - want).abs()
        lost_carry = (got * 2 == want) & ((expected.view(torch.uint8) & 7) == 0)
        subnormal = (want.abs() <= 2**-6) & ((got - want).abs() <= 2**-9) & (got.abs() <= want.abs())
        assert ((got == want) | halfway | lost_carry | subnormal).all(), columns
        assert (got == want).float().mean() > 0.8, columns
    print("ok")
    """
)


def test_the_operator_computes_the_pytorch_paths_values():
    pytest.importorskip("triton")
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": os.pathsep.join([str(REPO), *sys.path])}
    result = subprocess.run(
        [sys.executable, "-c", CHECK], cwd=REPO, env=env, capture_output=True, text=True, timeout=600
    )
    assert result.returncode == 0 and result.stdout.strip().endswith("ok"), (
        result.stdout[-2000:] + result.stderr[-4000:]
    )


def test_only_bf16_gpu_rows_within_the_limit_go_to_the_kernel():
    assert not fp8_kernel.available(torch.float32)
    assert not fp8_kernel.fits(torch.zeros(4, 64, dtype=torch.bfloat16))  # on the CPU
    meta = torch.empty(4, 64, dtype=torch.bfloat16, device="meta")
    assert not fp8_kernel.fits(meta)
    if torch.cuda.is_available():
        gpu = torch.zeros(4, fp8_kernel.ROW_LIMIT, dtype=torch.bfloat16, device="cuda")
        assert fp8_kernel.fits(gpu) and not fp8_kernel.fits(gpu.float())
        assert not fp8_kernel.fits(torch.zeros(4, fp8_kernel.ROW_LIMIT + 1, dtype=torch.bfloat16, device="cuda"))


def test_the_check_rows_hold_the_edge_cases():
    rows = fp8_kernel.check_rows("cpu", 100).float()
    assert rows.shape == (6, 100) and rows.isfinite().all()
    assert (rows[1] == 0).all() and rows[2].abs().max() < 1e-12 and rows[3].abs().max() > 1e36
