"""Bytes of the small-card levers: the frozen base stored in FP8, and block swap (main blocks kept in pinned host
memory and streamed through ``SWAP_SLOTS`` device slots, ``training.engine.block_swap``).

Block swap's traffic per micro-step, in steady state: the forward streams the swapped blocks in order and the
backward in reverse; the last ``SWAP_SLOTS`` blocks of the forward are the first of the backward and stay, and the
last of the backward are the first of the next forward and stay too, so each micro-step copies
``2 * (swap_blocks - SWAP_SLOTS)`` blocks host to device (``tests/test_block_swap.py`` counts them).
"""

from __future__ import annotations

from ..model.config import ZImageConfig

BF16 = 2
FP32 = 4
#: Device slots a swapped block streams through: the block computing and the one being copied for it to use next.
SWAP_SLOTS = 2
#: Host-to-device bytes/s of pinned copies assumed for consumer cards (PCIe 4.0 x8, as on the RTX 4060 and 4060 Ti,
#: ~12 GB/s measured by users; x16 cards such as the 4070 and 4080 reach about twice that).
CONSUMER_PCIE_BYTES_PER_S = 12e9


def block_linear_shapes(model: ZImageConfig, modulated: bool = True) -> list[tuple[int, int]]:
    """(out_features, in_features) of every ``nn.Linear`` of one block, in module order."""
    d, h = model.dim, model.ffn_hidden_dim
    shapes = [(3 * d, d), (d, d), (h, d), (d, h), (h, d)]
    return shapes + [(4 * d, model.modulation_dim)] if modulated else shapes


def linear_bytes(shapes: list[tuple[int, int]], storage: str) -> int:
    """Weights of these linears as stored: bf16, or e4m3 (1 byte) plus one float32 scale per output row."""
    if storage == "fp8":
        return sum(rows * cols + rows * FP32 for rows, cols in shapes)
    return sum(rows * cols * BF16 for rows, cols in shapes)


def stored_linear_bytes(model: ZImageConfig, storage: str) -> int:
    """Every block linear of the model (refiners included), as stored."""
    modulated = (model.n_layers + model.n_refiner_layers) * linear_bytes(block_linear_shapes(model, True), storage)
    plain = model.n_refiner_layers * linear_bytes(block_linear_shapes(model, False), storage)
    return modulated + plain


def frozen_block_bytes(model: ZImageConfig, storage: str = "bf16") -> int:
    """The frozen tensors of one main block as stored (linears in ``storage``; norms and the adaLN bias in bf16):
    what block swap copies to the device and keeps pinned on the host."""
    shapes = block_linear_shapes(model, True)
    other = model.block_params(True) - sum(rows * cols for rows, cols in shapes)
    return linear_bytes(shapes, storage) + other * BF16


def swap_bytes_per_micro_step(model: ZImageConfig, storage: str, swap_blocks: int) -> int:
    """Host-to-device bytes block swap copies in one forward + backward (steady state, see the module docstring)."""
    if not swap_blocks:
        return 0
    return 2 * max(0, swap_blocks - SWAP_SLOTS) * frozen_block_bytes(model, storage)


def swap_host_bytes(model: ZImageConfig, storage: str, swap_blocks: int) -> int:
    """Pinned host memory the swapped blocks take."""
    return swap_blocks * frozen_block_bytes(model, storage)
