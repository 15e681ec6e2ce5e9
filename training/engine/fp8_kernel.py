"""The rowwise FP8 quantisation of activations and output gradients as one Triton kernel (`fp8_frozen` uses it on
CUDA when `ENABLED` and Triton is there, else `fp8_frozen.quantize_rows`' PyTorch ops; off until measured on a GPU).

Inductor compiles `quantize_rows` (a row's absolute maximum, then every value divided by its scale) as a looped
two-pass reduction, since its rows of 3,840 to 11,520 values are over its persistent-reduction size (1,024): each
row is read twice, and the kernels reach 1.1 TB/s of the H200's 4.8 (`docs/benchmarks.md`, the FP8 profile). Here one
program holds one whole row in registers (up to `ROW_LIMIT` values): it reads the row once and writes its e4m3 values
and its scale, the same numbers as the PyTorch ops (the scale times the float32 reciprocal of 448, as CUDA computes
a division by a scalar; IEEE division of the values; round to nearest even; `self_check`).

``whetstone::fp8_quantize_rows`` is a `torch.library.triton_op`: compiled, Inductor launches the kernel from its own
generated code. Triton is imported only on a machine with a GPU; the CPU build of torch has none. Before its first use
on a GPU the kernel is checked against the PyTorch ops; a difference or a failure falls back to them, saying so.
"""

from __future__ import annotations

import functools
import importlib.util
import logging

import torch

logger = logging.getLogger(__name__)

#: Off until the kernel has been measured on a GPU (issue 12): `bench_ours`' fp8-512-quantkernel item turns it on.
ENABLED = False
ROW_LIMIT = 16384  # values of one row a program holds (bf16 rows of 11,520 for the fused qkv's output gradient)


def available(dtype: torch.dtype) -> bool:
    """Whether a layer computing in ``dtype`` quantises its CUDA activations with the kernel: bf16, a GPU, Triton
    installed, and the kernel passed `self_check` on the current GPU. Decided once per layer, when it is built."""
    if not (ENABLED and dtype == torch.bfloat16 and torch.cuda.is_available()):
        return False
    if importlib.util.find_spec("triton") is None:
        return False
    return self_check(torch.device("cuda", torch.cuda.current_device()))


def fits(tensor: torch.Tensor) -> bool:
    """Whether a layer that has the kernel (`available`) hands it ``tensor``: bf16 rows [rows, columns] on a GPU of
    at most `ROW_LIMIT` values (static properties only: a compiled block decides this while it is traced)."""
    return tensor.is_cuda and tensor.dtype == torch.bfloat16 and tensor.dim() == 2 and 0 < tensor.shape[1] <= ROW_LIMIT


@functools.cache
def self_check(device: torch.device) -> bool:
    """Once per device: the kernel's values and scales against `fp8_frozen.quantize_rows`', bit for bit, on rows that
    exercise the edge cases (a zero row, tiny and huge values, a width that is not a power of two)."""
    from .fp8_frozen import quantize_rows

    rows = check_rows(device)
    try:
        got = quantize_rows_op()(rows)
    except Exception:  # a Triton that cannot build or launch the kernel here: the PyTorch ops do the work
        logger.warning("FP8 rowwise quantisation on %s: the Triton kernel failed; using the PyTorch ops", device,
                       exc_info=True)  # fmt: skip
        return False
    expected = quantize_rows(rows)
    values_differ = (got[0].view(torch.uint8) != expected[0].view(torch.uint8)).sum().item()
    scales_differ = (got[1] != expected[1]).sum().item()
    if not values_differ and not scales_differ:
        logger.info(
            "FP8 rowwise quantisation on %s: the Triton kernel (its self-check matched the PyTorch ops)", device
        )
        return True
    logger.warning(
        "FP8 rowwise quantisation on %s: the Triton kernel differs from the PyTorch ops in %d of %d values and %d of "
        "%d row scales; using the PyTorch ops",
        device, values_differ, rows.numel(), scales_differ, rows.shape[0],
    )  # fmt: skip
    return False


def check_rows(device: torch.device | str, columns: int = 1000) -> torch.Tensor:
    """bf16 rows [6, columns] for the self-check: normal, zero, tiny (below the scale's epsilon once divided), huge,
    one spike, and values that sit halfway between two e4m3 numbers once scaled."""
    generator = torch.Generator().manual_seed(0)
    normal = torch.randn(columns, generator=generator)
    spike = torch.zeros(columns)
    spike[columns // 3] = -7.0
    rows = torch.stack([normal, torch.zeros(columns), normal * 1e-30, normal * 1e37, spike, normal.round() * 0.25])
    return rows.to(torch.bfloat16).to(device)


@functools.cache
def _kernel():
    """The Triton kernel: one program per row, the whole row in registers."""
    import triton
    import triton.language as tl

    @triton.jit
    def quantize_rows_kernel(x, out, scales, columns, FP8_MAX: tl.constexpr, INVERSE_MAX: tl.constexpr,
                             EPS: tl.constexpr, BLOCK: tl.constexpr):  # fmt: skip
        row = tl.program_id(0).to(tl.int64)
        offsets = tl.arange(0, BLOCK)
        mask = offsets < columns
        values = tl.load(x + row * columns + offsets, mask=mask, other=0.0).to(tl.float32)
        amax = tl.maximum(tl.max(tl.abs(values), axis=0), EPS)
        scale = amax * INVERSE_MAX
        scaled = tl.math.div_rn(values, tl.broadcast_to(scale, values.shape))
        clamped = tl.minimum(tl.maximum(scaled, -FP8_MAX), FP8_MAX)
        tl.store(out + row * columns + offsets, clamped.to(tl.float8e4nv), mask=mask)
        tl.store(scales + row, scale)

    return quantize_rows_kernel


def _launch(launcher, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(e4m3 [rows, columns], float32 scales [rows, 1]); ``launcher`` is `wrap_triton` in the operator."""
    from .fp8_frozen import _EPS, FP8, FP8_MAX

    x = x.contiguous()
    rows, columns = x.shape
    out = torch.empty((rows, columns), dtype=FP8, device=x.device)
    scales = torch.empty((rows, 1), dtype=torch.float32, device=x.device)
    block = max(16, 1 << (columns - 1).bit_length())
    if rows:
        launcher(_kernel())[(rows,)](
            x, out, scales, columns, FP8_MAX=FP8_MAX, INVERSE_MAX=1 / FP8_MAX, EPS=_EPS, BLOCK=block,
            num_warps=min(16, max(4, block // 1024)),
        )  # fmt: skip
    return out, scales


@functools.cache
def quantize_rows_op():
    """The operator, defined on first use (it registers in torch.library once per process)."""
    from torch.library import triton_op, wrap_triton

    @triton_op("whetstone::fp8_quantize_rows", mutates_args=())
    def fp8_quantize_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return _launch(wrap_triton, x)

    return fp8_quantize_rows
