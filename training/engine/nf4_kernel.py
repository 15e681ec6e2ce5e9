"""The NF4 dequantisation as one Triton kernel on CUDA (`nf4_frozen` uses it when Triton is there, else PyTorch ops).

Inductor's own kernel for `nf4_frozen.dequantize_nf4` recomputes the nested absmax and indexes the code tables per
output element, and reaches 1.2 TB/s on the H200; this kernel takes one packed byte per lane, computes its block's
scale once and writes the two weights side by side (2.5 TB/s at 10240×3840, bit-identical to bitsandbytes' CUDA
kernel: `bench/bench_nf4_dequant.py`). Two operators wrap it:

- ``whetstone::nf4_dequantize`` (a `torch.library.triton_op`): the forward's weight; compiled, Inductor launches the
  kernel from its own generated code, with the matmul beside it.
- ``whetstone::nf4_grad_input`` (an opaque `torch.library.custom_op`): the input gradient, dequantising again. It is
  opaque on purpose: a traceable dequantisation in the backward depends on the frozen buffers alone, and the
  partitioner, which never recomputes a kernel it cannot see into, would compute it in the forward and keep every
  dequantised weight for the backward (what QLoRA exists to avoid).
- ``whetstone::nf4_dequantize_beside`` and ``whetstone::nf4_grad_input_beside`` (`beside_operators`): the same with
  LoRA's B written beside the weight's rows, ``[W | B]`` [out, in + r], for the up-projection computed in the base's
  GEMM (`lora_concat`); the kernel writes each row ``in + r`` apart, so the weight is not copied.

Both take the packed tensors in `nf4_frozen.BUFFER_NAMES` order. Triton is imported only on a machine with a GPU,
when a QLoRA layer is converted; the CPU build of torch has none. Before its first use on a GPU the kernel is checked
against the PyTorch ops (`self_check`); a difference or a failure falls back to them, saying so.
"""

from __future__ import annotations

import functools
import importlib.util
import logging

import torch

logger = logging.getLogger(__name__)

BYTES_PER_PROGRAM = 1024


def available(dtype: torch.dtype, *, beside: bool = False) -> bool:
    """Whether CUDA tensors of a ``dtype`` NF4 weight get the Triton kernel (``beside``: its operators with LoRA's B
    beside the weight, `beside_operators`): bf16, a GPU, Triton installed, and the operators passed `self_check` on
    the current GPU. Decided once per layer, whatever device its tensors are on now (a
    model built on the host reaches the GPU later); CPU tensors always take the PyTorch ops."""
    if not (dtype == torch.bfloat16 and torch.cuda.is_available() and importlib.util.find_spec("triton") is not None):
        return False
    return self_check(torch.device("cuda", torch.cuda.current_device()), beside=beside)


@functools.cache
def self_check(device: torch.device, beside: bool = False) -> bool:
    """Once per device and operator pair: the kernel's weights against `nf4_frozen.dequantize_nf4`'s, bit for bit, on
    random packed tensors of a few blocks (a Triton or driver that rounds differently falls back to the PyTorch ops,
    saying so). The pairs are checked apart: a failure of the ``beside`` pair leaves the plain one in use."""
    what = "NF4 dequantisation beside LoRA's B" if beside else "NF4 dequantisation"
    from .nf4_frozen import NF4Layout, dequantize_nf4

    generator = torch.Generator().manual_seed(0)
    layout = NF4Layout(shape=(48, 640), dtype=torch.bfloat16, blocksize=64, nested_blocksize=256)
    blocks = 48 * 640 // 64
    tensors = {
        "packed": torch.randint(0, 256, (48 * 640 // 2,), dtype=torch.uint8, generator=generator),
        "absmax": torch.randint(0, 256, (blocks,), dtype=torch.uint8, generator=generator),
        "nested_absmax": torch.rand(-(-blocks // 256), generator=generator) + 0.5,
        "nested_code": torch.linspace(-1, 1, 256) + torch.rand(256, generator=generator) * 1e-3,
        "offset": torch.tensor(0.0371),
        "code": torch.linspace(-1, 1, 16) * 0.97,
    }
    tensors = {name: tensor.to(device) for name, tensor in tensors.items()}
    extra = (
        (torch.randn(48, 24, generator=generator) * 0.1).to(torch.bfloat16).to(device) if beside else None
    )  # 1,152 values: two programs, R not a power of 2
    try:
        weight, grad_in, grad = _run_both(tensors, layout, extra)
    except Exception:  # a Triton that cannot build or launch the kernel here: the PyTorch ops do the work
        logger.warning("%s on %s: the Triton kernel failed; using the PyTorch ops", what, device, exc_info=True)
        return False
    expected = dequantize_nf4(tensors, layout)
    if extra is not None:
        expected = torch.cat((expected, extra), dim=1)
    if torch.equal(weight, expected) and torch.equal(grad_in, grad @ expected):
        logger.info("%s on %s: the Triton kernel (its self-check matched the PyTorch ops)", what, device)
        return True
    logger.warning(
        "%s on %s: the Triton kernel differs from the PyTorch ops in %d of %d weights; using the "
        "PyTorch ops (slower, the same numbers as bitsandbytes)",
        what,
        device,
        (weight != expected).sum().item(),
        weight.numel(),
    )
    return False


def _run_both(tensors: dict, layout, beside=None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One operator pair on the self-check's tensors (``beside`` given: `beside_operators`): the weight, and the input
    gradient of a random output gradient."""
    from .nf4_frozen import BUFFER_NAMES

    dequantize, grad_input = operators() if beside is None else beside_operators()
    args = (*(tensors[name] for name in BUFFER_NAMES), *layout.shape, layout.blocksize, layout.nested_blocksize)
    args = args if beside is None else (beside, *args)
    grad = torch.randn(8, layout.shape[0], generator=torch.Generator().manual_seed(1)).to(torch.bfloat16)
    grad = grad.to(tensors["packed"].device)
    return dequantize(*args), grad_input(grad, *args), grad


@functools.cache
def _kernel():
    """The Triton kernel: one packed byte per lane, its block's scale once, both weights written side by side. With
    ``ROW_STRIDE`` the weight's rows of ``COLS`` values land ``ROW_STRIDE`` apart (columns left free beside them);
    0 writes them contiguously, as the plain operators do."""
    import triton
    import triton.language as tl

    @triton.jit
    def nf4_kernel(packed, absmax, nested_absmax, nested_code, code, offset, out, n_bytes,
                   HALF_BLOCK: tl.constexpr, NESTED: tl.constexpr, BYTES: tl.constexpr,
                   COLS: tl.constexpr, ROW_STRIDE: tl.constexpr):  # fmt: skip
        start = tl.program_id(0) * BYTES
        index = start + tl.arange(0, BYTES)
        mask = index < n_bytes
        byte = tl.load(packed + index, mask=mask, other=0).to(tl.int32)
        block = index // HALF_BLOCK
        quantised = tl.load(absmax + block, mask=mask, other=0).to(tl.int32)
        nested = tl.load(nested_absmax + block // NESTED, mask=mask, other=0.0)
        scale = tl.load(nested_code + quantised, mask=mask, other=0.0) * nested + tl.load(offset)
        high = tl.load(code + (byte >> 4), mask=mask, other=0.0) * scale
        low = tl.load(code + (byte & 15), mask=mask, other=0.0) * scale
        where = 2 * start + tl.arange(0, 2 * BYTES)
        target = where
        if ROW_STRIDE:
            target = (where // COLS) * ROW_STRIDE + where % COLS
        tl.store(out + target, tl.interleave(high, low).to(tl.bfloat16), mask=where < 2 * n_bytes)

    return nf4_kernel


@functools.cache
def _beside_kernel():
    """A Triton copy of ``beside`` [rows, R] into the columns after each weight row (a torch slice copy inside the
    traceable operator would be a scatter that Inductor may materialise as a copy of the whole [W | B])."""
    import triton
    import triton.language as tl

    @triton.jit
    def beside_kernel(beside, out, n_values, R: tl.constexpr, COLS: tl.constexpr, ROW_STRIDE: tl.constexpr,
                      BLOCK: tl.constexpr):  # fmt: skip
        index = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        mask = index < n_values
        values = tl.load(beside + index, mask=mask, other=0.0)
        tl.store(out + (index // R) * ROW_STRIDE + COLS + index % R, values, mask=mask)

    return beside_kernel


def _launch(launcher, packed, absmax, nested_absmax, nested_code, offset, code, rows, cols, blocksize, nested,
            beside=None):  # fmt: skip
    """The weight [rows, cols] in bf16 (``beside`` [rows, r]: [rows, cols + r], ``beside`` in the last r columns);
    ``launcher`` is `wrap_triton` inside a traceable operator, else identity."""
    extra = 0 if beside is None else beside.shape[1]
    if extra and (beside.dtype != torch.bfloat16 or not beside.is_contiguous() or beside.shape[0] != rows):
        raise ValueError(f"beside must be a contiguous bf16 [{rows}, r] tensor, not {beside.dtype} {beside.shape}")
    out = torch.empty((rows, cols + extra), dtype=torch.bfloat16, device=packed.device)
    n_bytes = packed.numel()
    if out.numel() >= 2**31:
        raise ValueError(f"NF4 weight of {out.numel()} values is over the kernel's int32 indexing")
    strides = dict(COLS=cols, ROW_STRIDE=cols + extra) if extra else dict(COLS=0, ROW_STRIDE=0)
    launcher(_kernel())[(-(-n_bytes // BYTES_PER_PROGRAM),)](
        packed, absmax, nested_absmax, nested_code, code, offset, out, n_bytes,
        HALF_BLOCK=blocksize // 2, NESTED=nested, BYTES=BYTES_PER_PROGRAM, **strides,
    )  # fmt: skip
    if extra:
        launcher(_beside_kernel())[(-(-beside.numel() // BYTES_PER_PROGRAM),)](
            beside, out, beside.numel(), R=extra, COLS=cols, ROW_STRIDE=cols + extra, BLOCK=BYTES_PER_PROGRAM
        )
    return out


@functools.cache
def operators() -> tuple:
    """The two operators, defined on first use (they register in torch.library once per process)."""
    from torch.library import custom_op, triton_op, wrap_triton

    @triton_op("whetstone::nf4_dequantize", mutates_args=())
    def nf4_dequantize(
        packed: torch.Tensor,
        absmax: torch.Tensor,
        nested_absmax: torch.Tensor,
        nested_code: torch.Tensor,
        offset: torch.Tensor,
        code: torch.Tensor,
        rows: int,
        cols: int,
        blocksize: int,
        nested_blocksize: int,
    ) -> torch.Tensor:
        return _launch(wrap_triton, packed, absmax, nested_absmax, nested_code, offset, code, rows, cols, blocksize,
                      nested_blocksize)  # fmt: skip

    @custom_op("whetstone::nf4_grad_input", mutates_args=())
    def nf4_grad_input(
        grad: torch.Tensor,
        packed: torch.Tensor,
        absmax: torch.Tensor,
        nested_absmax: torch.Tensor,
        nested_code: torch.Tensor,
        offset: torch.Tensor,
        code: torch.Tensor,
        rows: int,
        cols: int,
        blocksize: int,
        nested_blocksize: int,
    ) -> torch.Tensor:
        weight = _launch(lambda kernel: kernel, packed, absmax, nested_absmax, nested_code, offset, code, rows, cols,
                        blocksize, nested_blocksize)  # fmt: skip
        return grad @ weight.to(grad.dtype)

    @nf4_grad_input.register_fake
    def _(grad, packed, absmax, nested_absmax, nested_code, offset, code, rows, cols, blocksize, nested_blocksize):
        return grad.new_empty((grad.shape[0], cols))

    return nf4_dequantize, nf4_grad_input


@functools.cache
def beside_operators() -> tuple:
    """The two operators of LoRA's up-projection in the NF4 base's GEMM (`lora_concat`): [W | B] [rows, cols + r] for
    the forward, and ``grad @ [W | B]`` for the backward, dequantising again (opaque, as ``nf4_grad_input``)."""
    from torch.library import custom_op, triton_op, wrap_triton

    @triton_op("whetstone::nf4_dequantize_beside", mutates_args=())
    def nf4_dequantize_beside(
        beside: torch.Tensor,
        packed: torch.Tensor,
        absmax: torch.Tensor,
        nested_absmax: torch.Tensor,
        nested_code: torch.Tensor,
        offset: torch.Tensor,
        code: torch.Tensor,
        rows: int,
        cols: int,
        blocksize: int,
        nested_blocksize: int,
    ) -> torch.Tensor:
        return _launch(wrap_triton, packed, absmax, nested_absmax, nested_code, offset, code, rows, cols, blocksize,
                      nested_blocksize, beside)  # fmt: skip

    @custom_op("whetstone::nf4_grad_input_beside", mutates_args=())
    def nf4_grad_input_beside(
        grad: torch.Tensor,
        beside: torch.Tensor,
        packed: torch.Tensor,
        absmax: torch.Tensor,
        nested_absmax: torch.Tensor,
        nested_code: torch.Tensor,
        offset: torch.Tensor,
        code: torch.Tensor,
        rows: int,
        cols: int,
        blocksize: int,
        nested_blocksize: int,
    ) -> torch.Tensor:
        combined = _launch(lambda kernel: kernel, packed, absmax, nested_absmax, nested_code, offset, code, rows,
                          cols, blocksize, nested_blocksize, beside)  # fmt: skip
        return grad @ combined.to(grad.dtype)

    @nf4_grad_input_beside.register_fake
    def _(grad, beside, packed, absmax, nested_absmax, nested_code, offset, code, rows, cols, blocksize, nested):
        return grad.new_empty((grad.shape[0], cols + beside.shape[1]))

    return nf4_dequantize_beside, nf4_grad_input_beside
